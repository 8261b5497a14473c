"""Renders bench/results/README.md (markdown tables and PNG plots) from the report CSVs that
bench/run_all.py writes, `<machine>-<YYYY-MM-DD>.csv` (columns: common.COLUMNS).

    python bench/report.py [DIR]        # re-render DIR (default bench/results) from its CSVs

The README keeps the rows of its table of files that describe other files still present
(written by the single scripts) and regenerates the rows of the report files, the GPU
paragraph and one section per machine (its latest report). matplotlib is optional: without
it the tables are still written and the README says that the plots were skipped.
"""
from __future__ import annotations

import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPORT_CSV = re.compile(r"^(?P<machine>[a-z0-9-]+)-(?P<date>\d{4}-\d{2}-\d{2})\.csv$")
# display order; anything else follows
OP_PROVIDERS = ["fused_", "fused", "compiled_", "compiled", "eager_", "eager", "pyreft-style",
                "pyreft"]
LEGEND = {
    "fused_": "`reft_ext.loreft_` (fused kernels, in place: what patch() uses)",
    "fused": "`reft_ext.loreft` (fused kernels, out of place: includes a (B, T, d) copy)",
    "compiled_": "`torch.compile(loreft_reference_)` (default inductor; compile time excluded)",
    "compiled": "`torch.compile(loreft_reference)`",
    "eager_": "`reft_ext.loreft_reference_` (eager gather, matmuls, index_put_)",
    "eager": "`reft_ext.loreft_reference` (the same on a clone)",
    "pyreft-style": "pyreft's formulation: the same math with R under "
                    "`torch.nn.utils.parametrizations.orthogonal`, materialised from its "
                    "parametrisation in every call as pyreft does (bench_e2e.PyreftStyleLoReFT); "
                    "the other providers take R as given",
    "pyreft": "pyreft's own `LoreftIntervention` on the gathered rows",
}


def read_rows(path: Path) -> list[dict]:
    """Rows of a report CSV; median/p20/p80/peak_mem_MiB as floats (None when empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("median", "p20", "p80", "peak_mem_MiB"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
    return rows


def shape_dict(shape: str) -> dict:
    """'B=8 T=512 d=4096 r=8 P=14' -> {'B': '8', ...}."""
    return dict(kv.split("=", 1) for kv in shape.split() if "=" in kv)


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _cell(r: dict | None) -> str:
    if r is None:
        return "—"
    if r["median"] is None:
        return "not run"
    if r["p20"] is None or int(r["n"] or 0) < 5:     # no spread from fewer repeats
        return _num(r["median"])
    return f"{r['median']:.3f} ({r['p20']:.3f}–{r['p80']:.3f})"


def _order(names, preferred):
    return sorted(names, key=lambda n: (preferred.index(n) if n in preferred else 99, n))


def _not_run(rows: list[dict]) -> list[str]:
    seen, out = set(), []
    for r in rows:
        if r["median"] is None and (r["provider"], r["notes"]) not in seen:
            seen.add((r["provider"], r["notes"]))
            out.append(f"- {r['op']}, {r['provider']}: {r['notes'] or 'no result'}")
    return out


# --- the op -------------------------------------------------------------------------------

def op_layout(rows: list[dict]) -> dict:
    """Splits the op's rows: the default d (the largest), its P values, and the P of the d
    sweep (the one measured at other widths)."""
    op = [r for r in rows if r["op"] == "loreft"]
    for r in op:
        r["_s"] = {k: int(v) for k, v in shape_dict(r["shape"]).items()}
    if not op:
        return {}
    d0 = max(r["_s"]["d"] for r in op)
    others = [r["_s"]["P"] for r in op if r["_s"]["d"] != d0]
    return {"rows": op, "d0": d0, "T": max(r["_s"]["T"] for r in op),
            "Pd": max(set(others), key=others.count) if others else None}


def sweep(lay: dict, axis: str, dtype: str) -> dict:
    """{provider: {x: row}} of the fwd+bwd rows of one sweep ('P' at the default d, or 'd'
    at the d sweep's P) for one dtype."""
    out = defaultdict(dict)
    for r in lay.get("rows", []):
        s = r["_s"]
        on_axis = s["d"] == lay["d0"] if axis == "P" else s["P"] == lay["Pd"]
        if r["dtype"] == dtype and r["mode"] == "fwd+bwd" and on_axis:
            out[r["provider"]][s[axis]] = r
    return out


def op_tables(lay: dict) -> list[str]:
    """Markdown: the default-shape table (every mode, P = 14 and T) and one table per sweep
    and dtype (fwd+bwd ms)."""
    rows = lay["rows"]
    dtypes = sorted({r["dtype"] for r in rows}, key=["float32", "bfloat16"].index)
    out = []
    main = [r for r in rows if r["_s"]["d"] == lay["d0"] and r["mode"] in ("fwd", "bwd")]
    if main:
        s0 = main[0]["_s"]
        out.append(f"Forward, backward and both at B={s0['B']} T={s0['T']} d={lay['d0']} "
                   f"r={s0['r']}, fp32 parameters; h a fresh non-leaf tensor and the incoming "
                   "gradient owned by autograd alone, as in training; ms median (p20–p80):\n")
        by = {(r["dtype"], r["_s"]["P"], r["provider"], r["mode"]): r for r in rows
              if r["_s"]["d"] == lay["d0"]}
        table = []
        for dt in dtypes:
            for P in sorted({r["_s"]["P"] for r in main}):
                ref = by.get((dt, P, "fused_", "fwd+bwd"))
                for prov in _order({k[2] for k in by if k[:2] == (dt, P)}, OP_PROVIDERS):
                    both = by.get((dt, P, prov, "fwd+bwd"))
                    ratio = (f"{both['median'] / ref['median']:.2f}" if both and ref and
                             both["median"] and ref["median"] else "—")
                    table.append([dt, P, prov] + [_cell(by.get((dt, P, prov, m)))
                                                  for m in ("fwd", "bwd", "fwd+bwd")] + [ratio])
        out.append(common.markdown_table(["dtype", "P", "provider", "fwd", "bwd", "fwd+bwd",
                                          "fwd+bwd ÷ fused_"], table))
    for axis, label in (("P", "positions edited per row, P"), ("d", "hidden size d")):
        for dt in dtypes:
            sw = sweep(lay, axis, dt)
            xs = sorted({x for v in sw.values() for x in v})
            if len(xs) < 2:
                continue
            fixed = f"d={lay['d0']}" if axis == "P" else f"P={lay['Pd']}"
            out.append(f"\nfwd+bwd ms vs {label} ({dt}, {fixed}):\n")
            out.append(common.markdown_table(
                ["provider"] + [f"{axis}={x}" for x in xs],
                [[p] + [_num(sw[p][x]["median"]) if x in sw[p] and sw[p][x]["median"]
                        is not None else "—" for x in xs]
                 for p in _order(sw, OP_PROVIDERS)]))
    return out


def plot_sweeps(lay: dict, out_dir: Path, stem: str) -> tuple[list[Path], str | None]:
    """PNGs of fwd+bwd time vs P and vs d, one subplot per dtype, one line per provider.
    Returns (written paths, None) or ([], why the plots were skipped)."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError as e:
        return [], f"matplotlib is not importable ({e}); install it (`pip install \".[bench]\"`)"
    paths = []
    dtypes = sorted({r["dtype"] for r in lay.get("rows", [])}, key=["float32", "bfloat16"].index)
    for axis, xlabel, name in (("P", "positions edited per sequence (P)", "positions"),
                               ("d", "hidden size d", "d")):
        sweeps = {dt: sweep(lay, axis, dt) for dt in dtypes}
        if not any(len({x for v in sw.values() for x in v}) >= 2 for sw in sweeps.values()):
            continue
        fig = Figure(figsize=(5.2 * len(dtypes), 4.2), layout="constrained")
        axes = fig.subplots(1, len(dtypes), squeeze=False)[0]
        for ax, dt in zip(axes, dtypes):
            xs = set()
            for prov in _order(sweeps[dt], OP_PROVIDERS):
                pts = sorted((x, r["median"]) for x, r in sweeps[dt][prov].items()
                             if r["median"] is not None)
                if pts:
                    xs |= {x for x, _ in pts}
                    # a provider keeps its colour in every plot; out-of-place forms dashed
                    k = OP_PROVIDERS.index(prov) if prov in OP_PROVIDERS else len(OP_PROVIDERS)
                    ax.plot(*zip(*pts), marker="o", label=prov, color=f"C{k}",
                            linestyle="--" if prov in ("fused", "compiled", "eager") else "-")
            # P spans 1..T and d doubles: log axes keep every point readable
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sorted(xs), [str(x) for x in sorted(xs)])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            fixed = f"d={lay['d0']}" if axis == "P" else f"P={lay['Pd']}"
            ax.set_title(f"LoReFT fwd+bwd, {dt}, {fixed}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("ms (median)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        path = out_dir / f"{stem}-vs-{name}.png"
        fig.savefig(path, dpi=90, metadata={"Software": None})
        paths.append(path)
    return paths, None


# --- R map, training step -----------------------------------------------------------------

def _notes(r: dict) -> dict:
    return dict(kv.strip().split("=", 1) for kv in r["notes"].split(";") if "=" in kv)


def orth_table(rows: list[dict]) -> str:
    """Markdown table of the 'R map' rows: fwd+bwd time, state, peak memory, orthonormality
    under AdamW with weight decay."""
    table = []
    for r in (x for x in rows if x["op"] == "R map"):
        decay = sorted((x for x in rows if x["op"].startswith("R map after") and
                        x["provider"] == r["provider"]), key=lambda x: int(x["mode"].split()[0]))
        table.append([r["provider"], _cell(r), r["n"], _notes(r).get("state_MiB", "—"),
                      _num(r["peak_mem_MiB"], 1)] +
                     [f"{x['median']:.1e} / {float(_notes(x).get('normR', 'nan')):.2f}"
                      + ("" if x is decay[0] else f" (N={x['mode'].split()[0]})")
                      for x in decay[:1] + decay[-1:]])
    return common.markdown_table(["R map", "fwd+bwd ms (p20–p80)", "n", "state MiB",
                                  "peak memory growth MiB",
                                  "after 1 AdamW step: max|RRᵀ−I| / ‖R‖F", "after N steps"],
                                 table)


def e2e_tables(rows: list[dict]) -> str:
    """Markdown: one table per training-step shape (time, ratio to the frozen floor, extra
    time, trainable parameters, peak memory) with the target and overhead lines."""
    out = []
    groups = defaultdict(list)
    for r in rows:
        if r["op"] == "train step":
            groups[r["shape"]].append(r)
    for shape, rs in groups.items():
        by = {r["provider"]: r for r in rs}
        floor = by.get("floor")
        f_ms = floor["median"] if floor else None
        f_mem = floor["peak_mem_MiB"] if floor else None
        table = []
        for r in rs:
            ms = r["median"]
            ratio = f"{ms / f_ms:.3f}" if ms and f_ms else "—"
            extra = f"{ms - f_ms:+.1f}" if ms and f_ms else "—"
            mem = r["peak_mem_MiB"]
            extra_mem = f"{mem - f_mem:+.1f}" if mem is not None and f_mem is not None else "—"
            params = f"{int(r['params']):,}" if r["params"] not in ("", None) else "—"
            table.append([r["provider"], _cell(r), r["n"] or "—", ratio, extra, params,
                          _num(mem, 1), extra_mem])
        load = _notes(floor).get("loadavg", "?") if floor else "?"
        out.append(f"Training step, {shape}, {rs[0]['dtype']} (load average {load}); ms, "
                   "median (p20–p80); peak memory growth over the built base model, 3 steps:\n")
        out.append(common.markdown_table(
            ["provider", "step ms", "n", "× floor", "extra ms", "trainable params",
             "peak MiB", "extra MiB vs floor"], table))
        lines = []
        if f_ms and by.get("fused", {}).get("median"):
            x = by["fused"]["median"] / f_ms
            lines.append(f"- Target (reft_ext within 3% of the frozen floor): fused is "
                         f"{(x - 1) * 100:+.1f}% → {'met' if x <= 1.03 else 'NOT met'}.")
        if f_ms and by.get("pyreft-style", {}).get("median"):
            lines.append(f"- pyreft-style overhead in the same run: "
                         f"{(by['pyreft-style']['median'] / f_ms - 1) * 100:+.1f}% over the floor.")
        lora = by.get("lora")
        if lora and lora["median"] is not None:
            n = _notes(lora)
            lines.append(f"- LoRA rank {n.get('lora_rank', '?')} on {n.get('targets', '?')}: "
                         f"{int(lora['params']):,} trainable parameters vs LoReFT's "
                         f"{int(n.get('loreft_params', 0)):,} (rank 8, same layers).")
        lines += _not_run(rs)
        out.append("\n" + "\n".join(lines) + "\n" if lines else "")
    return "\n".join(out)


# --- README -------------------------------------------------------------------------------

def _gpu(device: str) -> bool:
    return "CUDA" in device


def latest_reports(results: Path) -> list[Path]:
    """The newest report CSV of each machine in `results`."""
    best = {}
    for p in sorted(results.glob("*.csv")):
        m = REPORT_CSV.match(p.name)
        if m:
            best[m["machine"]] = p        # sorted: later dates overwrite earlier ones
    return list(best.values())


def section(csv_path: Path, plots: bool = True) -> tuple[str, list[Path], str | None]:
    """The README section of one report CSV; writes its PNGs next to it. Returns (markdown,
    PNG paths, why plots were skipped or None)."""
    rows = read_rows(csv_path)
    r0 = rows[0]
    libs = ", ".join(f"{k} {r0[k]}" for k in ("transformers", "peft") if r0.get(k))
    md = [f"## {r0['device']}: `{csv_path.name}`\n",
          f"`python bench/run_all.py`, {r0['date']}; torch {r0['torch']}, reft_ext "
          f"{r0['reft_ext']}, Python {r0['python']}{', ' + libs if libs else ''}. Every row of "
          "the CSV is one measurement (median, p20, p80 in its unit, over n repeats); providers "
          "were measured in the same run.\n"]
    lay = op_layout(rows)
    pngs, skipped = [], None
    if lay:
        md.append("### The op: LoReFT by provider\n")
        provs = _order({r["provider"] for r in lay["rows"]}, OP_PROVIDERS)
        md.append("\n".join(f"- **{p}**: {LEGEND.get(p, p)}" for p in provs) + "\n")
        loads = [float(_notes(r)["loadavg"]) for r in lay["rows"] if "loadavg" in _notes(r)]
        if loads:
            md.append(f"1-minute load average while these ran: {min(loads):.2f}–{max(loads):.2f} "
                      "(a load above the number of threads used means that other processes shared "
                      "the cores).\n")
        md += op_tables(lay)
        if plots:
            pngs, skipped = plot_sweeps(lay, csv_path.parent, csv_path.stem)
        else:
            skipped = "disabled"
        md.append("")
        md += [f"![{p.stem}]({p.name})" for p in pngs]
        if skipped:
            md.append(f"Plots skipped: {skipped}.")
        md.append("\n".join(_not_run(lay["rows"])))
        for r in rows:
            if r["op"].startswith("loreft call overhead") and r["median"] is not None:
                md.append(f"\nPer-call overhead of `reft_ext.loreft` without grad ({r['shape']}): "
                          f"{_cell(r)} {r['unit']}.")
    if any(r["op"] == "R map" for r in rows):
        md += ["\n### Orthonormalising R (CPU)\n",
               "One forward + backward of the map; state = parameters + buffers; peak memory "
               "growth of a fresh process building it and running 5 forward + backward; AdamW "
               "lr 1e-3, weight decay 0.01.\n", orth_table(rows)]
    if any(r["op"] == "train step" for r in rows):
        md += ["\n### Training step\n",
               "zero_grad + forward + loss + backward + AdamW on the trainable parameters of a "
               "frozen random Llama; providers interleaved in one run.\n", e2e_tables(rows)]
    broken = [r for r in rows if r["provider"] == "-"]      # a whole part failed (run_all)
    if broken:
        md += ["\n### Parts that failed\n"] + [f"- {r['op']}: {r['notes']}" for r in broken]
    return "\n".join(md).rstrip() + "\n", pngs, skipped


def _old_file_rows(readme: Path, results: Path) -> list[list[str]]:
    """Rows of the existing README's table of files that describe other files still in
    `results` (the report's own rows are regenerated)."""
    if not readme.exists():
        return []
    keep = []
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or cells[0] in ("file", "---"):
            continue
        first = cells[0].replace("`", "").split()[0]
        if (results / first).exists() and not REPORT_CSV.match(first) \
                and not first.endswith(".png"):
            keep.append(cells)
    return keep


def render(results: Path = common.RESULTS, plots: bool = True) -> dict:
    """Writes results/README.md from the newest report CSV of each machine in `results`
    (plus PNGs unless plots=False). Returns {"readme": path, "pngs": [paths],
    "skipped": why the plots were skipped, or None}."""
    results = Path(results)
    readme = results / "README.md"
    reports = latest_reports(results)
    sections, pngs, skipped, files = [], [], None, []
    for p in sorted(results.glob("*.csv")):
        if not REPORT_CSV.match(p.name):
            continue
        dev = read_rows(p)[0]["device"]
        files.append([f"`{p.name}`", "`python bench/run_all.py" +
                      (" --device cuda`" if _gpu(dev) else "`") +
                      (" (rendered below)" if p in reports else " (older run)"), dev])
        if p in reports:
            text, ps, why = section(p, plots)
            sections.append(text)
            pngs += ps
            skipped = skipped or why
            if ps:
                files.append([" ".join(f"`{x.name}`" for x in ps), f"plots of `{p.name}`", dev])
    files += _old_file_rows(readme, results)
    gpu = [read_rows(p)[0]["device"] for p in reports if _gpu(read_rows(p)[0]["device"])]
    if gpu:
        para = (f"GPU: the report of {', '.join(gpu)} is below (`python bench/run_all.py "
                "--device cuda`).")
    else:
        para = ("GPU: no GPU was lent to the sessions that wrote the CUDA kernels and this "
                "report, so there are no GPU timings here yet. On a GPU machine "
                "`python bench/run_all.py --device cuda` writes the same report for the GPU.")
    check = "`bash bench/gpu_check.sh` builds for a GPU, runs the CUDA tests and " \
            "compute-sanitizer, runs `bench/bench_cuda.py`, and writes its logs and tables here"
    para += (f" CUDA tests and compute-sanitizer: `gpu_check.log` ({check})."
             if (results / "gpu_check.log").exists() else
             f" There are no CUDA test results or compute-sanitizer reports yet: {check}.")
    text = ["# Benchmark results\n",
            "Rendered by `python bench/report.py` (which `python bench/run_all.py` runs) from "
            "the newest `<machine>-<date>.csv` of each machine; other files come from the "
            "single scripts.\n",
            common.markdown_table(["file", "from", "machine"], files), "", para, ""]
    if not reports:
        text.append("No `bench/run_all.py` report yet.\n")
    readme.write_text("\n".join(text) + "\n" + "\n".join(sections))
    return {"readme": readme, "pngs": pngs, "skipped": skipped}


if __name__ == "__main__":
    out = render(Path(sys.argv[1]) if len(sys.argv) > 1 else common.RESULTS)
    print(f"wrote {out['readme']}" + "".join(f"\nwrote {p}" for p in out["pngs"]) +
          (f"\nplots skipped: {out['skipped']}" if out["skipped"] else ""))
