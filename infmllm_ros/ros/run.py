"""Run a node process until SIGINT/SIGTERM, then stop it in order, whatever signals follow.

``ros2 launch`` stops a node by sending SIGINT, then SIGTERM after its
``sigterm_timeout`` (5 s), then SIGKILL; Ctrl-C in the terminal sends SIGINT to
the whole process group as well, so a node under launch usually gets two
SIGINTs a moment apart. rclpy's own handlers shut the context down at the first
signal (no reply can be sent after that) and let Python raise
``KeyboardInterrupt`` wherever the main thread happens to be at the second,
e.g. inside the worker's join. So this module replaces them:

* :class:`StopSignals` installs Python handlers for SIGINT and SIGTERM (before
  ``rclpy.init(..., signal_handler_options=NO)``). During start-up the first
  signal raises :class:`StartupInterrupted` in the main thread, so a model load
  is abandoned at once; once the node runs, a signal only records the request.
  Later signals never raise: they are counted and reported.
* :func:`run_node` spins the node's executor in a thread while the main thread
  waits for a stop request, then stops in this order: the node's own
  :meth:`shutdown` (cancel the answer in progress between tokens or prefill
  pieces, fail waiting questions, join the worker) while the executor still
  runs, so that waiting ``~/query`` callers and ``~/ask`` goals get their
  refusal or aborted result; :meth:`drain` (those replies go out); executor
  shutdown; ``destroy_node``; ``rclpy.try_shutdown``.

Exit codes: 0 for a stop by signal (also during start-up), ``startup_code`` (2)
for a start-up error with a one-line reason, 1 when the executor failed.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple, Type

__all__ = ["StartupInterrupted", "StopSignals", "exit_now", "run_node"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StartupInterrupted(Exception):
    """A stop signal arrived while the node was starting (e.g. loading its model)."""


class StopSignals:
    """SIGINT/SIGTERM -> a stop request; see the module docstring.

    Python runs signal handlers in the main thread between bytecodes, and a
    main thread blocked in :meth:`wait` (a lock wait) is woken by them, so the
    request is seen at once.
    """

    def __init__(self, signals: Sequence[int] = SIGNALS):
        self._signals = tuple(signals)
        self._old: dict = {}
        self._event = threading.Event()
        self._starting = True
        self.received: List[str] = []  # names of the signals received, in order
        self.reason = ""

    def install(self) -> "StopSignals":
        for s in self._signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, old in self._old.items():
            try:
                signal.signal(s, old)
            except (ValueError, TypeError):  # not the main thread / a handler set from C
                pass
        self._old.clear()

    def running(self) -> None:
        """Start-up is over: from now on a signal only requests the stop."""
        self._starting = False

    def request(self, reason: str) -> None:
        """Ask for a stop from code (e.g. the executor failed); the first reason is kept."""
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._event.wait(timeout)

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        first = not self._event.is_set()
        self.request(name)
        if first and self._starting:
            raise StartupInterrupted(name)


class _CannotStart(Exception):
    """rclpy could not initialise (its reason is the start-up error)."""


def _spin(executor, stop: StopSignals, errors: list) -> None:
    from rclpy.executors import ExternalShutdownException

    try:
        executor.spin()
    except ExternalShutdownException:
        stop.request("the ROS context was shut down")
    except BaseException as exc:  # noqa: BLE001 - a callback raised: stop the process, say why
        errors.append(exc)
        stop.request(f"executor failed: {type(exc).__name__}: {exc}")


def run_node(make_node: Callable[[], "object"], args: Optional[list] = None, *,
             name: str = "node", startup_errors: Tuple[Type[BaseException], ...] = (),
             startup_code: int = 2, stop_timeout: float = 3.5) -> int:
    """Create the node with ``make_node()`` and run it until a stop signal; the exit code.

    Args:
        make_node: builds the node (after ``rclpy.init``); it must have
            ``executor_threads()``, ``shutdown(timeout)``, ``drain(timeout)`` and
            ``destroy_node()``.
        args: command-line arguments for ``rclpy.init`` (``--ros-args ...``).
        name: used in the start-up error line ``[name] cannot start: <reason>``.
        startup_errors: exception types that mean "cannot start" (exit ``startup_code``).
        stop_timeout: seconds to wait for the node's worker to stop. It stops
            between tokens and prefill pieces, well inside a second on an idle
            machine; a single step (a frame's encoding or one prefill piece) on
            an overloaded one can take longer. Past it the ROS side still stops
            in order and the process ends without waiting for that step (the
            stream in memory goes with the process anyway), within launch's 5 s
            ``sigterm_timeout``.
    """
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy._rclpy_pybind11 import RCLError
    from rclpy.signals import SignalHandlerOptions

    stop = StopSignals().install()
    code = 0
    node = executor = spinner = None
    errors: list = []
    try:
        try:
            rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        except RCLError as exc:  # e.g. malformed --ros-args: rcl's reason is the start-up error
            raise _CannotStart(str(exc)) from None
        node = make_node()
        executor = MultiThreadedExecutor(num_threads=node.executor_threads())
        executor.add_node(node)
        spinner = threading.Thread(target=_spin, args=(executor, stop, errors),
                                   name="ros-executor", daemon=True)
        spinner.start()
        stop.running()
        stop.wait()
        if errors:
            code = 1
            node.get_logger().error(f"stopping: {stop.reason}")
        else:
            node.get_logger().info(f"stopping ({stop.reason})")
    except StartupInterrupted as exc:
        stop.running()
        print(f"[{name}] stopped during start-up ({exc})", file=sys.stderr)
    except (_CannotStart, *startup_errors) as exc:
        stop.running()
        print(f"[{name}] cannot start: " + " ".join(str(exc).split()), file=sys.stderr)  # one line
        code = startup_code
    finally:
        code = _stop_in_order(node, executor, spinner, stop, stop_timeout, code)
    return code


def _stop_in_order(node, executor, spinner, stop: StopSignals, stop_timeout: float,
                   code: int) -> int:
    """The stop sequence of :func:`run_node`; signals arriving meanwhile are only counted."""
    import rclpy

    stop.running()  # a signal from here on never raises
    t0 = time.monotonic()
    stopped = True
    if node is not None:
        stopped = node.shutdown(stop_timeout)
        if spinner is not None and spinner.is_alive():
            node.drain(1.0)
    if executor is not None:
        # Callbacks return within the node's stop grace; don't wait on a stuck one forever.
        executor.shutdown(timeout_sec=5.0, wait_for_threads=stopped)
    if spinner is not None:
        spinner.join(5.0)
    if node is not None:
        extra = len(stop.received) - 1
        node.get_logger().info(
            f"stopped in {time.monotonic() - t0:.2f} s"
            + (f" ({extra} further signal(s) received while stopping)" if extra > 0 else ""))
        node.destroy_node()
    rclpy.try_shutdown()
    stop.restore()
    if not stopped:
        exit_now(code)  # a thread still inside torch would abort the interpreter's teardown
    return code


def exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown.

    Called after :func:`run_node` has stopped everything in order (worker
    joined, node destroyed, ROS context shut down). What the teardown would
    still do is free the model and unload libraries: with torch and
    transformers loaded that took 4-5 s here (more on a busy machine, past
    launch's 5 s ``sigterm_timeout``), and a library destructor that waits on
    a thread is what ends in ``terminate called without an active exception``.
    """
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
            pass
    os._exit(code)
