#!/usr/bin/env bash
# Installs everything Haboob needs on a fresh Debian 12 machine (as root):
# the image tools, QEMU and firmware, the benchmark baseline (nginx, wrk),
# network tools for the tests, and the Python packages. The kernel package is
# fetched by build.py itself (apt-get download, cached under ~/.cache/haboob).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    qemu-system-x86 qemu-utils ovmf \
    grub-pc-bin grub-efi-amd64-bin grub-common xorriso mtools dosfstools fdisk gdisk \
    shim-signed grub-efi-amd64-signed \
    busybox-static cpio zstd xz-utils tar gzip skopeo \
    python3.11 python3.11-minimal \
    nginx wrk curl wget tshark iproute2 iputils-ping ethtool procps haproxy \
    dnsmasq-base testssl.sh chromium libnss3-tools openssl
# nginx from the package is only our benchmark baseline: keep the service off.
systemctl disable --now nginx >/dev/null 2>&1 || true
# HAProxy likewise: vm fleet runs its own instance with its own configuration.
systemctl disable --now haproxy >/dev/null 2>&1 || true
python3 -m pip install -q -r requirements.txt
