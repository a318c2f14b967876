"""``ummae export --format onnx``: a trained model as an ONNX graph (timm's ``onnx_export.py``
and ``onnx_validate.py``, torchvision's detector exports), checked with ``onnx.checker`` and,
with ``--validate``, run by onnxruntime beside PyTorch on real images.

One :class:`OnnxForm` per kind of model says what its graph takes and gives, how images are
prepared for it, what PyTorch computes for the same input, and what of the PyTorch inference
stays out of the graph (said at export time, never changed silently). A detector's form is the
one its spec names (``DetectorSpec.onnx``).

Exporter: torch's TorchScript-based one (``dynamo=False``) for every kind. The dynamo exporter
refuses Swin's windowed attention (``scaled_dot_product_attention`` of 5-D tensors: its ONNX
translation takes 4-D ones only), and torchvision documents its detectors' export with the
TorchScript one.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.transforms.functional import pil_to_tensor

from ummae.data.decode import read_image
from ummae.data.sources import demo_samples
from ummae.detector_specs import DETECTORS, ONNX_FORMS, SPECS
from ummae.errors import UsageError
from ummae.models.registry import model_kind
from ummae.tasks.detect import load_detector
from ummae.tasks.predict import load_for_prediction, prediction_paths
from ummae.tasks.segment import load_segmenter
from ummae.weights.load import read_weights

log = logging.getLogger("ummae")

DEFAULT_OPSET = 17  # onnxruntime 1.16+ runs it; LayerNormalization is an op from 17 on
MIN_OPSET = 17
# --validate's tolerance: max |onnxruntime - PyTorch| <= TOLERANCE * max(1, max |PyTorch|)
TOLERANCE = 1e-4
VALIDATE_IMAGES = 4  # images --validate runs when --images is not given (the demo photos)
MISSING = 'ONNX export needs the packages onnx and onnxruntime: pip install "ummae[onnx]"'


@dataclass(frozen=True)
class OnnxForm:
    """How one kind of model is exported. ``graph(model)``: the module traced; ``inputs(model,
    images)``: its input tensors for uint8 images ``[3, H, W]`` (one call per tensor set run);
    ``reference(model, x)``: PyTorch's outputs through the model's own inference path;
    ``left_out(model)``: what of that inference the graph does not do (one line, or "")."""

    name: str
    input_names: tuple[str, ...]
    output_names: Callable[[nn.Module], tuple[str, ...]]
    dynamic_axes: dict[str, dict[int, str]]
    graph: Callable[[nn.Module], nn.Module]
    inputs: Callable[[nn.Module, list[Tensor]], list[tuple[Tensor, ...]]]
    reference: Callable[[nn.Module, tuple[Tensor, ...]], list[Tensor]]
    left_out: Callable[[nn.Module], str]
    summary: str
    not_in_graph: str  # for the docs table


# --- classifiers ----------------------------------------------------------------------------


def _classifier_inputs(clf, images: list[Tensor]) -> list[tuple[Tensor, ...]]:
    batch = [clf.transform(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images]
    return [(torch.stack(batch),)]


CLASSIFIER = OnnxForm(
    name="classifier",
    input_names=("images",),
    output_names=lambda m: ("logits",),
    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    graph=lambda clf: clf.model,
    inputs=_classifier_inputs,
    reference=lambda clf, x: [clf.model(*x)],
    left_out=lambda clf: (
        f"the evaluation transform is not in the graph (resize to img_size / {clf.crop_pct:g} (bicubic), "
        f"center crop {clf.model.img_size}, ImageNet mean / std), nor the softmax"
    ),
    summary="normalised, center-cropped images [N, 3, S, S] in; logits [N, K] out (dynamic batch)",
    not_in_graph="the evaluation transform (resize, center crop, normalisation) and the softmax",
)


# --- segmenters -------------------------------------------------------------------------------


def _pooling_bins(out: int, size: int) -> Tensor:
    """``[out, size]``: row k averages bin k of adaptive average pooling (torch's bins:
    ``floor(k * size / out)`` to ``ceil((k + 1) * size / out)``)."""
    m = torch.zeros(out, size)
    for k in range(out):
        start, end = (k * size) // out, -(-((k + 1) * size) // out)
        m[k, start:end] = 1.0 / (end - start)
    return m


class FixedSizeAveragePool(nn.Module):
    """``nn.AdaptiveAvgPool2d(out)`` for inputs of one size, as two matrix products: ONNX has no
    adaptive pooling whose output size does not divide the input (UperNet's scales 3 and 6)."""

    def __init__(self, out: int, height: int, width: int):
        super().__init__()
        self.register_buffer("rows", _pooling_bins(out, height))
        self.register_buffer("cols", _pooling_bins(out, width).T.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        return self.rows @ x @ self.cols


class SegmenterLogits(nn.Module):
    """The segmenter's one-pass inference at ``model.onnx_size``: [0, 255] images ``[N, 3, S,
    S]`` -> decode-head logits ``[N, K, S/4, S/4]``; a copy of the model whose pyramid pooling
    is the same averages for the last map of that size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model)
        with torch.no_grad():
            top = list(model.backbone(torch.zeros(1, 3, model.onnx_size, model.onnx_size)).values())[-1]
        for branch in self.model.decode_head.pool:
            branch[0] = FixedSizeAveragePool(branch[0].output_size, *top.shape[-2:])

    def forward(self, images: Tensor) -> Tensor:
        return self.model.logits(self.model.normalize(images))


def _segmenter_inputs(model, images: list[Tensor], size: int) -> list[tuple[Tensor, ...]]:
    resized = [F.interpolate(im[None].float(), (size, size), mode="bilinear", align_corners=False)[0] for im in images]
    return [(torch.stack(resized),)]


def _segmenter_left_out(model) -> str:
    args = model.model_args
    test = []
    if args.get("test_mode") == "slide":
        test.append(f"its sliding-window inference (crop {args['crop_size']}, stride {args.get('test_stride')})")
    test.append("multi-scale and flip test (`segment eval --ratios / --flip`)")
    return (
        f"one {model.onnx_size} px pass only: {' and '.join(test)} are not exported; resize or tile the image to "
        f"{model.onnx_size} px, upsample the logits and take the argmax yourself"
    )


SEGMENTER = OnnxForm(
    name="segmenter",
    input_names=("images",),
    output_names=lambda m: ("logits",),
    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    graph=SegmenterLogits,
    inputs=lambda m, images: _segmenter_inputs(m, images, m.onnx_size),
    reference=lambda m, x: [m(*x)],
    left_out=_segmenter_left_out,
    summary="RGB images [N, 3, S, S] in [0, 255] in (one input size, dynamic batch); logits [N, K, S/4, S/4] out",
    not_in_graph="sliding-window inference, multi-scale and flip test, the upsampling and argmax",
)


# --- detectors --------------------------------------------------------------------------------


class RawDetector(nn.Module):
    """Backbone + head of a one-stage detector (GFL): the normalised, padded canvas ``[N, 3,
    S, S]`` -> the head's raw outputs and the anchors of the canvas ``[A, 4]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, canvas: Tensor):
        feats = list(self.model.backbone(canvas).values())
        out = self.model.head(feats)
        size = (canvas.shape[-2], canvas.shape[-1])
        anchors = self.model.anchor_generator(ImageList(canvas[:1], [size]), feats)[0]
        return out["cls_logits"], out["bbox_regression"], anchors


def _canvas(model, images: list[Tensor]) -> list[tuple[Tensor, ...]]:
    """The detector's own evaluation transform: fitted into the canvas, normalised, padded."""
    batch, _ = model.eval().transform([im.float() / 255 for im in images])
    return [(batch.tensors,)]


def _raw_reference(model, x: tuple[Tensor, ...]) -> list[Tensor]:
    feats = list(model.backbone(x[0]).values())
    out = model.head(feats)
    anchors = model.anchor_generator(ImageList(x[0], [tuple(x[0].shape[-2:])] * x[0].shape[0]), feats)[0]
    return [out["cls_logits"], out["bbox_regression"], anchors]


RAW_DETECTOR = OnnxForm(
    name="raw",
    input_names=("canvas",),
    output_names=lambda m: ("cls_logits", "bbox_regression", "anchors"),
    dynamic_axes={"canvas": {0: "batch"}, "cls_logits": {0: "batch"}, "bbox_regression": {0: "batch"}},
    graph=RawDetector,
    inputs=_canvas,
    reference=_raw_reference,
    left_out=lambda m: (
        "the post-processing is not in the graph (fit the image into the canvas, normalise, pad; then sigmoid "
        "scores, the distance integral, box decoding, score threshold, top-k and NMS: docs/weights.md)"
    ),
    summary=ONNX_FORMS["raw"],
    not_in_graph="the resize and padding into the canvas, score threshold, box decoding, top-k, NMS",
)


class OneImageDetector(nn.Module):
    """torchvision's detector on one image: ``[3, H, W]`` in [0, 1] -> its detections as a tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.keys = ("boxes", "labels", "scores", "masks") if model.spec.masks else ("boxes", "labels", "scores")

    def forward(self, image: Tensor):
        det = self.model([image])[0]
        return tuple(det[k] for k in self.keys)


TORCHVISION_DETECTOR = OnnxForm(
    name="torchvision",
    input_names=("image",),
    output_names=lambda m: OneImageDetector(m).keys,
    dynamic_axes={"image": {1: "height", 2: "width"}},
    graph=OneImageDetector,
    inputs=lambda m, images: [(im.float() / 255,) for im in images],
    reference=lambda m, x: list(OneImageDetector(m)(*x)),
    left_out=lambda m: "one image per run (torchvision's export); labels count the background as 0",
    summary=ONNX_FORMS["torchvision"],
    not_in_graph="batches of several images (one image per run)",
)

DETECTOR_FORMS = {"raw": RAW_DETECTOR, "torchvision": TORCHVISION_DETECTOR}


# --- loading and the form of each kind --------------------------------------------------------


def load_exportable(checkpoint: str, img_size: int | None, ema: bool) -> tuple[Any, OnnxForm]:
    """The model in ``checkpoint`` and the form it is exported in; what cannot be exported is
    refused in one line."""
    _, meta = read_weights(checkpoint, tensors=False)
    name = meta.get("model_name")
    kind = model_kind(name) if isinstance(name, str) else "classify"  # a reference checkpoint: a classifier
    if kind == "pretrain":
        raise UsageError(
            f"{checkpoint} is a pre-training checkpoint: ONNX export takes a trained classifier, segmenter or "
            f"detector (the encoder alone goes to safetensors: --format safetensors)"
        )
    if ema and kind != "classify":
        raise UsageError("--ema applies to classifier checkpoints (fine-tuning with --ema)")
    if kind == "classify":
        clf = load_for_prediction(checkpoint, ema, img_size=img_size)
        return clf, CLASSIFIER
    if kind == "segment":
        model = load_segmenter(checkpoint).eval()
        model.onnx_size = img_size or model.model_args["crop_size"]
        try:
            model.backbone.encoder.check_image_size(model.onnx_size, "--img-size")
        except ValueError as e:
            raise UsageError(str(e)) from None
        return model, SEGMENTER
    model = load_detector(checkpoint).eval()
    form = model.spec.onnx
    if not form:
        can = ", ".join(d for d in DETECTORS if SPECS[d].onnx)
        raise UsageError(f"a {model.spec.name} detector cannot be exported to ONNX (the detectors that can: {can})")
    if img_size is not None:
        raise UsageError(
            f"--img-size: a detector's canvas is fixed by its training ({model.model_args['img_size']} px)"
        )
    return model, DETECTOR_FORMS[form]


# --- export and validation --------------------------------------------------------------------


def _onnx_packages():
    try:  # optional: the `onnx` extra
        import onnx
        import onnxruntime
    except ImportError:
        raise UsageError(MISSING) from None
    return onnx, onnxruntime


def export_onnx(
    checkpoint: str,
    output: str,
    opset: int = DEFAULT_OPSET,
    img_size: int | None = None,
    ema: bool = False,
    validate: bool = False,
    images: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write ``checkpoint``'s model to ``output`` as ONNX (opset ``opset``), checked with
    ``onnx.checker``; with ``validate``, onnxruntime's outputs are compared with PyTorch's on
    ``images`` (default: the demo photos). Returns what was done, ``max_diff`` included."""
    onnx, _ = _onnx_packages()
    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset}: the models need opset {MIN_OPSET} or later")
    model, form = load_exportable(checkpoint, img_size, ema)
    left_out = form.left_out(model)
    log.warning("ONNX export: %s", left_out)
    sample = form.inputs(model, validation_images(images, 1))[0]
    graph = form.graph(model).eval()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            sample,
            output,
            dynamo=False,
            opset_version=opset,
            input_names=list(form.input_names),
            output_names=list(form.output_names(model)),
            dynamic_axes=form.dynamic_axes,
        )
    onnx.checker.check_model(output, full_check=True)
    done = {"form": form.name, "summary": form.summary, "opset": opset, "left_out": left_out}
    if validate:
        done["max_diff"], done["allowed"] = validate_onnx(model, form, output, validation_images(images, None))
    return done


def validation_images(paths: Sequence[str] | None, limit: int | None) -> list[Tensor]:
    """uint8 images ``[3, H, W]``: those of ``paths`` (files, folders, list files) or, without,
    the first :data:`VALIDATE_IMAGES` demo photos; ``limit``: at most that many."""
    if paths:
        found = prediction_paths(paths)
    else:
        found = [p for p, _ in demo_samples(1)[0]][:VALIDATE_IMAGES]
    return [pil_to_tensor(read_image(p)) for p in found[:limit]]


@torch.no_grad()
def onnx_differences(model, form: OnnxForm, output: str, images: list[Tensor]) -> list[tuple[float, float]]:
    """``(max |onnxruntime - PyTorch|, max |PyTorch|)`` of every output of every input set."""
    _, ort = _onnx_packages()
    session = ort.InferenceSession(output, providers=["CPUExecutionProvider"])
    found = []
    for x in form.inputs(model, images):
        ours = form.reference(model, x)
        theirs = session.run(None, {n: t.numpy() for n, t in zip(form.input_names, x, strict=True)})
        for name, a, b in zip(form.output_names(model), ours, theirs, strict=True):
            a = a.float().numpy() if a.is_floating_point() else a.numpy()
            if a.shape != b.shape:
                raise UsageError(f"--validate: onnxruntime's {name} has shape {b.shape}, PyTorch's {a.shape}")
            scale = float(np.abs(a).max()) if a.size else 0.0
            found.append((float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0, scale))
    return found


def validate_onnx(model, form: OnnxForm, output: str, images: list[Tensor]) -> tuple[float, float]:
    """``(max difference, tolerance)`` of the ONNX graph against PyTorch on ``images``; beyond
    the tolerance (:data:`TOLERANCE` of the outputs' scale) it is refused."""
    diffs = onnx_differences(model, form, output, images)
    worst = max(d for d, _ in diffs)
    allowed = TOLERANCE * max(1.0, max(s for _, s in diffs))
    if worst > allowed:
        raise UsageError(
            f"--validate: onnxruntime differs from PyTorch by {worst:.3g} on {len(images)} image(s), beyond the "
            f"tolerance {allowed:.3g}; {os.path.basename(output)} was written but does not compute what the model does"
        )
    return worst, allowed


def markdown_table() -> str:
    """The docs' table of what ``export --format onnx`` writes for each kind of model."""
    rows = ["| model | ONNX graph | not in the graph |", "|---|---|---|"]
    models = [("classifier", CLASSIFIER), ("UperNet segmenter", SEGMENTER)]
    models += [(f"`{s.name}` detector", DETECTOR_FORMS.get(s.onnx)) for s in SPECS.values()]
    for what, form in models:
        rows.append(f"| {what} | {form.summary} | {form.not_in_graph} |" if form else f"| {what} | not exportable | |")
    return "\n".join(rows)
