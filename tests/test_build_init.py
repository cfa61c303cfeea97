"""PID 1's host-testable parts: the kernel command line and its checks."""
import os

import pytest

from appliance import init

CONFIG = {"ip": "198.18.0.1/24", "gateway": None, "port": 80, "store": "/haboob/site.store"}


def test_kernel_args_only_haboob_words():
    args = init.kernel_args("console=ttyS0 quiet haboob.ip=198.18.0.15/24 haboob.gw=198.18.0.2 "
                            "haboob.mac=52:54:00:AA:BB:CC haboob.flag ip=1.2.3.4")
    assert args == {"ip": "198.18.0.15/24", "gw": "198.18.0.2", "mac": "52:54:00:AA:BB:CC"}


def test_settings_defaults_from_the_build():
    s = init.settings(CONFIG, {})
    assert s["ip"] == "198.18.0.1/24" and s["gateway"] is None and s["mac"] is None
    assert s["workers"] == (os.cpu_count() or 1) and s["port"] == 80


def test_settings_command_line_wins():
    s = init.settings(CONFIG, {"ip": "198.18.0.15/24", "gw": "198.18.0.2", "mac": "52:54:00:AA:BB:CC",
                               "workers": "3"})
    assert (s["ip"], s["gateway"], s["mac"], s["workers"]) == ("198.18.0.15/24", "198.18.0.2",
                                                                "52:54:00:aa:bb:cc", 3)


@pytest.mark.parametrize("args,words", [
    ({"ip": "198.18.0.300/24"}, "haboob.ip="),
    ({"gw": "gateway"}, "haboob.gw="),
    ({"mac": "52:54:00"}, "haboob.mac="),
    ({"workers": "0"}, "haboob.workers="),
    ({"workers": "many"}, "haboob.workers="),
])
def test_settings_refuse_bad_values(args, words):
    with pytest.raises(init.Fatal, match=words):
        init.settings(CONFIG, args)


def test_counters_line():
    class C(dict):
        def as_dict(self):
            return dict(sorted(self.items()))
    assert init.counters_line(C(b=2, a=1)) == 'HABOOB-COUNTERS {"a": 1, "b": 2}'
    assert init.counters_line(None) == "HABOOB-COUNTERS {}"


def test_settings_dhcp_no_gateway_and_the_image_name_as_host_name():
    s = init.settings(dict(CONFIG, ip="dhcp", name="www"), {})
    assert (s["ip"], s["gateway"], s["workers"], s["hostname"]) == ("dhcp", None, os.cpu_count() or 1, "www")
    s = init.settings(CONFIG, {"ip": "dhcp", "workers": "1", "hostname": "bad name"})
    assert s["ip"] == "dhcp" and s["hostname"] is None
    with pytest.raises(init.Fatal, match="haboob.gw=198.18.0.2 needs a static"):
        init.settings(CONFIG, {"ip": "dhcp", "gw": "198.18.0.2"})
    assert init.settings(CONFIG, {"ip": "dhcp", "workers": "4"})["workers"] == 4
    # IPv6 with several workers (the parent runs its control plane, stack/lease.py)
    s = init.settings(CONFIG, {"ip": "dhcp", "ip6": "auto", "workers": "4"})
    assert (s["ip6"], s["workers"]) == ("auto", 4)
    # a static address on the command line overrides a dhcp build
    s = init.settings(dict(CONFIG, ip="dhcp"), {"ip": "198.18.0.9/24"})
    assert s["ip"] == "198.18.0.9/24"


def test_settings_ip6():
    assert init.settings(CONFIG, {})["ip6"] == "auto"                   # the default
    assert init.settings(dict(CONFIG, ip6="off"), {})["ip6"] == "off"   # built with --ip6 off
    assert init.settings(dict(CONFIG, ip6="off"), {"ip6": "auto"})["ip6"] == "auto"
    s = init.settings(CONFIG, {"ip6": "off", "workers": "2"})
    assert (s["ip6"], s["workers"], s["ip"]) == ("off", 2, "198.18.0.1/24")
    with pytest.raises(init.Fatal, match="haboob.ip6='on'"):
        init.settings(CONFIG, {"ip6": "on"})
    with pytest.raises(init.Fatal, match="haboob.ip="):
        init.settings(CONFIG, {"ip6": "auto", "ip": "nonsense"})


def test_settings_static_ip6_and_its_gateway():
    from appliance.stack.ipv6 import Static6
    s = init.settings(CONFIG, {"ip6": "2001:2:0:1:0::10/64", "gw6": "fe80::1"})
    assert isinstance(s["ip6"], Static6) and str(s["ip6"]) == "2001:2:0:1::10/64"
    assert s["ip6"].gateway == bytes.fromhex("fe80" + "0" * 27 + "1")
    # the build's gateway goes with the build's static address, not with another one
    built = dict(CONFIG, ip6="2001:2:0:1::10/64", gateway6="2001:2:0:1::1")
    assert init.settings(built, {})["ip6"].gateway is not None
    assert init.settings(built, {"ip6": "2001:2:0:9::10/64"})["ip6"].gateway is None
    assert init.settings(built, {"ip6": "auto"})["ip6"] == "auto"
    for args, words in (({"ip6": "fe80::10/64"}, "haboob.ip6='fe80::10/64': fe80::10 is link-local"),
                        ({"ip6": "2001:2:0:1::10/64", "gw6": "2001:2:0:7::1"},
                         "haboob.gw6='2001:2:0:7::1' is neither link-local"),
                        ({"ip6": "auto", "gw6": "fe80::1"}, "haboob.gw6 needs a static haboob.ip6=ADDR/PREFIX")):
        with pytest.raises(init.Fatal) as e:
            init.settings(CONFIG, args)
        assert words in str(e.value)


def test_kernel_ipv6_off_writes_all_and_default(tmp_path):
    for n in ("all", "default"):
        (tmp_path / n).mkdir()
        (tmp_path / n / "disable_ipv6").write_text("0\n")
    assert init.kernel_ipv6_off(str(tmp_path))
    assert [(tmp_path / n / "disable_ipv6").read_text() for n in ("all", "default")] == ["1\n", "1\n"]
    assert not init.kernel_ipv6_off(str(tmp_path / "none"))      # a kernel without IPv6: nothing to do
