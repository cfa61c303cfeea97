"""The observability settings, one definition for `serve`, build.py and the kernel command line.

Theory of operation. A settings dict (the `observe` argument of
appliance.stack.serve.serve) has the keys of DEFAULTS. `check()` validates
one and names what is wrong (ValueError); `from_kernel_args()` reads the
`haboob.KEY=` words (appliance/init.py), where KEY is the name in KERNEL.

Defaults: the access log is off (serving does exactly what it did without
one); the metrics port is off (0): an appliance exposes port 80 only unless
its operator asks for more, and then the conventional choice is a port of
the 9100 range (`--metrics-port 9100`) limited with `--metrics-allow`. The
drain timeout is 10 s: within the 30 s an orchestrator waits after SIGTERM
(Kubernetes' default grace period) and longer than a health check interval.
"""
from __future__ import annotations

from .accesslog import parse_destination

__all__ = ["DEFAULTS", "KERNEL", "check", "from_kernel_args"]

DEFAULTS = {"access_log": "off", "log_format": "combined", "log_sample": 1, "syslog_framing": "rfc5424",
            "metrics_port": 0, "metrics_allow": "", "drain": 10.0}
# kernel command line word (haboob.KEY=) -> settings key
KERNEL = {"log": "access_log", "log_format": "log_format", "log_sample": "log_sample",
          "log_framing": "syslog_framing", "metrics": "metrics_port", "metrics_allow": "metrics_allow",
          "drain": "drain"}


def check(s: dict) -> dict:
    """A complete, validated copy of settings `s` (missing keys from DEFAULTS)."""
    from . import parse_allow
    out = dict(DEFAULTS)
    out.update({k: v for k, v in s.items() if v is not None})
    parse_destination(str(out["access_log"]))
    if out["log_format"] not in ("combined", "json"):
        raise ValueError(f"log format {out['log_format']!r}: want combined or json")
    if out["syslog_framing"] not in ("rfc5424", "rfc3164"):
        raise ValueError(f"syslog framing {out['syslog_framing']!r}: want rfc5424 or rfc3164")
    try:
        out["log_sample"] = int(out["log_sample"])
        if out["log_sample"] < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"log sample {s.get('log_sample')!r}: want a whole number >= 1 (1 in N)") from None
    try:
        out["metrics_port"] = int(out["metrics_port"])
        if not 0 <= out["metrics_port"] < 65536 or out["metrics_port"] == 80:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"metrics port {s.get('metrics_port')!r}: want 0 (off) or 1..65535, not 80 (the site's)") from None
    parse_allow(out["metrics_allow"])
    try:
        out["drain"] = float(out["drain"])
        if not 0 <= out["drain"] <= 3600:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"drain timeout {s.get('drain')!r}: want seconds, 0..3600 (0: no drain)") from None
    return out


def from_kernel_args(args: dict, base: dict | None = None) -> dict:
    """Settings from `haboob.KEY=VALUE` words ({KEY: VALUE}) over `base` (the build's)."""
    s = dict(base or {})
    for k, key in KERNEL.items():
        if k in args:
            s[key] = args[k]
    return check(s)
