"""The package's generated interfaces work end to end between two real rclpy nodes.

SceneDescription over a topic, Query and GetStats as services, Ask as an action:
each test has its own rclpy Context, one executor spinning in a thread, and bounded
waits. Skipped when rclpy or the generated modules don't import, unless
INFMLLM_REQUIRE_ROS=1 (scripts/test.sh sets it), where that is a failure.
"""

import os
import threading
import time

import pytest

pytestmark = pytest.mark.ros

_REQUIRE = os.environ.get("INFMLLM_REQUIRE_ROS") == "1"

try:
    import rclpy
    from rclpy.action import ActionClient, ActionServer
    from rclpy.callback_groups import ReentrantCallbackGroup
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy
except ImportError as exc:  # pragma: no cover - depends on the environment
    if _REQUIRE:
        raise
    pytest.skip(f"rclpy is not importable ({exc}); run via scripts/test.sh", allow_module_level=True)

try:
    from builtin_interfaces.msg import Time
    from infmllm_ros.action import Ask
    from infmllm_ros.msg import SceneDescription
    from infmllm_ros.srv import GetStats, Query
except ImportError as exc:  # pragma: no cover - depends on the build
    if _REQUIRE:
        raise
    pytest.skip(
        f"generated interfaces are not importable ({exc}): build with scripts/setup.sh, "
        "then `source scripts/env.sh`",
        allow_module_level=True,
    )

TIMEOUT_S = 15.0


class RosHarness:
    """A private rclpy Context, an executor spinning in a thread, and the nodes on it."""

    def __init__(self):
        self.context = Context()
        rclpy.init(context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.nodes = []
        self._thread = threading.Thread(target=self.executor.spin, name="ros-executor", daemon=True)
        self._started = False

    def node(self, name):
        node = rclpy.create_node(name, context=self.context)
        self.nodes.append(node)
        self.executor.add_node(node)
        if not self._started:
            self._thread.start()
            self._started = True
        return node

    def close(self):
        # Order matters: nodes, then the executor (its thread ends), then the context.
        for node in self.nodes:
            self.executor.remove_node(node)
            node.destroy_node()
        self.executor.shutdown(timeout_sec=5.0)
        if self._started:
            self._thread.join(timeout=5.0)
        rclpy.try_shutdown(context=self.context)
        assert not self._thread.is_alive(), "executor thread did not stop"


@pytest.fixture
def ros():
    harness = RosHarness()
    try:
        yield harness
    finally:
        harness.close()


def wait_for(predicate, timeout=TIMEOUT_S, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def wait_future(future, timeout=TIMEOUT_S):
    assert wait_for(future.done, timeout), f"no answer within {timeout} s"
    return future.result()


def stamp(sec, nanosec=0):
    return Time(sec=sec, nanosec=nanosec)


def test_interfaces_have_the_documented_fields():
    scene = SceneDescription.get_fields_and_field_types()
    assert {
        "header": "std_msgs/Header",
        "camera": "string",
        "text": "string",
        "oldest_frame_stamp": "builtin_interfaces/Time",
        "newest_frame_stamp": "builtin_interfaces/Time",
        "frames_encoded": "uint32",
        "cache_tokens": "uint32",
        "cache_bytes": "uint64",
        "policy": "string",
        "cache_budget_tokens": "uint32",
        "cache_capacity_tokens": "uint32",
    }.items() <= scene.items()
    assert Query.Request.get_fields_and_field_types() == {
        "question": "string",
        "camera": "string",
        "max_new_tokens": "uint32",
    }
    query = Query.Response.get_fields_and_field_types()
    assert query["latency_s"] == "float" and query["generated_tokens"] == "uint32"
    assert query["newest_frame_stamp"] == "builtin_interfaces/Time"
    assert GetStats.Request.get_fields_and_field_types() == {}
    stats = GetStats.Response.get_fields_and_field_types()
    for name in ("tokens_seen", "tokens_evicted", "cache_bytes", "cache_budget_bytes"):
        assert stats[name] == "uint64", name
    for name in ("cache_tokens", "cache_budget_tokens", "cache_capacity_tokens", "frames_received",
                 "frames_encoded", "frames_dropped", "frames_bad", "frames_pending", "next_position"):
        assert stats[name] == "uint32", name
    assert Ask.Feedback.get_fields_and_field_types()["partial_text"] == "string"


def test_scene_description_round_trip(ros):
    talker = ros.node("scene_talker")
    listener = ros.node("scene_listener")
    qos = QoSProfile(depth=5, reliability=QoSReliabilityPolicy.RELIABLE,
                     durability=QoSDurabilityPolicy.VOLATILE)
    received = []
    listener.create_subscription(SceneDescription, "scene", received.append, qos)
    pub = talker.create_publisher(SceneDescription, "scene", qos)

    msg = SceneDescription()
    msg.header.stamp = stamp(1_700_000_123, 456_000_000)
    msg.header.frame_id = "cam0_optical"
    msg.camera = "/cam0/image_raw"
    msg.text = "Two people walk across the road; one carries a red umbrella. ☂"
    msg.oldest_frame_stamp = stamp(1_700_000_000, 1)
    msg.newest_frame_stamp = stamp(1_700_000_123, 456_000_000)
    msg.frames_encoded = 321
    msg.cache_tokens = 4096
    msg.cache_bytes = 3 * 2**31  # above uint32
    msg.policy = "infmllm"
    msg.cache_budget_tokens = 4096

    # Discovery takes a moment: publish until the listener has one (bounded).
    def published_and_received():
        if not received:
            pub.publish(msg)
        return bool(received)

    assert wait_for(published_and_received, step=0.1), "SceneDescription never arrived"
    got = received[0]
    assert got == msg
    assert got.text.endswith("☂")
    assert got.cache_bytes == 3 * 2**31
    assert (got.oldest_frame_stamp.sec, got.oldest_frame_stamp.nanosec) == (1_700_000_000, 1)


def test_query_service_round_trip(ros):
    server = ros.node("query_server")
    client_node = ros.node("query_client")
    seen = []

    def answer(request, response):
        seen.append((request.question, request.camera, request.max_new_tokens))
        response.success = True
        response.answer = f"[{request.camera or 'all'}] {request.question.upper()}"
        response.oldest_frame_stamp = stamp(10)
        response.newest_frame_stamp = stamp(20, 5)
        response.prompt_tokens = 17
        response.generated_tokens = request.max_new_tokens or 32
        response.latency_s = 0.25
        return response

    server.create_service(Query, "query", answer)
    client = client_node.create_client(Query, "query")
    assert client.wait_for_service(timeout_sec=TIMEOUT_S), "query service not discovered"

    request = Query.Request(question="what is on the road?", camera="", max_new_tokens=0)
    response = wait_future(client.call_async(request))
    assert seen == [("what is on the road?", "", 0)]
    assert response.success and response.message == ""
    assert response.answer == "[all] WHAT IS ON THE ROAD?"
    assert response.generated_tokens == 32 and response.prompt_tokens == 17
    assert response.latency_s == pytest.approx(0.25)
    assert (response.newest_frame_stamp.sec, response.newest_frame_stamp.nanosec) == (20, 5)

    response = wait_future(client.call_async(
        Query.Request(question="and now?", camera="/cam1/image_raw", max_new_tokens=8)))
    assert response.answer == "[/cam1/image_raw] AND NOW?" and response.generated_tokens == 8


def test_get_stats_service_round_trip(ros):
    server = ros.node("stats_server")
    client_node = ros.node("stats_client")

    def stats(_request, response):
        response.success = True
        response.policy = "h2o"
        response.cache_tokens = 1000
        response.cache_budget_tokens = 1024
        response.cache_bytes = 2**33 + 1
        response.cache_budget_bytes = 2**34
        response.tokens_seen = 2**40
        response.tokens_evicted = 2**40 - 1000
        response.frames_received = 50
        response.frames_encoded = 40
        response.frames_dropped = 10
        response.oldest_frame_stamp = stamp(100)
        response.newest_frame_stamp = stamp(200)
        response.next_position = 1000
        return response

    server.create_service(GetStats, "get_stats", stats)
    client = client_node.create_client(GetStats, "get_stats")
    assert client.wait_for_service(timeout_sec=TIMEOUT_S), "get_stats service not discovered"
    response = wait_future(client.call_async(GetStats.Request()))
    assert response.success and response.policy == "h2o"
    assert response.cache_bytes == 2**33 + 1 and response.tokens_seen == 2**40
    assert response.frames_received == response.frames_encoded + response.frames_dropped
    assert response.newest_frame_stamp.sec == 200 and response.next_position == 1000


def test_ask_action_streams_feedback_and_result(ros):
    server = ros.node("ask_server")
    client_node = ros.node("ask_client")
    words = ["a", "person", "crosses", "the", "road"]

    def execute(goal_handle):
        text = ""
        for i, word in enumerate(words[: goal_handle.request.max_new_tokens or len(words)]):
            text = f"{text} {word}".strip()
            goal_handle.publish_feedback(Ask.Feedback(partial_text=text, generated_tokens=i + 1))
            time.sleep(0.02)
        goal_handle.succeed()
        return Ask.Result(success=True, answer=text, generated_tokens=len(text.split()),
                          prompt_tokens=3, latency_s=0.1)

    action_server = ActionServer(server, Ask, "ask", execute, callback_group=ReentrantCallbackGroup())
    client = ActionClient(client_node, Ask, "ask")
    try:
        assert client.wait_for_server(timeout_sec=TIMEOUT_S), "ask action server not discovered"
        feedback = []
        goal = Ask.Goal(question="what happens?", camera="", max_new_tokens=0)
        goal_handle = wait_future(client.send_goal_async(
            goal, feedback_callback=lambda fb: feedback.append(fb.feedback.partial_text)))
        assert goal_handle.accepted
        result = wait_future(goal_handle.get_result_async()).result
        assert result.success and result.answer == "a person crosses the road"
        assert result.generated_tokens == 5
        # Feedback is best effort; whatever arrived is a growing prefix of the answer.
        assert all(result.answer.startswith(text) for text in feedback)
    finally:
        client.destroy()
        action_server.destroy()
