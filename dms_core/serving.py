"""A request as its caller sees it, and the loop that serves requests: one implementation for the torch
engine (pipeline.runtime.engine) and the TensorRT pair's host driver (plugins/trtllm/driver.py), so both
keep the same semantics (and the Triton engine model serves either).

- `TokenEvent`, `Completion`: what a request produces, token by token and at its end.
- `RequestHandle`: iterate it for TokenEvents, `result()` for the Completion, `cancel()`. Without a
  background loop, waiting on a handle drives the owner's `step()` in the caller's thread. Given an
  `outbox` (a queue shared by many requests), it puts (handle, TokenEvent) and at its end (handle,
  Completion) there instead, so one thread can forward every request (the Triton engine model).
- `StepLoop`: thread-safe submission and cancellation (taken by the next step, `_take_inbox`), and the
  background step loop (`start` / `stop`). The owner implements `step()` (one step, under its own lock)
  and `_busy()` (requests queued or running).
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str = ""  # the text this token adds ("" without a tokenizer)
    live_kv_tokens: int = 0  # the request's live KV entries (tokens summed over layers and KV heads)
    compression_ratio: float = 1.0


@dataclass
class Completion:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # [generated, V] float32 on CPU, when asked for (keep_logits)


_DONE = object()

# Where requests submitted with an outbox put their events: (handle, TokenEvent | Completion).
Outbox = queue.SimpleQueue


class RequestHandle:
    """A submitted request. `request` is the owner's record of it; `text_of(token_id)` the text a token
    adds (None: no tokenizer)."""

    def __init__(self, owner: StepLoop, request_id: int, request: Any,
                 text_of: Callable[[int], str] | None = None, outbox: Outbox | None = None):  # fmt: skip
        self._owner, self.request_id, self.request = owner, request_id, request
        self._text_of = text_of
        self._outbox = outbox
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._completion: Completion | None = None

    def _emit(self, token_id: int, live_kv_tokens: int, compression_ratio: float) -> None:
        text = self._text_of(token_id) if self._text_of is not None else ""
        event = TokenEvent(token_id, text, live_kv_tokens, compression_ratio)
        if self._outbox is not None:
            self._outbox.put((self, event))
        else:
            self._events.put(event)

    def _finish(self, completion: Completion) -> None:
        self._completion = completion
        self._done.set()
        if self._outbox is not None:
            self._outbox.put((self, completion))
        else:
            self._events.put(_DONE)

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._outbox is not None:
            raise TypeError("this request's events go to its outbox; read them there")
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                if self._owner.loop_running:
                    item = self._events.get()
                else:
                    self._owner.step()
                    continue
            if item is _DONE:
                return
            yield item

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        while not self._done.is_set():
            if self._owner.loop_running:
                if not self._done.wait(timeout):
                    raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
            else:
                self._owner.step()
        assert self._completion is not None
        return self._completion

    def cancel(self) -> None:
        self._owner._cancel(self.request_id)


class StepLoop:
    def __init__(self, loop_name: str):
        self._loop_name = loop_name
        self._inbox: list[RequestHandle] = []
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()  # guards _inbox and _cancelled (submit and cancel from any thread)
        self._loop: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    def step(self) -> int:
        raise NotImplementedError

    def _busy(self) -> bool:
        raise NotImplementedError

    def _enqueue(self, handle: RequestHandle) -> RequestHandle:
        with self._lock:
            self._inbox.append(handle)
        self._wake.set()
        return handle

    def _cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def _take_inbox(self) -> tuple[list[RequestHandle], set[int]]:
        """What was submitted and cancelled since the last step (the step takes both)."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            cancelled, self._cancelled = self._cancelled, set()
        return inbox, cancelled

    @property
    def loop_running(self) -> bool:
        return self._loop is not None and self._loop.is_alive()

    def has_work(self) -> bool:
        with self._lock:
            pending = bool(self._inbox or self._cancelled)
        return pending or self._busy()

    def start(self) -> None:
        """Run the step loop in a background daemon thread."""
        if self.loop_running:
            return
        self._stop.clear()
        self._loop = threading.Thread(target=self._run_loop, name=self._loop_name, daemon=True)
        self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._loop is not None:
            self._loop.join()
            self._loop = None

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.step()
            except Exception:  # never let one bad step kill the server's loop; the step already
                traceback.print_exc()  # failed its requests where it could
                ran = 0
            if ran == 0 and not self.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
