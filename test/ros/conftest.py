"""Fixtures for the ROS tests: a private DDS domain and a fresh rclpy Context per test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The node tests share helpers in nodekit.py. pytest runs with
# --import-mode=importlib (test dirs stay off sys.path); this folder holds no
# package that could shadow infmllm_ros, so it is safe to add.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

# Keep DDS on loopback and away from other runs on this machine, as scripts/env.sh
# does (the shipped Fast DDS profile, config/dds/fastdds_localhost.xml). Set before
# anything creates a context, and inherited by subprocesses the tests start.
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
DDS_PROFILE = Path(__file__).resolve().parents[2] / "config" / "dds" / "fastdds_localhost.xml"
if (os.environ.get("INFMLLM_DDS_LOCALHOST_ONLY", "1") == "1"
        and os.environ["RMW_IMPLEMENTATION"] == "rmw_fastrtps_cpp"):
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(DDS_PROFILE))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "SYSTEM_DEFAULT"
else:
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
# scripts/env.sh gives each shell its own ROS_DOMAIN_ID (1..100, clear of the
# ephemeral ports); without it, pick one from this process id in the same range.
os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 100 + 1))

#: scripts/test.sh sets INFMLLM_REQUIRE_ROS=1: a missing rclpy or interface is then a failure.
REQUIRE_ROS = os.environ.get("INFMLLM_REQUIRE_ROS", "0") == "1"

if REQUIRE_ROS:
    import rclpy  # noqa: F401 - fail loudly
else:
    rclpy = pytest.importorskip("rclpy", reason="rclpy is not importable (source scripts/env.sh)")


def _interfaces_or_skip():
    try:
        from infmllm_ros.msg import SceneDescription  # noqa: F401
        from infmllm_ros.srv import GetStats, Query  # noqa: F401
    except ImportError as exc:
        reason = (f"generated interfaces not importable ({exc}); build with colcon and source "
                  "install/setup.bash (scripts/env.sh)")
        if REQUIRE_ROS:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def interfaces():
    """Skip unless the package's msg/srv/action modules are built and on the path."""
    _interfaces_or_skip()


@pytest.fixture
def ros_context():
    """A fresh, initialised rclpy Context, shut down after the test."""
    import rclpy
    from rclpy.context import Context

    ctx = Context()
    rclpy.init(context=ctx, domain_id=int(os.environ["ROS_DOMAIN_ID"]))
    try:
        yield ctx
    finally:
        rclpy.try_shutdown(context=ctx)
