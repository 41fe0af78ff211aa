"""Unit tests of the dynamic batcher (pure logic: the clock is passed in as ``now``, no Redis)."""

import pytest

from dfm_stream.batcher import DEFAULT_BATCH_SIZE, DEFAULT_MAX_WAIT_MS, Batcher

T0 = 100.0
"""An arbitrary monotonic start time, in seconds."""


def items_of(batches: list) -> list[tuple[object, list[object]]]:
    """Return (key, items) of each batch, in order."""
    return [(b.key, b.items) for b in batches]


def test_defaults_come_from_the_module_constants() -> None:
    batcher: Batcher[int] = Batcher()
    assert batcher.batch_size == DEFAULT_BATCH_SIZE
    assert batcher.max_wait_s == pytest.approx(DEFAULT_MAX_WAIT_MS / 1000)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_is_rejected(batch_size: int) -> None:
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        Batcher(batch_size=batch_size)


def test_negative_max_wait_is_rejected() -> None:
    with pytest.raises(ValueError, match="max wait must be >= 0 ms"):
        Batcher(max_wait_ms=-1)


def test_empty_batcher_has_nothing_ready_and_no_deadline() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=10)
    assert batcher.ready(now=T0) == []
    assert batcher.ready(now=T0, flush=True) == []
    assert batcher.deadline() is None
    assert len(batcher) == 0


def test_partial_batch_is_held_before_its_deadline() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=10)
    batcher.add("m", 1, now=T0)
    batcher.add("m", 2, now=T0 + 0.005)
    assert batcher.ready(now=T0 + 0.009) == []
    assert len(batcher) == 2


def test_full_batch_is_ready_at_once() -> None:
    batcher: Batcher[int] = Batcher(batch_size=3, max_wait_ms=1000)
    for i in range(3):
        batcher.add("m", i, now=T0)
    assert items_of(batcher.ready(now=T0)) == [("m", [0, 1, 2])]
    assert len(batcher) == 0
    assert batcher.deadline() is None


def test_partial_batch_is_ready_at_its_deadline() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=10)
    batcher.add("m", 1, now=T0)
    batcher.add("m", 2, now=T0 + 0.008)
    assert items_of(batcher.ready(now=T0 + 0.010)) == [("m", [1, 2])]
    assert len(batcher) == 0


def test_deadline_counts_from_the_first_item_of_a_batch() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=10)
    batcher.add("m", 1, now=T0)
    batcher.add("m", 2, now=T0 + 0.009)
    assert batcher.deadline() == pytest.approx(T0 + 0.010)


def test_deadline_is_that_of_the_oldest_open_batch() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=10)
    batcher.add("new", 1, now=T0 + 0.003)
    batcher.add("old", 2, now=T0)
    assert batcher.deadline() == pytest.approx(T0 + 0.010)


def test_zero_max_wait_makes_every_item_ready_immediately() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=0)
    batcher.add("m", 1, now=T0)
    assert items_of(batcher.ready(now=T0)) == [("m", [1])]


def test_flush_hands_out_partial_batches_before_their_deadline() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=1000)
    batcher.add("a", 1, now=T0)
    batcher.add("b", 2, now=T0)
    assert items_of(batcher.ready(now=T0, flush=True)) == [("a", [1]), ("b", [2])]
    assert len(batcher) == 0


def test_items_of_different_keys_never_share_a_batch() -> None:
    batcher: Batcher[str] = Batcher(batch_size=2, max_wait_ms=1000)
    for item in ("a1", "b1", "a2", "b2"):
        batcher.add(item[0], item, now=T0)
    assert items_of(batcher.ready(now=T0)) == [("a", ["a1", "a2"]), ("b", ["b1", "b2"])]


def test_each_key_has_its_own_clock() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=10)
    batcher.add("early", 1, now=T0)
    batcher.add("late", 2, now=T0 + 0.008)
    assert items_of(batcher.ready(now=T0 + 0.010)) == [("early", [1])]
    assert batcher.ready(now=T0 + 0.017) == []
    assert items_of(batcher.ready(now=T0 + 0.020)) == [("late", [2])]


def test_items_keep_their_arrival_order_within_a_batch() -> None:
    batcher: Batcher[int] = Batcher(batch_size=5, max_wait_ms=10)
    for i in (3, 1, 4, 1, 5):
        batcher.add("m", i, now=T0)
    assert items_of(batcher.ready(now=T0)) == [("m", [3, 1, 4, 1, 5])]


def test_overfull_key_is_split_into_batches_of_at_most_batch_size() -> None:
    batcher: Batcher[int] = Batcher(batch_size=3, max_wait_ms=1000)
    for i in range(7):
        batcher.add("m", i, now=T0)
    assert items_of(batcher.ready(now=T0)) == [("m", [0, 1, 2]), ("m", [3, 4, 5])]
    assert len(batcher) == 1


def test_remainder_of_a_split_keeps_the_first_items_clock() -> None:
    batcher: Batcher[int] = Batcher(batch_size=2, max_wait_ms=10)
    for i in range(3):
        batcher.add("m", i, now=T0)
    batcher.ready(now=T0)
    assert batcher.deadline() == pytest.approx(T0 + 0.010)
    assert items_of(batcher.ready(now=T0 + 0.010)) == [("m", [2])]


def test_batch_after_a_handed_out_one_starts_a_new_clock() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=10)
    batcher.add("m", 1, now=T0)
    batcher.ready(now=T0 + 0.010)
    batcher.add("m", 2, now=T0 + 0.050)
    assert batcher.ready(now=T0 + 0.055) == []
    assert batcher.deadline() == pytest.approx(T0 + 0.060)


def test_batch_started_is_the_time_of_its_first_item() -> None:
    batcher: Batcher[int] = Batcher(batch_size=2, max_wait_ms=10)
    batcher.add("m", 1, now=T0 + 0.001)
    batcher.add("m", 2, now=T0 + 0.002)
    (batch,) = batcher.ready(now=T0 + 0.002)
    assert batch.started == pytest.approx(T0 + 0.001)


def test_room_is_batch_size_when_nothing_is_open() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4)
    assert batcher.room() == 4


def test_room_is_what_the_fullest_open_batch_can_take() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=10)
    batcher.add("a", 1, now=T0)
    for i in range(3):
        batcher.add("b", i, now=T0)
    assert batcher.room() == 1


def test_room_is_at_least_one_when_a_batch_is_overfull() -> None:
    batcher: Batcher[int] = Batcher(batch_size=2, max_wait_ms=10)
    for i in range(5):
        batcher.add("m", i, now=T0)
    assert batcher.room() == 1


def test_len_counts_items_over_all_open_batches() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=10)
    batcher.add("a", 1, now=T0)
    batcher.add("b", 2, now=T0)
    batcher.add("b", 3, now=T0)
    assert len(batcher) == 3


def test_default_clock_is_monotonic_time() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_ms=60_000)
    batcher.add("m", 1)
    deadline = batcher.deadline()
    assert deadline is not None
    assert batcher.ready() == []
    assert items_of(batcher.ready(now=deadline)) == [("m", [1])]
