"""Run configuration: small dataclasses, a YAML file, and command-line flags generated from
the dataclass fields (one flag per field, so nothing is declared twice).

Precedence: dataclass default < ``--config file.yaml`` < explicit command-line flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml


@dataclass
class PretrainConfig:
    """Pre-training run. Defaults are the paper's recipe (METHOD.md)."""

    model: str = field(default="mae_swin_tiny_256", metadata={"help": "registered model (`ummae models`)"})
    data: Optional[str] = field(default=None, metadata={"help": "ImageFolder tree, flat image folder, or list file of 'relative/path label' lines; omitted: the embedded demo photos"})
    data_root: Optional[str] = field(default=None, metadata={"help": "root of the paths in a list file (default: the list file's folder)"})
    output: str = field(default="runs/pretrain", metadata={"help": "output folder: checkpoints, metrics.jsonl, TensorBoard"})
    # method (None = the model's default)
    img_size: Optional[int] = field(default=None, metadata={"help": "input size (default: the model's, 256 for pyramid models, 224 for ViT)"})
    unit_size: Optional[int] = field(default=None, metadata={"help": "mask unit size in pixels (default 16)"})
    sampling: Optional[str] = field(default=None, metadata={"help": "uniform (UM-MAE) or random (MAE RS; ViT only)"})
    mask_ratio: Optional[float] = field(default=None, metadata={"help": "masked fraction (uniform sampling is always 0.75)"})
    sm_ratio: Optional[float] = field(default=None, metadata={"help": "secondary masking ratio of the visible units (default 0.25; 0 = US only)"})
    norm_pix_loss: Optional[bool] = field(default=None, metadata={"help": "per-unit normalised pixel targets (default on for MAE models)"})
    decoder_pos: Optional[str] = field(default=None, metadata={"help": "'true' (each visible token at its own unit) or 'reference' (the reference code's ordering, for reproduction only)"})
    drop_path: Optional[float] = field(default=None, metadata={"help": "stochastic depth rate of the encoder"})
    # optimisation
    epochs: int = field(default=200, metadata={"help": "training epochs"})
    warmup_epochs: float = field(default=10, metadata={"help": "linear warm-up epochs"})
    batch_size: int = field(default=128, metadata={"help": "images per process per step"})
    accum_iter: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    blr: float = field(default=1.5e-4, metadata={"help": "base lr: lr = blr * effective batch / 256"})
    lr: Optional[float] = field(default=None, metadata={"help": "absolute lr (overrides blr)"})
    min_lr: float = field(default=0.0, metadata={"help": "lr at the end of the cosine"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay"})
    betas: Tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    clip_grad: Optional[float] = field(default=None, metadata={"help": "max gradient norm (default: no clipping)"})
    crop_scale: Tuple[float, float] = field(default=(0.2, 1.0), metadata={"help": "RandomResizedCrop scale range"})
    # machinery
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (with a grad scaler) or fp32"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    num_workers: int = field(default=8, metadata={"help": "data-loading processes per training process"})
    seed: int = field(default=0, metadata={"help": "seed of data order, augmentation, masks and init"})
    save_every: int = field(default=1, metadata={"help": "write checkpoint-last.pth every N epochs (and at the end)"})
    keep_every: int = field(default=20, metadata={"help": "also keep checkpoint-EPOCH.pth every N epochs and at the end (0 = only the end)"})
    save_every_steps: int = field(default=0, metadata={"help": "also checkpoint-last.pth every N optimiser steps inside an epoch (0 = off)"})
    resume: Optional[str] = field(default=None, metadata={"help": "'auto' (checkpoint-last.pth of the output folder, if any) or a checkpoint path"})
    log_every: int = field(default=20, metadata={"help": "metrics every N steps"})
    max_steps_per_epoch: Optional[int] = field(default=None, metadata={"help": "cap on steps per epoch (quick runs)"})
    demo_repeats: int = field(default=8, metadata={"help": "embedded demo data: random crops per photo per epoch"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})

    def validate(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.accum_iter >= 1, "accum_iter", self.accum_iter, "must be >= 1")
        _check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")
        _check(self.blr > 0, "blr", self.blr, "must be > 0")
        _check(self.lr is None or self.lr > 0, "lr", self.lr, "must be > 0")
        _check(self.min_lr >= 0, "min_lr", self.min_lr, "must be >= 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "must be in [0, 1)")
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, "crop_scale", self.crop_scale, "must satisfy 0 < min <= max <= 1")
        _check(self.precision in ("auto", "bf16", "fp16", "fp32"), "precision", self.precision, "must be auto, bf16, fp16 or fp32")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device", self.device, "must be auto, cpu, cuda or cuda:N")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        _check(self.save_every >= 1, "save_every", self.save_every, "must be >= 1")
        _check(self.keep_every >= 0, "keep_every", self.keep_every, "must be >= 0")
        _check(self.save_every_steps >= 0, "save_every_steps", self.save_every_steps, "must be >= 0")
        _check(self.log_every >= 1, "log_every", self.log_every, "must be >= 1")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "max_steps_per_epoch", self.max_steps_per_epoch, "must be >= 1")
        _check(self.demo_repeats >= 1, "demo_repeats", self.demo_repeats, "must be >= 1")

    def model_kwargs(self) -> Dict[str, Any]:
        """The options the model builder takes (None = the model's default)."""
        return dict(
            img_size=self.img_size, unit_size=self.unit_size, sampling=self.sampling,
            mask_ratio=self.mask_ratio, sm_ratio=self.sm_ratio, norm_pix_loss=self.norm_pix_loss,
            decoder_pos=self.decoder_pos, drop_path=self.drop_path,
        )


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"bad config value {name}={value!r}: {why}")


# --- YAML + flags ------------------------------------------------------------------------------


def _base_type(tp):
    """(python type, is_tuple) of a field annotation, unwrapping Optional."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (tuple, Tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def _coerce(cls, name: str, value: Any) -> Any:
    hints = typing.get_type_hints(cls)
    tp, is_tuple = _base_type(hints[name])
    if value is None:
        return None
    try:
        if is_tuple:
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            value = tuple(tp(v) for v in value)
            if len(value) != 2:
                raise ValueError(value)
            return value
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError):
        raise ValueError(f"bad config value {name}={value!r}: expected {'two values of type ' if is_tuple else ''}{tp.__name__}") from None


BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def builtin_configs():
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))


def load_yaml(cls, path: str | Path) -> Dict[str, Any]:
    """Load a YAML file of options, or a built-in config by name (``demo``, ...)."""
    path = Path(path)
    if not path.is_file() and (BUILTIN_CONFIGS / f"{path}.yaml").is_file():
        path = BUILTIN_CONFIGS / f"{path}.yaml"
    if not path.is_file():
        raise ValueError(f"config file not found: {path} (built-in configs: {', '.join(builtin_configs())})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    known = {f.name for f in fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"unknown option {key!r} in {path}; valid options: {', '.join(sorted(known))}")
        out[name] = _coerce(cls, name, value)
    return out


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per dataclass field; defaults are left unset (SUPPRESS) so that only
    flags the user typed override the YAML file."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp, is_tuple = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f.metadata.get("help", "")
        if default is not None:  # None defaults are explained by the help text itself
            help_ += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif is_tuple:
            parser.add_argument(flag, nargs="+", type=str, default=argparse.SUPPRESS, help=help_, metavar="V")
        else:
            parser.add_argument(flag, type=str, default=argparse.SUPPRESS, help=help_, metavar=tp.__name__.upper())


def config_from_args(cls, args: argparse.Namespace):
    """Build and validate ``cls`` from parsed args (with optional ``args.config`` YAML)."""
    values: Dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(cls, args.config))
    for f in fields(cls):
        if hasattr(args, f.name):
            values[f.name] = _coerce(cls, f.name, getattr(args, f.name))
    cfg = cls(**values)
    cfg.validate()
    return cfg


def config_to_dict(cfg) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
