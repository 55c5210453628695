"""SIGTERM and Ctrl-C ask the run to stop after the step in progress, where all ranks agree and save together.

The handler only sets a flag: saving from inside a signal handler could interleave with a collective and hang.
The step reads the flag just before its one all-reduce and carries it there, so every rank stops after the same
step even if only one got the signal. A second Ctrl-C ends the process at once, with one line.

Python runs a signal handler in the main thread between two bytecodes, and that can be inside a write to the very
stream the handler would write to (a log line's flush waiting in write(2) is the common case): a buffered stream
refuses to be re-entered ("reentrant call"). So the handler writes nothing through Python's streams itself.
"""
import logging
import os
import signal
import threading

from utils.log import THIS_RANK_ONLY

log = logging.getLogger("trainer")
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C


class StopSignals:
    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._request)

    def is_requested(self) -> bool:
        return self.requested

    def _request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            # Raising KeyboardInterrupt here would print a traceback from wherever the loop happened to be;
            # os.write goes round sys.stderr's buffer, which the interrupted code may be in the middle of.
            os.write(2, b"error: a second Ctrl-C: stopped at once; the last saved state is kept (resume with "
                        b"--is_keep_training=True)\n")
            os._exit(EXIT_INTERRUPTED)
        self.requested = True
        # A thread of its own waits for the log handlers' lock (held if the main thread was logging) and then
        # writes the line; the interpreter waits for it before exiting.
        threading.Thread(target=log.warning, name="announce-stop-signal",
                         args=("%s received: saving a resumable state after the step in progress, then exiting",
                               signal.Signals(signum).name), kwargs={"extra": THIS_RANK_ONLY}).start()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """For DataLoader workers: the terminal sends Ctrl-C to the whole process group, but only the main process
    decides when to stop (and says so once); the workers end when it closes their loader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
