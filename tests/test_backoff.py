import random
import threading

from dfm_stream import backoff
from dfm_stream.backoff import Backoff


def test_delays_double_within_equal_jitter_and_stop_at_the_cap():
    b = Backoff(0.1, 1.0, random.Random(1))
    bounds = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    for d in bounds:
        delay = b.next()
        assert d / 2 <= delay <= d
    b.reset()
    assert b.next() <= 0.1


def test_delays_are_jittered():
    b = Backoff(1.0, 1.0, random.Random(2))
    assert len({round(b.next(), 6) for _ in range(5)}) == 5


def test_wait_returns_at_once_when_stop_is_set():
    stop = threading.Event()
    stop.set()
    b = Backoff(3600.0, 3600.0)
    assert b.wait(stop) is True  # would block for half an hour if the stop event were ignored
    assert b.attempts == 1


def test_wait_returns_false_when_the_delay_passes():
    assert Backoff(0.001, 0.001).wait(threading.Event()) is False
    assert Backoff(3600.0, 3600.0).wait(threading.Event(), delay=0.001) is False


def test_every_loop_cap_is_at_least_its_first_delay():
    caps = [
        backoff.WORKER_FETCH,
        backoff.PUBLISH,
        backoff.EVENT_SEND,
        backoff.MODEL_WATCH,
        backoff.READER_SINK,
    ]
    for cap in caps:
        b = cap.backoff()
        assert (b.initial, b.maximum) == (cap.initial, cap.maximum)
        assert 0 < cap.initial <= cap.maximum
