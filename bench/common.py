"""What the benchmarks share and that knows nothing of the service: logging, the run-failed
error, percentiles, CPU accounting from /proc, free ports, stopping a child process and
py-spy summaries."""

from __future__ import annotations

import collections
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The run itself failed (as opposed to a missed target)."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- CPU accounting from /proc ----------------------------------------------------------------
def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from `state` on (so field 0 is the state), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def cpu_seconds(pid: int | None) -> float:
    """CPU time of `pid`, all its threads, also those that already exited: utime + stime of
    /proc/PID/stat (tick-sampled, 1/CLK_TCK s). Summing the live threads' schedstat would be
    finer but loses every exited thread's time, and Asterisk's pools end threads all the
    time (a phase then showed negative CPU). 0 for no such process."""
    if not pid:
        return 0.0
    f = proc_stat(pid)
    return 0.0 if f is None else (int(f[11]) + int(f[12])) / CLK_TCK  # utime, stime


def children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = proc_stat(int(entry))
            if f is not None and int(f[1]) == ppid:
                out.append(int(entry))
    return out


def tree_cpu(pid: int | None) -> dict[int, float]:
    """CPU seconds of a process and each of its children, by pid (PostgreSQL: postmaster and
    its backends); pass two samples to `tree_used`."""
    if not pid:
        return {}
    return {p: cpu_seconds(p) for p in (pid, *children_of(pid))}


def tree_used(a: dict[int, float], b: dict[int, float]) -> float:
    """CPU seconds used between two `tree_cpu` samples. Processes come and go (backends,
    autovacuum workers): each one alive at the second sample counts from the first sample or
    from its start; one that exited in between is not counted."""
    return sum(max(0.0, cpu - a.get(pid, 0.0)) for pid, cpu in b.items())


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine. Busy includes steal: time the hypervisor
    gave this machine's CPUs to others (host_steal)."""
    values = _cpu_line()
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


def host_steal() -> float:
    """Jiffies the hypervisor took from this machine's CPUs."""
    return float(_cpu_line()[7])


def _cpu_line() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


# -- py-spy -----------------------------------------------------------------------------------
def summarize_profile(raw: Path, top: int = 25, note: str = "") -> list[str]:
    """Top frames by inclusive and self share from py-spy's collapsed stacks (--format raw)."""
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    if not raw.exists():
        return ["(no profile written)"]
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] if " (" in f else f
                  for f in stack.split(";")]
        for f in set(frames):
            incl[f] += n
        own[frames[-1]] += n
    if not total:
        return ["(no samples)"]
    out = [f"{total} samples{' ' + note if note else ''}", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    out.append("self:")
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return out


def stop_process(proc: subprocess.Popen[bytes] | None, what: str = "the agent",
                 sig: int = signal.SIGTERM, within: float = 20) -> None:
    """`sig` (SIGTERM), then SIGKILL after `within` s; nothing when it is not running."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        log(f"{what} did not stop within {within:g}s: killing it")
        proc.kill()
        proc.wait(timeout=10)
