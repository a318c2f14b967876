"""Properties of semantic segmentation (:mod:`ummae.tasks.segment`, :mod:`ummae.models.upernet`,
:mod:`ummae.evaluation.segmentation`)
against plain formulations of MMSegmentation 0.x written out here:

* ``slide_inference``: the window grid ``h_grids = max(h - crop + stride - 1, 0) // stride + 1``,
  ``y1 = i * stride``, ``y2 = min(y1 + crop, h)``, ``y1 = max(y2 - crop, 0)`` (and the same in x),
  the logits of every window summed and divided by the per-pixel count of windows, for many
  (height, width, crop, stride): where ``(size - crop) % stride`` is and is not 0, sizes below
  the crop, non-square images. A window smaller than the crop is padded to the crop
  (docs/differences.md, "Segmentation": MMSegmentation runs it as it is); the windows and the averaging are the same.
* which stage map each head reads (the reference config's ``in_index``): UperNet's decode head
  all four (``[0, 1, 2, 3]``: pyramid pooling on stage 4, laterals on stages 1-3); the
  auxiliary FCN head ``in_index=2``, stage 3 (stride 16);
* the losses: decode-head cross-entropy weight 1, auxiliary 0.4, each the mean over all pixels
  of the label map (ignored pixels count 0: MMSegmentation 0.x's ``mean``);
* ``mIoU`` / ``mAcc`` / ``aAcc`` against a plain numpy confusion matrix with an ignore index.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _eval_ranks import Thresholds
from ummae.config import SegmentConfig
from ummae.evaluation.segmentation import confusion_matrix, segmentation_metrics
from ummae.models.upernet import SegmenterInference
from ummae.tasks.segment import build_segmenter, evaluate_segmentation

TINY = dict(crop_size=64, neck_channels=32, head_channels=16, aux_channels=8)


# ------------------------------------------------------------------------- sliding windows


def ref_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """MMSegmentation's ``EncoderDecoder.slide_inference`` window grid, ``(y1, y2, x1, x2)``."""
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out.append((y1, y2, x1, x2))
    return out


class _WindowRecorder(SegmenterInference):
    """A stand-in segmenter for ``slide_logits``: records each window it is run on (the
    input holds row + 1 and column + 1 in its first two channels, so the zero padding to the
    crop is told apart), and returns, at full resolution, a constant per window (channel 0),
    the input's row + 1 (channel 1) and ones (channel 2)."""

    num_classes = 3

    def __init__(self, seed: int = 0):
        self.windows: list[tuple[int, int, int, int]] = []
        self.values: list[float] = []
        self.gen = torch.Generator().manual_seed(seed)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x[0, 0], x[0, 1]
        valid = rows > 0
        r = rows[valid]
        c = cols[valid]
        self.windows.append((int(r.min()) - 1, int(r.max()), int(c.min()) - 1, int(c.max())))
        v = float(torch.rand((), generator=self.gen))
        self.values.append(v)
        return torch.stack([torch.full_like(rows, v), rows, torch.ones_like(rows)])[None]


def _coords(h: int, w: int) -> torch.Tensor:
    rows = torch.arange(1, h + 1, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(1, w + 1, dtype=torch.float32)[None, :].expand(h, w)
    return torch.stack([rows, cols, torch.zeros(h, w)])[None]


def _check_slide(h: int, w: int, crop: int, stride: int) -> None:
    model = _WindowRecorder()
    out = model.slide_logits(_coords(h, w), crop, stride)
    want = ref_windows(h, w, crop, stride)
    assert model.windows == want, (h, w, crop, stride)
    # every pixel covered; the logits are the sum over the covering windows / their count
    count = np.zeros((h, w))
    total = np.zeros((h, w))
    for (y1, y2, x1, x2), v in zip(want, model.values, strict=True):
        count[y1:y2, x1:x2] += 1
        total[y1:y2, x1:x2] += v
    assert (count > 0).all()
    assert out.shape == (1, 3, h, w)
    np.testing.assert_allclose(out[0, 0].numpy(), total / count, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[0, 1].numpy(), _coords(h, w)[0, 0].numpy())
    np.testing.assert_allclose(out[0, 2].numpy(), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "h, w, crop, stride",
    [
        (512, 683, 512, 341),  # ADE20K-like: one row, (683 - 512) % 341 != 0
        (1024, 853, 512, 256),  # (1024 - 512) % 256 == 0, (853 - 512) % 256 != 0
        (853, 1024, 512, 256),  # transposed
        (200, 300, 64, 43),  # both != 0
        (192, 107, 64, 64),  # tiling rows, (107 - 64) % 64 != 0
        (150, 150, 64, 43),  # (150 - 64) % 43 == 0
        (40, 300, 64, 43),  # height below the crop: one row, windows shorter than the crop
        (30, 50, 64, 43),  # both below the crop: one window
        (64, 64, 64, 43),  # exactly the crop
        (65, 66, 64, 1),  # stride 1
        (300, 90, 64, 20),  # stride far below the crop
    ],
)
def test_slide__windows_and_averaging_equal_mmsegmentation_slide_inference(h, w, crop, stride):
    _check_slide(h, w, crop, stride)


@settings(
    max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.integers(8, 96), st.data())
def test_slide__property_over_many_sizes(crop, data):
    stride = data.draw(st.integers(max(1, crop // 4), crop))
    h = data.draw(st.integers(1, 4 * crop))
    w = data.draw(st.integers(1, 4 * crop))
    _check_slide(h, w, crop, stride)


def test_slide__default_test_settings_are_the_reference_configs():
    """The reference: ``test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341))``,
    images resized to fit (2048, 512)."""
    cfg = SegmentConfig(data="x")
    assert (cfg.test_mode, cfg.crop_size, cfg.stride(), tuple(cfg.scale)) == ("slide", 512, 341, (2048, 512))


class _Pointwise(SegmenterInference):
    """A stand-in segmenter whose logits are a fixed 1x1 map of its input (so the windows'
    average is the map of the whole image, whatever the windows): what ``predict_probs`` does
    around the model is then checked alone."""

    num_classes = 4

    def __init__(self):
        g = torch.Generator().manual_seed(8)
        self.w = torch.randn(4, 3, generator=g) * 0.05
        self.b = torch.randn(4, generator=g)

    def normalize(self, images):
        return (images.float() - 120.0) / 60.0

    def logits(self, x):
        return torch.einsum("kc,nchw->nkhw", self.w, x) + self.b.view(1, 4, 1, 1)


def ref_aug_test(model, image, scale, ratios, flip):
    """MMSegmentation 0.x ``aug_test`` with ``MultiScaleFlipAug``: for each ratio the image
    resized to fit ``(int(long * ratio), int(short * ratio))`` keeping its aspect
    (``mmcv.rescale_size``), and its flip; each view's logits flipped back, resized to the image
    and soft-maxed; the probabilities averaged."""
    h0, w0 = image.shape[-2:]
    x0 = model.normalize(image[None])
    total, views = 0, 0
    for ratio in ratios:
        long, short = int(max(scale) * ratio), int(min(scale) * ratio)
        f = min(long / max(h0, w0), short / min(h0, w0))
        size = (int(h0 * f + 0.5), int(w0 * f + 0.5))
        x = F.interpolate(x0, size=size, mode="bilinear", align_corners=False)
        for flipped in [False, True] if flip else [False]:
            xi = x.flip(-1) if flipped else x
            out = model.logits(xi)
            out = out.flip(-1) if flipped else out
            total = total + F.interpolate(out, size=(h0, w0), mode="bilinear", align_corners=False).softmax(1)
            views += 1
    return (total / views)[0]


@pytest.mark.parametrize("ratios, flip", [((1.0,), False), ((1.0,), True), ((0.5, 0.75, 1.0, 1.5), True)])
def test_predict_probs__views_resized_flipped_back_and_their_probabilities_averaged(ratios, flip):
    g = torch.Generator().manual_seed(9)
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=g)
    model = _Pointwise()
    got = model.predict_probs(image, "slide", 32, 21, (128, 64), ratios=ratios, flip=flip)
    want = ref_aug_test(model, image, (128, 64), ratios, flip)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------- heads and losses


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m, _ = build_segmenter("swin_test", 5, drop_path=0.0, scale=[128, 64], test_mode="slide", test_stride=43, **TINY)
    return m.eval()


def _inputs(n=2, h=64, w=64):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (n, h, w), generator=g)
    labels[0, :20] = 255
    labels[1, :, -7:] = 255
    return images, labels


def _capture(module, store, key):
    return module.register_forward_pre_hook(lambda m, args: store.setdefault(key, []).append(args[0]))


def test_heads__decode_head_reads_stages_1_to_4_and_the_aux_head_stage_3(model):
    images, labels = _inputs()
    seen: dict = {}
    hooks = [_capture(model.decode_head, seen, "decode"), _capture(model.aux_head, seen, "aux")]
    hooks += [_capture(b, seen, f"pool{i}") for i, b in enumerate(model.decode_head.pool)]
    hooks += [_capture(b, seen, f"lat{i}") for i, b in enumerate(model.decode_head.lateral)]
    hooks.append(model.backbone.register_forward_hook(lambda m, a, out: seen.setdefault("maps", []).append(out)))
    try:
        with torch.no_grad():
            model(images, labels)
    finally:
        for h in hooks:
            h.remove()
    maps = list(seen["maps"][0].values())
    assert len(maps) == 4
    # strides 4, 8, 16, 32 of the 64 px input
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    decode_in = seen["decode"][0]
    assert len(decode_in) == 4 and all(a is b for a, b in zip(decode_in, maps, strict=True))
    assert seen["aux"][0] is maps[2], "the auxiliary FCN head reads stage 3 (in_index=2)"
    for i in range(len(model.decode_head.pool)):
        assert seen[f"pool{i}"][0] is maps[3]  # pyramid pooling on the last stage
    for i in range(3):
        assert seen[f"lat{i}"][0] is maps[i]


def test_segmenter_normalize__equals_totensor_normalize(model):
    from PIL import Image
    from torchvision import transforms as T

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rng = np.random.default_rng(2)
    arrs = [rng.integers(0, 256, (10, 7, 3), dtype=np.uint8) for _ in range(2)]
    arrs[1][..., 1] = 255
    want = torch.stack([T.Normalize(mean, std)(T.ToTensor()(Image.fromarray(a))) for a in arrs])
    batch = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrs])
    torch.testing.assert_close(model.normalize(batch), want, rtol=0, atol=1e-5)


def _plain_ce(logits: torch.Tensor, labels: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """Cross-entropy per pixel of logits bilinearly resized (corners not aligned) to the
    labels, 0 at ignored pixels, averaged over all pixels."""
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    logp = up.log_softmax(1)
    valid = labels != ignore
    picked = logp.gather(1, labels.clamp(max=logp.shape[1] - 1)[:, None])[:, 0]
    return -(picked * valid).sum() / labels.numel()


def test_losses__decode_weight_one_aux_weight_0_4_each_a_mean_over_all_pixels(model):
    images, labels = _inputs()
    with torch.no_grad():
        losses = model(images, labels)
        maps = list(model.backbone(model.normalize(images)).values())
        decode = _plain_ce(model.decode_head(maps), labels)
        aux = _plain_ce(model.aux_head(maps[2]), labels)
    assert model.aux_weight == 0.4
    torch.testing.assert_close(losses["loss_decode"], decode, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_aux"], 0.4 * aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"], decode + 0.4 * aux, rtol=1e-5, atol=1e-6)
    # the defaults of the command and of the builder
    assert SegmentConfig(data="x").aux_weight == 0.4
    import inspect

    assert inspect.signature(build_segmenter).parameters["aux_weight"].default == 0.4


# ------------------------------------------------------------------------- metrics


def ref_metrics(pred: np.ndarray, label: np.ndarray, k: int, ignore: int) -> dict:
    """MMSegmentation's ``intersect_and_union`` / ``total_area_to_label``, as a plain numpy
    confusion matrix (rows: label, columns: prediction), ignored pixels left out."""
    cm = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(pred.ravel(), label.ravel(), strict=True):
        if t != ignore:
            cm[t, p] += 1
    inter = np.diag(cm).astype(float)
    area_label, area_pred = cm.sum(1).astype(float), cm.sum(0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (area_label + area_pred - inter)
        acc = inter / area_label
    return {
        "IoU": iou,
        "Acc": acc,
        "mIoU": np.nanmean(iou),
        "mAcc": np.nanmean(acc),
        "aAcc": inter.sum() / area_label.sum(),
    }


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.integers(2, 7), st.integers(1, 400), st.integers(0, 2**31 - 1), st.floats(0.0, 0.5))
def test_metrics__equal_a_plain_numpy_confusion_matrix(k, n, seed, p_ignore):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, k, n)
    label[rng.random(n) < p_ignore] = 255
    # predictions right about half the time, so the classes differ in IoU and accuracy; some
    # classes are missing from the labels
    pred = np.where(rng.random(n) < 0.5, np.minimum(label, k - 1), rng.integers(0, k, n))
    label[label == k - 1] = 255 if seed % 3 == 0 else k - 1
    if (label == 255).all():
        label[0] = 0
    ref = ref_metrics(pred, label, k, 255)
    cm = confusion_matrix(k, 255)
    cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    got = segmentation_metrics(cm.compute())
    np.testing.assert_allclose(np.array(got["IoU"], dtype=float), ref["IoU"], rtol=1e-12)
    np.testing.assert_allclose(np.array(got["Acc"], dtype=float), ref["Acc"], rtol=1e-12)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key


def test_evaluate_segmentation__the_confusion_of_argmax_predictions_against_the_labels():
    """Whole pipeline on images at the test scale (no resize): predicted class per pixel from the
    stand-in's thresholds; the metrics are those of the plain confusion matrix over all images."""
    g = torch.Generator().manual_seed(4)
    batches, preds, labs = [], [], []
    for h, w in [(48, 80), (80, 48), (48, 48)]:
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        pred = (img[0] >= 80).long() + (img[0] >= 160).long()
        label = torch.where(torch.rand(h, w, generator=g) < 0.7, pred, torch.randint(0, 3, (h, w), generator=g))
        label[: h // 5] = 255
        batches.append(([img], [label], ["x"], 0))
        preds.append(pred.numpy().ravel())
        labs.append(label.numpy().ravel())

    class Loader(list):
        sampler = range(3)

    scale = (80, 48)  # long, short: each image already fits it exactly
    test = dict(mode="slide", crop=32, stride=21, scale=scale)
    got = evaluate_segmentation(Thresholds(), Loader(batches), torch.device("cpu"), "fp32", test)
    ref = ref_metrics(np.concatenate(preds), np.concatenate(labs), 3, 255)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9), key
