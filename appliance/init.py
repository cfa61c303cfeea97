"""PID 1 inside the image: make the machine a network appliance, then serve.

Theory of operation: the kernel unpacks the initramfs and runs /init, a
script run by python3.11 -I -S that calls `main()`. There is no shell and
no other program, so everything PID 1 needs it does itself through the
kernel's system calls (ctypes/fcntl/socket), in this order:

1. mount proc, sysfs and devtmpfs (the initramfs holds /dev/console,
   /dev/null and /dev/urandom already: CPython reads urandom at start-up,
   before we can mount anything);
2. load the kernel modules listed in /etc/haboob/modules with
   finit_module(2), dependencies first as the builder resolved them: the
   buses and platform modules always, the NIC drivers only when their
   modalias patterns match a device present (the image may carry a dozen
   drivers; loading them all costs seconds under TCG);
3. read haboob.ip= / haboob.gw= / haboob.mac= / haboob.workers= from
   /proc/cmdline (defaults: /etc/haboob/config.json, from the build; one
   stack instance per CPU unless haboob.workers= says otherwise), and the
   access log / metrics / drain settings haboob.log=, haboob.log_format=,
   haboob.log_sample=, haboob.log_framing=, haboob.metrics=,
   haboob.metrics_allow=, haboob.drain= (appliance/obs/options.py; the
   build's --access-log ... are the defaults);
   haboob.ip=dhcp (the builder's default) takes the address from DHCPv4
   (appliance/stack/dhcp4.py): HABOOB-READY waits for the lease and lists
   each address with how it was obtained, HABOOB-ADDRESS lines report
   changes, HABOOB-DHCP a server that does not answer (with several
   workers the parent process keeps the lease, stack/lease.py). haboob.ip6=auto
   (the builder's default) adds IPv6 link-local/SLAAC/DHCPv6 addresses as
   the router says (ping -6, the site over TCP/IPv6; no router: only the
   link-local address), haboob.ip6=ADDR/PREFIX (haboob.gw6=GW, link-local
   or on-link) a static one beside the link-local address (after DAD; a
   duplicate is a HABOOB-WARN and the address is not used), haboob.ip6=off
   none; with several workers the parent runs IPv6 too (stack/lease.py) and
   starts them once it settled (at most 6 s);
   the same words from a configuration volume if a disk carries one
   (appliance/configvol.py: build defaults < volume < command line);
4. pick the NIC (by MAC, else the only one, else the first with carrier
   after bringing them all up), bring it up with SIOCSIFFLAGS and no kernel IP address (the
   kernel would otherwise answer our TCP segments with RSTs; its IPv6 is switched off
   first, net.ipv6.conf.all.disable_ipv6, for the same reason), and wait for
   its link (the ring reads the offloads it offers when serve() opens it);
5. wait for the kernel's random generator (virtio-rng feeds it) with a
   blocking getrandom(2): the stack's secrets (ISNs, cookies) must never
   come from a predictable fallback;
6. with HTTPS in the config (build.py --tls-*) or a certificate on the
   configuration volume (which wins), load and check the chain and key
   (appliance.stack.tls): a bad built-in one is fatal, a bad volume one a
   HABOOB-WARN and the built-in one while that is still valid, else fatal;
7. run `appliance.stack.serve.serve` on the NIC; it opens and verifies the
   content store (a corrupt one is fatal: say so and stop), and its
   on_ready callback prints the HABOOB-READY line.

Stopping: SIGTERM, SIGINT (Ctrl-Alt-Del once reboot(CAD_OFF) is set) and
the ACPI power button (QMP system_powerdown; the `button` driver reports it
as KEY_POWER on an evdev input device that a thread watches) set the stop
event; serve first drains (haboob.drain= seconds, default 10: /healthz 503,
new connections refused, responses in flight finished) and returns, PID 1 prints HABOOB-COUNTERS and powers off. SIGUSR1
or the key 'c' on the console prints the counters without stopping. Any
fatal error prints `HABOOB-FATAL <reason>` and powers off: PID 1 never
hangs and never exits (the kernel would panic).
"""
import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

CONFIG = "/etc/haboob/config.json"

MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
SYS_finit_module = 313                   # x86_64
RB_POWER_OFF = 0x4321FEDC
RB_DISABLE_CAD = 0                       # Ctrl-Alt-Del then sends SIGINT to PID 1
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
EV_KEY, KEY_POWER = 0x01, 116
INPUT_EVENT = struct.Struct("llHHi")     # struct input_event on x86_64: timeval, type, code, value


phases: dict = {}                        # milestone -> ms since kernel start, for the ready line


class Fatal(Exception):
    """A reason to stop the appliance, printed as HABOOB-FATAL."""


_mirrors: list | None = None


def _mirror_consoles() -> list:
    """The consoles named on the command line other than the last one.

    The kernel prints to every console= but /dev/console (our stdout) is
    only the last; a bare-metal boot has `console=tty0 console=ttyS0,115200`,
    so without this the screen would never show our lines."""
    global _mirrors
    if _mirrors is None:
        _mirrors = []
        try:
            with open("/proc/cmdline") as f:
                names = [w[8:].split(",")[0] for w in f.read().split() if w.startswith("console=")]
        except OSError:
            return []                     # /proc not mounted yet: try again next time
        for name in dict.fromkeys(names[:-1]):
            if name and name != names[-1] and "/" not in name:
                try:
                    _mirrors.append(os.open(f"/dev/{name}", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK))
                except OSError:
                    pass
    return _mirrors


def say(*lines: str) -> None:
    out = sys.stdout
    for line in lines:
        out.write(line + "\n")
    out.flush()
    for fd in _mirror_consoles():
        try:
            os.write(fd, "".join(line + "\r\n" for line in lines).encode())
        except OSError:
            pass


def ms_since_boot() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * 1000)


# -- system calls --------------------------------------------------------------------------

_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def mount(source: str, target: str, fstype: str, flags: int = 0) -> None:
    os.makedirs(target, exist_ok=True)
    ret = libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), None)
    if ret < 0 and ctypes.get_errno() != errno.EBUSY:     # already mounted (devtmpfs automount)
        _check(ret, f"mount {fstype} on {target}")


def load_module(name: str, path: str) -> bool:
    """finit_module(2); False if it was already loaded."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ret = libc().syscall(ctypes.c_long(SYS_finit_module), ctypes.c_int(fd), b"", ctypes.c_int(0))
        if ret < 0:
            e = ctypes.get_errno()
            if e == errno.EEXIST:
                return False
            # wrong version magic: ENOEXEC/EINVAL; a signature this kernel's keys do not
            # accept (another kernel build): EKEYREJECTED/ENOKEY/EBADMSG
            hint = " (built for a different kernel?)" if e in (
                errno.ENOEXEC, errno.EINVAL, errno.EKEYREJECTED, errno.ENOKEY, errno.EBADMSG) else ""
            raise Fatal(f"loading module {name}: {os.strerror(e)}{hint}")
        return True
    finally:
        os.close(fd)


def read_module_list(path: str) -> list[dict]:
    """/etc/haboob/modules: NAME PATH ROLE NEEDS [ALIAS...] per line, in load order
    (ROLE: always | driver | dep; NEEDS: comma-separated or '-'). A bare
    NAME PATH line is an 'always' module."""
    out = []
    with open(path) as f:
        for line in f:
            w = line.split()
            if not w:
                continue
            if len(w) < 2:
                raise Fatal(f"{path}: bad line {line.strip()!r}")
            role = w[2] if len(w) > 2 else "always"
            needs = [] if len(w) < 4 or w[3] == "-" else w[3].split(",")
            out.append({"name": w[0], "path": w[1], "role": role, "needs": needs, "aliases": w[4:]})
    return out


def device_modaliases() -> list[str]:
    import glob
    out = []
    for p in sorted(glob.glob("/sys/bus/*/devices/*/modalias")):
        out.append(_read(p))
    return [a for a in out if a]


def load_modules(path: str) -> list[str]:
    """Load the 'always' modules, then the NIC drivers matching a present
    device's modalias (all of them if none matches), each after what it
    needs. Returns the names of the drivers loaded."""
    from fnmatch import fnmatchcase
    mods = read_module_list(path)
    by_name = {m["name"]: m for m in mods}

    def closure(names):
        want, todo = set(), list(names)
        while todo:
            n = todo.pop()
            if n not in want and n in by_name:
                want.add(n)
                todo += by_name[n]["needs"]
        return want

    def load(names):
        for m in mods:                        # the file's order: dependencies first
            if m["name"] in names and not m.get("done"):
                load_module(m["name"], m["path"])
                m["done"] = True

    load(closure(m["name"] for m in mods if m["role"] == "always"))
    drivers = [m for m in mods if m["role"] == "driver"]
    aliases = device_modaliases()
    def matches(pat):
        # compare the literal prefix first: compiling all ~400 patterns to
        # regexes would cost over a second of emulated CPU under TCG
        lit = pat
        for ch in "*?[":
            lit = lit.split(ch, 1)[0]
        return any(a.startswith(lit) and fnmatchcase(a, pat) for a in aliases)
    match = [m["name"] for m in drivers if any(matches(p) for p in m["aliases"])]
    if not match:                             # a device we cannot match: try every driver
        match = [m["name"] for m in drivers]
    load(closure(match))
    # disk controllers for the configuration volume: only when their device is present
    load(closure(m["name"] for m in mods if m["role"] == "storage" and any(matches(p) for p in m["aliases"])))
    return match


def load_role(path: str, role: str) -> list[str]:
    """Load the modules of one ROLE of /etc/haboob/modules (e.g. 'fs': the configuration
    volume's file systems, only once one is found), each after what it needs."""
    mods = read_module_list(path)
    by_name = {m["name"]: m for m in mods}
    want, todo = set(), [m["name"] for m in mods if m["role"] == role]
    while todo:
        n = todo.pop()
        if n not in want and n in by_name:
            want.add(n)
            todo += by_name[n]["needs"]
    for m in mods:
        if m["name"] in want:
            load_module(m["name"], m["path"])
    return sorted(m["name"] for m in mods if m["role"] == role)


def power_off() -> None:
    try:
        os.sync()
        libc().reboot(ctypes.c_int(RB_POWER_OFF))
    finally:
        os._exit(1)                      # only if reboot(2) failed: the kernel panics, panic=-1 reboots


# -- configuration --------------------------------------------------------------------------

def kernel_args(cmdline: str) -> dict:
    """haboob.KEY=VALUE words of the kernel command line, as {KEY: VALUE}."""
    out = {}
    for word in cmdline.split():
        if word.startswith("haboob.") and "=" in word:
            k, v = word[len("haboob."):].split("=", 1)
            out[k] = v
    return out


def _v4(ip):
    import ipaddress
    try:
        return ipaddress.IPv4Interface(ip)
    except (ValueError, TypeError):
        raise Fatal(f"haboob.ip={ip!r} is not an IPv4 address with a prefix (198.18.0.1/24) nor dhcp") from None


def settings(config: dict, args: dict) -> dict:
    import ipaddress
    s = {"ip": args.get("ip", config.get("ip")), "gateway": args.get("gw", config.get("gateway")),
         "mac": args.get("mac"), "workers": args.get("workers", str(os.cpu_count() or 1)),
         "port": config.get("port", 80), "store": config.get("store", "/haboob/site.store"),
         "hostname": args.get("hostname", config.get("name")),
         "ip6": args.get("ip6", config.get("ip6", "auto"))}
    from .stack.ipv6 import ip6_mode
    gw6 = args.get("gw6")                  # the build's gateway goes with the build's address only
    if gw6 is None and s["ip6"] == config.get("ip6"):
        gw6 = config.get("gateway6")
    try:                                   # off, auto, or a static ipv6.Static6
        s["ip6"] = ip6_mode(s["ip6"], gw6, "haboob.ip6=", "haboob.gw6=")
    except ValueError as e:
        raise Fatal(str(e)) from None
    h = s["hostname"]                      # sent to the DHCP server (option 12): a plain label or nothing
    if h is not None and not (0 < len(h) <= 63 and h.isascii() and h.replace("-", "").isalnum()):
        s["hostname"] = None
    if s["ip"] == "dhcp":
        if args.get("gw"):
            raise Fatal(f"haboob.gw={args['gw']} needs a static haboob.ip=ADDR/PREFIX (DHCP gives the gateway)")
        s["gateway"] = None
    if s["ip"] != "dhcp":
        s["ip"] = str(_v4(s["ip"]))
    if s["gateway"]:
        try:
            ipaddress.IPv4Address(s["gateway"])
        except ValueError:
            raise Fatal(f"haboob.gw={s['gateway']!r} is not an IPv4 address") from None
    if s["mac"]:
        s["mac"] = s["mac"].lower()
        if len(s["mac"].split(":")) != 6:
            raise Fatal(f"haboob.mac={s['mac']!r} is not a MAC address like 52:54:00:12:34:56")
    if not s["workers"].isdigit() or not 1 <= int(s["workers"]) <= 256:
        raise Fatal(f"haboob.workers={s['workers']!r} is not a number of workers (1..256)")
    s["workers"] = int(s["workers"])
    s.update({k: args[k] for k in ("tls_cert", "tls_key") if k in args})    # from a configuration volume
    return s


# -- the NIC ----------------------------------------------------------------------------------

def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def find_nic(mac: str | None, timeout: float = 10.0, carrier_wait: float = 10.0) -> dict:
    """The NIC to serve on: {"iface", "mac", "driver", "mtu", "carrier"}; waits for it to appear.

    By MAC when haboob.mac= is given. Else the only NIC; or, on a machine
    with several (a server with four ports, one cabled), every NIC is
    brought up and the first with carrier (a link) is chosen, waiting up to
    carrier_wait seconds for one; the others go down again. "carrier": True
    or False when that wait already happened (the NIC is up), None when the
    NIC was not brought up here."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        seen, nics = [], []
        for name in sorted(os.listdir("/sys/class/net")):
            base = f"/sys/class/net/{name}"
            if name == "lo" or not os.path.exists(f"{base}/device/driver"):
                continue
            addr = _read(f"{base}/address").lower()
            seen.append(f"{name} ({addr})")
            if mac and addr != mac:
                continue
            nics.append({"iface": name, "mac": addr,
                         "driver": os.path.basename(os.readlink(f"{base}/device/driver")),
                         "mtu": int(_read(f"{base}/mtu", "1500"))})
            if mac:
                break
        if nics:
            break
        if time.monotonic() > deadline:
            if mac:
                raise Fatal(f"no NIC with MAC {mac} (found: {', '.join(seen) or 'none'})")
            raise Fatal("no network interface with a driver appeared (is there a virtio-net NIC?)")
        time.sleep(0.05)
    if len(nics) == 1:
        nics[0]["carrier"] = None
        return nics[0]
    for nic in nics:
        link_up(nic["iface"])
    until = time.monotonic() + carrier_wait
    chosen = None
    while chosen is None:
        chosen = next((n for n in nics if _read(f"/sys/class/net/{n['iface']}/carrier") == "1"), None)
        if chosen is None and time.monotonic() > until:
            chosen = nics[0]
            say(f"haboob: no link on any of {', '.join(n['iface'] for n in nics)}; using {chosen['iface']}")
            break
        if chosen is None:
            time.sleep(0.05)
    chosen["carrier"] = _read(f"/sys/class/net/{chosen['iface']}/carrier") == "1"
    for nic in nics:
        if nic is not chosen:
            link_up(nic["iface"], up=False)
    return chosen


def wait_carrier(iface: str, timeout: float) -> bool:
    until = time.monotonic() + timeout
    while _read(f"/sys/class/net/{iface}/carrier") != "1":
        if time.monotonic() > until:
            return False
        time.sleep(0.02)
    return True


def kernel_ipv6_off(proc: str = "/proc/sys/net/ipv6/conf") -> bool:
    """Keep the kernel's own IPv6 off every NIC: it would otherwise give itself EUI-64
    link-local and SLAAC addresses beside ours (disclosing the MAC) and answer for them.
    Ours are the stack's (ipv6.py), which receives multicast through its ring
    (PACKET_MR_ALLMULTI). False when the kernel has no IPv6."""
    ok = False
    for name in ("default", "all"):
        try:
            with open(f"{proc}/{name}/disable_ipv6", "w") as f:
                f.write("1\n")
            ok = True
        except OSError:
            pass
    return ok


def link_up(iface: str, up: bool = True) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", iface.encode(), 0)
        flags = struct.unpack_from("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        flags = flags | IFF_UP if up else flags & ~IFF_UP
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", iface.encode(), flags))


# -- entropy, signals, power button ----------------------------------------------------------

def wait_for_entropy() -> int:
    """Block until the kernel's CRNG is ready (getrandom without GRND_NONBLOCK); returns ms waited."""
    t0 = time.monotonic()
    done = threading.Event()

    def nag():
        if not done.wait(10):
            say("haboob: waiting for the kernel random generator (is there a virtio-rng device?)")
    threading.Thread(target=nag, daemon=True).start()
    os.getrandom(16)
    done.set()
    return int((time.monotonic() - t0) * 1000)


def watch_power_button(stop: threading.Event) -> int:
    """Threads that set `stop` on KEY_POWER from any input device; returns how many watch."""
    n = 0
    try:
        names = sorted(os.listdir("/sys/class/input"))
    except OSError:
        return 0
    for name in names:
        if not name.startswith("event"):
            continue
        caps = _read(f"/sys/class/input/{name}/device/capabilities/key", "0").split()
        # the key bitmap, most significant word first; KEY_POWER = bit 116
        bits = 0
        for word in caps:
            bits = (bits << 64) | int(word, 16)
        if not (bits >> KEY_POWER) & 1:
            continue
        try:
            fd = os.open(f"/dev/input/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue

        def watch(fd=fd):
            while not stop.is_set():
                try:
                    data = os.read(fd, INPUT_EVENT.size * 16)
                except OSError:
                    return
                for off in range(0, len(data) - INPUT_EVENT.size + 1, INPUT_EVENT.size):
                    _s, _us, typ, code, value = INPUT_EVENT.unpack_from(data, off)
                    if typ == EV_KEY and code == KEY_POWER and value == 1:
                        say("haboob: power button: stopping")
                        stop.set()
                        # serve() waits on its ring and a signal wake-up pipe: a
                        # signal to ourselves ends that wait at once.
                        os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=watch, daemon=True, name=f"power-{name}").start()
        n += 1
    return n


def watch_console(show_counters) -> None:
    """The key 'c' on the serial console prints the counters."""
    try:                                   # keys one by one, not lines; no echo
        import termios
        attrs = termios.tcgetattr(0)
        attrs[3] &= ~(termios.ICANON | termios.ECHO)
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        termios.tcsetattr(0, termios.TCSANOW, attrs)
    except Exception:
        pass                               # not a tty: lines still work

    def watch():
        while True:
            try:
                data = os.read(0, 64)
            except OSError:
                return
            if not data:
                return
            if b"c" in data or b"C" in data:
                show_counters()
    threading.Thread(target=watch, daemon=True, name="console").start()


def counters_line(counters) -> str:
    if counters is None:
        return "HABOOB-COUNTERS {}"
    d = counters.as_dict() if hasattr(counters, "as_dict") else dict(counters)
    return "HABOOB-COUNTERS " + json.dumps(d, sort_keys=True)


# -- the boot -------------------------------------------------------------------------------------

def load_tls(t: dict, ip: str) -> dict:
    """The `tls` argument of serve() from the config's {"cert", "key", "http", "hsts"}."""
    import time
    from appliance.stack.tls import TlsError, TlsServer
    try:
        srv = TlsServer(t["cert"], t["key"], hsts=int(t.get("hsts", 0)), now=time.monotonic())
    except TlsError as e:
        raise Fatal(f"HTTPS: {e}") from None
    if srv.info["not_after_ts"] <= time.time():
        say(f"haboob: warning: the certificate expired on {srv.info['not_after']}")
    host = next((n for n in srv.names if not n.startswith("*")), None)
    if host is None:                        # a redirect for a request without a usable Host goes here
        host = ip.split("/")[0] if ip and ip != "dhcp" else "localhost"
    return {"server": srv, "http": t.get("http", "redirect"), "default_host": host}


def choose_tls(built: dict | None, s: dict) -> dict | None:
    """HTTPS settings: the built-in certificate, or a configuration volume's
    (tls/fullchain.pem, tls/key.pem) over it. A volume's bad certificate or key
    is a warning and the built-in one while that one is still valid, else fatal; an
    expired one likewise gives way to a built-in one that is still valid."""
    import time
    if not s.get("tls_cert"):
        return load_tls(built, s["ip"]) if built else None
    t = dict(built or {"http": "redirect", "hsts": 0}, cert=s["tls_cert"], key=s["tls_key"])
    try:
        tls = load_tls(t, s["ip"])
    except Fatal as e:
        if not built:
            raise Fatal(f"configuration volume: {e}") from None
        fallback = load_tls(built, s["ip"])
        if fallback["server"].info["not_after_ts"] <= time.time():
            raise Fatal(f"configuration volume: {e} (and the built-in certificate has expired)") from None
        say(f"HABOOB-WARN configuration volume: {e}; using the built-in certificate")
        return fallback
    if built and tls["server"].info["not_after_ts"] <= time.time():
        fallback = load_tls(built, s["ip"])     # an expired renewal: the built-in one while it is valid
        if fallback["server"].info["not_after_ts"] > time.time():
            say(f"HABOOB-WARN configuration volume: the certificate in {s['tls_cert']} expired on "
                f"{tls['server'].info['not_after']}; using the built-in certificate")
            return fallback
    say(f"haboob: HTTPS certificate from the configuration volume ({', '.join(tls['server'].names)})")
    return tls


def boot() -> None:
    phases["python_started"] = ms_since_boot()
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID)
    libc().reboot(ctypes.c_int(RB_DISABLE_CAD))

    try:
        with open(CONFIG) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise Fatal(f"{CONFIG}: {e}") from None
    with open("/proc/cmdline") as f:
        cmdline = kernel_args(f.read())
    settings(config, cmdline)               # a bad command line is fatal before anything else
    try:                                    # haboob.log= haboob.metrics= ... (appliance/obs/options.py)
        from appliance.obs.options import from_kernel_args
        observe = from_kernel_args(cmdline, config.get("observe"))
    except ValueError as e:
        raise Fatal(f"kernel command line: {e}") from None

    loaded = load_modules(config.get("modules", "/etc/haboob/modules"))
    phases["modules_loaded"] = ms_since_boot()
    # build defaults < configuration volume < command line (appliance/configvol.py)
    from appliance import configvol
    modules = config.get("modules", "/etc/haboob/modules")
    s = settings(config, configvol.read_settings(mount, say, config, cmdline,
                                                 prepare=lambda: load_role(modules, "fs")))
    kernel_ipv6_off()                       # before any NIC goes up
    nic = find_nic(s["mac"])
    if nic["carrier"] is None:              # (with several NICs find_nic has waited already)
        link_up(nic["iface"])
        # Physical NICs negotiate for a second or more after IFF_UP (e1000e ~1-2 s):
        # wait for the link so that HABOOB-READY means reachable; serve anyway without one.
        if not wait_carrier(nic["iface"], 10.0):
            say(f"haboob: no link on {nic['iface']} after 10 s (cable?); serving anyway")
    waited = wait_for_entropy()
    phases["nic_up_entropy_ready"] = ms_since_boot()

    stop = threading.Event()
    try:
        from appliance.content.store import StoreError
        from appliance.stack.serve import serve
    except Exception as e:
        raise Fatal(f"the stack is not importable: {type(e).__name__}: {e}") from None
    if not os.path.exists(s["store"]):
        raise Fatal(f"content store {s['store']}: missing from the image")
    tls = choose_tls(config.get("tls"), s)

    live = {"counters": None}

    def show_counters():
        say(counters_line(live["counters"]))

    def on_ready(ready):
        info = ready.info
        live["counters"] = ready.counters
        off = info["offload"]
        say("HABOOB-READY " + json.dumps({
            "ip": info.get("ip", s["ip"].split("/")[0]), "addresses": info.get("addresses"),
            "port": info.get("port", s["port"]),
            "urls": info.get("urls"), "ms_since_boot": ms_since_boot(),
            "iface": nic["iface"], "driver": nic["driver"], "mac": info.get("mac", nic["mac"]),
            "offload": off, "syn_gate": info.get("syn_gate"), "workers": s["workers"], "metrics_port": info.get("metrics_port", 0), "drivers_loaded": loaded,
            "entropy_wait_ms": waited, "phases_ms": phases,
            **({"https": info["https"]} if "https" in info else {})}))

    def on_event(kind, info):              # address changes (DHCP, IPv6), as they happen
        if kind == "address6" and info.get("event") == "duplicate" and info.get("how") == "static":
            say(f"HABOOB-WARN error: the static IPv6 address {info['ip6']} is in use by another node "
                f"(duplicate address detection, RFC 4862 §5.4.5): not used")
        say(("HABOOB-ADDRESS " if kind in ("address", "address6") else "HABOOB-DHCP ") + json.dumps(info))

    def on_signal(signum, frame):
        if signum == signal.SIGUSR1:
            show_counters()
        else:
            stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    watch_power_button(stop)
    watch_console(show_counters)

    try:                                   # serve() opens and verifies the store itself
        counters = serve(s["store"], nic["iface"], s["ip"], gateway=s["gateway"], mac=nic["mac"],
                         workers=s["workers"], on_ready=on_ready, stop_event=stop, on_event=on_event,
                         hostname=s.get("hostname"), ip6=s.get("ip6", "off"),
                         observe=dict(observe, hostname=config.get("name")), drain=observe["drain"], tls=tls)
    except StoreError as e:
        raise Fatal(f"content store {s['store']}: {e}") from None
    live["counters"] = counters if counters is not None else live["counters"]
    show_counters()
    say("haboob: stopped; powering off")


def main() -> None:
    try:
        boot()
    except Fatal as e:
        say(f"HABOOB-FATAL {e}")
    except BaseException as e:                # PID 1 must never exit by accident
        say(f"HABOOB-FATAL {type(e).__name__}: {e}")
    power_off()
