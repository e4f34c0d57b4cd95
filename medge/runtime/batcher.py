"""Dynamic batching in front of a model, for scanner-side software that embeds medge.

Many threads (or an asyncio event loop) submit single images; one worker
thread groups them into batches and calls ``model.predict_batch``. A batch
forms as soon as ``max_batch`` items are waiting, or when the oldest waiting
item has waited ``max_delay_ms``, whichever comes first. Each item gets a
``concurrent.futures.Future``::

    with Batcher(model, max_delay_ms=2.0) as batcher:
        future = batcher.submit(dicom_path)
        prediction = future.result()            # or: await batcher.predict(dicom_path)

The Batcher must never take the host application down, so:

- whatever the model raises fails only that batch's futures; the worker
  carries on with the next batch. A bad item the model reports on its own
  (``return_exceptions=True``) fails only its own future;
- every accepted item's future is resolved exactly once (result, exception
  or cancellation): none is lost, none is run twice;
- a full queue is refused at once (``QueueFull``) or after a bounded wait,
  never with an unbounded hidden backlog;
- the worker is a daemon thread, so a host that forgets ``close()`` still
  exits (see "Lifetime").

Threads. The Batcher's own worker thread runs inference (and the futures'
done-callbacks, which ``concurrent.futures`` runs in the thread that resolves
a future: keep callbacks short, or hand work to your own thread). No lock of
the Batcher is held while the model runs or while callbacks run, so
callbacks may call ``submit``, ``stats`` or even ``close``.

Reading overlaps with inference. In front of a medge Model, ``readers`` daemon
threads (default 2) read the DICOM items (paths, bytes, memory maps, pydicom
Datasets) of the next batches, at most ``readahead`` items ahead, while the
worker preprocesses and runs the current batch; the worker then gets Images.
medge's fast reader (uncompressed little-endian files) spends a read in the
read system call and native code, outside the GIL. A failed read fails only
its item's future, with its DicomError; ``Prediction.timings_ms["read"]``
then no longer includes the read, which happened in a reader thread.

Lifetime. ``close()`` (or leaving a ``with`` block) is the normal path: stop
accepting, finish (``drain=True``) or cancel (``drain=False``) what is
queued, and join the worker. As safety nets:

- the worker is ``daemon=True``: a non-daemon thread left waiting on an
  empty queue would block interpreter exit forever, and Python joins
  non-daemon threads *before* ``atexit`` handlers run, so no handler could
  release it;
- at interpreter exit, an ``atexit`` handler closes every Batcher still
  open with ``drain=False`` (queued items are cancelled: an exiting host
  must not wait for a deep queue of inferences) and waits up to
  ``EXIT_TIMEOUT_S`` for the batch in flight to finish, so the model is not
  torn down mid-call;
- a Batcher that is garbage-collected without ``close()`` stops accepting
  and its worker drains the queue, then exits (nobody can submit to an
  unreachable Batcher, but its futures may still be awaited);
- in a child made by ``os.fork()`` a Batcher inherited from the parent has
  no worker: it is closed there (``submit`` raises ``BatcherClosed``).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import math
import mmap
import os
import queue
import random
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ..errors import MedgeError

__all__ = ["Batcher", "BatcherStats", "BatcherError", "QueueFull", "BatcherClosed", "EXIT_TIMEOUT_S",
           "DEFAULT_READERS"]

_LOG = logging.getLogger("medge.runtime.batcher")

#: At interpreter exit, how long to wait for a batch in flight in a Batcher nobody closed.
EXIT_TIMEOUT_S = 5.0
#: Reader threads a Batcher in front of a medge Model starts by default.
DEFAULT_READERS = 2
#: Queue-wait samples kept for the percentiles: exact up to this many, then a uniform reservoir sample.
_RESERVOIR_SIZE = 4096


class BatcherError(MedgeError):
    """A Batcher was misused or misconfigured (the message says how to fix it)."""


class QueueFull(BatcherError):
    """The Batcher's queue is full: the model is not keeping up with submissions."""


class BatcherClosed(BatcherError):
    """The Batcher is closed (or its worker stopped): it accepts no more items."""


@dataclass(frozen=True)
class BatcherStats:
    """A consistent snapshot of a Batcher's counters (``Batcher.stats()``).

    At every snapshot ``submitted == completed + failed + cancelled +
    queue_depth + in_flight``.

    Attributes:
        submitted: items accepted by ``submit`` / ``submit_many``.
        completed: futures resolved with a result.
        failed: futures resolved with an exception: the item's own error, or
            its batch's (the model raised, or broke its contract).
        cancelled: accepted items that were never run: cancelled by the
            caller while queued, or by ``close(drain=False)``.
        rejected: submissions refused with ``QueueFull`` (never accepted, so
            not in ``submitted``).
        batches: calls made to ``model.predict_batch``.
        batch_sizes: batch size -> number of batches of that size.
        queue_depth: items waiting now (a caller-cancelled item leaves the
            queue, and is counted in ``cancelled``, as it is cancelled).
        in_flight: items in the batch the model is running now.
        queue_wait_ms_p50 / _p90 / _p99: queue wait (acceptance to the start
            of the item's batch) percentiles over the Batcher's lifetime,
            nearest-rank; exact up to 4096 items, then estimated from a
            uniform reservoir sample. None before the first batch.
        queue_wait_ms_max: the exact maximum queue wait (None before the first batch).
        uptime_s: seconds from construction to now (or to the worker's stop).
        busy_s: seconds spent inside ``model.predict_batch``.
        throughput_per_s: items resolved by the model (completed + failed)
            per second of ``uptime_s``, over the whole lifetime. For a rate
            over a window, diff two snapshots: ``(Δcompleted + Δfailed) /
            Δuptime_s``; ``(completed + failed) / busy_s`` is the rate
            while working.
    """

    submitted: int
    completed: int
    failed: int
    cancelled: int
    rejected: int
    batches: int
    batch_sizes: dict = field(default_factory=dict)
    queue_depth: int = 0
    in_flight: int = 0
    queue_wait_ms_p50: Optional[float] = None
    queue_wait_ms_p90: Optional[float] = None
    queue_wait_ms_p99: Optional[float] = None
    queue_wait_ms_max: Optional[float] = None
    uptime_s: float = 0.0
    busy_s: float = 0.0
    throughput_per_s: float = 0.0

    @property
    def mean_batch_size(self) -> float:
        """Mean items per batch (0.0 before the first batch)."""
        return sum(size * count for size, count in self.batch_sizes.items()) / self.batches if self.batches else 0.0


class _Request:
    __slots__ = ("item", "future", "accepted_at", "read")

    def __init__(self, item: Any, future: concurrent.futures.Future, accepted_at: float) -> None:
        self.item = item
        self.future = future
        self.accepted_at = accepted_at
        # None: not read yet; _AS_IS: handed to the model as it is; else the Future of its read.
        self.read: Any = None


#: A request whose item the model gets as it is (an Image, an array, anything read_dicom does not read).
_AS_IS = object()


def _readable(item: Any) -> bool:
    """Whether ``item`` is a DICOM source the reader pool reads (path, bytes, memory map, Dataset)."""
    if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview, mmap.mmap)):
        return True
    dataset = getattr(sys.modules.get("pydicom.dataset"), "Dataset", None)
    return dataset is not None and isinstance(item, dataset)


def _read(item: Any) -> Any:
    from ..dicom import read_dicom

    return read_dicom(item)


class _ReaderPool:
    """Threads that read DICOM sources into Images ahead of the batch that needs them.

    Daemon threads (like the Batcher's worker, they never hold up interpreter exit). medge's
    fast reader spends a read mostly in the read system call and in native code, without
    the GIL, so reads overlap with preprocessing and inference; pydicom's path (compressed
    data) holds the GIL while it parses, its decoders mostly not.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._tasks: "queue.SimpleQueue" = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-reader-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._tasks.put((future, fn, args))
        return future

    def _serve(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, fn, args = task
            del task
            if future.set_running_or_notify_cancel():  # False: cancelled while waiting
                try:
                    result = fn(*args)
                except BaseException as exc:  # noqa: BLE001 - belongs to that item only
                    future.set_exception(_as_exception(exc, "reading the item"))
                else:
                    future.set_result(result)
                    del result
            del future, fn, args

    def shutdown(self) -> None:
        """Let the threads finish what they run and stop (queued reads of cancelled items are skipped)."""
        for _ in self._threads:
            self._tasks.put(None)


def _percentile(sorted_values: list, p: float) -> float:
    """Nearest-rank percentile of a non-empty, sorted list."""
    rank = max(1, math.ceil(p * len(sorted_values) / 100.0))
    return sorted_values[rank - 1]


def _as_exception(exc: BaseException, what: str) -> BaseException:
    """``exc`` itself when it is an Exception; a RuntimeError wrapping it otherwise.

    SystemExit, KeyboardInterrupt and other BaseExceptions from a model must
    not be re-raised by ``future.result()`` in the host (nor re-raised out
    of an asyncio event loop, which treats them as fatal).
    """
    if isinstance(exc, Exception):
        return exc
    wrapped = RuntimeError(f"{what} raised {type(exc).__name__}({exc}): a bug in the model")
    wrapped.__cause__ = exc
    return wrapped


class _State:
    """Everything the worker needs. The worker thread references this, never the Batcher,
    so an unreachable Batcher can be garbage-collected and its finaliser can stop the worker."""

    def __init__(self, model: Any, max_batch: int, max_delay_s: float, max_queue: int, name: str,
                 readers: int = 0, readahead: int = 0) -> None:
        self.model = model
        self.max_batch = max_batch
        self.readers = readers
        self.reader: Optional[_ReaderPool] = None  # started with the first item to read
        self.readahead = readahead
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.name = name
        self._init_locks()
        self.queue: deque = deque()
        self.closing = False  # no more submissions; the worker drains what is queued, then stops
        self.closed_reason = f"the batcher {name!r} is closed: create a new Batcher to submit more items"
        self.in_flight = 0
        self.submitted = self.completed = self.failed = self.cancelled = self.rejected = self.batches = 0
        self.batch_sizes: dict[int, int] = {}
        self.busy_s = 0.0
        self.wait_samples: list[float] = []
        self.wait_count = 0
        self.wait_max = 0.0
        self.rng = random.Random(0x6D656467)
        self.started_at = time.monotonic()
        self.stopped_at: Optional[float] = None
        self.thread: Optional[threading.Thread] = None

    def _init_locks(self) -> None:
        # Re-entrant: a finaliser (weakref.finalize, run by the garbage collector at any
        # allocation, in whichever thread) may call shutdown() in a thread already holding it.
        self.lock = threading.RLock()
        self.not_empty = threading.Condition(self.lock)  # the worker waits here
        self.not_full = threading.Condition(self.lock)  # blocked submitters wait here

    # ------------------------------------------------------------------ submitting

    def enqueue(self, items: list, block: bool, timeout: Optional[float]) -> list:
        """Accept all of ``items`` or none of them (a caller never loses track of an accepted future)."""
        n = len(items)
        if timeout is not None and timeout < 0:
            raise BatcherError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        with self.lock:
            if self.closing:
                raise BatcherClosed(self.closed_reason)
            if n > self.max_queue:
                self.rejected += n
                raise QueueFull(f"cannot submit {n} items at once to the batcher {self.name!r}: its queue holds "
                                f"at most {self.max_queue} items. Submit fewer at a time, or create the Batcher "
                                f"with a larger max_queue")
            if len(self.queue) + n > self.max_queue:
                # Only the worker makes room: blocking it on itself (a done-callback or the model
                # submitting with block=True) would deadlock, so there it refuses at once.
                blocked = block and threading.current_thread() is not self.thread
                if blocked:
                    deadline = None if timeout is None else time.monotonic() + timeout
                    while len(self.queue) + n > self.max_queue and not self.closing:
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            break
                        self.not_full.wait(remaining)
                    if self.closing:
                        raise BatcherClosed(self.closed_reason)
                if len(self.queue) + n > self.max_queue:
                    self.rejected += n
                    waited = f" after waiting {timeout} s" if blocked else ""
                    raise QueueFull(f"the batcher {self.name!r} queue is full ({len(self.queue)} of max_queue="
                                    f"{self.max_queue} items waiting){waited}: the model is not keeping up. Retry "
                                    f"later, submit with block=True (and a timeout), or create the Batcher with a "
                                    f"larger max_queue")
            was_empty = not self.queue
            now = time.monotonic()
            futures = []
            for item in items:
                future: concurrent.futures.Future = concurrent.futures.Future()
                future.add_done_callback(self._on_future_done)
                self.queue.append(_Request(item, future, now))
                futures.append(future)
            self.submitted += n
            self._start_reads()
            # Wake the worker only when it can act: it is idle (the queue was empty), or a
            # full batch is waiting. Otherwise it is asleep until the oldest item's deadline.
            if n and (was_empty or len(self.queue) >= self.max_batch):
                self.not_empty.notify()
            return futures

    def _on_future_done(self, future: concurrent.futures.Future) -> None:
        """Done-callback of every accepted future: takes a caller-cancelled item off the queue at once.

        ``Future.cancel()`` only marks a future CANCELLED: ``concurrent.futures.wait`` and
        ``as_completed`` learn of it when the executor (here, the batcher) calls
        ``set_running_or_notify_cancel()``. Doing that here, in the cancelling thread, wakes them
        now instead of when the worker next looks at the queue (after a long batch, or at the
        oldest item's deadline). Whoever takes a request off the queue, under the lock, is the only
        one to call ``set_running_or_notify_cancel()`` on it (a second call raises).
        """
        if not future.cancelled():
            return  # resolved by the worker; nothing to do
        with self.lock:
            for index, request in enumerate(self.queue):
                if request.future is future:
                    del self.queue[index]
                    break
            else:
                return  # already taken by the worker or by shutdown(), which notify it themselves
            future.set_running_or_notify_cancel()  # CANCELLED -> notified: returns False
            self.cancelled += 1
            _cancel_read(request)
            self._start_reads()
            self.not_full.notify_all()

    # ------------------------------------------------------------------ the worker

    def next_batch(self) -> Optional[list]:
        """Wait for a batch to form and take it; None once closing and nothing is left. [] is possible."""
        with self.lock:
            while True:
                while self.queue and self.queue[0].future.cancelled():
                    # Cancelled while queued (its done-callback has not taken it yet): never run, stops
                    # counting toward a batch, and its waiters are told.
                    cancelled = self.queue.popleft()
                    _cancel_read(cancelled)
                    cancelled.future.set_running_or_notify_cancel()
                    self.cancelled += 1
                    self.not_full.notify_all()
                if not self.queue:
                    if self.closing:
                        return None
                    self.not_empty.wait()
                    continue
                if len(self.queue) >= self.max_batch or self.closing:
                    break  # a full batch, or draining on close: no reason to wait
                remaining = self.queue[0].accepted_at + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self.not_empty.wait(remaining)
            batch = []
            now = time.monotonic()
            while self.queue and len(batch) < self.max_batch:
                request = self.queue.popleft()
                # Moves the future to RUNNING unless the caller cancelled it; after this the
                # caller can no longer cancel it, so it is resolved here exactly once.
                if request.future.set_running_or_notify_cancel():
                    batch.append(request)
                    self._record_wait(now - request.accepted_at)
                else:
                    self.cancelled += 1
                    _cancel_read(request)
            self.in_flight = len(batch)
            self._start_reads()  # the next batches' items, while this one runs
            self.not_full.notify_all()
            return batch

    def _start_reads(self) -> None:
        """Start reading the first ``readahead`` unread items of the queue (called with the lock held).

        Only so many: each read Image holds its pixels until its batch runs (a deep queue of
        512 x 512 slices read at once would hold hundreds of megabytes).
        """
        if not self.readers:
            return
        pending = 0
        for request in self.queue:
            if request.read is _AS_IS:
                continue
            if request.read is None:
                if not _readable(request.item):
                    request.read = _AS_IS
                    continue
                if pending >= self.readahead:
                    break
                request.read = self._reader_pool().submit(_read, request.item)
            pending += 1

    def _reader_pool(self) -> _ReaderPool:
        with self.lock:
            if self.reader is None:
                self.reader = _ReaderPool(self.readers, self.name)
            return self.reader

    def _record_wait(self, seconds: float) -> None:
        ms = seconds * 1e3
        self.wait_count += 1
        self.wait_max = max(self.wait_max, ms)
        if len(self.wait_samples) < _RESERVOIR_SIZE:
            self.wait_samples.append(ms)
        else:  # Algorithm R: every wait so far is in the sample with equal probability
            j = self.rng.randrange(self.wait_count)
            if j < _RESERVOIR_SIZE:
                self.wait_samples[j] = ms

    def _items(self, batch: list) -> tuple[list, dict]:
        """The batch's items as the model gets them (read ones as Images), and each failed read's error."""
        items, failed = [], {}
        for k, request in enumerate(batch):
            read = request.read
            if read is None and self.readers and _readable(request.item):
                read = self._reader_pool().submit(_read, request.item)  # past the read-ahead window: read now
            if read is None or read is _AS_IS:
                items.append(request.item)
                continue
            try:
                items.append(read.result())
            except BaseException as exc:  # noqa: BLE001 - that item's own failure (a DicomError, usually)
                failed[k] = _as_exception(exc, "reading the item")
            finally:
                request.read = None  # the Image lives on only in `items`, until the batch is done
        return items, failed

    def run_batch(self, batch: list) -> None:
        """Run one batch and resolve each of its futures exactly once. Raises nothing."""
        outcomes: list = []  # (is_error, value) per request
        try:
            items, failed = self._items(batch)
        except BaseException as exc:  # noqa: BLE001 - a bug here must still not lose the futures
            _LOG.exception("batcher %r: internal error while reading a batch", self.name)
            items, failed = [], {k: _as_exception(exc, "the batcher") for k in range(len(batch))}
        n = len(items)
        started = time.monotonic()
        try:
            try:
                # medge.Model.predict_each gives one entry per item (a multi-frame image's predictions
                # together); models with only predict_batch must give one result per item themselves.
                per_item = getattr(self.model, "predict_each", None)
                if n == 0:
                    results = []  # every item failed to read: nothing for the model
                elif per_item is not None:
                    results = [r[0] if isinstance(r, list) and len(r) == 1 else r
                               for r in per_item(items, return_exceptions=True)]
                else:
                    results = self.model.predict_batch(items, return_exceptions=True)
            except BaseException as exc:  # noqa: BLE001 - whatever the model raises fails this batch only
                error = _as_exception(exc, "model.predict_batch")
                _LOG.warning("batcher %r: model.predict_batch failed a batch of %d: %s: %s", self.name, n,
                             type(exc).__name__, exc, exc_info=exc)
                outcomes = [(True, error)] * n
            else:
                if not isinstance(results, (list, tuple)) or len(results) != n:
                    got = (f"{len(results)} results" if isinstance(results, (list, tuple))
                           else f"a {type(results).__name__}")
                    error = RuntimeError(f"model.predict_batch returned {got} for a batch of {n} items; the "
                                         f"contract is a list of exactly one result per item, in order (a bug "
                                         f"in the model: no result of this batch can be trusted)")
                    _LOG.error("batcher %r: %s", self.name, error)
                    outcomes = [(True, error)] * n
                else:
                    outcomes = [(True, _as_exception(r, "the model's result")) if isinstance(r, BaseException)
                                else (False, r) for r in results]
                del results
        except BaseException as exc:  # noqa: BLE001 - a bug here must still not lose the futures
            _LOG.exception("batcher %r: internal error while running a batch", self.name)
            outcomes = [(True, _as_exception(exc, "the batcher"))] * n
        finished = time.monotonic()
        del items
        if failed:  # the failed reads take their places again, in order
            model_outcomes = iter(outcomes)
            outcomes = [(True, failed[k]) if k in failed else next(model_outcomes) for k in range(len(batch))]
        errors = sum(1 for is_error, _ in outcomes if is_error)
        # Count before resolving, so a caller woken by its future sees stats that include it.
        with self.lock:
            self.in_flight = 0
            if n:
                self.batches += 1
                self.batch_sizes[n] = self.batch_sizes.get(n, 0) + 1
                self.busy_s += finished - started
            self.failed += errors
            self.completed += len(batch) - errors
        for request, (is_error, value) in zip(batch, outcomes):
            try:
                if is_error:
                    request.future.set_exception(value)
                else:
                    request.future.set_result(value)
            except BaseException:  # noqa: BLE001 - cannot happen (RUNNING futures are ours alone); never fatal
                _LOG.exception("batcher %r: could not resolve a future", self.name)

    def worker_main(self) -> None:
        batch = None
        try:
            while True:
                batch = self.next_batch()
                if batch is None:
                    return
                if batch:
                    self.run_batch(batch)
                batch = None  # do not keep the last batch's images alive while idle
        except BaseException:  # noqa: BLE001 - only a bug in the batcher gets here
            _LOG.exception("batcher %r: the worker stopped unexpectedly (a bug in medge)", self.name)
            with self.lock:
                self.closed_reason = (f"the batcher {self.name!r} stopped after an internal error (a bug in medge, "
                                      f"logged as medge.runtime.batcher): create a new Batcher")
            for request in batch or ():
                if not request.future.done():
                    try:
                        request.future.set_exception(BatcherClosed(self.closed_reason))
                    except BaseException:  # noqa: BLE001
                        pass
        finally:
            self._on_worker_exit()

    def _on_worker_exit(self) -> None:
        with self.lock:
            reader, self.reader, self.readers = self.reader, None, 0
        if reader is not None:
            reader.shutdown()
        with self.lock:
            self.closing = True
            self.stopped_at = time.monotonic()
            self.in_flight = 0
            leftover = []  # empty unless the worker crashed: fail what it can no longer run
            while self.queue:
                request = self.queue.popleft()
                _cancel_read(request)
                if request.future.set_running_or_notify_cancel():
                    leftover.append(request)
                    self.failed += 1
                else:
                    self.cancelled += 1
            self.not_full.notify_all()
        for request in leftover:
            try:
                request.future.set_exception(BatcherClosed(self.closed_reason))
            except BaseException:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ closing

    def shutdown(self, drain: bool) -> None:
        """Stop accepting; cancel what is queued unless ``drain``. Does not wait."""
        with self.lock:
            self.closing = True
            dropped = [] if drain else list(self.queue)
            if not drain:
                self.queue.clear()
                self.cancelled += len(dropped)
            self.not_empty.notify_all()
            self.not_full.notify_all()
        for request in dropped:
            _cancel_read(request)
            request.future.cancel()  # PENDING futures: always succeeds; runs their callbacks here
            # Off the queue, so only this loop notifies them: wakes concurrent.futures.wait / as_completed.
            request.future.set_running_or_notify_cancel()

    def close(self, drain: bool, timeout: Optional[float]) -> bool:
        self.shutdown(drain)
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            return False  # closed from a done-callback in the worker: it stops once that batch is resolved
        thread.join(timeout)
        return not thread.is_alive()

    def after_fork_in_child(self) -> None:
        # The worker does not exist in the child and the locks may have been held by
        # threads that do not exist either: new locks, and refuse all further work.
        self._init_locks()
        self.queue = deque()
        self.reader, self.readers = None, 0  # its threads do not exist here either
        self.closing = True
        self.in_flight = 0
        self.closed_reason = (f"the batcher {self.name!r} was created before os.fork(): its worker does not "
                              f"exist in this process. Create a new Batcher after forking")
        self.stopped_at = time.monotonic()

    def snapshot(self) -> BatcherStats:
        with self.lock:
            samples = sorted(self.wait_samples)
            end = self.stopped_at if self.stopped_at is not None else time.monotonic()
            uptime = max(end - self.started_at, 1e-9)
            percentiles = ([_percentile(samples, p) for p in (50, 90, 99)] if samples else [None] * 3)
            return BatcherStats(
                submitted=self.submitted, completed=self.completed, failed=self.failed, cancelled=self.cancelled,
                rejected=self.rejected, batches=self.batches, batch_sizes=dict(sorted(self.batch_sizes.items())),
                queue_depth=len(self.queue), in_flight=self.in_flight,
                queue_wait_ms_p50=percentiles[0], queue_wait_ms_p90=percentiles[1],
                queue_wait_ms_p99=percentiles[2], queue_wait_ms_max=self.wait_max if samples else None,
                uptime_s=uptime, busy_s=self.busy_s,
                throughput_per_s=(self.completed + self.failed) / uptime)


def _cancel_read(request: _Request) -> None:
    """Drop a request's read: not started, it never runs; running, its Image is discarded."""
    read, request.read = request.read, None
    if isinstance(read, concurrent.futures.Future):
        read.cancel()


# Every State whose worker may be running (weak: the worker thread keeps its State alive).
_LIVE: "weakref.WeakSet[_State]" = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for state in list(_LIVE):
        try:
            state.close(drain=False, timeout=EXIT_TIMEOUT_S)
        except BaseException:  # noqa: BLE001 - never fail the host's exit
            pass


def _after_fork_in_child() -> None:
    for state in list(_LIVE):
        state.after_fork_in_child()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Batcher:
    """Dynamic batching of single items into ``model.predict_batch`` calls, on one worker thread.

    Args:
        model: has ``max_batch`` (int) and ``predict_batch(items, *, return_exceptions=True)``
            returning one result per item, in order: a Prediction, or the exception of an item
            that failed. If it raises, every item of that batch fails with that exception.
        max_batch: the largest batch (default ``model.max_batch``; must be 1..model.max_batch).
        max_delay_ms: how long the oldest waiting item may wait for batch-mates (>= 0).
        max_queue: the most items waiting (not counting the batch in flight) before
            ``submit`` refuses (``QueueFull``) or blocks.
        name: the worker thread's name, also used in messages and logs.
        readers: threads that read DICOM items (paths, bytes, memory maps, pydicom Datasets)
            into Images while earlier batches run, so reading overlaps with preprocessing
            and inference. None (default): 2 for a medge Model, 0 for any other model (whose
            items are handed over as submitted). 0: the model reads its items itself, in the
            worker thread. A failed read fails only its own item, with its DicomError.
        readahead: the most items read ahead of the batch in flight (default: twice
            ``max_batch``); each holds its pixels until its batch runs.

    Raises:
        BatcherError: an argument is out of range.

    The worker thread (a daemon; see the module docstring) runs the model and the futures'
    done-callbacks. Use ``close()`` or a ``with`` block to finish.
    """

    def __init__(self, model: Any, *, max_batch: Optional[int] = None, max_delay_ms: float = 2.0,
                 max_queue: int = 1024, name: str = "medge-batcher", readers: Optional[int] = None,
                 readahead: Optional[int] = None) -> None:
        try:
            model_max = int(model.max_batch)
        except (AttributeError, TypeError, ValueError) as exc:
            raise BatcherError(f"the model must have an integer max_batch ({exc})") from exc
        if model_max < 1:
            raise BatcherError(f"the model's max_batch is {model_max}; it must be at least 1")
        if max_batch is None:
            max_batch = model_max
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= model_max:
            raise BatcherError(f"max_batch must be an integer from 1 to the model's max_batch ({model_max}), "
                               f"got {max_batch!r}")
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise BatcherError(f"max_queue must be a positive integer, got {max_queue!r}")
        try:
            delay = float(max_delay_ms)
        except (TypeError, ValueError):
            delay = math.nan
        if not (delay >= 0 and math.isfinite(delay)):
            raise BatcherError(f"max_delay_ms must be a finite number >= 0, got {max_delay_ms!r}")
        if getattr(getattr(model, "task", None), "kind", None) == "segmentation":
            raise BatcherError("the Batcher batches images for classifiers; a segmentation bundle segments whole "
                               "series: call model.segment(series), or serve it with medge serve (one DICOM SEG "
                               "per series)")
        if not callable(getattr(model, "predict_each", None)) and not callable(getattr(model, "predict_batch", None)):
            raise BatcherError("the model must have predict_each(items, *, return_exceptions=True) (medge.Model) "
                               "or predict_batch(items, *, return_exceptions=True) giving one result per item")

        if readers is None:
            from .model import Model

            readers = DEFAULT_READERS if isinstance(model, Model) else 0
        if not isinstance(readers, int) or isinstance(readers, bool) or readers < 0:
            raise BatcherError(f"readers must be an integer >= 0, got {readers!r}")
        if readahead is None:
            readahead = 2 * max_batch
        if not isinstance(readahead, int) or isinstance(readahead, bool) or readahead < 1:
            raise BatcherError(f"readahead must be a positive integer, got {readahead!r}")

        self.model = model
        self.max_batch = max_batch
        self.max_delay_ms = delay
        self.max_queue = max_queue
        self.name = str(name)
        self.readers = readers
        state = _State(model, max_batch, delay / 1e3, max_queue, self.name, readers, readahead)
        thread = threading.Thread(target=state.worker_main, name=self.name, daemon=True)
        state.thread = thread
        thread.start()
        self._state = state
        _LIVE.add(state)
        # Garbage-collected without close(): stop accepting and let the worker drain and exit.
        self._finalizer = weakref.finalize(self, state.shutdown, True)
        self._finalizer.atexit = False  # at exit, _close_all_at_exit handles it

    # ------------------------------------------------------------------ submitting

    def submit(self, item: Any, *, block: bool = False, timeout: Optional[float] = None) -> concurrent.futures.Future:
        """Queue one item; thread-safe.

        Args:
            item: anything ``model.predict_batch`` accepts (not inspected here).
            block: when the queue is full, wait for room instead of raising at once.
            timeout: with ``block``, the most seconds to wait (None: until there is room or the
                Batcher closes). Ignored without ``block``.

        Returns:
            A Future resolved with the model's result for the item, or with its exception.
            Cancelling it before its batch starts skips the item.

        Raises:
            QueueFull: the queue is full (after ``timeout`` with ``block``).
            BatcherClosed: the Batcher is closed (also when it closes while blocked).
        """
        return self._state.enqueue([item], block, timeout)[0]

    def submit_many(self, items: Iterable[Any], *, block: bool = False,
                    timeout: Optional[float] = None) -> list:
        """Queue several items, all or none: on ``QueueFull`` / ``BatcherClosed`` none was accepted.

        Returns one Future per item, in order. Items queued together are adjacent in the queue,
        so they tend to share batches. More items than ``max_queue`` are always refused.
        """
        return self._state.enqueue(list(items), block, timeout)

    async def submit_async(self, item: Any) -> "asyncio.Future":
        """Queue one item from a coroutine; returns an asyncio future of the running loop.

        Never blocks the event loop: a full queue raises ``QueueFull`` at once. Cancelling the
        asyncio future before the item's batch starts skips the item.
        """
        loop = asyncio.get_running_loop()
        return asyncio.wrap_future(self._state.enqueue([item], False, None)[0], loop=loop)

    async def predict(self, item: Any) -> Any:
        """Submit one item and await its result without blocking the event loop.

        Inference runs on the Batcher's worker thread; the loop only awaits. Raises what the
        item failed with, ``QueueFull`` at once when the queue is full, or ``BatcherClosed``.
        """
        return await (await self.submit_async(item))

    # ------------------------------------------------------------------ closing

    def close(self, *, drain: bool = True, timeout: Optional[float] = None) -> bool:
        """Stop accepting items and stop the worker. Idempotent; safe from any thread.

        Args:
            drain: True: every accepted item is still run and its future resolved (items
                queued at close run at once, without waiting for ``max_delay_ms``).
                False: items still queued are cancelled (``future.cancel()``: ``result()``
                raises ``concurrent.futures.CancelledError``); the batch in flight, if any,
                still finishes. A later ``close(drain=False)`` cancels what a timed-out
                draining close left queued.
            timeout: the most seconds to wait for the worker (None: until it stops).

        Returns:
            True when the worker has stopped (every accepted future is resolved); False when
            ``timeout`` elapsed first, or when called from the worker thread itself (e.g. in a
            done-callback), where it cannot wait for itself.

        Submitters blocked in ``submit(block=True)`` get ``BatcherClosed``.
        """
        if timeout is not None and timeout < 0:
            raise BatcherError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        stopped = self._state.close(drain, timeout)
        if stopped:
            self._finalizer.detach()
        return stopped

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (or the worker stopped): ``submit`` raises BatcherClosed."""
        return self._state.closing

    def stats(self) -> BatcherStats:
        """A consistent snapshot of the counters and queue-wait percentiles (see BatcherStats)."""
        return self._state.snapshot()

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(drain=True)

    def __repr__(self) -> str:
        s = self._state
        state = "closed" if s.closing else "open"
        return (f"Batcher({self.name!r}, {state}, max_batch={self.max_batch}, max_delay_ms={self.max_delay_ms}, "
                f"queue {len(s.queue)}/{self.max_queue})")
