"""`vm boot` and `vm test` stop cleanly on SIGINT and SIGTERM however they
were started: as a script starts a background job (SIGINT inherited
ignored: Python then never raises KeyboardInterrupt) and as a terminal does
(SIGINT at its default). Each run is interrupted in one phase: booting
(before HABOOB-READY), ready, or powering off (a second signal). Every run
checks vm's messages, its exit status, and that the QEMU it started (found
among vm's children in /proc, tracked by pid) is gone, with its temporary
folder, when vm exits.

Boots are shared by design: the booting-phase runs stop QEMU seconds after
it starts; only three runs wait for a full boot. A "frozen" run SIGSTOPs
QEMU (a hung QEMU, as far as QMP can tell) to make the power-off phase last
as long as the test needs, and to show the QMP deadline."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests import image_support as sup

pytestmark = pytest.mark.vm

QEMU = b"qemu-system-x86_64"
STOPPING = "{}: stopping (ACPI power button via QMP; a second signal kills QEMU at once) ..."
CLEAN = "stopped cleanly"
BOOTING = "stopped: the guest was still booting (QEMU quit via QMP)"
SECOND = "second signal ({}): killed QEMU at once"
HUNG = "QEMU did not answer QMP within 5s; killed it"


def sigint_ignored():
    """In the child: as a non-interactive shell starts `cmd &` (and Python keeps SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def sigint_default():
    """In the child: SIGINT as at a terminal (a suite run as a background job has it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """`python -m vm CMD IMAGE` in a child, its output gathered by threads, its QEMU found in /proc."""

    def __init__(self, cmd, image, ignore_sigint):
        self.proc = subprocess.Popen([sys.executable, "-m", "vm", cmd, str(image)], cwd=sup.REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=sigint_ignored if ignore_sigint else sigint_default)
        self.out, self.err = [], []
        self.pumps = [threading.Thread(target=self._pump, args=(f, lines), daemon=True)
                      for f, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.pumps:
            t.start()
        self.qemu = None
        self.log = None

    @staticmethod
    def _pump(f, lines):
        for line in f:
            lines.append(line.rstrip("\n"))

    def until(self, what, pred, timeout=300):
        deadline = time.monotonic() + timeout
        while True:
            got = pred()
            if got:
                return got
            assert self.proc.poll() is None, f"vm exited ({self.proc.returncode}) waiting for {what}: {self.err}"
            assert time.monotonic() < deadline, f"no {what} within {timeout}s: {self.err}"
            time.sleep(0.01)

    def _find_qemu(self):
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            try:
                with open(f"/proc/{self.proc.pid}/task/{tid}/children") as f:
                    children = f.read().split()
            except OSError:                     # a thread that just ended
                continue
            for pid in children:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                except OSError:
                    continue
                if argv[0].endswith(QEMU):      # not the forked child before its exec
                    return int(pid), argv
        return None

    def find_qemu(self):
        self.qemu, argv = self.until("QEMU among vm's children", self._find_qemu, 60)
        chardev = next(a for a in argv if b"logfile=" in a).decode()
        self.log = Path(re.search(r"logfile=([^,]+)", chardev).group(1))
        qmp = self.log.parent / "qmp.sock"
        self.until("QEMU's QMP socket", qmp.exists, 60)
        return self.qemu

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig):
        self.proc.send_signal(sig)

    def finish(self, timeout=120):
        self.proc.wait(timeout)
        for t in self.pumps:
            t.join(10)
        return self.proc.returncode

    def cleanup(self):
        if self.qemu and self.proc.poll() is None and os.path.exists(f"/proc/{self.qemu}"):
            os.kill(self.qemu, signal.SIGKILL)          # the one we tracked, only if vm did not
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def image():
    return sup.build()


def assert_nothing_left(run):
    # vm has exited: it must have reaped its QEMU (no process, not even a zombie, with that pid)
    assert not os.path.exists(f"/proc/{run.qemu}"), f"QEMU {run.qemu} outlived vm"
    assert not run.log.parent.exists(), "the serial log and QMP socket folder were left behind"


# (command, SIGINT ignored in the child, signals, expected outcome line, exit status)
BOOTING_CASES = [
    pytest.param("boot", False, [signal.SIGINT], BOOTING, 0, id="boot-sigint"),
    pytest.param("test", False, [signal.SIGTERM], BOOTING, 128 + signal.SIGTERM, id="test-sigterm"),
    pytest.param("test", True, [signal.SIGINT], BOOTING, 128 + signal.SIGINT, id="test-sigint-ignored"),
    # powering off: a second signal during the power-button grace of a booting guest
    pytest.param("boot", True, [signal.SIGTERM, signal.SIGINT], SECOND.format("SIGINT"), 1,
                 id="boot-second-signal-while-powering-off"),
]


@pytest.mark.parametrize("cmd, ignore, sigs, outcome, status", BOOTING_CASES)
def test_stop_while_booting(image, cmd, ignore, sigs, outcome, status):
    run = Run(cmd, image, ignore)
    try:
        run.find_qemu()
        assert "HABOOB-READY" not in run.console()          # still booting
        run.signal(sigs[0])
        stopping = STOPPING.format(sigs[0].name)
        if len(sigs) > 1:
            run.until("the stopping message", lambda: stopping in run.err, 60)
            run.signal(sigs[1])
        code = run.finish()
        assert code == status, run.err
        assert stopping in run.err and outcome in run.err, run.err
        assert_nothing_left(run)
    finally:
        run.cleanup()


def test_boot_stops_cleanly_when_ready_on_sigint_inherited_ignored(image):
    """The reported case: `python3 -m vm boot IMG &` from a script, then `kill -INT`."""
    run = Run("boot", image, ignore_sigint=True)
    try:
        run.find_qemu()
        url = run.until("the URL", lambda: next((m.group(1) for l in run.out
                                                   if (m := re.match(r"open (http://127\.0\.0\.1:\d+/)$", l))),
                                                  None))
        with urllib.request.urlopen(url, timeout=60) as resp:
            assert resp.read() == (sup.EXAMPLE / "index.html").read_bytes()
        run.signal(signal.SIGINT)
        assert run.finish() == 0, run.err
        assert STOPPING.format("SIGINT") in run.err and CLEAN in run.err, run.err
        assert any(l.startswith("HABOOB-COUNTERS {") for l in run.out), run.out    # PID 1's last words
        assert_nothing_left(run)
    finally:
        run.cleanup()


def test_test_stops_cleanly_when_ready_on_sigterm(image):
    run = Run("test", image, ignore_sigint=False)
    try:
        run.find_qemu()
        run.until("HABOOB-READY", lambda: "HABOOB-READY" in run.console())
        run.signal(signal.SIGTERM)                      # while it fetches: its checks are not done
        assert run.finish() == 128 + signal.SIGTERM, run.err
        assert STOPPING.format("SIGTERM") in run.err and CLEAN in run.err, run.err
        assert "passed" not in "\n".join(run.out)
        assert_nothing_left(run)
    finally:
        run.cleanup()


def test_second_signal_kills_a_guest_that_hangs_while_powering_off(image):
    """Ready, then QEMU stops answering (SIGSTOP): the power button over QMP waits for its deadline;
    a second signal (SIGINT, inherited ignored) kills QEMU at once."""
    run = Run("test", image, ignore_sigint=True)
    try:
        qemu = run.find_qemu()
        run.until("HABOOB-READY", lambda: "HABOOB-READY" in run.console())
        os.kill(qemu, signal.SIGSTOP)
        run.signal(signal.SIGTERM)
        run.until("the stopping message", lambda: STOPPING.format("SIGTERM") in run.err, 60)
        run.signal(signal.SIGINT)
        assert run.finish() == 128 + signal.SIGTERM, run.err
        assert SECOND.format("SIGINT") in run.err and HUNG not in run.err, run.err
        assert_nothing_left(run)
    finally:
        if run.qemu and os.path.exists(f"/proc/{run.qemu}"):
            os.kill(run.qemu, signal.SIGCONT)
        run.cleanup()


def test_a_hung_qemu_is_killed_after_the_qmp_deadline(image):
    """One signal, QEMU not answering QMP: vm does not wait forever on QMP; it kills QEMU after 5 s."""
    run = Run("boot", image, ignore_sigint=False)
    try:
        qemu = run.find_qemu()
        os.kill(qemu, signal.SIGSTOP)
        run.signal(signal.SIGTERM)
        assert run.finish() == 1, run.err
        assert STOPPING.format("SIGTERM") in run.err and HUNG in run.err, run.err
        assert_nothing_left(run)
    finally:
        if run.qemu and os.path.exists(f"/proc/{run.qemu}"):
            os.kill(run.qemu, signal.SIGCONT)
        run.cleanup()
