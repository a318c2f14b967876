"""ummae.bench: result structure, JSON output and argument checks (tiny models, CPU).

Speed is measured by benchmarks/run_bench.sh, never asserted here.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from ummae.bench import add_bench_args, bench_main, format_table, run_bench

PAIR = ["mae_swin_test", "simmim_swin_test"]
KEYS = {
    "model",
    "images_per_s",
    "peak_mem_mb",
    "ratio",
    "batch_size",
    "img_size",
    "steps",
    "device",
    "precision",
    "step_time_ms",
    "loss",
    "params_m",
    "torch",
    "device_name",
    "num_threads",
}
FAST = dict(batch_size=2, img_size=None, steps=2, warmup=1, device="cpu", precision="auto")


def _check(results, models, batch_size, steps):
    assert [r["model"] for r in results] == models
    for r in results:
        assert set(r) >= KEYS, KEYS - set(r)
        assert r["images_per_s"] > 0
        assert r["step_time_ms"] > 0
        assert r["peak_mem_mb"] > 0
        assert r["params_m"] > 0
        assert math.isfinite(r["loss"])
        assert r["batch_size"] == batch_size and r["steps"] == steps
        assert r["img_size"] == 64  # the tiny models' default
        assert r["device"] == "cpu" and r["precision"] == "fp32"  # auto on CPU
    assert results[0]["ratio"] == 1.0
    assert results[1]["ratio"] == pytest.approx(results[1]["images_per_s"] / results[0]["images_per_s"])


def test_run_bench_two_models():
    results = run_bench(PAIR, seed=0, **FAST)
    _check(results, PAIR, batch_size=2, steps=2)
    table = format_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(PAIR)
    for col in ("model", "batch", "img", "images/s", "ms/step", "peak MiB", "ratio"):
        assert col in lines[0]
    assert lines[2].startswith(PAIR[0]) and lines[3].startswith(PAIR[1])


def test_bench_main_writes_json(tmp_path, capsys):
    models = ["mae_pvt_test", "simmim_pvt_test"]
    path = tmp_path / "new" / "folder" / "bench.json"  # parent folders are created
    parser = add_bench_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--models",
            ",".join(models),
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--json",
            str(path),
        ]
    )
    assert args.img_size is None and args.precision == "auto" and args.seed == 0
    assert bench_main(args) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "threads" in out
    assert all(m in out for m in models)
    data = json.loads(path.read_text())
    assert isinstance(data, list)
    _check(data, models, batch_size=2, steps=1)


def test_bench_args_defaults():
    args = add_bench_args(argparse.ArgumentParser()).parse_args(["--models", "a, b,"])
    assert args.models == ["a", "b"]
    assert (args.batch_size, args.steps, args.warmup, args.device, args.json) == (16, 10, 3, "auto", None)
    args = add_bench_args(argparse.ArgumentParser()).parse_args([])
    assert bench_main(args) == 2  # neither --models nor --data: one error line


def test_input_bench__times_both_pipelines_per_core_and_with_workers(tmp_path, capsys):
    from _helpers import write_image

    for i in range(12):
        write_image(tmp_path / "imgs" / f"{i}.jpg", size=(90, 70), seed=i)
    args = add_bench_args(argparse.ArgumentParser()).parse_args(
        [
            "--data",
            str(tmp_path / "imgs"),
            "--images",
            "12",
            "--workers",
            "1",
            "--batch-size",
            "4",
            "--img-size",
            "32",
            "--pipelines",
            "pil,tensor,device",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    assert bench_main(args) == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["pipeline"] for r in rows] == ["pil", "tensor", "device"]
    assert all(r["per_core_images_per_s"] > 0 and r["total_images_per_s"] > 0 and r["images"] == 12 for r in rows)
    assert "images/s per core" in capsys.readouterr().out
    bad = add_bench_args(argparse.ArgumentParser()).parse_args(["--data", str(tmp_path / "nope")])
    assert bench_main(bad) == 2


def test_unknown_model_raises_before_running():
    with pytest.raises(ValueError, match="no_such_model"):
        run_bench([PAIR[0], "no_such_model"], **FAST)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=0), dict(warmup=-1)])
def test_bad_counts_raise(bad):
    kw = {**FAST, **bad}
    with pytest.raises(ValueError):
        run_bench(PAIR, **kw)


def test_format_table_aligned():
    rows = [
        dict(
            model="a_long_model_name",
            batch_size=8,
            img_size=256,
            images_per_s=12.345,
            step_time_ms=648.1,
            peak_mem_mb=1024.0,
            ratio=1.0,
        ),
        dict(
            model="b", batch_size=8, img_size=256, images_per_s=30.0, step_time_ms=266.7, peak_mem_mb=None, ratio=2.43
        ),
    ]
    lines = format_table(rows).splitlines()
    assert len({len(line) for line in lines}) == 1  # every line equally wide
    assert "n/a" in lines[3] and "2.430" in lines[3] and "12.35" in lines[2]


def test_run_bench_compile__rows_side_by_side_and_the_same_training():
    """``--compile``: each model eager then compiled, from the same init, batch and masks: the
    compiled row's last loss is the eager one's (fp32), its compile time stands apart, and the
    FLOPs per image are FlopCounterMode's count of one step (the same for both rows)."""
    models = ["mae_pvt_test", "simmim_pvt_test"]
    results = run_bench(models, seed=0, compile=True, flops=True, compile_backend="aot_eager", **FAST)
    assert [(r["model"], r["compiled"]) for r in results] == [(m, c) for m in models for c in (False, True)]
    for eager, fast in zip(results[::2], results[1::2], strict=True):
        assert eager["compile_s"] is None and fast["compile_s"] >= 0 and fast["compile_backend"] == "aot_eager"
        assert fast["loss"] == pytest.approx(eager["loss"], rel=1e-5)
        assert fast["speedup"] == pytest.approx(fast["images_per_s"] / eager["images_per_s"])
        assert eager["flops_per_image"] > 0 and fast["flops_per_image"] == eager["flops_per_image"]
    header = format_table(results).splitlines()[0]
    assert "compile s" in header and "speedup" in header


def test_unit_size_reaches_the_model__its_masks_have_img_over_unit_units_a_side():
    """``--unit-size`` builds each model at that mask unit (as ``pretrain --unit-size``): the
    masks the timed steps draw cover (64 / 8)**2 units, against (64 / 16)**2 at the models' own
    16 px units, for UM-MAE and SimMIM alike; the table shows the unit."""
    models = ["mae_pvt_test", "simmim_pvt_test"]
    fast = {**FAST, "img_size": 64, "steps": 1, "warmup": 0}
    own = run_bench(models, seed=0, **fast)
    small = run_bench(models, seed=0, unit_size=8, **fast)
    assert [(r["unit_size"], r["mask_units"]) for r in own] == [(16, (64 // 16) ** 2)] * 2
    assert [(r["unit_size"], r["mask_units"]) for r in small] == [(8, (64 // 8) ** 2)] * 2
    lines = format_table(small).splitlines()
    assert "unit" in lines[0].split() and lines[2].split()[3] == "8"


@pytest.mark.parametrize(
    ("models", "unit", "says"),
    [
        ("mae_pvt_test", "0", "unit_size must be >= 1"),
        ("mae_pvt_test", "12", "mask unit size 12"),
        ("simmim_pvt_test", "5", "multiple of the mask unit 5"),
    ],
)
def test_bad_unit_size__one_line(models, unit, says, capsys):
    args = add_bench_args(argparse.ArgumentParser()).parse_args(
        ["--models", models, "--unit-size", unit, "--batch-size", "2", "--steps", "1", "--device", "cpu"]
    )
    assert bench_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
