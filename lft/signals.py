"""Stopping on a signal: SIGTERM (preemption) and Ctrl-C only set a flag; the training loop acts on it.

The loop checks the flag at each step boundary, on every rank at once (it is all-reduced with the step's
flags), saves a checkpoint there and exits 143 / 130.
"""
from __future__ import annotations

import os
import signal
import sys
import threading


class StopRequest:
    """Between listen() and release(), SIGTERM and Ctrl-C (SIGINT) set `signum` instead of stopping the process;
    a second Ctrl-C interrupts at once. The training loop reads it at each step boundary (all ranks agree)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\n{signal.Signals(signum).name} received: stopping after this step with a checkpoint "
                  "(Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def listen(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old.setdefault(sig, signal.signal(sig, self._handle))

    def release(self) -> None:
        """Back to the previous handlers (a signal after training, e.g. during the test evaluation, acts as usual)."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request on another process"

    def __enter__(self) -> "StopRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class announce_signals:
    """A context where SIGTERM/Ctrl-C print `message` (what is done, what to run next) and exit 143/130 at once,
    for the parts after training (the final test evaluation, the merge): there is nothing to checkpoint."""

    def __init__(self, message: str):
        self.message, self._old = message, {}

    def _handle(self, signum, frame):
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"\n{signal.Signals(signum).name} received: {self.message}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
