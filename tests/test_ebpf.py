"""rings/ebpf.py and rings/bpfsys.py without a network: the gate's maps, its errors, the assembler.

What the program does to frames is tested through a real ring in
test_netns_synring.py (the kernel gate tests); here, what Python keeps in
step with it and what a user sees when the kernel refuses.
"""
import errno
import struct

import pytest

from appliance.stack.rings import bpfsys, ebpf


def _key(a: bytes) -> bytes:
    return struct.pack(f"={len(a) // 4}I", *struct.unpack(f"!{len(a) // 4}I", a))


def test_trusted_map_holds_exactly_what_was_asked_in_two_kinds():
    g = ebpf.KernelSynGate((80, 443), recent=64, trusted_max=8, ipv6=True)
    main, keep = ebpf.TRUSTED.pack(ebpf.MAIN, 0, 0), ebpf.TRUSTED.pack(ebpf.KEEP, 0, 0)
    try:
        a, b, c = b"\xc6\x12\x00\x01", b"\xc6\x12\x00\x02", b"\xc6\x12\x00\x03"
        net6 = bytes.fromhex("2001000200000077")         # an IPv6 /64 (8 bytes: Stack.syn_trusted's)
        g.set_trusted([a], [b, c, net6, bytes(16)])      # (a 16-byte entry is no /64: left out)
        assert [g._trusted.get(_key(x)) for x in (a, b, c)] == [main, keep, keep]
        assert g._trusted6.get(_key(net6)) == keep
        g.set_trusted([b], [c, b])                        # b moves to the main ring; a and the /64 go
        assert g._trusted.get(_key(b)) == main and g._trusted.get(_key(c)) == keep
        for m, x in ((g._trusted, a), (g._trusted6, net6)):
            with pytest.raises(OSError) as e:
                m.get(_key(x))
            assert e.value.errno == errno.ENOENT
        assert g.trusted == {b: ebpf.MAIN, c: ebpf.KEEP}
        g._trusted.batch = False                          # a kernel without BPF_MAP_UPDATE_BATCH (< 5.6)
        g.set_trusted([b], [c, a])
        assert g._trusted.get(_key(a)) == keep and g.trusted == {a: ebpf.KEEP, b: ebpf.MAIN, c: ebpf.KEEP}
        # the map is bounded: more sources than it holds is an error, not a silent loss
        with pytest.raises(OSError):
            g.set_trusted([], [bytes([198, 18, 1, k]) for k in range(20)])
        assert g.stats() == dict.fromkeys(ebpf.COUNTERS, 0)
    finally:
        g.close()
    assert g.prog_fd == -1 and g._maps == []
    g.close()                                             # twice is harmless


def test_bad_arguments_are_named():
    for bad in ((), (0,), (80, 70000), ("80",)):
        with pytest.raises(ValueError, match="ports must be 1-65535"):
            ebpf.KernelSynGate(bad)
    for kw, what in (({"rate": 0}, "rate must be above 0"), ({"keep_rate": -1.0}, "keep_rate must be above 0"),
                     ({"burst": 0}, "burst must be an integer of at least 1"),
                     ({"recent": 2.5}, "recent must be an integer"),
                     ({"retry_min": 5.0}, "retry_min < retry_max")):
        with pytest.raises(ValueError, match=what):
            ebpf.KernelSynGate(80, **kw)


def test_a_program_the_verifier_refuses_says_why():
    a = bpfsys.Asm()
    a.op(bpfsys.ALU64 | bpfsys.MOV | bpfsys.X, 0, 2)    # r0 = r2: never written
    a.op(bpfsys.JMP | bpfsys.EXIT)
    with pytest.raises(OSError, match="refused the eBPF program haboob_test: .*R2 !read_ok"):
        bpfsys.load_program(bpfsys.sys_bpf(), a.code(), bpfsys.PROG_SOCKET_FILTER, "haboob_test")


def test_this_kernel_loads_the_gate():
    assert ebpf.unavailable() is None


def test_assembler_resolves_labels_and_map_loads():
    a = bpfsys.Asm()
    a.jmp(bpfsys.JEQ, 0, 7, "out")
    a.ld_map(1, 5)
    a.label("out")
    a.ret(0)
    code = a.code()
    assert len(code) == 8 * 5
    op, regs, off, imm = struct.unpack_from("<BBhi", code, 0)
    assert (op, regs, off, imm) == (bpfsys.JMP | bpfsys.JEQ, 0, 2, 7)     # past both halves of the 64-bit load
    op, regs, off, imm = struct.unpack_from("<BBhi", code, 8)
    assert (op, regs & 0xF, regs >> 4, imm) == (0x18, 1, bpfsys.PSEUDO_MAP_FD, 5)
