"""How many CPU threads torch uses, chosen against the machine's load, and how long idle threads spin.

Why: torch runs its CPU kernels on an OpenMP team (GNU libgomp in the pip wheels) whose idle threads
busy-wait ("spin") for a new parallel region instead of sleeping. On a machine of its own that saves a
wake-up per operation; when the cores are shared it is a collapse: a region ends only when every thread of
the team has run, while the other process's threads spin on the cores the late thread needs. Two default
`digitlab train` runs on 2 cores took 60.9 s each against 5.9 s alone (docs/benchmarks.md, "CPU contention").

What `configure` does at the start of `train`, `evaluate`, `predict` and `serve`:

- the spin: GOMP_SPINCOUNT is set to SPIN_COUNT (libgomp's default is 300,000, milliseconds of spinning) unless
  the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY. Only possible before torch is imported: libgomp reads its
  environment once, when it is loaded. A short spin keeps the speed of a run alone (threads still catch the
  next operation of a step) but hands the core back quickly when another process needs it; OMP_WAIT_POLICY=
  PASSIVE (no spin at all) also fixes the collapse but costs ~0.4 s per epoch alone.
- the thread count: the cores this process may use minus the cores other processes kept busy over a short
  sample of /proc/stat (BUSY_SAMPLE_S), at least 1. `serve` uses 1 thread per request: its requests are
  single images, run concurrently on the server's worker threads, where a team per request only adds waits.

DIGITLAB_THREADS: "auto" (the default, above), "off" (torch's own defaults: the behaviour before this
module), or a number N (N threads, and the short spin). OMP_NUM_THREADS set by the user is respected.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from .errors import DigitlabError

ENV = "DIGITLAB_THREADS"
SPIN_COUNT = 10_000  # GOMP_SPINCOUNT: spins before an idle thread sleeps (libgomp's default is 300,000)
BUSY_SAMPLE_S = 0.1  # how long /proc/stat is sampled at start: 10 clock ticks per core at 100 Hz
KINDS = ("train", "evaluate", "predict", "serve")


class ThreadsError(DigitlabError, ValueError):
    """A bad DIGITLAB_THREADS value."""


@dataclass(frozen=True)
class Policy:
    """What `configure` decided, for logs and tests."""

    threads: int | None  # torch's intra-op threads; None: left as they were
    spin_count: int | None  # GOMP_SPINCOUNT set; None: left as it was
    busy: float | None  # cores other processes kept busy during the sample; None: not sampled
    reason: str


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest is in user)
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def others_busy(seconds: float = BUSY_SAMPLE_S) -> float | None:
    """How many cores other processes kept busy over `seconds` (this process's own CPU time subtracted).

    Sampled now, not os.getloadavg(): the load average trails by a minute, so two runs started together
    would not see each other.
    """
    first, own = _cpu_ticks(), _own_seconds()
    if first is None:
        return None
    time.sleep(seconds)
    second, own = _cpu_ticks(), _own_seconds() - own
    if second is None or second[1] <= first[1]:
        return None
    cpus = os.cpu_count() or 1
    busy_fraction = (second[0] - first[0]) / (second[1] - first[1])  # of all the machine's CPUs
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    elapsed = (second[1] - first[1]) / hz / cpus  # wall seconds the sample covered, at tick resolution
    own_cores = own / elapsed if elapsed > 0 else 0.0
    return max(0.0, busy_fraction * cpus - own_cores)


def choose_threads(cores: int, busy: float | None) -> int:
    """Threads for a run: the cores not kept busy by others, rounded to nearest, at least 1, at most `cores`."""
    if busy is None:
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def parse_setting(value: str | None) -> str | int:
    """DIGITLAB_THREADS -> "auto", "off" or a thread count; anything else is a one-line ThreadsError."""
    text = (value or "auto").strip().lower()
    if text in ("auto", "off"):
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ThreadsError(f"{ENV}={value!r}: expected auto, off or a number of threads >= 1")


def _set_spin(env: dict) -> int | None:
    """Shorten libgomp's spin, unless the user chose a wait policy or torch (so libgomp) is loaded already."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in env or "OMP_WAIT_POLICY" in env:
        return None
    env["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return SPIN_COUNT


_OURS: dict[int, str] = {}  # id(env) -> the OMP_NUM_THREADS value configure set there (so not the user's)


def _user_threads(env: dict) -> bool:
    value = env.get("OMP_NUM_THREADS")
    return value is not None and _OURS.get(id(env)) != value


def _set_threads(count: int, env: dict) -> None:
    """Before torch is imported, through OMP_NUM_THREADS (torch, MKL and oneDNN all read it); after, directly."""
    torch = sys.modules.get("torch")
    if torch is None:
        env["OMP_NUM_THREADS"] = _OURS[id(env)] = str(count)
    elif torch.get_num_threads() != count:
        torch.set_num_threads(count)


def configure(kind: str = "train", env: dict | None = None, sample_s: float = BUSY_SAMPLE_S) -> Policy:
    """Choose torch's thread count and OpenMP spin for a command of `kind` (train, evaluate, predict, serve).

    Call it first thing in the command, before torch is imported (see the module's docstring for why).
    """
    env = os.environ if env is None else env
    setting = parse_setting(env.get(ENV))
    if setting == "off":
        return Policy(None, None, None, f"{ENV}=off: torch's defaults")
    spin = _set_spin(env)
    if isinstance(setting, int):
        _set_threads(setting, env)
        return Policy(setting, spin, None, f"{ENV}={setting}")
    if _user_threads(env):
        return Policy(None, spin, None, "OMP_NUM_THREADS set by the user")
    if kind == "serve":
        _set_threads(1, env)
        return Policy(1, spin, None, "serve: one thread per request")
    busy = others_busy(sample_s)
    threads = choose_threads(usable_cores(), busy)
    _set_threads(threads, env)
    return Policy(threads, spin, busy, "auto: cores not busy with other processes")
