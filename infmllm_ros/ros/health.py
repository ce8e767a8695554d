"""Health checks the node reports in /diagnostics that need ROS, kept out of node.py."""

from __future__ import annotations

import time
from typing import Optional


class SimClockWatch:
    """Whether the node's ROS clock is fed when ``use_sim_time`` is true.

    With ``use_sim_time`` the node's time comes only from ``/clock``: with no
    clock publisher it stands at 0, and when the publisher stops it stands
    still, so every ROS-time timer stops too. The node's own timers (the
    diagnostics, the worker's sampling) run on the steady clock and keep going;
    this tells the user why stamps and other nodes' timers do not.

    Args:
        node: the rclpy node.
        stale_s: ROS time that has not moved for this many seconds (of steady
            time) is reported as stale.
    """

    def __init__(self, node, stale_s: float = 3.0):
        self._node = node
        self._stale_s = stale_s
        self._last_ns: Optional[int] = None
        self._changed = time.monotonic()

    def problem(self) -> Optional[str]:
        """Why the ROS clock cannot be trusted now, or None (also when use_sim_time is false)."""
        try:
            if not self._node.get_parameter("use_sim_time").value:
                return None
        except Exception:  # noqa: BLE001 - parameter not declared (very old rclpy)
            return None
        now_ns = self._node.get_clock().now().nanoseconds
        t = time.monotonic()
        if now_ns != self._last_ns:
            self._last_ns, self._changed = now_ns, t
        if now_ns == 0:
            return ("use_sim_time is true but no /clock message has arrived: ROS time is 0 "
                    "(publish /clock, e.g. infmllm-replay --clock, or set use_sim_time false)")
        if t - self._changed > self._stale_s:
            return (f"use_sim_time is true but /clock has not advanced for {t - self._changed:.0f} s "
                    "(its publisher stopped or paused); ROS-time timers and stamps stand still")
        return None
