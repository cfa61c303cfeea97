"""The build, as a straight list of named steps over one Context.

Each step is `def step(ctx) -> None`; `STEPS` is the order. To add a step
(a deploy format, another driver set) insert a (name, function) pair;
the deploy formats (`formats.step`, cloud ones included) run after "initramfs".
Output (stderr, none with --quiet): each step announces itself on a line
("step 5/10 content"); a long one reports its progress through
`ctx.progress(label)` (a bar on a terminal, a few lines elsewhere).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
from pathlib import Path

from . import drivers, formats
from . import kernel as kernel_mod
from . import runtime
from .context import Context, sha256_file
from .errors import BuildError

ROOT = Path(__file__).resolve().parent.parent          # the repository (holds appliance/)
STORE = "/haboob/site.store"
CONFIG = "/etc/haboob/config.json"
MODULES = "/etc/haboob/modules"
TLS_CERT = "/haboob/tls/fullchain.pem"
TLS_KEY = "/haboob/tls/key.pem"
INIT = f"""#!/usr/bin/{runtime.PY} -IS
# Haboob PID 1: the kernel runs this script (binfmt_script); -I -S: no
# environment, no site. The appliance code is compiled under {runtime.APPDIR}.
import sys
sys.path.insert(0, "{runtime.APPDIR}")
from appliance.init import main
main()
"""


def parse_ip(cidr: str) -> ipaddress.IPv4Interface | None:
    """The static address of --ip, or None for "dhcp"."""
    if cidr == "dhcp":
        return None
    try:
        iface = ipaddress.IPv4Interface(cidr)
    except ValueError:
        raise BuildError(f"--ip {cidr!r} is not an IPv4 address with a prefix like 198.18.0.1/24") from None
    if "/" not in cidr:
        raise BuildError(f"--ip {cidr!r} needs a prefix length, like 198.18.0.1/24")
    net = iface.network
    if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        raise BuildError(f"--ip {cidr}: {iface.ip} is the network's "
                         f"{'network' if iface.ip == net.network_address else 'broadcast'} address")
    if iface.ip.is_multicast or iface.ip.is_unspecified or iface.ip.is_loopback:
        raise BuildError(f"--ip {cidr}: {iface.ip} cannot be a host address")
    return iface


def parse_ip6(o) -> object:
    """"off", "auto" or the appliance's ipv6.Static6 for --ip6/--gateway6; BuildError if bad."""
    from appliance.stack.ipv6 import ip6_mode
    try:
        return ip6_mode(o.ip6, o.gateway6)
    except ValueError as e:
        raise BuildError(str(e)) from None


def check_inputs(ctx: Context) -> None:
    o = ctx.options
    if not o.site.exists():
        raise BuildError(f"--site {o.site}: no such folder")
    if not o.site.is_dir():
        raise BuildError(f"--site {o.site}: not a folder")
    iface = parse_ip(o.ip)
    if o.gateway and iface is None:
        raise BuildError("--gateway needs a static --ip ADDR/PREFIX (with --ip dhcp the DHCP server gives it)")
    if o.gateway:
        try:
            gw = ipaddress.IPv4Address(o.gateway)
        except ValueError:
            raise BuildError(f"--gateway {o.gateway!r} is not an IPv4 address") from None
        if gw not in iface.network or gw == iface.ip:
            raise BuildError(f"--gateway {gw} is not another host on {iface.network}")
    parse_ip6(o)
    if not 536 <= o.mss <= 9000:
        raise BuildError(f"--mss {o.mss} is out of range (536..9000)")
    if not 32 <= o.memory <= 1 << 20:
        raise BuildError(f"--memory {o.memory} MB is out of range (32..1048576)")
    sde = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if sde:
        try:
            ctx.epoch = int(sde)
        except ValueError:
            raise BuildError(f"SOURCE_DATE_EPOCH={sde!r} is not an integer") from None
    else:                                   # the newest input file: same inputs, same epoch
        mtimes = [int(p.stat().st_mtime) for p in o.site.rglob("*") if p.is_file()]
        ctx.epoch = max(mtimes, default=0)
    ctx.facts["source_date_epoch"] = ctx.epoch
    check_tls_options(o)


def check_tls_options(o) -> None:
    """HTTPS options: both files or neither, not with --tls-self-signed; the chain checked
    (appliance.stack.tls.check_chain: PEM, key matches, order, not expired)."""
    import time
    from appliance.stack.tls import TlsError, check_chain
    if bool(o.tls_cert) != bool(o.tls_key):
        raise BuildError("give both --tls-cert and --tls-key (or --tls-self-signed)")
    if o.tls_cert and o.tls_self_signed:
        raise BuildError("give either --tls-cert/--tls-key or --tls-self-signed, not both")
    on = bool(o.tls_cert or o.tls_self_signed)
    if o.http not in ("redirect", "serve", "off"):
        raise BuildError(f"--http {o.http!r}: use redirect, serve or off")
    if not on and (o.http != "redirect" or o.hsts):
        raise BuildError("--http and --hsts need HTTPS (--tls-cert/--tls-key or --tls-self-signed)")
    if not 0 <= o.hsts < 2 ** 31:
        raise BuildError(f"--hsts {o.hsts}: out of range")
    if o.tls_cert:
        try:
            info = check_chain(str(o.tls_cert), str(o.tls_key))
        except TlsError as e:
            raise BuildError(str(e)) from None
        if info["not_after_ts"] <= time.time():
            raise BuildError(f"certificate file {o.tls_cert}: expired on {info['not_after']}")


def packages(ctx: Context) -> None:
    """Look the Debian packages up in one apt-cache call (each call costs 1-2 s)."""
    from . import debs
    debs.resolve(ctx, ([kernel_mod.DEBIAN_META] if ctx.options.kernel is None else []) + runtime.PACKAGES)


def kernel(ctx: Context) -> None:
    k = kernel_mod.locate(ctx, ctx.options.modules)
    ctx.add_input("kernel", k.vmlinuz)
    always = kernel_mod.BUSES + kernel_mod.PLATFORM
    nic_roots = drivers.module_roots(list(ctx.options.nic_drivers))
    mods = kernel_mod.resolve(ctx, k, kernel_mod.BUSES + nic_roots + kernel_mod.PLATFORM
                              + kernel_mod.FILESYSTEMS + kernel_mod.STORAGE)
    also = drivers.match_also(list(ctx.options.nic_drivers))
    # One line per module, in load order: NAME PATH ROLE NEEDS [ALIAS...]. PID 1
    # loads the "always" ones, then only the NIC drivers whose modalias patterns
    # match a device present (loading every driver costs seconds under TCG),
    # each with what it needs.
    lines = []
    for name, data in mods:
        path = f"/usr/lib/modules/{k.release}/{name}.ko"
        ctx.tree.file(path, data, part="kernel-modules")
        role = ("always" if name in map(kernel_mod.norm, always) else
                "driver" if name in map(kernel_mod.norm, nic_roots) else
                "storage" if name in map(kernel_mod.norm, kernel_mod.STORAGE) else
                "fs" if name in map(kernel_mod.norm, kernel_mod.FILESYSTEMS) else "dep")
        words = [name, path, role, ",".join(k.needs.get(name, [])) or "-"]
        if role in ("driver", "storage"):
            words += k.aliases.get(name, [])
            for other in also.get(name, []):        # hv_netvsc: hv_vmbus's ACPI device selects it
                words += [a for a in k.aliases.get(kernel_mod.norm(other), []) if a not in words]
            if name in ("sd_mod", "sr_mod"):        # their SCSI devices appear only once AHCI runs
                words += [a for a in k.aliases.get("ahci", []) if a not in words]
        lines.append(" ".join(words))
    ctx.tree.file(MODULES, ("\n".join(lines) + "\n").encode(), part="base")
    shutil.copyfile(k.vmlinuz, ctx.work / "vmlinuz")
    ctx.facts["kernel"] = {"release": k.release, "package": k.package, "package_version": k.package_version,
                           "modules": [n for n, _ in mods]}
    ctx.sizes["kernel"] = (ctx.work / "vmlinuz").stat().st_size


def python_runtime(ctx: Context) -> None:
    ctx.facts["python"] = runtime.install(ctx, ROOT)


def content(ctx: Context) -> None:
    from appliance.content.compiler import CompileError, Options, compile_site, quote_path
    from appliance.content.store import Store
    out = ctx.scratch / "site.store"
    ctx.log(f"compiling {ctx.options.site}")
    try:
        with ctx.progress("content") as progress:
            res = compile_site(ctx.options.site, out, Options(mss=ctx.options.mss, source_date_epoch=ctx.epoch),
                               progress=progress if progress.active else None)
    except CompileError as e:
        raise BuildError(f"--site {ctx.options.site}: {e}") from None
    data = out.read_bytes()
    ctx.tree.file(STORE, data, part="content")
    urls = {}
    with Store.open(out) as store:
        for path in store.site.urls():
            r = store.site.resources[path]
            body = bytes(store.blob[r.body_off:r.body_off + r.size])
            urls[quote_path(path)] = {"file": r.file, "size": r.size,
                                      "sha256": hashlib.sha256(body).hexdigest(),
                                      "content_type": r.content_type.decode()}
    ctx.facts["content"] = {"urls": len(urls), "store_size": len(data),
                            "store_sha256": hashlib.sha256(data).hexdigest(),
                            "responses": res.responses, "files": res.files}
    ctx.facts["urls"] = urls


def tls(ctx: Context) -> None:
    """HTTPS: the certificate chain and key into the image (the key is the image's one
    secret: 0600, and the manifest records the certificate's fingerprint, never the key)."""
    import sys
    import time
    o = ctx.options
    if not (o.tls_cert or o.tls_self_signed):
        return
    from appliance.stack.tls import TlsError, check_chain
    if o.tls_self_signed:
        from appliance.stack.cli import self_signed
        try:
            crt, key = self_signed(list(o.tls_self_signed), str(ctx.scratch))
        except RuntimeError as e:
            raise BuildError(str(e)) from None
        print(f"build.py: warning: self-signed certificate for {', '.join(o.tls_self_signed)}: for development "
              f"only, not for production", file=sys.stderr)
    else:
        crt, key = str(o.tls_cert), str(o.tls_key)
    try:
        info = check_chain(crt, key)
    except TlsError as e:
        raise BuildError(str(e)) from None
    left = (info["not_after_ts"] - time.time()) / 86400
    if left < 30:
        print(f"build.py: warning: the certificate expires within 30 days ({info['not_after']}): renew it "
              f"(a configuration volume with tls/ replaces it without rebuilding: build.py config-volume)",
              file=sys.stderr)
    with open(crt, "rb") as f:
        ctx.tree.file(TLS_CERT, f.read(), 0o644, part="tls")
    with open(key, "rb") as f:
        ctx.tree.file(TLS_KEY, f.read(), 0o600, part="tls")
    if o.tls_self_signed:
        shutil.copyfile(crt, ctx.work / "selfsigned.crt")     # for clients to trust (not the key)
    ctx.facts["tls"] = {"names": info["names"], "not_after": info["not_after"], "chain": info["chain"],
                        "fingerprint_sha256": info["fingerprint_sha256"], "self_signed": bool(o.tls_self_signed),
                        "http": o.http, "hsts": o.hsts, "private_key_in_image": True}


def base(ctx: Context) -> None:
    t, o = ctx.tree, ctx.options
    for d in ("/proc", "/sys", "/dev", "/run", "/tmp"):
        t.dir(d)
    # Nodes that must exist before devtmpfs is mounted: CPython reads
    # /dev/urandom while starting, before PID 1 can mount anything.
    t.chardev("/dev/console", 5, 1)
    t.chardev("/dev/null", 1, 3, 0o666)
    t.chardev("/dev/random", 1, 8, 0o444)
    t.chardev("/dev/urandom", 1, 9, 0o444)
    t.symlink("/lib", "usr/lib")
    t.symlink("/lib64", "usr/lib64")
    t.file("/init", INIT.encode(), 0o755, part="appliance")
    iface = parse_ip(o.ip)
    config = {"ip": str(iface) if iface else "dhcp", "gateway": o.gateway, "mss": o.mss, "port": 80,
              "store": STORE, "modules": MODULES, "name": o.name}
    config["ip6"], config["gateway6"] = str(parse_ip6(o)), o.gateway6    # auto by default, off said so
    # the image's access log / metrics / drain defaults (haboob.log= ... on the command line win),
    # always complete, so that a build from build.py and one from Options() agree byte for byte
    from appliance.obs.options import check as check_observe
    config["observe"] = check_observe(o.observe or {})
    if "tls" in ctx.facts:
        config["tls"] = {"cert": TLS_CERT, "key": TLS_KEY, "http": o.http, "hsts": o.hsts}
    t.file(CONFIG, (json.dumps(config, indent=1, sort_keys=True) + "\n").encode(), part="base")
    ctx.facts["config"] = config


def cmdline(ctx: Context) -> None:
    o = ctx.options
    parts = ["console=ttyS0", "quiet", "panic=-1", f"haboob.ip={parse_ip(o.ip) or 'dhcp'}"]
    if o.gateway:
        parts.append(f"haboob.gw={o.gateway}")
    parts.append(f"haboob.ip6={parse_ip6(o)}")
    if o.gateway6:
        parts.append(f"haboob.gw6={o.gateway6}")
    (ctx.work / "cmdline").write_text(" ".join(parts) + "\n")


def initramfs(ctx: Context) -> None:
    raw = ctx.tree.cpio(ctx.epoch)
    ctx.sizes.update(ctx.tree.sizes())
    ctx.log(f"compressing the initramfs ({len(raw) / 1e6:.1f} MB, zstd -{ctx.options.compress_level})")
    out = ctx.work / "initrd.img"
    raw_path = ctx.scratch / "initrd.cpio"
    raw_path.write_bytes(raw)
    # One thread: the frame layout, and so the bytes, never depend on the host's cores.
    ctx.run(["zstd", "-q", "-f", f"-{ctx.options.compress_level}", "-T1", "--no-progress",
             raw_path, "-o", out], what="compressing the initramfs")
    ctx.facts["initramfs"] = {"cpio_size": len(raw), "entries": len(ctx.tree.entries)}


def manifest(ctx: Context) -> None:
    o = ctx.options
    artifacts = {}
    for name in ("vmlinuz", "initrd.img", "cmdline"):
        p = ctx.work / name
        artifacts[name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    site_files = {}
    for p in sorted(o.site.rglob("*")):
        if p.is_file():
            rel = p.relative_to(o.site).as_posix()
            site_files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    doc = {
        "format": "haboob-image/1",
        "name": o.name,
        "artifacts": artifacts,
        "inputs": dict(sorted(ctx.inputs.items())),
        "site_files": site_files,
        "options": {"ip": o.ip, "gateway": o.gateway, "ip6": o.ip6, "gateway6": o.gateway6,
                    "mss": o.mss, "memory": o.memory,
                    "kernel": "debian" if o.kernel is None else "custom"},
        "sizes": dict(sorted(ctx.sizes.items())),
        **{k: v for k, v in sorted(ctx.facts.items())},
    }
    # Host paths differ between machines but are not content: keep them out.
    for v in doc["inputs"].values():
        v["path"] = os.path.basename(v["path"])
    (ctx.work / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


STEPS = [
    ("check-inputs", check_inputs),
    ("packages", packages),
    ("kernel", kernel),
    ("python-runtime", python_runtime),
    ("content", content),
    ("tls", tls),
    ("base", base),
    ("cmdline", cmdline),
    ("initramfs", initramfs),
    ("formats", formats.step),          # deploy formats: NAME.iso, NAME.img, pxe/, NAME.qcow2
    ("manifest", manifest),
]


def build(ctx: Context, steps=STEPS) -> None:
    for i, (name, step) in enumerate(steps, 1):
        ctx.log(f"step {i}/{len(steps)} {name}")
        step(ctx)


def build_image(opts, steps=STEPS, scratch_dir: str | None = None) -> Context:
    """Run the steps into a temporary folder beside opts.out, then rename it
    into place (replacing an older image). Nothing is left behind on error."""
    import tempfile
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: exists and is not a folder")
    check_inputs(Context(options=opts, work=None, scratch=None))   # bad input: fail before creating anything
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{opts.name}.building-"))
    scratch = Path(tempfile.mkdtemp(prefix="haboob-build-", dir=scratch_dir))
    try:
        ctx = Context(options=opts, work=work, scratch=scratch)
        build(ctx, steps)
        os.chmod(work, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{opts.name}.old-"))
            out.rename(old / "x")
            work.rename(out)
            shutil.rmtree(old)
        else:
            work.rename(out)
        return ctx
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
