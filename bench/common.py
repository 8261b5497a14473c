"""Shared benchmark plumbing: timing with spread, machine/version records, CSV + tables.

Every benchmark in bench/ times with `measure` (warm-up, many repeats, median and p20/p80,
device-synchronised), tags rows with `environment()`, and writes them with `write_rows`.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, *, setup=None, reps: int = 30, warmup: int = 3, device="cpu",
            min_seconds: float = 0.0) -> dict:
    """Times fn() `reps` times (after `warmup` untimed calls) and returns seconds as
    {"median", "p20", "p80", "n"}. setup(), if given, runs untimed before each call and its
    result is passed to fn. On CUDA, times with events on the current stream."""
    def once():
        arg = setup() if setup is not None else None
        _sync(device)
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg) if setup is not None else fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        return time.perf_counter() - t0

    for _ in range(warmup):
        once()
    times, t_start = [], time.perf_counter()
    while len(times) < reps or time.perf_counter() - t_start < min_seconds:
        times.append(once())
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return {"median": statistics.median(times), "p20": q[0], "p80": q[3], "n": len(times)}


def environment(device="cpu") -> dict:
    """Machine and versions recorded with every row."""
    import reft_ext

    dev = (torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
           else f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores, "
                f"{torch.get_num_threads()} threads")
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": dev, "torch": torch.__version__, "reft_ext": reft_ext.__version__,
            "python": platform.python_version()}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_rows(name: str, rows: list[dict]) -> Path:
    """Writes rows (dicts with the same keys) to bench/results/<name>.csv; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return path


def fmt_ms(s: dict) -> str:
    """'median (p20–p80)' in milliseconds."""
    return f"{s['median'] * 1e3:.3f} ({s['p20'] * 1e3:.3f}–{s['p80'] * 1e3:.3f})"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
