"""Small measurement helpers: percentiles, summaries, RSS, machine facts."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of sorted values."""
    if not sorted_values:
        raise ValueError("no samples")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_summary(seconds: list[float], over_ms: float) -> dict[str, Any]:
    """Latency samples in seconds -> figures in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return {
        "samples": len(ms),
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1],
        "min_ms": ms[0],
        "mean_ms": statistics.fmean(ms),
        f"over_{over_ms:g}ms": sum(1 for v in ms if v > over_ms),
    }


def spread(values: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements."""
    ordered = sorted(values)
    median = statistics.median(ordered)
    return {
        "runs": ordered if len(ordered) > 1 else ordered[0],
        "median": median,
        "min": ordered[0],
        "max": ordered[-1],
        "spread_pct": (ordered[-1] - ordered[0]) / median * 100 if median else 0.0,
    }


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS of this process image) in KiB, from /proc/self/status.

    ``resource.getrusage(...).ru_maxrss`` is not used for peaks: on Linux it
    carries over the parent's peak across fork + exec."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def rss_mb() -> dict[str, float]:
    """Current and peak RSS of this process in MB (10^6 bytes)."""
    status = proc_status()
    return {"rss_mb": status["VmRSS"] * 1024 / 1e6, "peak_rss_mb": status["VmHWM"] * 1024 / 1e6}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def filesystem_of(path: Path) -> dict[str, str]:
    """Mount point, type, device and options of the filesystem holding ``path``."""
    real = os.path.realpath(path)
    best: dict[str, str] = {"mount": "?", "type": "unknown", "device": "?", "options": ""}
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return best
    best_len = -1
    for device, mount, fstype, options, *_ in mounts:
        mount = mount.replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best_len:
            best_len = len(mount)
            best = {"mount": mount, "type": fstype, "device": device, "options": options}
    return best


def load_facts() -> dict[str, Any]:
    """How busy the machine is (other processes share CPUs and disk):
    load averages and the kernel's pressure stall figures (avg10, %)."""
    out: dict[str, Any] = {"loadavg_1_5_15": list(os.getloadavg())}
    for kind in ("cpu", "io"):
        try:
            with open(f"/proc/pressure/{kind}") as f:
                some = f.readline().split()
        except OSError:
            continue
        fields = dict(part.split("=") for part in some[1:])
        out[f"{kind}_pressure_some_avg10_pct"] = float(fields["avg10"])
    return out


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def machine_facts(tmp: Path) -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_mib": _mem_total_mib(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "pycrdt": metadata.version("pycrdt"),
        "orjson": metadata.version("orjson"),
        "sqlite": sqlite3.sqlite_version,
        "tmp_dir": str(tmp),
        "tmp_filesystem": filesystem_of(tmp),
    }


def run_facts(argv: list[str], module: str = "bench.core") -> dict[str, Any]:
    dirty = _git("status", "--porcelain", "--", "engine")
    return {
        "command": " ".join(["python", "-m", module, *argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "engine_uncommitted_changes": bool(dirty),
    }
