"""``infmllm-replay``: publish a ROS 2 bag's camera topics with their original timing.

    infmllm-replay BAG [--rate R] [--loop] [--topics T ...] [--start-offset SEC]
        [--remap from:=to ...] [--qos sensor|reliable] [--clock [HZ]]
        [--wait-for-subscribers N] [--wait-timeout SEC] [--delay SEC]
        [--ros-args -r __ns:=/robot1 -r camera/image_raw:=cam ...]

``ros2 bag play`` is not installable from PyPI, so this reads the bag with the
pure-Python ``rosbags`` package and publishes with rclpy. Only
``sensor_msgs/msg/Image`` and ``sensor_msgs/msg/CompressedImage`` topics are
played. Messages keep their header (stamp and frame_id); the gaps between them
follow the bag's receive times divided by ``rate``.

Names: the bag's topics are published in the replay node's namespace
(``--ros-args -r __ns:=/robot1`` plays ``/camera/image_raw`` as
``/robot1/camera/image_raw``, like the node's relative camera topics), and ROS
remapping rules (``--ros-args -r FROM:=TO``) apply to them as to any node's
topics; ``--remap FROM:=TO`` names the bag topic FROM directly.

Start: publishing before subscribers are discovered loses the first messages
(reliable QoS too: a writer only keeps samples for readers it knows), so by
default the first message waits until every topic has a subscriber
(``--wait-for-subscribers 1``, at most ``--wait-timeout`` seconds, then it plays
anyway and says so), then ``--delay`` seconds more (0.5 s: the subscriber may learn
of this publisher a moment after the publisher learnt of it; best-effort samples
sent in between are lost, reliable ones are repaired from the last 50).

``--clock [HZ]`` publishes ``/clock`` (rosgraph_msgs/Clock) from the bag's time
while playing, as ``ros2 bag play --clock`` does, for nodes with ``use_sim_time``.

:class:`BagPlayer` does the playing in its own thread on a node you give it, so
a test or a launcher can play a bag inside its own process::

    player = BagPlayer(node, "clip_bag", rate=2.0)
    player.wait_for_subscribers(timeout=5.0)
    player.start()
    player.wait(timeout=30.0)
    player.stop()
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

__all__ = ["BagError", "BagPlayer", "IMAGE_TYPES", "image_topics", "main"]

#: The message types a BagPlayer publishes.
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")


class BagError(RuntimeError):
    """The bag cannot be played as asked (missing, unreadable, unknown topic)."""


def _open_reader(bag_path: Path):
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    if not bag_path.exists():
        raise BagError(f"bag not found: {bag_path}")
    # The bag carries its message definitions; the typestore is only the
    # fallback for bags that do not.
    reader = AnyReader([bag_path], default_typestore=get_typestore(Stores.ROS2_KILTED))
    try:
        reader.open()
    except Exception as err:  # rosbags raises several unrelated error types
        raise BagError(f"cannot read bag {bag_path}: {err}") from None
    return reader


def image_topics(bag_path: str | Path) -> dict[str, str]:
    """Topic -> message type of the image topics in a bag."""
    reader = _open_reader(Path(bag_path))
    try:
        return {c.topic: c.msgtype for c in reader.connections if c.msgtype in IMAGE_TYPES}
    finally:
        reader.close()


def _qos_profile(qos: str):
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

    if qos == "sensor":
        return qos_profile_sensor_data  # best effort, keep last 5: what camera drivers offer
    if qos == "reliable":
        # Deep enough to repair the first messages for a subscriber that knows this writer
        # later than the writer knows it (discovery is not symmetric in time on a busy host).
        return QoSProfile(depth=50, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
    raise BagError(f"qos must be 'sensor' or 'reliable', not {qos!r}")


def parse_remaps(remaps: Iterable[str]) -> dict[str, str]:
    """``["/a:=/b", ...]`` -> ``{"/a": "/b"}``."""
    out = {}
    for item in remaps:
        source, sep, target = item.partition(":=")
        if not sep or not source or not target:
            raise BagError(f"remap must look like FROM:=TO, got {item!r}")
        out[source] = target
    return out


class BagPlayer:
    """Publish a bag's image topics on ``node`` from a background thread.

    Args:
        node: an rclpy node; publishers are created on it here, in the
            constructor, so subscribers can match before :meth:`start`.
        bag_path: the bag directory (sqlite3 or mcap, as ``rosbags`` reads).
        rate: playback speed factor (2.0 plays twice as fast).
        loop: start over at the end until :meth:`stop`. Stamps are the bag's,
            so they jump back at each new pass.
        topics: image topics to play (default: all image topics in the bag).
        start_offset: skip this many seconds from the start of the bag.
        remap: bag topic -> published topic.
        qos: ``"sensor"`` (best effort, keep last 5) or ``"reliable"``.
        in_namespace: publish each bag topic as a name relative to ``node``'s
            namespace (``/camera/image_raw`` -> ``camera/image_raw``), so the
            namespace moves it; False: the bag's absolute names.
        clock_hz: publish ``/clock`` from the bag's time at this rate while
            playing (0: no clock).

    Raises:
        BagError: missing bag, no image topics, a requested topic that is
            not in the bag (the message lists the available ones), bad rate.
    """

    def __init__(
        self,
        node: Any,
        bag_path: str | Path,
        rate: float = 1.0,
        loop: bool = False,
        topics: Optional[Sequence[str]] = None,
        start_offset: float = 0.0,
        remap: Optional[dict[str, str]] = None,
        qos: str = "sensor",
        in_namespace: bool = False,
        clock_hz: float = 0.0,
    ) -> None:
        from sensor_msgs.msg import CompressedImage, Image

        if not rate > 0:
            raise BagError(f"rate must be positive, got {rate}")
        if start_offset < 0:
            raise BagError(f"start_offset must be >= 0, got {start_offset}")
        if not clock_hz >= 0:
            raise BagError(f"clock rate must be >= 0 Hz, got {clock_hz}")
        self.node = node
        self.bag_path = Path(bag_path)
        self.rate = float(rate)
        self.loop = bool(loop)
        self.start_offset = float(start_offset)
        remap = dict(remap or {})

        available = image_topics(self.bag_path)
        if not available:
            raise BagError(f"bag {self.bag_path} has no Image or CompressedImage topics")
        wanted = list(topics) if topics else sorted(available)
        unknown = [t for t in wanted if t not in available]
        if unknown:
            listing = ", ".join(f"{t} ({available[t].rsplit('/', 1)[-1]})" for t in sorted(available))
            raise BagError(f"topic(s) {', '.join(unknown)} not in bag {self.bag_path}; image topics there: {listing}")
        self.topics = wanted
        profile = _qos_profile(qos)
        self._publishers = {}
        for topic in wanted:
            msg_class = CompressedImage if available[topic].endswith("CompressedImage") else Image
            name = remap.get(topic, topic.lstrip("/") if in_namespace else topic)
            self._publishers[topic] = node.create_publisher(msg_class, name, profile)
        self._clock_hz = float(clock_hz)
        self._clock_pub = None
        if clock_hz > 0:
            from rclpy.qos import QoSProfile, ReliabilityPolicy
            from rosgraph_msgs.msg import Clock

            # rclcpp's ClockQoS, what ros2 bag play uses and every TimeSource matches
            self._clock_pub = node.create_publisher(
                Clock, "/clock", QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
        self._bag_time: Optional[tuple] = None  # (wall monotonic, bag ns) of the pass playing
        self._clock_lock = threading.Lock()
        self._clock_last: Optional[tuple] = None  # (_bag_time of its pass, last ns published)

        self.published = 0  # messages published so far, over all passes
        self.passes = 0  # complete passes through the bag
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def published_topics(self) -> dict[str, str]:
        """Bag topic -> the topic name it is published on."""
        return {t: p.topic_name for t, p in self._publishers.items()}

    def wait_for_subscribers(self, count: int = 1, timeout: Optional[float] = 5.0,
                             should_stop=None) -> bool:
        """Wait until every topic has ``count`` matched subscriptions; False after ``timeout``
        seconds (None: no limit) or when ``should_stop()`` turns true."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            if self.subscribed(count):
                return True
            if should_stop is not None and should_stop():
                return False
            time.sleep(0.02)
        return self.subscribed(count)

    def subscribed(self, count: int = 1) -> bool:
        """Whether every topic has at least ``count`` matched subscriptions now."""
        return not self.unsubscribed(count)

    def unsubscribed(self, count: int = 1) -> list[str]:
        """The published topic names with fewer than ``count`` matched subscriptions now."""
        return [p.topic_name for p in self._publishers.values()
                if p.get_subscription_count() < count]

    def wait_for_all_acked(self, timeout: float = 5.0) -> bool:
        """Wait until reliable subscribers acknowledged every message (a no-op for best effort);
        False after ``timeout`` s. Call it before destroying the node: samples still being
        repaired are lost with the publisher."""
        from rclpy.duration import Duration

        end = time.monotonic() + timeout
        return all(p.wait_for_all_acked(Duration(seconds=max(0.0, end - time.monotonic())))
                   for p in self._publishers.values())

    def bag_time_ns(self) -> Optional[int]:
        """The bag time being played now (nanoseconds), or None before the first message."""
        origin = self._bag_time
        if origin is None:
            return None
        wall, bag_ns = origin
        return bag_ns + int((time.monotonic() - wall) * self.rate * 1e9)

    def _publish_clock(self, ns: Optional[int] = None) -> None:
        """Publish /clock at bag time ``ns`` (default: now); never backwards within a pass
        (the clock thread and the message thread both publish)."""
        from rosgraph_msgs.msg import Clock

        ns = self.bag_time_ns() if ns is None else ns
        if self._clock_pub is None or ns is None:
            return
        with self._clock_lock:
            if self._clock_last is not None and self._clock_last[0] == self._bag_time \
                    and ns <= self._clock_last[1]:
                return
            self._clock_last = (self._bag_time, ns)
            msg = Clock()
            msg.clock.sec, msg.clock.nanosec = divmod(int(ns), 1_000_000_000)
            self._clock_pub.publish(msg)

    def _run_clock(self) -> None:
        period = 1.0 / self._clock_hz
        while not self._stop.wait(period) and self.running:
            self._publish_clock()

    def start(self) -> None:
        """Start playing in a background thread (once)."""
        if self._thread is not None:
            raise RuntimeError("BagPlayer.start() called twice")
        self._thread = threading.Thread(target=self._run, name="bag-player", daemon=True)
        self._thread.start()
        if self._clock_pub is not None:
            threading.Thread(target=self._run_clock, name="bag-clock", daemon=True).start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop playing and join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the playback to end (never, with ``loop``, until :meth:`stop`); True when it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._play_once():
                    return  # stopped, or nothing to play at this offset
                self.passes += 1
                if not self.loop:
                    return
        except BaseException as err:  # kept for the caller: a thread cannot raise to it
            self.error = err

    def _play_once(self) -> bool:
        """One pass through the bag; False when stopped early or nothing was played."""
        from .images import to_rclpy_image

        reader = _open_reader(self.bag_path)
        try:
            connections = [c for c in reader.connections if c.topic in self._publishers]
            first_ns = reader.start_time + int(self.start_offset * 1e9)
            wall_start: Optional[float] = None
            played = 0
            for connection, bag_ns, raw in reader.messages(connections=connections, start=first_ns):
                if wall_start is None:
                    wall_start, first_ns = time.monotonic(), bag_ns
                    self._bag_time = (wall_start, first_ns)
                due = wall_start + (bag_ns - first_ns) / 1e9 / self.rate
                # Event.wait instead of sleep: stop() interrupts a long gap.
                delay = due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return False
                if self._stop.is_set():
                    return False
                message = to_rclpy_image(reader.deserialize(raw, connection.msgtype))
                self._publish_clock(bag_ns)  # the clock never lags the message it stamps
                self._publishers[connection.topic].publish(message)
                self.published += 1
                played += 1
            return played > 0
        finally:
            reader.close()

    def destroy(self) -> None:
        """Stop and remove the publishers from the node."""
        self.stop()
        for publisher in self._publishers.values():
            self.node.destroy_publisher(publisher)
        self._publishers.clear()
        if self._clock_pub is not None:
            self.node.destroy_publisher(self._clock_pub)
            self._clock_pub = None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infmllm-replay",
        description="Publish the Image/CompressedImage topics of a ROS 2 bag with their original "
                    "timing, in this node's namespace (--ros-args -r __ns:=/ns; ROS remapping "
                    "rules apply).",
    )
    p.add_argument("bag", help="bag directory (sqlite3 or mcap)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1.0)")
    p.add_argument("--loop", action="store_true", help="start over at the end")
    p.add_argument("--topics", nargs="+", default=None, metavar="T", help="image topics to play (default: all)")
    p.add_argument("--start-offset", type=float, default=0.0, metavar="SEC",
                   help="skip this many seconds from the start of the bag")
    p.add_argument("--remap", action="append", default=[], metavar="FROM:=TO",
                   help="publish bag topic FROM as TO (repeatable)")
    p.add_argument("--qos", choices=("sensor", "reliable"), default="sensor",
                   help="sensor: best effort, keep last 5 (default); reliable: keep last 50")
    p.add_argument("--clock", type=float, nargs="?", const=40.0, default=0.0, metavar="HZ",
                   help="publish /clock from the bag's time at HZ (default 40) while playing, for "
                        "nodes with use_sim_time")
    p.add_argument("--wait-for-subscribers", type=int, default=1, metavar="N",
                   help="before the first message, wait until every topic has N subscribers "
                        "(default 1; 0: don't wait)")
    p.add_argument("--wait-timeout", type=float, default=10.0, metavar="SEC",
                   help="give up waiting for subscribers after SEC seconds and play anyway "
                        "(default 10; 0: wait as long as it takes)")
    p.add_argument("--delay", type=float, default=0.5, metavar="SEC",
                   help="wait SEC seconds more before the first message, for discovery to "
                        "settle on the subscriber's side too (default 0.5)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """``infmllm-replay``; ``argv`` without the program name (default: ``sys.argv[1:]``)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args

    from .run import StopSignals

    full = ["infmllm-replay"] + list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(remove_ros_args(full)[1:])
    try:
        remap = parse_remaps(args.remap)
        for name, value in (("--delay", args.delay), ("--wait-timeout", args.wait_timeout),
                            ("--wait-for-subscribers", args.wait_for_subscribers)):
            if value < 0:
                raise BagError(f"{name} must be >= 0, got {value}")
        # Check the bag before starting ROS, so a typo costs no DDS start-up.
        image_topics(args.bag)
    except BagError as err:
        print(f"infmllm-replay: error: {err}", file=sys.stderr)
        return 2

    # Our own SIGINT/SIGTERM handlers: a second signal (launch sends one after Ctrl-C's)
    # must not raise in the middle of the clean-up.
    stop = StopSignals().install()
    stop.running()
    rclpy.init(args=full, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("infmllm_replay")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    log = node.get_logger()
    player: Optional[BagPlayer] = None
    rc = 0
    try:
        player = BagPlayer(node, args.bag, rate=args.rate, loop=args.loop, topics=args.topics,
                           start_offset=args.start_offset, remap=remap, qos=args.qos,
                           in_namespace=True, clock_hz=args.clock)
        topics = player.published_topics
        mapping = ", ".join(f"{src} -> {dst}" if src != dst else src for src, dst in topics.items())
        if args.wait_for_subscribers and not player.subscribed(args.wait_for_subscribers):
            limit = f"up to {args.wait_timeout:g} s" if args.wait_timeout else "no time limit"
            log.info(f"waiting for {args.wait_for_subscribers} subscriber(s) on "
                     f"{', '.join(topics.values())} ({limit}) ...")
            ok = player.wait_for_subscribers(args.wait_for_subscribers,
                                             args.wait_timeout or None, lambda: stop.requested)
            if stop.requested:
                return 0
            if not ok:
                missing = player.unsubscribed(args.wait_for_subscribers)
                log.warning(f"no subscriber on {', '.join(missing)} after {args.wait_timeout:g} s "
                            "(--wait-timeout); publishing anyway, early messages may be lost")
        if args.delay and stop.wait(args.delay):
            return 0
        log.info(f"playing {args.bag} at x{args.rate:g}{' (loop)' if args.loop else ''}: {mapping}"
                 + (f"; /clock at {args.clock:g} Hz" if args.clock else ""))
        player.start()
        while player.running and not stop.requested and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
        if player.error is not None:
            raise player.error
        if not stop.requested and not player.wait_for_all_acked(5.0):
            log.warning("some reliable subscribers did not acknowledge every message within 5 s")
    except BagError as err:
        print(f"infmllm-replay: error: {err}", file=sys.stderr)
        rc = 2
    except ExternalShutdownException:
        rc = 0
    finally:
        if player is not None:
            player.stop()
            if rc == 0:
                print(f"infmllm-replay: {player.published} messages published", file=sys.stderr)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        stop.restore()
    return rc


if __name__ == "__main__":
    sys.exit(main())
