"""The configuration volume: per-deployment settings read once at boot.

Theory of operation: settings that change per deployment (address, gateway,
NIC, the TLS certificate) come from a small disk the operator or the
cloud attaches, never from a shell. PID 1 calls `read_settings()` once,
after the storage and file system modules are loaded:

1. `find_volumes()` scans /sys/class/block and reads each device's label
   straight from its first sectors (`volume_label`): the FAT boot sector's
   volume label (0x2B for FAT12/16, 0x47 for FAT32) or the ISO 9660
   primary volume descriptor's volume id (0x8028, ECMA-119 8.4.5);
2. the volumes are mounted read-only with init.py's mount(), by label
   priority, until one carries settings; its few files are read (each at
   most MAX_FILE bytes) and it is unmounted again; TLS files are copied to
   RUN (RAM) and passed on as paths. The disk image's EFI system partition
   is labelled HABOOB too (haboob_build/formats.py): it is read like any
   other (a haboob.conf put there configures a SATA/virtio disk made from
   NAME.img; USB sticks are not read: no usb-storage in the image), and
   without one it is skipped silently;
3. the files are parsed into haboob.KEY=VALUE settings, the same words as
   the kernel command line (`haboob.ip` (an address or `dhcp`), `haboob.gw`,
   `haboob.mac`, `haboob.workers`, `haboob.ip6` (off, auto or ADDR/PREFIX),
   `haboob.gw6` (with a static haboob.ip6= in the same file)), validated here so that a bad volume never reaches
   settings() (which is fatal for bad command line values).

Labels and forms:
- HABOOB (FAT or ISO, written by `build.py config-volume`): haboob.conf,
  one haboob.KEY=VALUE per line, # comments; optional tls/fullchain.pem and
  tls/key.pem;
- cidata / CIDATA (cloud-init NoCloud): meta-data (read, checked), the
  first static IPv4 address of network-config (v1 `subnets`, v2
  `ethernets`, YAML or JSON) and its gateway and MAC match; user-data only
  when it starts with `#haboob` (then it is a haboob.conf); a DHCP-only
  network-config is refused like a malformed one (the built-in settings,
  DHCP by default, apply);
- config-2 (OpenStack config drive): the first `ipv4` network of
  openstack/latest/network_data.json, its default route and link MAC.

Precedence (`merge`): build defaults < volume < kernel command line. The
image's own command line repeats the build's address (haboob.ip= in
`cmdline` and grub.cfg), so a command line word equal to the build default
is a default, not an operator's choice; any other value typed at the GRUB
prompt or given to -append wins over the volume.

Malformed contents: a `HABOOB-WARN <file>: <problem>` console line and the
whole volume is ignored (the built-in settings apply); nothing here raises
into PID 1.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re

LABELS = ("HABOOB", "CONFIG-2", "CIDATA")   # priority order, compared upper-case
KEYS = ("ip", "gw", "mac", "workers", "ip6", "gw6")   # haboob.KEY= words a volume may set
MAX_FILE = 256 * 1024                       # no config file is larger; a bigger one is refused
RUN = "/run/haboob/config"                  # where TLS files are copied (RAM)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


class ConfigError(Exception):
    """A volume's file is malformed: str() names the file and the problem."""

    def __init__(self, file: str, problem: str):
        super().__init__(f"{file}: {problem}")
        self.file, self.problem = file, problem


# -- labels ------------------------------------------------------------------------------------

def volume_label(head: bytes) -> tuple[str, str] | None:
    """(fstype, label) from a device's first 0x8800 bytes: 'iso9660' or 'vfat', or None."""
    pvd = head[0x8000:0x8800]
    if len(pvd) >= 0x48 and pvd[0] == 1 and pvd[1:6] == b"CD001":
        return "iso9660", pvd[0x28:0x48].decode("ascii", "replace").strip()
    bs = head[:512]
    if len(bs) < 512 or bs[510:512] != b"\x55\xaa":
        return None
    per_sector = int.from_bytes(bs[11:13], "little")
    if per_sector not in (512, 1024, 2048, 4096) or bs[13] == 0:
        return None                       # not a FAT BPB (an MBR, another file system)
    if int.from_bytes(bs[0x16:0x18], "little") == 0:      # sectors per FAT 0: FAT32's extended BPB
        sig, label, kind = bs[0x42], bs[0x47:0x52], bs[0x52:0x5A]
    else:
        sig, label, kind = bs[0x26], bs[0x2B:0x36], bs[0x36:0x3E]
    if sig not in (0x28, 0x29) or not kind.startswith(b"FAT"):
        return None
    return "vfat", label.decode("ascii", "replace").strip() if sig == 0x29 else ""


def find_volumes(sys_block: str = "/sys/class/block", dev: str = "/dev") -> list[tuple[str, str, str]]:
    """[(device path, fstype, LABEL)] of the block devices carrying a known label, by priority."""
    found = []
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return []
    for name in names:
        if name.startswith(("loop", "ram", "zram")):
            continue
        path = f"{dev}/{name}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue                      # a CD drive without a disc: ENOMEDIUM
        try:
            head = os.pread(fd, 0x8800, 0)
        except OSError:
            head = b""
        finally:
            os.close(fd)
        got = volume_label(head)
        if got and got[1].upper() in LABELS:
            found.append((path, got[0], got[1].upper()))
    return sorted(found, key=lambda v: LABELS.index(v[2]))


# -- haboob.conf -----------------------------------------------------------------------------

def check_value(key: str, value: str) -> str:
    """The value in canonical form, or ValueError saying what is wrong."""
    if key == "ip":
        if value == "dhcp":
            return value
        if "/" not in value:
            raise ValueError(f"haboob.ip={value!r} has no prefix (198.18.0.1/24)")
        try:
            return str(ipaddress.IPv4Interface(value))
        except ValueError:
            raise ValueError(f"haboob.ip={value!r} is not an IPv4 address with a prefix") from None
    if key == "gw":
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError(f"haboob.gw={value!r} is not an IPv4 address") from None
    if key == "mac":
        if not _MAC.fullmatch(value.lower()):
            raise ValueError(f"haboob.mac={value!r} is not a MAC address like 52:54:00:12:34:56")
        return value.lower()
    if key == "workers":
        if not value.isdigit() or not 1 <= int(value) <= 256:
            raise ValueError(f"haboob.workers={value!r} is not a number of workers (1..256)")
        return str(int(value))
    if key == "ip6":
        from .stack.ipv6 import ip6_mode
        return str(ip6_mode(value, None, "haboob.ip6="))          # off, auto, or ADDR/PREFIX canonical
    if key == "gw6":
        try:
            g = ipaddress.IPv6Address(value)
        except ValueError:
            raise ValueError(f"haboob.gw6={value!r} is not an IPv6 address") from None
        if g.is_multicast or g.is_unspecified or g.is_loopback:
            raise ValueError(f"haboob.gw6={value!r} is not a router's unicast address")
        return str(g)
    raise ValueError(f"unknown setting haboob.{key} (known: {', '.join('haboob.' + k for k in KEYS)})")


def parse_conf(text: str, file: str = "haboob.conf") -> dict:
    """haboob.conf -> {KEY: VALUE}: one haboob.KEY=VALUE per line, blank lines and # comments."""
    out: dict = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not line.startswith("haboob.") or "=" not in line or " " in line or "\t" in line:
            raise ConfigError(file, f"line {n}: {line!r} is not haboob.KEY=VALUE")
        key, value = line[len("haboob."):].split("=", 1)
        if key in out:
            raise ConfigError(file, f"line {n}: haboob.{key} given twice")
        try:
            out[key] = check_value(key, value)
        except ValueError as e:
            raise ConfigError(file, f"line {n}: {e}") from None
    if "gw6" in out:                      # the gateway is checked against its address (on-link?)
        from .stack.ipv6 import ip6_mode
        try:
            ip6_mode(out.get("ip6", "off"), out["gw6"], "haboob.ip6=", "haboob.gw6=")
        except ValueError as e:
            raise ConfigError(file, str(e)) from None
    return out


# -- a YAML subset (cloud-init's files): block mappings and sequences, scalars, flow lists -------

def _scalar(s: str):
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    if s.startswith("[") and s.endswith("]"):
        return [_scalar(x) for x in s[1:-1].split(",") if x.strip()]
    if s.startswith("{") or s in ("|", ">"):
        raise ValueError(f"unsupported YAML construct {s[:20]!r}")
    low = s.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "~", ""):
        return None
    return int(s) if re.fullmatch(r"-?\d+", s) else s


def _strip_comment(line: str) -> str:
    q = None
    for i, c in enumerate(line):
        if q:
            q = None if c == q else q
        elif c in "'\"":
            q = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def parse_yaml(text: str):
    """The subset of YAML that meta-data and network-config use; JSON too.
    ValueError (with a line number) for anything else."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    lines = []
    for n, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[:len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {n}: tab in indentation")
        line = _strip_comment(raw)
        if line.strip() and line.strip() not in ("---", "..."):
            lines.append((n, len(line) - len(line.lstrip()), line.strip()))
    pos = 0

    def block(indent):
        nonlocal pos
        n, ind, s = lines[pos]
        if s.startswith("- ") or s == "-":
            out = []
            while pos < len(lines) and lines[pos][1] == ind and (lines[pos][2].startswith("- ")
                                                                  or lines[pos][2] == "-"):
                n, _, s = lines[pos]
                rest = s[1:].strip()
                if not rest:
                    pos += 1
                    out.append(block(lines[pos][1]) if pos < len(lines) and lines[pos][1] > ind else None)
                    continue
                # "- key: value" opens a mapping at the column after "- "
                lines[pos] = (n, ind + (len(s) - len(rest)), rest)
                if _key(rest) is not None:
                    out.append(block(lines[pos][1]))
                else:
                    pos += 1
                    out.append(_scalar(rest))
            return out
        out = {}
        while pos < len(lines) and lines[pos][1] == ind:
            n, _, s = lines[pos]
            kv = _key(s)
            if kv is None:
                raise ValueError(f"line {n}: expected 'key: value', got {s[:40]!r}")
            k, v = kv
            pos += 1
            if v:
                out[k] = _scalar(v)
            elif pos < len(lines) and (lines[pos][1] > ind or (lines[pos][1] == ind
                                                                and lines[pos][2].startswith("-"))):
                out[k] = block(lines[pos][1])
            else:
                out[k] = None
        if pos < len(lines) and lines[pos][1] > indent:
            raise ValueError(f"line {lines[pos][0]}: unexpected indentation")
        return out

    def _key(s):
        m = re.match(r"""("[^"]*"|'[^']*'|[^:'"\s][^:]*?)\s*:(\s+(.*))?$""", s)
        if not m:
            return None
        return _scalar(m.group(1)), (m.group(3) or "").strip()

    if not lines:
        return {}
    try:
        doc = block(lines[0][1])
    except IndexError:
        raise ValueError("unexpected end of document") from None
    if pos != len(lines):
        raise ValueError(f"line {lines[pos][0]}: unexpected indentation")
    return doc


# -- cloud forms -----------------------------------------------------------------------------

def _static(address, netmask=None, gateway=None, mac=None, file="") -> dict:
    try:
        iface = ipaddress.IPv4Interface(f"{address}/{netmask}" if netmask and "/" not in str(address)
                                        else str(address))
    except ValueError:
        raise ConfigError(file, f"address {address!r} (netmask {netmask!r}) is not IPv4") from None
    if "/" not in str(address) and not netmask:
        raise ConfigError(file, f"address {address!r} has no prefix or netmask")
    out = {"ip": str(iface)}
    try:
        if gateway:
            out["gw"] = check_value("gw", str(gateway))
        if mac:
            out["mac"] = check_value("mac", str(mac))
    except ValueError as e:
        raise ConfigError(file, str(e)) from None
    return out


def parse_network_config(text: str, file: str = "network-config") -> dict:
    """NoCloud network-config, version 1 or 2 -> the first static IPv4 as {ip, gw, mac}."""
    try:
        doc = parse_yaml(text)
    except ValueError as e:
        raise ConfigError(file, f"not YAML/JSON: {e}") from None
    if isinstance(doc, dict) and isinstance(doc.get("network"), dict):
        doc = doc["network"]
    if not isinstance(doc, dict) or doc.get("version") not in (1, 2):
        raise ConfigError(file, "no 'version: 1' or 'version: 2'")
    if doc["version"] == 1:
        for ent in doc.get("config") or []:
            if not isinstance(ent, dict) or ent.get("type") != "physical":
                continue
            for sub in ent.get("subnets") or []:
                if isinstance(sub, dict) and sub.get("type") in ("static", "static4") and \
                        ":" not in str(sub.get("address", ":")):
                    return _static(sub.get("address"), sub.get("netmask"), sub.get("gateway"),
                                   ent.get("mac_address"), file)
    else:
        eths = doc.get("ethernets") or {}
        if not isinstance(eths, dict):
            raise ConfigError(file, "'ethernets' is not a mapping")
        for eth in eths.values():
            if not isinstance(eth, dict):
                continue
            addrs = eth.get("addresses") or []
            v4 = [a for a in (addrs if isinstance(addrs, list) else [addrs]) if ":" not in str(a)]
            if not v4:
                continue
            gw = eth.get("gateway4")
            for r in eth.get("routes") or []:
                if isinstance(r, dict) and str(r.get("to")) in ("default", "0.0.0.0/0") and not gw:
                    gw = r.get("via")
            match = eth.get("match") if isinstance(eth.get("match"), dict) else {}
            return _static(v4[0], None, gw, match.get("macaddress"), file)
    raise ConfigError(file, "no static IPv4 address (DHCP-only configurations are not supported)")


def parse_meta_data(text: str, file: str = "meta-data") -> dict:
    """NoCloud meta-data: checked to be a mapping; it carries nothing haboob uses (instance-id)."""
    try:
        doc = parse_yaml(text)
    except ValueError as e:
        raise ConfigError(file, f"not YAML/JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(file, "not a mapping (instance-id: ...)")
    return {}


def parse_user_data(text: str, file: str = "user-data") -> dict:
    """user-data is cloud-init's; only a '#haboob' first line makes it a haboob.conf."""
    first, _, rest = text.partition("\n")
    return parse_conf(rest, file) if first.strip() == "#haboob" else {}


def parse_network_data(text: str, file: str = "openstack/latest/network_data.json") -> dict:
    """OpenStack network_data.json -> the first 'ipv4' network as {ip, gw, mac}."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(file, f"not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("networks", []), list):
        raise ConfigError(file, "not a network_data object with a 'networks' list")
    links = {l.get("id"): l for l in doc.get("links") or [] if isinstance(l, dict)}
    for net in doc.get("networks") or []:
        if not isinstance(net, dict) or net.get("type") != "ipv4":
            continue
        gw = None
        for r in net.get("routes") or []:
            if isinstance(r, dict) and r.get("network") == "0.0.0.0" and r.get("netmask") == "0.0.0.0":
                gw = r.get("gateway")
        mac = links.get(net.get("link"), {}).get("ethernet_mac_address")
        return _static(net.get("ip_address"), net.get("netmask"), gw, mac, file)
    raise ConfigError(file, "no static 'ipv4' network (DHCP-only configurations are not supported)")


def parse_files(label: str, files: dict) -> dict:
    """{relative path: bytes} of a volume with this label -> settings; ConfigError if malformed."""
    def text(name):
        try:
            return files[name].decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(name, "not UTF-8 text") from None
    out: dict = {}
    if label == "HABOOB":
        if "haboob.conf" in files:
            out.update(parse_conf(text("haboob.conf")))
        for key, name in (("tls_cert", "tls/fullchain.pem"), ("tls_key", "tls/key.pem")):
            if name in files and b"-----BEGIN " not in files[name]:
                raise ConfigError(name, "not a PEM file (no -----BEGIN line)")
        if ("tls/fullchain.pem" in files) != ("tls/key.pem" in files):
            raise ConfigError("tls/", "needs both fullchain.pem and key.pem")
    elif label == "CIDATA":
        if "meta-data" not in files:
            raise ConfigError("meta-data", "missing (NoCloud needs it)")
        parse_meta_data(text("meta-data"))
        if "network-config" in files:
            out.update(parse_network_config(text("network-config")))
        if "user-data" in files:
            out.update(parse_user_data(text("user-data")))
    elif label == "CONFIG-2":
        name = "openstack/latest/network_data.json"
        if name in files:
            out.update(parse_network_data(text(name)))
    return out


# -- reading a volume ------------------------------------------------------------------------

WANTED = {"HABOOB": ("haboob.conf", "tls/fullchain.pem", "tls/key.pem"),
          "CIDATA": ("meta-data", "network-config", "user-data"),
          "CONFIG-2": ("openstack/latest/network_data.json",)}


def read_tree(root: str, label: str) -> dict:
    """The files of WANTED[label] under a mounted volume, {relative path: bytes}."""
    files = {}
    for name in WANTED[label]:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        if os.path.getsize(path) > MAX_FILE:
            raise ConfigError(name, f"larger than {MAX_FILE} bytes")
        with open(path, "rb") as f:
            files[name] = f.read(MAX_FILE + 1)
    return files


def merge(config: dict, volume: dict, cmdline: dict) -> dict:
    """haboob.KEY args: build defaults < volume < kernel command line (see the module docstring);
    a command line word that only repeats the build default does not override the volume (nor
    does the build's gateway when the volume gives the address: it belongs to the build's)."""
    defaults = {"ip": config.get("ip"), "gw": config.get("gateway"), "ip6": config.get("ip6"),
                "gw6": config.get("gateway6")}
    out = dict(volume)
    for k, v in cmdline.items():
        owner = {"gw": "ip", "gw6": "ip6"}.get(k, k)    # a default gateway goes with its default address
        if (k in volume or owner in volume) and defaults.get(k) is not None:
            try:
                same = check_value(k, v) == check_value(k, str(defaults[k]))
            except ValueError:
                same = False
            if same:
                continue
        out[k] = v
    return out


def read_settings(mount, say, config: dict, cmdline: dict, prepare=None, root: str = "/run/haboob/volume",
                  sys_block: str = "/sys/class/block", dev: str = "/dev") -> dict:
    """PID 1's one call: the haboob.KEY args to use (merge() of the build defaults, the first
    configuration volume found, and the command line). prepare(): called once a volume is
    found, before mounting it (loads the file system modules). Never raises: a bad or
    unreadable volume is a HABOOB-WARN line and the built-in settings."""
    volume: dict = {}
    try:
        for i, (path, fstype, label) in enumerate(find_volumes(sys_block, dev)):
            if i == 0 and prepare is not None:
                prepare()
            volume = _read_volume(mount, path, fstype, label, root)
            if volume:                    # else an empty one (the boot disk's EFI partition): the next
                shown = " ".join(f"haboob.{k}={v}" for k, v in volume.items() if k in KEYS)
                say(f"haboob: configuration volume {label} on {path}: {shown or 'no network settings'}")
                break
    except ConfigError as e:
        say(f"HABOOB-WARN configuration volume: {e}; using the built-in settings")
        volume = {}
    except Exception as e:                # an I/O error, a mount refused: never PID 1's end
        say(f"HABOOB-WARN configuration volume: {type(e).__name__}: {e}; using the built-in settings")
        volume = {}
    return merge(config, volume, cmdline)


def _read_volume(mount, dev: str, fstype: str, label: str, root: str) -> dict:
    import ctypes
    mount(dev, root, fstype, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    try:
        files = read_tree(root, label)
    finally:
        ctypes.CDLL(None, use_errno=True).umount2(root.encode(), 0)
    out = parse_files(label, files)
    for key, name in (("tls_cert", "tls/fullchain.pem"), ("tls_key", "tls/key.pem")):
        if name in files:                 # the volume is unmounted: the TLS layer reads these copies
            os.makedirs(f"{RUN}/tls", mode=0o700, exist_ok=True)
            path = f"{RUN}/{name}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(files[name])
            out[key] = path
    return out
