"""Background prefetching for the loader: batches are built in a thread while the model steps.

They cross from that thread in chunks of consecutive batches: one queue hand-off (a lock, a
wake-up, the GIL changing hands) costs tens of microseconds, as much as building a small batch.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Protocol


class _Producer(Protocol):
    prefetch: int  # chunks of batches built ahead in a background thread; 0 builds them on demand
    _position: Any

    def _batches(self, start: Any) -> Iterator[list[tuple[Any, Any]]]: ...  # [(position after it, batch)]


class _Prefetcher:
    """Runs a generator in one background thread, handing its items over through a bounded queue.

    One producer and FIFO order: the items and their order are exactly the generator's. The thread
    is not a daemon: a daemon thread still inside torch when the interpreter finalizes aborts the
    process. Instead it stops on close() or once the main thread has finished.
    """

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._done = False
        threading.Thread(target=self._run, args=(source,), name="ShardLoader-prefetch").start()

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as exn:  # handed to the consumer, re-raised there
            self._put((self._END, exn))
        finally:
            getattr(source, "close", lambda: None)()  # a generator's cleanup runs in this thread

    def _put(self, entry: tuple) -> bool:
        # Poll, so that close() or the end of the main thread frees a producer blocked on a full queue.
        while not self._stop.is_set() and threading.main_thread().is_alive():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item, exn = self._queue.get()
        if item is self._END:
            self._done = True
            if exn is not None:
                raise exn
            raise StopIteration
        return item

    def close(self) -> None:
        self._done = True
        self._stop.set()


class LoaderIterator:
    """One pass of a loader; the loader's position advances only when a batch is handed out."""

    def __init__(self, loader: _Producer, start: Any):
        self._loader = loader
        source = loader._batches(start)
        self._chunks = _Prefetcher(source, loader.prefetch) if loader.prefetch > 0 else source
        self._chunk: Iterator[tuple[Any, Any]] = iter(())
        self._closed = False

    def __iter__(self) -> LoaderIterator:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        item = next(self._chunk, None)
        if item is None:
            self._chunk = iter(next(self._chunks))  # chunks are never empty
            item = next(self._chunk)
        position, batch = item
        self._loader._position = position
        return batch

    def close(self) -> None:
        self._closed = True
        self._chunks.close()  # stops the prefetch thread, or closes the generator it would have run

    def __del__(self) -> None:
        self.close()
