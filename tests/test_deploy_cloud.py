"""Cloud formats and fleet templates (haboob_build/cloud.py), each read back
by a tool that did not write it.

- aws: the raw disk is the disk (qemu-img compare) and boots, UEFI from
  NVMe as on EC2 Nitro, serving the whole site;
- gce: `tar -tvzf` lists exactly disk.raw; its first header is GNU
  (oldgnu magic, sparse type), gzip's header carries no name or time,
  disk.raw is a whole number of GiB with its backup GPT at the end;
- azure: `qemu-img info -f vpc` sees a VHD of a whole number of MiB holding
  the raw disk's blocks; the footer (fixed type, our time stamp, checksum)
  as the VHD specification defines it; it boots (BIOS, IDE) and serves;
- kubevirt: `skopeo inspect oci-archive:` reads the image, `skopeo copy`
  verifies every blob digest, the layer holds disk/NAME.qcow2 owned 107:107;
- templates: cfn-lint on the CloudFormation stack (and a broken copy it
  must reject); the KubeVirt and Heat documents against JSON schemas of
  the fields their engines require, and their cross-references.

Structure and reproducibility use small fake boot inputs (the writers
copy bytes); the two boots use one real build.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from haboob_build import cloud, drivers, formats
from haboob_build.errors import BuildError

from .test_deploy_formats import _parse_gpt

EPOCH = 1700000000
CMDLINE = "console=ttyS0,115200 panic=-1 haboob.ip=198.18.42.1/24"
REPO = Path(__file__).resolve().parent.parent
MIB, GIB = 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "vmlinuz").write_bytes(b"K" * 300_000 + os.urandom(1000))
    (d / "initrd.img").write_bytes(b"I" * 500_000 + os.urandom(1000))
    return d


def _write(inputs: Path, out: Path, fmts=("img",) + cloud.CLOUD_FORMATS, epoch=EPOCH) -> dict:
    return formats.write_formats(list(fmts), out, name="www", vmlinuz=inputs / "vmlinuz",
                                 initrd=inputs / "initrd.img", cmdline=CMDLINE, epoch=epoch)


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cloud")
    return out, _write(inputs, out)


@pytest.fixture(scope="module")
def image():
    from tests import image_support as sup
    from vm.image import Image
    folder = sup.build("cloud", formats=("aws", "azure"), nic_drivers=tuple(drivers.DEFAULT) + ("hv_netvsc",))
    return Image.load(folder)


def _run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=True, **kw)


# ---------------------------------------------------------------- options and drivers

def test_parse_cloud_formats():
    assert formats.parse_formats("cloud") == list(cloud.CLOUD_FORMATS)
    assert formats.parse_formats("kubevirt,aws") == ["aws", "kubevirt"]
    assert formats.parse_formats("all,gce") == ["iso", "img", "pxe", "qcow2", "gce"]
    assert formats.parse_formats("all") == list(formats.FORMATS)
    with pytest.raises(BuildError, match=r"unknown format 'ec2'.*known: .*aws, gce, azure, kubevirt, openstack"):
        formats.parse_formats("ec2")


def test_platform_nic_drivers():
    assert {f: p.nic for f, p in cloud.PLATFORMS.items()} == {
        "aws": "ena", "gce": "gve", "azure": "hv_netvsc", "kubevirt": "virtio_net", "openstack": "virtio_net"}
    # hv_vmbus fails to load off Hyper-V: not in 'all', added by name
    assert "hv_netvsc" not in drivers.DEFAULT and "gve" in drivers.DEFAULT
    assert drivers.parse_nic_drivers("all,hv_netvsc") == drivers.DEFAULT + ["hv_netvsc"]
    assert drivers.parse_nic_drivers("gvnic,netvsc") == ["gve", "hv_netvsc"]
    cloud.check_drivers(["aws", "gce", "azure", "kubevirt"], drivers.DEFAULT + ["hv_netvsc"])
    with pytest.raises(BuildError, match=r"--formats azure needs the NIC driver hv_netvsc .*"
                                         r"add it, e.g. --nic-drivers virtio_net,hv_netvsc"):
        cloud.check_drivers(["kubevirt", "azure"], ["virtio_net"])


def test_hv_netvsc_is_selected_by_the_vmbus_device(image):
    """PID 1 matches modaliases once, before hv_vmbus has made vmbus devices:
    hv_netvsc's module line carries hv_vmbus's ACPI patterns too."""
    from tests.image_support import read_cpio
    lines = read_cpio(image.initrd)["/etc/haboob/modules"]["data"].decode().splitlines()
    by = {l.split()[0]: l.split() for l in lines}
    assert by["hv_vmbus"][2] == "driver" and "acpi*:VMBUS:*" in by["hv_vmbus"][4:]
    assert by["hv_netvsc"][2:4] == ["driver", "hv_vmbus"]
    assert "acpi*:VMBUS:*" in by["hv_netvsc"][4:] and any(a.startswith("vmbus:") for a in by["hv_netvsc"][4:])
    assert "acpi*:VMBUS:*" not in by["gve"][4:]


@pytest.mark.parametrize("args,msg", [
    (["--formats", "aws", "--nic-drivers", "e1000,virtio"],
     "--formats aws needs the NIC driver ena (EC2 Nitro's Elastic Network Adapter), and --nic-drivers "
     "e1000,virtio_net leaves it out: add it, e.g. --nic-drivers e1000,virtio_net,ena"),
    (["--formats", "gce,azure"],
     "--formats azure needs the NIC driver hv_netvsc"),
])
def test_build_cli_refuses_a_cloud_format_without_its_driver(tmp_path, args, msg):
    proc = subprocess.run([sys.executable, str(REPO / "build.py"), "--site", str(REPO / "examples/www"),
                           "--out", str(tmp_path / "out"), "-q", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0 and msg in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []           # refused before anything was made


# ---------------------------------------------------------------- aws

def test_aws_raw_is_the_disk(built):
    out, m = built
    _run("qemu-img", "compare", "-f", "raw", "-F", "raw", out / "www.img", out / "www-aws.raw")
    info = json.loads(_run("qemu-img", "info", "-f", "raw", "--output=json", out / "www-aws.raw").stdout)
    assert info["virtual-size"] % MIB == 0
    assert m["aws"]["platform"]["nic_driver"] == "ena"
    register = next(c for c in m["aws"]["platform"]["commands"] if "register-image" in c)
    assert "--ena-support" in register and "--boot-mode uefi-preferred" in register


# ---------------------------------------------------------------- gce

def test_gce_tar_holds_disk_raw_in_oldgnu_format(built, tmp_path):
    out, _ = built
    tgz = out / "www-gce.tar.gz"
    listing = _run("tar", "-tvzf", tgz).stdout.splitlines()
    assert len(listing) == 1 and listing[0].split()[-1] == "disk.raw", listing
    assert listing[0].split()[:2] == ["-rw-r--r--", "0/0"]
    raw = tgz.read_bytes()
    # RFC 1952: FLG without FNAME (0x08), MTIME zero: gzip -n
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] & 0x08 == 0 and raw[4:8] == bytes(4)
    header = gzip.decompress(raw)[:512]
    assert header[:9] == b"disk.raw\0" and header[257:265] == b"ustar  \0"    # GNU (oldgnu) magic
    assert header[156:157] == b"S"                                            # GNU sparse member
    with tarfile.open(tgz) as t:
        (member,) = t.getmembers()
        assert member.name == "disk.raw" and member.mtime == EPOCH and (member.uid, member.gid) == (0, 0)
        assert member.size % GIB == 0
        t.extract(member, tmp_path, filter="data")
    disk = (tmp_path / "disk.raw").read_bytes()
    total = len(disk) // 512
    my, alt, first, last, _, parts = _parse_gpt(disk, 1)
    bmy, balt, _, _, _, bparts = _parse_gpt(disk, total - 1)       # backup GPT moved to the GiB end
    assert (my, alt, bmy, balt, last) == (1, total - 1, total - 1, 1, total - 34)
    # the same partitions and ESP bytes as the bootable raw disk
    img = (out / "www.img").read_bytes()
    _, _, _, _, _, img_parts = _parse_gpt(img, 1)
    assert [p[2:] for p in parts] == [p[2:] for p in img_parts]
    esp = parts[1]
    assert disk[esp[2] * 512:(esp[3] + 1) * 512] == img[esp[2] * 512:(esp[3] + 1) * 512]


# ---------------------------------------------------------------- azure

def test_azure_vhd_is_fixed_whole_mib_and_the_disk(built):
    out, _ = built
    vhd = out / "www-azure.vhd"
    raw_size = (out / "www.img").stat().st_size
    info = json.loads(_run("qemu-img", "info", "-f", "vpc", "--output=json", vhd).stdout)
    assert info["format"] == "vpc" and info["virtual-size"] == raw_size and raw_size % MIB == 0
    assert vhd.stat().st_size == raw_size + 512                     # fixed: the data, then the footer
    _run("qemu-img", "compare", "-f", "vpc", "-F", "raw", vhd, out / "www.img")
    footer = vhd.read_bytes()[-512:]
    cookie, features, version, offset, stamp = struct.unpack_from(">8sIIQI", footer, 0)
    orig, cur, _geom, dtype, csum = struct.unpack_from(">QQIII", footer, 40)
    assert (cookie, version, offset) == (b"conectix", 0x00010000, 0xFFFFFFFFFFFFFFFF)
    assert dtype == 2 and orig == cur == raw_size                   # 2: fixed hard disk
    assert stamp == EPOCH - 946684800                               # seconds since 2000-01-01 UTC
    assert csum == ~sum(footer[:64] + footer[68:]) & 0xFFFFFFFF


# ---------------------------------------------------------------- kubevirt

@pytest.mark.skipif(not shutil.which("skopeo"), reason="skopeo not installed (.ci/install.sh)")
def test_kubevirt_containerdisk_as_skopeo_reads_it(built, tmp_path):
    out, _ = built
    arch = out / "www-kubevirt.oci.tar"
    info = json.loads(_run("skopeo", "inspect", f"oci-archive:{arch}").stdout)
    assert info["Architecture"] == "amd64" and info["Os"] == "linux" and len(info["Layers"]) == 1
    # skopeo copy checks every blob against its digest
    _run("skopeo", "copy", "-q", f"oci-archive:{arch}", f"dir:{tmp_path / 'copy'}")
    layer = tmp_path / "copy" / info["Layers"][0].split(":", 1)[1]
    with tarfile.open(layer) as t:
        members = {m.name.rstrip("/"): m for m in t.getmembers()}
        assert set(members) == {"disk", "disk/www.qcow2"}
        for m in members.values():
            assert (m.uid, m.gid) == (107, 107) and m.mtime == EPOCH
        data = t.extractfile(members["disk/www.qcow2"]).read()
    assert data == (out / "www.qcow2").read_bytes()
    (tmp_path / "x.qcow2").write_bytes(data)
    assert json.loads(_run("qemu-img", "info", "--output=json", tmp_path / "x.qcow2").stdout)["format"] == "qcow2"


# ---------------------------------------------------------------- manifest, reproducibility

def test_manifest_entries_and_no_scratch_left(built):
    out, m = built
    for fmt in cloud.CLOUD_FORMATS:
        for rel, rec in m[fmt]["files"].items():
            assert rec == {"size": (out / rel).stat().st_size, "sha256": formats.sha256_file(out / rel)}
        assert m[fmt]["platform"]["nic_driver"] == cloud.PLATFORMS[fmt].nic and m[fmt]["reproducible"]
    assert "deploy/aws-cloudformation.yaml" in m["aws"]["files"]
    assert set(m["openstack"]["files"]) == {"www.qcow2", "deploy/openstack-heat.yaml"}
    assert not [p for p in out.rglob(".*")]


def test_cloud_formats_alone_leave_only_themselves(inputs, tmp_path):
    _write(inputs, tmp_path, fmts=("gce", "azure"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["www-azure.vhd", "www-gce.tar.gz"]


def test_reproducible(built, inputs, tmp_path):
    _, first = built
    again = _write(inputs, tmp_path / "again")
    for fmt in cloud.CLOUD_FORMATS:
        assert again[fmt] == first[fmt], fmt
    later = _write(inputs, tmp_path / "later", fmts=("gce", "azure", "kubevirt"), epoch=EPOCH + 86400)
    for fmt in ("gce", "azure", "kubevirt"):
        assert later[fmt]["files"] != first[fmt]["files"], fmt


# ---------------------------------------------------------------- templates

def _cfn_lint(path: Path) -> subprocess.CompletedProcess:
    # pip puts the command beside the interpreter (requirements.txt pins it)
    exe = Path(sys.executable).parent / "cfn-lint"
    return subprocess.run([str(exe if exe.exists() else "cfn-lint"), str(path)], capture_output=True, text=True)


def test_cloudformation_passes_cfn_lint(built, tmp_path):
    out, _ = built
    tpl = out / "deploy/aws-cloudformation.yaml"
    proc = _cfn_lint(tpl)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = yaml.safe_load(tpl.read_text())
    kinds = {r["Type"] for r in doc["Resources"].values()}
    assert {"AWS::EC2::LaunchTemplate", "AWS::AutoScaling::AutoScalingGroup",
            "AWS::ElasticLoadBalancingV2::LoadBalancer"} <= kinds
    assert doc["Parameters"]["ImageId"]["Type"] == "AWS::EC2::Image::Id"
    assert doc["Resources"]["LoadBalancer"]["Properties"]["Type"] == "network"
    # the linter is not a rubber stamp: a reference to a missing parameter is an error
    doc["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["ImageId"] = {"Ref": "NoSuchAmi"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    proc = _cfn_lint(bad)
    assert proc.returncode != 0 and "NoSuchAmi" in proc.stdout


# What KubeVirt's and Kubernetes' API servers require of these objects
# (kubevirt.io pool/v1alpha1 and core/v1 OpenAPI: the required fields and types).
_LABELS = {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name"],
         "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}}}
POOL_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "pool.kubevirt.io/v1alpha1"}, "kind": {"const": "VirtualMachinePool"},
        "metadata": _META,
        "spec": {"type": "object", "required": ["selector", "virtualMachineTemplate"], "properties": {
            "replicas": {"type": "integer", "minimum": 0},
            "selector": {"type": "object", "required": ["matchLabels"], "properties": {"matchLabels": _LABELS}},
            "virtualMachineTemplate": {"type": "object", "required": ["spec"], "properties": {
                "metadata": {"type": "object", "properties": {"labels": _LABELS}},
                "spec": {"type": "object", "required": ["template"], "properties": {
                    "runStrategy": {"enum": ["Always", "RerunOnFailure", "Manual", "Halted", "Once"]},
                    "template": {"type": "object", "required": ["spec"], "properties": {
                        "metadata": {"type": "object", "properties": {"labels": _LABELS}},
                        "spec": {"type": "object", "required": ["domain"], "properties": {
                            "domain": {"type": "object", "required": ["devices"], "properties": {
                                "devices": {"type": "object", "properties": {
                                    "disks": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                                    "interfaces": {"type": "array", "items": {
                                        "type": "object", "required": ["name"]}}}}}},
                            "networks": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                            "volumes": {"type": "array", "items": {
                                "type": "object", "required": ["name"], "properties": {
                                    "containerDisk": {"type": "object", "required": ["image"]}}}}}}}}}}}}}}},
}
SERVICE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "v1"}, "kind": {"const": "Service"}, "metadata": _META,
        "spec": {"type": "object", "required": ["ports", "selector"], "properties": {
            "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
            "selector": _LABELS,
            "ports": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port"],
                "properties": {"port": {"type": "integer", "minimum": 1, "maximum": 65535},
                               "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}}}}}},
}


def test_kubevirt_manifest_against_the_api_schemas(built):
    out, _ = built
    pool, svc = yaml.safe_load_all((out / "deploy/kubevirt.yaml").read_text())
    jsonschema.validate(pool, POOL_SCHEMA)
    jsonschema.validate(svc, SERVICE_SCHEMA)
    vmt = pool["spec"]["virtualMachineTemplate"]
    vmi = vmt["spec"]["template"]
    # the selector picks the VMs, the Service picks their pods (launcher pods carry the VMI labels)
    assert pool["spec"]["selector"]["matchLabels"].items() <= vmt["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= vmi["metadata"]["labels"].items()
    # every disk has its volume, every interface its network; the volume is the containerDisk
    spec = vmi["spec"]
    assert {d["name"] for d in spec["domain"]["devices"]["disks"]} == {v["name"] for v in spec["volumes"]}
    assert {i["name"] for i in spec["domain"]["devices"]["interfaces"]} == {n["name"] for n in spec["networks"]}
    assert spec["volumes"][0]["containerDisk"]["image"].endswith("haboob-www:latest")
    assert svc["spec"]["ports"][0]["targetPort"] == 80
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**pool, "spec": {"replicas": 2}}, POOL_SCHEMA)


# Heat: the property each resource type requires (OpenStack Heat resource type reference)
HEAT_REQUIRED = {
    "OS::Nova::ServerGroup": [], "OS::Nova::Server": ["flavor"],
    "OS::Octavia::LoadBalancer": ["vip_subnet"], "OS::Octavia::Listener": ["protocol", "protocol_port"],
    "OS::Octavia::Pool": ["lb_algorithm", "protocol"],
    "OS::Octavia::HealthMonitor": ["delay", "max_retries", "pool", "timeout", "type"],
    "OS::Octavia::PoolMember": ["address", "pool", "protocol_port"],
    "OS::Heat::ResourceGroup": ["resource_def"],
}


def _refs(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v if isinstance(v, str) else v[0]
            yield from _refs(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v, key)


def test_heat_template_is_complete(built):
    out, _ = built
    doc = yaml.safe_load((out / "deploy/openstack-heat.yaml").read_text())
    assert str(doc["heat_template_version"]) == "2018-08-31"
    assert set(doc) <= {"heat_template_version", "description", "parameters", "resources", "outputs"}
    res = doc["resources"]
    defs = list(res.values()) + [r["properties"]["resource_def"] for r in res.values()
                                 if r["type"] == "OS::Heat::ResourceGroup"]
    for r in defs:
        assert r["type"] in HEAT_REQUIRED, r["type"]
        missing = [p for p in HEAT_REQUIRED[r["type"]] if p not in r.get("properties", {})]
        assert not missing, (r["type"], missing)
    assert set(_refs(doc, "get_resource")) <= set(res)
    assert set(_refs(doc, "get_attr")) <= set(res)
    assert set(_refs(doc, "get_param")) <= set(doc["parameters"])
    assert res["pool"]["properties"]["listener"] == {"get_resource": "listener"}
    assert res["monitor"]["properties"]["url_path"] == "/"


# ---------------------------------------------------------------- the real image, booted

@pytest.mark.vm
@pytest.mark.parametrize("fmt,firmware,bus", [("aws", "uefi", "nvme"), ("azure", "bios", "ide")])
def test_cloud_disk_boots_and_serves_the_site(image, fmt, firmware, bus):
    """One boot each: the aws raw disk from NVMe under UEFI (EC2 Nitro
    attaches EBS as NVMe), the Azure VHD read by QEMU's VHD driver under BIOS."""
    from tests import image_support as sup
    from vm import check
    from vm.qemu import Options
    from vm.session import session
    disk = image.folder / cloud.PLATFORMS[fmt].file.format(name="www")
    with session(image, Options(net="user", boot="disk", firmware=firmware, nic="virtio", disk=disk,
                                disk_bus=bus)) as s:
        ready = s.machine.wait_ready(400)
        assert ready["ip"] == "198.18.0.1" and ready["driver"] == "virtio_net", ready
        assert "hv_netvsc" not in ready.get("drivers_loaded", []), ready      # no vmbus device here
        bad = [r for r in s.call(check.fetch_all, image, s.host, s.port, sup.EXAMPLE) if not r.ok]
        assert not bad, bad
        assert s.machine.powerdown(90), s.machine.tail()


def test_the_build_lists_its_cloud_formats_in_the_manifest(image):
    m = image.manifest
    assert set(m["formats"]) == {"aws", "azure"}
    for fmt, entry in m["formats"].items():
        for rel, rec in entry["files"].items():
            p = image.folder / rel
            assert rec == {"size": p.stat().st_size, "sha256": formats.sha256_file(p)}
        assert entry["platform"]["nic_driver"] in m["kernel"]["modules"]
    assert {"ena", "hv_netvsc", "hv_vmbus", "gve"} <= set(m["kernel"]["modules"])
    assert "qemu-img" in m["formats_tools"]


def test_a_failing_tool_leaves_nothing(inputs, tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "gzip").write_text("#!/bin/sh\ncat >/dev/null\necho 'gzip: simulated failure' >&2\nexit 1\n")
    (fake / "gzip").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=r"gce \(gzip\) failed: gzip: simulated failure"):
        _write(inputs, out, fmts=("gce",))
    assert list(out.iterdir()) == []
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(BuildError, match=r"missing .*tar \(Debian package tar\); gzip \(Debian package gzip\)"):
        formats.check_tools(["gce"])
