"""benchmarks/gpu_check.sh (issue 27) in its CPU dry run: every part runs at toy size and the one
report holds every figure a first GPU run is to give. Speeds are never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ["bench_eager", "bench_compiled_swin", "bench_compiled_pvt", "shards", "pretrain", "finetune_ema", "gfl"]
PARTS += ["upernet", "fp16"]
PAIRS = ["simmim_swin_test", "mae_swin_test", "simmim_pvt_test", "mae_pvt_test"]


def test_gpu_check__dry_run_reports_every_part(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    rep = json.loads((out / "report.json").read_text())
    failed = [p for p in rep["parts"] if not p["ok"]]
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert [p["part"] for p in rep["parts"]] == PARTS
    assert rep["settings"]["mode"] == "dry" and rep["peak_tflops"] == 989

    eager = [r for r in rep["bench"] if r["part"] == "bench_eager"]
    assert [r["model"] for r in eager] == PAIRS
    for r in eager:
        assert r["images_per_s"] > 0 and r["peak_mem_mb"] is not None and r["flops_per_image"] > 0
        assert r["mfu"] > 0
    compiled = [r for r in rep["bench"] if r["compiled"]]
    assert [r["model"] for r in compiled] == PAIRS  # each beside its eager row
    for r in compiled:
        assert r["compile_s"] is not None and r["speedup"] > 0 and r["images_per_s"] > 0

    pre = rep["pretrain"]
    assert pre["model"] == "mae_swin_test" and pre["steps"] == 4
    assert pre["end_to_end_images_per_s"] > 0 and pre["synthetic_images_per_s"] > 0
    assert pre["end_to_end_over_synthetic"] > 0 and pre["mfu"] > 0
    assert rep["finetune_ema"]["steps"] == 1 and rep["gfl"]["steps"] == 1 and rep["upernet"]["steps"] == 1
    assert rep["fp16"]["steps"] == 4
    for name in ("finetune_ema", "gfl", "upernet", "fp16"):
        assert rep[name]["last_loss"] is not None, name

    md = (out / "report.md").read_text()
    for heading in ("## Parts", "## Training-step speed", "## Pre-training from tar shards", "## One-step checks"):
        assert heading in md
    assert "989 TFLOP/s" in md
