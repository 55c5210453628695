"""SIGTERM and Ctrl-C ask the run to stop at the next step boundary, where all ranks agree and save together.

The handler only sets a flag: saving from inside a signal handler could interleave with a collective and hang.
The step's all-reduce carries the flag, so every rank stops after the same step even if only one got the signal.
A second Ctrl-C interrupts at once.
"""
import logging
import signal

from utils.log import THIS_RANK_ONLY

log = logging.getLogger("trainer")


class StopSignals:
    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: saving a resumable state after this step, then exiting",
                    signal.Signals(signum).name, extra=THIS_RANK_ONLY)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
