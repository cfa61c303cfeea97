"""eBPF from Python: the instruction set, an assembler, and bpf(2) through ctypes.

Theory of operation: the image carries no compiler and no libbpf, so the
few eBPF programs the appliance needs (rings/ebpf.py: the SYN ring's kernel
gate) are written with `Asm`, instructions named after the instruction set
(Documentation/bpf/standardization/instruction-set.rst) with labels for
jumps, and loaded with the bpf(2) system call (`sys_bpf`, ctypes; union
bpf_attr packed with struct, each command's fields in the kernel's order;
the kernel checks that the bytes past them are zero). `Map` is one map's fd
with element look-up, update (one, or many in a batch: BPF_MAP_UPDATE_BATCH,
Linux 5.6) and delete; `load_program` loads a program and, when the
verifier refuses it, says why (its log's last lines). Everything raises
OSError with the kernel's errno.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

__all__ = ["Asm", "Map", "sys_bpf", "load_program", "lift_memlock"]

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_PROG_LOAD = 0, 1, 2, 3, 5
BPF_MAP_UPDATE_BATCH = 26
MAP_HASH, MAP_ARRAY, MAP_LRU_HASH = 1, 2, 9
PROG_SOCKET_FILTER = 1
SO_ATTACH_BPF = 50

# eBPF opcodes (<linux/bpf_common.h>, <linux/bpf.h>)
LD, LDX, ST, STX, ALU64, JMP = 0x00, 0x01, 0x02, 0x03, 0x07, 0x05
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
ABS, IND, MEM, ATOMIC, IMM = 0x20, 0x40, 0x60, 0xC0, 0x00
K, X = 0x00, 0x08
ADD, SUB, AND, OR, LSH, XOR, MOV = 0x00, 0x10, 0x50, 0x40, 0x60, 0xA0, 0xB0
JA, JEQ, JGT, JGE, JSET, JNE, CALL, EXIT, JLT = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x80, 0x90, 0xA0
F_LOOKUP, F_UPDATE, F_KTIME = 1, 2, 5
PSEUDO_MAP_FD = 1



class Asm:
    """Instructions with labels: a jump's target is a label, resolved at the end."""

    def __init__(self):
        self.ins = []              # [code, dst, src, off (int or label), imm]
        self.at = {}

    def label(self, name):
        self.at[name] = len(self.ins)

    def fresh(self) -> str:
        self.n = getattr(self, "n", 0) + 1
        return f".L{self.n}"

    def op(self, code, dst=0, src=0, off=0, imm=0):
        self.ins.append([code, dst, src, off, imm])

    def ld_map(self, dst, fd):     # a 64-bit immediate: the map's fd, replaced by the kernel
        self.op(LD | DW | IMM, dst, PSEUDO_MAP_FD, 0, fd)
        self.op(0)

    def jmp(self, op, dst, imm, to, reg=False):
        self.op(JMP | op | (X if reg else K), dst, imm if reg else 0, to, 0 if reg else imm)

    def goto(self, to):
        self.op(JMP | JA, off=to)

    def call(self, fn):
        self.op(JMP | CALL, imm=fn)

    def ret(self, value):
        self.op(ALU64 | MOV | K, 0, imm=value)
        self.op(JMP | EXIT)

    def code(self) -> bytes:
        out = []
        for k, (code, dst, src, off, imm) in enumerate(self.ins):
            if isinstance(off, str):
                off = self.at[off] - k - 1
            out.append(struct.pack("<BBhi", code, dst | (src << 4), off, imm))
        return b"".join(out)


def sys_bpf():
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2): no system call number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)

    def bpf(cmd: int, attr: bytes) -> int:
        buf = ctypes.create_string_buffer(attr, 128)
        r = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), buf, ctypes.c_uint(128))
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"bpf(2) command {cmd}: {os.strerror(e)}")
        return r
    return bpf


class Map:
    def __init__(self, bpf, kind, key_size, value_size, entries, name):
        self.bpf, self.key_size, self.value_size = bpf, key_size, value_size
        self.batch = True           # until the kernel says it has no BPF_MAP_UPDATE_BATCH
        self.fd = bpf(BPF_MAP_CREATE, struct.pack("=7I16s", kind, key_size, value_size, entries, 0, 0, 0,
                                                  name.encode()[:15]))

    def _op(self, cmd, key: bytes, value=None, flags=0):
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(value or b"", self.value_size)
        va = 0 if cmd == BPF_MAP_DELETE_ELEM else ctypes.addressof(v)    # (the kernel wants 0 there)
        self.bpf(cmd, struct.pack("=IIQQQ", self.fd, 0, ctypes.addressof(k), va, flags))
        return v.raw

    def get(self, key: bytes) -> bytes:
        return self._op(BPF_MAP_LOOKUP_ELEM, key)

    def put_many(self, items: list) -> None:
        """Several (key, value) pairs in one system call (BPF_MAP_UPDATE_BATCH,
        Linux 5.6), or one at a time where the kernel has no batches."""
        if not items:
            return
        if self.batch:
            keys = ctypes.create_string_buffer(b"".join(k for k, _ in items))
            values = ctypes.create_string_buffer(b"".join(v for _, v in items))
            try:
                self.bpf(BPF_MAP_UPDATE_BATCH, struct.pack("=QQQQIIQQ", 0, 0, ctypes.addressof(keys),
                                                           ctypes.addressof(values), len(items), self.fd, 0, 0))
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                self.batch = False
        for k, v in items:
            self.put(k, v)

    def put(self, key: bytes, value: bytes) -> None:
        self._op(BPF_MAP_UPDATE_ELEM, key, value)

    def delete(self, key: bytes) -> None:
        try:
            self._op(BPF_MAP_DELETE_ELEM, key)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

def load_program(bpf, code: bytes, prog_type: int, name: str) -> int:
    """Load `code` (instructions, Asm.code()) as a program of `prog_type`; its fd.
    Refused by the verifier (EACCES, EINVAL): OSError with the log's last lines."""
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"Dual BSD/GPL")
    attr = lambda log, size: struct.pack("=IIQQIIQII16s", prog_type, len(code) // 8,
                                         ctypes.addressof(insns), ctypes.addressof(lic), 1 if size else 0,
                                         size, log, 0, 0, name.encode()[:15])
    try:
        return bpf(BPF_PROG_LOAD, attr(0, 0))
    except OSError as e:
        if e.errno != errno.EACCES and e.errno != errno.EINVAL:
            raise
        log = ctypes.create_string_buffer(1 << 16)
        try:
            os.close(bpf(BPF_PROG_LOAD, attr(ctypes.addressof(log), len(log))))
        except OSError:
            pass
        tail = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise OSError(e.errno, f"the kernel refused the eBPF program {name}: " + " / ".join(tail)) from None


def lift_memlock() -> None:
    """Before Linux 5.11 a map's memory counts against RLIMIT_MEMLOCK (often
    64 KB): lift it, as libbpf does (a kernel that charges the memory
    cgroup instead ignores it)."""
    try:
        import resource
        inf = resource.RLIM_INFINITY
        if resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] != inf:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (inf, inf))
    except (ImportError, ValueError, OSError):
        pass
