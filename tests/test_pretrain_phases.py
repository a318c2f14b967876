"""benchmarks/pretrain_phases.py (issue 35): the table's pre-training rows, their phases of a
training step and their whole epochs, at the test scale on tiny images. Speeds are never
asserted here; what is checked is that the rows are the table's, that the phases partition the
step, and that the figures are computed as documented."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from _helpers import write_image

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("pretrain_phases", ROOT / "benchmarks" / "pretrain_phases.py")
pp = importlib.util.module_from_spec(_spec)
sys.modules["pretrain_phases"] = pp  # dataclasses look their module up
_spec.loader.exec_module(pp)


@pytest.fixture
def tiny_data(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(6):  # 12 training images: 3 steps of 4 a pass
                write_image(tmp_path / "data" / split / cls / f"{i}.jpg", size=(80, 72), seed=i)
    return tmp_path / "data"


def test_pretrain_phases__the_tables_rows_phases_that_add_up_and_epoch_rates(tiny_data, tmp_path, capsys):
    out = tmp_path / "phases.json"
    argv = ["--scale", "test", "--data", str(tiny_data), "--repeats", "1", "--warmup", "0"]
    assert pp.main([*argv, "--epoch-rounds", "1", "--epochs", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    mt = sys.modules["minitable"]  # the table script the benchmark read its rows from
    fams = mt.SCALES["test"].families
    assert [r["model"] for r in rows] == [fams[f]["mae" if m == "ummae" else m] for f, m in pp.ROWS]
    planned = {tuple(j.argv[:-2]) for j in mt.plan(mt.SCALES["test"], tmp_path, str(tiny_data), ["--num-workers", "2"])}
    for r in rows:
        assert tuple(r["command"][1:]) in planned  # the table's own command line, less its --output
        assert (r["img_size"], r["unit_size"], r["batch_size"], r["repeats"]) == (64, 8, 4, 1)
        ms = r["phases_ms"]
        assert list(ms) == list(pp.PHASES) and all(v >= 0 for v in ms.values())
        # one timed step: the model step is its phases after the data, back to back
        assert sum(ms[p] for p in pp.PHASES[1:]) == pytest.approx(r["model_step_ms"], rel=1e-9)
        assert r["model_images_per_s"] == pytest.approx(4000 / r["model_step_ms"])
        assert r["with_data_images_per_s"] == pytest.approx(4000 / sum(ms.values()))
        assert r["model_images_per_s_rounds"] == [pytest.approx(r["model_images_per_s"])]
        assert r["epoch_images_per_s_rounds"] == [r["epoch_images_per_s"]] and r["epoch_images_per_s"] > 0
    for simmim, ummae in zip(rows[::2], rows[1::2], strict=True):  # one round: its ratio
        for key in ("model_images_per_s", "epoch_images_per_s"):
            assert simmim[f"{key}_ratio"] == 1.0
            assert ummae[f"{key}_ratio"] == pytest.approx(ummae[key] / simmim[key])
    text = capsys.readouterr().out
    assert all(p in text.splitlines()[1] for p in pp.PHASES) and all(r["model"] in text for r in rows)


def test_phase_clock__marks_each_moment_once_in_the_steps_order(tiny_data, tmp_path):
    """The hooks mark the patch embedding, the decoder and the gradient at the decoder's input
    once per step, in the order the step passes them, for both methods; medians are per phase."""
    commands = pp.table_commands("test", str(tiny_data), 0, tmp_path)
    for label, argv in commands[2:]:  # PVT: SimMIM and UM-MAE
        row = pp.Row(label, argv, torch.device("cpu"), "fp32")
        seen = []

        def spy(name, clock=row.clock, seen=seen):  # records the moments, then marks them as ever
            seen.append(name)
            pp.PhaseClock.mark(clock, name)

        row.clock.mark = spy
        row.step()
        assert seen == ["call", "embed", "decoder", "loss", "back decoder", "backward", "optimiser"]
        row.step()
        row.step()
        med = row.medians()
        assert med["encoder"] == pytest.approx(1000 * statistics.median(s["encoder"] for s in row.steps))


def test_ratio_to_simmim__median_of_the_ratios_within_rounds():
    """Not the ratio of the medians: a round that was slow for both rows cancels out."""
    rows = [{"x_rounds": [100.0, 50.0, 100.0]}, {"x_rounds": [50.0, 50.0, 60.0]}]
    pp._ratio_to_simmim(rows, "x")
    assert rows[0]["x_ratio"] == 1.0
    assert rows[1]["x_ratio"] == pytest.approx(statistics.median([50 / 100, 50 / 50, 60 / 100]))  # 0.6, not 0.5
