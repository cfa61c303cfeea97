#!/usr/bin/env python3
"""build.py: a static site -> a bootable Haboob appliance image.

    ./build.py --site ./www                 # -> images/www/{vmlinuz,initrd.img,cmdline,manifest.json}
    python -m vm boot images/www            # boot it under QEMU
    ./build.py config-volume DIR --out cfg.img   # a configuration volume (haboob_build/configvol.py)

The work happens in haboob_build/ (a straight list of steps, see
haboob_build/steps.py). The image is assembled in a temporary folder beside
the output and renamed into place only when complete, so a failed build
leaves nothing half-written.

Output goes to stderr: a line per step, the content step's progress (a bar
with files and MB on a terminal, a few plain lines when piped), then a
summary; --quiet prints only errors ("Error: ...", exit status 1).
"""
import re
import time
from pathlib import Path

import click

from appliance.obs.cli_options import obs_options, obs_settings
from haboob_build import cloud, drivers, formats
from haboob_build.context import Options
from haboob_build.errors import BuildError
from haboob_build.steps import STEPS, build_image


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--site", required=True, type=click.Path(path_type=Path), help="the site folder to serve")
@click.option("--name", help="image name (default: the site folder's name)")
@click.option("--out", type=click.Path(path_type=Path), help="output folder (default: images/NAME)")
@click.option("--ip", default="dhcp", show_default=True,
              help="the appliance's address: dhcp, or ADDR/PREFIX (haboob.ip= on the kernel command line overrides)")
@click.option("--gateway", help="default gateway with a static --ip (haboob.gw=)")
@click.option("--ip6", default="auto", show_default=True, metavar="off|auto|ADDR/PREFIX",
              help="IPv6: auto (SLAAC, DHCPv6 when the router says M=1; only a link-local address "
                   "without a router), off, or a static ADDR/PREFIX such as 2001:2:0:1::10/64 (haboob.ip6=)")
@click.option("--gateway6", help="IPv6 default router with a static --ip6: link-local or on-link (haboob.gw6=)")
@click.option("--mss", default=1448, show_default=True, type=int, help="TCP MSS the responses are cut at")
@click.option("--kernel", type=click.Path(path_type=Path), help="a vmlinuz (bzImage) instead of Debian's")
@click.option("--modules", type=click.Path(path_type=Path), help="its modules folder (lib/modules/RELEASE)")
@click.option("--memory", default=256, show_default=True, type=int, help="guest memory in MB (default for vm)")
@click.option("--compress-level", default=19, show_default=True, type=click.IntRange(1, 19),
              help="zstd level for the initramfs")
@click.option("--formats", "formats_", default="all", show_default=True,
              help="deploy formats to write beside the kernel and initrd (comma-separated): "
                   "iso, img, pxe, qcow2 (together: all), aws, gce, azure, kubevirt, openstack "
                   "(together: cloud; each with its deploy/ template where there is one), or none")
@click.option("--nic-drivers", default="all", show_default=True,
              help="NIC drivers the image carries (comma-separated): " + ", ".join(drivers.NIC_DRIVERS)
              + "; all: every one but hv_netvsc (Azure: all,hv_netvsc)")
@click.option("--tls-cert", type=click.Path(path_type=Path), help="HTTPS on port 443: the certificate chain (PEM)")
@click.option("--tls-key", type=click.Path(path_type=Path), help="its private key (PEM); it goes into the image")
@click.option("--tls-self-signed", "tls_self_signed", metavar="NAME[,NAME...]",
              help="HTTPS with a self-signed certificate made now for these names (development only)")
@click.option("--http", "http_mode", type=click.Choice(["redirect", "serve", "off"]), default="redirect",
              show_default=True, help="port 80 beside HTTPS: 308 to https, serve the site, or closed")
@click.option("--hsts", type=int, default=0, help="Strict-Transport-Security max-age (s) on HTTPS responses")
@click.option("-q", "--quiet", is_flag=True,
              help="print nothing but errors (no step lines, no progress, no summary)")
@obs_options                            # access log, metrics, drain: the image's defaults (appliance/obs)
def main(site, name, out, ip, gateway, ip6, gateway6, mss, kernel, modules, memory, compress_level, formats_, nic_drivers,
         tls_cert, tls_key, tls_self_signed, http_mode, hsts, quiet, **obs):
    """Build a bootable appliance image serving the static site in SITE."""
    site = Path(site)
    if name is None:
        name = site.resolve().name or "site"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise click.ClickException(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    out = Path(out) if out else Path("images") / name
    try:                                # bad names or missing tools: refuse before building anything
        fmts = formats.parse_formats(formats_)
        formats.check_tools(fmts)
        nics = drivers.parse_nic_drivers(nic_drivers)
        cloud.check_drivers(fmts, nics)             # a cloud format needs its platform's NIC driver
        observe = obs_settings(obs)
    except click.BadParameter as e:
        raise click.ClickException(e.message) from None
    except BuildError as e:
        raise click.ClickException(str(e)) from None
    opts = Options(site=site, name=name, out=out, ip=ip, gateway=gateway, mss=mss, kernel=kernel,
                   memory=memory, compress_level=compress_level, quiet=quiet, modules=modules,
                   formats=tuple(fmts), nic_drivers=tuple(nics), observe=observe, tls_cert=tls_cert,
                   tls_key=tls_key,
                   tls_self_signed=tuple(n.strip() for n in (tls_self_signed or "").split(",") if n.strip()),
                   http=http_mode, hsts=hsts, ip6=ip6, gateway6=gateway6)
    t0 = time.monotonic()
    try:
        ctx = build_image(opts, STEPS)
    except BuildError as e:
        raise click.ClickException(str(e)) from None
    if not quiet:
        sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(ctx.sizes.items()))
        click.echo(f"built {out}/ in {time.monotonic() - t0:.1f}s "
                   f"(initrd.img {(out / 'initrd.img').stat().st_size / 1e6:.2f} MB; {sizes})", err=True)
        click.echo(f"boot it: python -m vm boot {out}", err=True)
        if "tls" in ctx.facts:
            t = ctx.facts["tls"]
            click.echo(f"HTTPS for {', '.join(t['names'])} (sha256 {t['fingerprint_sha256']}, expires "
                       f"{t['not_after']}): the image now holds a private key; keep it as secret as the key",
                       err=True)
        for f in fmts:
            what = {"iso": f"{out}/{name}.iso (CD or USB stick: dd if={out}/{name}.iso of=/dev/sdX bs=4M)",
                    "img": f"{out}/{name}.img (raw GPT disk, BIOS+UEFI: dd to a disk or USB stick)",
                    "pxe": f"{out}/pxe/ (iPXE: chain boot.ipxe)",
                    "qcow2": f"{out}/{name}.qcow2 (OpenStack, KubeVirt, libvirt)"}.get(f)
            if f in cloud.PLATFORMS:
                what = f"{out}/{cloud.PLATFORMS[f].file.format(name=name)} ({f}); upload and register it:\n      " + \
                    "\n      ".join(cloud.commands(f, name, str(out)))
            click.echo(f"  {what}", err=True)
            if f == "kubevirt" and ip not in ("dhcp", "10.0.2.2/24"):
                click.echo(f"      note: KubeVirt's masquerade binding hands every VM 10.0.2.2/24 (gateway 10.0.2.1) "
                           f"by DHCP; a pool built with --ip {ip} is not reachable: keep --ip dhcp (the default) "
                           f"(docs/deploy.md)", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="the volume image to write")
def config_volume(folder, out):
    """Write DIR (haboob.conf, tls/fullchain.pem, tls/key.pem) as a FAT volume labelled HABOOB,
    read by the appliance at boot (attach it as a disk; `vm boot --config DIR` does)."""
    from haboob_build import configvol
    try:
        got = configvol.write(folder, out)
    except BuildError as e:
        raise click.ClickException(str(e)) from None
    shown = " ".join(f"haboob.{k}={v}" for k, v in got.items() if not k.startswith("tls_"))
    click.echo(f"wrote {out} (label {configvol.LABEL}): {shown or 'no network settings'}"
               + (" + TLS certificate and key" if (Path(folder) / "tls").is_dir() else ""), err=True)


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["config-volume"]:          # a second command beside the build itself
        config_volume(sys.argv[2:], prog_name="build.py config-volume")
    else:
        main(prog_name="build.py")
