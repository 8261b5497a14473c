"""The benchmark report (bench/run_all.py, bench/report.py): rendering a small synthetic
CSV into README tables and PNG plots, and (slow) a --quick smoke run of the whole report."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
import report  # noqa: E402

ENV = {"device": "Test CPU, 2 threads", "date": "2026-01-02 03:04 UTC", "torch": "2.13.0",
       "reft_ext": "0.1.0", "python": "3.11.7", "transformers": "5.24.0", "peft": ""}
STEM = "test-cpu-2026-01-02"


def _stats(ms):
    return {"median": ms / 1e3, "p20": 0.9 * ms / 1e3, "p80": 1.1 * ms / 1e3, "n": 10}


def synthetic_rows() -> list[dict]:
    """A small report: the op at d=256 (T=64) for P = 1, 14, 64 and at d=128, two dtypes,
    with a compile error and a skipped provider; the R maps; one training-step table."""
    rows = []
    speed = {"fused_": 1.0, "eager": 3.0, "pyreft-style": 10.0}
    for dt in ("float32", "bfloat16"):
        for P, d in ((1, 256), (14, 256), (64, 256), (14, 128)):
            modes = ("fwd", "bwd", "fwd+bwd") if d == 256 and P in (14, 64) else ("fwd+bwd",)
            for prov in ("fused_", "eager", "pyreft-style", "compiled", "pyreft"):
                for mode in modes:
                    stats = note = None
                    if prov == "compiled":
                        note = "error: BackendCompilerFailed: no compiler"
                    elif prov == "pyreft":
                        note = "skipped: pyreft not importable (ModuleNotFoundError)"
                    else:
                        # ms = speed * (1 + P / 64) * d / 256, fwd+bwd = fwd + bwd
                        ms = speed[prov] * (1 + P / 64) * d / 256
                        stats = _stats(ms if mode == "fwd+bwd" else ms / 2)
                    rows.append(common.row(ENV, op="loreft", provider=prov, mode=mode,
                                           shape=f"B=2 T=64 d={d} r=8 P={P}", dtype=dt,
                                           stats=stats, notes=note or "loadavg=0.50"))
    for prov, ms in (("qr (reft_ext)", 0.3), ("parametrizations.orthogonal", 450.0)):
        rows.append(common.row(ENV, op="R map", provider=prov, mode="fwd+bwd", shape="d=256 r=8",
                               dtype="float32", stats=_stats(ms), peak_bytes=2 * 2**20,
                               notes="state_MiB=0.125"))
        for k, err in ((1, 2e-7), (20, 3e-7)):
            rows.append(common.row(ENV, op="R map after AdamW (lr 1e-3, wd 0.01)", provider=prov,
                                   mode=f"{k} steps", shape="d=256 r=8", dtype="float32",
                                   unit="max|RR^T-I|", stats={"median": err}, scale=1.0,
                                   notes="normR=2.828"))
    shape = "llama L=1 d=256 ffn=512 V=128 B=1 T=32 r=8 pos=f7+l7 layers=all"
    for prov, ms, params, mem, note in (
            ("floor", 100.0, 0, 10.0, "loadavg=0.40->0.60"),
            ("fused", 102.0, 4104, 14.0, ""),
            ("pyreft-style", 151.0, 4104, 30.0, ""),
            ("lora", 104.0, 4096, 16.0, "lora_rank=4; targets=q_proj+v_proj; loreft_params=4104")):
        rows.append(common.row(ENV, op="train step", provider=prov, mode="step", shape=shape,
                               dtype="float32", stats=_stats(ms), params=params,
                               peak_bytes=mem * 2**20, notes=note))
    rows.append(common.row(ENV, op="train step", provider="pyreft", mode="step", shape=shape,
                           dtype="float32", notes="skipped: pyreft not importable"))
    rows.append(common.row(ENV, op="cuda", provider="-", notes="error: OSError: no GPU"))
    return rows


@pytest.fixture
def results(tmp_path):
    """A results directory with a synthetic report CSV, a file from a single script, and an
    older README whose table of files lists it and a file that is gone."""
    common.write_csv(tmp_path / f"{STEM}.csv", synthetic_rows(), common.COLUMNS)
    (tmp_path / "orth.csv").write_text("x\n")
    (tmp_path / "README.md").write_text(
        "# Benchmark results\n\n| file | from | machine |\n|---|---|---|\n"
        "| orth.csv | `python bench/bench_orth.py` | the old Xeon |\n"
        "| gone.csv | `python bench/gone.py` | same |\n\nGPU: old paragraph.\n")
    return tmp_path


def test_csv_has_the_report_columns(results):
    with open(results / f"{STEM}.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == common.COLUMNS
        first = next(reader)
    assert {"op", "provider", "mode", "shape", "dtype", "median", "p20", "p80", "unit",
            "device", "torch", "reft_ext", "python"} <= set(first)
    assert float(first["median"]) == pytest.approx(1 + 1 / 64)   # ms, fused_ fwd+bwd at P=1


def _check_tables(text: str) -> None:
    # default-shape table: every mode at P=14 and P=T=64, ratio to fused_
    assert "| dtype | P | provider | fwd | bwd | fwd+bwd | fwd+bwd ÷ fused_ |" in text
    assert "| float32 | 14 | eager | 1.828 (1.645–2.011) | 1.828 (1.645–2.011) | " \
           "3.656 (3.291–4.022) | 3.00 |" in text
    assert "| bfloat16 | 64 | fused_ | 1.000 (0.900–1.100) |" in text
    # sweeps: one table per dtype vs P at d=256, vs d at P=14
    assert text.count("| provider | P=1 | P=14 | P=64 |") == 2
    assert "| pyreft-style | 10.156 | 12.188 | 20.000 |" in text
    assert text.count("| provider | d=128 | d=256 |") == 2
    assert "| eager | 1.828 | 3.656 |" in text
    assert "- loreft, compiled: error: BackendCompilerFailed: no compiler" in text
    assert "- loreft, pyreft: skipped: pyreft not importable" in text
    assert "load average while these ran: 0.50–0.50" in text
    # R maps, training step with ratio to the floor, target, overhead and LoRA budget
    assert "| qr (reft_ext) | 0.300 (0.270–0.330) | 10 | 0.125 | 2.0 | 2.0e-07 / 2.83 | " \
           "3.0e-07 / 2.83 (N=20) |" in text
    assert "| fused | 102.000 (91.800–112.200) | 10 | 1.020 | +2.0 | 4,104 | 14.0 | +4.0 |" \
        in text
    assert "fused is +2.0% → met" in text
    assert "pyreft-style overhead in the same run: +51.0% over the floor" in text
    assert "4,096 trainable parameters vs LoReFT's 4,104" in text
    assert "- train step, pyreft: skipped: pyreft not importable" in text
    assert "### Parts that failed\n\n- cuda: error: OSError: no GPU" in text
    # table of files: the report's rows, the old row of a file still present, not a gone one
    assert f"| `{STEM}.csv` | `python bench/run_all.py` (rendered below) | Test CPU, 2 threads |" \
        in text
    assert "| orth.csv | `python bench/bench_orth.py` | the old Xeon |" in text
    assert "gone.csv" not in text and "old paragraph" not in text
    assert "GPU: no GPU was lent" in text and "python bench/run_all.py --device cuda" in text


def test_render_tables_and_plots(results):
    pytest.importorskip("matplotlib")
    out = report.render(results)
    text = out["readme"].read_text()
    _check_tables(text)
    assert out["skipped"] is None
    names = sorted(p.name for p in out["pngs"])
    assert names == [f"{STEM}-vs-d.png", f"{STEM}-vs-positions.png"]
    for p in out["pngs"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        assert f"![{p.stem}]({p.name})" in text
    assert "Plots skipped" not in text
    assert f"| `{STEM}-vs-positions.png` `{STEM}-vs-d.png` | plots of `{STEM}.csv` |" in text


def test_render_without_matplotlib(results, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    out = report.render(results)
    text = out["readme"].read_text()
    _check_tables(text)
    assert out["pngs"] == [] and "matplotlib is not importable" in out["skipped"]
    assert "Plots skipped: matplotlib is not importable" in text
    assert not list(results.glob("*.png")) and ".png" not in text


def test_render_rerender_keeps_its_own_rows_once(results):
    report.render(results, plots=False)
    text = report.render(results, plots=False)["readme"].read_text()
    assert text.count(f"| `{STEM}.csv` |") == 1
    assert text.count("| orth.csv |") == 1


def test_machine_slug():
    assert common.machine_slug("Intel(R) Xeon(R) Processor, 2 threads") == "intel-xeon-processor"
    assert common.machine_slug("NVIDIA H200 (CUDA 13.0)") == "nvidia-h200-cuda-13-0"
    assert common.machine_slug("AMD EPYC 7B13 64-Core Processor, 2 cores") == \
        "amd-epyc-7b13-64-core-processor"


def test_positions_of_the_op_sweep():
    f7_l7 = list(range(7)) + list(range(33, 40))
    assert common.positions(3, 40, 14, "cpu").tolist() == [f7_l7] * 3
    assert common.positions(2, 40, 1, "cpu").tolist() == [[39], [39]]
    assert common.positions(2, 40, 4, "cpu").tolist() == [[0, 1, 38, 39]] * 2
    assert common.positions(1, 5, 5, "cpu").tolist() == [[0, 1, 2, 3, 4]]


@pytest.mark.slow
def test_run_all_quick_smoke(tmp_path):
    """The whole report at tiny shapes (~1 min on 2 cores): every part writes its rows, the
    README is rendered, nothing is written outside --out."""
    # one thread: two OpenMP threads on a busy 2-core machine wait out scheduler ticks at
    # every barrier, which makes a smoke run several times slower without testing more
    res = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--threads",
                          "1", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    (path,) = tmp_path.glob("*-????-??-??.csv")
    rows = report.read_rows(path)
    got = {(r["op"], r["provider"]) for r in rows if r["median"] is not None}
    for prov in ("fused_", "fused", "eager_", "eager", "pyreft-style"):
        assert ("loreft", prov) in got
    for prov in ("floor", "fused", "eager-qr", "pyreft-style"):
        assert ("train step", prov) in got
    assert ("R map", "qr (reft_ext)") in got
    # compiled ran or says why not; lora ran or was skipped for a missing peft
    for op, prov in (("loreft", "compiled"), ("train step", "lora")):
        assert (op, prov) in got or any(r["provider"] == prov and r["op"] == op and r["notes"]
                                        for r in rows)
    step = [r for r in rows if r["op"] == "train step" and r["median"] is not None]
    assert all(r["peak_mem_MiB"] is not None and r["peak_mem_MiB"] > 0 for r in step)
    assert "### Training step" in (tmp_path / "README.md").read_text()
    assert f"wrote {path}" in res.stdout
