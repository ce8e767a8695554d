"""The node's ROS-free bookkeeping: frame slots, the job queue, stamps."""

from __future__ import annotations

import threading

import pytest

from infmllm_ros.ros.core import (
    FrameRef,
    FrameSlots,
    Job,
    JobQueue,
    RateMeter,
    StampBook,
    sec_to_stamp,
    stamp_to_sec,
)


def test_slot_keeps_only_the_latest_and_counts_the_overwritten():
    woken = []
    slots = FrameSlots(["front", "rear"], on_put=lambda: woken.append(1))
    assert slots.take("front") is None
    assert slots.put("front", "f1") is False
    assert slots.put("front", "f2") is True  # f1 never processed: dropped
    assert slots.put("front", "f3") is True
    slots.put("rear", "r1")
    assert slots.take("front") == "f3" and slots.take("front") is None
    assert slots.take("rear") == "r1"
    slots.put("front", "f4")  # after a take nothing is dropped
    c = slots.counts()
    assert (c["front"].received, c["front"].dropped) == (4, 2)
    assert (c["rear"].received, c["rear"].dropped) == (1, 0)
    assert len(woken) == 5
    slots.mark_encoded("front")
    slots.mark_bad("rear", "bad encoding 'foo'")
    t = slots.totals()
    assert (t.received, t.dropped, t.encoded, t.bad) == (5, 2, 1, 1)
    assert slots.counts()["rear"].last_error == "bad encoding 'foo'"
    slots.reset_counts()
    assert slots.totals().received == 0


def test_every_frame_is_counted_once_while_it_is_on_its_way_and_across_a_reset():
    slots = FrameSlots(["a"])

    def balance():
        t = slots.totals()
        assert t.received == t.encoded + t.dropped + t.bad + t.pending
        return t

    slots.put("a", "f1")
    assert balance().pending == 1  # waiting in the slot
    f1, gen = slots.take_sample("a")
    slots.put("a", "f2")
    assert balance().pending == 2  # one being described, one waiting
    slots.mark_encoded("a", gen)
    f2, gen2 = slots.take_sample("a")
    slots.mark_bad("a", "undecodable", gen2)
    assert (balance().encoded, balance().bad, balance().pending) == (1, 1, 0)
    slots.put("a", "f3")
    _, old = slots.take_sample("a")  # in flight when the counts are reset
    slots.put("a", "f4")  # waiting when the counts are reset: forgotten with them
    slots.reset_counts()
    assert slots.take("a") is None
    slots.mark_encoded("a", old)  # settles nothing after the reset
    t = balance()
    assert (t.received, t.encoded, t.pending) == (0, 0, 0)
    slots.put("a", "f5")
    _, gen5 = slots.take_sample("a")
    slots.mark_encoded("a", gen5)
    assert (balance().received, balance().encoded, balance().pending) == (1, 1, 0)


def test_slots_under_concurrent_puts_lose_no_count():
    slots = FrameSlots(["a"])
    taken = []

    def producer():
        for i in range(2000):
            slots.put("a", i)

    threads = [threading.Thread(target=producer) for _ in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        m = slots.take("a")
        if m is not None:
            taken.append(m)
    for t in threads:
        t.join()
    if slots.take("a") is not None:
        taken.append(1)
    c = slots.counts()["a"]
    assert c.received == 6000
    assert c.dropped + len(taken) == 6000


def test_rate_meter():
    now = [0.0]
    r = RateMeter(window_s=10.0, clock=lambda: now[0])
    for _ in range(11):
        r.tick()
        now[0] += 0.5
    assert abs(r.rate() - 2.0) < 0.25
    now[0] += 100.0
    assert r.rate() == 0.0


def test_queue_policy_bounds_waiting_questions():
    q = JobQueue(size=2, policy="queue")
    jobs = [Job("query") for _ in range(4)]
    assert q.submit(jobs[0]) is None
    running = q.pop()
    assert running is jobs[0] and q.busy
    assert q.submit(jobs[1]) is None and q.submit(jobs[2]) is None
    reason = q.submit(jobs[3])
    assert reason and "queue_size is 2" in reason and q.refused == 1
    # control jobs skip the limit and run first
    reset = Job("reset", control=True)
    assert q.submit(reset) is None
    q.done(running)
    assert q.pop() is reset
    q.done(reset)
    assert q.pop() is jobs[1]


def test_reject_policy_refuses_while_busy():
    q = JobQueue(size=4, policy="reject")
    a, b = Job("query"), Job("query")
    assert q.submit(a) is None
    assert "busy" in q.submit(b)  # a is waiting
    q.pop()
    assert "busy" in q.submit(b)  # a is running
    q.done(a)
    assert q.submit(b) is None
    q.configure(4, "queue")
    assert q.submit(Job("query")) is None


def test_cancelled_jobs_are_skipped_and_close_fails_the_rest():
    q = JobQueue(size=4)
    a, b, c = Job("query"), Job("query"), Job("query")
    for j in (a, b, c):
        q.submit(j)
    a.cancel()
    assert q.pop() is b
    assert a.done and a.error.startswith("cancelled")
    left = q.close()
    assert left == [c] and c.done and "shutting down" in c.error
    assert b.should_stop()  # the running one is told to stop between tokens
    assert "shutting down" in q.submit(Job("query"))


def test_job_wait_and_finish():
    j = Job("query", question="q")
    assert not j.wait(0.01)
    threading.Timer(0.05, j.finish, kwargs={"result": 42}).start()
    assert j.wait(5.0) and j.result == 42 and j.error is None


def test_stamps_round_trip_exactly_through_the_book():
    assert stamp_to_sec(5, 500_000_000) == 5.5
    assert sec_to_stamp(None) == (0, 0)
    assert sec_to_stamp(1700000000.25) == (1700000000, 250_000_000)
    book = StampBook(capacity=3)
    refs = [FrameRef("front", 1700000000, 123_456_789 + i, "cam") for i in range(5)]
    keys = [book.add(r) for r in refs]
    assert book.lookup(keys[-1]) == refs[-1]  # exact nanoseconds, frame_id kept
    assert book.newest == refs[-1]
    old = book.lookup(keys[0])  # aged out: rounded to the microsecond
    assert old.sec == 1700000000 and abs(old.nanosec - 123_456_789) <= 1000
    assert book.lookup(None) is None
    book.clear()
    assert book.newest is None


def test_stamp_gaps_estimate_frames_lost_before_the_callback():
    """A 10 Hz camera: holes in its stamp sequence are lost frames, whatever the order in
    which short and long intervals come; repeats, jumps back and pauses are not loss."""
    from infmllm_ros.ros.core import StampGaps

    g = StampGaps()
    assert g.period is None and g.lost == 0 and g.recent_lost_fraction() == 0.0
    t0 = 1000.0
    received = [0, 3, 4, 9, 10, 11, 20]  # frames 1-2, 5-8 and 12-19 lost: 2 + 4 + 8 = 14
    for i in received:
        g.add(t0 + 0.1 * i)
    assert g.period == pytest.approx(0.1)
    assert g.lost == 14
    assert g.recent_lost_fraction() == pytest.approx(14 / (14 + 6))
    g.add(t0)  # a looping bag starts over: a new sequence, no loss counted
    g.add(t0 + 0.1)
    g.add(t0 + 0.1)  # a repeated stamp
    g.add(t0 + 0.1 + 60.0)  # the source paused for a minute: not 600 lost frames
    g.add(0.0)  # unstamped: ignored
    assert g.lost == 14 and g.received == 11
    # the period is the shortest interval even when it shows up late
    late = StampGaps()
    for i in (0, 4, 8, 9):
        late.add(t0 + 0.1 * i)
    assert late.lost == 6


def test_slots_report_the_lost_estimate_per_camera_and_reset_it():
    from infmllm_ros.ros.core import FrameSlots

    slots = FrameSlots(["a", "b"])
    for i in (0, 1, 2, 5):
        slots.put("a", object(), stamp=50.0 + 0.2 * i)
    slots.put("b", object(), stamp=50.0)
    c = slots.counts()
    assert (c["a"].lost_estimate, c["b"].lost_estimate, slots.totals().lost_estimate) == (2, 0, 2)
    assert c["a"].camera_hz == pytest.approx(5.0)
    slots.reset_counts()
    assert slots.counts()["a"].lost_estimate == 0
def test_the_book_tells_a_jump_back_per_camera_and_restores_refs():
    book = StampBook()
    front = [FrameRef("front", 100 + i, 5, "f") for i in range(3)]
    for r in front:
        assert book.jump_back(r) is None
        book.add(r)
    rear = FrameRef("rear", 7, 0, "r")  # another clock: not a jump of front's
    assert book.jump_back(rear) is None
    book.add(rear)
    looped = FrameRef("front", 100, 5, "f")
    assert book.jump_back(looped) == pytest.approx(2.0)
    assert book.jump_back(FrameRef("front", 102, 5, "f")) is None  # the same stamp again is no jump
    again = StampBook()
    again.restore(book.refs())
    assert again.newest == rear and again.lookup(front[1].seconds) == front[1]
    assert again.jump_back(looped) == pytest.approx(2.0)
