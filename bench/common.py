"""Shared benchmark plumbing: timing with spread, machine/version records, CSV + tables.

Every benchmark in bench/ times with `measure` (warm-up, many repeats, median and p20/p80,
device-synchronised) or, for providers compared with each other, `measure_interleaved`,
tags rows with `environment()`, and writes them with `write_rows`.
Rows in the report format (`COLUMNS`, one measurement each; bench/run_all.py) are made by
`row`; peak memory is measured with `peak_memory_start` / `peak_memory_growth`.
"""
from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import os
import re
import resource
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# The report CSV (bench/run_all.py): one measurement per row. median/p20/p80 are in `unit`;
# peak_mem_MiB is the provider's peak memory growth where measured; params counts trainable
# parameters where relevant; notes holds "key=value; ..." details, errors and skip reasons.
COLUMNS = ["op", "provider", "mode", "shape", "dtype", "median", "p20", "p80", "unit", "n",
           "peak_mem_MiB", "params", "notes", "device", "date", "torch", "reft_ext", "python",
           "transformers", "peft"]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, setup, device) -> float:
    """Seconds of one fn() call (fn(setup()) when setup is given; setup untimed)."""
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


def _stats(times: list) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return {"median": statistics.median(times), "p20": q[0], "p80": q[3], "n": len(times)}


def measure(fn, *, setup=None, reps: int = 30, warmup: int = 3, device="cpu",
            min_seconds: float = 0.0) -> dict:
    """Times fn() `reps` times (after `warmup` untimed calls) and returns seconds as
    {"median", "p20", "p80", "n"}. setup(), if given, runs untimed before each call and its
    result is passed to fn. On CUDA, times with events on the current stream."""
    for _ in range(warmup):
        _time_once(fn, setup, device)
    times, t_start = [], time.perf_counter()
    while len(times) < reps or time.perf_counter() - t_start < min_seconds:
        times.append(_time_once(fn, setup, device))
    return _stats(times)


def measure_interleaved(cases: dict, *, reps: int = 30, warmup: int = 3,
                        device="cpu") -> dict:
    """Like measure, for {name: (fn, setup)} timed in turns: each round runs one repeat of
    every case, so the slow drift of a shared machine (minutes of more or less contention)
    falls on all of them alike and the ratios between them stay steadier than between
    back-to-back blocks of repeats. Returns {name: measure()-style stats}."""
    for _ in range(warmup):
        for fn, setup in cases.values():
            _time_once(fn, setup, device)
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, (fn, setup) in cases.items():
            times[name].append(_time_once(fn, setup, device))
    return {name: _stats(t) for name, t in times.items()}


def positions(B: int, T: int, P: int, device) -> torch.Tensor:
    """(B, P) int64: every token when P >= T, else the first P // 2 and the last
    P - P // 2 tokens (P = 14 is f7+l7, P = 1 the last token)."""
    if P >= T:
        return torch.arange(T).expand(B, T).contiguous().to(device)
    k = P // 2
    idx = torch.cat([torch.arange(k), torch.arange(T - (P - k), T)])
    return idx.expand(B, P).contiguous().to(device)


def environment(device="cpu") -> dict:
    """Machine and versions recorded with every row."""
    import reft_ext

    dev = (torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
           else f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores, "
                f"{torch.get_num_threads()} threads")
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": dev, "torch": torch.__version__, "reft_ext": reft_ext.__version__,
            "python": platform.python_version()}


def versions() -> dict:
    """Versions of the optional libraries a report may use ("" when not installed); read
    from the package metadata, so nothing heavy is imported."""
    out = {}
    for name in ("transformers", "peft"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = ""
    return out


def machine_slug(device_name: str) -> str:
    """A short file-name slug of a CPU/GPU name: 'Intel(R) Xeon(R) Processor, 2 threads' ->
    'intel-xeon-processor', 'NVIDIA H200' -> 'nvidia-h200'."""
    name = device_name.split(",")[0]
    name = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|@.*$", " ", name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "unknown"


def row(env: dict, *, op: str, provider: str, mode: str = "", shape: str = "",
        dtype: str = "", stats: dict | None = None, unit: str = "ms", scale: float = 1e3,
        peak_bytes: float | None = None, params: int | None = None, notes: str = "") -> dict:
    """One report row (`COLUMNS`). stats: measure()'s {"median", "p20", "p80", "n"} (seconds
    for times; scaled by `scale` into `unit`), or None for a provider that did not run (say
    why in notes). peak_bytes: peak memory growth in bytes, if measured."""
    s = stats or {}
    val = lambda k: "" if s.get(k) is None else s[k] * scale  # noqa: E731
    out = {"op": op, "provider": provider, "mode": mode, "shape": shape, "dtype": dtype,
           "median": val("median"), "p20": val("p20"), "p80": val("p80"), "unit": unit,
           "n": s.get("n", ""), "peak_mem_MiB": "" if peak_bytes is None else peak_bytes / 2**20,
           "params": "" if params is None else params, "notes": notes}
    out.update({k: env.get(k, "") for k in COLUMNS if k not in out})
    return out


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_memory_start(device="cpu") -> tuple:
    """Starts a peak-memory window; pass the result to `peak_memory_growth`.

    CUDA: torch.cuda's peak counter is reset, the baseline is memory_allocated().
    CPU: the process's peak RSS (VmHWM) is reset to its current RSS through
    /proc/self/clear_refs, the baseline is VmRSS: unlike ru_maxrss, whose high-water mark
    cannot be reset, a transient peak before the window (model construction) cannot hide
    the growth inside it. Without /proc, ru_maxrss is the fallback (then the growth is a
    lower bound). Set MALLOC_MMAP_THRESHOLD_ (e.g. 65536) in the environment of a process
    measured this way, so that freed tensors go back to the OS rather than into malloc's
    arenas, where they would be reused without showing as growth."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return ("cuda", torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return ("vmhwm", _status_kib("VmRSS") * 1024)
    except OSError:
        return ("ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_memory_growth(token: tuple, device="cpu") -> float:
    """Bytes by which the peak (allocated on CUDA, resident on CPU) exceeded the baseline
    taken by `peak_memory_start`."""
    kind, base = token
    if kind == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if kind == "vmhwm":
        return _status_kib("VmHWM") * 1024 - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Writes rows to path (columns: `columns` or the first row's keys); returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return path


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
    return write_csv(RESULTS / f"{name}.csv", rows)


def ms_row(env: dict, stats: dict, **fields) -> dict:
    """One CSV row of a timing in milliseconds: fields (op, provider, mode, shape, dtype, ...
    in that order), median / p20 / p80 of stats (seconds), n, then the environment."""
    return {**fields, "median_ms": stats["median"] * 1e3, "p20_ms": stats["p20"] * 1e3,
            "p80_ms": stats["p80"] * 1e3, "n": stats["n"], **env}


def machine_line(env: dict) -> str:
    """'Machine: <device>; torch <v>, reft_ext <v>, <date>.' for a results table."""
    return (f"Machine: {env['device']}; torch {env['torch']}, reft_ext {env['reft_ext']}, "
            f"{env['date']}.")


def fmt_ms(s: dict) -> str:
    """'median (p20–p80)' in milliseconds."""
    return f"{s['median'] * 1e3:.3f} ({s['p20'] * 1e3:.3f}–{s['p80'] * 1e3:.3f})"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
