"""Reading weights files, and carrying pre-trained weights into a new classifier or dense
backbone (:func:`load_pretrained`, the door for transfer; the door from a checkpoint to the model
it holds is :mod:`.build`).

Sources: an ummae checkpoint (``.pth``: pre-training, UM-MAE / MAE / SimMIM, or fine-tuning)
read with ``weights_only=True``, or a ``.safetensors`` file written by :func:`.export.export`.

What changes between pre-training and fine-tuning (METHOD.md), and how the load handles it:

* decoder, SM token, SimMIM mask token: pre-training only, dropped;
* the encoder's final norm: replaced by the norm after pooling (``fc_norm``), dropped;
* Swin window 8 -> 16: the pos-MLP bias is a function of offsets, nothing to convert;
* PVT sr 4-2-1-1 -> 8-4-2-1: pooling has no weights, nothing to convert;
* PVT / ViT fixed sin-cos position -> learnable table: the table starts as that same sin-cos
  (new in the report); a learnable table of another size (a fine-tuned checkpoint used at
  another image size) is resized bicubically (adapted);
* head: new, unless the source is a classifier with the same number of classes.

Anything else that differs (another family, depth or width) is refused with the differences
named: a silent partial load would look like a pre-trained run and train like a scratch one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from ummae.models.classifier import classifier_for
from ummae.models.dense import StageMaps
from ummae.models.layers import resize_pos_table
from ummae.weights import io as ckpt
from ummae.weights.convert import convert_checkpoint, describe, is_foreign
from ummae.weights.io import CheckpointError

log = logging.getLogger("ummae")

_HEAD_PREFIXES = ("fc_norm.", "head.")


def _is_pos_table(key: str) -> bool:
    return key.startswith("encoder.pos_embed")


@dataclass
class LoadReport:
    """Exactly what a load did with every key (checked by tests, printed by the commands)."""

    source: str
    source_model: str | None
    converted: str = ""  # what the conversion of a reference checkpoint dropped, and why
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)  # key -> how
    new: dict[str, str] = field(default_factory=dict)  # key -> how initialised
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why

    def format(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source} (model {self.source_model})"]
        if self.converted:
            lines += [
                "converted from the reference layout (ummae.weights.convert): source tensors not carried over, options not recorded:",
                self.converted,
            ]
        for title, items in (("adapted", self.adapted), ("newly initialised", self.new), ("dropped", self.dropped)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {k}: {why}" for k, why in _group(items).items()]
        return "\n".join(lines)


def _group(items: dict[str, str]) -> dict[str, str]:
    """Collapse ``decoder.blocks.0.attn.qkv.weight`` ... into ``decoder.*`` lines per reason."""
    out: dict[str, str] = {}
    counts: dict[tuple[str, str], int] = {}
    for k, why in items.items():
        top = k.split(".")[0]
        group = k if top in ("encoder",) or "." not in k else f"{top}.*"
        counts[(group, why)] = counts.get((group, why), 0) + 1
    for (group, why), n in counts.items():
        out[group] = why if n == 1 else f"{why} ({n} tensors)"
    return out


class OneReadPerFile:
    """While open (``with OneReadPerFile() as reads:``), :func:`read_weights` reads each file
    once, a reference checkpoint converted once: a command's check of a weights file and its
    build share one read. :meth:`close` lets the reads go (before training: the run does not
    hold them)."""

    def __init__(self):
        self.files: dict[tuple[str, int, int], tuple] | None = {}
        self._token = None

    def __enter__(self) -> OneReadPerFile:
        self._token = _READS.set(self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        _READS.reset(self._token)

    def close(self) -> None:
        self.files = None  # the reads go; any later one reads the file

    def read(self, path: Path, read: Callable[[], tuple]) -> tuple:
        if self.files is None:
            return read()
        st = path.stat()  # keyed by the file itself: a checkpoint replaced meanwhile is read anew
        key = (str(path.resolve()), st.st_ino, st.st_mtime_ns)
        if key not in self.files:
            self.files[key] = read()
        return self.files[key]


_READS: ContextVar[OneReadPerFile | None] = ContextVar("ummae_weight_reads", default=None)


def read_weights(
    path: str | Path, ema: bool = False, tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of an ummae ``.pth`` checkpoint or exported ``.safetensors``, or
    of a reference (UM-MAE / MAE code base) checkpoint converted to ours (:mod:`ummae.weights.convert`);
    ``meta`` has ``model_name`` and ``model_args`` when the file records them. ``ema``: the
    EMA weights a fine-tuning run with ``--ema`` keeps beside the raw ones. ``tensors=False``:
    ``meta`` without reading the weights (a safetensors file's header; a ``.pth`` mapped, not
    loaded), for commands that only need to know what the file holds. Inside
    :class:`OneReadPerFile` a file is read once, whole (a ``.pth`` mapped), for every call."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if ema and path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path} is an exported file with one set of weights; --ema applies to fine-tuning checkpoints (.pth)"
        )
    reads = _READS.get()
    if reads is None:
        kind, content = _read_file(path, tensors)
    else:
        kind, content = reads.read(path, lambda: _read_file(path, tensors=True, mmap=True))
    if kind == "reference" and ema:
        raise CheckpointError(
            f"{path} is a reference checkpoint with one set of weights; --ema applies to ummae fine-tuning checkpoints"
        )
    if kind != "ours":
        state, meta = content
        return dict(state), dict(meta)
    ck = content
    if ema and "ema" not in ck:
        raise CheckpointError(f"{path} holds no EMA weights (its run was not started with --ema)")
    return dict(ck["ema" if ema else "model"]), {
        "model_name": ck.get("model_name"),
        "model_args": ck.get("model_args", {}),
        "source_model": ck.get("model_name"),
    }


def _read_file(path: Path, tensors: bool, mmap: bool = False) -> tuple[str, Any]:
    """``(kind, content)`` of a weights file: ``("export", (state, meta))`` of a safetensors
    file, ``("reference", (state, meta))`` of a reference checkpoint, converted, or
    ``("ours", checkpoint)``. ``tensors=False``: a safetensors file's header only, a ``.pth``
    mapped; ``mmap``: a ``.pth`` mapped (its tensors read when touched)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118 (a safe_open handle, not a dict)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
        return "export", (state, _export_info(meta, path))
    ck = ckpt.load(path, mmap=mmap or not tensors)
    if is_foreign(ck):  # the reference's / MAE's published weights: converted on the fly
        return "reference", convert_checkpoint(ck, str(path))
    return "ours", ck


def _export_info(meta: dict[str, str], path: Path) -> dict[str, Any]:
    """The ummae metadata of a safetensors export, ``model_args`` parsed."""
    info: dict[str, Any] = {
        "model_name": meta.get("model_name"),
        "source_model": meta.get("source_model"),
        "contents": meta.get("contents"),
    }
    if "model_args" in meta:
        try:
            info["model_args"] = json.loads(meta["model_args"])
        except ValueError:
            info["model_args"] = None
        if not isinstance(info["model_args"], dict):
            raise CheckpointError(f"{path}: its metadata model_args is not a JSON mapping of options")
    return info


def log_load_report(report: LoadReport | None, out: Path, what: str = "the model") -> None:
    """A run's record of its ``--pretrained`` load: the report in the log and in
    ``pretrained_load.txt`` of its folder (rank 0 only)."""
    if report is None:
        log.info("no --pretrained: %s starts from scratch", what)
        return
    text = report.format()
    log.info("pre-trained weights:\n%s", text)
    (Path(out) / "pretrained_load.txt").write_text(text + "\n")


def load_pretrained(model: nn.Module, path: str | Path, ema: bool = False) -> LoadReport:
    """Load pre-trained (or fine-tuned) weights into classifier ``model``, or into the encoder
    of a dense backbone (a detector's or segmenter's :class:`StageMaps`, loaded as the
    classifier it was cut from); see the module doc."""
    stage_maps = next((m for m in model.modules() if isinstance(m, StageMaps)), None)
    if stage_maps is not None:
        model = stage_maps.as_classifier()
    return load_weights(model, *read_weights(path, ema), path)


def load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path
) -> LoadReport:
    """:func:`load_pretrained` of weights already read by :func:`read_weights` from ``path``."""
    source_model = meta.get("source_model") or meta.get("model_name")
    report = LoadReport(str(path), source_model, describe(meta))
    own = model.state_dict()
    merged = dict(own)
    unexpected, shapes = _take_source(state, own, merged, report)
    missing = _account_for_own(own, state, report)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} encoder tensors missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:3])})")
        target_name = getattr(model, "model_name", type(model).__name__)
        raise CheckpointError(
            f"{path} holds the encoder of {source_model or 'an unknown model'}, which does not match {target_name}: "
            f"{'; '.join(parts)}{_suggest(source_model)}"
        )
    model.load_state_dict(merged)
    return report


def _take_source(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], report: LoadReport
) -> tuple[list[str], list[str]]:
    """Each source tensor into ``merged`` (loaded or adapted) or the report's dropped; the
    encoder keys the model lacks, and those of another shape."""
    unexpected, shapes = [], []
    for k, v in state.items():
        if not k.startswith("encoder."):
            if not k.startswith(_HEAD_PREFIXES):
                report.dropped[k] = "pre-training only (decoder / masking token)"
            elif k in own and own[k].shape == v.shape:
                merged[k] = v
                report.loaded.append(k)
            elif k in own:
                report.dropped[k] = f"shape {tuple(v.shape)} vs the model's {tuple(own[k].shape)} (other classes)"
            else:
                report.dropped[k] = "a head of another form (e.g. a linear probe's): the model's head is new"
        elif k.startswith("encoder.norm."):
            report.dropped[k] = "the encoder's final norm: the classifier norms pooled features (fc_norm)"
        elif k not in own:
            unexpected.append(k)
        elif own[k].shape == v.shape:
            merged[k] = v
            report.loaded.append(k)
        elif _is_pos_table(k) and v.ndim == own[k].ndim == 3 and v.shape[-1] == own[k].shape[-1]:
            h, w = own[k].shape[:2]
            merged[k] = resize_pos_table(v, h, w)
            report.adapted[k] = f"position table resized {v.shape[0]}x{v.shape[1]} -> {h}x{w} (bicubic)"
        else:
            shapes.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
    return unexpected, shapes


def _account_for_own(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], report: LoadReport) -> list[str]:
    """The model's tensors the source did not fill: new ones (positions, head) in the report;
    the encoder tensors missing from the source returned."""
    done = set(report.loaded) | set(report.adapted)
    missing = []
    for k in own:
        if k in done:
            continue
        if k == "encoder.pos_embed_cls" and k not in state:
            report.new[k] = "the cls token's learnable position, initialised to 0 (its fixed position in pre-training)"
        elif _is_pos_table(k) and k not in state:
            report.new[k] = "learnable position table, initialised to the fixed sin-cos it replaces"
        elif k.startswith(_HEAD_PREFIXES):
            report.new[k] = (
                "head (weights: trunc normal std 2e-5, bias 0)" if k.startswith("head.") else "fc_norm (1, 0)"
            )
        elif k.startswith("encoder.") and k not in state:
            missing.append(k)
    return missing


def _suggest(source_model: str | None) -> str:
    try:
        return f". Its classifier is {classifier_for(source_model)}" if source_model else ""
    except ValueError:
        return ""


MAX_IMG_SIZE = 2048  # what a checkpoint's recorded options may ask a model to be built at


def model_args_within_bounds(args: dict[str, Any], path) -> dict[str, Any]:
    """Options read from a checkpoint are untrusted input too: refuse sizes no real run has
    (a 4096 px model would take many GB before anything is checked)."""
    size = args.get("img_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 16 <= size <= MAX_IMG_SIZE):
        raise CheckpointError(f"{path} records img_size={size!r}; a model is built only at 16 to {MAX_IMG_SIZE} px")
    return args
