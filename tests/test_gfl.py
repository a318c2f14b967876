"""Tests of the GFL detector (:mod:`ummae.models.gfl`): ATSS assignment, the quality and
distribution focal losses and the integral decoding on hand-computed cases, the loss
normalisation on a hand-built batch, and a tiny GFL (toy backbone, 128 px images) that trains
with and without boxes, overfits one image and detects its boxes.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from ummae.models.gfl import GFL, GFLHead, atss_assign, distribution_focal_loss, integral, quality_focal_loss


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bce(x: float, y: float) -> float:
    return -(y * math.log(_sig(x)) + (1 - y) * math.log(1 - _sig(x)))


# ---------------------------------------------------------------------------------- ATSS

# Every box spans y 0..10, so IoUs are the 1-D IoUs in x and centre distances are |dx|.
# Level 0: width 10, centres 5, 15, 25, 35, 45; level 1: width 20, centres 10, 30, 50.
ANCHORS = torch.tensor(
    [
        [0, 0, 10, 10],
        [10, 0, 20, 10],
        [20, 0, 30, 10],
        [30, 0, 40, 10],
        [40, 0, 50, 10],
        [0, 0, 20, 10],
        [20, 0, 40, 10],
        [40, 0, 60, 10],
    ],
    dtype=torch.float32,
)
LEVELS = [5, 3]


def _box(x0: float, x1: float) -> list:
    return [x0, 0.0, x1, 10.0]


def test_atss_anchor_with_centre_outside_the_gt_is_not_positive():
    # gt x 6..12 (centre 9), topk 3.
    # level 0 nearest: anchor 0 (|5-9| = 4), 1 (6), 2 (16) -> IoU 4/12, 2/14, 0
    # level 1 nearest: anchor 5 (1), 6 (21), 7 (41)     -> IoU 6/20, 0, 0
    # mean 0.1294, std 0.1556 -> threshold 0.2850: anchors 0 (0.333) and 5 (0.3) pass it, but
    # anchor 0's centre x=5 lies left of the gt (x0 = 6): only anchor 5 (centre 10) is positive,
    # though anchor 0 has the highest IoU of all.
    matched = atss_assign(ANCHORS, LEVELS, torch.tensor([_box(6, 12)]), topk=3)
    assert matched.tolist() == [-1, -1, -1, -1, -1, 0, -1, -1]


def test_atss_anchor_claimed_by_two_gts_takes_the_higher_iou():
    # gt 0: x 0..15 (centre 7.5). Level 0 nearest: anchors 0, 1, 2 -> IoU 10/15, 5/20, 0;
    #   level 1: 5, 6, 7 -> IoU 15/20, 0, 0. mean 0.2778, std 0.3483 -> threshold 0.6261:
    #   anchors 0 (0.667, centre 5 inside) and 5 (0.75, centre 10 inside) are positive.
    # gt 1: x 0..8 (centre 4). Level 0 nearest: 0, 1, 2 -> IoU 8/10, 0, 0; level 1: 5, 6, 7
    #   -> IoU 8/20, 0, 0. mean 0.2, std 0.3347 -> threshold 0.5347: anchor 0 (0.8) positive.
    # Anchor 0 is positive for both and goes to gt 1 (0.8 > 0.667), not to the first gt.
    gts = torch.tensor([_box(0, 15), _box(0, 8)])
    matched = atss_assign(ANCHORS, LEVELS, gts, topk=3)
    assert matched.tolist() == [1, -1, -1, -1, -1, 0, -1, -1]
    # the order of the gts does not matter
    assert atss_assign(ANCHORS, LEVELS, gts.flip(0), topk=3).tolist() == [0, -1, -1, -1, -1, 1, -1, -1]


def test_atss_threshold_uses_the_unbiased_std():
    # gt x 0..12 (centre 6). Level 0 nearest: anchors 0, 1, 2 -> IoU 10/12, 2/20, 0; level 1:
    # 5, 6, 7 -> IoU 12/20, 0, 0. mean 0.2556; unbiased std 0.3668 -> threshold 0.6223, so
    # anchor 5 (0.6, centre 10 inside) is negative (with the population std, 0.3348, the
    # threshold would be 0.5904 and it would be positive).
    matched = atss_assign(ANCHORS, LEVELS, torch.tensor([_box(0, 12)]), topk=3)
    assert matched.tolist() == [0, -1, -1, -1, -1, -1, -1, -1]


def test_atss_without_gts_and_with_topk_above_the_level_size():
    assert atss_assign(ANCHORS, LEVELS, torch.zeros(0, 4)).tolist() == [-1] * 8
    # topk 9 > both level sizes: every anchor is a candidate (min(topk, level size))
    matched = atss_assign(ANCHORS, LEVELS, torch.tensor([_box(0, 15), _box(0, 8)]), topk=9)
    assert matched.shape == (8,) and matched.dtype == torch.long
    with pytest.raises(ValueError, match="num_anchors_per_level"):
        atss_assign(ANCHORS, [5, 2], torch.tensor([_box(0, 8)]))


# ---------------------------------------------------------------------------------- losses


def test_quality_focal_loss_by_hand():
    # anchor 0: positive of class 1 with IoU target 0.6; anchor 1: negative
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    loss = quality_focal_loss(logits, torch.tensor([1, -1]), torch.tensor([0.6, 0.0], dtype=torch.float64))
    expected = [
        [_bce(0.5, 0) * _sig(0.5) ** 2, _bce(-1.0, 0.6) * abs(0.6 - _sig(-1.0)) ** 2],
        [_bce(2.0, 0) * _sig(2.0) ** 2, _bce(0.0, 0) * _sig(0.0) ** 2],
    ]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    # the gradient goes through the modulating factor too (it is part of the loss)
    assert torch.autograd.gradcheck(
        lambda x: quality_focal_loss(x, torch.tensor([1, -1]), torch.tensor([0.6, 0.0], dtype=torch.float64)),
        logits.clone().requires_grad_(),
    )
    # beta 0: plain BCE towards the soft targets
    loss0 = quality_focal_loss(logits, torch.tensor([1, -1]), torch.tensor([0.6, 0.0], dtype=torch.float64), 0.0)
    assert loss0[0, 1].item() == pytest.approx(_bce(-1.0, 0.6))


def test_distribution_focal_loss_by_hand():
    logits = [0.0, 1.0, 2.0, 0.5, -1.0]  # reg_max 4
    lse = math.log(sum(math.exp(v) for v in logits))
    ce = [lse - v for v in logits]  # cross-entropy towards each bin
    pred = torch.tensor([logits] * 3, dtype=torch.float64)
    loss = distribution_focal_loss(pred, torch.tensor([2.3, 0.0, 3.0], dtype=torch.float64))
    # 2.3 lies between bins 2 and 3: weights 0.7 and 0.3; an integer target is all one bin
    expected = [0.7 * ce[2] + 0.3 * ce[3], ce[0], ce[3]]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_integral_is_the_mean_of_each_side_distribution():
    log = math.log
    # reg_max 2 (bins 0, 1, 2): probabilities (1/4, 1/2, 1/4) -> 1; (1/4, 1/4, 1/2) -> 1.25;
    # (0, 0, 1) -> 2; (1/2, 1/2, 0) -> 0.5
    sides = [[0.0, log(2), 0.0], [0.0, 0.0, log(2)], [-100.0, -100.0, 0.0], [0.0, 0.0, -100.0]]
    pred = torch.tensor(sides).reshape(1, 12)
    torch.testing.assert_close(integral(pred, 2), torch.tensor([[1.0, 1.25, 2.0, 0.5]]))
    with pytest.raises(ValueError):
        integral(pred, 3)


# ---------------------------------------------------------------------------------- the model


class ToyPyramid(nn.Module):
    """A few convs to P3-P7 (strides 8-128) of ``channels`` each."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.out_channels = channels
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, 4, 1), nn.ReLU(), nn.Conv2d(channels, channels, 3, 2, 1))
        self.down = nn.ModuleList(nn.Conv2d(channels, channels, 3, 2, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        maps = OrderedDict(p3=x)
        for i, conv in enumerate(self.down):
            x = conv(torch.relu(x))
            maps[f"p{i + 4}"] = x
        return maps


def _tiny_gfl(num_classes: int = 3, **kwargs) -> GFL:
    torch.manual_seed(0)
    return GFL(ToyPyramid(), num_classes, min_size=128, max_size=128, **kwargs)


BOXES = torch.tensor([[10.0, 20.0, 60.0, 70.0], [70.0, 40.0, 120.0, 110.0]])
LABELS = torch.tensor([0, 2])


def _empty_target() -> dict:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}


def test_loss_normalisation_on_a_hand_built_batch():
    # The anchors and gt (x 6..12) of the first ATSS test: anchor 5 (x 0..20, centre (10, 5),
    # stride 20 / 8 = 2.5) is the only positive. All-zero distributions over reg_max 4 put every
    # side at 2 strides = 5 px: box x 5..15, IoU and GIoU with the gt 60/100 = 0.6 (the
    # enclosing box is the union) -> GIoU loss 0.4; DFL of a uniform distribution is log 5 for
    # any target (the two bin weights sum to 1) per side, /4 for the four sides.
    model = _tiny_gfl(num_classes=2, reg_max=4)
    target = {"boxes": torch.tensor([_box(6, 12)]), "labels": torch.tensor([1])}

    def losses(pos_logits: list):
        cls = torch.zeros(len(pos_logits), 8, 2)
        for i, row in enumerate(pos_logits):
            cls[i, 5] = torch.tensor(row)
        outputs = {"cls_logits": cls, "bbox_regression": torch.zeros(len(pos_logits), 8, 20)}
        return model.compute_loss([target] * len(pos_logits), outputs, [ANCHORS] * len(pos_logits), LEVELS)

    def qfl(rows: list) -> float:  # QFL summed over the batch: 7 all-zero anchors x 2 classes
        per_image = [
            14 * _bce(0, 0) * 0.25 + _bce(a, 0) * _sig(a) ** 2 + _bce(b, 0.6) * abs(0.6 - _sig(b)) ** 2 for a, b in rows
        ]
        return sum(per_image)

    # one image: weight = the best class score, sigmoid(2) = 0.881 (class 0, not the gt's
    # class 1) < 1, so the normaliser is 1
    out = losses([[2.0, -1.0]])
    w = _sig(2.0)
    assert out["loss_qfl"].item() == pytest.approx(qfl([[2.0, -1.0]]) / 1, rel=1e-5)
    assert out["loss_bbox"].item() == pytest.approx(2.0 * 0.4 * w, rel=1e-5)
    assert out["loss_dfl"].item() == pytest.approx(0.25 * math.log(5) * w, rel=1e-5)
    # two images: weights sigmoid(1) and sigmoid(3) sum above 1 and normalise the box losses
    # to their weighted means; QFL is over 2 positives
    out = losses([[0.0, 1.0], [3.0, 0.0]])
    assert out["loss_qfl"].item() == pytest.approx(qfl([[0.0, 1.0], [3.0, 0.0]]) / 2, rel=1e-5)
    assert out["loss_bbox"].item() == pytest.approx(2.0 * 0.4, rel=1e-5)
    assert out["loss_dfl"].item() == pytest.approx(0.25 * math.log(5), rel=1e-5)


def test_postprocess_decodes_thresholds_and_clips_by_hand():
    model = _tiny_gfl(num_classes=2, reg_max=2)
    log = math.log
    # anchor 0: size 64 (stride 8) centred (40, 48); sides l, t, r, b at 1, 1.25, 2, 0.5 strides
    # (see the integral test) = 8, 10, 16, 4 px -> box (32, 38, 56, 52); class 1 at sigmoid(2),
    # class 0 at sigmoid(-5) = 0.007 < 0.05 dropped.
    # anchor 1: centred (128, 128), uniform sides (1 stride = 8 px) -> (120, 120, 136, 136),
    # clipped to the 128 px image; class 0 at sigmoid(1).
    anchors = torch.tensor([[8.0, 16.0, 72.0, 80.0], [96.0, 96.0, 160.0, 160.0]])
    reg = torch.tensor([[0.0, log(2), 0.0, 0.0, 0.0, log(2), -100.0, -100.0, 0.0, 0.0, 0.0, -100.0], [0.0] * 12])
    cls = torch.tensor([[-5.0, 2.0], [1.0, -5.0]])
    det = model.postprocess_detections(
        {"cls_logits": [cls[None]], "bbox_regression": [reg[None]]}, [[anchors]], [(128, 128)]
    )[0]
    torch.testing.assert_close(det["boxes"], torch.tensor([[32.0, 38.0, 56.0, 52.0], [120.0, 120.0, 128.0, 128.0]]))
    torch.testing.assert_close(det["scores"], torch.tensor([_sig(2.0), _sig(1.0)]))
    assert det["labels"].tolist() == [1, 0]


def test_head_layout_and_group_norm():
    head = GFLHead(16, 3, reg_max=4, num_convs=2, num_levels=2)
    out = head([torch.randn(2, 16, 4, 4), torch.randn(2, 16, 2, 2)])
    assert out["cls_logits"].shape == (2, 20, 3) and out["bbox_regression"].shape == (2, 20, 20)
    assert GFLHead(256, 3).cls_tower[1].num_groups == 32
    torch.testing.assert_close(out["cls_logits"].sigmoid().mean(), torch.tensor(0.01), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="levels"):
        head([torch.randn(2, 16, 4, 4)])


def test_train_losses_are_finite_with_and_without_boxes():
    model = _tiny_gfl().train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    for targets in ([{"boxes": BOXES, "labels": LABELS}, _empty_target()], [_empty_target(), _empty_target()]):
        losses = model(images, targets)
        assert set(losses) == {"loss_qfl", "loss_bbox", "loss_dfl"}
        assert all(torch.isfinite(v) for v in losses.values())
    # no positive in the batch: the box losses are 0, yet part of the graph
    assert losses["loss_bbox"].item() == 0 and losses["loss_dfl"].item() == 0
    assert losses["loss_bbox"].requires_grad
    with pytest.raises(ValueError, match="labels"):
        model(images[:1], [{"boxes": BOXES, "labels": torch.tensor([0, 3])}])


@pytest.mark.parametrize("with_boxes", [True, False])
def test_gradient_reaches_every_parameter(with_boxes: bool):
    model = _tiny_gfl().train()
    target = {"boxes": BOXES, "labels": LABELS} if with_boxes else _empty_target()
    sum(model([torch.rand(3, 128, 128)], [target]).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # the regression branch learns only from positives
    assert (model.head.gfl_reg.weight.grad.abs().sum() > 0) == with_boxes


def test_overfits_one_image_and_detects_its_boxes():
    model = _tiny_gfl().train()
    torch.manual_seed(1)
    image = torch.rand(3, 128, 128)
    target = {"boxes": BOXES, "labels": LABELS}
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(30):
        loss = sum(model([image], [target]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    # The box losses are weighted by the predicted score, which starts at the 0.01 prior, so the
    # total first rises as the classifier learns, then falls.
    assert history[-1] < 0.5 * max(history) and history[-1] < history[0], history

    model.eval()
    with torch.no_grad():
        det = model([image, torch.rand(3, 128, 128)])
    for d in det:
        n = d["scores"].shape[0]
        assert d["boxes"].shape == (n, 4) and d["labels"].shape == (n,) and n <= 100
        assert (d["scores"] > 0.05).all() and d["labels"].dtype == torch.long
    # the two best detections are the two objects, with their classes
    best = det[0]["boxes"][:2]
    iou = box_iou(best, BOXES)
    assert iou.max(dim=1).values.min() > 0.8
    assert det[0]["labels"][:2].tolist() == LABELS[iou.argmax(dim=1)].tolist()
