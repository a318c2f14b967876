"""The evaluation layer (:mod:`ummae.evaluation`) against formulations written out here:

* top-k accuracy and the mean cross-entropy against a brute-force count per image;
* mIoU / mAcc / aAcc against a per-pixel loop over intersections and unions (no confusion
  matrix);
* the reset / process / evaluate contract: every evaluator's figures are the same whatever the
  batches the data set is cut into, and a second pass after ``reset`` gives them again;
* the inference loop: eval mode, no gradients and the precision's autocast while the model
  runs, the model's mode restored after;
* the DDP reduction: two gloo ranks (torchrun) give every rank the figures of one process.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import _eval_ranks as ranks
from _helpers import torchrun_command
from ummae.engine.dist import DistInfo
from ummae.evaluation import inference_on_dataset
from ummae.evaluation.classification import FeatureBank, KnnEvaluator, TopKAccuracy, model_outputs
from ummae.evaluation.coco import CocoEvaluator
from ummae.evaluation.segmentation import SemSegEvaluator

CPU = torch.device("cpu")


def _cuts(n: int, seed: int) -> list[int]:
    """Random cut points of ``range(n)`` into batches (some of one item)."""
    g = torch.Generator().manual_seed(seed)
    return sorted({0, n, *torch.randint(1, n, (max(n // 3, 1),), generator=g).tolist()})


def _batches(tensors, cuts):
    return [tuple(t[a:b] for t in tensors) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


# ------------------------------------------------------------------------- top-k


def brute_top_k(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per image: the label's place among the scores (how many classes score higher), and
    -log softmax of its score; counted and averaged."""
    top1 = top5 = 0
    loss = 0.0
    for row, y in zip(logits.double().tolist(), labels.tolist(), strict=True):
        higher = sum(1 for s in row if s > row[y])
        top1 += higher == 0
        top5 += higher < min(5, len(row))
        loss += math.log(sum(math.exp(s) for s in row)) - row[y]
    n = len(labels)
    return {"acc1": 100.0 * top1 / n, "acc5": 100.0 * top5 / n, "val_loss": loss / n, "val_images": n}


@pytest.mark.parametrize("classes", [3, 5, 10])
def test_top_k__equals_a_brute_force_count(classes):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(57, classes, generator=g) * 3
    labels = torch.randint(0, classes, (57,), generator=g)
    ev = TopKAccuracy(CPU)
    ev.reset()
    for x, y in _batches((logits, labels), _cuts(57, 1)):
        ev.process((None, y), x)
    got, want = ev.evaluate(), brute_top_k(logits, labels)
    assert {k: v for k, v in got.items() if k != "val_loss"} == {k: v for k, v in want.items() if k != "val_loss"}
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)


# ------------------------------------------------------------------------- segmentation


def per_pixel_metrics(preds, labels, k: int, ignore: int) -> dict:
    """Per class, by a loop over every pixel: intersection (predicted and labelled c), union
    (predicted or labelled c) and labelled pixels, ignored pixels skipped; IoU and accuracy
    where their denominator is not 0, their means over those classes."""
    inter, union, labelled = [0] * k, [0] * k, [0] * k
    for pred, label in zip(preds, labels, strict=True):
        for p, t in zip(pred.flatten().tolist(), label.flatten().tolist(), strict=True):
            if t == ignore:
                continue
            labelled[t] += 1
            for c in range(k):
                inter[c] += p == c and t == c
                union[c] += p == c or t == c
    iou = [inter[c] / union[c] for c in range(k) if union[c]]
    acc = [inter[c] / labelled[c] for c in range(k) if labelled[c]]
    return {"mIoU": sum(iou) / len(iou), "mAcc": sum(acc) / len(acc), "aAcc": sum(inter) / sum(labelled)}


def test_semseg__miou_macc_aacc_equal_a_per_pixel_loop():
    g = torch.Generator().manual_seed(5)
    k, preds, labels = 5, [], []
    ev = SemSegEvaluator(k, 255, CPU)
    ev.reset()
    for h, w in [(9, 13), (16, 7), (11, 11)]:
        probs = torch.rand(k, h, w, generator=g)
        probs[4] = 0  # class 4 never predicted
        label = torch.randint(0, k - 1, (h, w), generator=g)  # nor labelled: no IoU, left out
        label[torch.rand(h, w, generator=g) < 0.2] = 255
        ev.process((None, label), probs)
        preds.append(probs.argmax(0))
        labels.append(label)
    got, want = ev.evaluate(), per_pixel_metrics(preds, labels, k, 255)
    assert math.isnan(got["IoU"][4]) and math.isnan(got["Acc"][4])
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


# ------------------------------------------------------------------------- the contract


def _feature_bank():
    g = torch.Generator().manual_seed(3)
    bank = FeatureBank(6, CPU)
    bank.reset()
    bank.process((None, torch.randint(0, 4, (40,), generator=g)), torch.randn(40, 6, generator=g))
    bank.evaluate()
    return bank


def _vectors(n: int, dim: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def _label_maps(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(k, 6, 5, generator=g), torch.randint(0, k, (6, 5), generator=g)) for _ in range(n)]


def _coco_items(root: Path):
    """(target, detections) of each image of the COCO set of :mod:`_eval_ranks`."""
    coco = ranks.CocoDetection(root, "val", train=False)
    det = ranks.ShiftedTruth(coco)
    items = []
    for i in range(len(coco)):
        image, target = coco[i]
        items.append((target, det([image.float() / 255])[0]))
    return coco, items


def _coco_case(root: Path):
    coco, items = _coco_items(root)
    return CocoEvaluator(coco, ("bbox", "segm")), items, _list_batch


def _items_in_batches(evaluator, items, cuts, as_batch):
    evaluator.reset()
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        inputs, outputs = as_batch(items[a:b])
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def _tensor_batch(items):
    x, y = zip(*items, strict=True)
    return (None, torch.stack(y)), torch.stack(x)


def _list_batch(items):
    targets, dets = zip(*items, strict=True)
    return (None, list(targets)), list(dets)


def _one_at_a_time(items):  # segmentation: an image per call, as the loop gives them
    (probs, label), *rest = items
    assert not rest
    return (None, label), probs


EVALUATORS = {
    "top_k": lambda root: (TopKAccuracy(CPU), list(zip(*_vectors(31, 6, 6, 0), strict=True)), _tensor_batch),
    "feature_bank": lambda root: (FeatureBank(6, CPU), list(zip(*_vectors(31, 6, 4, 1), strict=True)), _tensor_batch),
    "knn": lambda root: (
        KnnEvaluator(_feature_bank(), 4, 5, 0.1),
        list(zip(*_vectors(31, 6, 4, 2), strict=True)),
        _tensor_batch,
    ),
    "semseg": lambda root: (SemSegEvaluator(4, 255, CPU), _label_maps(9, 4, 3), _one_at_a_time),
    "coco": lambda root: _coco_case(root),
}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return ranks.write_coco(tmp_path_factory.mktemp("eval_coco") / "coco")


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN equal to NaN


@pytest.mark.parametrize("name", sorted(EVALUATORS))
def test_evaluators__figures_do_not_depend_on_the_batching_and_reset_starts_afresh(name, coco_root):
    evaluator, items, as_batch = EVALUATORS[name](coco_root)
    n = len(items)
    one_batch = [0, n] if as_batch is not _one_at_a_time else list(range(n + 1))
    whole = _items_in_batches(evaluator, items, one_batch, as_batch)
    assert whole, name
    for seed in range(3):
        cuts = _cuts(n, seed) if as_batch is not _one_at_a_time else list(range(n + 1))
        got = _items_in_batches(evaluator, items, cuts, as_batch)
        if name == "top_k":  # the cross-entropy is summed in fp32 per batch: rounding aside
            assert got.pop("val_loss") == pytest.approx(whole["val_loss"], rel=1e-6)
            got["val_loss"] = whole["val_loss"]
        assert _same(got, whole), (name, cuts)


def test_knn_evaluator__is_the_vote_of_knn_scores():
    bank = _feature_bank()
    feats, labels = _vectors(31, 6, 4, 2)
    ev = KnnEvaluator(bank, 4, 5, 0.1)
    ev.reset()
    ev.process((None, labels), feats)
    votes = torch.zeros(31, 4)
    sims = nn.functional.normalize(feats, dim=1) @ nn.functional.normalize(bank.features, dim=1).T
    for i in range(31):  # the 5 most similar training vectors vote exp(sim / 0.1) for their class
        for j in sims[i].argsort(descending=True)[:5].tolist():
            votes[i, bank.labels[j]] += math.exp(float(sims[i, j]) / 0.1)
    want = 100.0 * float((votes.argmax(1) == labels).float().mean())
    assert ev.evaluate() == {"knn_acc1": pytest.approx(want, abs=1e-9), "val_images": 31}


# ------------------------------------------------------------------------- the loop


class _Recorder(nn.Module):
    """Records, at each forward, whether it is training, whether gradients are on and the
    autocast state of the CPU; returns logits of 3 classes."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple] = []
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return self.lin(x)


@pytest.mark.parametrize("precision, autocast", [("fp32", False), ("bf16", True)])
def test_inference_loop__eval_mode_no_grad_precision_and_the_mode_restored(precision, autocast):
    model = _Recorder().train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), 0) for n in (2, 0, 3)]
    figures = inference_on_dataset(model, batches, TopKAccuracy(CPU), model_outputs, CPU, precision, desc="t")
    assert model.seen == [(False, False, autocast)] * 2  # the empty batch (every image unreadable) skipped
    assert model.training, "the model's training mode is given back"
    assert figures["val_images"] == 5


# ------------------------------------------------------------------------- DDP


def test_evaluators__two_gloo_ranks_give_every_rank_the_one_process_figures(coco_root, tmp_path):
    """Each rank runs the loop on its shard (images rank, rank + 2, ...), so batches and the
    order of gathered rows differ from one process; counts, confusion matrices, the kNN vote
    and COCO AP do not (the fp32 per-batch cross-entropy sum only up to rounding)."""
    one = ranks.all_figures(coco_root, DistInfo())
    out = tmp_path / "ranks.json"
    cmd = torchrun_command([str(Path(ranks.__file__)), str(coco_root), str(out)])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    every_rank = json.loads(out.read_text())
    assert len(every_rank) == 2
    for figures in every_rank:
        assert figures["top_k"].pop("val_loss") == pytest.approx(one["top_k"]["val_loss"], rel=1e-6)
        assert _same(figures, {**one, "top_k": {k: v for k, v in one["top_k"].items() if k != "val_loss"}})
