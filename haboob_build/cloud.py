"""Cloud formats and fleet templates: aws, gce, azure, kubevirt, openstack.

Theory of operation: every cloud format is the raw GPT disk of formats.py
(BIOS + UEFI, GRUB on the ESP, the kernel and initramfs beside it) wrapped
the way one platform imports disks. The appliance runs from its initramfs:
GRUB reads the disk through the firmware (EC2's NVMe, Azure's Hyper-V
storage, virtio-blk/scsi), so the kernel itself needs no storage driver,
only the platform's NIC driver (`PLATFORMS[...].nic`), which the build
checks is in --nic-drivers before building anything.

- aws: NAME-aws.raw, the raw disk itself (the format `ec2 import-snapshot`
  takes), registered with `--boot-mode uefi-preferred --ena-support`.
- gce: NAME-gce.tar.gz, `disk.raw` alone in a gzip'ed GNU tar in the old
  GNU format, as Compute Engine's image import requires; disk.raw is grown
  to a whole number of GiB (its import rule), the backup GPT moved to the
  new end. GNU tar with --hole-detection=raw (holes found from the bytes,
  not the file system's allocation), fixed owner/mode/mtime, gzip -n.
- azure: NAME-azure.vhd, a fixed VHD (raw bytes + a 512-byte footer,
  Virtual Hard Disk Image Format Specification 1.0) by `qemu-img convert
  -O vpc -o subformat=fixed,force_size`; Azure wants its virtual size a
  whole number of MiB, which the raw disk already is (1 MiB-aligned
  partitions and tail). qemu-img stamps the footer with the current time
  and a random UUID: `_fix_vhd_footer` replaces them with
  SOURCE_DATE_EPOCH and a UUID derived from the inputs, and re-sums it.
- kubevirt: NAME-kubevirt.oci.tar, a containerDisk: an OCI image layout
  (image-spec 1.1: oci-layout, index.json, blobs/sha256/) as one tar, its
  single uncompressed layer holding disk/NAME.qcow2 owned by 107:107 (the
  qemu user of KubeVirt's launcher pod), written here with tarfile, json
  and hashlib: no container daemon. `skopeo copy oci-archive:...` pushes it.
- openstack: NAME.qcow2 (formats.py) and a Heat template.

Templates (deploy/): a CloudFormation stack for aws (launch template +
autoscaling group + network load balancer, the AMI id a parameter), a
KubeVirt VirtualMachinePool + Service for kubevirt, a Heat stack for
openstack (server group + ResourceGroup of servers + Octavia pool). Each
is data built here and written with yaml.safe_dump (stable key order).

Every artifact is byte-identical for the same inputs and SOURCE_DATE_EPOCH.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class Platform:
    nic: str                 # haboob_build.drivers name the platform's instances need
    nic_what: str            # ... what that NIC is, for the refusal
    file: str                # the artifact, {name} replaced
    template: str | None     # deploy/ template, or None


PLATFORMS: dict[str, Platform] = {
    "aws": Platform("ena", "EC2 Nitro's Elastic Network Adapter", "{name}-aws.raw",
                    "deploy/aws-cloudformation.yaml"),
    "gce": Platform("gve", "Compute Engine's gVNIC", "{name}-gce.tar.gz", None),
    "azure": Platform("hv_netvsc", "Azure's Hyper-V synthetic NIC (netvsc)", "{name}-azure.vhd", None),
    "kubevirt": Platform("virtio_net", "KubeVirt's virtio NIC", "{name}-kubevirt.oci.tar",
                         "deploy/kubevirt.yaml"),
    "openstack": Platform("virtio_net", "OpenStack/KVM's virtio NIC", "{name}.qcow2",
                          "deploy/openstack-heat.yaml"),
}
CLOUD_FORMATS = tuple(PLATFORMS)


class CloudError(BuildError):
    pass


def check_drivers(fmts, nic_drivers) -> None:
    """Refuse a cloud format whose NIC driver is not in the image, naming the fix."""
    nics = list(nic_drivers)
    missing = [(f, PLATFORMS[f]) for f in fmts if f in PLATFORMS and PLATFORMS[f].nic not in nics]
    if missing:
        need = []
        for _, p in missing:
            if p.nic not in need:
                need.append(p.nic)
        what = "; ".join(f"--formats {f} needs the NIC driver {p.nic} ({p.nic_what})" for f, p in missing)
        raise CloudError(f"{what}, and --nic-drivers {','.join(nics)} leaves it out: "
                         f"add it, e.g. --nic-drivers {','.join(nics + need)}")


def _run(argv, what, **kw):
    from .formats import _run as run
    return run(argv, what=what, **kw)


def _tmp(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp")


# ---------------------------------------------------------------- aws

def make_aws(raw: Path, out: Path) -> Path:
    """The raw disk as EC2 imports it (a hard link when on the same file system)."""
    tmp = _tmp(out)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(raw, tmp)
        except OSError:
            shutil.copyfile(raw, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- gce

def make_gce(raw_gib: Path, out: Path, *, epoch: int) -> Path:
    """disk.raw (already a whole number of GiB) in an oldgnu tar, gzip'ed."""
    import subprocess
    if raw_gib.stat().st_size % GIB:
        raise CloudError(f"gce: disk.raw is {raw_gib.stat().st_size} bytes, not a whole number of GiB")
    tmp = _tmp(out)
    folder = raw_gib.parent / f".{out.name}.d"        # the member must be named exactly disk.raw
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        try:
            os.link(raw_gib, folder / "disk.raw")
        except OSError:
            shutil.copyfile(raw_gib, folder / "disk.raw")
        tar_argv = ["tar", "--format=oldgnu", "-S", "--hole-detection=raw", "--numeric-owner", "--owner=0",
                    "--group=0", "--mode=0644", f"--mtime=@{int(epoch)}", "-C", str(folder), "-cf", "-",
                    "disk.raw"]
        with open(tmp, "wb") as f:
            try:
                tar = subprocess.Popen(tar_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            except FileNotFoundError:
                raise CloudError("gce: the tool 'tar' is not installed") from None
            # gzip -n: no file name or time stamp in the gzip header (RFC 1952 FNAME, MTIME)
            gz = subprocess.run(["gzip", "-n", "-9", "-c"], stdin=tar.stdout, stdout=f, stderr=subprocess.PIPE)
            tar.stdout.close()
            tar_err = tar.stderr.read().decode(errors="replace").strip()
            tar.stderr.close()
            if tar.wait() != 0:
                raise CloudError(f"gce (tar) failed: {tar_err}")
            if gz.returncode != 0:
                raise CloudError(f"gce (gzip) failed: {gz.stderr.decode(errors='replace').strip()}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    return out


# ---------------------------------------------------------------- azure

VHD_EPOCH = 946684800            # 2000-01-01 00:00:00 UTC, the VHD time stamp's origin


def vhd_checksum(footer: bytes) -> int:
    """The footer's checksum: ones' complement of the byte sum, checksum field (64..68) as zero."""
    return ~sum(footer[:64] + bytes(4) + footer[68:]) & 0xFFFFFFFF


def _fix_vhd_footer(path: Path, *, epoch: int, seed: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(-512, os.SEEK_END)
        footer = bytearray(f.read(512))
        if footer[:8] != b"conectix":
            raise CloudError(f"azure: {path.name} has no VHD footer (qemu-img wrote something else)")
        struct.pack_into(">I", footer, 24, max(0, int(epoch) - VHD_EPOCH) & 0xFFFFFFFF)
        footer[68:84] = uuid.UUID(bytes=hashlib.sha256(seed + b"vhd").digest()[:16], version=4).bytes
        struct.pack_into(">I", footer, 64, vhd_checksum(bytes(footer)))
        f.seek(-512, os.SEEK_END)
        f.write(footer)


def make_azure(raw: Path, out: Path, *, epoch: int, seed: bytes) -> Path:
    size = raw.stat().st_size
    if size % MIB:
        raise CloudError(f"azure: the disk is {size} bytes, not a whole number of MiB")
    tmp = _tmp(out)
    try:
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size",
              raw, tmp], "azure VHD (qemu-img convert)")
        _fix_vhd_footer(tmp, epoch=epoch, seed=seed)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- kubevirt

QEMU_UID = 107                   # KubeVirt's virt-launcher runs QEMU as 107:107
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def _tarinfo(name: str, *, size: int = 0, mode: int, epoch: int, uid: int = 0, kind=tarfile.REGTYPE):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.type = size, mode, int(epoch), kind
    ti.uid = ti.gid = uid
    ti.uname = ti.gname = ""
    return ti


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_kubevirt(qcow2: Path, out: Path, *, name: str, epoch: int) -> Path:
    """An OCI image layout archive whose one layer holds /disk/NAME.qcow2."""
    disk_name = f"disk/{name}.qcow2"
    tmp = _tmp(out)
    layer_path = out.with_name(f".{out.name}.layer")
    try:
        # the layer: a directory and the disk, USTAR headers (sizes < 8 GiB), fixed metadata
        with tarfile.open(layer_path, "w", format=tarfile.USTAR_FORMAT) as t:
            t.addfile(_tarinfo("disk/", mode=0o555, epoch=epoch, uid=QEMU_UID, kind=tarfile.DIRTYPE))
            with open(qcow2, "rb") as src:
                t.addfile(_tarinfo(disk_name, size=qcow2.stat().st_size, mode=0o440, epoch=epoch,
                                   uid=QEMU_UID), src)
        with open(layer_path, "rb") as f:
            layer_digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        layer_size = layer_path.stat().st_size
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "created": created,
            "config": {"Labels": {"org.opencontainers.image.title": f"Haboob {name} containerDisk"}},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created": created, "created_by": "haboob build.py --formats kubevirt"}],
        }, sort_keys=True, separators=(",", ":")).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": _sha(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": layer_size}],
            "annotations": {"org.opencontainers.image.created": created},
        }, sort_keys=True, separators=(",", ":")).encode()
        index = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": _sha(manifest), "size": len(manifest),
                           "platform": {"architecture": "amd64", "os": "linux"},
                           "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
        }, sort_keys=True, separators=(",", ":")).encode()
        layout = b'{"imageLayoutVersion":"1.0.0"}'
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as t:
            def add(path, data=None, src=None, size=None, kind=tarfile.REGTYPE, mode=0o644):
                ti = _tarinfo(path, size=len(data) if data is not None else (size or 0), mode=mode, epoch=epoch,
                              kind=kind)
                t.addfile(ti, io.BytesIO(data) if data is not None else src)
            add("blobs/", kind=tarfile.DIRTYPE, mode=0o755)
            add("blobs/sha256/", kind=tarfile.DIRTYPE, mode=0o755)
            for data in (config, manifest):
                add(f"blobs/sha256/{_sha(data)[7:]}", data)
            with open(layer_path, "rb") as src:
                add(f"blobs/sha256/{layer_digest[7:]}", src=src, size=layer_size)
            add("index.json", index)
            add("oci-layout", layout)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        layer_path.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- templates

def cloudformation(name: str) -> dict:
    """EC2 launch template + autoscaling group behind a network load balancer."""
    ref = lambda n: {"Ref": n}                                   # noqa: E731
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": f"Haboob {name}: appliances in an autoscaling group behind a network load balancer",
        "Parameters": {
            "ImageId": {"Type": "AWS::EC2::Image::Id",
                        "Description": f"the AMI registered from {name}-aws.raw (docs/deploy.md)"},
            "VpcId": {"Type": "AWS::EC2::VPC::Id"},
            "Subnets": {"Type": "List<AWS::EC2::Subnet::Id>",
                        "Description": "subnets (one per availability zone) for the instances and the NLB"},
            "InstanceType": {"Type": "String", "Default": "c6i.large",
                             "Description": "a Nitro instance type (ENA)"},
            "DesiredCapacity": {"Type": "Number", "Default": 2, "MinValue": 1},
            "MaxSize": {"Type": "Number", "Default": 4, "MinValue": 1},
        },
        "Resources": {
            "InstanceSecurityGroup": {
                "Type": "AWS::EC2::SecurityGroup",
                "Properties": {
                    "GroupDescription": f"Haboob {name}: HTTP from clients (the NLB keeps their addresses)",
                    "VpcId": ref("VpcId"),
                    "SecurityGroupIngress": [{"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80,
                                              "CidrIp": "0.0.0.0/0"}],
                },
            },
            "LaunchTemplate": {
                "Type": "AWS::EC2::LaunchTemplate",
                "Properties": {
                    "LaunchTemplateData": {
                        "ImageId": ref("ImageId"),
                        "InstanceType": ref("InstanceType"),
                        "SecurityGroupIds": [ref("InstanceSecurityGroup")],
                        "MetadataOptions": {"HttpTokens": "required"},
                    },
                },
            },
            "TargetGroup": {
                "Type": "AWS::ElasticLoadBalancingV2::TargetGroup",
                "Properties": {
                    "VpcId": ref("VpcId"), "Protocol": "TCP", "Port": 80, "TargetType": "instance",
                    "HealthCheckProtocol": "HTTP", "HealthCheckPath": "/", "HealthCheckIntervalSeconds": 10,
                    "HealthyThresholdCount": 2, "UnhealthyThresholdCount": 2,
                },
            },
            "LoadBalancer": {
                "Type": "AWS::ElasticLoadBalancingV2::LoadBalancer",
                "Properties": {"Type": "network", "Scheme": "internet-facing", "Subnets": ref("Subnets")},
            },
            "Listener": {
                "Type": "AWS::ElasticLoadBalancingV2::Listener",
                "Properties": {
                    "LoadBalancerArn": ref("LoadBalancer"), "Protocol": "TCP", "Port": 80,
                    "DefaultActions": [{"Type": "forward", "TargetGroupArn": ref("TargetGroup")}],
                },
            },
            "AutoScalingGroup": {
                "Type": "AWS::AutoScaling::AutoScalingGroup",
                "Properties": {
                    "MinSize": "1", "MaxSize": ref("MaxSize"), "DesiredCapacity": ref("DesiredCapacity"),
                    "VPCZoneIdentifier": ref("Subnets"),
                    "LaunchTemplate": {"LaunchTemplateId": ref("LaunchTemplate"),
                                       "Version": {"Fn::GetAtt": ["LaunchTemplate", "LatestVersionNumber"]}},
                    "TargetGroupARNs": [ref("TargetGroup")],
                    "HealthCheckType": "ELB", "HealthCheckGracePeriod": 120,
                },
            },
        },
        "Outputs": {
            "URL": {"Description": "the site, through the load balancer",
                    "Value": {"Fn::Join": ["", ["http://", {"Fn::GetAtt": ["LoadBalancer", "DNSName"]}, "/"]]}},
        },
    }


def kubevirt_manifests(name: str, replicas: int = 2) -> list[dict]:
    """A VirtualMachinePool of the containerDisk and a Service in front of it."""
    labels = {"app.kubernetes.io/name": f"haboob-{name}".lower()}
    vm_name = f"haboob-{name}".lower().replace("_", "-").replace(".", "-")
    return [
        {"apiVersion": "pool.kubevirt.io/v1alpha1", "kind": "VirtualMachinePool",
         "metadata": {"name": vm_name},
         "spec": {
             "replicas": replicas,
             "selector": {"matchLabels": labels},
             "virtualMachineTemplate": {
                 "metadata": {"labels": labels},
                 "spec": {
                     "runStrategy": "Always",
                     "template": {
                         "metadata": {"labels": labels},
                         "spec": {
                             "domain": {
                                 "cpu": {"cores": 1},
                                 "resources": {"requests": {"memory": "512Mi"}},
                                 "devices": {
                                     "disks": [{"name": "containerdisk", "disk": {"bus": "virtio"},
                                                "bootOrder": 1}],
                                     "interfaces": [{"name": "default", "masquerade": {},
                                                     "ports": [{"name": "http", "port": 80}]}],
                                 },
                             },
                             "networks": [{"name": "default", "pod": {}}],
                             "readinessProbe": {"tcpSocket": {"port": 80}, "initialDelaySeconds": 20,
                                                "periodSeconds": 5},
                             "livenessProbe": {"httpGet": {"path": "/", "port": 80}, "initialDelaySeconds": 60,
                                               "periodSeconds": 10},
                             "volumes": [{"name": "containerdisk",
                                          "containerDisk": {"image": f"REGISTRY/haboob-{name.lower()}:latest"}}],
                         },
                     },
                 },
             },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": vm_name},
         "spec": {"type": "LoadBalancer", "selector": labels,
                  "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80}]}},
    ]


def heat(name: str) -> dict:
    """HOT: an anti-affinity server group, N servers, an Octavia load balancer."""
    gr = lambda r: {"get_resource": r}                           # noqa: E731
    gp = lambda p: {"get_param": p}                              # noqa: E731
    return {
        "heat_template_version": "2018-08-31",
        "description": f"Haboob {name}: appliances in a server group behind an Octavia load balancer",
        "parameters": {
            "image": {"type": "string", "description": f"the Glance image uploaded from {name}.qcow2"},
            "flavor": {"type": "string", "default": "m1.small"},
            "network": {"type": "string", "description": "the tenant network of the appliances"},
            "subnet": {"type": "string", "description": "its subnet (the load balancer's VIP and members)"},
            "count": {"type": "number", "default": 2, "constraints": [{"range": {"min": 1}}]},
        },
        "resources": {
            "group": {"type": "OS::Nova::ServerGroup",
                      "properties": {"name": f"haboob-{name}", "policies": ["anti-affinity"]}},
            "lb": {"type": "OS::Octavia::LoadBalancer", "properties": {"vip_subnet": gp("subnet")}},
            "listener": {"type": "OS::Octavia::Listener",
                         "properties": {"loadbalancer": gr("lb"), "protocol": "TCP", "protocol_port": 80}},
            "pool": {"type": "OS::Octavia::Pool",
                     "properties": {"listener": gr("listener"), "lb_algorithm": "ROUND_ROBIN",
                                    "protocol": "TCP"}},
            "monitor": {"type": "OS::Octavia::HealthMonitor",
                        "properties": {"pool": gr("pool"), "type": "HTTP", "url_path": "/", "delay": 5,
                                       "timeout": 3, "max_retries": 2}},
            "servers": {
                "type": "OS::Heat::ResourceGroup",
                "properties": {
                    "count": gp("count"),
                    "resource_def": {
                        "type": "OS::Nova::Server",
                        "properties": {
                            "name": f"haboob-{name}-%index%",
                            "image": gp("image"), "flavor": gp("flavor"),
                            "networks": [{"network": gp("network")}],
                            "scheduler_hints": {"group": gr("group")},
                        },
                    },
                },
            },
            # one pool member per server: Octavia learns the addresses from the ResourceGroup
            "members": {
                "type": "OS::Heat::ResourceGroup",
                "properties": {
                    "count": gp("count"),
                    "resource_def": {
                        "type": "OS::Octavia::PoolMember",
                        "properties": {
                            "pool": gr("pool"), "protocol_port": 80, "subnet": gp("subnet"),
                            "address": {"yaql": {
                                "expression": "$.data.addrs[int($.data.i)]",
                                "data": {"addrs": {"get_attr": ["servers", "first_address"]},
                                         "i": "%index%"}}},
                        },
                    },
                },
            },
        },
        "outputs": {
            "url": {"description": "the site, through the load balancer",
                    "value": {"str_replace": {"template": "http://VIP/",
                                              "params": {"VIP": {"get_attr": ["lb", "vip_address"]}}}}},
        },
    }


def _yaml(doc, header: str) -> bytes:
    import yaml
    docs = doc if isinstance(doc, list) else [doc]
    body = yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=100)
    return (header + body).encode()


def write_template(fmt: str, folder: Path, name: str) -> Path:
    rel = PLATFORMS[fmt].template
    out = folder / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Haboob {name}: {fmt} deployment, written by build.py (docs/deploy.md says how to apply it)\n"
    doc = {"aws": lambda: cloudformation(name), "kubevirt": lambda: kubevirt_manifests(name),
           "openstack": lambda: heat(name)}[fmt]()
    tmp = _tmp(out)
    tmp.write_bytes(_yaml(doc, header))
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- commands

def commands(fmt: str, name: str, folder: str) -> list[str]:
    """The upload/registration commands, as the build prints them (docs/deploy.md has them too)."""
    n = name.lower()
    f = f"{folder}/{PLATFORMS[fmt].file.format(name=name)}"
    if fmt == "aws":
        return [
            f"aws s3 cp {f} s3://BUCKET/{name}-aws.raw",
            f"aws ec2 import-snapshot --description haboob-{n} "
            f"--disk-container Format=RAW,UserBucket={{S3Bucket=BUCKET,S3Key={name}-aws.raw}}",
            "aws ec2 describe-import-snapshot-tasks --import-task-ids IMPORT_TASK_ID   # until completed: SNAPSHOT_ID",
            f"aws ec2 register-image --name haboob-{n} --architecture x86_64 --virtualization-type hvm "
            f"--boot-mode uefi-preferred --ena-support --root-device-name /dev/xvda "
            f"--block-device-mappings DeviceName=/dev/xvda,Ebs={{SnapshotId=SNAPSHOT_ID}}",
            f"aws cloudformation deploy --stack-name haboob-{n} "
            f"--template-file {folder}/{PLATFORMS['aws'].template} "
            f"--parameter-overrides ImageId=AMI_ID VpcId=VPC_ID Subnets=SUBNET_A,SUBNET_B",
        ]
    if fmt == "gce":
        return [
            f"gsutil cp {f} gs://BUCKET/{name}-gce.tar.gz",
            f"gcloud compute images create haboob-{n} --source-uri gs://BUCKET/{name}-gce.tar.gz "
            f"--guest-os-features UEFI_COMPATIBLE,GVNIC",
            f"gcloud compute instances create haboob-{n}-1 --image haboob-{n} --network-interface nic-type=GVNIC",
        ]
    if fmt == "azure":
        return [
            f"az storage blob upload --account-name ACCOUNT --container-name vhds --type page "
            f"--file {f} --name {name}-azure.vhd",
            f"az image create --resource-group RG --name haboob-{n} --os-type Linux --hyper-v-generation V2 "
            f"--source https://ACCOUNT.blob.core.windows.net/vhds/{name}-azure.vhd",
        ]
    if fmt == "kubevirt":
        return [
            f"skopeo copy oci-archive:{f} docker://REGISTRY/haboob-{n}:latest",
            f"kubectl apply -f {folder}/{PLATFORMS['kubevirt'].template}   # after setting REGISTRY in it",
        ]
    if fmt == "openstack":
        return [
            f"openstack image create haboob-{n} --disk-format qcow2 --container-format bare "
            f"--property hw_vif_model=virtio --property hw_firmware_type=uefi --file {f}",
            f"openstack stack create haboob-{n} -t {folder}/{PLATFORMS['openstack'].template} "
            f"--parameter image=haboob-{n} --parameter network=NET --parameter subnet=SUBNET",
        ]
    raise CloudError(f"no commands for {fmt}")
