"""The model's own process: it loads the model, decodes every request in one batch, one token each per step
(`inference.stepper`), and sends back what each step added to each answer. A request that arrives mid-generation
joins at the next step; a finished or cancelled one leaves at once. serving/scheduler.py starts it and talks to it
through a pipe: `Request` and `Cancel` in, `Report` (the step's events and the batch's load) out.

Why a process and not a thread of the server: Python runs one thread at a time (the GIL). In one process, the HTTP
side (parsing, JSON, server-sent events) and the model's step (a few dozen small operations, each giving up and
taking back the GIL) wait for each other, so the server uses one core however many requests it batches. Here
each has its own interpreter: the model steps while the HTTP side talks to clients.
"""
import collections
import signal
import sys
import traceback
from dataclasses import dataclass, field

from config import DecodingSettings
from inference.saved_model import load_for_answers
from inference.stepper import Sequence, StepDecoder
from training.memory import freeze_startup_objects
from utils.errors import UserError

SHUTTING_DOWN = "the server is shutting down"  # what the requests left at the end are told, by either process
HOLD_BACK = "\ufffd"  # the decoder's stand-in for a character whose bytes are not all generated yet


def held_back(text: str) -> int:
    """Characters at the end of a decoded answer that may still change: up to 3 replacement characters, the bytes
    of a character whose last byte is not generated yet (a UTF-8 character has at most 4). More are bytes that
    will never form a character, and go out as they are."""
    count = len(text) - len(text.rstrip(HOLD_BACK))
    return count if count <= 3 else 0


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
class Request:
    id: int
    prompt_ids: list[int]
    settings: DecodingSettings
    stop: tuple[str, ...]


@dataclass
class Cancel:
    id: int


@dataclass
class Stop:
    """Fail what is left and exit (the server has drained what it waited for)."""


@dataclass
class Load:
    active: int = 0
    waiting: int = 0
    steps: int = 0


@dataclass
class Report:
    events: list  # (request id, Delta | Finished | Failed), in order
    load: Load


@dataclass
class Started:
    device: str = ""
    error: str = ""  # why the model did not load (the user's mistake: a message, not a traceback)


@dataclass
class Decoding:
    """A request being decoded, and how much of its answer has been sent."""

    request: Request
    sequence: Sequence | None = None  # once it joins
    sent: int = 0


@dataclass
class Batcher:
    decoder: StepDecoder
    max_batch: int
    waiting: collections.deque = field(default_factory=collections.deque)
    active: list = field(default_factory=list)
    steps: int = 0

    def __post_init__(self):
        self.eos_id = self.decoder.tokenizer.eos_token_id  # read once: a tokenizer's attributes are slow to get
        # The Rust tokenizer's decode, as `tokenizer.decode` does it for ours (model/tokenizer.py: no clean-up of
        # spaces), in ~1 µs instead of ~7: an answer is decoded again at every token.
        self.decode = self.decoder.tokenizer.backend_tokenizer.decode

    def load(self) -> Load:
        return Load(len(self.active), len(self.waiting), self.steps)

    def cancel(self, request_id: int) -> None:
        self.waiting = collections.deque(d for d in self.waiting if d.request.id != request_id)
        self.active = [d for d in self.active if d.request.id != request_id]

    def fail_all(self, message: str) -> list:
        failed = [(d.request.id, Failed(message)) for d in list(self.waiting) + self.active]
        self.waiting.clear()
        self.active = []
        return failed

    def advance(self) -> list:
        """One step: the waiting requests that fit join, every active one gets a token; its events."""
        joining = []
        while self.waiting and len(self.active) + len(joining) < self.max_batch:
            decoding = self.waiting.popleft()
            decoding.sequence = Sequence(decoding.request.prompt_ids, decoding.request.settings)
            joining.append(decoding)
        try:
            if joining:
                self.decoder.join([d.sequence for d in joining])
            self.active += joining
            if not self.active:  # the last ones were cancelled
                return []
            tokens = self.decoder.step([d.sequence for d in self.active])
        except Exception:  # a bug must end its requests with an error, not hang them (and the worker)
            traceback.print_exc(file=sys.stderr)
            return self.fail_all("the model failed on this request (the server log has the details)")
        self.steps += 1
        events = []
        done = {id(d) for d, token in zip(self.active, tokens) if self.after_token(d, token, events)}
        self.active = [d for d in self.active if id(d) not in done]
        return events

    def after_token(self, decoding: Decoding, token: int, events: list) -> bool:
        """Send what the new token adds to the answer; True when the request is finished."""
        request = decoding.request
        generated = decoding.sequence.generated
        ended = token == self.eos_id
        ids = generated[:-1] if ended else generated
        text = self.decode(ids, skip_special_tokens=True)
        reason = "stop" if ended else None
        for stop in request.stop:
            position = text.find(stop)
            if position >= 0:
                text, reason = text[:position], "stop"
        if reason is None and len(ids) >= request.settings.max_new_tokens:
            reason = "length"
        if reason is None:
            # Hold back a character still being spelled out in bytes, and any tail that may begin a stop string.
            safe = len(text) - held_back(text)
            for stop in request.stop:
                for size in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:size]):
                        safe -= size
                        break
            text = text[:safe]
        if len(text) > decoding.sent:
            events.append((request.id, Delta(text[decoding.sent:])))
            decoding.sent = len(text)
        if reason:
            events.append((request.id, Finished(reason, len(request.prompt_ids), len(ids))))
        return reason is not None

    def take(self, message) -> bool:
        """Apply one message from the server; False when it says to stop."""
        if isinstance(message, Request):
            self.waiting.append(Decoding(message))
        elif isinstance(message, Cancel):
            self.cancel(message.id)
        return not isinstance(message, Stop)

    def serve(self, connection) -> None:
        """Until Stop, or the server gone (its end of the pipe closed): decode while there is work, block on
        the pipe when there is none. Every message waiting is taken in before each step, and every step is
        reported (with no events, too: the server's view of the load stays exact)."""
        running = True
        while running:
            if not self.waiting and not self.active:
                running = self.take(connection.recv())
            while running and connection.poll():
                running = self.take(connection.recv())
            events = self.advance() if running else self.fail_all(SHUTTING_DOWN)
            connection.send(Report(events, self.load()))


def run_worker(model_dir: str, max_batch: int, connection) -> None:
    """The process's entry (multiprocessing, spawned). Ctrl-C and SIGTERM are the server's to handle: it drains,
    then sends Stop; this process ends by itself, too, when the server's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        model, tokenizer, placement = load_for_answers(model_dir)
    except UserError as error:
        connection.send(Started(error=str(error)))
        return
    batcher = Batcher(StepDecoder(model, tokenizer, placement), max_batch)
    freeze_startup_objects()  # a full collection would stop every request in flight for ~0.2 s
    connection.send(Started(device=placement.describe()))
    try:
        batcher.serve(connection)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server is gone: nobody is left to answer
