"""A real ``infmllm-node`` process stopped by signals, as ``ros2 launch`` and Ctrl-C stop it.

Ctrl-C under launch gives the node two SIGINTs (the terminal's, to the process
group, and launch's own) a moment apart, then SIGTERM after launch's 5 s
``sigterm_timeout``. Each test starts the executable's entry point in a
subprocess with the real SmolLM2, talks to it over DDS from a probe in this
process, signals it and checks how it ends: exit code 0, no traceback, no
``terminate called``, and every caller still waiting got its reply. Nothing
asserts on timing; the stop time the node logs is printed.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import time

import pytest

pytest.importorskip("rclpy", reason="rclpy is not importable (source scripts/env.sh)")

from nodekit import NodeProcess, Probe, clip_frames, image_msg, node_test_marks, wait_for  # noqa: E402

pytestmark = node_test_marks()

T0 = 1_700_000_000


def _clean_exit(node: NodeProcess, code: int) -> None:
    out = node.output
    assert "Traceback" not in out, out[-4000:]
    assert "terminate called" not in out, out[-4000:]
    assert "it/s]" not in out, out[-4000:]  # no progress bars (empty lines under launch)
    assert code == 0, (code, out[-4000:])
    stop = re.search(r"stopped in ([0-9.]+) s", out)
    print(f"node stop took {stop.group(1) if stop else '?'} s after the first signal")


def _feed_until_encoded(probe, topic: str, stats_client, n: int) -> None:
    """Offer frames (best effort: some may be lost on a busy machine) until ``n`` are encoded."""
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from infmllm_ros.srv import GetStats

    frames = clip_frames(2, every=10, width=192)
    pub = probe.create_publisher(Image, topic, qos_profile_sensor_data)
    wait_for(lambda: pub.get_subscription_count() > 0, 60, f"the node's subscription on {topic}")
    sent = [0]

    def encoded() -> bool:
        pub.publish(image_msg(frames[sent[0] % 2], T0 + sent[0]))
        sent[0] += 1
        fut = stats_client.call_async(GetStats.Request())
        wait_for(fut.done, 30, "get_stats")
        return fut.result().frames_encoded >= n

    wait_for(encoded, 180, f"{n} frames encoded in the node", step=0.5)


def _loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


@pytest.mark.slow
def test_two_sigints_mid_answer_abort_the_pending_ask_and_exit_cleanly(ros_context, tmp_path):
    """Ctrl-C under launch: SIGINT mid-answer, a second SIGINT 0.5 s later. The answer stops
    between tokens, the ~/ask client that is waiting gets an aborted result (not a hang), the
    process exits 0 without a traceback. Its sockets are all on loopback (the shipped Fast DDS
    profile that scripts/env.sh and the test conftest select)."""
    from action_msgs.msg import GoalStatus
    from rclpy.action import ActionClient

    from infmllm_ros.action import Ask
    from infmllm_ros.srv import GetStats

    node = NodeProcess("-r", "__ns:=/sig", "-p", "model.preset:=smollm2-offline",
                       "-p", "cameras.front.topic:=cam", "-p", "sample_rate_hz:=50.0",
                       "-p", "model.num_threads:=1", cwd=tmp_path)
    probe = Probe(ros_context, "sig_probe")
    try:
        stats = probe.node.create_client(GetStats, "/sig/infmllm/get_stats")
        assert stats.wait_for_service(timeout_sec=300), "node did not come up:\n" + node.output[-3000:]
        _feed_until_encoded(probe.node, "/sig/cam", stats, 2)

        sockets = node.inet_sockets()
        assert sockets, "the node process holds no socket at all?"
        exposed = [s for s in sockets if not _loopback(s[0])]
        assert not exposed, f"sockets bound off loopback: {exposed} (all: {sockets})"

        ask = ActionClient(probe.node, Ask, "/sig/infmllm/ask")
        assert ask.wait_for_server(timeout_sec=30)
        partial = []
        goal = Ask.Goal(question="Describe everything you saw, in great detail.", max_new_tokens=200)
        gh_fut = ask.send_goal_async(goal, feedback_callback=partial.append)
        wait_for(gh_fut.done, 60, "the goal accepted")
        gh = gh_fut.result()
        assert gh.accepted
        result_fut = gh.get_result_async()
        wait_for(lambda: partial, 180, "a first partial answer (the node is mid-answer)")
        node.signal(signal.SIGINT)
        time.sleep(0.5)
        if node.proc.poll() is None:
            node.signal(signal.SIGINT)  # launch's own SIGINT after the terminal's
        code = node.wait(60)
        wait_for(result_fut.done, 30, "the ~/ask result after the node stopped")
        res = result_fut.result()
        assert res.status == GoalStatus.STATUS_ABORTED, (res.status, res.result.message)
        assert "shutting down" in res.result.message
        assert res.result.generated_tokens < 200
    finally:
        node.kill()
        probe.close()
    assert "cancelling the answer in progress" in node.output, node.output[-3000:]  # mid-answer
    _clean_exit(node, code)


@pytest.mark.slow
def test_sigterm_during_a_long_question_prefill_then_more_signals(ros_context, tmp_path):
    """SIGTERM while a question of thousands of tokens is being read in (prefill), then a
    SIGINT and another SIGTERM while stopping: the prefill stops between pieces of
    cache.max_chunk_tokens, the waiting ~/query caller is answered, exit 0, no traceback, no
    'terminate called'."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.qos import QoSProfile

    from infmllm_ros.srv import GetStats, Query

    node = NodeProcess("-r", "__ns:=/pre", "-p", "model.preset:=smollm2-offline",
                       "-p", "cameras.front.topic:=cam", "-p", "sample_rate_hz:=50.0",
                       "-p", "query.max_question_chars:=100000", "-p", "diagnostics.period_s:=0.2",
                       "-p", "model.num_threads:=1", "-p", "cache.budget_tokens:=7168", cwd=tmp_path)
    probe = Probe(ros_context, "pre_probe")
    activity = []
    probe.node.create_subscription(
        DiagnosticArray, "/diagnostics",
        lambda a: activity.extend(v.value for s in a.status if s.name == "/pre/infmllm: stream"
                                  for v in s.values if v.key == "worker_activity"),
        QoSProfile(depth=50))
    try:
        stats = probe.node.create_client(GetStats, "/pre/infmllm/get_stats")
        assert stats.wait_for_service(timeout_sec=300), "node did not come up:\n" + node.output[-3000:]
        _feed_until_encoded(probe.node, "/pre/cam", stats, 1)
        query = probe.node.create_client(Query, "/pre/infmllm/query")
        assert query.wait_for_service(timeout_sec=30)
        # ~2900 tokens (a question may take half the 7168-token budget): about 15 s of
        # prefill at 200 tokens/s, in pieces of 256 tokens
        question = " ".join(f"Was person number {i} wearing a red coat?" for i in range(250))
        activity.clear()
        fut = query.call_async(Query.Request(question=question, max_new_tokens=8))
        wait_for(lambda: "query" in activity or fut.done(), 120, "the worker reading the question in")
        assert not fut.done(), fut.result().message  # e.g. refused as too long for the budget
        node.signal(signal.SIGTERM)
        time.sleep(0.3)
        for sig in (signal.SIGINT, signal.SIGTERM):
            if node.proc.poll() is None:
                node.signal(sig)
                time.sleep(0.2)
        code = node.wait(60)
        wait_for(fut.done, 30, "the ~/query reply after the node stopped")
        resp = fut.result()
        assert not resp.success and "shutting down" in resp.message, resp.message
    finally:
        node.kill()
        probe.close()
    assert "stopping (SIGTERM)" in node.output, node.output[-3000:]
    _clean_exit(node, code)


def test_a_signal_during_the_model_load_ends_the_start_at_once(tmp_path):
    """SIGINT while the model loads: no traceback, exit 0, and the node says it stopped."""
    node = NodeProcess("-r", "__ns:=/load", "-p", "model.preset:=smollm2-offline", cwd=tmp_path)
    try:
        node.wait_line("loading model", 120)
        node.signal(signal.SIGINT)
        time.sleep(0.3)
        if node.proc.poll() is None:
            node.signal(signal.SIGINT)
        code = node.wait(120)
    finally:
        node.kill()
    assert "stopped during start-up (SIGINT)" in node.output, node.output[-3000:]
    assert "ready:" not in node.output
    _clean_exit(node, code)
