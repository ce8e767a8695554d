"""The node's memory on disk: ``memory.state_file`` (no ROS imports).

:class:`StateFile` keeps a stream's state (the engine's ``Stream.save`` /
``Stream.load``: the held KV cache plus its records, nothing else) in one file
that survives a reboot:

* **atomic save**: the state is written to a temporary file in the same
  folder, flushed to disk (``fsync``), then renamed over the old file (POSIX
  ``rename`` replaces atomically), and the folder is fsynced so the rename
  itself survives a power cut. A process killed at any moment (``kill -9``
  mid-write) leaves either the previous complete file or the new complete one,
  never a torn one; a leftover temporary file is removed at the next start.
* **load with a policy**: a file that does not match the model or the stream
  settings (``Stream.load`` raises ``ValueError`` with the reason) or that
  cannot be read is moved aside (``<file>.rejected-<UTC time>``, never
  deleted) and the node starts fresh, saying why.
* **exact stamps**: the stream keeps float seconds; the exact
  ``(sec, nanosec, frame_id)`` of the frames it holds are written beside it
  (``<file>.frames.json``, also atomically). A frames file older than the state
  only lacks entries (a stamp is a fact that never changes), and a missing
  entry falls back to the stamp rounded to the microsecond.

Not thread-safe: the thread that owns the stream (the node's worker) calls it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from .core import FrameRef

__all__ = ["StateFile", "SaveResult", "LoadResult", "atomic_write"]

#: Most frame references written beside the state: more than any budget can hold
#: frames (every frame costs at least one token), so no held frame is left out.
MAX_FRAME_REFS = 16_384


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def atomic_write(path: Path, write) -> int:
    """Call ``write(temp_path)``, fsync the result and rename it over ``path``; its size in bytes.

    On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f"{_temp_prefix(path)}{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return size


@dataclass
class SaveResult:
    path: str
    bytes: int
    seconds: float
    skipped: bool = False  # nothing changed since the last save


@dataclass
class LoadResult:
    loaded: bool
    reason: str  # why not, or what was loaded
    set_aside: str = ""  # where a rejected file went
    refs: Tuple[FrameRef, ...] = ()


class StateFile:
    """One stream's state file; see the module docstring.

    Args:
        path: the state file (``memory.state_file``); its folder must exist.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(os.path.expanduser(str(path)))
        self.frames_path = self.path.with_name(self.path.name + ".frames.json")
        self._last_saved: Optional[Tuple[int, int]] = None

    # -- checks -------------------------------------------------------------------

    def problem(self) -> Optional[str]:
        """Why this path cannot hold a state file (folder missing, not writable), or None."""
        folder = self.path.parent
        if not folder.is_dir():
            return f"folder {folder} does not exist"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"folder {folder} is not writable"
        if self.path.exists() and not self.path.is_file():
            return f"{self.path} exists and is not a file"
        return None

    def remove_leftovers(self) -> List[str]:
        """Delete temporary files a killed save left behind; their names."""
        gone = []
        for target in (self.path, self.frames_path):
            for f in target.parent.glob(_temp_prefix(target) + "*"):
                try:
                    f.unlink()
                    gone.append(f.name)
                except OSError:
                    pass
        return gone

    # -- save / load ----------------------------------------------------------------

    def save(self, stream, refs: Iterable[FrameRef] = (), *, force: bool = True) -> SaveResult:
        """Write ``stream``'s state atomically, then the exact stamps ``refs``.

        ``force=False`` skips the write when the stream took nothing in since
        the last save (periodic saves of an idle node cost nothing).

        Raises:
            OSError: the disk refused (full, read-only); the old file is intact.
        """
        t0 = time.monotonic()
        stats = stream.stats()
        mark = (int(stats.tokens_seen), int(stats.chunks_seen))
        if not force and mark == self._last_saved and self.path.is_file():
            return SaveResult(str(self.path), self.path.stat().st_size, 0.0, skipped=True)
        size = atomic_write(self.path, stream.save)
        refs = list(refs)[-MAX_FRAME_REFS:]
        rows = [[r.camera, r.sec, r.nanosec, r.frame_id] for r in refs]
        atomic_write(self.frames_path, lambda p: Path(p).write_text(json.dumps(rows), encoding="utf-8"))
        self._last_saved = mark
        return SaveResult(str(self.path), size, time.monotonic() - t0)

    def load(self, stream, *, set_aside: bool = True) -> LoadResult:
        """Restore ``stream`` from the file when it exists and matches.

        ``set_aside``: move a file that does not match or cannot be read to
        ``<file>.rejected-<UTC time>`` (start-up); otherwise leave it in place
        (an on-demand ``~/load`` that the caller refuses). The stream is left
        as it was whenever the load fails.
        """
        if not self.path.is_file():
            return LoadResult(False, f"no state file at {self.path}")
        try:
            stream.load(self.path)
        except ValueError as exc:  # another model / settings / dtype: the engine's reason
            return self._reject(f"it does not match this node: {exc}", set_aside)
        except Exception as exc:  # noqa: BLE001 - unreadable: truncated, not a torch file, I/O
            return self._reject(f"it cannot be read: {type(exc).__name__}: {exc}", set_aside)
        stats = stream.stats()
        self._last_saved = (int(stats.tokens_seen), int(stats.chunks_seen))
        return LoadResult(True, f"restored {stats.tokens_held} tokens ({stats.frames_seen} frames) "
                                f"from {self.path}", refs=tuple(self._read_refs()))

    def _reject(self, reason: str, set_aside: bool) -> LoadResult:
        if not set_aside:
            return LoadResult(False, f"state file {self.path} not loaded: {reason}")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.rejected-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.rejected-{stamp}-{n}")
        try:
            os.replace(self.path, aside)
            if self.frames_path.exists():
                os.replace(self.frames_path, aside.with_name(aside.name + ".frames.json"))
        except OSError as exc:
            return LoadResult(False, f"state file {self.path} not loaded ({reason}) and could not be "
                                     f"moved aside: {exc}")
        return LoadResult(False, f"state file {self.path} not loaded: {reason}; kept as {aside.name}",
                          set_aside=str(aside))

    def _read_refs(self) -> List[FrameRef]:
        try:
            rows = json.loads(self.frames_path.read_text(encoding="utf-8"))
            return [FrameRef(str(c), int(s), int(ns), str(f)) for c, s, ns, f in rows]
        except (OSError, ValueError, TypeError):
            return []  # stamps fall back to the microsecond; nothing else depends on them
