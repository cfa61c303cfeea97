"""vm.netns: every object it makes exists inside the block and is gone after,
also when the block raises."""
import subprocess

import pytest

from vm import netns

pytestmark = pytest.mark.netns


def _namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_pair_links_client_to_server_side_and_cleans_up():
    with netns.pair(subnet=7) as link:
        assert {link.server.name, link.client.name} <= _namespaces()
        addrs = netns.ip("-4", "addr", "show", "dev", link.client_if, ns=link.client.name).stdout
        assert "198.18.7.2/24" in addrs
        # The appliance side must carry no kernel IPv4 address.
        addrs = netns.ip("-4", "addr", "show", "dev", link.server_if, ns=link.server.name).stdout
        assert "inet " not in addrs
        names = (link.server.name, link.client.name)
    assert not set(names) & _namespaces()


def test_namespace_removed_when_body_raises():
    with pytest.raises(RuntimeError):
        with netns.namespace("x") as ns:
            name = ns.name
            raise RuntimeError("boom")
    assert name not in _namespaces()


def test_tap_in_namespace():
    with netns.namespace() as ns, netns.tap(ns, "198.18.9.1/24") as name:
        out = netns.ip("-4", "addr", "show", "dev", name, ns=ns.name).stdout
        assert "198.18.9.1/24" in out


def test_unique_names_fit_ifnamsiz():
    assert all(len(netns.unique("abc")) <= 15 for _ in range(50))
