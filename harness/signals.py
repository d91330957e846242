"""A stop asked of a running program: Ctrl-C or SIGTERM ends the current step, a checkpoint is written, the program
exits and `--resume` continues exactly; a second signal stops at once.

    stop = StopRequest()                 # or StopRequest(after_step=N): the same stop after step N (the tests')
    with stop.on_signals():
        ... if stop.requested(step): save a checkpoint, say stop.reason(), return

A signal the program was started with ignored stays ignored (a shell starts a background job, `cmd &`, with SIGINT
ignored, so that a Ctrl-C meant for the foreground does not reach it), and after the block every signal has the
handler it had before, whatever that was.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Whether a stop was asked for, by a signal or (`after_step`) by the caller, and why."""

    def __init__(self, after_step: int | None = None):
        self.after_step, self.signal_name, self.signal_number = after_step, None, None

    def requested(self, step: int) -> bool:
        return self.signal_name is not None or (self.after_step is not None and step >= self.after_step)

    def reason(self) -> str:
        return self.signal_name or f"stop requested after step {self.after_step}"

    @contextlib.contextmanager
    def on_signals(self):
        """Catch SIGINT and SIGTERM inside the block (from the main thread only: Python delivers signals there),
        except one that is ignored: it stays so."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handle(signum, frame):
            if self.signal_name is not None:
                raise KeyboardInterrupt  # the second signal: stop now, without a checkpoint
            self.signal_name, self.signal_number = signal.Signals(signum).name, signum

        found = {s: signal.getsignal(s) for s in SIGNALS}
        caught = [s for s, handler in found.items() if handler is not signal.SIG_IGN]
        for s in caught:
            signal.signal(s, handle)
        try:
            yield self
        finally:
            for s in caught:
                # None: a handler installed outside Python; SIG_DFL is the nearest Python can put back
                signal.signal(s, signal.SIG_DFL if found[s] is None else found[s])
