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
        "train_ds.num_classes, cfg.k, 0.07)",
        (
            "tests/test_classify.py::test_run_knn__uses_the_temperature_it_is_given",
            "tests/test_options_reach.py::test_knn__every_option_reaches_what_it_sets",
        ),
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
        "src/ummae/sampling/uniform.py",
        "torch.randint(0, 4, (n, bh, bw)",
        "torch.randint(0, 3, (n, bh, bw)",
        ("tests/test_masking.py",),
    ),
    Mutation(
        "us_block_order",
        "in-block order of the 2x2 block transposed",
        "src/ummae/sampling/uniform.py",
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
        "src/ummae/evaluation/classification.py",
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
        "src/ummae/sampling/base.py",
        "return length - int(ratio * length)",
        "return int(length * (1 - ratio))",
        ("tests/test_masking.py",),
    ),
    # masking strategies (issue 32): BEiT's block-wise masking and the strategies' contract
    Mutation(
        "block_aspect_linear",
        "block aspect ratio drawn uniformly, not log-uniformly as BEiT's",
        "src/ummae/sampling/block.py",
        "aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)",
        "aspect = MIN_ASPECT + (MAX_ASPECT - MIN_ASPECT) * u_aspect",
        ("tests/test_masking_strategies.py",),
    ),
    Mutation(
        "block_top_exclusive",
        "block top row drawn from 0..H-h-1 (BEiT's randint includes H-h)",
        "src/ummae/sampling/block.py",
        "int(u_top * (grid_h - h + 1))",
        "int(u_top * (grid_h - h))",
        ("tests/test_masking_strategies.py",),
    ),
    Mutation(
        "block_fills_the_grid",
        "a block may be as tall or wide as the grid (BEiT's are narrower)",
        "src/ummae/sampling/block.py",
        "if h >= grid_h or w >= grid_w:",
        "if h > grid_h or w > grid_w:",
        ("tests/test_masking_strategies.py",),
    ),
    Mutation(
        "block_fixed_min_16",
        "smallest block 16 units on every grid, not BEiT's share of it",
        "src/ummae/sampling/block.py",
        "return max(1, round(BEIT_MIN_BLOCK * length / BEIT_UNITS))",
        "return BEIT_MIN_BLOCK",
        ("tests/test_masking_strategies.py",),
    ),
    Mutation(
        "block_no_top_up",
        "block masks not topped up: BEiT's count, short in some images",
        "src/ummae/sampling/block.py",
        "return top_up(torch.tensor(blocks, dtype=torch.bool).view(n, length).to(dev), noise, target)",
        "return torch.tensor(blocks, dtype=torch.bool).view(n, length).to(dev)",
        ("tests/test_masking_strategies.py",),
    ),
    Mutation(
        "block_global_rng",
        "block attempts drawn from torch's global generator",
        "src/ummae/sampling/block.py",
        "attempts = torch.rand(n, ATTEMPTS * target, 4, device=dev, generator=generator)",
        "attempts = torch.rand(n, ATTEMPTS * target, 4, device=dev)",
        ("tests/test_masking_strategies.py",),
    ),
    Mutation(
        "pyramid_takes_holes",
        "a pyramid encoder accepts a strategy whose masks leave holes",
        "src/ummae/models/mae.py",
        "        if not strategy.compacts:",
        "        if False:",
        ("tests/test_masking_strategies.py",),
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
    # issue 24: outside the core (detection, segmentation, COCO / ADE data, shards, pipelines,
    # evaluation protocols); the property tests of tests/test_properties_*.py catch them
    Mutation(
        "gfl_iou_not_detached",
        "QFL target IoU not detached",
        "src/ummae/models/gfl.py",
        "_aligned_iou(pos_pred.detach(), pos_gt)",
        "_aligned_iou(pos_pred, pos_gt)",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_qfl_target_anchor_iou",
        "QFL target = IoU of the anchor, not of the predicted box",
        "src/ummae/models/gfl.py",
        "_aligned_iou(pos_pred.detach(), pos_gt)",
        "_aligned_iou(pos_anchors, pos_gt)",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_weight_not_detached",
        "box-loss weight (max score) not detached",
        "src/ummae/models/gfl.py",
        "weight = cls_logits.detach().sigmoid()",
        "weight = cls_logits.sigmoid()",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_weight_gt_class",
        "box-loss weight = score of the gt class, not the max",
        "src/ummae/models/gfl.py",
        "weight = cls_logits.detach().sigmoid().max(dim=-1).values[pos]",
        "weight = cls_logits.detach().sigmoid()[pos].gather(1, labels_t[pos][:, None])[:, 0]",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_weight_iou",
        "box-loss weight = the IoU target",
        "src/ummae/models/gfl.py",
        "weight = cls_logits.detach().sigmoid().max(dim=-1).values[pos]",
        "weight = scores[pos]",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_avg_num_pos",
        "box losses over the number of positives, not the weight sum",
        "src/ummae/models/gfl.py",
        "avg = _mean_over_ranks(weight.sum()).clamp(min=1.0)",
        "avg = num_pos",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_dfl_no_avg4",
        "DFL without avg_factor 4",
        "src/ummae/models/gfl.py",
        ".sum() / 4.0 / avg",
        ".sum() / avg",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_dfl_target_pixels",
        "DFL target in pixels, not strides",
        "src/ummae/models/gfl.py",
        "/ pos_stride).clamp(0, self.reg_max - 0.1)",
        ").clamp(0, self.reg_max - 0.1)",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_dfl_clamp_rm1",
        "DFL target clamped to reg_max - 1",
        "src/ummae/models/gfl.py",
        "self.reg_max - 0.1)",
        "self.reg_max - 1)",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_qfl_mean",
        "QFL averaged over all elements, not over positives",
        "src/ummae/models/gfl.py",
        "loss_qfl = qfl.sum() / num_pos",
        "loss_qfl = qfl.mean()",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_qfl_factor_detached",
        "QFL modulating factor detached",
        "src/ummae/models/gfl.py",
        "factor = (target - logits.sigmoid()).abs().pow(beta)",
        "factor = (target - logits.sigmoid().detach()).abs().pow(beta)",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_giou_weight1",
        "GIoU weight 1 (reference 2)",
        "src/ummae/models/gfl.py",
        "giou_weight: float = 2.0,",
        "giou_weight: float = 1.0,",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_dfl_weight",
        "DFL weight 0.5 (reference 0.25)",
        "src/ummae/models/gfl.py",
        "dfl_weight: float = 0.25,",
        "dfl_weight: float = 0.5,",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_stride_height",
        "stride read from anchor size without the octave",
        "src/ummae/models/gfl.py",
        "return (anchors[..., 2] - anchors[..., 0]) / self.octave_base_scale",
        "return (anchors[..., 2] - anchors[..., 0]) / 4.0",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "atss_population_std",
        "ATSS threshold with the population std",
        "src/ummae/models/gfl.py",
        "cand_ious.mean(0) + cand_ious.std(0)",
        "cand_ious.mean(0) + cand_ious.std(0, unbiased=False)",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "atss_topk8",
        "ATSS topk default 8",
        "src/ummae/models/gfl.py",
        "atss_topk: int = 9,",
        "atss_topk: int = 8,",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "atss_global_topk",
        "ATSS candidates: topk over all levels, not per level",
        "src/ummae/models/gfl.py",
        "candidates.append(dist[start : start + n].topk(k, dim=0, largest=False).indices + start)",
        "candidates.append(dist.topk(k, dim=0, largest=False).indices) if start == 0 else None",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "atss_inside_any",
        "ATSS centre-inside test on the max side distance",
        "src/ummae/models/gfl.py",
        "dim=-1).min(dim=-1).values > 0.01",
        "dim=-1).max(dim=-1).values > 0.01",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_nms06",
        "GFL NMS IoU 0.5 (reference 0.6)",
        "src/ummae/models/gfl.py",
        "nms_thresh: float = 0.6",
        "nms_thresh: float = 0.5",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "integral_bins_from1",
        "integral over bins 1..reg_max+1",
        "src/ummae/models/gfl.py",
        "bins = torch.arange(reg_max + 1,",
        "bins = 1 + torch.arange(reg_max + 1,",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "seg_aux_stage4",
        "aux head reads stage 4",
        "src/ummae/models/upernet.py",
        "AUX_STAGE = 2",
        "AUX_STAGE = 3",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "seg_aux_stage2",
        "aux head reads stage 2",
        "src/ummae/models/upernet.py",
        "AUX_STAGE = 2",
        "AUX_STAGE = 1",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "seg_ppm_stage3",
        "pyramid pooling on stage 3",
        "src/ummae/models/upernet.py",
        "top = maps[-1]",
        "top = maps[-2]",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "seg_aux_weight1",
        "aux loss weight 1.0 by default in the config",
        "src/ummae/config/commands.py",
        "    aux_weight: float = option(\n        0.4,",
        "    aux_weight: float = option(\n        1.0,",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "seg_aux_weight_model",
        "aux loss weight not applied",
        "src/ummae/models/upernet.py",
        'losses["loss_aux"] = self.aux_weight * self._ce(',
        'losses["loss_aux"] = self._ce(',
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "seg_ce_valid_mean",
        "CE averaged over the labelled pixels only",
        "src/ummae/models/upernet.py",
        'reduction="none").mean()',
        'reduction="mean")',
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "slide_rows_floor",
        "sliding grid rows (h - crop) // stride + 1: last window missed",
        "src/ummae/models/upernet.py",
        "rows = max(h - crop + stride - 1, 0) // stride + 1",
        "rows = max(h - crop, 0) // stride + 1",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "slide_no_shift_back",
        "last window not shifted back flush with the edge",
        "src/ummae/models/upernet.py",
        "y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)",
        "y1, x1 = r * stride, c * stride",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "slide_cols_from_h",
        "sliding grid columns from the height",
        "src/ummae/models/upernet.py",
        "cols = max(w - crop + stride - 1, 0) // stride + 1",
        "cols = max(h - crop + stride - 1, 0) // stride + 1",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "slide_count_once",
        "overlap not averaged (count not accumulated)",
        "src/ummae/models/upernet.py",
        "count[..., y1:y2, x1:x2] += 1",
        "count[..., y1:y2, x1:x2] = 1",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "slide_stride_half",
        "default test stride crop // 2 (reference 341 at 512)",
        "src/ummae/config/commands.py",
        "return self.test_stride or self.crop_size * 2 // 3",
        "return self.test_stride or self.crop_size // 2",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "miou_nan_as_zero",
        "classes without IoU counted as 0 in mIoU",
        "src/ummae/evaluation/segmentation.py",
        "float(iou.nanmean()) if",
        "float(iou.nan_to_num().mean()) if",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "macc_over_pred",
        "accuracy per class over the predicted pixels",
        "src/ummae/evaluation/segmentation.py",
        "acc = tp / label",
        "acc = tp / pred",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "seg_eval_label_pred_swapped",
        "confusion updated with (label, prediction) swapped",
        "src/ummae/evaluation/segmentation.py",
        "self.confusion.update(outputs.argmax(0).flatten(), label.to(self.device).flatten())",
        "self.confusion.update(label.to(self.device).flatten(), outputs.argmax(0).flatten())",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "seg_normalize_no255",
        "segmenter mean not scaled to 0..255",
        "src/ummae/models/upernet.py",
        "torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255",
        "torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "eval_bilinear",
        "eval resize bilinear",
        "src/ummae/data/classify.py",
        'crop_pct=crop_pct,\n            interpolation="bicubic",',
        'crop_pct=crop_pct,\n            interpolation="bilinear",',
        ("tests/test_properties_eval.py",),
    ),
    Mutation(
        "eval_squash",
        "eval resize of both sides (warp, timm's crop_mode squash), not the short side",
        "src/ummae/data/classify.py",
        "crop_pct=crop_pct,\n",
        'crop_pct=crop_pct,\n            crop_mode="squash",\n',
        ("tests/test_properties_eval.py",),
    ),
    Mutation(
        "eval_no_crop_pct",
        "eval without the resize margin (crop_pct ignored: 1.0)",
        "src/ummae/data/classify.py",
        "crop_pct=crop_pct,\n",
        "crop_pct=1.0,\n",
        ("tests/test_properties_eval.py",),
    ),
    Mutation(
        "eval_crop_pct_default",
        "crop_pct default 0.9",
        "src/ummae/data/classify.py",
        "return 224 / 256 if img_size <= 224 else 1.0",
        "return 0.9 if img_size <= 224 else 1.0",
        ("tests/test_properties_eval.py",),
    ),
    Mutation(
        "eval_crop_pct_256",
        "crop_pct 224/256 also above 224 px (MAE: 1.0)",
        "src/ummae/data/classify.py",
        "return 224 / 256 if img_size <= 224 else 1.0",
        "return 224 / 256",
        ("tests/test_properties_eval.py",),
    ),
    Mutation(
        "coco_cats_json_order",
        "category ids in the JSON's order, not sorted",
        "src/ummae/data/coco.py",
        "self.cat_ids = sorted(self.coco.cats)",
        "self.cat_ids = list(self.coco.cats)",
        ("tests/test_properties_eval.py",),
    ),
    Mutation(
        "coco_xyxy_results",
        "results keep xyxy (no xywh conversion)",
        "src/ummae/data/coco.py",
        "xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()",
        "xywh = boxes.tolist()",
        ("tests/test_properties_eval.py",),
    ),
    Mutation(
        "coco_target_xywh",
        "targets keep COCO xywh",
        "src/ummae/data/coco.py",
        "boxes[:, 2:] += boxes[:, :2]  # COCO",
        "boxes[:, 2:] += 0  # COCO",
        ("tests/test_properties_eval.py",),
    ),
    Mutation(
        "drop_background_keeps_0",
        "background output 0 reported",
        "src/ummae/evaluation/coco.py",
        'keep = detections["labels"] > 0',
        'keep = detections["labels"] >= 0',
        ("tests/test_properties_eval.py",),
    ),
    Mutation(
        "drop_background_drops_1",
        "class 1 dropped with the background",
        "src/ummae/evaluation/coco.py",
        'keep = detections["labels"] > 0',
        'keep = detections["labels"] > 1',
        ("tests/test_properties_eval.py",),
    ),
    Mutation(
        "lsj_flip_canvas",
        "flip about the padded canvas, not the valid region",
        "src/ummae/data/coco.py",
        "torch.stack([cw - b[:, 2], b[:, 1], cw - b[:, 0], b[:, 3]], dim=1)",
        "torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], dim=1)",
        ("tests/test_properties_data.py",),
    ),
    Mutation(
        "shards_perm_per_rank",
        "shard permutation seeded per rank",
        "src/ummae/data/shards.py",
        "g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))",
        "g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank))",
        ("tests/test_properties_data.py",),
    ),
    Mutation(
        "shards_perm_fixed",
        "shard permutation the same every epoch",
        "src/ummae/data/shards.py",
        "g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))",
        "g = torch.Generator().manual_seed(mix_seed(self.seed))",
        ("tests/test_properties_data.py",),
    ),
    Mutation(
        "shards_rank_takes_all",
        "every rank reads the whole shard list, not its every R-th shard",
        "src/ummae/data/shards.py",
        "mine = perm[self.rank :: self.num_replicas]",
        "mine = list(perm)",
        ("tests/test_properties_data.py",),
    ),
    Mutation(
        "shards_equal_ranges",
        "workers' ranges of equal length, not as long as their batches (the split before issue 24)",
        "src/ummae/data/shards.py",
        "start = b * sum(len(range(v, nb, workers)) for v in range(role))",
        "start = role * (nb * b // workers)",
        ("tests/test_properties_data.py",),
    ),
    Mutation(
        "shards_buffer_spills",
        "the shuffle buffer runs over the end of the worker's range into the next worker's",
        "src/ummae/data/shards.py",
        "own: Iterator[dict] = itertools.islice(raw, stop - start)",
        "own: Iterator[dict] = raw",
        ("tests/test_properties_data.py",),
    ),
    Mutation(
        "shards_worker_batches",
        "a worker makes batches t % W == 0 only",
        "src/ummae/data/shards.py",
        "mine = len(range(role, nb, workers)) * b",
        "mine = len(range(0, nb, workers)) * b",
        ("tests/test_properties_data.py",),
    ),
    Mutation(
        "normalize_uint8_no255",
        "uint8 mean not scaled to 0..255",
        "src/ummae/data/transforms.py",
        "mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(3, 1, 1) * 255",
        "mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(3, 1, 1)",
        ("tests/test_properties_data.py",),
    ),
    Mutation(
        "fpn_extra_relu",
        "ReLU before P7 (torchvision's LastLevelP6P7)",
        "src/ummae/models/detectors.py",
        "results.append(conv(results[-1]))",
        "results.append(conv(results[-1].relu() if i else results[-1]))",
        ("tests/test_properties_detect.py",),
    ),
    Mutation(
        "fpn_extra_from_p3",
        "extra levels from the first FPN output",
        "src/ummae/models/detectors.py",
        "results.append(conv(results[-1]))",
        "results.append(conv(results[-1] if i else results[0]))",
        ("tests/test_properties_detect.py",),
    ),
    Mutation(
        "det_stages_from_0",
        "P3-P7 detectors read stages 1-3",
        "src/ummae/detector_specs/_spec.py",
        "P3_P7 = Pyramid(stages=(1, 2, 3),",
        "P3_P7 = Pyramid(stages=(0, 1, 2),",
        ("tests/test_properties_detect.py",),
    ),
    # the detector specs (issue 32): the model follows its spec, and the specs' facts are used
    Mutation(
        "det_spec_levels_off_by_one",
        "a pyramid's levels counted from the stage index + 1 (strides stated twice too small)",
        "src/ummae/detector_specs/_spec.py",
        "first = self.stages[0] + 2",
        "first = self.stages[0] + 1",
        ("tests/test_properties_detect.py",),
    ),
    Mutation(
        "det_spec_stages_ignored",
        "every detector built on stages 2-4, whatever its spec's pyramid",
        "src/ummae/models/detectors.py",
        "backbone, img_size, neck_channels, drop_path, window_size, pyramid.stages, neck, pos_embed_mode",
        "backbone, img_size, neck_channels, drop_path, window_size, (1, 2, 3), neck, pos_embed_mode",
        ("tests/test_properties_detect.py",),
    ),
    Mutation(
        "det_spec_extra_levels_ignored",
        "P2-P6 pyramids get MMDetection's two extra convs, not the spec's max pool",
        "src/ummae/models/detectors.py",
        '"max_pool": lambda channels, levels: LastLevelMaxPool(),',
        '"max_pool": lambda channels, levels: ExtraLevelsOnOutput(channels, nn.BatchNorm2d),',
        ("tests/test_properties_detect.py",),
    ),
    Mutation(
        "det_spec_masks_flag_wrong",
        "Mask R-CNN's spec says box only",
        "src/ummae/detector_specs/maskrcnn.py",
        "masks=True,",
        "masks=False,",
        ("tests/test_properties_detect.py",),
    ),
    Mutation(
        "det_spec_masks_ignored_in_eval",
        "every detector evaluated by box and mask AP, whatever its spec",
        "src/ummae/detector_specs/_spec.py",
        'return ("bbox", "segm") if self.masks else ("bbox",)',
        'return ("bbox", "segm")',
        (
            "tests/test_detect.py::test_every_detector__trains_is_evaluated_by_its_spec_s_ap_and_its_checkpoint_reloads_exactly[gfl]",
        ),
    ),
    Mutation(
        "det_spec_options_not_refused",
        "a detector option given to a detector that does not take it is ignored",
        "src/ummae/detector_specs/__init__.py",
        "if name in OPTIONS and not spec.takes(name):",
        "if name in OPTIONS and not spec.takes(name) and name == 'semantic':",
        ("tests/test_properties_detect.py",),
    ),
    Mutation(
        "gfl_anchor_octave4",
        "GFL anchors 4 strides wide",
        "src/ummae/models/gfl.py",
        "sizes = tuple((int(octave_base_scale * s),) for s in (8, 16, 32, 64, 128))",
        "sizes = tuple((int(4 * s),) for s in (8, 16, 32, 64, 128))",
        ("tests/test_properties_detect.py",),
    ),
    Mutation(
        "det_transform_std",
        "detector normalised with the mean as std",
        "src/ummae/models/detectors.py",
        "IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, size_divisible",
        "IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_MEAN, size_divisible",
        ("tests/test_properties_detect.py",),
    ),
    Mutation(
        "det_pad32",
        "detector pads to a multiple of 32",
        "src/ummae/models/detectors.py",
        "size_divisible=img_size, _skip_resize=True",
        "size_divisible=32, _skip_resize=True",
        ("tests/test_properties_detect.py",),
    ),
    Mutation(
        "gfl_post_topk_global",
        "candidates: score threshold after top-k",
        "src/ummae/models/gfl.py",
        "scores, order = scores.topk(min(self.topk_candidates, idx.numel()))",
        "scores, order = scores.topk(min(self.topk_candidates // 2 + 1, idx.numel()))",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_post_no_clip",
        "boxes not clipped to the image",
        "src/ummae/models/gfl.py",
        "boxes = clip_boxes_to_image(self.box_coder.decode(dist, sel_anchors), image_shape)",
        "boxes = self.box_coder.decode(dist, sel_anchors)",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_post_agnostic_nms",
        "class-agnostic NMS",
        "src/ummae/models/gfl.py",
        "keep = batched_nms(boxes, scores, labels, self.nms_thresh)",
        "keep = batched_nms(boxes, scores, torch.zeros_like(labels), self.nms_thresh)",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_post_nms05_call",
        "NMS at 0.5 in postprocess",
        "src/ummae/models/gfl.py",
        "keep = batched_nms(boxes, scores, labels, self.nms_thresh)",
        "keep = batched_nms(boxes, scores, labels, 0.5)",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_post_label_mod",
        "label = anchor index mod classes",
        "src/ummae/models/gfl.py",
        "labels_all.append(idx % num_classes)",
        "labels_all.append(anchor_idx % num_classes)",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_post_no_stride",
        "distances not scaled by the stride at inference",
        "src/ummae/models/gfl.py",
        "dist = integral(reg[anchor_idx].float(), self.reg_max) * self._strides(sel_anchors)[:, None]",
        "dist = integral(reg[anchor_idx].float(), self.reg_max) * 8",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "gfl_score_thresh",
        "score threshold 0.3",
        "src/ummae/models/gfl.py",
        "score_thresh: float = 0.05,",
        "score_thresh: float = 0.3,",
        ("tests/test_properties_gfl.py",),
    ),
    Mutation(
        "seg_aug_no_softmax",
        "views' logits averaged, not their probabilities",
        "src/ummae/models/upernet.py",
        "probs += resize(out, (h0, w0))[0].softmax(0)",
        "probs += resize(out, (h0, w0))[0]",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "seg_flip_not_back",
        "flipped view's logits not flipped back",
        "src/ummae/models/upernet.py",
        "out = out.float().flip(-1) if flipped else out.float()",
        "out = out.float()",
        ("tests/test_properties_segment.py",),
    ),
    Mutation(
        "seg_ratios_ignored",
        "multi-scale ratios ignored",
        "src/ummae/models/upernet.py",
        "size = keep_ratio_size(h0, w0, [round(s * ratio) for s in scale])",
        "size = keep_ratio_size(h0, w0, list(scale))",
        ("tests/test_properties_segment.py",),
    ),
    # issue 24: export / convert, the Trainer's iteration mode, the CLI's refusals
    Mutation(
        "trainer_last_pass_whole",
        "an iteration run's last pass not stopped at update iters",
        "src/ummae/engine/trainer.py",
        "return max(0, min(self.steps_per_epoch, left))",
        "return self.steps_per_epoch",
        ("tests/test_segment.py::test_segment_train__iterations_evaluations_and_an_interrupted_run_resume_exactly",),
    ),
    Mutation(
        "trainer_eval_iters_off_by_one",
        "eval_every_iters evaluates one update early, inside a pass",
        "src/ummae/engine/hooks.py",
        "t.update % self.every_iters == 0 and t.step_in_epoch",
        "(t.update + 1) % self.every_iters == 0 and t.step_in_epoch",
        ("tests/test_segment.py::test_segment_train__iterations_evaluations_and_an_interrupted_run_resume_exactly",),
    ),
    Mutation(
        "trainer_pass_end_ignores_eval_iters",
        "a pass that ends on a multiple of eval_every_iters does not evaluate",
        "src/ummae/engine/hooks.py",
        "by_iters = self.every_iters and t.update % self.every_iters == 0",
        "by_iters = False",
        ("tests/test_segment.py::test_segment_train__iterations_evaluations_and_an_interrupted_run_resume_exactly",),
    ),
    Mutation(
        "convert_overwrites",
        "convert replaces an existing --output without --overwrite",
        "src/ummae/weights/export.py",
        "if out.exists() and not overwrite:",
        "if False:",
        ("tests/test_convert.py::test_cli_convert__clear_errors",),
    ),
    Mutation(
        "convert_ours_again",
        "convert takes an ummae checkpoint for a reference one",
        "src/ummae/weights/export.py",
        "if not is_foreign(ck):",
        "if False:",
        ("tests/test_convert.py::test_cli_convert__clear_errors",),
    ),
    Mutation(
        "export_shapes_unchecked",
        "export passes on tensors of another shape under the model's name",
        "src/ummae/weights/export.py",
        "    if bad or unknown:",
        "    if unknown:",
        ("tests/test_bad_inputs.py::test_cli_bad_input__one_line_no_traceback",),
    ),
    Mutation(
        "export_encoder_only_ignored",
        "export --encoder-only of a classifier keeps its head",
        "src/ummae/weights/export.py",
        'keep = "encoder." if (pretraining or encoder_only or not has_head) else ""',
        'keep = "encoder." if (pretraining or not has_head) else ""',
        ("tests/test_transfer.py::test_export__fine_tuned_classifier_loads_strictly_into_timm",),
    ),
    Mutation(
        "cli_oserror_traceback",
        "an OSError (full disk) shows a traceback instead of one line",
        "src/ummae/cli.py",
        "    except OSError as e:",
        "    except ArithmeticError as e:",
        ("tests/test_bad_inputs.py::test_cli__full_disk_one_line",),
    ),
    Mutation(
        "cli_unknown_option_ignored",
        "an unknown option is silently ignored",
        "src/ummae/cli.py",
        "    if unknown:",
        "    if False:",
        ("tests/test_cli_usability.py::test_cli__unknown_option_without_a_match_is_one_line_too",),
    ),
    Mutation(
        "cli_export_suffix_unchecked",
        "export writes safetensors to an --output of another suffix",
        "src/ummae/cli.py",
        "if EXPORT_FORMATS.get(suffix) != args.format:",
        "if False:",
        ("tests/test_bad_inputs.py::test_cli_bad_input__one_line_no_traceback",),
    ),
    Mutation(
        "data_error_is_a_bug",
        "DataError is not a user error: bad data shows a traceback",
        "src/ummae/errors.py",
        "class DataError(UmmaeError, ValueError):",
        "class DataError(ValueError):",
        ("tests/test_cli.py::test_cli_pretrain__missing_data_path",),
    ),
    # HTC's semantic branch (issue 28)
    Mutation(
        "htc_semantic_not_added",
        "the RoI-pooled semantic feature is not added to the RoI features",
        "src/ummae/models/cascade.py",
        "        return x + extra",
        "        return x",
        ("tests/test_htc_semantic.py::test_roi_features__plus_exactly_the_roi_pooled_semantic_feature",),
    ),
    Mutation(
        "htc_semantic_loss_non_ignored_mean",
        "semantic loss weight 0.2 over the non-ignored pixels (PyTorch's mean), not every pixel",
        "src/ummae/models/cascade.py",
        "return SEMANTIC_LOSS_WEIGHT * loss / labels.numel()",
        "return SEMANTIC_LOSS_WEIGHT * loss / (labels != STUFF_IGNORE).sum()",
        ("tests/test_htc_semantic.py::test_semantic_loss__0_2_x_ce_at_1_8_over_every_pixel",),
    ),
    Mutation(
        "htc_fusion_align_corners_false",
        "semantic fusion resizes with align_corners=False",
        "src/ummae/models/cascade.py",
        'mode="bilinear", align_corners=True',
        'mode="bilinear", align_corners=False',
        ("tests/test_htc_semantic.py::test_fused_semantic_head__sum_of_resized_laterals",),
    ),
    Mutation(
        "stuff_map_not_flipped",
        "the stuff map is not flipped with the image",
        "src/ummae/data/coco.py",
        'target["semantic"] = target["semantic"].flip(-1)',
        'target["semantic"] = target["semantic"]',
        ("tests/test_htc_semantic.py::test_stuff_maps__transformed_with_the_image",),
    ),
    Mutation(
        "range_resize_long_uncapped",
        "range resize: the longer side is not capped at img_size (the crop cuts the image)",
        "src/ummae/data/coco.py",
        "scale = min(self.img_size / max(h, w), short / min(h, w))",
        "scale = short / min(h, w)",
        ("tests/test_htc_semantic.py::test_range_resize__short_side_in_range_long_side_capped_aspect_kept",),
    ),
    # model families (models/family.py) and the importer's shape matching (weights/convert.py)
    Mutation(
        "family_pairing_first_size",
        "every UM-MAE model paired with its family's first classifier, not its own size's",
        "src/ummae/models/family.py",
        'info = _info(family, key, "UM-MAE", size.arch, _decoder_text(decoder), size.img_size, classifier)',
        'info = _info(family, key, "UM-MAE", size.arch, _decoder_text(decoder), size.img_size, '
        'f"{family.name}_{next(iter(family.sizes))}")',
        ("tests/test_families.py::test_classifier_for__the_classifier_carries_the_pretraining_encoder",),
    ),
    Mutation(
        "shape_match_width_only",
        "the importer matches a checkpoint on its first stage's width only (Swin-S taken for Swin-T)",
        "src/ummae/models/family.py",
        "if fam.signature(size.arch) != found:",
        'if fam.signature(size.arch)["stages"][0][0] != found["stages"][0][0]:',
        ("tests/test_convert.py::test_convert__swin_small_is_identified_by_its_shapes_without_args_model",),
    ),
    Mutation(
        "models_kind_two_kinds",
        "`ummae models --kind` offers only pretrain and classify",
        "src/ummae/cli.py",
        "choices=MODEL_KINDS + HEAD_KINDS,",
        "choices=MODEL_KINDS,",
        ("tests/test_families.py::test_models_kinds__the_cli_offers_every_kind_the_registry_has",),
    ),
    # issue 32: the Trainer's hooks, the one resolution of the config, one read per weights file
    Mutation(
        "hook_after_step_before_update",
        "the after_step hooks called before the optimiser update they follow",
        "src/ummae/engine/trainer.py",
        '                self._optimizer_step()\n                self._call("after_step")\n',
        '                self._call("after_step")\n                self._optimizer_step()\n',
        ("tests/test_hooks.py",),
    ),
    Mutation(
        "resume_flag_wins",
        "a flag that contradicts the resumed run's settings silently wins over them",
        "src/ummae/config/resume.py",
        'conflicts.append(f"{_flag(name, ours)} (the run has {theirs!r})")',
        "pass",
        ("tests/test_resolve.py",),
    ),
    Mutation(
        "resume_loses_to_the_split",
        "a recipe's batch split counts as set by the user: the resumed run's own split is refused",
        "src/ummae/config/resolve.py",
        "given = dataclasses.replace(provenance, sources=sources).given()",
        "given = provenance.given() | set(split)",
        ("tests/test_resolve.py",),
    ),
    Mutation(
        "weights_level_named_flag",
        "the model derived from the weights recorded as a flag's",
        "src/ummae/config/resolve.py",
        "if v != values[k]}, WEIGHTS)",
        "if v != values[k]}, FLAG)",
        ("tests/test_resolve.py",),
    ),
    Mutation(
        "weights_read_per_call",
        "every check and build of a command reads its weights file again",
        "src/ummae/weights/load.py",
        "        if self.files is None:\n            return read()",
        "        if True:\n            return read()",
        ("tests/test_resolve.py",),
    ),
    # issue 32: the evaluation layer (one evaluator interface, one inference loop)
    Mutation(
        "eval_gather_drops_a_rank",
        "COCO results gathered from rank 0 only (a rank's shard dropped)",
        "src/ummae/evaluation/coco.py",
        "for part in udist.all_gather_object(self.results) for r in part",
        "for part in udist.all_gather_object(self.results)[:1] for r in part",
        ("tests/test_evaluation.py::test_evaluators__two_gloo_ranks_give_every_rank_the_one_process_figures",),
    ),
    Mutation(
        "eval_rows_not_gathered",
        "kNN features kept per rank (no gather)",
        "src/ummae/evaluation/classification.py",
        "self.features, self.labels = udist.all_gather_rows(f), udist.all_gather_rows(y)",
        "self.features, self.labels = f, y",
        ("tests/test_evaluation.py::test_evaluators__two_gloo_ranks_give_every_rank_the_one_process_figures",),
    ),
    Mutation(
        "eval_counts_not_summed",
        "top-k counts of rank 0 only (no all-reduce)",
        "src/ummae/evaluation/classification.py",
        "udist.all_reduce_sum(self.sums.clone())",
        "self.sums.clone()",
        ("tests/test_evaluation.py::test_evaluators__two_gloo_ranks_give_every_rank_the_one_process_figures",),
    ),
    Mutation(
        "eval_confusion_not_synced",
        "each rank's confusion matrix alone (torchmetrics' sync off)",
        "src/ummae/evaluation/segmentation.py",
        "ignore_index=ignore_index, validate_args=False)",
        "ignore_index=ignore_index, validate_args=False, sync_on_compute=False)",
        ("tests/test_evaluation.py::test_evaluators__two_gloo_ranks_give_every_rank_the_one_process_figures",),
    ),
    Mutation(
        "eval_figures_not_shared",
        "rank 0's figures not given to the other ranks",
        "src/ummae/evaluation/base.py",
        "return udist.broadcast_object(figures)",
        "return figures",
        ("tests/test_evaluation.py::test_evaluators__two_gloo_ranks_give_every_rank_the_one_process_figures",),
    ),
    Mutation(
        "eval_every_rank_shard_0",
        "every rank evaluates rank 0's shard",
        "src/ummae/evaluation/base.py",
        "        info.rank,\n",
        "        0,\n",
        ("tests/test_evaluation.py::test_evaluators__two_gloo_ranks_give_every_rank_the_one_process_figures",),
    ),
    Mutation(
        "eval_train_mode",
        "the model evaluated in training mode",
        "src/ummae/evaluation/base.py",
        "    model.eval()\n",
        "    model.train()\n",
        ("tests/test_evaluation.py::test_inference_loop__eval_mode_no_grad_precision_and_the_mode_restored",),
    ),
    Mutation(
        "eval_mode_not_restored",
        "the model left in eval mode after evaluation",
        "src/ummae/evaluation/base.py",
        "model.train(was_training)",
        "model.train(False)",
        ("tests/test_evaluation.py::test_inference_loop__eval_mode_no_grad_precision_and_the_mode_restored",),
    ),
    Mutation(
        "eval_precision_ignored",
        "evaluation always in fp32 (the run's precision ignored)",
        "src/ummae/evaluation/base.py",
        "with autocast(device, precision):",
        'with autocast(device, "fp32"):',
        ("tests/test_evaluation.py::test_inference_loop__eval_mode_no_grad_precision_and_the_mode_restored",),
    ),
    Mutation(
        "topk_top5_is_top1",
        "top-5 counted as top-1",
        "src/ummae/evaluation/classification.py",
        "hits.any(dim=1).sum().double(),",
        "hits[:, 0].sum().double(),",
        ("tests/test_evaluation.py::test_top_k__equals_a_brute_force_count",),
    ),
    # issue 33: a documented default changed to another plausible value (the defaults table)
    Mutation(
        "default_upernet_pool_scales",
        "UperNet's pyramid pooling at 1, 2, 4, 6 rather than MMSegmentation's 1, 2, 3, 6",
        "src/ummae/models/upernet.py",
        "POOL_SCALES = (1, 2, 3, 6)",
        "POOL_SCALES = (1, 2, 4, 6)",
        ("tests/test_defaults.py",),
    ),
    Mutation(
        "default_knn_k",
        "kNN with 10 neighbours by default, not DINO's 20",
        "src/ummae/config/commands.py",
        'k: int = option(20, "neighbours"',
        'k: int = option(10, "neighbours"',
        ("tests/test_defaults.py",),
    ),
    Mutation(
        "default_detect_jitter",
        "large-scale jitter range 0.1-1.5 by default, not the reference's 0.1-2.0",
        "src/ummae/config/commands.py",
        "        (0.1, 2.0),\n",
        "        (0.1, 1.5),\n",
        ("tests/test_defaults.py",),
    ),
    Mutation(
        "default_sm_ratio",
        "the MAE model's Secondary Masking ratio 0.3 by default, not 0.25",
        "src/ummae/models/mae.py",
        "        sm_ratio: float = 0.25,\n",
        "        sm_ratio: float = 0.3,\n",
        ("tests/test_defaults.py",),
    ),
    Mutation(
        "default_fpn_channels",
        "detection FPN at 128 channels by default, not MMDetection's 256",
        "src/ummae/config/commands.py",
        'fpn_channels: int = option(256, "FPN channels"',
        'fpn_channels: int = option(128, "FPN channels"',
        ("tests/test_defaults.py",),
    ),
    Mutation(
        "default_seg_aux_weight",
        "the auxiliary head's loss weight 0.2 by default, not 0.4",
        "src/ummae/config/commands.py",
        "    aux_weight: float = option(\n        0.4,",
        "    aux_weight: float = option(\n        0.2,",
        ("tests/test_defaults.py",),
    ),
    # issue 33: an option that does not reach what it sets (the built run keeps its default)
    Mutation(
        "reach_pretrain_drop_path",
        "pre-training's --drop-path dropped before the model (the model's own rate)",
        "src/ummae/config/commands.py",
        "decoder_pos=self.decoder_pos, drop_path=self.drop_path,",
        "decoder_pos=self.decoder_pos, drop_path=None,",
        ("tests/test_options_reach.py::test_pretrain__every_option_reaches_what_it_sets",),
    ),
    Mutation(
        "reach_finetune_window",
        "fine-tuning's --window-size dropped before the model",
        "src/ummae/config/commands.py",
        "                    window_size=self.window_size)  # fmt: skip",
        "                    window_size=None)  # fmt: skip",
        ("tests/test_options_reach.py::test_finetune__every_option_reaches_what_it_sets",),
    ),
    Mutation(
        "reach_switch_prob",
        "--mixup-switch-prob not passed to timm's Mixup (its 0.5)",
        "src/ummae/tasks/classify.py",
        "switch_prob=cfg.mixup_switch_prob,",
        "switch_prob=0.5,",
        ("tests/test_options_reach.py::test_finetune__every_option_reaches_what_it_sets",),
    ),
    Mutation(
        "reach_ema_decay",
        "--ema-decay not passed to the EMA (timm's 0.9999)",
        "src/ummae/tasks/classify.py",
        "ModelEmaV3(model, decay=cfg.ema_decay)",
        "ModelEmaV3(model)",
        ("tests/test_options_reach.py::test_finetune__every_option_reaches_what_it_sets",),
    ),
    Mutation(
        "reach_seg_aux_channels",
        "segmentation's --aux-channels not passed to the model (its 256)",
        "src/ummae/tasks/segment.py",
        "            cfg.aux_channels,\n",
        "            256,\n",
        ("tests/test_options_reach.py::test_segment_train__every_option_reaches_what_it_sets",),
    ),
    Mutation(
        "reach_seg_cat_max_ratio",
        "segmentation's --cat-max-ratio not passed to the crop (its 0.75)",
        "src/ummae/tasks/segment.py",
        "            cat_max_ratio=cfg.cat_max_ratio,\n",
        "",
        ("tests/test_options_reach.py::test_segment_train__every_option_reaches_what_it_sets",),
    ),
    Mutation(
        "reach_detect_flip_prob",
        "detection's --flip-prob not passed to the jitter (its 0.5)",
        "src/ummae/tasks/detect.py",
        "LargeScaleJitter(cfg.img_size, cfg.scale_range, cfg.flip_prob)",
        "LargeScaleJitter(cfg.img_size, cfg.scale_range)",
        ("tests/test_options_reach.py::test_detect_train__every_option_reaches_what_it_sets",),
    ),
    # issue 33 item 2: the inference commands' options dropped between the config and their use
    Mutation(
        "reach_eval_crop_pct",
        "`ummae eval` ignores --crop-pct (MAE's default crop)",
        "src/ummae/tasks/classify.py",
        "        ds.transform = build_classify_transform(model.img_size, is_training=False, crop_pct=cfg.crop_pct)",
        "        ds.transform = build_classify_transform(model.img_size, is_training=False)",
        ("tests/test_options_reach.py::test_eval__every_option_reaches_what_it_sets",),
    ),
    Mutation(
        "reach_knn_k",
        "`ummae knn` votes with 20 neighbours whatever --k says",
        "src/ummae/tasks/knn.py",
        "train_ds.num_classes, cfg.k, cfg.temperature)",
        "train_ds.num_classes, 20, cfg.temperature)",
        ("tests/test_options_reach.py::test_knn__every_option_reaches_what_it_sets",),
    ),
    Mutation(
        "reach_detect_eval_split",
        "`detect eval` evaluates val2017 whatever --split says",
        "src/ummae/tasks/detect.py",
        "CocoDetection(cfg.data, cfg.split, train=False)",
        'CocoDetection(cfg.data, "val2017", train=False)',
        ("tests/test_options_reach.py::test_detect_eval__every_option_reaches_what_it_sets",),
    ),
    Mutation(
        "reach_seg_eval_stride",
        "`segment eval` ignores --test-stride (the checkpoint's stride)",
        "src/ummae/tasks/segment.py",
        'stride=cfg.test_stride or args["test_stride"],',
        'stride=args["test_stride"],',
        ("tests/test_options_reach.py::test_segment_eval__every_option_reaches_what_it_sets",),
    ),
    Mutation(
        "reach_seg_eval_flip",
        "`segment eval` ignores --flip",
        "src/ummae/tasks/segment.py",
        "        flip=cfg.flip,",
        "        flip=False,",
        ("tests/test_options_reach.py::test_segment_eval__every_option_reaches_what_it_sets",),
    ),
    # issue 33: the training step's semantics
    Mutation(
        "step_accum_unscaled",
        "accumulated losses not divided by accum_iter (the gradient of the sum of micro-batches)",
        "src/ummae/engine/trainer.py",
        "self.scaler.scale(loss / cfg.accum_iter).backward()",
        "self.scaler.scale(loss).backward()",
        ("tests/test_step_semantics.py::test_accumulation__n_micro_steps_are_one_step_over_the_concatenated_batch",),
    ),
    Mutation(
        "step_clip_per_micro_batch",
        "the clip norm scaled by accum_iter (a per-micro-batch bound, not the effective batch's)",
        "src/ummae/engine/trainer.py",
        "clip_grad_norm_(self.model.parameters(), cfg.clip_grad)",
        "clip_grad_norm_(self.model.parameters(), cfg.clip_grad * cfg.accum_iter)",
        ("tests/test_step_semantics.py::test_accumulation__n_micro_steps_are_one_step_over_the_concatenated_batch",),
    ),
    Mutation(
        "step_mixup_prob_swapped",
        "--mixup-prob and --mixup-switch-prob given to timm's Mixup the other way round",
        "src/ummae/tasks/classify.py",
        "            prob=cfg.mixup_prob,\n            switch_prob=cfg.mixup_switch_prob,",
        "            prob=cfg.mixup_switch_prob,\n            switch_prob=cfg.mixup_prob,",
        ("tests/test_step_semantics.py::test_mixup__the_draws_and_the_targets_are_timms_mixup_with_the_options_given",),
    ),
    Mutation(
        "step_mixup_per_element",
        "Mixup drawn per image (timm's mode 'elem'), not one draw per batch",
        "src/ummae/tasks/classify.py",
        'mode="batch",',
        'mode="elem",',
        ("tests/test_step_semantics.py::test_mixup__the_draws_and_the_targets_are_timms_mixup_with_the_options_given",),
    ),
    Mutation(
        "step_masks_global_rng",
        "a step's masks drawn from torch's global RNG, not the step's generator",
        "src/ummae/tasks/pretrain.py",
        "sample_masks(images.shape[0], images.device, generator)",
        "sample_masks(images.shape[0], images.device, None)",
        ("tests/test_step_semantics.py::test_masks__a_function_of_seed_rank_epoch_and_step_only",),
    ),
    Mutation(
        "step_masks_no_rank",
        "the step's seed without the rank (every process draws the same masks)",
        "src/ummae/engine/trainer.py",
        "mix_seed(cfg.seed, self.dist.rank, p.epoch, step)",
        "mix_seed(cfg.seed, 0, p.epoch, step)",
        ("tests/test_step_semantics.py::test_masks__a_function_of_seed_rank_epoch_and_step_only",),
    ),
    Mutation(
        "predict_topk_least_first",
        "`ummae predict` lists the k least probable classes",
        "src/ummae/tasks/predict.py",
        "return logits.float().softmax(dim=-1).topk(k, dim=-1)",
        "return logits.float().softmax(dim=-1).topk(k, dim=-1, largest=False)",
        ("tests/test_predict.py::test_predict__jsonl_is_the_softmax_top_k_and_a_damaged_image_is_skipped",),
    ),
    Mutation(
        "predict_recorded_crop_ignored",
        "`ummae predict` uses MAE's default crop, not the one the checkpoint records",
        "src/ummae/tasks/predict.py",
        'crop_pct = recorded.get("crop_pct") or default_crop_pct(model.img_size)',
        "crop_pct = default_crop_pct(model.img_size)",
        ("tests/test_predict.py::test_predict__jsonl_is_the_softmax_top_k_and_a_damaged_image_is_skipped",),
    ),
    Mutation(
        "predict_damaged_image_crashes",
        "an image PIL cannot identify stops `ummae predict` mid-folder",
        "src/ummae/tasks/predict.py",
        "except (OSError, ValueError, SyntaxError) as e:",
        "except (ValueError, SyntaxError) as e:",
        ("tests/test_predict.py::test_predict__jsonl_is_the_softmax_top_k_and_a_damaged_image_is_skipped",),
    ),
    Mutation(
        "finetune_class_names_not_recorded",
        "fine-tuning records the crop but not the class names",
        "src/ummae/tasks/classify.py",
        "model.model_args.update(class_names=names, crop_pct=crop_pct)",
        "model.model_args.update(crop_pct=crop_pct)",
        ("tests/test_predict.py::test_finetune__records_class_names_and_crop_and_the_export_predicts_the_same",),
    ),
    Mutation(
        "onnx_validate_tolerance_ignored",
        "`export --validate` accepts any difference",
        "src/ummae/tasks/onnx_export.py",
        "    if worst > allowed:",
        "    if worst > allowed and False:",
        ("tests/test_onnx_export.py::test_onnx__validate_prints_the_max_difference_and_fails_beyond_the_tolerance",),
    ),
    Mutation(
        "onnx_pooling_bins_floor",
        "the segmenter's fixed-size pooling ends its bins at the floor, not the ceiling (torch's bins)",
        "src/ummae/tasks/onnx_export.py",
        "start, end = (k * size) // out, -(-((k + 1) * size) // out)",
        "start, end = (k * size) // out, max((k + 1) * size // out, (k * size) // out + 1)",
        ("tests/test_onnx_export.py::test_onnx__segmenter_logits_equal_pytorch_on_coco_semseg",),
    ),
    Mutation(
        "onnx_classifier_input_not_batched",
        "the classifier's graph is exported for the traced batch size only",
        "src/ummae/tasks/onnx_export.py",
        'dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},\n    graph=lambda clf: clf.model,',
        "dynamic_axes={},\n    graph=lambda clf: clf.model,",
        (
            "tests/test_onnx_export.py::test_onnx__classifier_logits_equal_pytorch_on_imagenette_with_any_batch[swin_test]",
        ),
    ),
    Mutation(
        "reach_eval_val_data",
        "`ummae eval` evaluates --data's split and ignores --val-data (as it did before this was found)",
        "src/ummae/tasks/classify.py",
        "ds = build_classify_dataset(cfg.val_data or cfg.data, cfg.split, None, cfg.data_root)",
        "ds = build_classify_dataset(cfg.data, cfg.split, None, cfg.data_root)",
        ("tests/test_options_reach.py::test_eval__every_option_reaches_what_it_sets",),
    ),
    # issue 35: the faster compaction and patchify (indexing and moves only)
    Mutation(
        "compact_index_height",
        "compaction's flat pixel index steps rows by the image height instead of its width",
        "src/ummae/models/masking.py",
        "index = (rows * w + cols)",
        "index = (rows * h + cols)",
        ("tests/test_masking.py::test_compact_image__equals_brute_force_gather",),
    ),
    Mutation(
        "compact_kept_column",
        "compaction takes the kept unit's column from the choice's row bit",
        "src/ummae/models/masking.py",
        "view(1, 1, bw) + choice % 2) * unit",
        "view(1, 1, bw) + choice // 2) * unit",
        ("tests/test_masking.py::test_compact_image__equals_brute_force_gather",),
    ),
    Mutation(
        "patchify_unit_axes",
        "patchify orders a unit's pixels (dx, dy, c) instead of (dy, dx, c)",
        "src/ummae/models/mae.py",
        "return x.permute(0, 1, 3, 2, 4).reshape(n, (h // unit) * (w // unit), unit * unit * c)",
        "return x.permute(0, 3, 1, 2, 4).reshape(n, (h // unit) * (w // unit), unit * unit * c)",
        ("tests/test_models.py::test_patchify__matches_loop_and_round_trips",),
    ),
]


def _copy(dst: Path) -> Path:
    main = dst / "main"
    # experiments/coco_subset.py: the detection tests' coco_mini subsets (tests/_helpers.py)
    for part in ("src", "tests", "pyproject.toml", "experiments/coco_subset.py"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, main / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (main / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, main / part)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (dst / "shared").symlink_to(shared)
    return main


def _run_tests(main: Path, tests) -> tuple[int, float, str]:
    """(pytest's exit status, seconds, its last lines of output)."""
    env = {**os.environ, "PYTHONPATH": f"{main / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=main,
        env=env,
        capture_output=True,
        text=True,
    )
    return proc.returncode, time.time() - t, "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])


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
        rc, dt, tail = _run_tests(main_dir, union)
        if rc != 0:
            print(f"the unmutated copy fails its tests ({union}, exit {rc}): fix that first\n{tail}")
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
                rc, dt, _ = _run_tests(main_dir, m.tests)
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
