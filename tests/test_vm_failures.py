"""Failure paths end with a reason and QEMU exiting, never a hang; and
vm/ refuses bad input with one clear line."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from haboob_build import steps
from tests import image_support as sup
from vm.image import Image, VMError
from vm.qemu import BootError, Machine, Options


def corrupt_store(ctx):
    e = ctx.tree.entries[steps.STORE]
    e.data = e.data[:len(e.data) // 2]          # truncated: the store's own checks must refuse it


def modules_for_another_kernel(ctx):
    rel = ctx.facts["kernel"]["release"]
    other = ("9" * len(rel.split(".")[0])) + rel[len(rel.split(".")[0]):]   # same length, another release
    for path, e in ctx.tree.entries.items():
        if path.endswith(".ko"):
            e.data = e.data.replace(f"vermagic={rel} ".encode(), f"vermagic={other} ".encode())


def boot_until_exit(image_dir, timeout=300):
    """Boot; returns (BootError, exit status) - the failure must be reported and QEMU gone."""
    with Machine(Image.load(image_dir), Options(net="user")) as m:
        with pytest.raises(BootError) as ei:
            m.wait_ready(timeout)
        code = m.wait_exit(120)
        return ei.value, code


@pytest.mark.vm
def test_corrupt_store_is_fatal_and_powers_off():
    img = sup.build("corrupt", steps=sup.insert_after("content", "corrupt-store", corrupt_store))
    err, code = boot_until_exit(img)
    assert "HABOOB-FATAL content store /haboob/site.store" in err.reason
    assert code == 0                                   # the guest powered itself off


@pytest.mark.vm
def test_modules_of_another_kernel_are_fatal():
    img = sup.build("wrongmods", steps=sup.insert_after("kernel", "wrong-modules", modules_for_another_kernel))
    err, code = boot_until_exit(img)
    assert "HABOOB-FATAL loading module" in err.reason and "different kernel" in err.reason
    assert code == 0


@pytest.mark.vm
def test_a_kernel_that_is_not_one_makes_qemu_exit(tmp_path):
    img = sup.copy_image(sup.build(), tmp_path / "img")
    (img / "vmlinuz").write_bytes(b"this is not a kernel" * 1000)
    m = json.loads((img / "manifest.json").read_text())
    import hashlib
    m["artifacts"]["vmlinuz"] = {"size": 20000, "sha256": hashlib.sha256((img / "vmlinuz").read_bytes()).hexdigest()}
    (img / "manifest.json").write_text(json.dumps(m))
    err, code = boot_until_exit(img, timeout=120)
    assert "QEMU exited with status" in err.reason
    assert code not in (None, 0)


def run_vm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vm", *args], capture_output=True, text=True,
                          cwd=sup.REPO, env=env, timeout=120)


def one_line_error(proc, *words):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_missing_image_folder(tmp_path):
    one_line_error(run_vm("test", str(tmp_path / "nope")), "no such folder")


def test_folder_without_manifest(tmp_path):
    one_line_error(run_vm("boot", str(tmp_path)), "manifest.json", "missing")


def test_manifest_that_does_not_match(tmp_path):
    img = sup.copy_image(sup.build(), tmp_path / "img")
    data = bytearray((img / "initrd.img").read_bytes())
    data[1000] ^= 1
    (img / "initrd.img").write_bytes(bytes(data))
    one_line_error(run_vm("test", str(img)), "initrd.img", "does not match manifest.json")


def test_missing_qemu(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))          # no qemu-system-x86_64 on this PATH
    one_line_error(run_vm("test", str(sup.build()), env=env), "qemu-system-x86_64 is not installed")


def test_bad_net(tmp_path):
    proc = run_vm("boot", str(sup.build()), "--net", "bridge")
    assert proc.returncode == 2 and "--net" in proc.stderr and "'bridge'" in proc.stderr


def test_image_load_refuses_missing_artifact(tmp_path):
    img = sup.copy_image(sup.build(), tmp_path / "img")
    (img / "vmlinuz").unlink()
    with pytest.raises(VMError, match="vmlinuz: missing"):
        Image.load(img)


def test_pvh_extraction_of_the_debian_kernel(tmp_path, monkeypatch):
    from vm import pvh
    monkeypatch.setenv("HABOOB_CACHE", str(tmp_path))
    img = Image.load(sup.build())
    direct = pvh.direct_kernel(img.vmlinuz)
    assert direct != img.vmlinuz and direct.read_bytes()[:4] == b"\x7fELF"
    assert pvh.has_pvh_note(direct.read_bytes())
    assert pvh.direct_kernel(img.vmlinuz) == direct           # cached
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel" * 100)
    assert pvh.direct_kernel(junk) == junk                    # falls back to the file itself


@pytest.mark.vm
def test_no_qemu_outlives_a_killed_parent():
    import time
    code = ("import sys, time\nfrom vm.image import Image\nfrom vm.qemu import Machine, Options\n"
            f"m = Machine(Image.load({str(sup.build())!r}), Options()).start()\n"
            "print(m.proc.pid, m.tmp, flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=sup.REPO, stdout=subprocess.PIPE, text=True)
    try:
        pid, tmp = parent.stdout.readline().split()
        qemu = int(pid)
        assert os.path.exists(f"/proc/{qemu}")
    finally:
        parent.kill()                                # no cleanup code runs in the parent
        parent.wait()
    shutil.rmtree(tmp, ignore_errors=True)           # its serial log and sockets
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{qemu}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{qemu}")


@pytest.mark.vm
def test_kernel_panic_is_reported_and_qemu_exits():
    # no /init to run: the kernel panics; panic=-1 reboots, -no-reboot makes QEMU exit
    with Machine(Image.load(sup.build()), Options(net="user", append=["rdinit=/no-such-init"])) as m:
        with pytest.raises(BootError) as ei:
            m.wait_ready(300)
        assert "kernel panic" in ei.value.reason.lower()
        assert ei.value.tail and m.wait_exit(120) is not None


@pytest.mark.vm
def test_timeout_is_reported_with_the_console_tail():
    with Machine(Image.load(sup.build()), Options(net="user")) as m:
        with pytest.raises(BootError, match=r"no HABOOB-READY within 0s"):
            m.wait_ready(0.2)
    assert m.proc.poll() is not None                  # close() stopped QEMU


def test_a_refused_start_leaves_no_folder_behind(tmp_path, monkeypatch):
    """A Machine whose options are refused before QEMU starts (here: --net tap
    without a device) raises VMError and removes the folder it made."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    m = Machine(Image.load(sup.build()), Options(net="tap"))
    with pytest.raises(VMError, match="--net tap needs a tap device name"):
        m.start()
    assert list(tmp_path.iterdir()) == [] and m.tmp is None
