"""CPU accounting: per-core busy share from /proc/stat, per-process CPU time.

Theory of operation: /proc/stat's per-core lines count jiffies (USER_HZ)
spent in each mode since boot; the busy share of a core over a window is
(user+nice+system+irq+softirq+steal) / (all modes) between two samples.
guest and guest_nice are already included in user/nice and are left out so
they are not counted twice. softirq is where the kernel's packet work runs
(veth delivery, TCP receive, AF_PACKET's copy into the ring), so the busy
share covers it wherever it ran, which is why the benchmark steers each
side's receive work to its own core (see bench/run.py).

The second figure is the CPU time of the server's processes themselves
(/proc/PID/stat utime+stime, summed over the process tree): it excludes
softirq work, which the kernel bills to whatever core it ran on, not to a
process. On a machine shared with other work, the core's busy share also
counts everyone else's processes on that core; process time plus the
irq+softirq time of the server's cores ("attributed") leaves them out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

HZ = os.sysconf("SC_CLK_TCK")
_BUSY = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal; 3 idle, 4 iowait


@dataclass
class CoreSample:
    busy: int
    total: int
    irq: int = 0        # irq + softirq: kernel packet work, billed to no process


def read_cores() -> dict[int, CoreSample]:
    cores = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]] + [0] * (8 - len(vals[:8]))
            cores[int(name[3:])] = CoreSample(sum(v[i] for i in _BUSY), sum(v[:8]), v[5] + v[6])
    return cores


def busy_shares(before: dict[int, CoreSample], after: dict[int, CoreSample]) -> dict[int, float]:
    """Busy fraction (0..1) of every core between two samples."""
    out = {}
    for core, a in after.items():
        b = before.get(core)
        if b is None:
            continue
        total = a.total - b.total
        out[core] = (a.busy - b.busy) / total if total > 0 else 0.0
    return out


def irq_shares(before: dict[int, CoreSample], after: dict[int, CoreSample]) -> dict[int, float]:
    """irq+softirq fraction (0..1) of every core between two samples."""
    out = {}
    for core, a in after.items():
        b = before.get(core)
        if b is not None:
            total = a.total - b.total
            out[core] = (a.irq - b.irq) / total if total > 0 else 0.0
    return out


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants (walks /proc once)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def process_cpu(pids: list[int]) -> float:
    """utime+stime in seconds, summed over pids (vanished pids count 0)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])  # fields 14, 15 of proc(5)
    return total / HZ


def start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks since boot (identifies a process across pid reuse)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def snapshot() -> dict[int, tuple[str, float]]:
    """Every process's (comm, utime+stime seconds), for a who-used-the-CPU breakdown."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index("(") + 1:data.rindex(")")]
        fields = data[data.rindex(")") + 2:].split()
        out[int(entry)] = (comm, (int(fields[11]) + int(fields[12])) / HZ)
    return out


def snapshot_delta(before: dict, after: dict) -> dict[int, tuple[str, float]]:
    """CPU seconds each process used between two snapshots (new processes count from 0)."""
    out = {}
    for pid, (comm, t) in after.items():
        d = t - before.get(pid, (comm, 0.0))[1]
        if d > 0:
            out[pid] = (comm, d)
    return out
