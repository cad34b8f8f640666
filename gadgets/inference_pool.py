"""Slices in flight: one bound per server, and batched inference across slices and connections.

Stream-free (no sockets, no ISMRMRD, no model): what it schedules are opaque jobs with a row
count and a batch key, and `run_batch` is given by the caller (gadgets/pisf.py hands it the
PISF inference core).

- `Admission`: the bound on slices in flight in the models, one per process (`ADMISSION`),
  shared by every connection and every model. A stage takes a `Slot` before it prepares a slice
  (calibration holds memory too) and the slot goes back when the slice's inference is done. A
  stage that would exceed the bound waits, so its connection's reader stops reading and the
  client is pushed back through TCP; memory stays bounded however many clients connect.
- `InferenceScheduler`: a worker thread per model session. It takes the oldest queued job and
  every other queued job with the same batch key (e.g. same row length and coil count) up to a
  row budget, runs them as ONE call of `run_batch`, and hands each job's share back through its
  future. Nothing waits for a batch to fill: a batch is whatever queued while the previous one ran.
- Cancellation: a job whose `cancelled()` is true when a batch is formed is dropped (its future
  raises `Cancelled`, its slot goes back), and a stage waiting for a slot stops waiting.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

log = logging.getLogger("pisf.inference")
DEFAULT_MAX_SLICES_IN_FLIGHT = 4
POLL_S = 0.1          # how often a waiting stage looks at its cancelled flag


class Cancelled(Exception):
    """The job's owner has gone: it was not run."""


def _never() -> bool:
    return False


class Slot:
    """One slice's place in flight; `release` is idempotent (the worker and the stage both call it)."""

    def __init__(self, admission: "Admission"):
        self._admission = admission
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._give_back()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Admission:
    """At most `limit` slices in flight at once (limit changeable while running: `set_limit`)."""

    def __init__(self, limit: int = DEFAULT_MAX_SLICES_IN_FLIGHT):
        self._condition = threading.Condition()
        self.limit = self._checked(limit)
        self.in_flight = 0
        self.peak = 0          # most slices in flight at once since start (or `reset_peak`)
        self.waiting = 0       # stages waiting for a slot now
        self.waits = 0         # acquisitions that had to wait for a slot

    @staticmethod
    def _checked(limit) -> int:
        limit = int(limit)
        if limit < 1:
            raise ValueError(f"max_slices_in_flight must be at least 1, not {limit}")
        return limit

    def set_limit(self, limit: int) -> None:
        with self._condition:
            self.limit = self._checked(limit)
            self._condition.notify_all()

    def reset_peak(self) -> None:
        with self._condition:
            self.peak = self.in_flight

    def acquire(self, cancelled: Callable[[], bool] = _never) -> Slot:
        """A slot, waiting while `limit` slices are in flight; Cancelled if `cancelled()` turns
        true while waiting."""
        with self._condition:
            waited = self.in_flight >= self.limit
            self.waiting += waited
            try:
                while self.in_flight >= self.limit:
                    if cancelled():
                        raise Cancelled("the client has gone while its slice waited for a slot")
                    self._condition.wait(POLL_S)
            finally:
                self.waiting -= waited
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.waits += waited
        return Slot(self)

    def _give_back(self) -> None:
        with self._condition:
            self.in_flight -= 1
            self._condition.notify_all()   # a waiter that was cancelled meanwhile must not swallow it


ADMISSION = Admission()


@dataclass
class _Job:
    payload: Any
    rows: int
    key: Hashable
    cancelled: Callable[[], bool]
    slot: Slot | None
    future: Future = field(default_factory=Future)

    def settle(self, result=None, error: BaseException | None = None) -> None:
        """Give back the slot, then complete the future (so its reader can take a slot at once)."""
        if self.slot is not None:
            self.slot.release()
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


@dataclass
class SchedulerCounts:
    batches: int = 0
    jobs_run: int = 0
    jobs_dropped: int = 0      # cancelled before they ran
    rows_run: int = 0
    largest_batch_jobs: int = 0


class InferenceScheduler:
    """Batches jobs of several slices (and connections) into single `run_batch` calls.

    run_batch(payloads) -> one result per payload, same order; all payloads of a call share a
    batch key. max_rows_per_batch: the row budget of one call (a single job larger than it still
    runs alone); 0 runs every job alone (batching off, jobs still in one queue)."""

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_rows_per_batch: int = 1024,
                 name: str = "pisf-inference"):
        if int(max_rows_per_batch) < 0:
            raise ValueError(f"max_rows_per_batch must be 0 (no batching) or more, not {max_rows_per_batch}")
        self.run_batch = run_batch
        self.max_rows_per_batch = int(max_rows_per_batch)
        self.name = name
        self.counts = SchedulerCounts()
        self._queue: list[_Job] = []
        self._condition = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closing = False

    @property
    def queued(self) -> int:
        """Jobs waiting for a batch (not counting the batch running)."""
        with self._condition:
            return len(self._queue)

    def submit(self, payload, rows: int, key: Hashable = None, cancelled: Callable[[], bool] = _never,
               slot: Slot | None = None) -> Future:
        """Queue one job; its future holds run_batch's result for it. `slot` goes back when the job
        is done, failed or dropped."""
        job = _Job(payload, int(rows), key, cancelled, slot)
        with self._condition:
            if self._closing:
                raise RuntimeError(f"{self.name}: the scheduler is closed")
            self._queue.append(job)
            if self._worker is None:   # started on first use: a session that never infers has no thread
                self._worker = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._worker.start()
            self._condition.notify()
        return job.future

    def close(self) -> None:
        """Let the worker finish what is queued, then stop it."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        if self._worker is not None:
            self._worker.join()

    def _next_batch(self) -> list[_Job] | None:
        """The oldest live job and the queued jobs that join it (same key, within the row budget);
        cancelled jobs are dropped on the way. None when closing with nothing queued."""
        with self._condition:
            while True:
                live = []
                for job in self._queue:
                    if job.cancelled():
                        self.counts.jobs_dropped += 1
                        job.settle(error=Cancelled("the client has gone; its slice was dropped from the queue"))
                    else:
                        live.append(job)
                self._queue = live
                if live:
                    break
                if self._closing:
                    return None
                self._condition.wait()
            first = self._queue[0]
            batch, rows = [first], first.rows
            if self.max_rows_per_batch > 0:
                for job in self._queue[1:]:
                    if job.key == first.key and rows + job.rows <= self.max_rows_per_batch:
                        batch.append(job)
                        rows += job.rows
            taken = set(map(id, batch))
            self._queue = [job for job in self._queue if id(job) not in taken]
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        try:
            results = self.run_batch([job.payload for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} jobs")
        except Exception as exc:
            if len(batch) > 1:
                # one bad slice must not fail its batch mates: run each alone, once
                log.warning("%s: a batch of %d slices failed (%s: %s); running them one by one",
                            self.name, len(batch), type(exc).__name__, exc)
                for job in batch:
                    self._run([job])
                return
            batch[0].settle(error=exc)
            return
        self.counts.batches += 1
        self.counts.jobs_run += len(batch)
        self.counts.rows_run += sum(job.rows for job in batch)
        self.counts.largest_batch_jobs = max(self.counts.largest_batch_jobs, len(batch))
        for job, result in zip(batch, results):
            job.settle(result)
