"""`python -m vm boot|test|fleet|stat IMAGE`: run an appliance image under QEMU.

    python -m vm boot images/www [--net user[:PORT] | --net tap[:IFNAME]] [--smp N]
                                 [--memory MB] [--capture FILE.pcap] [--console]
                                 [--boot kernel|disk|iso] [--firmware bios|uefi|uefi-secure] [--nic virtio|e1000|e1000e]
                                 [--net socket:...|vfio:PCI_ADDRESS|netmap:PORT]   (docs/deploy.md)
                                 [--config DIR]   (a configuration volume: build.py config-volume)
                                 [--log] [--metrics-port N] [--ip6 off|auto|ADDR/PREFIX]
    python -m vm test images/www [--net ...] [--site DIR]
    python -m vm fleet images/www -n N [--port PORT]     (N appliances behind HAProxy: vm/fleet.py)
    python -m vm stat images/www|URL                      (live rates from /metrics: vm/stat.py)

`boot` waits for the ready line, prints the URL, and runs until SIGINT
(Ctrl-C) or SIGTERM. `test` boots, fetches every URL of the manifest and
compares it with the site, checks HEAD and 404 (and ping on tap), reports
boot-to-ready time, powers the guest off via QMP, and exits 0 only when
everything passed. With IPv6 on in the guest (`--ip6 auto`, or the
image's haboob.ip6=) `boot` also prints the guest's IPv6 URL and `test`
fetches every URL over IPv6 too, on a tap (QEMU 7.2's user networking
forwards IPv4 only: there the guest's SLAAC address is only printed).

Stopping (vm/stop.py), the same for SIGINT and SIGTERM and however the
command was started (a script's background job inherits SIGINT ignored;
the handlers are our own): the ACPI power button through QMP, up to 60 s
for the guest to power off (3 s while it is still booting: PID 1 is not
watching the button yet), then QMP quit, then SIGKILL; every wait has a
deadline, QMP calls included. A second signal kills QEMU at once. It says
what it does on stderr: "SIGTERM: stopping (...) ...", then "stopped
cleanly", "stopped: the guest was still booting (QEMU quit via QMP)", or
why QEMU was killed. Exit status after a signal: `boot` 0 when stopped
cleanly (or while booting), 1 when QEMU had to be killed; `test` 128 + the
signal's number (130, 143), its checks not done.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import click

from . import check, stop
from .image import Image, VMError
from .qemu import COUNTERS, QMP_TIMEOUT, READY, BootError, Options, kvm_usable, qemu_binary
from .session import session

STOP_TIMEOUT = 60       # s for the guest to power off after the ACPI power button
IP6_WAIT = 60           # s after the ready line for the guest's global IPv6 address (RA, DAD)


def parse_net(value: str) -> dict:
    kind, _, arg = value.partition(":")
    if kind == "user":
        if arg and not (arg.isdigit() and 1 <= int(arg) <= 65535):
            raise click.BadParameter(f"{value!r}: the host port must be 1..65535", param_hint="--net")
        return {"net": "user", "hostport": int(arg) if arg else 0}
    if kind == "tap":
        if arg and (len(arg) > 15 or "/" in arg):
            raise click.BadParameter(f"{value!r}: not an interface name", param_hint="--net")
        return {"net": "tap", "tap": arg or None}
    if kind in ("socket", "vfio", "netmap"):
        # vm/passthrough.py: parse, then the preflight checks, before anything starts
        from . import passthrough as pt
        try:
            spec = pt.parse_net(value)
            if kind == "vfio":
                pt.preflight_vfio(spec.arg)
            elif kind == "netmap":
                pt.preflight_netmap(spec.arg)
        except pt.NetError as e:
            raise click.ClickException(str(e)) from None
        return {"net": kind, "netspec": spec}
    raise click.BadParameter(f"{value!r}: use user[:HOSTPORT], tap[:IFNAME], socket:listen=HOST:PORT|"
                             f"connect=HOST:PORT|mcast=GROUP:PORT|udp=HOST:PORT,HOST:PORT, vfio:PCI_ADDRESS "
                             f"or netmap:PORT", param_hint="--net")


def make_options(net, smp, memory, capture, bzimage=False, boot="kernel", firmware="bios",
                 nic="virtio", config=None, ip6=None) -> Options:
    o = Options(**parse_net(net), smp=smp, memory=memory, direct=not bzimage, boot=boot, firmware=firmware,
                nic=nic)
    if ip6 is not None:
        from appliance.stack.ipv6 import ip6_mode
        if boot != "kernel":
            raise click.BadParameter(f"--boot {boot}: the medium's command line is fixed; use --boot kernel",
                                     param_hint="--ip6")
        try:
            o.ip6 = str(ip6_mode(ip6))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--ip6") from None
    if config is not None:                  # checked now, written per boot (vm/media.py)
        from .media import MediaError, config_volume_settings
        try:
            got = config_volume_settings(config)
            o.config, o.config_ip, o.config_ip6 = Path(config).resolve(), got.get("ip"), got.get("ip6")
            if o.config_ip == "dhcp":           # the guest asks DHCP: as for a DHCP image
                o.config_ip = None
                o.append.append("haboob.ip=dhcp")
        except MediaError as e:
            raise click.BadParameter(str(e), param_hint="--config") from None
    if capture:
        capture = Path(capture).resolve()
        if not capture.parent.is_dir():
            raise click.BadParameter(f"{capture.parent}: no such folder", param_hint="--capture")
        o.capture = capture
    return o


common = [
    click.argument("image", type=click.Path(path_type=Path)),
    click.option("--net", default="user", show_default=True,
                 help="user[:HOSTPORT], tap[:IFNAME], socket:listen=H:P|connect=H:P|mcast=G:P|udp=H:P,H:P, "
                      "vfio:PCI_ADDRESS or netmap:PORT (see docs/deploy.md)"),
    click.option("--boot", type=click.Choice(["kernel", "disk", "iso"]), default="kernel", show_default=True,
                 help="kernel: -kernel/-initrd; disk, iso: NAME.img / NAME.iso through the firmware and GRUB"),
    click.option("--firmware", type=click.Choice(["bios", "uefi", "uefi-secure"]), default="bios",
                 show_default=True, help="SeaBIOS, OVMF for UEFI, or OVMF with Secure Boot on (package ovmf)"),
    click.option("--nic", type=click.Choice(["virtio", "e1000", "e1000e"]), default="virtio", show_default=True,
                 help="the emulated NIC model"),
    click.option("--smp", default=1, show_default=True, type=click.IntRange(1, 64)),
    click.option("--memory", type=click.IntRange(32, 1 << 20), help="MB (default: the image's)"),
    click.option("--capture", type=click.Path(path_type=Path), help="write a pcap of the guest NIC"),
    click.option("--timeout", default=300, show_default=True, type=float, help="seconds to wait for ready"),
    click.option("--bzimage", is_flag=True, help="boot vmlinuz with its decompressor, not the extracted "
                                                 "kernel via PVH (slower under TCG)"),
    click.option("--config", type=click.Path(path_type=Path, file_okay=False),
                 help="attach DIR as a configuration volume (haboob.conf, tls/; see build.py config-volume)"),
    click.option("--ip6", default=None, metavar="off|auto|ADDR/PREFIX",
                 help="the guest's haboob.ip6= (default: the image's); over --net tap the namespace "
                      "advertises 2001:2:0:1::/64 for auto"),
]


def with_common(f):
    for deco in reversed(common):
        f = deco(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Boot and test Haboob appliance images under QEMU."""


def _echo_console(line: str) -> None:
    click.echo(f"| {line}")


def _booted(machine) -> bool:
    return any(READY in line for line in machine.lines)


def _how_it_ended(how: str, machine, sig: stop.Signals) -> str:
    if how == "powered off":
        return "stopped cleanly"
    if how == "quit":
        return ("stopped: the guest was still booting (QEMU quit via QMP)" if not _booted(machine) else
                f"the guest did not power off within {STOP_TIMEOUT}s; QEMU quit via QMP")
    if how == "killed":
        if sig.count >= 2:
            return f"second signal ({signal.Signals(sig.last).name}): killed QEMU at once"
        if machine.qmp_hung:
            return f"QEMU did not answer QMP within {QMP_TIMEOUT:g}s; killed it"
        return "the guest did not power off in time; killed it"
    return f"QEMU exited with status {machine.proc.returncode}"


def _stop_on_signal(machine, sig: stop.Signals) -> str:
    """The stop a signal asked for, said on stderr; returns Machine.stop()'s word for how it ended."""
    click.echo(f"{sig.name}: stopping (ACPI power button via QMP; a second signal kills QEMU at once) ...",
               err=True)
    how = machine.stop(STOP_TIMEOUT)
    click.echo(_how_it_ended(how, machine, sig), err=True)
    return how


_ACCESS_LINE = re.compile(r'^(\d+\.\d+\.\d+\.\d+ - - \[|\{"time":)')


def _echo_log(line: str) -> None:
    if _ACCESS_LINE.match(line):
        click.echo(line)


def _print_ip6(s) -> None:
    """The guest's IPv6 URL (or why there is none), when it runs IPv6."""
    if s.ip6 == "off":
        return
    if s.wait_ip6(IP6_WAIT) is None:
        click.echo(f"IPv6: no global address within {IP6_WAIT}s (haboob.ip6={s.ip6}); see --console", err=True)
    elif not s.reach6:
        click.echo(f"IPv6: the guest has {s.guest_ip6} on QEMU's user network, which forwards IPv4 only "
                   f"(QEMU 7.2's hostfwd); --net tap reaches it over IPv6", err=True)
    elif s.ns:
        click.echo(f"open {s.url6}/ over IPv6 from the namespace: ip netns exec {s.ns.name} curl -g {s.url6}/")
    else:
        click.echo(f"open {s.url6}/ over IPv6")


def metrics_url(s, opts) -> str | None:
    """Where the guest's /metrics is reachable from here, or None."""
    if not opts.metrics_port:
        return None
    if opts.net == "user":
        return f"http://127.0.0.1:{opts.metrics_hostport}/metrics"
    return f"http://{s.host}:{opts.metrics_port}/metrics"


@cli.command()
@with_common
@click.option("--console", is_flag=True, help="show the guest's serial console")
@click.option("--log", "follow_log", is_flag=True, help="follow the access log (haboob.log=console)")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="the guest's metrics port (haboob.metrics=); default: the image's, else 9100 "
                   "with --boot kernel; 0: none")
def boot(image, net, boot, firmware, nic, smp, memory, capture, timeout, bzimage, config, ip6, console,
         follow_log, metrics_port):
    """Boot IMAGE, print its URL, run until SIGINT (Ctrl-C) or SIGTERM, then stop it cleanly."""
    img = Image.load(image)
    opts = make_options(net, smp, memory, capture, bzimage, boot, firmware, nic, config, ip6)
    built = int(img.manifest.get("config", {}).get("observe", {}).get("metrics_port", 0) or 0)
    if metrics_port is None:
        metrics_port = built or (9100 if boot == "kernel" else 0)
    elif boot != "kernel" and metrics_port != built:
        raise click.BadParameter(f"--boot {boot} boots the medium's command line (metrics port {built}); "
                                 f"another one needs --boot kernel", param_hint="--metrics-port")
    if metrics_port == 80:
        raise click.BadParameter("80 is the site's port", param_hint="--metrics-port")
    opts.metrics_port = metrics_port
    if follow_log:
        if boot != "kernel":
            raise click.BadParameter(f"--boot {boot}: the medium's command line is fixed; use --boot kernel",
                                     param_hint="--log")
        opts.append.append("haboob.log=console")
    qemu_binary()
    click.echo(f"booting {image} ({'KVM' if kvm_usable() else 'TCG: no KVM here, slower'}) ...", err=True)
    echo = _echo_console if console else (_echo_log if follow_log else None)
    with stop.Signals() as sig:
        with session(img, opts, echo=echo) as s:
            sig.machine = s.machine
            murl = None
            run_file = Path(image) / "run.json"
            try:
                with sig.interruptible():
                    ready = s.machine.wait_ready(timeout)
                    click.echo(f"ready in {ready['ms_since_boot']} ms after kernel start "
                               f"({ready['host_seconds']:.1f}s wall): {ready['urls']} URLs")
                    if s.ns:
                        click.echo(f"open {s.base_url}/ from the namespace: "
                                   f"ip netns exec {s.ns.name} curl {s.base_url}/")
                    else:
                        click.echo(f"open {s.base_url}/")
                    _print_ip6(s)
                    murl = metrics_url(s, opts)
                    if murl:
                        click.echo(f"metrics {murl} (health: {murl[:-len('/metrics')]}/healthz; "
                                   f"live: python -m vm stat {image})")
                        try:
                            run_file.write_text(json.dumps({"metrics": murl, "pid": os.getpid(),
                                                            "ns": s.ns.name if s.ns else None}) + "\n")
                        except OSError:
                            pass
                    click.echo("Ctrl-C or SIGTERM stops it (a second one at once)", err=True)
                    while s.machine.proc.poll() is None:
                        s.machine.poll_console()
                        time.sleep(0.2)
            except stop.Stop:
                how = _stop_on_signal(s.machine, sig)
                for line in s.machine.lines:
                    if line.startswith(COUNTERS):
                        click.echo(line)
                sys.exit(0 if how == "powered off" or (how == "quit" and not _booted(s.machine)) else 1)
            finally:
                if murl:
                    run_file.unlink(missing_ok=True)
            tail = "\n".join(s.machine.tail(5))
            raise VMError(f"the guest stopped by itself (QEMU exit {s.machine.proc.returncode}):\n{tail}")


def ipv6_checks(s, img, site) -> list:
    """Every URL over IPv6 (fresh connections and keep-alive), HEAD, 404 and ping -6, to the
    guest's global IPv6 address (from its console)."""
    a = s.wait_ip6(IP6_WAIT)
    if a is None:
        return [check.Result("IPv6 address", False, f"none within {IP6_WAIT}s (haboob.ip6={s.ip6})")]
    out = [check.Result("IPv6 address", True, a)]
    out += [check.Result(r.name + " (IPv6)", r.ok, r.detail) for r in s.call(check.fetch_all, img, a, 80, site)]
    out.append(check.ping(a, prefix=s.prefix))
    return out


@cli.command()
@click.argument("target")
@click.option("--count", type=click.IntRange(min=0), default=0, help="lines to print (0: until Ctrl-C)")
@click.option("--interval", type=click.FloatRange(0.2, 60), default=1.0, show_default=True)
def stat(target, count, interval):
    """Live requests/s, bandwidth, connections and errors of a running appliance, once a
    second, from its /metrics. TARGET: an image folder `vm boot` is running, or a metrics URL."""
    from . import stat as st
    try:
        url, ns = st.resolve(target)
        st.run(url, ns, count, interval, click.echo)
    except st.StatError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass


@cli.command()
@with_common
@click.option("--site", type=click.Path(path_type=Path, file_okay=False), help="compare with this folder too")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def test(image, net, boot, firmware, nic, smp, memory, capture, timeout, bzimage, config, ip6, site, as_json):
    """Boot IMAGE, fetch and compare every URL, HEAD, 404, ping (tap); stop; exit 0 if all passed.
    With IPv6 on in the guest and a tap: every URL and ping over IPv6 too."""
    img = Image.load(image)
    opts = make_options(net, smp, memory, capture, bzimage, boot, firmware, nic, config, ip6)
    qemu_binary()
    if site is not None and not site.is_dir():
        raise click.BadParameter(f"{site}: no such folder", param_hint="--site")
    results: list[check.Result] = []
    with stop.Signals() as sig:
        with session(img, opts) as s:
            sig.machine = s.machine
            try:
                with sig.interruptible():
                    ready = s.machine.wait_ready(timeout)
                    results.append(check.Result("ready line", ready.get("urls") == len(img.urls),
                                                f"{ready.get('urls')} URLs (manifest: {len(img.urls)})"))
                    results += s.call(check.fetch_all, img, s.host, s.port, site)
                    if opts.net == "tap":
                        results.append(check.ping(s.guest_ip, prefix=s.prefix))
                    if s.ip6 != "off" and s.reach6:
                        results += ipv6_checks(s, img, site)
            except stop.Stop:
                _stop_on_signal(s.machine, sig)
                sys.exit(sig.exit_status)
            how = s.machine.stop(STOP_TIMEOUT)      # a signal now is counted; a second one kills QEMU
            counters = any(COUNTERS in l for l in s.machine.lines)
            results.append(check.Result("clean stop via QMP system_powerdown", how == "powered off",
                                        ("counters printed" if counters else "no counters line")
                                        + ("" if how == "powered off" else f"; QEMU {how}")))
            if sig.count:
                click.echo(f"{sig.name} while the guest was powering off: {_how_it_ended(how, s.machine, sig)}",
                           err=True)
                sys.exit(sig.exit_status)
    failed = [r for r in results if not r.ok]
    if as_json:
        click.echo(json.dumps({"ready": ready, "results": [r.__dict__ for r in results]}, indent=1))
    else:
        for r in results:
            click.echo(f"{'ok  ' if r.ok else 'FAIL'} {r.name}: {r.detail}")
        click.echo(f"boot to ready: {ready['ms_since_boot']} ms since kernel start, "
                   f"{ready['host_seconds']:.2f}s wall ({'KVM' if kvm_usable() else 'TCG'})")
        click.echo(f"{len(results) - len(failed)}/{len(results)} passed")
    sys.exit(1 if failed else 0)


@cli.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-n", "count", default=2, show_default=True, type=int, help="how many appliances")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="the balancer's port on 127.0.0.1 "
                                                                       "(default: a free one)")
@click.option("--smp", default=1, show_default=True, type=click.IntRange(1, 64), help="vCPUs per appliance")
@click.option("--memory", type=click.IntRange(32, 1 << 20), help="MB per appliance (default: the image's)")
@click.option("--timeout", default=400, show_default=True, type=float, help="seconds to wait for each ready")
def fleet(image, count, port, smp, memory, timeout):
    """N appliances of IMAGE behind HAProxy on 127.0.0.1; restarts a stopped one; Ctrl-C tears all down."""
    from .fleet import Fleet, preflight
    img = Image.load(image)
    preflight(img, count, smp, memory)              # before anything starts
    qemu_binary()
    f = Fleet(img, count, smp=smp, memory=memory, port=port, echo=lambda m: click.echo(m, err=True))
    click.echo(f"booting {count} appliances ({'KVM' if kvm_usable() else 'TCG: no KVM here, slower'}) ...",
               err=True)
    with stop.Signals() as sig:           # SIGINT and SIGTERM alike, also when started with SIGINT ignored
        sig.machine = f                   # a second signal kills every QEMU (Fleet.kill)
        f.interruptible = sig.interruptible
        try:
            with f.run(timeout):
                click.echo(f"balancer: {f.url}")
                click.echo(f"namespace: {f.ns.name}; HAProxy stats: {f.stats_socket}; members:")
                for m in f.members:
                    click.echo(f"  {m.server} {m.ip} qmp {m.machine.qmp_sock}")
                click.echo("Ctrl-C stops them all", err=True)
                while True:
                    for m in f.watch():
                        click.echo(f"  {m.server} {m.ip} qmp {m.machine.qmp_sock}")
                    if f.haproxy.poll() is not None:
                        raise VMError(f"HAProxy exited ({f.haproxy.returncode})")
                    with sig.interruptible():
                        time.sleep(0.2)
        except stop.Stop:
            click.echo(f"{sig.name}: stopped: appliances powered off, balancer and namespace removed", err=True)


def main():
    try:
        cli(prog_name="python -m vm", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except BootError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(3)
    except VMError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
