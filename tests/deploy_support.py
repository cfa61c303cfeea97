"""Helpers for tests/test_deploy_*.py: a real Debian kernel, a stand-in
initramfs, and a QEMU runner that watches the serial console.

The stand-in initramfs (tests only; the appliance image has no shell) is
busybox-static as /init: it loads the NIC modules chosen by
haboob_build.drivers, prints `DEPLOY-BOOTED <cmdline>`, puts
`haboob.ip=` on the first NIC, serves /www with busybox httpd and prints
`DEPLOY-READY driver=<driver of the NIC>` once the link has carrier; with
`deploy.fetch=IP` it then fetches http://IP/index.html from a peer and
prints `DEPLOY-FETCHED <sha256>`. That checks a boot medium end to
end (firmware -> GRUB -> kernel + initrd + command line -> NIC driver ->
bytes over the wire) before and independently of the real appliance.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

from haboob_build.context import cache_root

MARK_BOOTED = "DEPLOY-BOOTED"
MARK_READY = "DEPLOY-READY"

# A page the stand-in serves; fetched back byte for byte.
PAGE = bytes(range(256)) * 64 + b"haboob deploy test\n"


def has_kvm() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and (" vmx" in flags or " svm" in flags)


def accel_args() -> list[str]:
    return ["-accel", "kvm", "-cpu", "host"] if has_kvm() else ["-accel", "tcg"]


def debian_kernel() -> tuple[Path, Path]:
    """(vmlinuz, modules dir) of Debian's kernel, fetched once into the
    shared cache (the layout of haboob_build.debs: cache/pkgs/PKG_VERSION/)."""
    pkgs = sorted(cache_root().glob("pkgs/linux-image-*-amd64_*/boot/vmlinuz-*"))
    if not pkgs:
        from types import SimpleNamespace

        from haboob_build import debs, kernel
        from haboob_build.context import Context
        ctx = SimpleNamespace(cache=cache_root(), log=lambda m: None,
                              run=lambda *a, **kw: Context.run(None, *a, **kw))
        meta = [d for d in debs.depends(ctx, kernel.DEBIAN_META) if d.startswith("linux-image-")]
        debs.fetch(ctx, meta[0])
        pkgs = sorted(cache_root().glob("pkgs/linux-image-*-amd64_*/boot/vmlinuz-*"))
    vmlinuz = pkgs[-1]
    release = vmlinuz.name[len("vmlinuz-"):]
    return vmlinuz, vmlinuz.parent.parent / "lib/modules" / release


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (the initramfs format) of (path, mode, data)."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        nameb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + nameb
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko 2>/dev/console; done
echo "DEPLOY-BOOTED $(cat /proc/cmdline)"
ip=""
for w in $(cat /proc/cmdline); do case "$w" in haboob.ip=*) ip="${w#haboob.ip=}";; esac; done
n=0
while [ $n -lt 100 ]; do
  nic=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
  [ -n "$nic" ] && break
  sleep 0.1; n=$((n+1))
done
ip link set lo up
ip link set "$nic" up
ip addr add "$ip" dev "$nic"
drv=$(basename "$(readlink /sys/class/net/$nic/device/driver)")
n=0
while [ "$(cat /sys/class/net/$nic/carrier 2>/dev/null)" != 1 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
httpd -p 80 -h /www
echo "DEPLOY-READY driver=$drv nic=$nic ip=$ip"
for w in $(cat /proc/cmdline); do case "$w" in deploy.fetch=*) peer="${w#deploy.fetch=}";; esac; done
if [ -n "$peer" ]; then
  n=0
  while [ $n -lt 60 ]; do
    # plain HTTP/1.0 over nc: the page is binary, the body is its last len(page) bytes
    printf 'GET /index.html HTTP/1.0\r\n\r\n' | nc -w 5 "$peer" 80 > /tmp/got
    if head -c 15 /tmp/got | grep -q '200'; then
      echo "DEPLOY-FETCHED $(tail -c "$(wc -c < /www/index.html)" /tmp/got | sha256sum | cut -d' ' -f1)"; break
    fi
    sleep 1; n=$((n+1))
  done
fi
while true; do sleep 1000; done
"""


def standin_initrd(out: Path, modules: list) -> Path:
    """Write the stand-in initramfs with these modules (drivers.Selected)."""
    d, x, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644
    entries = [(p, d, b"") for p in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "www")]
    entries += [("bin/busybox", x, Path(shutil.which("busybox")).read_bytes()),
                ("init", x, INIT.encode()),
                ("www/index.html", f, PAGE),
                ("etc/modules", f, "".join(m.name + "\n" for m in modules).encode())]
    entries += [(f"lib/modules/{m.name}.ko", f, m.path.read_bytes()) for m in modules]
    out.write_bytes(_newc(entries))
    return out


class Console:
    """A QEMU process whose serial console (stdout) is collected by a thread."""

    def __init__(self, argv: list[str], **popen):
        self.argv = argv
        self.text = ""
        self._lock = threading.Lock()
        # stdin is a pipe we never write to: with /dev/null the serial port
        # reads EOF, which firmware/GRUB may take as a key press and stop at the menu.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, **popen)
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self):
        for raw in iter(lambda: self.proc.stdout.read1(4096), b""):
            with self._lock:
                self.text += raw.decode(errors="replace")

    def wait_for(self, marker: str, timeout: float, partial: bool = False) -> str:
        """The console line holding marker; AssertionError with the console tail if it never comes.
        partial=True also looks at the line being written (prompts end without a newline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                text = self.text
            # complete lines only: a line still being written would be cut short
            for line in (text if partial else text[:text.rfind("\n") + 1]).splitlines():
                if marker in line:
                    return line[line.index(marker):].strip()
            if self.proc.poll() is not None:
                time.sleep(0.2)
                break
            time.sleep(0.2)
        raise AssertionError(f"no {marker!r} on the console within {timeout}s "
                             f"(qemu rc={self.proc.poll()}); console tail:\n{self.text[-3000:]}")

    def send(self, data: bytes) -> None:
        """Type into the serial console."""
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self._t.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
