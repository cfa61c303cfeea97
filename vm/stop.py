"""SIGINT and SIGTERM for `vm boot` and `vm test`, however they were started.

A shell starts a script's background jobs (`python3 -m vm boot IMG &`)
with SIGINT ignored, and Python keeps an inherited SIG_IGN: KeyboardInterrupt
never comes and `kill -INT` does nothing. SIGTERM, what scripts and service
managers send, kills the process by default, and QEMU with it
(PR_SET_PDEATHSIG), without the ACPI power-off. So the commands install
their own handler for both (`Signals`, main thread only, as `appliance
serve` does), and both signals stop the same way:

- a first signal while the command waits (booting, ready, fetching: the
  `interruptible()` phases) raises `Stop` there, as KeyboardInterrupt
  would; the command then stops the guest (Machine.stop: the ACPI power
  button via QMP, a deadline on every wait and QMP call, then QMP quit,
  then SIGKILL);
- elsewhere (setting up, powering off, tearing down) a signal is only
  counted: raising there could cut a QMP exchange or a cleanup in half. A
  first signal counted so is acted on when the next interruptible phase
  begins (at once if it does not come: the command is stopping already);
- a second signal, in any phase, kills QEMU at once from the handler
  itself (Machine.kill, by pidfd); the waits poll the process and see it
  gone.
"""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop(BaseException):
    """Raised by the handler in an interruptible phase. A BaseException, like KeyboardInterrupt, so
    `except Exception` paths do not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class Signals:
    """Context manager: SIGINT and SIGTERM handled as the module says; the old handlers back on exit."""

    def __init__(self):
        self.signum: int | None = None      # the first signal
        self.last: int | None = None        # the latest one
        self.count = 0
        self.machine = None                 # a vm.qemu.Machine to kill on the second signal
        self._live = False
        self._old: dict = {}

    def __enter__(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_status(self) -> int:
        """What a shell reports for a process that a signal ended: 128 + its number."""
        return 128 + (self.signum or 0)

    def _handler(self, signum, frame) -> None:
        self.count += 1
        self.last = signum
        if self.signum is None:
            self.signum = signum
        if self.count >= 2:
            if self.machine is not None:
                self.machine.kill()
            return
        if self._live:
            self._live = False
            raise Stop(signum)

    @contextlib.contextmanager
    def interruptible(self):
        """A phase a first signal may interrupt (raising Stop); also raises one that came before it."""
        self._live = True       # before the check: a signal between the two raises from the handler
        try:
            if self.count:
                self._live = False
                raise Stop(self.signum)
            yield
        finally:
            self._live = False
