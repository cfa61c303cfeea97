"""Boot the example image under QEMU and check it over its NIC: every URL
byte-exact (Python and curl), HEAD, 404, counters on request, a pcap from
--capture, a clean stop via QMP; on user networking and on a tap inside a
namespace (with ping)."""
import os
import subprocess
import sys

import pytest

from tests import image_support as sup
from vm import check
from vm.image import Image
from vm.qemu import Options
from vm.session import session

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def image():
    return Image.load(sup.build())


def assert_all_ok(results):
    bad = [r for r in results if not r.ok]
    assert not bad, bad


def test_user_networking(image, tmp_path):
    pcap = tmp_path / "nic.pcap"
    with session(image, Options(net="user", capture=pcap)) as s:
        ready = s.machine.wait_ready(300)
        assert ready["urls"] == len(image.urls) == 20
        assert ready["ip"] == "198.18.0.15" and ready["port"] == 80
        assert ready["driver"] == "virtio_net" and ready["mac"] == "52:54:00:12:34:56"
        assert ready["ms_since_boot"] > 0
        assert_all_ok(check.fetch_all(image, s.host, s.port, site=sup.EXAMPLE))
        assert_all_ok(check.curl_all(image, s.base_url, site=sup.EXAMPLE))
        # the console key 'c' asks PID 1 for its counters
        s.machine.send_console(b"c")
        line = s.machine.wait_for("HABOOB-COUNTERS ", 60)
        assert '"' in line
        assert s.machine.powerdown(90), s.machine.tail()
        assert s.machine.proc.returncode == 0
        assert any("HABOOB-COUNTERS" in l for l in s.machine.lines[-5:])
    from scapy.all import IP, TCP, Raw, rdpcap
    pkts = rdpcap(str(pcap))
    payloads = [bytes(p[Raw].load) for p in pkts if p.haslayer(TCP) and p.haslayer(Raw)]
    assert any(p.startswith(b"GET / HTTP/1.1\r\n") for p in payloads)
    assert any(p.startswith(b"HTTP/1.1 200 OK\r\n") for p in payloads)
    assert any(p.startswith(b"HTTP/1.1 404 ") for p in payloads)
    assert all(p[IP].src == "198.18.0.15" for p in pkts if p.haslayer(TCP) and p[TCP].sport == 80)


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the namespace and tap")
def test_tap_in_namespace_with_dhcp(image):
    # the guest asks DHCP (the last haboob.ip= counts): dnsmasq in the namespace answers
    with session(image, Options(net="tap", append=["haboob.ip=dhcp"])) as s:
        ns = s.ns.name
        ready = s.machine.wait_ready(300)
        (a,) = ready["addresses"]
        assert (a["ip"], a["how"], a["server"], a["lease"]) == ("198.18.0.15", "dhcp", "198.18.0.2", 120)
        assert s.guest_ip == ready["ip"] == "198.18.0.15"
        assert_all_ok(s.call(check.fetch_all, image, s.host, s.port, sup.EXAMPLE))
        assert_all_ok(check.curl_all(image, s.base_url, site=sup.EXAMPLE, prefix=s.prefix))
        assert check.ping(s.guest_ip, prefix=s.prefix).ok
        assert s.machine.powerdown(90)
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_vm_test_command_passes(image):
    proc = subprocess.run([sys.executable, "-m", "vm", "test", str(image.folder), "--site", str(sup.EXAMPLE)],
                          capture_output=True, text=True, cwd=sup.REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "boot to ready:" in proc.stdout and "FAIL" not in proc.stdout


# `vm boot` printing its URL and stopping on signals: tests/test_vm_signals.py


def test_only_the_nic_driver_for_the_device_present_is_loaded():
    img = Image.load(sup.build("twodrivers", nic_drivers=("virtio_net", "e1000")))
    with session(img, Options(net="user", nic="e1000")) as s:
        ready = s.machine.wait_ready(300)
        assert ready["driver"] == "e1000" and ready["drivers_loaded"] == ["e1000"]
        assert_all_ok(check.head_and_404(img, s.host, s.port))
        assert s.machine.powerdown(90)
