"""One worker thread owns the model and decodes every request in one batch, one token each per step
(`inference.stepper`): a request that arrives mid-generation joins at the next step, a finished or abandoned one
leaves it at once. Requests beyond the batch wait in a bounded queue; beyond that, `submit` refuses them
(QueueFull: the HTTP layer answers 429 with Retry-After), so the backlog never grows without bound.

The asyncio side receives a request's events (text deltas, then the end) through its own asyncio.Queue, fed with
`call_soon_threadsafe`; it cancels a request (a client gone) by setting its `cancelled` flag, seen at the next step.
"""
import asyncio
import collections
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from config import DecodingSettings
from inference.stepper import Sequence, StepDecoder

HOLD_BACK = "\ufffd"  # the decoder's stand-in for a character whose bytes are not all generated yet


def held_back(text: str) -> int:
    """Characters at the end of a decoded answer that may still change: up to 3 replacement characters, the bytes
    of a character whose last byte is not generated yet (a UTF-8 character has at most 4). More are bytes that
    will never form a character, and go out as they are."""
    count = len(text) - len(text.rstrip(HOLD_BACK))
    return count if count <= 3 else 0


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"the server is busy: retry in {retry_after} s")


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" ([EOS] or a stop string), "length" (max tokens)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    """A request as the worker sees it, and the channel back to the coroutine that waits for it."""

    prompt_ids: list[int]
    settings: DecodingSettings
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    sequence: Sequence | None = None
    sent: int = 0  # characters of the answer already sent
    submitted: float = field(default_factory=time.monotonic)

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def deliver(outbox: list[tuple[Job, object]]) -> None:
    """Runs on the event loop: hand each event of one decoding step to its request."""
    for job, event in outbox:
        job.events.put_nowait(event)


class Scheduler:
    def __init__(self, decoder: StepDecoder, max_batch: int, queue_size: int):
        self.decoder, self.tokenizer = decoder, decoder.tokenizer
        self.max_batch, self.queue_size = max_batch, queue_size
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.lock = threading.Condition()
        self.running = True
        self.recent_seconds = collections.deque(maxlen=32)  # durations of finished requests, for Retry-After
        self.steps = 0
        self.thread = threading.Thread(target=self.work, name="model-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.lock:
            self.running = False
            self.lock.notify()
        self.thread.join(timeout)

    def load(self) -> dict:
        with self.lock:
            return {"active": len(self.active), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "queue_size": self.queue_size, "steps": self.steps}

    def submit(self, job: Job) -> None:
        with self.lock:
            free = self.max_batch - len(self.active)
            if len(self.waiting) >= free + self.queue_size:
                raise QueueFull(self.retry_after())
            self.waiting.append(job)
            self.lock.notify()

    def retry_after(self) -> int:
        """Seconds until a place is likely free: a recent request's duration for each full batch ahead."""
        typical = sorted(self.recent_seconds)[len(self.recent_seconds) // 2] if self.recent_seconds else 1.0
        return max(1, math.ceil(typical * (1 + len(self.waiting) // self.max_batch)))

    def work(self) -> None:
        while True:
            with self.lock:
                while self.running and not self.waiting and not self.active:
                    self.lock.wait()
                if not self.running:
                    break
                joining = []
                while self.waiting and len(self.active) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            try:
                self.advance(joining)
            except Exception:  # a bug must end its requests with an error, not hang them (and the worker)
                traceback.print_exc(file=sys.stderr)
                with self.lock:
                    failed, self.active = self.active + joining, []
                for job in failed:
                    job.emit(Failed("the model failed on this request (the server log has the details)"))
        with self.lock:
            for job in list(self.waiting) + self.active:
                job.emit(Failed("the server is shutting down"))

    def advance(self, joining: list[Job]) -> None:
        joining = [job for job in joining if not job.cancelled.is_set()]
        for job in joining:
            job.sequence = Sequence(job.prompt_ids, job.settings)
        if joining:
            self.decoder.join([job.sequence for job in joining])
        with self.lock:
            self.active = [job for job in self.active if not job.cancelled.is_set()] + joining
            active = list(self.active)
        if not active:
            return
        tokens = self.decoder.step([job.sequence for job in active])
        self.steps += 1
        outbox = []
        done = [job for job, token in zip(active, tokens) if self.after_token(job, token, outbox)]
        # One wake-up of the event loop per step for all the requests of the batch (each call_soon_threadsafe
        # writes to the loop's self-pipe): with 32 requests, 32 times fewer system calls than one per event.
        for loop in {job.loop for job, _ in outbox}:
            loop.call_soon_threadsafe(deliver, [(job, event) for job, event in outbox if job.loop is loop])
        if done:
            with self.lock:
                self.active = [job for job in self.active if job not in done]
            now = time.monotonic()
            self.recent_seconds.extend(now - job.submitted for job in done)

    def after_token(self, job: Job, token: int, outbox: list) -> bool:
        """Send what the new token adds to the answer; True when the request is finished."""
        generated = job.sequence.generated
        ended = token == self.tokenizer.eos_token_id
        ids = generated[:-1] if ended else generated
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        reason = "stop" if ended else None
        for stop in job.stop:
            position = text.find(stop)
            if position >= 0:
                text, reason = text[:position], "stop"
        if reason is None and len(ids) >= job.settings.max_new_tokens:
            reason = "length"
        if reason is None:
            # Hold back a character still being spelled out in bytes, and any tail that may begin a stop string.
            safe = len(text) - held_back(text)
            for stop in job.stop:
                for size in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:size]):
                        safe -= size
                        break
            text = text[:safe]
        if len(text) > job.sent:
            outbox.append((job, Delta(text[job.sent:])))
            job.sent = len(text)
        if reason:
            outbox.append((job, Finished(reason, len(job.prompt_ids), len(ids))))
        return reason is not None
