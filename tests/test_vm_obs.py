"""In a VM: /metrics and the access log of the example image through `vm boot`'s
forwarding (user networking), and the ACPI power-off path draining before it stops."""
import json
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import image_support as sup
from vm.image import Image
from vm.qemu import Options
from vm.session import session

pytestmark = pytest.mark.vm


def test_metrics_and_access_log_through_vm_boot_forwarding():
    image = Image.load(sup.build())
    opts = Options(net="user", metrics_port=9100, append=["haboob.log=console"])
    with session(image, opts) as s:
        ready = s.machine.wait_ready(300)
        assert ready["metrics_port"] == 9100
        with urllib.request.urlopen(f"{s.base_url}/", timeout=30) as r:
            assert r.status == 200
        time.sleep(1.5)                                   # the metrics text is cached for 1 s
        murl = f"http://127.0.0.1:{opts.metrics_hostport}"
        with urllib.request.urlopen(murl + "/metrics", timeout=30) as r:
            fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        ok = [x.value for x in fams["haboob_http_responses"].samples if x.labels.get("code") == "2xx"]
        assert sum(ok) >= 1, ok
        info = fams["haboob_build_info"].samples[0].labels
        assert info["kernel"] == image.manifest["kernel"]["release"]
        with urllib.request.urlopen(murl + "/healthz", timeout=30) as r:
            assert r.status == 200 and r.read() == b"ok\n"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            s.machine.poll_console()
            if any('"GET / HTTP/1.1" 200 ' in ln for ln in s.machine.lines):
                break
            time.sleep(0.2)
        line = next(ln for ln in s.machine.lines if '"GET / HTTP/1.1" 200 ' in ln)
        assert line.startswith("198.18.0.") and " variant=" in line
        assert s.machine.powerdown(60)                    # ACPI power button: drain, then power off
        counters = [json.loads(ln.split(" ", 1)[1]) for ln in s.machine.lines if ln.startswith("HABOOB-COUNTERS ")]
        assert counters and counters[-1].get("drain_started", 0) >= 1, counters
