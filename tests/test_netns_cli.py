"""`python -m appliance serve` refuses what it cannot serve on, with a clear
message on stderr and exit status 2, before touching the network."""
import os
import subprocess
import sys

import pytest

from vm import netns

from .test_netns_serve import ROOT, SITE, store  # noqa: F401

pytestmark = pytest.mark.netns


def serve(ns, *args):
    return ns.run([sys.executable, "-m", "appliance", "serve", *args], check=False, cwd=ROOT, timeout=60)


@pytest.fixture(scope="module")
def link():
    with netns.pair(subnet=120) as lk:
        yield lk


def test_refuses_interface_with_kernel_ipv4_address(link, store):  # noqa: F811
    r = serve(link.client, "--store", store, "--iface", link.client_if, "--ip", "198.18.120.9/24")
    assert r.returncode == 2
    assert "has the kernel IPv4 address 198.18.120.2" in r.stderr
    assert "HABOOB-READY" not in r.stdout


def test_refuses_missing_interface(link, store):  # noqa: F811
    r = serve(link.server, "--store", store, "--iface", "hbnosuch0", "--ip", "198.18.120.1/24")
    assert r.returncode == 2
    assert "'hbnosuch0' does not exist" in r.stderr


def test_refuses_interface_that_is_down(store):  # noqa: F811
    with netns.pair(subnet=121) as lk:
        netns.ip("link", "set", lk.server_if, "down", ns=lk.server.name)
        r = serve(lk.server, "--store", store, "--iface", lk.server_if, "--ip", "198.18.121.1/24")
    assert r.returncode == 2
    assert f"'{lk.server_if}' is down" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--ip", "198.18.120.1"], "needs a prefix length"),
    (["--ip", "198.18.120.300/24"], "is not an IPv4 address"),
    (["--ip", "198.18.120.1/24", "--gateway", "198.18.99.1"], "is not inside 198.18.120.0/24"),
    (["--ip", "198.18.120.1/24", "--mac", "02:00:00"], "bad MAC address"),
    (["--ip", "198.18.120.1/24", "--workers", "0"], "--workers must be at least 1"),
    (["--ip", "dhcp", "--gateway", "198.18.120.254"], "--gateway comes from the DHCP server"),
    (["--ip", "dhcp", "--hostname", "a b"], "is not a host name"),
])
def test_refuses_bad_arguments(link, store, args, message):  # noqa: F811
    r = serve(link.server, "--store", store, "--iface", link.server_if, *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_refuses_site_and_store_together_or_neither(link, store):  # noqa: F811
    base = ["--iface", link.server_if, "--ip", "198.18.120.1/24"]
    for extra in (["--site", SITE, "--store", store], []):
        r = serve(link.server, *extra, *base)
        assert r.returncode == 2
        assert "exactly one of --site DIR or --store FILE" in r.stderr


def test_refuses_corrupt_store(link, tmp_path):
    bad = tmp_path / "bad.store"
    bad.write_bytes(b"not a store at all" * 100)
    r = serve(link.server, "--store", str(bad), "--iface", link.server_if, "--ip", "198.18.120.1/24")
    assert r.returncode == 2
    assert f"--store {bad}:" in r.stderr


def test_site_is_compiled_to_a_temporary_store_and_served(link, tmp_path):
    import json
    import signal
    tmp = tmp_path / "tmp"                     # private TMPDIR: other runs may use /tmp at the same time
    tmp.mkdir()
    proc = link.server.popen([sys.executable, "-m", "appliance", "serve", "--site", SITE, "--iface",
                              link.server_if, "--ip", "198.18.120.1/24"], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("HABOOB-READY "), proc.stderr.read() if proc.poll() is not None else line
        during = [p.name for p in tmp.iterdir()]
        r = link.client.run(["curl", "-sS", "--max-time", "10", "http://198.18.120.1/robots.txt"], text=False)
        with open(os.path.join(SITE, "robots.txt"), "rb") as fh:
            assert r.stdout == fh.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    counters = json.loads(out.strip().splitlines()[-1].split(" ", 1)[1])
    assert counters["http_replies"] == 1
    assert proc.returncode == 0
    assert len(during) == 1 and during[0].startswith("haboob-serve-")   # the temporary store...
    assert not list(tmp.iterdir())                                        # ...is gone after
