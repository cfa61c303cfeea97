"""The SYN ring's gate in the kernel: an eBPF socket filter with maps.

Theory of operation: under a SYN flood the SYN gate in Python (rings/base.py
SynGate) sheds almost every SYN, but only after the kernel copied it into the
SYN ring and Python read its key: ~2.5 µs of the core per spoofed SYN, ~16 %
of it at 65,000 SYN/s. `KernelSynGate` moves that decision in front of the
ring. Its program (SO_ATTACH_BPF on the SYN socket, run in the softirq that
delivers the frame, JIT-compiled) first accepts exactly what the classic
filter of the SYN ring accepts (tpacket.py _syn_filter: an IPv4 TCP SYN,
neither ACK nor RST, first fragment, to one of our ports; with `ipv6` an
IPv6 one too, TCP the first next header); then, while `pressure` is set
(the device attaches the program when the serve loop reports a flood and
puts the classic filter back after it):

- a SYN from a source in the `trusted` map (sources that completed a
  handshake: a spoofed one never can) is kept whatever the budget, or,
  for the few the main ring's filter takes (tpacket.py trust_sources
  keeps both in step), dropped here;
- a SYN that repeats one seen 0.5-4 s before (the same addresses, ports and
  ISN: for IPv4 the frame's bytes 26-42 as SynGate keys it, for IPv6 the
  source's four words folded into one by XOR, our address's last word, the
  ports and the ISN; a client's retransmission
  after its initial RTO, RFC 6298 §2) is kept, once, within a token bucket
  of its own; the memory is an LRU hash of the keys seen under pressure
  (RECENT entries, ~4 s of a 65,000 SYN/s flood; beyond, the oldest are
  forgotten first);
- every other SYN is kept within a token bucket of first SYNs, and shed
  beyond it.

Without pressure (the gate lingers after a flood) every SYN passes, and its
key is remembered: a ring full of a resuming flood may drop it, and its
retransmission is then known.

What reaches the ring under pressure is then a few thousand SYNs a second
at most, each of which the stack answers; nothing is sorted in Python. The
buckets are GCRA (a theoretical arrival time per bucket, RFC 2697's token
bucket in another form): no division in the program. Their state lives in
one array element that Python rewrites only on a pressure transition; the
softirqs of several CPUs may race on it, which can only let a few more SYNs
through. Counters (array element 1) are added atomically.

The program is assembled here (no compiler in the image) and loaded with
the bpf(2) system call through ctypes (rings/bpfsys.py). A kernel without it (no
CONFIG_BPF_SYSCALL, a seccomp filter, no root) raises OSError in the
constructor, and the device keeps the classic filter and the Python gate.
"""
from __future__ import annotations

import functools
import os
import socket
import struct

from .bpfsys import (ABS, ADD, ALU64, AND, ATOMIC, B, DW, F_KTIME, F_LOOKUP, F_UPDATE, H, IND, JEQ, JGE,
                     JGT, JLT, JNE, JSET, K, LD, LDX, LSH, MAP_ARRAY, MAP_HASH, MAP_LRU_HASH, MEM, MOV, OR,
                     PROG_SOCKET_FILTER, SO_ATTACH_BPF, ST, STX, SUB, W, X, XOR, Asm, Map, lift_memlock,
                     load_program, sys_bpf)

__all__ = ["KernelSynGate", "RECENT", "unavailable"]

RECENT = 1 << 18                    # SYN keys remembered under pressure (LRU): ~4 s at 65,000 SYN/s

ACCEPT = 0x40000                    # a socket filter returns the bytes to keep: the whole frame

# the configuration element (0): Python writes it; the buckets' state lives in it too
CFG = struct.Struct("=12Q")
C_PRESSURE, C_F_INT, C_F_TAU, C_F_TAT, C_R_INT, C_R_TAU, C_R_TAT, C_R_MIN, C_R_MAX, C_K_INT, C_K_TAU = \
    (8 * k for k in range(11))
# a trusted source's entry: its kind (MAIN or KEEP) and its bucket's TAT
TRUSTED = struct.Struct("=IIQ")
T_TAT = 8
# the counters element (1): the program adds to it
COUNTERS = ("kernel_syn_first_kept", "kernel_syn_retransmits", "kernel_syn_shed", "kernel_syn_trusted",
            "kernel_syn_to_main")
K_FIRST, K_RETRY, K_SHED, K_TRUSTED, K_MAIN = (8 * k for k in range(5))
MAIN, KEEP = 1, 2                   # a trusted source's value: the main ring takes its SYNs / keep them here




def _gcra(a: Asm, tat: int, interval: int, tau: int, over: str, tat_reg: int = 8) -> None:
    """One token bucket (r8: the configuration element, its TAT at
    `tat_reg` + `tat`; r7: now): jump to `over` when it is empty, else take
    a token. GCRA: with TAT = max(TAT, now), a SYN conforms while TAT - now
    <= tau (burst - 1 intervals); it then pushes TAT one interval on."""
    a.op(LDX | MEM | DW, 1, tat_reg, tat)           # r1 = tat
    a.jmp(JGE, 1, 7, f"{over}_late", reg=True)      # if tat >= now: keep it
    a.op(ALU64 | MOV | X, 1, 7)                     # tat = now
    a.label(f"{over}_late")
    a.op(ALU64 | MOV | X, 2, 1)
    a.op(ALU64 | SUB | X, 2, 7)                     # r2 = tat - now
    a.op(LDX | MEM | DW, 3, 8, tau)
    a.jmp(JGT, 2, 3, over, reg=True)
    a.op(LDX | MEM | DW, 3, 8, interval)
    a.op(ALU64 | ADD | X, 1, 3)
    a.op(STX | MEM | DW, tat_reg, 1, tat)           # tat += interval


def _remember(a: Asm, recent_fd: int) -> None:
    """recent[key at r10-16] = now (r7), not answered."""
    a.op(ALU64 | MOV | X, 1, 7)
    a.op(ALU64 | AND | K, 1, imm=-2)
    a.op(STX | MEM | DW, 10, 1, -32)
    a.ld_map(1, recent_fd)
    a.op(ALU64 | MOV | X, 2, 10)
    a.op(ALU64 | ADD | K, 2, imm=-16)
    a.op(ALU64 | MOV | X, 3, 10)
    a.op(ALU64 | ADD | K, 3, imm=-32)
    a.op(ALU64 | MOV | K, 4, imm=0)                 # BPF_ANY
    a.call(F_UPDATE)


def _count(a: Asm, counters_fd: int, field: int) -> None:
    """counters[field] += 1 (an atomic add: the softirqs of several CPUs)."""
    done = a.fresh()
    a.op(ST | MEM | W, 10, 0, -36, 1)               # key 1
    a.ld_map(1, counters_fd)
    a.op(ALU64 | MOV | X, 2, 10)
    a.op(ALU64 | ADD | K, 2, imm=-36)
    a.call(F_LOOKUP)
    a.jmp(JEQ, 0, 0, done)
    a.op(ALU64 | MOV | K, 1, imm=1)
    a.op(STX | ATOMIC | DW, 0, 1, field, ADD)       # lock *(u64 *)(r0 + field) += r1
    a.label(done)


def _program(ports: tuple, cfg_fd: int, trusted_fd: int, recent_fd: int, trusted6_fd: int | None) -> bytes:
    a = Asm()
    a.op(ALU64 | MOV | X, 6, 1)                     # r6 = the skb (LD_ABS/LD_IND read through it)
    # exactly tpacket.py _syn_filter(ports, True, ipv6=trusted6_fd is not None) without
    # trusted sources; a read past the frame's end returns 0 (drop)
    a.op(LD | ABS | H, imm=12)
    if trusted6_fd is not None:
        a.jmp(JEQ, 0, 0x86DD, "v6")
    a.jmp(JNE, 0, 0x0800, "drop")                   # IPv4
    a.op(LD | ABS | B, imm=23)
    a.jmp(JNE, 0, 6, "drop")                        # TCP
    a.op(LD | ABS | H, imm=20)
    a.jmp(JSET, 0, 0x1FFF, "drop")                  # the first fragment
    a.op(LD | ABS | B, imm=14)
    a.op(ALU64 | AND | K, 0, imm=0xF)
    a.op(ALU64 | LSH | K, 0, imm=2)
    a.op(ALU64 | MOV | X, 7, 0)                     # r7 = IHL in bytes
    a.op(LD | IND | H, 0, 7, imm=16)                # destination port
    for p in ports[:-1]:
        a.jmp(JEQ, 0, p, "flags")
    a.jmp(JNE, 0, ports[-1], "drop")
    a.label("flags")
    a.op(LD | IND | B, 0, 7, imm=27)
    a.op(ALU64 | AND | K, 0, imm=0x16)
    a.jmp(JNE, 0, 0x02, "drop")                     # SYN, neither ACK nor RST
    # the key: bytes 26-42 as four words at r10-16 (host order: compared with itself only)
    for k, off in enumerate((26, 30, 34, 38)):
        a.op(LD | ABS | W, imm=off)
        a.op(STX | MEM | W, 10, 0, -16 + 4 * k)
    a.op(ALU64 | MOV | K, 9, imm=4)                 # r9 = the family
    if trusted6_fd is not None:
        a.goto("cfg")
        a.label("v6")                               # IPv6, TCP the first next header
        a.op(LD | ABS | B, imm=20)
        a.jmp(JNE, 0, 6, "drop")
        a.op(LD | ABS | H, imm=56)
        for p in ports[:-1]:
            a.jmp(JEQ, 0, p, "flags6")
        a.jmp(JNE, 0, ports[-1], "drop")
        a.label("flags6")
        a.op(LD | ABS | B, imm=67)
        a.op(ALU64 | AND | K, 0, imm=0x16)
        a.jmp(JNE, 0, 0x02, "drop")
        # the source at r10-56 (the trusted6 key); the key: the source's words
        # folded by XOR, our address's low word, the ports, the ISN
        for k in range(4):
            a.op(LD | ABS | W, imm=22 + 4 * k)
            a.op(STX | MEM | W, 10, 0, -56 + 4 * k)
        for k, off in enumerate((50, 54, 58), 1):
            a.op(LD | ABS | W, imm=off)
            a.op(STX | MEM | W, 10, 0, -16 + 4 * k)
        a.op(LDX | MEM | W, 1, 10, -56)
        for k in range(1, 4):
            a.op(LDX | MEM | W, 2, 10, -56 + 4 * k)
            a.op(ALU64 | XOR | X, 1, 2)
        a.op(STX | MEM | W, 10, 1, -16)
        a.op(ALU64 | MOV | K, 9, imm=6)
    a.label("cfg")
    a.op(ST | MEM | W, 10, 0, -20, 0)               # key 0: the configuration
    a.ld_map(1, cfg_fd)
    a.op(ALU64 | MOV | X, 2, 10)
    a.op(ALU64 | ADD | K, 2, imm=-20)
    a.call(F_LOOKUP)
    a.jmp(JEQ, 0, 0, "accept")
    a.op(ALU64 | MOV | X, 8, 0)                     # r8 = the configuration
    a.call(F_KTIME)
    a.op(ALU64 | MOV | X, 7, 0)                     # r7 = now (ns)
    if trusted6_fd is not None:
        a.jmp(JNE, 9, 6, "trusted4")
        a.ld_map(1, trusted6_fd)                    # a trusted IPv6 /64 (never the main ring's)
        a.op(ALU64 | MOV | X, 2, 10)
        a.op(ALU64 | ADD | K, 2, imm=-56)
        a.goto("trusted")
    a.label("trusted4")
    a.ld_map(1, trusted_fd)                         # a trusted source? (with or without a flood:
    a.op(ALU64 | MOV | X, 2, 10)                    # the main ring's filter has its MAIN ones)
    a.op(ALU64 | ADD | K, 2, imm=-16)
    a.label("trusted")
    a.call(F_LOOKUP)
    a.jmp(JEQ, 0, 0, "untrusted")
    a.op(ALU64 | MOV | X, 9, 0)                     # r9 = its entry: kind, TAT
    a.op(LDX | MEM | W, 1, 9, 0)
    a.jmp(JNE, 1, MAIN, "keep")
    _count(a, cfg_fd, K_MAIN)                       # the main ring has it
    a.goto("drop")
    a.label("keep")
    a.op(LDX | MEM | DW, 1, 8, C_PRESSURE)
    a.jmp(JEQ, 1, 0, "accept")
    # a bucket per source: one spoofing a known address gets no more than it
    _gcra(a, T_TAT, C_K_INT, C_K_TAU, "flood", tat_reg=9)
    _count(a, cfg_fd, K_TRUSTED)
    a.goto("accept")
    a.label("untrusted")
    a.op(LDX | MEM | DW, 1, 8, C_PRESSURE)
    a.jmp(JNE, 1, 0, "flood")
    # no flood (the gate lingers after one): every SYN, remembered, so that if
    # the ring drops it (full as a flood resumes) its retransmission is known
    a.ld_map(1, recent_fd)
    a.op(ALU64 | MOV | X, 2, 10)
    a.op(ALU64 | ADD | K, 2, imm=-16)
    a.call(F_LOOKUP)
    a.jmp(JNE, 0, 0, "accept")
    _remember(a, recent_fd)
    a.goto("accept")
    a.label("flood")
    a.ld_map(1, recent_fd)
    a.op(ALU64 | MOV | X, 2, 10)
    a.op(ALU64 | ADD | K, 2, imm=-16)
    a.call(F_LOOKUP)
    a.jmp(JEQ, 0, 0, "new")
    a.op(ALU64 | MOV | X, 9, 0)                     # r9 = the entry: first seen (ns) | answered (bit 0)
    a.op(LDX | MEM | DW, 1, 9, 0)
    a.op(ALU64 | MOV | X, 2, 7)
    a.op(ALU64 | SUB | X, 2, 1)                     # r2 = its age
    a.op(LDX | MEM | DW, 3, 8, C_R_MAX)
    a.jmp(JGT, 2, 3, "renew", reg=True)             # (or seen "later" on another CPU's clock)
    a.op(LDX | MEM | DW, 3, 8, C_R_MIN)
    a.jmp(JLT, 2, 3, "first", reg=True)             # a copy sent at once: no retransmission
    a.jmp(JSET, 1, 1, "first")                      # answered once already
    _gcra(a, C_R_TAT, C_R_INT, C_R_TAU, "first")
    a.op(LDX | MEM | DW, 1, 9, 0)
    a.op(ALU64 | OR | K, 1, imm=1)
    a.op(STX | MEM | DW, 9, 1, 0)                   # answered
    _count(a, cfg_fd, K_RETRY)
    a.goto("accept")
    a.label("renew")                                # older than the window: seen afresh
    a.op(ALU64 | MOV | X, 1, 7)
    a.op(ALU64 | AND | K, 1, imm=-2)
    a.op(STX | MEM | DW, 9, 1, 0)
    a.goto("first")
    a.label("new")
    _remember(a, recent_fd)
    a.label("first")
    _gcra(a, C_F_TAT, C_F_INT, C_F_TAU, "shed")
    _count(a, cfg_fd, K_FIRST)
    a.label("accept")
    a.ret(ACCEPT)
    a.label("shed")
    _count(a, cfg_fd, K_SHED)
    a.label("drop")
    a.ret(0)
    return a.code()


class KernelSynGate:
    """The SYN ring's socket filter with its maps (see the module's theory).

    `ports`: our ports (HTTP, HTTPS); `rate`/`burst`: the first-SYN bucket
    under pressure, `retry_rate`/`retry_burst`: the retransmissions'; a
    repeat counts `retry_min`-`retry_max` seconds after the SYN it repeats;
    `keep_rate`/`keep_burst`: each trusted source's own bucket (a busy
    client is in the main ring's filter; this bounds what spoofing a known
    address gets); `ipv6`: IPv6 SYNs too (trusted by /64).
    """

    def __init__(self, ports, *, rate: float = 500.0, burst: int = 16, retry_rate: float = 4000.0,
                 retry_burst: int = 64, retry_min: float = 0.5, retry_max: float = 4.0,
                 keep_rate: float = 1000.0, keep_burst: int = 128, recent: int = RECENT,
                 trusted_max: int = 1024, pressure: bool = True, ipv6: bool = False):
        ports = (ports,) if isinstance(ports, int) else tuple(ports)
        if not ports or not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
            raise ValueError(f"KernelSynGate: ports must be 1-65535, not {ports!r}")
        for name, v in (("rate", rate), ("retry_rate", retry_rate), ("keep_rate", keep_rate)):
            if not v > 0:
                raise ValueError(f"KernelSynGate: {name} must be above 0, not {v!r}")
        for name, v in (("burst", burst), ("retry_burst", retry_burst), ("keep_burst", keep_burst),
                        ("recent", recent), ("trusted_max", trusted_max)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"KernelSynGate: {name} must be an integer of at least 1, not {v!r}")
        if not 0 <= retry_min < retry_max:
            raise ValueError(f"KernelSynGate: need 0 <= retry_min < retry_max, not {retry_min!r}, {retry_max!r}")
        self.pressure = bool(pressure)
        self.prog_fd = -1
        self._maps = []
        self._bpf = sys_bpf()
        lift_memlock()
        try:
            self._cfg = self._map(MAP_ARRAY, 4, CFG.size, 2, "haboob_syn_cfg")
            self._trusted = self._map(MAP_HASH, 4, TRUSTED.size, trusted_max, "haboob_trusted")
            self._trusted6 = self._map(MAP_HASH, 8, TRUSTED.size, trusted_max, "haboob_trusted6") if ipv6 else None
            self._recent = self._map(MAP_LRU_HASH, 16, 8, recent, "haboob_syn_seen")
            ns = lambda r: max(1, round(1e9 / r))
            self._params = (ns(rate), ns(retry_rate), burst, retry_burst, round(retry_min * 1e9),
                            round(retry_max * 1e9), ns(keep_rate), keep_burst)
            self._write_cfg()
            code = _program(ports, self._cfg.fd, self._trusted.fd, self._recent.fd,
                            self._trusted6.fd if ipv6 else None)
            self.prog_fd = load_program(self._bpf, code, PROG_SOCKET_FILTER, "haboob_syn_gate")
        except BaseException:
            self.close()
            raise
        self.trusted = {}           # what the trusted map holds: source -> MAIN or KEEP

    def _map(self, *args) -> Map:
        m = Map(self._bpf, *args)
        self._maps.append(m)
        return m

    def _write_cfg(self) -> None:
        fi, ri, fb, rb, rmin, rmax, ki, kb = self._params
        # (the buckets start full: TAT 0)
        self._cfg.put(struct.pack("=I", 0), CFG.pack(int(self.pressure), fi, (fb - 1) * fi, 0, ri, (rb - 1) * ri, 0,
                                                      rmin, rmax, ki, (kb - 1) * ki, 0))

    def attach(self, sock) -> None:
        """Replace `sock`'s filter with the program (an atomic swap, as SO_ATTACH_FILTER)."""
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, self.prog_fd)

    def set_pressure(self, on: bool) -> None:
        """Gate (on, from the start by default) or pass every SYN (off); the buckets start full again."""
        self.pressure = bool(on)
        self._write_cfg()

    def set_trusted(self, main, keep=()) -> None:
        """The IPv4 sources (4-byte addresses) whose SYNs the main ring takes
        (`main`: dropped here) and the sources whose SYNs are kept within
        their own bucket whatever the flood (`keep`, the others that
        completed a handshake: 4-byte IPv4 addresses and, with `ipv6`, 8-byte
        IPv6 /64 prefixes; at most trusted_max of each). Only the differences
        reach the maps (the new entries in one batch per map)."""
        six = self._trusted6 is not None
        want = {a: KEEP for a in keep if len(a) == 4 or six and len(a) == 8}
        want.update(dict.fromkeys(main, MAIN))
        have = self.trusted
        for a in [a for a in have if a not in want]:
            self._which(a).delete(_addr_key(a))
            del have[a]
        put = {}
        for a, v in want.items():
            if have.get(a) != v:
                put.setdefault(len(a), []).append((_addr_key(a), TRUSTED.pack(v, 0, 0)))
                have[a] = v
        for n, items in put.items():
            (self._trusted if n == 4 else self._trusted6).put_many(items)

    def _which(self, a: bytes) -> Map:
        return self._trusted if len(a) == 4 else self._trusted6

    def stats(self) -> dict:
        """The program's counters since it was loaded."""
        v = struct.unpack_from(f"={len(COUNTERS)}Q", self._cfg.get(struct.pack("=I", 1)))
        return dict(zip(COUNTERS, v))

    def close(self) -> None:
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1
        for m in self._maps:
            m.close()
        self._maps = []



def _addr_key(a: bytes) -> bytes:
    """An address as the program stores it: its words in host order (LD_ABS converts)."""
    return struct.pack(f"={len(a) // 4}I", *struct.unpack(f"!{len(a) // 4}I", a))


@functools.cache
def unavailable():
    """None if this kernel loads the gate (a tiny one, made and closed at once),
    else why not (the error's text). Once a process: serve() asks before it
    forks the workers, whose devices then know without loading it again."""
    try:
        KernelSynGate(80, recent=16, trusted_max=1, ipv6=True).close()
    except OSError as e:
        return str(e)
    return None
