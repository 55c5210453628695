"""The server's side of the model process (serving/worker.py): it starts the process, hands it each request and
each cancellation, and hands each request's events back to the coroutine that waits for them. Requests beyond the
batch wait (in the worker) in a bounded queue; beyond that, `submit` refuses them (QueueFull: the HTTP layer
answers 429 with Retry-After), so the backlog never grows without bound.

The worker's reports, one per decoding step, are read on the event loop itself (`listen`: the pipe is one more
file the loop watches), so a step's events reach their coroutines with no thread in between: a reader thread
would wake, wait for the interpreter's lock the HTTP side holds, and wake the loop again, at every step. If the
worker dies, the requests in flight end with an error and new ones are refused with one.
"""
import asyncio
import collections
import itertools
import math
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, field

from config import DecodingSettings
from serving.worker import (SHUTTING_DOWN, Cancel, Failed, Finished, Load, Report, Request, Started, Stop,
                            run_worker)
from utils.errors import UserError


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"the server is busy: retry in {retry_after} s")


@dataclass
class Job:
    """A submitted request, as its coroutine sees it: its events arrive in `events`."""

    id: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)


class Scheduler:
    """Every method but start and stop runs on the event loop's thread: nothing here is shared between threads."""

    def __init__(self, model_dir: str, tokenizer, max_batch: int, queue_size: int):
        self.model_dir, self.tokenizer = model_dir, tokenizer
        self.max_batch, self.queue_size = max_batch, queue_size
        self.jobs: dict[int, Job] = {}  # submitted, not finished nor cancelled
        self.ids = itertools.count()
        self.worker_load = Load()
        self.ended = ""  # why the worker is gone, once it is
        self.recent_seconds = collections.deque(maxlen=32)  # durations of finished requests, for Retry-After
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of a process with threads
        self.connection, worker_end = context.Pipe()
        self.process = context.Process(target=run_worker, args=(model_dir, max_batch, worker_end),
                                       name="model-worker", daemon=True)
        self.worker_end = worker_end

    def start(self) -> str:
        """Start the worker and wait for its model to load: the device it answers on."""
        self.process.start()
        self.worker_end.close()  # the worker's copy is its own now: the pipe closes when the worker ends
        try:
            started: Started = self.connection.recv()
        except EOFError:
            raise UserError(f"the model process ended while loading {self.model_dir} (its error is above)") from None
        if started.error:
            self.process.join(10)
            raise UserError(started.error)
        return started.device

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on `loop` reads the worker's reports (before the server takes its first request)."""
        loop.add_reader(self.connection.fileno(), self.read_reports)

    def stop(self, timeout: float = 10.0) -> None:
        """After the event loop: fail the requests still in flight, let the worker exit, and wait for it
        (bounded). Its last reports are read and dropped meanwhile, so that it never blocks on a full pipe."""
        if self.process.is_alive():
            self.send(Stop())
            deadline = time.monotonic() + timeout
            try:
                while self.process.is_alive() and time.monotonic() < deadline:
                    if self.connection.poll(0.05):
                        self.connection.recv()
            except (EOFError, OSError):
                pass  # it has exited
            self.process.join(max(0.0, deadline - time.monotonic()))
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)

    def load(self) -> dict:
        return {**asdict(self.worker_load), "max_batch": self.max_batch, "queue_size": self.queue_size}

    def submit(self, prompt_ids: list[int], settings: DecodingSettings, stop: tuple[str, ...]) -> Job:
        job = Job(next(self.ids))
        if self.ended:
            job.events.put_nowait(Failed(self.ended))
            return job
        if len(self.jobs) >= self.max_batch + self.queue_size:
            raise QueueFull(self.retry_after())
        self.jobs[job.id] = job
        self.send(Request(job.id, prompt_ids, settings, stop))
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone (or the answer is complete: then nothing to do); its place goes to another."""
        if self.jobs.pop(job.id, None) is not None:
            self.send(Cancel(job.id))

    def send(self, message) -> None:
        try:
            self.connection.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the worker is gone: reading its reports ends, and that fails its requests

    def retry_after(self) -> int:
        """Seconds until a place is likely free: a recent request's duration for each full batch ahead."""
        typical = sorted(self.recent_seconds)[len(self.recent_seconds) // 2] if self.recent_seconds else 1.0
        waiting = max(0, len(self.jobs) - self.max_batch)
        return max(1, math.ceil(typical * (1 + waiting // self.max_batch)))

    def read_reports(self) -> None:
        """The pipe is readable: every report that has arrived, each step's events to their requests."""
        try:
            while True:
                self.dispatch(self.connection.recv())
                if not self.connection.poll():
                    return
        except (EOFError, OSError):
            self.worker_gone()

    def dispatch(self, report: Report) -> None:
        self.worker_load, now = report.load, time.monotonic()
        for request_id, event in report.events:
            job = self.jobs.get(request_id)
            if job is None:  # cancelled meanwhile
                continue
            job.events.put_nowait(event)
            if isinstance(event, (Finished, Failed)):
                del self.jobs[request_id]
                self.recent_seconds.append(now - job.submitted)

    def worker_gone(self) -> None:
        asyncio.get_running_loop().remove_reader(self.connection.fileno())  # called by that loop
        self.process.join(5)  # its end of the pipe closes as it exits: a moment
        self.ended = (SHUTTING_DOWN if self.process.exitcode == 0 else
                      "the model process ended unexpectedly (the server log has why)")
        for job in self.jobs.values():
            job.events.put_nowait(Failed(self.ended))
        self.jobs = {}
        if self.process.exitcode not in (0, None):
            print(f"error: the model process ended with status {self.process.exitcode}; requests are refused "
                  "until the server is restarted", file=sys.stderr, flush=True)
