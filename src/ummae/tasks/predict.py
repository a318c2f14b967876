"""``ummae predict``: a classifier applied to images (timm's ``inference.py``): the top-k class
names and probabilities of each image, as CSV or JSON lines.

The classifier is a checkpoint of ``finetune`` / ``linprobe`` or its export, rebuilt through
:mod:`ummae.weights.build`; images are read with the evaluation transform it records
(``crop_pct``) and named with the classes it records (``class_names``: the training data's
sorted folder names). An image that cannot be read is skipped with a warning, listed at the
end, and the run goes on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ummae.data import build_classify_transform
from ummae.data.classify import default_crop_pct
from ummae.data.decode import read_image
from ummae.data.sources import IMG_EXTENSIONS, list_file_samples, no_images_error, scan_images
from ummae.engine.precision import resolve_device
from ummae.engine.progress import progress
from ummae.errors import UsageError
from ummae.models.classifier import check_classifier
from ummae.tasks.classify import model_from_weights
from ummae.weights.build import build_from_checkpoint
from ummae.weights.io import write_atomic
from ummae.weights.load import OneReadPerFile

log = logging.getLogger("ummae")

# --output's suffix -> how each image's row is written
FORMATS = (".csv", ".jsonl")


@dataclass(frozen=True)
class Classifier:
    """A classifier ready to apply: the model, its class names and its evaluation transform."""

    model: nn.Module
    class_names: list[str]
    transform: Any
    crop_pct: float


def load_for_prediction(
    checkpoint: str, ema: bool = False, crop_pct: float | None = None, img_size: int | None = None
) -> Classifier:
    """The classifier in ``checkpoint`` with what it records for prediction (``img_size``: built
    at another input size); a file written before classes were recorded names them by index,
    said in one line."""
    with OneReadPerFile():  # naming the classifier the file holds and building it: one read
        name = model_from_weights(None, checkpoint, "--checkpoint", "prediction")
        check_classifier(name)
        model, meta = build_from_checkpoint(
            checkpoint, "classify", ema=ema, name=name, img_size=img_size, drop_path=0.0
        )
    recorded = meta.get("model_args") or {}
    names = recorded.get("class_names")
    if not isinstance(names, list) or len(names) != model.num_classes:
        log.warning(
            "%s records no class names (written before they were recorded): classes are named by their index",
            checkpoint,
        )
        names = [str(i) for i in range(model.num_classes)]
    if crop_pct is None:
        crop_pct = recorded.get("crop_pct") or default_crop_pct(model.img_size)
    transform = build_classify_transform(model.img_size, is_training=False, crop_pct=crop_pct)
    return Classifier(model.eval(), [str(n) for n in names], transform, crop_pct)


def prediction_paths(inputs: Sequence[str]) -> list[str]:
    """Image files as given, folders expanded to their images (recursive, sorted), and list
    files (``relative/path [label]`` lines, relative to the list file's folder) to theirs."""
    out: list[str] = []
    for p in inputs:
        if os.path.isdir(p):
            found = scan_images(p)
            if not found:
                raise no_images_error(p)
            out.extend(found)
        elif os.path.isfile(p) and os.path.splitext(p)[1].lower() not in IMG_EXTENSIONS:
            samples, root, _ = list_file_samples(p, None)
            out.extend(os.path.join(root, path) for path, _ in samples)
        else:
            out.append(p)  # a missing file is reported as a bad image, in order
    if not out:
        raise UsageError("no images given")
    return out


def readable_batches(paths: Sequence[str], transform, batch_size: int, bad: list[tuple[str, str]]) -> Iterator:
    """``(paths, images [B, 3, S, S])`` of the readable images, in order; each unreadable one
    is appended to ``bad`` as ``(path, why)`` and warned about."""
    batch: list[tuple[str, Tensor]] = []
    for path in paths:
        try:
            batch.append((path, transform(read_image(path))))
        except (OSError, ValueError, SyntaxError) as e:  # PIL: missing, truncated or not an image
            bad.append((path, str(e).splitlines()[0] if str(e) else type(e).__name__))
            log.warning("skipping %s: cannot read it as an image (%s)", path, bad[-1][1])
        if len(batch) == batch_size:
            yield [p for p, _ in batch], torch.stack([x for _, x in batch])
            batch = []
    if batch:
        yield [p for p, _ in batch], torch.stack([x for _, x in batch])


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(probabilities, class indices)`` ``[N, k]`` of the ``k`` most probable classes,
    most probable first."""
    return logits.float().softmax(dim=-1).topk(k, dim=-1)


@torch.no_grad()
def predict_rows(
    clf: Classifier, paths: Sequence[str], k: int, batch_size: int, device: torch.device, bad: list
) -> list[dict[str, Any]]:
    """One row per readable image: its path and top-``k`` classes with their probabilities."""
    model = clf.model.to(device)
    rows = []
    batches = readable_batches(paths, clf.transform, batch_size, bad)
    for names, images in progress(batches, total=-(-len(paths) // batch_size), desc="prediction", unit="batch"):
        probs, idx = top_k(model(images.to(device)), k)
        for path, p, i in zip(names, probs.tolist(), idx.tolist(), strict=True):
            rows.append({"image": path, "classes": [clf.class_names[c] for c in i], "probs": p})
    return rows


def format_rows(rows: Sequence[dict[str, Any]], k: int, suffix: str) -> str:
    """CSV (``image, class_1, prob_1, ... class_k, prob_k``, timm's layout) or JSON lines."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image", *(f"{what}_{j}" for j in range(1, k + 1) for what in ("class", "prob"))])
    for r in rows:
        writer.writerow(
            [r["image"], *(v for c, p in zip(r["classes"], r["probs"], strict=True) for v in (c, f"{p:.6f}"))]
        )
    return text.getvalue()


def predict(args) -> int:
    """``ummae predict``."""
    suffix = Path(args.output).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"--output {args.output}: the suffix picks the format, one of {', '.join(FORMATS)}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    if args.topk < 1:
        raise UsageError(f"--topk must be >= 1, got {args.topk}")
    clf = load_for_prediction(args.checkpoint, args.ema, args.crop_pct)
    k = min(args.topk, len(clf.class_names))
    paths = prediction_paths(args.images)
    bad: list[tuple[str, str]] = []
    rows = predict_rows(clf, paths, k, args.batch_size, resolve_device(args.device), bad)
    write_atomic(args.output, lambda f: f.write(format_rows(rows, k, suffix)), mode="w")
    print(f"wrote {args.output}: top-{k} classes of {len(rows)} image(s) (crop_pct {clf.crop_pct:g})")
    if bad:
        print(f"skipped {len(bad)} unreadable image(s):")
        for path, why in bad:
            print(f"  {path}: {why}")
    return 0
