"""medge.runtime.batcher.Batcher: dynamic batching that never loses, duplicates or hangs an item.

Every test uses FakeModel, which keeps the model contract (``max_batch``,
``predict_batch(items, *, return_exceptions=True)``) and computes each result
from its item alone (``item * 2``), so the batched results can be checked
against a serial computation. Batch formation is checked structurally: a
model held on a gate (an Event) shows which items were batched together,
never how long something took. ``HANG`` only bounds a wait that a correct
Batcher ends at once, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import random
import subprocess
import sys
import textwrap
import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medge.errors import BackendUnavailable, DicomError, MedgeError
from medge.runtime.batcher import (
    Batcher,
    BatcherClosed,
    BatcherError,
    BatcherStats,
    QueueFull,
    _percentile,
)

HANG = 30.0  # seconds: a bound on waits that end at once unless the Batcher is broken
NEVER_MS = 3_600_000.0  # a max_delay_ms no test waits for: only a full batch or close() forms a batch
BAD = -1  # the model fails this item alone (as read_dicom fails a bad DICOM)
BOOM = -2  # the model raises for the whole batch containing this item


@dataclass(frozen=True)
class FakePrediction:
    item: Any
    value: int


def expected(item: int) -> FakePrediction:
    """The serial computation the batched results must equal."""
    return FakePrediction(item, item * 2)


class FakeModel:
    """The Model contract, recording every batch. ``gate``: when given, each batch waits for it."""

    def __init__(self, max_batch: int = 8, gate: "threading.Event | None" = None, raise_with: BaseException = None,
                 on_batch=None) -> None:
        self.max_batch = max_batch
        self.gate = gate
        self.raise_with = raise_with if raise_with is not None else RuntimeError("backend exploded")
        self.on_batch = on_batch
        self.batches: list[list] = []
        self.entered = threading.Semaphore(0)  # released once per batch, when it starts
        self._lock = threading.Lock()

    def predict_batch(self, items: list, *, return_exceptions: bool = True) -> list:
        assert return_exceptions is True
        assert 1 <= len(items) <= self.max_batch
        with self._lock:
            self.batches.append(list(items))
        self.entered.release()
        if self.on_batch is not None:
            self.on_batch(items)
        if self.gate is not None and not self.gate.wait(HANG):
            raise AssertionError("the test never opened the gate")
        if BOOM in items:
            raise self.raise_with
        return [DicomError(f"item {i} is not a valid DICOM") if i == BAD else expected(i) for i in items]

    def ran(self) -> Counter:
        with self._lock:
            return Counter(item for batch in self.batches for item in batch)

    def sizes(self) -> list[int]:
        with self._lock:
            return [len(b) for b in self.batches]


def wait_entered(model: FakeModel, batches: int = 1) -> None:
    for _ in range(batches):
        assert model.entered.acquire(timeout=HANG), "the model was never called"


def assert_stats_add_up(stats: BatcherStats) -> None:
    assert stats.submitted == (stats.completed + stats.failed + stats.cancelled + stats.queue_depth
                               + stats.in_flight), stats
    assert stats.batches == sum(stats.batch_sizes.values())
    assert sum(size * count for size, count in stats.batch_sizes.items()) <= stats.completed + stats.failed
    if stats.in_flight == 0:
        assert sum(size * count for size, count in stats.batch_sizes.items()) == stats.completed + stats.failed


# ---------------------------------------------------------------------- load


def test_load_16_threads_every_future_resolves_exactly_once_with_the_serial_result():
    model = FakeModel(max_batch=8)
    threads_n, per_thread = 16, 500
    bad_item = 8 * per_thread + 250  # in the middle of the middle thread's run
    item_of = lambda t, i: BAD if t * per_thread + i == bad_item else t * per_thread + i  # noqa: E731
    callbacks: Counter = Counter()
    callbacks_lock = threading.Lock()
    futures: dict = {}
    futures_lock = threading.Lock()
    errors: list = []
    start = threading.Barrier(threads_n + 1)

    def on_done(item, future):
        with callbacks_lock:
            callbacks[item] += 1

    def submitter(t: int) -> None:
        try:
            rng = random.Random(1234 + t)
            start.wait()
            for i in range(per_thread):
                item = item_of(t, i)
                future = batcher.submit(item, block=True)
                future.add_done_callback(lambda f, item=item: on_done(item, f))
                with futures_lock:
                    futures[item] = future
                if rng.random() < 0.3:  # load shaping only: nothing asserts on time
                    threading.Event().wait(rng.uniform(0, 0.0005))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    batcher = Batcher(model, max_delay_ms=1.0, max_queue=256)
    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    start.wait()
    snapshots = []
    while any(t.is_alive() for t in threads):
        snapshots.append(batcher.stats())
        threads[0].join(0.01)
    for t in threads:
        t.join(HANG)
        assert not t.is_alive()
    assert batcher.close(timeout=HANG)  # after close() returns, every done-callback has run
    assert not errors

    all_items = [item_of(t, i) for t in range(threads_n) for i in range(per_thread)]
    assert len(futures) == len(all_items) == threads_n * per_thread
    assert callbacks == Counter({item: 1 for item in all_items})  # each future resolved exactly once
    assert model.ran() == Counter({item: 1 for item in all_items})  # none lost, none run twice
    assert max(model.sizes()) <= 8
    for item, future in futures.items():
        if item == BAD:
            with pytest.raises(DicomError):
                future.result(timeout=0)
        else:
            assert future.result(timeout=0) == expected(item)
    for snapshot in snapshots:  # every snapshot is consistent, even mid-load
        assert_stats_add_up(snapshot)
    stats = batcher.stats()
    assert_stats_add_up(stats)
    assert (stats.submitted, stats.completed, stats.failed, stats.cancelled, stats.rejected) == (8000, 7999, 1, 0, 0)
    assert stats.batches == len(model.batches)


def test_a_bad_item_fails_only_itself_not_its_batch_mates():
    model = FakeModel(max_batch=3)
    with Batcher(model, max_delay_ms=NEVER_MS) as batcher:
        futures = batcher.submit_many([1, BAD, 3])  # a full batch at once
        assert futures[0].result(timeout=HANG) == expected(1)
        assert futures[2].result(timeout=HANG) == expected(3)
        with pytest.raises(DicomError, match="not a valid DICOM"):
            futures[1].result(timeout=HANG)
    assert model.batches == [[1, BAD, 3]]


@pytest.mark.parametrize("drain", [True, False])
def test_close_under_load_loses_nothing_it_accepted(drain):
    model = FakeModel(max_batch=4, on_batch=lambda items: threading.Event().wait(0.0002))
    batcher = Batcher(model, max_delay_ms=0.5, max_queue=16)  # a small queue: submitters block at close
    accepted: list[list] = [[] for _ in range(8)]
    outcomes: list = [None] * 8
    enough = threading.Semaphore(0)

    def submitter(t: int) -> None:
        i = 0
        while True:
            try:
                future = batcher.submit(t * 1_000_000 + i, block=True)
            except BatcherClosed:
                outcomes[t] = "closed"
                return
            except BaseException as exc:  # noqa: BLE001
                outcomes[t] = exc
                return
            accepted[t].append((t * 1_000_000 + i, future))
            if i == 50:
                enough.release()
            i += 1

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for _ in threads:
        assert enough.acquire(timeout=HANG)
    assert batcher.close(drain=drain, timeout=HANG)
    for t in threads:
        t.join(HANG)
        assert not t.is_alive(), "a submitter hung in submit() across close()"
    assert outcomes == ["closed"] * 8  # each submitter ended on BatcherClosed, nothing else

    ran = model.ran()
    cancelled = 0
    for item, future in (pair for per_thread in accepted for pair in per_thread):
        assert future.done()
        if future.cancelled():
            assert not drain
            assert ran[item] == 0
            cancelled += 1
        else:
            assert future.result(timeout=0) == expected(item)
            assert ran[item] == 1
    assert sum(ran.values()) == sum(len(a) for a in accepted) - cancelled  # nothing run that was not accepted
    stats = batcher.stats()
    assert_stats_add_up(stats)
    assert (stats.queue_depth, stats.in_flight, stats.cancelled) == (0, 0, cancelled)


# ---------------------------------------------------------------------- batch formation


def test_a_full_batch_forms_at_once_and_a_partial_one_waits_for_the_delay():
    gate = threading.Event()
    model = FakeModel(max_batch=4, gate=gate)
    batcher = Batcher(model, max_delay_ms=NEVER_MS)
    first = batcher.submit_many(range(4))
    wait_entered(model)  # would wait an hour if a full batch waited for the delay
    assert model.batches == [[0, 1, 2, 3]]
    more = batcher.submit_many(range(4, 10))  # queued behind the batch in flight
    gate.set()
    wait_entered(model)
    assert [f.result(timeout=HANG) for f in first + more[:4]] == [expected(i) for i in range(8)]
    assert model.batches[1] == [4, 5, 6, 7]  # six waiting: a full batch at once, two left over
    assert batcher.stats().queue_depth == 2  # the two wait for batch-mates or the delay
    assert batcher.close(timeout=HANG)  # draining on close does not wait for the delay
    assert [f.result(timeout=0) for f in more[4:]] == [expected(8), expected(9)]
    assert model.sizes() == [4, 4, 2]


@pytest.mark.parametrize("max_delay_ms", [0.0, 5.0])
def test_a_lone_item_is_processed_after_the_delay(max_delay_ms):
    model = FakeModel(max_batch=8)
    with Batcher(model, max_delay_ms=max_delay_ms) as batcher:
        assert batcher.submit(21).result(timeout=HANG) == expected(21)
        assert model.sizes() == [1]
        assert batcher.submit(22).result(timeout=HANG) == expected(22)  # and again, after an idle worker
    assert model.sizes() == [1, 1]


def test_max_batch_defaults_to_the_models_and_batches_never_exceed_it():
    model = FakeModel(max_batch=5)
    with Batcher(model, max_delay_ms=NEVER_MS) as batcher:
        assert batcher.max_batch == 5
        futures = batcher.submit_many(range(23))
    assert [f.result(timeout=0) for f in futures] == [expected(i) for i in range(23)]
    assert model.sizes() == [5, 5, 5, 5, 3]


def test_the_worker_does_not_hold_the_queue_lock_while_the_model_runs():
    side: dict = {}

    def from_another_thread(items):
        if "done" in side:
            return

        def touch():
            side["stats"] = batcher.stats()
            side["future"] = batcher.submit(7)

        helper = threading.Thread(target=touch)
        helper.start()
        helper.join(HANG)  # a worker holding the lock here would block the helper
        side["done"] = not helper.is_alive()

    model = FakeModel(max_batch=2, on_batch=from_another_thread)
    with Batcher(model, max_delay_ms=0.0) as batcher:
        assert batcher.submit(1).result(timeout=HANG) == expected(1)
        assert side["done"]
        assert side["stats"].in_flight == 1
        assert side["future"].result(timeout=HANG) == expected(7)


# ---------------------------------------------------------------------- queue full


def test_a_full_queue_rejects_or_blocks_with_a_timeout_and_stats_count_rejections():
    gate = threading.Event()
    model = FakeModel(max_batch=1, gate=gate)
    batcher = Batcher(model, max_delay_ms=0.0, max_queue=2)
    in_flight = batcher.submit(0)
    wait_entered(model)
    queued = [batcher.submit(1), batcher.submit(2)]
    with pytest.raises(QueueFull, match=r"max_queue=2.*larger max_queue") as info:
        batcher.submit(3)
    assert isinstance(info.value, MedgeError)
    with pytest.raises(QueueFull, match="after waiting 0.01 s"):
        batcher.submit(3, block=True, timeout=0.01)
    with pytest.raises(QueueFull):
        batcher.submit_many([3])
    with pytest.raises(QueueFull, match="at most 2 items"):
        batcher.submit_many([3, 4, 5], block=True)  # can never fit: refused at once, not a hang
    stats = batcher.stats()
    assert (stats.rejected, stats.submitted, stats.queue_depth, stats.in_flight) == (6, 3, 2, 1)

    got: dict = {}
    blocked = threading.Thread(target=lambda: got.setdefault("future", batcher.submit(4, block=True)))
    blocked.start()
    blocked.join(0.05)
    assert blocked.is_alive()  # still waiting for room (a correct Batcher never lets it through here)
    gate.set()  # the model makes room
    blocked.join(HANG)
    assert not blocked.is_alive()
    assert batcher.close(timeout=HANG)
    assert [f.result(timeout=0) for f in [in_flight, *queued, got["future"]]] == [expected(i) for i in (0, 1, 2, 4)]
    stats = batcher.stats()
    assert (stats.rejected, stats.submitted, stats.completed) == (6, 4, 4)


def test_close_wakes_a_blocked_submitter_with_batcher_closed_and_cancels_the_queue():
    gate = threading.Event()
    model = FakeModel(max_batch=1, gate=gate)
    batcher = Batcher(model, max_delay_ms=0.0, max_queue=1)
    in_flight = batcher.submit(0)
    wait_entered(model)
    queued = batcher.submit(1)
    got: dict = {}

    def blocked_submit():
        try:
            batcher.submit(2, block=True)
        except BaseException as exc:  # noqa: BLE001
            got["error"] = exc

    blocked = threading.Thread(target=blocked_submit)
    blocked.start()
    assert batcher.close(drain=False, timeout=0) is False  # the model still holds batch 0
    blocked.join(HANG)
    assert isinstance(got["error"], BatcherClosed)
    assert queued.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(timeout=0)
    gate.set()
    assert batcher.close(timeout=HANG)  # idempotent, and now the worker has stopped
    assert in_flight.result(timeout=0) == expected(0)  # the batch in flight finished
    assert model.ran() == Counter({0: 1})
    stats = batcher.stats()
    assert (stats.completed, stats.cancelled, stats.submitted) == (1, 1, 2)


# ---------------------------------------------------------------------- failures


@pytest.mark.parametrize("raised", [RuntimeError("backend exploded"), BackendUnavailable("the GPU fell off the bus"),
                                    SystemExit(3), KeyboardInterrupt(), GeneratorExit()],
                         ids=lambda e: type(e).__name__)
def test_a_model_raising_fails_that_batch_only_and_the_worker_keeps_serving(raised):
    model = FakeModel(max_batch=3, raise_with=raised)
    with Batcher(model, max_delay_ms=NEVER_MS) as batcher:
        failed = batcher.submit_many([1, BOOM, 3])
        errors = []
        for future in failed:
            with pytest.raises(Exception) as info:  # never SystemExit / KeyboardInterrupt in the host
                future.result(timeout=HANG)
            errors.append(info.value)
        assert all(e is errors[0] for e in errors)  # every future of the batch: the same exception
        if isinstance(raised, Exception):
            assert errors[0] is raised
        else:
            assert isinstance(errors[0], RuntimeError) and errors[0].__cause__ is raised
            assert type(raised).__name__ in str(errors[0])
        later = batcher.submit_many([4, 5, 6])
        assert [f.result(timeout=HANG) for f in later] == [expected(4), expected(5), expected(6)]
    stats = batcher.stats()
    assert (stats.failed, stats.completed, stats.batches) == (3, 3, 2)


class WrongLengthModel(FakeModel):
    def __init__(self, wrong) -> None:
        super().__init__(max_batch=2)
        self.wrong = wrong

    def predict_batch(self, items, *, return_exceptions=True):
        results = super().predict_batch(items, return_exceptions=return_exceptions)
        return self.wrong(results) if 99 in items else results


@pytest.mark.parametrize("wrong", [lambda r: r[:-1], lambda r: r + r[:1], lambda r: None, lambda r: iter(r)],
                         ids=["short", "long", "None", "iterator"])
def test_a_result_list_of_the_wrong_length_is_a_bug_reported_on_every_future_of_the_batch(wrong):
    model = WrongLengthModel(wrong)
    with Batcher(model, max_delay_ms=NEVER_MS) as batcher:
        for future in batcher.submit_many([99, 1]):
            with pytest.raises(RuntimeError, match="one result per item"):
                future.result(timeout=HANG)
        assert [f.result(timeout=HANG) for f in batcher.submit_many([2, 3])] == [expected(2), expected(3)]


def test_done_callbacks_that_raise_submit_or_close_do_not_break_the_worker(caplog):
    gate = threading.Event()
    model = FakeModel(max_batch=1, gate=gate)
    batcher = Batcher(model, max_delay_ms=0.0, max_queue=1)
    from_worker: dict = {}

    def raising(future):
        raise ValueError("a careless host callback")

    def submit_when_full(future):  # runs on the worker, the only thread that makes room
        try:
            batcher.submit(10, block=True)
        except BaseException as exc:  # noqa: BLE001
            from_worker["full"] = exc

    chained = threading.Event()

    def chain(future):
        try:
            from_worker["chained"] = batcher.submit(future.result().value, block=True)
        finally:
            chained.set()

    first = batcher.submit(1)
    wait_entered(model)
    second = batcher.submit(3)  # the queue is full now
    for callback in (raising, submit_when_full):
        first.add_done_callback(callback)
    second.add_done_callback(chain)
    gate.set()
    assert first.result(timeout=HANG) == expected(1)
    assert second.result(timeout=HANG) == expected(3)
    assert chained.wait(HANG)  # result() can return before the callbacks have run
    assert batcher.close(timeout=HANG)
    assert isinstance(from_worker["full"], QueueFull)  # refused at once: blocking there would deadlock
    assert from_worker["chained"].result(timeout=0) == expected(6)
    assert model.batches == [[1], [3], [6]]
    assert "a careless host callback" in caplog.text  # concurrent.futures logs it; the worker lives on

    closer = Batcher(FakeModel(max_batch=1), max_delay_ms=0.0)
    f = closer.submit(3)
    f.add_done_callback(lambda _: from_worker.setdefault("stopped", closer.close()))  # cannot join itself
    assert f.result(timeout=HANG) == expected(3)
    assert closer.close(timeout=HANG)
    assert from_worker["stopped"] is False


# ---------------------------------------------------------------------- cancellation


def test_caller_cancelled_futures_are_not_run():
    gate = threading.Event()
    model = FakeModel(max_batch=2, gate=gate)
    batcher = Batcher(model, max_delay_ms=0.0)
    running = batcher.submit(0)
    wait_entered(model)
    assert not running.cancel()  # too late: its batch started
    queued = batcher.submit_many([1, 2, 3, 4])
    assert queued[1].cancel() and queued[3].cancel()
    gate.set()
    assert batcher.close(timeout=HANG)
    assert model.batches == [[0], [1, 3]]  # the cancelled ones were skipped, not run
    assert running.result(timeout=0) == expected(0)
    assert [queued[0].result(timeout=0), queued[2].result(timeout=0)] == [expected(1), expected(3)]
    assert queued[1].cancelled() and queued[3].cancelled()
    stats = batcher.stats()
    assert_stats_add_up(stats)
    assert (stats.completed, stats.cancelled) == (3, 2)


def test_a_cancelled_future_wakes_wait_and_as_completed_at_once():
    """Future.cancel() alone does not wake concurrent.futures.wait / as_completed: the executor
    must call set_running_or_notify_cancel(). The Batcher does it as the future is cancelled,
    not when (if ever) its worker reaches the item: here the worker is busy with a held batch
    and the next batch would only form after NEVER_MS."""
    gate = threading.Event()
    model = FakeModel(max_batch=2, gate=gate)
    batcher = Batcher(model, max_delay_ms=NEVER_MS)
    running = batcher.submit_many([0, 1])  # a full batch: starts at once, held on the gate
    wait_entered(model)
    queued = batcher.submit_many([2, 3, 4])
    assert queued[1].cancel()
    done, _ = concurrent.futures.wait(queued, timeout=HANG, return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {queued[1]}
    assert next(concurrent.futures.as_completed([queued[1]], timeout=HANG)) is queued[1]
    stats = batcher.stats()
    assert (stats.cancelled, stats.queue_depth, stats.in_flight) == (1, 2, 2)
    assert_stats_add_up(stats)
    gate.set()
    assert batcher.close(timeout=HANG)
    assert model.batches == [[0, 1], [2, 4]]
    assert [f.result(timeout=0) for f in running + [queued[0], queued[2]]] == [expected(i) for i in (0, 1, 2, 4)]


def test_close_without_drain_wakes_the_waiters_of_what_it_cancels():
    gate = threading.Event()
    model = FakeModel(max_batch=1, gate=gate)
    batcher = Batcher(model, max_delay_ms=NEVER_MS)
    running = batcher.submit(0)
    wait_entered(model)
    queued = batcher.submit_many([1, 2])
    assert not batcher.close(drain=False, timeout=0)  # the batch in flight is still held on the gate
    done, not_done = concurrent.futures.wait(queued, timeout=HANG)
    assert done == set(queued) and not not_done and all(f.cancelled() for f in queued)
    assert set(concurrent.futures.as_completed(queued, timeout=HANG)) == set(queued)
    gate.set()
    assert batcher.close(timeout=HANG)
    assert running.result(timeout=0) == expected(0)
    assert (batcher.stats().cancelled, batcher.stats().completed) == (2, 1)


def test_cancelling_while_batches_form_notifies_each_future_exactly_once(caplog):
    """Caller cancels race the worker taking items: whoever takes an item off the queue notifies
    it, once (a second set_running_or_notify_cancel would raise and log 'unexpected state')."""
    caplog.set_level("WARNING")
    model = FakeModel(max_batch=3)
    rng = random.Random(8)
    with Batcher(model, max_delay_ms=0.2, max_queue=4096) as batcher:
        futures = []
        for chunk in range(40):
            futures += batcher.submit_many(range(chunk * 50, chunk * 50 + 50))
            for future in rng.sample(futures[-50:], 20):
                future.cancel()
        done, not_done = concurrent.futures.wait(futures, timeout=HANG)
    assert not not_done
    stats = batcher.stats()
    assert_stats_add_up(stats)
    assert stats.cancelled == sum(f.cancelled() for f in futures)
    assert sum(model.ran().values()) == len(futures) - stats.cancelled
    assert not [r for r in caplog.records if r.levelno >= 30], [r.getMessage() for r in caplog.records]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.lists(st.tuples(st.sampled_from([0, 1, BAD]), st.booleans()), max_size=30),
       st.booleans())
def test_any_mix_of_items_and_cancellations_is_accounted_for(max_batch, ops, drain):
    gate = threading.Event()
    model = FakeModel(max_batch=max_batch, gate=gate)
    batcher = Batcher(model, max_delay_ms=0.0, max_queue=64)
    submitted = []
    for n, (kind, cancel) in enumerate(ops):
        item = BAD if kind == BAD else n
        future = batcher.submit(item)
        submitted.append((item, future, cancel and future.cancel()))
    gate.set()
    assert batcher.close(drain=drain, timeout=HANG)
    ran = model.ran()
    for item, future, cancelled in submitted:
        assert future.done()
        if cancelled:  # cancel() succeeded: the item never ran
            assert future.cancelled() and (item == BAD or ran[item] == 0)
        elif not future.cancelled():
            if item == BAD:
                assert isinstance(future.exception(timeout=0), DicomError)
            else:
                assert future.result(timeout=0) == expected(item) and ran[item] == 1
        else:
            assert not drain
    stats = batcher.stats()
    assert_stats_add_up(stats)
    assert (stats.submitted, stats.queue_depth, stats.in_flight) == (len(ops), 0, 0)
    assert stats.cancelled == sum(f.cancelled() for _, f, _ in submitted)


# ---------------------------------------------------------------------- asyncio


def test_asyncio_gather_of_many_predictions():
    model = FakeModel(max_batch=8)

    async def main(batcher):
        results = await asyncio.gather(*(batcher.predict(i) for i in range(300)))
        with pytest.raises(DicomError):
            await batcher.predict(BAD)
        future = await batcher.submit_async(7)
        assert isinstance(future, asyncio.Future)
        assert await future == expected(7)
        return results

    with Batcher(model, max_delay_ms=1.0) as batcher:
        assert asyncio.run(main(batcher)) == [expected(i) for i in range(300)]
    assert max(model.sizes()) <= 8 and sum(model.sizes()) == 302


def test_asyncio_predict_never_blocks_the_event_loop_and_cancelling_skips_the_item():
    gate = threading.Event()
    model = FakeModel(max_batch=1, gate=gate)

    async def main(batcher):
        first = asyncio.create_task(batcher.predict(1))
        await asyncio.to_thread(wait_entered, model)  # the worker holds item 1 in the model
        second = asyncio.create_task(batcher.predict(2))
        await asyncio.sleep(0)  # 2 is queued
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second  # by now its concurrent future is cancelled too
        # Only this loop opens the gate: a predict() blocking the loop would deadlock here.
        gate.set()
        assert await asyncio.wait_for(first, HANG) == expected(1)

    with Batcher(model, max_delay_ms=0.0) as batcher:
        asyncio.run(main(batcher))
    assert model.batches == [[1]]
    assert batcher.stats().cancelled == 1


# ---------------------------------------------------------------------- lifetime and stats


def test_context_manager_drains_close_is_idempotent_and_submit_after_close_raises():
    model = FakeModel(max_batch=8)
    with Batcher(model, max_delay_ms=NEVER_MS) as batcher:
        futures = batcher.submit_many([1, 2, 3])  # fewer than max_batch: only the drain runs them
    assert [f.result(timeout=0) for f in futures] == [expected(1), expected(2), expected(3)]
    assert batcher.closed
    assert batcher.close() and batcher.close(drain=False)
    for submit in (lambda: batcher.submit(4), lambda: batcher.submit_many([4])):
        with pytest.raises(BatcherClosed, match="create a new Batcher") as info:
            submit()
        assert isinstance(info.value, MedgeError)
    with pytest.raises(BatcherClosed):
        asyncio.run(batcher.predict(4))
    assert not [t for t in threading.enumerate() if t.name == batcher.name and t.is_alive()]


def test_stats_add_up_after_a_mixed_workload():
    gate = threading.Event()
    model = FakeModel(max_batch=4, gate=gate)
    batcher = Batcher(model, max_delay_ms=0.0, max_queue=8)
    head = batcher.submit(0)
    wait_entered(model)
    futures = batcher.submit_many([1, BAD, 3, BOOM, 5, 6, 7])
    futures[5].cancel()
    assert batcher.stats().queue_depth == 6  # a cancelled item leaves the queue (and frees its slot) at once
    with pytest.raises(QueueFull):
        batcher.submit_many([8, 9, 10])
    gate.set()
    assert batcher.close(timeout=HANG)
    assert head.result(timeout=0) == expected(0)
    stats = batcher.stats()
    assert_stats_add_up(stats)
    # batches: [0], [1, BAD, 3, BOOM] (raises: 4 failed), [5, 7] (6 cancelled)
    assert model.batches == [[0], [1, BAD, 3, BOOM], [5, 7]]
    assert (stats.submitted, stats.completed, stats.failed, stats.cancelled, stats.rejected) == (8, 3, 4, 1, 3)
    assert stats.batch_sizes == {1: 1, 2: 1, 4: 1} and stats.batches == 3
    assert stats.mean_batch_size == pytest.approx(7 / 3)
    assert 0 <= stats.queue_wait_ms_p50 <= stats.queue_wait_ms_p90 <= stats.queue_wait_ms_p99 \
        <= stats.queue_wait_ms_max
    assert stats.uptime_s > 0 and stats.busy_s >= 0
    assert stats.throughput_per_s == pytest.approx(7 / stats.uptime_s)
    assert stats.uptime_s == batcher.stats().uptime_s  # frozen once the worker stopped


def test_stats_before_any_batch():
    with Batcher(FakeModel()) as batcher:
        stats = batcher.stats()
    assert (stats.submitted, stats.batches, stats.queue_wait_ms_p50, stats.queue_wait_ms_max) == (0, 0, None, None)
    assert stats.mean_batch_size == 0.0 and stats.throughput_per_s == 0.0


@settings(max_examples=200)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=200), st.sampled_from([50, 90, 99, 100]))
def test_percentile_is_nearest_rank(values, p):
    np = pytest.importorskip("numpy")
    ordered = sorted(values)
    assert _percentile(ordered, p) == np.percentile(ordered, p, method="inverted_cdf")


@pytest.mark.parametrize("kwargs, match", [
    ({"max_batch": 9}, "from 1 to the model's max_batch"),
    ({"max_batch": 0}, "from 1 to the model's max_batch"),
    ({"max_queue": 0}, "max_queue"),
    ({"max_delay_ms": -1}, "max_delay_ms"),
    ({"max_delay_ms": float("nan")}, "max_delay_ms"),
])
def test_invalid_arguments_are_batcher_errors(kwargs, match):
    with pytest.raises(BatcherError, match=match):
        Batcher(FakeModel(max_batch=8), **kwargs)
    with pytest.raises(BatcherError, match="max_batch"):
        Batcher(object())


def test_a_batcher_dropped_without_close_drains_and_its_worker_exits():
    model = FakeModel(max_batch=8)
    batcher = Batcher(model, max_delay_ms=NEVER_MS, name="medge-batcher-dropped")
    (worker,) = [t for t in threading.enumerate() if t.name == "medge-batcher-dropped"]
    futures = batcher.submit_many([1, 2])
    ref = weakref.ref(batcher)
    del batcher
    gc.collect()
    assert ref() is None
    worker.join(HANG)
    assert not worker.is_alive()
    assert worker.daemon
    assert [f.result(timeout=0) for f in futures] == [expected(1), expected(2)]


def run_python(code: str) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=HANG * 2, env=env, cwd=root)


def test_the_interpreter_exits_with_an_open_batcher_even_with_the_model_stuck():
    done = run_python("""
        import threading
        import medge.runtime.batcher as batcher_module
        from medge.runtime.batcher import Batcher

        batcher_module.EXIT_TIMEOUT_S = 0.1  # the batch in flight never finishes here
        class Stuck:
            max_batch = 1
            def predict_batch(self, items, *, return_exceptions=True):
                threading.Event().wait()
        batcher = Batcher(Stuck(), max_delay_ms=0.0)
        stuck = batcher.submit(1)
        queued = batcher.submit(2)
        queued.add_done_callback(lambda f: print("queued item cancelled:", f.cancelled(), flush=True))
        print("exiting without close()", flush=True)
    """)
    assert done.returncode == 0, done.stderr
    assert "exiting without close()\nqueued item cancelled: True" in done.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_batcher_inherited_through_fork_is_closed_in_the_child():
    done = run_python("""
        import os, signal
        from medge.runtime.batcher import Batcher, BatcherClosed

        class Model:
            max_batch = 2
            def predict_batch(self, items, *, return_exceptions=True):
                return [i * 2 for i in items]
        batcher = Batcher(Model(), max_delay_ms=0.0)
        assert batcher.submit(1).result(timeout=30) == 2
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)
            try:
                batcher.submit(2)
            except BatcherClosed as exc:
                os._exit(0 if "os.fork()" in str(exc) and batcher.stats().submitted == 1 else 3)
            os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert batcher.submit(3).result(timeout=30) == 6  # the parent's Batcher is untouched
        assert batcher.close(timeout=30)
        print("fork ok")
    """)
    assert done.returncode == 0, done.stderr
    assert "fork ok" in done.stdout
