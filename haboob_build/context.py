"""The build context: options, folders, the image tree, the manifest facts,
the build's output (log lines, progress), and the one wrapper through which
every subprocess runs.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BuildError
from .tree import Tree


def cache_root() -> Path:
    """~/.cache/haboob (or $XDG_CACHE_HOME/haboob); HABOOB_CACHE overrides, for tests."""
    if os.environ.get("HABOOB_CACHE"):
        return Path(os.environ["HABOOB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "haboob"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class Options:
    site: Path
    name: str
    out: Path
    ip: str                      # CIDR, e.g. 198.18.0.1/24
    gateway: str | None
    mss: int
    kernel: Path | None          # a vmlinuz with its modules directory, or None for Debian's
    memory: int                  # MB the guest should get by default
    compress_level: int = 19
    modules: Path | None = None  # the modules folder of --kernel (else found beside it)
    quiet: bool = False
    formats: tuple = ()          # deploy formats (haboob_build.formats): iso, img, pxe, qcow2
    nic_drivers: tuple = ("virtio_net",)   # NIC drivers (haboob_build.drivers); build.py defaults to all
    observe: dict = field(default_factory=dict)   # access log / metrics / drain (appliance/obs/options.py)
    tls_cert: Path | None = None  # HTTPS: the certificate chain (PEM) ...
    tls_key: Path | None = None   # ... and its key, copied into the image
    tls_self_signed: tuple = ()   # or names for a self-signed certificate made at build time (development)
    http: str = "redirect"        # port 80 beside HTTPS: redirect | serve | off
    hsts: int = 0                 # Strict-Transport-Security max-age on HTTPS responses (0: none)
    ip6: str = "auto"             # auto | off | ADDR/PREFIX (haboob.ip6=)
    gateway6: str | None = None   # with a static ip6: the IPv6 default router (haboob.gw6=)


@dataclass
class Context:
    options: Options
    work: Path                   # temporary output folder, renamed to options.out at the end
    scratch: Path                # temporary scratch folder (deleted at the end)
    cache: Path = field(default_factory=cache_root)
    tree: Tree = field(default_factory=Tree)
    epoch: int = 0               # SOURCE_DATE_EPOCH
    facts: dict = field(default_factory=dict)     # what the manifest reports
    inputs: dict = field(default_factory=dict)    # name -> {"path", "size", "sha256"}
    sizes: dict = field(default_factory=dict)     # image part -> bytes (uncompressed)
    started: float = field(default_factory=time.monotonic)

    def log(self, msg: str) -> None:
        """One plain line on stderr, timed from the build's start; nothing with --quiet."""
        if not self.options.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def progress(self, label: str):
        """A progress callback for a long step (the content compiler's), used as a
        context manager: a bar on stderr when it is a terminal, else a few lines
        through log() with the counts; nothing with --quiet (see CompileProgress)."""
        from appliance.content.cli import CompileProgress
        quiet = self.options.quiet
        return CompileProgress(label, stream=sys.stderr, line=self.log, plain=not quiet,
                               tty=False if quiet else None)

    def add_input(self, name: str, path: Path) -> None:
        path = Path(path)
        self.inputs[name] = {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}

    def run(self, argv: list[str], *, what: str, capture: bool = True, env: dict | None = None,
            cwd: Path | None = None, stdin=None, input: bytes | None = None,
            clean_env: bool = False) -> subprocess.CompletedProcess:
        """Run one tool. Failure (missing tool or non-zero exit) becomes a
        BuildError naming `what` failed and the tool's last stderr line.
        env adds variables; clean_env starts from PATH alone."""
        full_env = None
        if env is not None or clean_env:
            full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")} if clean_env else dict(os.environ)
            full_env.update(env or {})
        try:
            proc = subprocess.run([str(a) for a in argv], capture_output=capture, env=full_env,
                                  cwd=cwd, stdin=stdin, input=input)
        except FileNotFoundError:
            raise BuildError(f"{what}: the tool {argv[0]!r} is not installed") from None
        if proc.returncode != 0:
            err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
            tail = err[-1] if err else f"exit status {proc.returncode}"
            raise BuildError(f"{what} failed ({shlex.join(str(a) for a in argv[:3])} ...): {tail}")
        return proc
