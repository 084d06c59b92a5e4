"""Read and pack the next batches in a background thread while the model trains.

The loader's work (opening a shard: ~1 s per 128 MiB with its sha256 and header scan; reading
and packing documents) is file I/O and numpy, which release the GIL, so a thread hides it
behind the step. Exact resume is kept: each prefetched batch travels with the loader state
*after* it, and ``state_dict()`` reports the state after the last batch handed out, not after
the last one read ahead.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from .loader import PackedLoader
from .packing import PackedRows

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class PrefetchLoader:
    """Wraps a :class:`PackedLoader`; iterate it and checkpoint it the same way."""

    def __init__(self, loader: PackedLoader, depth: int = 2,
                 prepare: Callable[[PackedRows], PackedRows] | None = None) -> None:
        """``prepare`` runs on every micro-batch in the thread (the trainer plans its sink routing there)."""
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.loader, self.depth, self.prepare = loader, depth, prepare
        self._state = loader.state_dict()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batch = next(self.loader)
                item: Any = (self.prepare(batch) if self.prepare else batch, self.loader.state_dict())
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except StopIteration:
            q.put(_END)
        except BaseException as e:  # handed to the consumer, raised there with its traceback
            q.put(_Failure(e))

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop), name="nulls-prefetch",
                                        daemon=True)
        self._thread.start()

    def __iter__(self) -> "PrefetchLoader":
        return self

    def __next__(self) -> PackedRows:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # later calls end too
            raise StopIteration
        if isinstance(item, _Failure):
            self._queue.put(item)
            raise item.error
        batch, self._state = item
        return batch

    @property
    def skip_sources(self) -> frozenset[int]:
        """The sources whose documents the inner loader drops. Fixed when the :class:`PackedLoader` is
        built, before this thread can start, so no read-ahead batch ever holds one of their documents."""
        return self.loader.skip_sources

    def state_dict(self) -> dict:
        """Where the next batch handed out starts (batches read ahead are not counted), with the
        counters of that point (``skipped_documents``, ``skipped_tokens``: read-ahead not counted)."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._halt()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def close(self) -> None:
        """Stop the thread and rewind the loader to the batches handed out, dropping those read ahead."""
        if self._thread is not None:
            self._halt()
            self.loader.load_state_dict(self._state)

    def _halt(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)  # unblock a put
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
        self._thread, self._queue = None, None
