"""The whole site through a lossy, reordering, duplicating link (vm/impair.py).

    client ns --veth-- middle ns (python -m vm.impair) --veth-- server ns

5% loss, 5% reordering, 2% duplication of IPv4 frames in both directions,
seeded. wget --mirror must still get every file byte-exact, and the
server's counters must show that TCP recovered (retransmissions), which is
the point of the exercise. The forwarder cuts the server's GSO super-frames
into wire segments before impairing them, so loss hits single segments.
"""
import contextlib
import json
import signal
import subprocess
import sys

import pytest

from vm import netns

from .test_netns_serve import ROOT, assert_mirror_exact, mirror, running_server, store  # noqa: F401

pytestmark = pytest.mark.netns


class _Link:
    def __init__(self, server, client, server_if, client_if, server_ip, client_ip):
        self.server, self.client = server, client
        self.server_if, self.client_if = server_if, client_if
        self.server_ip, self.client_ip = server_ip, client_ip


@contextlib.contextmanager
def impaired_link(subnet: int, loss: float, reorder: float, dup: float, seed: int):
    server_ip, client_ip = f"198.18.{subnet}.1", f"198.18.{subnet}.2"
    with netns.namespace("s") as s, netns.namespace("m") as m, netns.namespace("c") as c, \
            netns.veth(s, m) as (sif, m1), netns.veth(m, c, None, f"{client_ip}/24") as (m2, cif):
        fwd = m.popen([sys.executable, "-m", "vm.impair", "--a", m1, "--b", m2, "--loss", str(loss),
                       "--reorder", str(reorder), "--dup", str(dup), "--seed", str(seed)],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        stats = {}
        try:
            line = fwd.stdout.readline()
            assert line.startswith("IMPAIR-READY"), fwd.stderr.read()
            yield _Link(s, c, sif, cif, server_ip, client_ip), stats
        finally:
            fwd.send_signal(signal.SIGTERM)
            try:
                out, err = fwd.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                fwd.kill()
                out, err = fwd.communicate()
            lines = out.strip().splitlines()
            if lines and lines[-1].startswith("{"):
                stats.update(json.loads(lines[-1]))


def test_mirror_through_impaired_link_is_byte_exact(store, tmp_path):  # noqa: F811
    with impaired_link(110, loss=0.05, reorder=0.05, dup=0.02, seed=7) as (link, stats):
        with running_server(link.server, link.server_if, link.server_ip, store) as srv:
            got = mirror(link, str(tmp_path / "m"))
    assert_mirror_exact(got)
    assert stats["dropped"] > 0 and stats["reordered"] > 0 and stats["duplicated"] > 0, stats
    c = srv.counters
    print(json.dumps(stats), json.dumps(c))
    assert c.get("drop_internal_error", 0) == 0, c
    assert c.get("tcp_retransmits", 0) + c.get("tcp_fast_retransmit", 0) > 0, c
