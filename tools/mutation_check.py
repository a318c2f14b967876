"""Mutation check: plant known bugs, one at a time, in a temporary copy of the project and see
whether the tests that should catch each one fail.

    python tools/mutation_check.py            # every mutation; exit 1 if any survives
    python tools/mutation_check.py --list     # the mutations, without running
    python tools/mutation_check.py sm_round knn_temperature   # some of them

Each mutation is a textual edit (``old`` must occur in the file exactly ``count`` times) and
the tests that should catch it. The copy imports its own ``src/`` (PYTHONPATH first), and
``../shared`` is linked beside it, so the parity cases run as in CI. The unmutated copy is run
first on the union of the tests: a mutation only counts as caught when those pass unmutated.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple
    count: int = 1


MUTATIONS = [
    # the four bugs the audit planted that the suite did not catch
    Mutation(
        "sm_round",
        "Secondary Masking count rounded instead of the reference's V - int(V(1-r))",
        "src/ummae/models/masking.py",
        "k = v - int(v * (1.0 - ratio))",
        "k = round(v * ratio)",
        ("tests/test_masking.py",),
    ),
    Mutation(
        "norm_pix_eps0",
        "norm-pix target without its 1e-6 eps",
        "src/ummae/models/mae.py",
        "def norm_pix_target(target: Tensor, eps: float = 1e-6)",
        "def norm_pix_target(target: Tensor, eps: float = 0.0)",
        (
            "tests/test_visualize.py::test_norm_pix_target__equals_the_formula_with_eps_1e6",
            "tests/test_models.py::test_mae_loss__norm_pix_eps_on_flat_units",
        ),
    ),
    Mutation(
        "knn_temperature",
        "kNN ignores --temperature (uses the default)",
        "src/ummae/tasks/knn.py",
        "train_ds.num_classes, cfg.k, cfg.temperature)",
        "train_ds.num_classes, cfg.k)",
        ("tests/test_classify.py::test_run_knn__uses_the_temperature_it_is_given",),
    ),
    Mutation(
        "mixup_global_numpy",
        "mixup drawn from numpy's global RNG, not the step's seed",
        "src/ummae/tasks/classify.py",
        "with numpy_seeded(generator.initial_seed()):",
        "with contextlib.nullcontext():",
        ("tests/test_finetune_parts.py",),
        count=2,
    ),
    # the four the audit's suite already caught
    Mutation(
        "us_randint3",
        "Uniform Sampling draws from 3 of the 4 units",
        "src/ummae/models/masking.py",
        "torch.randint(0, 4, (n, bh, bw)",
        "torch.randint(0, 3, (n, bh, bw)",
        ("tests/test_masking.py",),
    ),
    Mutation(
        "us_block_order",
        "in-block order of the 2x2 block transposed",
        "src/ummae/models/masking.py",
        "keep.view(n, bh, bw, 2, 2).permute(0, 1, 3, 2, 4)",
        "keep.view(n, bh, bw, 2, 2).permute(0, 1, 4, 2, 3)",
        ("tests/test_masking.py",),
    ),
    Mutation(
        "sm_floor",
        "Secondary Masking count floor(V r) (METHOD's first rule, not the reference's)",
        "src/ummae/models/masking.py",
        "k = v - int(v * (1.0 - ratio))",
        "k = int(v * ratio)",
        ("tests/test_masking.py",),
    ),
    Mutation(
        "knn_exp_times_t",
        "kNN votes exp(sim * T) instead of exp(sim / T)",
        "src/ummae/tasks/knn.py",
        "(sim / temperature).exp()",
        "(sim * temperature).exp()",
        ("tests/test_classify.py",),
    ),
    # reference parity
    Mutation(
        "posmlp_sign",
        "pos-MLP fed query minus key",
        "src/ummae/models/swin.py",
        "pos.unsqueeze(-3) - pos.unsqueeze(-2)",
        "pos.unsqueeze(-2) - pos.unsqueeze(-3)",
        ("tests/test_models.py", "tests/test_parity.py"),
    ),
    Mutation(
        "merge_floor",
        "merged Swin positions floored, not divided exactly",
        "src/ummae/models/swin.py",
        "return x, pos[:, ::2, ::2] / 2",
        "return x, torch.div(pos[:, ::2, ::2], 2, rounding_mode='floor')",
        ("tests/test_models.py", "tests/test_parity.py"),
    ),
    Mutation(
        "swin_block_eps",
        "Swin block norms with eps 1e-6 (the reference's are 1e-5)",
        "src/ummae/models/swin.py",
        "self.norm1 = nn.LayerNorm(dim)",
        "self.norm1 = LayerNorm(dim)",
        ("tests/test_parity.py",),
    ),
    Mutation(
        "sincos_row_first",
        "sin-cos table with the row first",
        "src/ummae/models/layers/pos_embed.py",
        "[out_c.sin(), out_c.cos(), out_r.sin(), out_r.cos()]",
        "[out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()]",
        ("tests/test_models.py", "tests/test_parity.py"),
    ),
    Mutation(
        "simmim_token_before_norm",
        "SimMIM mask token inserted before the patch norm",
        "src/ummae/models/base.py",
        "tokens = self.patch_norm(self.patch_embed(imgs))\n        if token_mask is not None and mask_token is not None:\n            tokens = torch.where(token_mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)",
        "tokens = self.patch_embed(imgs)\n        if token_mask is not None and mask_token is not None:\n            tokens = torch.where(token_mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)\n        tokens = self.patch_norm(tokens)",
        ("tests/test_models.py", "tests/test_parity.py"),
    ),
    Mutation(
        "decoder_positions",
        "default decoder positions = the reference's ordering",
        "src/ummae/models/mae.py",
        "            index = kept_unit_index(choice)",
        "            index = reference_unit_index(choice)",
        ("tests/test_models.py",),
    ),
    Mutation(
        "pvt_max_pool",
        "PVT keys/values max-pooled",
        "src/ummae/models/pvt.py",
        "y = F.avg_pool2d(y, self.sr_ratio)",
        "y = F.max_pool2d(y, self.sr_ratio)",
        ("tests/test_models.py",),
    ),
    Mutation(
        "random_mask_count",
        "random masks keep int(L(1-r)) (MAE's count, not the reference's)",
        "src/ummae/models/masking.py",
        "return length - int(ratio * length)",
        "return int(length * (1 - ratio))",
        ("tests/test_masking.py",),
    ),
    Mutation(
        "frozen_table_unchecked",
        "converter drops frozen tables without checking them",
        "src/ummae/weights/convert.py",
        "    diff = (table.float() - want).abs().max().item()",
        "    diff = 0.0",
        ("tests/test_parity.py",),
    ),
    # recipe
    Mutation(
        "layer_decay_downsample",
        "down-sampling layer decayed with the block before it",
        "src/ummae/models/base.py",
        "return sum(self.depths[: int(parts[1]) + 1]) + 1",
        "return sum(self.depths[: int(parts[1]) + 1])",
        ("tests/test_classify.py",),
    ),
    Mutation(
        "lars_bias_adapt",
        "LARS trust ratio on the bias too",
        "src/ummae/tasks/classify.py",
        '{"params": [head.bias], "always_adapt": False}',
        '{"params": [head.bias], "always_adapt": True}',
        ("tests/test_finetune_parts.py",),
    ),
    Mutation(
        "ema_no_step",
        "EMA updated without the update count (no copy at the first update)",
        "src/ummae/engine/trainer.py",
        "self.ema.update(self.model, step=self.update)",
        "self.ema.update(self.model)",
        ("tests/test_finetune_parts.py",),
    ),
    Mutation(
        "no_label_smoothing",
        "fine-tuning without label smoothing",
        "src/ummae/tasks/classify.py",
        "return ClassifyStep(LabelSmoothingCrossEntropy(cfg.smoothing))",
        "return ClassifyStep(nn.CrossEntropyLoss())",
        ("tests/test_finetune_parts.py",),
    ),
    # engine
    Mutation(
        "ddp_rank0_sums",
        "a resumed DDP run gives every rank rank 0's partial sums",
        "src/ummae/engine/trainer.py",
        "own = ranks[self.dist.rank] if ranks is not None",
        "own = ranks[0] if ranks is not None",
        ("tests/test_engine_ddp.py::test_torchrun_pretrain__exact_resume_after_sigkill",),
    ),
    Mutation(
        "scaler_not_restored",
        "resume leaves the fp16 grad scaler fresh",
        "src/ummae/engine/trainer.py",
        '        self.scaler.load_state_dict(state["scaler"])\n',
        "",
        ("tests/test_engine_ddp.py::test_pretrain__fp16_grad_scaler_skips_overflow_and_resumes_exactly",),
    ),
    Mutation(
        "no_clip_grad",
        "--clip-grad ignored",
        "src/ummae/engine/trainer.py",
        "torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)",
        "pass",
        ("tests/test_engine_ddp.py::test_pretrain__clip_grad_bounds_the_norm_the_optimiser_applies",),
    ),
    Mutation(
        "ddp_bucket_rebuild",
        "DDP rebuilds its gradient buckets after a process's first step, so a resumed "
        "step is summed over 4 ranks in another order",
        "src/ummae/engine/trainer.py",
        "find_unused_parameters=True\n",
        "find_unused_parameters=False\n",
        ("tests/test_engine_ddp.py::test_torchrun_pretrain__exact_resume_at_four_ranks_after_one_rank_is_killed",),
    ),
    Mutation(
        "pretrain_tokens_no_decay",
        "pre-training exempts the tokens from weight decay",
        "src/ummae/engine/optim.py",
        'return p.ndim <= 1 and not name.endswith("token")',
        'return p.ndim <= 1 or name.endswith("token")',
        ("tests/test_engine.py::test_param_groups__no_decay_on_biases_norms_and_fine_tuning_tokens",),
    ),
    Mutation(
        "config_ge_exclusive",
        "the config validator takes ge=a as > a (refuses the bound itself)",
        "src/ummae/config/fields.py",
        '"ge": (operator.ge, ">="),',
        '"ge": (operator.gt, ">="),',
        ("tests/test_config.py",),
    ),
    Mutation(
        "config_first_of_tuple",
        "the config validator checks only the first value of a tuple",
        "src/ummae/config/fields.py",
        "numbers = value if isinstance(value, tuple) else (value,)",
        "numbers = value[:1] if isinstance(value, tuple) else (value,)",
        ("tests/test_config.py",),
    ),
]


def _copy(dst: Path) -> Path:
    main = dst / "main"
    for part in ("src", "tests", "pyproject.toml"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, main / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, main / part)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (dst / "shared").symlink_to(shared)
    return main


def _run_tests(main: Path, tests) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": f"{main / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=main,
        env=env,
        capture_output=True,
        text=True,
    )
    return proc.returncode, time.time() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="run only these mutations")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:26s} {m.what}  [{', '.join(m.tests)}]")
        return 0 if args.list else 2
    with tempfile.TemporaryDirectory(prefix="ummae-mutation-") as tmp:
        main_dir = _copy(Path(tmp))
        union = sorted({t for m in chosen for t in m.tests})
        rc, dt = _run_tests(main_dir, union)
        if rc != 0:
            print(f"the unmutated copy fails its tests ({union}, exit {rc}): fix that first")
            return 2
        print(f"unmutated: {len(union)} test targets pass ({dt:.0f} s)\n")
        print(f"{'mutation':26s} {'caught':7s} {'time':>6s}  what")
        survived = []
        for m in chosen:
            target = main_dir / m.file
            original = target.read_text()
            found = original.count(m.old)
            if found != m.count:
                print(
                    f"{m.name:26s} {'ERROR':7s} {'':>6s}  the text to mutate occurs {found} times in {m.file}, not {m.count}"
                )
                survived.append(m.name)
                continue
            target.write_text(original.replace(m.old, m.new))
            try:
                rc, dt = _run_tests(main_dir, m.tests)
            finally:
                target.write_text(original)
            caught = rc == 1  # pytest: 1 = tests failed (2-5: interrupted, usage, collection problems)
            if not caught:
                survived.append(m.name)
            print(f"{m.name:26s} {'yes' if caught else f'NO ({rc})':7s} {dt:5.0f}s  {m.what}")
        print(
            f"\n{len(chosen) - len(survived)} of {len(chosen)} caught"
            + (f"; survived: {', '.join(survived)}" if survived else "")
        )
        return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
