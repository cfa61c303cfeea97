"""Boot the example image under QEMU and check it over its NIC: every URL
byte-exact (Python and curl), HEAD, 404, counters on request, a pcap from
--capture, a clean stop via QMP; on user networking and on a tap inside a
namespace (with ping). IPv6 (haboob.ip6=auto) shares those boots: on user
networking the guest takes a SLAAC address from slirp's advertisements
(QEMU 7.2 forwards no IPv6 port, so that is all the host can check); on the
tap the namespace's dnsmasq advertises 2001:2:0:1::/64 beside its DHCPv4,
and curl -6, http.client and ping -6 reach the guest's SLAAC address."""
import ipaddress
import json
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
    with session(image, Options(net="user", capture=pcap, ip6="auto")) as s:
        ready = s.machine.wait_ready(300)
        assert ready["urls"] == len(image.urls) == 20
        assert ready["ip"] == "198.18.0.15" and ready["port"] == 80
        assert ready["driver"] == "virtio_net" and ready["mac"] == "52:54:00:12:34:56"
        assert ready["ms_since_boot"] > 0
        assert ready["syn_gate"] == "kernel", ready      # Debian's kernel loads the SYN ring's eBPF gate
        assert_all_ok(check.fetch_all(image, s.host, s.port, site=sup.EXAMPLE))
        assert_all_ok(check.curl_all(image, s.base_url, site=sup.EXAMPLE))
        # slirp's router advertisement (ipv6-net=2001:2:0:1::/64): a SLAAC address after DAD
        a6 = s.wait_ip6(60)
        assert a6 and ipaddress.IPv6Address(a6) in ipaddress.IPv6Network("2001:2:0:1::/64"), s.machine.tail()
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
    from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6ND_RA, IPv6
    assert any(p.haslayer(ICMPv6ND_RA) and p[IPv6].src.startswith("fe80::") for p in pkts)    # slirp's
    assert any(p.haslayer(ICMPv6ND_NS) and p[IPv6].src == "::" and p[ICMPv6ND_NS].tgt == a6 for p in pkts)  # DAD


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the namespace and tap")
def test_tap_in_namespace_with_dhcp(image):
    # the guest asks DHCP (the last haboob.ip= counts): dnsmasq in the namespace answers
    # and IPv6 by SLAAC from the namespace's router advertisements (dnsmasq --enable-ra)
    with session(image, Options(net="tap", append=["haboob.ip=dhcp"], ip6="auto")) as s:
        ns = s.ns.name
        ready = s.machine.wait_ready(300)
        (a,) = [x for x in ready["addresses"] if "ip" in x]
        assert (a["ip"], a["how"], a["server"], a["lease"]) == ("198.18.0.15", "dhcp", "198.18.0.2", 120)
        assert s.guest_ip == ready["ip"] == "198.18.0.15"
        assert_all_ok(s.call(check.fetch_all, image, s.host, s.port, sup.EXAMPLE))
        assert_all_ok(check.curl_all(image, s.base_url, site=sup.EXAMPLE, prefix=s.prefix))
        assert check.ping(s.guest_ip, prefix=s.prefix).ok
        a6 = s.wait_ip6(60)
        assert a6 and ipaddress.IPv6Address(a6) in ipaddress.IPv6Network("2001:2:0:1::/64"), s.machine.tail()
        ev = [json.loads(l.split("HABOOB-ADDRESS ", 1)[1]) for l in s.machine.lines if "HABOOB-ADDRESS " in l]
        ev += [x for x in ready["addresses"] if "ip6" in x]
        assert {"event": "acquired", "ip6": a6, "prefix": 64, "how": "slaac"} in ev, ev
        # every URL over IPv6, byte for byte: Python's http.client and curl -6 from the namespace
        assert_all_ok(s.call(check.fetch_all, image, a6, 80, sup.EXAMPLE))
        assert s.url6 == f"http://[{a6}]"
        curl6 = check.curl_all(image, s.url6, site=sup.EXAMPLE, prefix=s.prefix)
        assert_all_ok(curl6)
        assert len(curl6) == len(image.urls)
        p = subprocess.run(s.prefix + ["curl", "-6", "-gsS", "-o", "/dev/null", "-w", "%{remote_ip}",
                                       f"{s.url6}/"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout == a6, p.stderr
        assert check.ping(a6, prefix=s.prefix).ok
        assert s.machine.powerdown(90)
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_vm_test_command_passes(image):
    # as root over a tap with IPv6 on: `vm test` checks every URL over IPv6 as well
    six = os.geteuid() == 0
    proc = subprocess.run([sys.executable, "-m", "vm", "test", str(image.folder), "--site", str(sup.EXAMPLE)]
                          + (["--net", "tap", "--ip6", "auto"] if six else []),
                          capture_output=True, text=True, cwd=sup.REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "boot to ready:" in proc.stdout and "FAIL" not in proc.stdout
    if six:
        lines = proc.stdout.splitlines()
        assert any(l.startswith("ok   IPv6 address: 2001:2:0:1:") for l in lines), proc.stdout
        got6 = [l for l in lines if l.startswith("ok   GET /") and " (IPv6): status 200, " in l]
        assert len(got6) == len(image.urls), proc.stdout
        for what in ("keep-alive: every URL on one connection (IPv6)", "HEAD / (IPv6)", "-> 404 (IPv6)"):
            assert any(l.startswith("ok   ") and what in l for l in lines), (what, proc.stdout)
        assert sum(l.startswith("ok   ping 2001:2:0:1:") for l in lines) == 1, proc.stdout


# `vm boot` printing its URL and stopping on signals: tests/test_vm_signals.py


def test_only_the_nic_driver_for_the_device_present_is_loaded():
    img = Image.load(sup.build("twodrivers", nic_drivers=("virtio_net", "e1000")))
    with session(img, Options(net="user", nic="e1000")) as s:
        ready = s.machine.wait_ready(300)
        assert ready["driver"] == "e1000" and ready["drivers_loaded"] == ["e1000"]
        assert_all_ok(check.head_and_404(img, s.host, s.port))
        assert s.machine.powerdown(90)
