#!/usr/bin/env python3
"""build.py: a static site -> a bootable Haboob appliance image.

    ./build.py --site ./www                 # -> images/www/{vmlinuz,initrd.img,cmdline,manifest.json}
    python -m vm boot images/www            # boot it under QEMU

The work happens in haboob_build/ (a straight list of steps, see
haboob_build/steps.py). The image is assembled in a temporary folder beside
the output and renamed into place only when complete, so a failed build
leaves nothing half-written.
"""
import re
import time
from pathlib import Path

import click

from haboob_build import drivers, formats
from haboob_build.context import Options
from haboob_build.errors import BuildError
from haboob_build.steps import STEPS, build_image


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--site", required=True, type=click.Path(path_type=Path), help="the site folder to serve")
@click.option("--name", help="image name (default: the site folder's name)")
@click.option("--out", type=click.Path(path_type=Path), help="output folder (default: images/NAME)")
@click.option("--ip", default="198.18.0.1/24", show_default=True,
              help="the appliance's address (haboob.ip= on the kernel command line overrides)")
@click.option("--gateway", help="default gateway (haboob.gw=)")
@click.option("--mss", default=1448, show_default=True, type=int, help="TCP MSS the responses are cut at")
@click.option("--kernel", type=click.Path(path_type=Path), help="a vmlinuz (bzImage) instead of Debian's")
@click.option("--modules", type=click.Path(path_type=Path), help="its modules folder (lib/modules/RELEASE)")
@click.option("--memory", default=256, show_default=True, type=int, help="guest memory in MB (default for vm)")
@click.option("--compress-level", default=19, show_default=True, type=click.IntRange(1, 19),
              help="zstd level for the initramfs")
@click.option("--formats", "formats_", default="all", show_default=True,
              help="deploy formats to write beside the kernel and initrd: iso, img, pxe, qcow2 "
                   "(comma-separated), all, or none")
@click.option("--nic-drivers", default="all", show_default=True,
              help="NIC drivers the image carries (comma-separated): " + ", ".join(drivers.NIC_DRIVERS))
@click.option("--tls-cert", type=click.Path(path_type=Path), help="HTTPS on port 443: the certificate chain (PEM)")
@click.option("--tls-key", type=click.Path(path_type=Path), help="its private key (PEM); it goes into the image")
@click.option("--tls-self-signed", "tls_self_signed", metavar="NAME[,NAME...]",
              help="HTTPS with a self-signed certificate made now for these names (development only)")
@click.option("--http", "http_mode", type=click.Choice(["redirect", "serve", "off"]), default="redirect",
              show_default=True, help="port 80 beside HTTPS: 308 to https, serve the site, or closed")
@click.option("--hsts", type=int, default=0, help="Strict-Transport-Security max-age (s) on HTTPS responses")
@click.option("-q", "--quiet", is_flag=True, help="no progress output")
def main(site, name, out, ip, gateway, mss, kernel, modules, memory, compress_level, formats_, nic_drivers,
         tls_cert, tls_key, tls_self_signed, http_mode, hsts, quiet):
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
    except BuildError as e:
        raise click.ClickException(str(e)) from None
    opts = Options(site=site, name=name, out=out, ip=ip, gateway=gateway, mss=mss, kernel=kernel,
                   memory=memory, compress_level=compress_level, quiet=quiet, modules=modules,
                   formats=tuple(fmts), nic_drivers=tuple(nics), tls_cert=tls_cert, tls_key=tls_key,
                   tls_self_signed=tuple(n.strip() for n in (tls_self_signed or "").split(",") if n.strip()),
                   http=http_mode, hsts=hsts)
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
                    "qcow2": f"{out}/{name}.qcow2 (OpenStack, KubeVirt, libvirt)"}[f]
            click.echo(f"  {what}", err=True)


if __name__ == "__main__":
    main(prog_name="build.py")
