"""The observability settings: one parser for `serve`, build.py and the kernel command line."""
import subprocess
import sys

import pytest

from appliance.init import kernel_args
from appliance.obs.options import DEFAULTS, from_kernel_args


def test_kernel_command_line_words_override_the_build():
    args = kernel_args("console=ttyS0 haboob.ip=198.18.0.1/24 haboob.log=syslog://198.18.0.2:5514 "
                       "haboob.log_format=json haboob.log_sample=10 haboob.metrics=9100 "
                       "haboob.metrics_allow=198.18.0.0/15 haboob.drain=3")
    s = from_kernel_args(args, {"access_log": "console", "metrics_port": 9200})
    assert s == dict(DEFAULTS, access_log="syslog://198.18.0.2:5514", log_format="json", log_sample=10,
                     metrics_port=9100, metrics_allow="198.18.0.0/15", drain=3.0)
    assert from_kernel_args({}, {"access_log": "console"})["access_log"] == "console"


@pytest.mark.parametrize("word, what", [
    ("haboob.log=syslog://nowhere", "'nowhere' is not an IPv4 address"),
    ("haboob.log=file", "want off, console or syslog"),
    ("haboob.log_sample=0", "log sample"),
    ("haboob.metrics=80", "not 80"),
    ("haboob.metrics_allow=10.0.0.0/33", "metrics allow prefix '10.0.0.0/33'"),
    ("haboob.log_format=xml", "log format"),
])
def test_bad_values_are_named(word, what):
    with pytest.raises(ValueError, match=what.replace("(", r"\(")):
        from_kernel_args(kernel_args(word))


def test_serve_and_build_refuse_bad_values_before_doing_anything(tmp_path):
    r = subprocess.run([sys.executable, "-m", "appliance", "serve", "--store", "x", "--iface", "lo", "--ip",
                        "198.18.0.1/24", "--metrics-allow", "bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "metrics allow prefix 'bogus'" in r.stderr
    r = subprocess.run([sys.executable, "build.py", "--site", str(tmp_path), "--out", str(tmp_path / "o"),
                        "--access-log", "syslog://1.2.3"], capture_output=True, text=True)
    assert r.returncode != 0 and "'1.2.3' is not an IPv4 address" in r.stderr
    assert not (tmp_path / "o").exists()
