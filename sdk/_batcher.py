"""A dynamic batcher: concurrent calls of one graph share one run.

``BatchedBackend`` stands in for a graph's backend. Each caller's feeds are
checked on the caller's thread (the base ``Backend.infer``), then queued; a worker
thread takes the oldest request, waits at most ``max_delay_ms`` for others to
join it (no wait once ``max_batch`` rows are queued), concatenates every queued
request whose shapes agree along the batch axis, runs the graph once and hands
each caller its own rows. This is what Triton's dynamic batcher does for a model
with ``max_batch_size``; here it sits under the same ``infer`` the SDK calls, so
``model.classify`` from many threads batches without any change to it.

Inputs listed in ``pad_values`` may also differ in their other axes: they are
right-padded to the longest with that value (a text graph's ``input_ids`` with the
pad id, its ``attention_mask`` with 0), which is what the tokenizer itself does to a
batch, so the merged run gives each caller what its own run would have.

A merged run that fails is retried request by request, so one caller's bad input
fails that caller only; a worker never dies of an exception.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from edgemm.runtime.backends import Backend
from edgemm.runtime.bundle import Bundle
from edgemm.runtime.errors import BackendError, InputError

# role, bundle, backend → the backend graphs opened inside batching() use (the backend itself: not batched).
Policy = Callable[[str, Bundle, Backend], Backend]
_POLICY: contextvars.ContextVar[Policy | None] = contextvars.ContextVar("edgemm_batching", default=None)


def batched(bundle: Bundle, role: str, backend: Backend) -> Backend:
    """``backend`` itself, or inside :func:`batching` what its policy makes of it."""
    policy = _POLICY.get()
    return backend if policy is None else policy(role, bundle, backend)


@contextlib.contextmanager
def batching(policy: Policy) -> Iterator[None]:
    """Graphs opened inside (``edgemm.load`` included) go through ``policy``: a server wraps them in batchers."""
    token = _POLICY.set(policy)
    try:
        yield
    finally:
        _POLICY.reset(token)


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    rows: int
    key: tuple
    enqueued: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters a server reports per graph (Triton's statistics extension, in nanoseconds)."""

    requests: int = 0  # requests answered (success or failure)
    failures: int = 0
    rows: int = 0  # batch rows inferred
    executions: int = 0  # graph runs
    queue_ns: int = 0  # summed over requests: time from queueing to the start of their run
    request_ns: int = 0  # summed over successful requests: time from queueing to their result
    compute_ns: int = 0  # summed over runs
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)  # rows of a run → [runs, compute ns]


class BatchedBackend(Backend):
    """A graph's backend behind a dynamic batcher (see the module docstring).

    Args:
        inner: The graph's own backend (thread-safe for concurrent runs, as ONNX Runtime sessions are).
        max_batch: Rows one run takes at most; a single request with more is refused.
        max_delay_ms: How long the oldest queued request waits for others to join it.
        workers: Runs in flight at once (Triton's instance count).
        pad_values: Inputs that may differ in their non-batch axes → the value they are right-padded with.
        name: How errors name this graph.

    Raises:
        InputError: A non-positive ``max_batch`` or ``workers``, or a negative ``max_delay_ms``.
    """

    def __init__(self, inner: Backend, *, max_batch: int = 32, max_delay_ms: float = 0.0, workers: int = 1,
                 pad_values: dict[str, int] | None = None, name: str | None = None):
        super().__init__()
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}.")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InputError(f"workers must be a positive integer, got {workers!r}.")
        if not isinstance(max_delay_ms, (int, float)) or not 0 <= max_delay_ms <= 10_000:
            raise InputError(f"max_delay_ms must be between 0 and 10000, got {max_delay_ms!r}.")
        self.inner = inner
        self.name = name or inner.name
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1e3
        self.pad_values = dict(pad_values or {})
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"edgemm-batcher-{self.name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def _infer(self, feeds: dict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
        rows = next(iter(feeds.values())).shape[0]
        if rows <= self.max_batch:
            return self.submit(feeds).result()
        # The SDK's own calls may be larger (embed_texts runs 64 at a time): they go in max_batch slices.
        futures = [self.submit({k: v[i : i + self.max_batch] for k, v in feeds.items()})
                   for i in range(0, rows, self.max_batch)]
        parts = [f.result() for f in futures]
        return OrderedDict((name, np.concatenate([p[name] for p in parts])) for name in parts[0])

    def submit(self, feeds: dict[str, np.ndarray]) -> Future:
        """Queue checked feeds of at most ``max_batch`` rows; the future gets their outputs (or the error)."""
        rows = next(iter(feeds.values())).shape[0]
        if rows > self.max_batch:
            raise InputError(f"{self.name}: a batch of {rows} is more than this graph's max batch "
                             f"({self.max_batch}); send at most {self.max_batch} rows per request.")
        key = tuple((name, a.shape[1:] if name not in self.pad_values else a.ndim) for name, a in feeds.items())
        pending = _Pending(feeds, rows, key)
        with self._cond:
            if self._closed:
                raise BackendError(f"{self.name}: the batcher is closed (the server is shutting down).")
            self._queue.append(pending)
            self._cond.notify()
        return pending.future

    def close(self) -> None:
        """Stop the workers; queued requests fail with a BackendError."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for p in left:
            p.future.set_exception(BackendError(f"{self.name}: the server shut down before this request ran."))
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=30)

    # -- the worker ---------------------------------------------------------------------

    def _take(self) -> list[_Pending] | None:
        """The next batch: the oldest request and every queued one that fits with it (None once closed)."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue[0]
            deadline = first.enqueued + self.max_delay
            while not self._closed:
                queued = sum(p.rows for p in self._queue if p.key == first.key)
                left = deadline - time.perf_counter()
                if queued >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            if not self._queue or self._queue[0] is not first:  # close() took it, or another worker did
                return []
            batch, rows, kept = [], 0, deque()
            for p in self._queue:
                if p.key == first.key and rows + p.rows <= self.max_batch:
                    batch.append(p)
                    rows += p.rows
                else:
                    kept.append(p)
            self._queue = kept
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        try:
            outputs = self.inner.infer(self._merge(batch))
        except Exception as e:  # noqa: BLE001 - delivered to the caller, who raises it on their own thread
            if len(batch) > 1:  # find whose request it was: each caller gets its own result or error
                for p in batch:
                    self._run([p])
                return
            batch[0].future.set_exception(e)
            self._count(batch, start, failed=True)
            return
        offset = 0
        for p in batch:
            p.future.set_result(OrderedDict((name, value[offset : offset + p.rows]) for name, value in outputs.items()))
            offset += p.rows
        self._count(batch, start, failed=False)

    def _count(self, batch: list[_Pending], start: float, *, failed: bool) -> None:
        end = time.perf_counter()
        ns = int((end - start) * 1e9)
        rows = sum(p.rows for p in batch)
        s = self.stats
        with self._cond:
            s.requests += len(batch)
            s.queue_ns += sum(int((start - p.enqueued) * 1e9) for p in batch)
            if failed:
                s.failures += len(batch)
                return
            s.rows += rows
            s.request_ns += sum(int((end - p.enqueued) * 1e9) for p in batch)
            s.executions += 1
            s.compute_ns += ns
            runs = s.batch_sizes.setdefault(rows, [0, 0])
            runs[0] += 1
            runs[1] += ns

    def _merge(self, batch: list[_Pending]) -> dict[str, np.ndarray]:
        if len(batch) == 1:
            return batch[0].feeds
        merged = {}
        for name in batch[0].feeds:
            parts = [p.feeds[name] for p in batch]
            if name in self.pad_values:
                longest = tuple(max(sizes) for sizes in zip(*(a.shape[1:] for a in parts)))
                parts = [np.pad(a, [(0, 0), *((0, n - m) for n, m in zip(longest, a.shape[1:]))],
                                constant_values=self.pad_values[name]) for a in parts]
            merged[name] = np.concatenate(parts)
        return merged
