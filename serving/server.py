"""Start-up and shutdown of `serve`: the model process started (its model loaded), uvicorn listening, the URL
printed once the socket is bound; Ctrl-C or SIGTERM stops accepting connections, lets the requests in flight
finish (for at most --drain_seconds), stops the model process and returns normally, so the command exits 0."""
import asyncio
import contextlib
import signal
import sys

import uvicorn

from serving.app import ServerSettings, create_app
from serving.scheduler import Scheduler
from training.memory import freeze_startup_objects
from utils.errors import UserError


class DrainingServer(uvicorn.Server):
    """uvicorn's server with our own signal handling: uvicorn re-raises a caught SIGTERM after its graceful
    shutdown, which would kill the process with status 143 instead of letting the command end with 0."""

    def __init__(self, config: uvicorn.Config, url: str, scheduler: Scheduler):
        super().__init__(config)
        self.url, self.scheduler = url, scheduler

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self.request_exit, signum)
                installed.append(signum)
            except (NotImplementedError, RuntimeError):  # not the main thread, or no such signal here
                pass
        try:
            yield
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    def request_exit(self, signum: int) -> None:
        if self.should_exit:  # a second Ctrl-C: stop waiting for the requests in flight
            self.force_exit = True
            return
        print(f"{signal.Signals(signum).name}: finishing the requests in flight (at most "
              f"{self.config.timeout_graceful_shutdown:g} s), then exiting", file=sys.stderr, flush=True)
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        self.scheduler.listen(asyncio.get_running_loop())
        await super().startup(sockets)
        if self.started:
            print(f"serving on {self.url}  (chat page: {self.url}/ , OpenAI API: {self.url}/v1 ; Ctrl-C stops)",
                  flush=True)


def serve(scheduler: Scheduler, settings: ServerSettings, host: str, port: int, drain_seconds: float) -> None:
    app = create_app(scheduler, settings)
    shown_host = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(drain_seconds, 0.01), lifespan="off")
    server = DrainingServer(config, f"http://{shown_host}:{port}", scheduler)
    device = scheduler.start()
    freeze_startup_objects()  # a full collection here (~0.1 s) would stall every stream too
    print(f"model {settings.model_id} on {device}, in its own process: batches of up to {scheduler.max_batch}, "
          f"{scheduler.queue_size} more may wait", file=sys.stderr, flush=True)
    try:
        server.run()
    except SystemExit:  # uvicorn's way of saying that it could not bind (it logged why)
        pass
    finally:
        scheduler.stop()
    if not server.started:
        raise UserError(f"--port={port}: cannot listen on {host}:{port} (the port is in use, or --host is not an "
                        "address of this machine); give another --port or --host")
