"""DDS stays on loopback by default: the sockets of a real ROS 2 process in the shell
scripts/env.sh makes, listed with psutil (issue: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
alone left Fast DDS sockets on 0.0.0.0 and on the external interface)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable (source scripts/env.sh)")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[2]

# A ROS 2 process with a node, a subscription, a publisher and a service; prints its sockets
# (as psutil lists them) once discovery is up, then exits.
PROBE = """
import json, time, psutil, rclpy
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_srvs.srv import Trigger
rclpy.init()
n = Node("socket_probe")
n.create_subscription(Image, "camera/image_raw", lambda m: None, 10)
n.create_publisher(Image, "out", 10)
n.create_service(Trigger, "~/x", lambda req, resp: resp)
for _ in range(10):
    rclpy.spin_once(n, timeout_sec=0.1)
socks = [(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="inet")]
print("SOCKETS " + json.dumps(socks))
n.destroy_node()
rclpy.try_shutdown()
"""


def _sockets_in_env_sh_shell(**env_overrides):
    env = dict(os.environ)
    # what env.sh decides must come from env.sh, not from this test run's environment
    for k in ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE",
              "ROS_AUTOMATIC_DISCOVERY_RANGE", "INFMLLM_DDS_LOCALHOST_ONLY", "ROS_LOCALHOST_ONLY"):
        env.pop(k, None)
    env.update(env_overrides)
    env.setdefault("INFMLLM_VENV", str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv"))))
    p = subprocess.run(
        ["bash", "-c", f'source "{REPO}/scripts/env.sh" && env | grep -E "^(FASTDDS_DEFAULT|ROS_AUTOMATIC)" ; '
                       f'exec python -c "$PROBE"'],
        env={**env, "PROBE": PROBE}, capture_output=True, text=True, timeout=120, cwd="/")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    import json

    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("SOCKETS "))
    variables = dict(ln.split("=", 1) for ln in p.stdout.splitlines() if "=" in ln and
                     not ln.startswith("SOCKETS"))
    return json.loads(line[len("SOCKETS "):]), variables


def test_env_sh_keeps_every_dds_socket_on_loopback():
    if os.environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") != "rmw_fastrtps_cpp":
        pytest.skip("the shipped profile is for Fast DDS (rmw_fastrtps_cpp)")
    sockets, variables = _sockets_in_env_sh_shell()
    assert variables.get("FASTDDS_DEFAULT_PROFILES_FILE", "").endswith("config/dds/fastdds_localhost.xml")
    assert sockets, "the ROS process holds no socket?"
    exposed = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback]
    assert not exposed, f"bound off loopback: {exposed} (all: {sockets})"


def test_multi_machine_switch_leaves_the_profile_out():
    """INFMLLM_DDS_LOCALHOST_ONLY=0 (README, "Network"): no loopback profile, discovery on the
    subnet, and the process still runs."""
    _sockets, variables = _sockets_in_env_sh_shell(INFMLLM_DDS_LOCALHOST_ONLY="0")
    assert "FASTDDS_DEFAULT_PROFILES_FILE" not in variables
    assert variables.get("ROS_AUTOMATIC_DISCOVERY_RANGE") == "SUBNET"
