"""rings/ebpf.py without a network: the gate's maps, its errors, the assembler.

What the program does to frames is tested through a real ring in
test_netns_synring.py (the kernel gate tests); here, what Python keeps in
step with it and what a user sees when the kernel refuses.
"""
import errno
import struct

import pytest

from appliance.stack.rings import ebpf


def _key(a: bytes) -> bytes:
    return struct.pack("=I", int.from_bytes(a, "big"))


def test_trusted_map_holds_exactly_what_was_asked_in_two_kinds():
    g = ebpf.KernelSynGate((80, 443), recent=64, trusted_max=8)
    try:
        a, b, c = b"\xc6\x12\x00\x01", b"\xc6\x12\x00\x02", b"\xc6\x12\x00\x03"
        g.set_trusted([a], [b, c])
        assert [g._trusted.get(_key(x)) for x in (a, b, c)] == [struct.pack("=I", ebpf.MAIN)] + \
            [struct.pack("=I", ebpf.KEEP)] * 2
        g.set_trusted([b], [c, b])                        # b moves to the main ring; a goes
        assert g._trusted.get(_key(b)) == struct.pack("=I", ebpf.MAIN)
        assert g._trusted.get(_key(c)) == struct.pack("=I", ebpf.KEEP)
        with pytest.raises(OSError) as e:
            g._trusted.get(_key(a))
        assert e.value.errno == errno.ENOENT
        assert g.trusted == {b: ebpf.MAIN, c: ebpf.KEEP}
        # the map is bounded: more sources than it holds is an error, not a silent loss
        with pytest.raises(OSError):
            g.set_trusted([], [bytes([198, 18, 1, k]) for k in range(20)])
        assert g.stats() == dict.fromkeys(ebpf.COUNTERS, 0)
    finally:
        g.close()
    assert g.prog_fd == -1 and g._maps == []
    g.close()                                             # twice is harmless


def test_bad_ports_are_named():
    for bad in ((), (0,), (80, 70000), ("80",)):
        with pytest.raises(ValueError, match="ports must be 1-65535"):
            ebpf.KernelSynGate(bad)


def test_a_program_the_verifier_refuses_says_why():
    g = ebpf.KernelSynGate(80, recent=16)
    try:
        a = ebpf._Asm()
        a.op(ebpf.ALU64 | ebpf.MOV | ebpf.X, 0, 2)      # r0 = r2: never written
        a.op(ebpf.JMP | ebpf.EXIT)
        with pytest.raises(OSError, match="refused the SYN gate's eBPF program: .*R2 !read_ok"):
            g._load(a.code())
    finally:
        g.close()


def test_this_kernel_loads_the_gate():
    assert ebpf.unavailable() is None


def test_assembler_resolves_labels_and_map_loads():
    a = ebpf._Asm()
    a.jmp(ebpf.JEQ, 0, 7, "out")
    a.ld_map(1, 5)
    a.label("out")
    a.ret(0)
    code = a.code()
    assert len(code) == 8 * 5
    op, regs, off, imm = struct.unpack_from("<BBhi", code, 0)
    assert (op, regs, off, imm) == (ebpf.JMP | ebpf.JEQ, 0, 2, 7)     # past both halves of the 64-bit load
    op, regs, off, imm = struct.unpack_from("<BBhi", code, 8)
    assert (op, regs & 0xF, regs >> 4, imm) == (0x18, 1, ebpf.PSEUDO_MAP_FD, 5)
