"""``ummae`` command line: one sub-command per job, flags generated from the config dataclass.

ummae models [PATTERN] [--kind pretrain|classify]
ummae pretrain [--config run.yaml] [--flag value ...]
ummae finetune --model swin_tiny_256 --pretrained ckpt.pth --data /imagenet [...]
ummae linprobe | knn --model ... --pretrained ... --data ...
ummae eval --model ... --checkpoint ... --data ...
ummae predict --checkpoint runs/ft/checkpoint-best.pth --images photos/ [--topk 5 --output top5.csv]
ummae export --checkpoint ckpt.pth --output model.safetensors
ummae export --checkpoint runs/ft/checkpoint-best.pth --format onnx --output model.onnx [--validate]
ummae bench --models a,b [...]
ummae visualize --checkpoint runs/pt/checkpoint-last.pth --images a.jpg b.jpg [--output recon.png]
ummae masks [--img-size 256 --unit-size 16 --image photo.jpg --output masks.png]
ummae shards /imagenet/train --output shards/ [--shard-size 1000 --no-shuffle --seed 0 --overwrite]
ummae plot runs/a runs/b [--output curves.png --metrics loss,lr,images_per_s]
ummae detect train --backbone swin_tiny_256 --pretrained ckpt.pth --data /coco [--detector gfl]
ummae detect eval --checkpoint runs/det/checkpoint-best.pth --data /coco
ummae detect predict --checkpoint runs/det/checkpoint-best.pth --images a.jpg --output vis/
ummae segment train --backbone swin_tiny_256 --pretrained ckpt.pth --data /ADEChallengeData2016
ummae segment eval --checkpoint runs/seg/checkpoint-best.pth --data /ADEChallengeData2016 [--ratios ... --flip]
ummae segment predict --checkpoint runs/seg/checkpoint-best.pth --images a.jpg --output vis/
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ummae.choices import HEAD_KINDS, MODEL_KINDS
from ummae.config import (
    DetectConfig,
    DetectEvalConfig,
    DetectTestConfig,
    EvalConfig,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    PretrainConfig,
    SegmentConfig,
    SegmentEvalConfig,
    add_dataclass_flags,
    builtin_configs,
    config_from_args,
)
from ummae.detector_specs import DETECTORS
from ummae.errors import NonFiniteLossError, UmmaeError, UsageError

# Every handler below imports what it runs inside itself: `ummae --help` then imports no torch.


@dataclass(frozen=True)
class Command:
    """One sub-command: its help line, what runs it, and where its flags come from.

    ``run`` is ``"module:function"`` (imported when the command runs) or a handler here. With a
    ``config`` class the flags are generated from it (plus ``--config YAML``) and ``run`` takes
    the config; otherwise ``flags(parser)`` adds them and ``run`` takes the parsed arguments and
    returns the exit status. ``heavy``: ``flags`` imports torch, so they are added only when
    this command is the one parsed. ``result``: the returned figures are printed as one JSON
    line on stdout (rank 0)."""

    help: str
    run: str | Callable[[argparse.Namespace], int]
    config: type | None = None
    flags: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None
    heavy: bool = False
    result: bool = False


# --- hand-written flags of the commands without a config class -----------------------------


def _models_flags(m: argparse.ArgumentParser) -> None:
    m.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'mae_swin*'")
    m.add_argument(
        "--kind",
        choices=MODEL_KINDS + HEAD_KINDS,
        help="only the models of this kind (pre-training models, classifiers, or the detection / segmentation heads, "
        "whose models are named <head>_<classifier>)",
    )


def _recipes_flags(r: argparse.ArgumentParser) -> None:
    r.add_argument("name", nargs="?", help="a recipe: print its values and sources")


def _detect_predict_flags(dp: argparse.ArgumentParser) -> None:
    dp.add_argument("--checkpoint", required=True, help="a checkpoint of `ummae detect train`")
    dp.add_argument("--images", required=True, nargs="+", help="image files and/or folders (their images, sorted)")
    dp.add_argument("--output", default="detections", help="folder for the pictures (default: detections)")
    dp.add_argument(
        "--score-thresh", type=float, default=0.3, help="draw detections scoring at least this (default: 0.3)"
    )
    dp.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_dataclass_flags(dp, DetectTestConfig)  # --test-scales, --test-flip: those of detect eval


def _segment_predict_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--checkpoint", required=True, help="a checkpoint of `ummae segment train`")
    sp.add_argument("--images", required=True, nargs="+", help="image files and/or folders (their images, sorted)")
    sp.add_argument("--output", default="segmentations", help="folder for the pictures (default: segmentations)")
    sp.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours (default: 0.5)")
    sp.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def _predict_flags(pr: argparse.ArgumentParser) -> None:
    pr.add_argument(
        "--checkpoint", required=True, help="a classifier: a checkpoint of `ummae finetune` / `linprobe` or its export"
    )
    pr.add_argument(
        "--images",
        required=True,
        nargs="+",
        help="image files, folders (their images, sorted) and/or list files ('relative/path [label]' lines)",
    )
    pr.add_argument(
        "--output",
        default="predictions.csv",
        help="file to write; its suffix picks the format: .csv or .jsonl (default: predictions.csv)",
    )
    pr.add_argument("--topk", type=int, default=5, help="classes per image, most probable first (default: 5)")
    pr.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    pr.add_argument("--crop-pct", type=float, help="evaluation crop (default: the one the checkpoint records)")
    pr.add_argument("--ema", action="store_true", help="the EMA weights of a fine-tuning checkpoint (a run with --ema)")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


EXPORT_FORMATS = {".safetensors": "safetensors", ".onnx": "onnx"}  # --output's suffix for each --format


def _export_flags(e: argparse.ArgumentParser) -> None:
    e.add_argument(
        "--checkpoint",
        required=True,
        help="an ummae checkpoint (safetensors: pre-training or fine-tuning; onnx: a classifier, segmenter or "
        "detector)",
    )
    e.add_argument("--output", required=True, help="the file to write (.safetensors or .onnx, as --format)")
    e.add_argument(
        "--format",
        choices=tuple(EXPORT_FORMATS.values()),
        default="safetensors",
        help="safetensors: the inference weights; onnx: the model as an ONNX graph (default: safetensors)",
    )
    e.add_argument("--encoder-only", action="store_true", help="drop a fine-tuned classifier's head too (safetensors)")
    e.add_argument("--ema", action="store_true", help="the EMA weights of a fine-tuning checkpoint (a run with --ema)")
    e.add_argument("--opset", type=int, help="onnx: the ONNX opset (default: 17)")
    e.add_argument(
        "--img-size",
        type=int,
        help="onnx: the input size of a classifier or segmenter (default: the one it was trained at)",
    )
    e.add_argument(
        "--validate",
        action="store_true",
        help="onnx: run the graph with onnxruntime beside PyTorch on a few images, print the max difference, "
        "fail beyond the tolerance",
    )
    e.add_argument(
        "--images", nargs="+", help="onnx --validate: images, folders or list files (default: the demo photos)"
    )


def _convert_flags(cv: argparse.ArgumentParser) -> None:
    cv.add_argument(
        "src", help="a checkpoint of the UM-MAE reference code or the MAE code base (pre-training or fine-tuned)"
    )
    cv.add_argument(
        "--output", required=True, help="ummae checkpoint (.pth) or safetensors export (.safetensors) to write"
    )
    cv.add_argument(
        "--model", help="our registered model to load it into (default: the one the checkpoint's args name)"
    )
    cv.add_argument("--overwrite", action="store_true", help="replace an existing --output")


def _visualize_flags(v: argparse.ArgumentParser) -> None:
    v.add_argument(
        "--checkpoint",
        required=True,
        help="a pre-training checkpoint with its decoder (checkpoint-last.pth of `ummae pretrain`, or a reference one)",
    )
    v.add_argument("--images", required=True, nargs="+", help="image files and/or folders (their images, sorted)")
    v.add_argument("--output", default="recon.png", help="picture to write (default: recon.png)")
    v.add_argument("--seed", type=int, default=0, help="seed of the masks (default: 0)")
    v.add_argument(
        "--max-images", type=int, default=8, help="show at most this many images, the first ones (default: 8)"
    )
    v.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def _masks_flags(k: argparse.ArgumentParser) -> None:
    k.add_argument("--img-size", type=int, default=256, help="image size (default: 256)")
    k.add_argument("--unit-size", type=int, default=16, help="mask unit size in pixels (default: 16)")
    k.add_argument("--image", help="an image file (default: scikit-image's chelsea.png)")
    k.add_argument("--output", default="masks.png", help="picture to write (default: masks.png)")
    k.add_argument("--seed", type=int, default=0, help="seed of the masks (default: 0)")


def _shards_flags(w: argparse.ArgumentParser) -> None:
    w.add_argument(
        "src",
        help="an ImageFolder, a flat image folder, a dataset root with train/, or a list file of 'relative/path [label]' lines",
    )
    w.add_argument("--output", required=True, help="folder for the shards and shards.json")
    w.add_argument(
        "--shard-size", type=int, default=1000, help="images per shard, the last may hold fewer (default: 1000)"
    )
    w.add_argument("--data-root", help="root of a list file's paths (default: the list file's folder)")
    w.add_argument("--no-shuffle", action="store_true", help="keep the source order (default: a seeded random order)")
    w.add_argument("--seed", type=int, default=0, help="seed of the random order (default: 0)")
    w.add_argument("--overwrite", action="store_true", help="replace the shards and shards.json already in --output")


def _plot_flags(c: argparse.ArgumentParser) -> None:
    c.add_argument("runs", nargs="+", help="run output folders")
    c.add_argument(
        "--output", default="curves.png", help="figure to write; the suffix picks the format (default: curves.png)"
    )
    c.add_argument(
        "--metrics",
        default="loss,lr,images_per_s",
        help="comma-separated metrics, one subplot each (default: loss,lr,images_per_s)",
    )


def _bench_flags(b: argparse.ArgumentParser) -> None:
    from ummae.bench import add_bench_args  # imports torch

    add_bench_args(b)


# --- handlers of the commands without a config class ---------------------------------------


def _models(args) -> int:
    from ummae.models.registry import list_models  # torch: only when run

    for name in list_models(args.pattern, kind=args.kind):
        print(name)
    return 0


def _recipes(args) -> int:
    from ummae.config.recipes import recipes_text

    print(recipes_text(args.name))
    return 0


def _bench(args) -> int:
    from ummae.bench import bench_main  # torch: only when run

    return bench_main(args)


def _export(args) -> int:
    suffix = Path(args.output).suffix
    if EXPORT_FORMATS.get(suffix) != args.format:
        want = next(k for k, v in EXPORT_FORMATS.items() if v == args.format)
        raise UsageError(f"--output must name a {want} file with --format {args.format}, got {args.output}")
    onnx_only = [f for f in ("opset", "img_size", "validate", "images") if getattr(args, f) not in (None, False)]
    if args.format == "safetensors" and onnx_only:
        raise UsageError(f"--{onnx_only[0].replace('_', '-')} applies to --format onnx")
    if args.format == "onnx":
        return _export_onnx(args)
    from ummae.weights.export import export  # torch: only when run

    meta = export(args.checkpoint, args.output, args.encoder_only, args.ema)
    print(
        f"wrote {args.output}: {meta['contents']} of {meta['source_model']}; load it with "
        f"`ummae finetune --model {meta['model_name']} --pretrained {args.output}` or "
        f"ummae.register_timm(); timm.create_model('{meta['timm_model_name']}') + load_state_dict(..., strict=False)"
    )
    return 0


def _export_onnx(args) -> int:
    from ummae.tasks.onnx_export import DEFAULT_OPSET, export_onnx  # torch: only when run

    if args.encoder_only:
        raise UsageError("--encoder-only applies to --format safetensors (an ONNX graph is a whole model)")
    if args.images and not args.validate:
        raise UsageError("--images are the images --validate runs: give --validate too")
    opset = args.opset or DEFAULT_OPSET
    done = export_onnx(args.checkpoint, args.output, opset, args.img_size, args.ema, args.validate, args.images)
    print(f"wrote {args.output}: ONNX opset {opset}, {done['form']} form: {done['summary']}")
    if args.validate:
        print(
            f"validated with onnxruntime: max |onnxruntime - PyTorch| {done['max_diff']:.3g} <= {done['allowed']:.3g}"
        )
    return 0


def _convert(args) -> int:
    from ummae.weights.export import convert_file  # torch: only when run

    done = convert_file(args.src, args.output, args.model, args.overwrite)
    use = "--init / --pretrained / visualize" if done["kind"] == "pretrain" else "--pretrained / eval"
    print(
        f"wrote {args.output}: {done['tensors']} tensors of {done['model_name']} from {done['source_model']}"
        f" ({len(done['dropped'])} source tensors dropped: fixed tables we compute); use it with {use}"
    )
    for option, why in done["assumed"].items():
        print(f"  {option}: {why}")
    return 0


def _masks(args) -> int:
    from ummae.visualize import mask_figure  # torch: only when run

    if not 16 <= args.img_size <= 4096:
        raise UsageError(f"--img-size {args.img_size}: the figure is drawn at 16 to 4096 px")
    _save_picture(mask_figure(args.image, args.img_size, args.unit_size, args.seed), args.output)
    print(f"wrote {args.output}")
    return 0


def _shards(args) -> int:
    from ummae.data.shard_writer import shard_pattern, write_shards  # torch: only when run

    info = write_shards(
        args.src,
        args.output,
        args.shard_size,
        data_root=args.data_root,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    k = len(info["shards"])
    print(
        f"wrote {info['num_samples']} samples in {k} shard{'s' if k != 1 else ''} to {args.output}; "
        f'train with --data "{shard_pattern(args.output, k)}"'
    )
    return 0


def _plot(args) -> int:
    from ummae.plot import plot_runs  # matplotlib: only when run

    plotted = plot_runs(args.runs, args.output, args.metrics.split(","))
    print(f"wrote {args.output}: {', '.join(plotted)} of {len(args.runs)} run(s)")
    return 0


def _visualize(args) -> int:
    # torch: only when run
    import torch

    from ummae.engine.precision import resolve_device
    from ummae.visualize import compose_grid, image_paths, load_images, load_pretraining_model, reconstruction_panels

    if args.max_images < 1:
        raise UsageError(f"--max-images must be >= 1, got {args.max_images}")
    device = resolve_device(args.device)
    model = load_pretraining_model(args.checkpoint).to(device)
    paths = image_paths(args.images)
    if len(paths) > args.max_images:
        logging.getLogger("ummae").info("showing the first %d of %d images (--max-images)", args.max_images, len(paths))
        paths = paths[: args.max_images]
    imgs = load_images(paths, model.img_size).to(device)
    titles, panels = reconstruction_panels(model, imgs, torch.Generator(device=device).manual_seed(args.seed))
    _save_picture(compose_grid(panels, titles), args.output)
    print(f"wrote {args.output}: {len(paths)} image(s) x {len(titles)} panels ({', '.join(titles)})")
    return 0


def _save_picture(picture, output: str) -> None:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        picture.save(out)
    except (KeyError, ValueError) as e:  # Pillow: unknown file extension
        raise UsageError(f"cannot write {output}: {e} (use .png or .jpg)") from None


# --- the table: command -> what runs it, in the order `ummae --help` lists them -------------

GROUPS = {  # commands of two words: `ummae detect train ...`
    "detect": f"object detection and instance segmentation on COCO (--detector {', '.join(DETECTORS)})",
    "segment": "semantic segmentation with UperNet (ADE20K layout)",
}
COMMANDS: dict[str, Command] = {
    "models": Command("list the registered models, one per line", _models, flags=_models_flags),
    "recipes": Command(
        "list the paper's runs as named recipes (`--config NAME`), with the published figures",
        _recipes,
        flags=_recipes_flags,
    ),
    "pretrain": Command("pre-train an encoder (UM-MAE, MAE or SimMIM)", "tasks.pretrain:pretrain", PretrainConfig),
    "finetune": Command(
        "fine-tune a classifier, from pre-trained weights or from scratch", "tasks.classify:finetune", FinetuneConfig
    ),
    "linprobe": Command(
        "linear probe of a frozen pre-trained encoder (MAE's recipe)", "tasks.classify:linprobe", LinprobeConfig
    ),
    "eval": Command(
        "top-1 / top-5 of a classifier checkpoint on a validation split",
        "tasks.classify:run_eval",
        EvalConfig,
        result=True,
    ),
    "predict": Command(
        "top-k classes of a classifier on images, as CSV or JSON lines",
        "tasks.predict:predict",
        flags=_predict_flags,
        description="Write the top-k class names and probabilities of each image (a classifier checkpoint or "
        "export, with the evaluation transform and class names it records) as CSV or JSON lines. Unreadable "
        "images are skipped, warned about and listed.",
    ),
    "knn": Command("weighted kNN top-1 of a frozen pre-trained encoder", "tasks.knn:run_knn", KnnConfig, result=True),
    "detect train": Command("train a detector on COCO from a pre-trained backbone", "tasks.detect:train", DetectConfig),
    "detect eval": Command(
        "COCO box (and mask) AP of a detection checkpoint", "tasks.detect:run_eval", DetectEvalConfig, result=True
    ),
    "detect predict": Command(
        "draw a detection checkpoint's boxes (and masks) on images",
        "tasks.detect:predict",
        flags=_detect_predict_flags,
        description="Draw a detection checkpoint's boxes, labels, scores (and masks) on images.",
    ),
    "segment train": Command(
        "train UperNet on an ADE20K-layout data set from a pre-trained backbone", "tasks.segment:train", SegmentConfig
    ),
    "segment eval": Command(
        "mIoU, mean / overall accuracy and per-class IoU of a segmentation checkpoint",
        "tasks.segment:run_eval",
        SegmentEvalConfig,
        result=True,
    ),
    "segment predict": Command(
        "colour a segmentation checkpoint's classes over images",
        "tasks.segment:predict",
        flags=_segment_predict_flags,
        description="Write each image with its predicted classes coloured over it (STEM.png) "
        "and the label map (STEM_labels.png).",
    ),
    "export": Command(
        "write a checkpoint's inference weights as safetensors (decoder dropped), or its model as ONNX",
        _export,
        flags=_export_flags,
    ),
    "convert": Command(
        "turn a reference checkpoint (UM-MAE, MAE code base) into an ummae checkpoint or export",
        _convert,
        flags=_convert_flags,
    ),
    "visualize": Command(
        "reconstruction pictures of a pre-training checkpoint (one row per image)", _visualize, flags=_visualize_flags
    ),
    "masks": Command(
        "the masking strategies (--sampling) side by side on one image, with Secondary Masking, the compact map "
        "and SimMIM's mask",
        _masks,
        flags=_masks_flags,
    ),
    "shards": Command(
        "write WebDataset tar shards from an image folder or list file",
        _shards,
        flags=_shards_flags,
        description="Write WebDataset tar shards (DIR/shard-000000.tar, ... and DIR/shards.json) from "
        "what `pretrain --data` reads: an ImageFolder (labels kept), a flat image folder or "
        "a list file. The image files' bytes are stored as they are.",
    ),
    "plot": Command("training curves of one or several runs, from their metrics.jsonl", _plot, flags=_plot_flags),
    "bench": Command("time full training steps of models side by side", _bench, flags=_bench_flags, heavy=True),
}


def _version() -> str:
    try:
        return version("ummae")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def _add_command(sub, name: str, spec: Command, command: str | None) -> None:
    """The parser of one command of the table, inside its parent's sub-parsers."""
    word = name.split()[-1]
    description = spec.config.__doc__ if spec.config is not None else spec.description or _sentence(spec.help)
    r = sub.add_parser(word, help=spec.help, description=description)
    if spec.config is not None:
        names = builtin_configs(spec.config)
        builtin = f", or a built-in config name ({', '.join(names)})" if names else ""
        r.add_argument("--config", help=f"YAML file of options{builtin}; command-line flags override it")
        add_dataclass_flags(r, spec.config)
    elif spec.flags is not None and (not spec.heavy or command in (None, name.split()[0])):
        spec.flags(r)


def _sentence(help_: str) -> str:
    return help_[0].upper() + help_[1:] + "."


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, from :data:`COMMANDS`; with ``command`` (the sub-command about
    to be parsed, "" for none), the flags of ``heavy`` commands (bench: torch) are added only
    when they are the one, so that ``ummae --help`` stays fast."""
    p = argparse.ArgumentParser(
        prog="ummae", description="Uniform Masking (UM-MAE) pre-training for pyramid vision transformers"
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    actions = {}  # group -> its sub-parsers ("detect" -> train / eval / predict)
    for name, spec in COMMANDS.items():
        group = name.split()[0] if " " in name else None
        if group is not None and group not in actions:
            g = sub.add_parser(group, help=GROUPS[group], description=_sentence(GROUPS[group]))
            actions[group] = g.add_subparsers(dest="action", required=True, metavar="ACTION")
        _add_command(actions[group] if group else sub, name, spec, command)
    return p


# Other code bases' spellings of our options (after "_" -> "-"): MAE's main_pretrain.py /
# main_finetune.py and timm's train.py. The first one the sub-command has is suggested.
ALIASES = {
    "--data-path": ("--data",),
    "--data-dir": ("--data",),
    "--finetune": ("--pretrained",),
    "--initial-checkpoint": ("--pretrained", "--init"),
    "--output-dir": ("--output",),
    "--log-dir": ("--output",),
    "--input-size": ("--img-size",),
    "--nb-classes": ("--num-classes",),
    "--workers": ("--num-workers",),
    "--model-ema": ("--ema",),
    "--model-ema-decay": ("--ema-decay",),
    "--aa": ("--auto-augment",),
    "--opt-betas": ("--betas",),
    "--resume": ("--checkpoint",),  # MAE evaluates with --eval --resume CKPT
}


def _command_in(argv: list[str]) -> str:
    """The sub-command of ``argv`` (its first word that is no option: the top level has no
    option that takes a value), or "" for none."""
    return next((a for a in argv if not a.startswith("-")), "")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def _command_subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of ``command`` inside the whole command line ``parser``: for "detect train",
    the action's parser inside the task's."""
    for word in command.split():
        parser = _subparser(parser, word)
    return parser


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one command of :data:`COMMANDS` with all its flags, heavy ones included:
    what ``ummae COMMAND --help`` shows (the docs' command-line reference is written from it)."""
    return _command_subparser(_parser(command.split()[0]), command)


def _unknown_text(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """One line for what the sub-command does not know, naming the option meant when there is
    one: MAE's/timm's ``--batch_size`` -> ``--batch-size``, ``--data_path`` -> ``--data``..."""
    see = f"see `ummae {command} --help`"
    options = [a for a in unknown if a.startswith("--")]
    if not options:
        return f"unrecognized arguments: {' '.join(unknown)}; {see}"
    typed = options[0].split("=", 1)[0]
    sub = _command_subparser(parser, command)
    known = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    dashed = "--" + typed[2:].replace("_", "-")
    meant = next((c for c in (*ALIASES.get(dashed, ()), dashed) if c in known and c != typed), None)
    if meant is None:
        close = difflib.get_close_matches(dashed, known, n=1, cutoff=0.75)
        meant = close[0] if close else None
    return f"unknown option {typed}; did you mean {meant}?" if meant else f"unknown option {typed}; {see}"


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-inf$", re.IGNORECASE)


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` -> ``--lr=-1e-3``: argparse reads a value that starts with '-' and has an
    exponent as another option, and the flag as missing its value; the config then says what
    is wrong with the number itself."""
    out: list[str] = []
    for tok in argv:
        if out and _NEGATIVE_NUMBER.match(tok) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def _run(command: str, args: argparse.Namespace) -> int:
    """Run ``command`` of the table on the parsed ``args``; its exit status."""
    spec = COMMANDS[command]
    run = spec.run
    if isinstance(run, str):  # "module:function", imported only now (torch)
        module, fn = run.split(":")
        run = getattr(importlib.import_module(f"ummae.{module}"), fn)
    if spec.config is None:
        return run(args)
    result = run(config_from_args(spec.config, args))
    if spec.result and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))  # one JSON line on stdout, from rank 0 only
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = _attach_negative_numbers(sys.argv[1:] if argv is None else list(argv))
    parser = _parser(_command_in(argv))
    args, unknown = parser.parse_known_args(argv)
    command = " ".join(w for w in (args.command, getattr(args, "action", None)) if w)  # "detect train"
    if unknown:  # one line, not argparse's whole usage text
        print(f"ummae {command}: error: {_unknown_text(parser, command, unknown)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return _run(command, args)
    except NonFiniteLossError as e:  # the run stopped itself; its last checkpoint is whole and finite
        print(f"ummae {command}: error: {e}", file=sys.stderr)
        return 3
    except UmmaeError as e:  # bad input: one clear message, no traceback
        print(f"ummae {command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # full or read-only disk, a path that is a file or a folder, ...
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"ummae {command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: the checkpoints on disk are whole (written atomically)
        print(f"ummae {command}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception:  # anything else is a bug in ummae: its traceback is what a report needs
        print(
            f"ummae {command}: internal error: this is a bug in ummae, not in your input; please report it to "
            f"the maintainers with the traceback below",
            file=sys.stderr,
        )
        raise


if __name__ == "__main__":
    sys.exit(main())
