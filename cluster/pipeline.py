"""Input off the critical path: a background thread that polls Kafka, decodes shards and
builds batches ahead of the step, into a bounded queue.

The thread runs one `build()` call at a time under `lock`; the training loop pauses it
(`paused()`) whenever it reads state that `build()` changes (publication, checkpoints, the
status line), so the two never see each other half-way. On CUDA every build runs on a
side stream: content writes and the batch's host-to-device copies overlap the step, and
the step's stream waits on an event recorded after the copies, so it never reads a batch
before it has arrived. The queue holds at most `depth` batches: when the step is slower
than the input, the thread blocks and Kafka keeps the backlog (visible as lag).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Callable

import torch

from trainer.batch import Batch

log = logging.getLogger(__name__)


class Prefetcher:
    def __init__(self, build: Callable[[], Batch | None], device: torch.device, depth: int):
        self.build, self.device = build, device
        self.lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self._stream is not None:  # what the loop wrote before (store, fitted content) comes first
            self._stream.wait_stream(torch.cuda.current_stream(device))
        self._pause_wanted = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coldstream-input", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._stream is not None:
                torch.cuda.set_device(self.device)
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                while not self._stop.is_set():
                    while self._pause_wanted.is_set() and not self._stop.is_set():
                        time.sleep(0.001)  # the lock is not fair: let the loop in
                    with self.lock:
                        batch = self.build()
                    if batch is None:
                        continue
                    event = None
                    if self._stream is not None:
                        batch = batch.pin_memory().to(self.device, non_blocking=True)
                        event = self._stream.record_event()
                    while not self._stop.is_set():
                        try:
                            self._queue.put((batch, event), timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as exc:  # surfaced to the training loop by get()
            log.exception("input thread failed")
            self._error = exc

    @contextlib.contextmanager
    def paused(self):
        """Holds the input thread between builds, with everything it wrote to the device visible
        to the current stream: for reading the state it shares with the loop (store, consumers)."""
        self._pause_wanted.set()
        try:
            with self.lock:
                if self._stream is not None:
                    torch.cuda.current_stream(self.device).wait_stream(self._stream)
                yield
        finally:
            self._pause_wanted.clear()

    def get(self, timeout_s: float) -> Batch | None:
        """The next batch, ready for the step on the current stream; None if none came in time."""
        if self._error is not None:
            raise RuntimeError("the input thread failed") from self._error
        try:
            batch, event = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            batch.record_stream(current)
        return batch

    def close(self) -> list[Batch]:
        """Stops the thread and returns the batches it had built but nobody took. Raises what
        the thread failed with: a final checkpoint must not save offsets past lost events."""
        self._stop.set()
        self._thread.join(timeout=60)
        if self._thread.is_alive():  # stuck in a build: keep it out of what the loop does next
            self.lock.acquire()
            log.error("input thread did not stop within 60 s; holding it paused")
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        if self._error is not None:
            raise RuntimeError("the input thread failed") from self._error
        left = []
        while True:
            try:
                left.append(self._queue.get_nowait()[0])
            except queue.Empty:
                return left


class StepClock:
    """Seconds spent inside training steps. On CUDA the host returns from a step long before
    the GPU has run it, so steps are timed by CUDA events on the step's stream (read back
    without waiting); on CPU by the wall clock. Loop time over this is the share of the
    device's time that the input pipeline failed to keep busy."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds_done = 0.0
        self._pending: list = []
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._t0, end))
        else:
            self.seconds_done += time.perf_counter() - self._t0

    def seconds(self, wait: bool = False) -> float:
        """Step time so far; with wait, also the steps the GPU has not finished yet."""
        still = []
        for start, end in self._pending:
            if wait:
                end.synchronize()
            if end.query():
                self.seconds_done += start.elapsed_time(end) / 1000
            else:
                still.append((start, end))
        self._pending = still
        return self.seconds_done
