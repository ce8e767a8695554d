"""memory.state_file on disk: a kill -9 in the middle of a save never leaves a torn file.

A child process streams into a real SmolLM2 stream and saves it through
:class:`~infmllm_ros.ros.state.StateFile` back to back; the test kills it with
SIGKILL while a save's temporary file is being written, then loads what is on
disk into a fresh stream. No ROS needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from infmllm_ros.ros.state import StateFile

pytestmark = pytest.mark.model

SETTINGS = dict(policy="infmllm", budget_tokens=1024, max_chunk_tokens=256)

CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from infmllm_ros.engine import Stream, StreamConfig, load_model
    from infmllm_ros.ros.state import StateFile

    lm = load_model("smollm2", device="cpu", dtype="float32")
    stream = Stream(lm, StreamConfig(**{settings}))
    text = open(sys.argv[2], encoding="utf-8").read()[:3000]
    stream.append_text(text, kind="text")  # a cache of several hundred tokens: saves take a while
    state = StateFile(sys.argv[1])
    i = 0
    while True:
        stream.append_text(f"12:00:{{i % 60:02d}} front: {{i % 5}} people, left\\n", kind="frame",
                           camera="front", stamp=1000.0 + i)
        state.save(stream)
        print(stream.stats().frames_seen, flush=True)  # this save is complete on disk
        i += 1
""").format(settings=SETTINGS)


def _kill_mid_save(path, emma_path) -> tuple:
    """Start the child, SIGKILL it while a temporary save file exists; (killed mid-save, stdout)."""
    tmp_prefix = f".{path.name}.tmp-"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(emma_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    try:
        deadline = time.monotonic() + 600
        saves_seen = False
        while time.monotonic() < deadline and proc.poll() is None:
            temps = [f for f in os.listdir(path.parent) if f.startswith(tmp_prefix)]
            saves_seen = saves_seen or path.exists()
            if temps and saves_seen:  # a second (or later) save is being written right now
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                left = [f for f in os.listdir(path.parent) if f.startswith(tmp_prefix)]
                out, err = proc.communicate()
                return bool(left), out, err
            time.sleep(0.001)
        out, err = proc.communicate(timeout=5) if proc.poll() is not None else ("", "")
        raise AssertionError(f"no save seen in the child (rc {proc.returncode}): {err[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_kill_9_mid_save_leaves_the_last_complete_state(smollm2, shared_data, tmp_path):
    from infmllm_ros.engine import Stream, StreamConfig

    path = tmp_path / "memory.pt"
    for attempt in range(3):  # the kill lands between two saves now and then: then again
        for f in tmp_path.iterdir():
            f.unlink()
        mid_save, out, err = _kill_mid_save(path, shared_data / "text" / "pg158-emma.txt")
        if mid_save:
            break
    assert mid_save, "never killed the child while it was writing a save"
    completed = [int(x) for x in out.split()]
    assert completed, err[-3000:]

    state = StateFile(path)
    stream = Stream(smollm2, StreamConfig(**SETTINGS))
    try:
        res = state.load(stream, set_aside=False)
        assert res.loaded, res.reason
        stats = stream.stats()
        # the file holds exactly the last save that completed before the kill
        assert stats.frames_seen == completed[-1]
        assert stats.newest_stamp == 1000.0 + completed[-1] - 1
        assert path.stat().st_size <= 1.1 * stats.bytes_held + 256 * 1024  # cache + records
    finally:
        stream.close()
    # the torn temporary file is cleaned up at the next start, the state file is kept
    assert state.remove_leftovers() and path.is_file()
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
