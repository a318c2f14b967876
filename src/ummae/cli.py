"""``ummae`` command line: one sub-command per job, flags generated from the config dataclass.

    ummae models [PATTERN] [--kind pretrain|classify]
    ummae pretrain [--config run.yaml] [--flag value ...]
    ummae finetune --model swin_tiny_256 --pretrained ckpt.pth --data /imagenet [...]
    ummae linprobe | knn --model ... --pretrained ... --data ...
    ummae eval --model ... --checkpoint ... --data ...
    ummae export --checkpoint ckpt.pth --output model.safetensors
    ummae bench --models a,b [...]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from .config import (
    EvalConfig,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    PretrainConfig,
    add_dataclass_flags,
    config_from_args,
)

# command -> (config class, help, "module:function" that runs it)
RUNS = {
    "pretrain": (PretrainConfig, "pre-train an encoder (UM-MAE, MAE or SimMIM)", "train:pretrain"),
    "finetune": (FinetuneConfig, "fine-tune a classifier, from pre-trained weights or from scratch", "tasks.finetune:finetune"),
    "linprobe": (LinprobeConfig, "linear probe of a frozen pre-trained encoder (MAE's recipe)", "tasks.finetune:linprobe"),
    "eval": (EvalConfig, "top-1 / top-5 of a classifier checkpoint on a validation split", "tasks.finetune:run_eval"),
    "knn": (KnnConfig, "weighted kNN top-1 of a frozen pre-trained encoder", "tasks.knn:run_knn"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ummae", description="Uniform Masking (UM-MAE) pre-training for pyramid vision transformers")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the registered models, one per line")
    m.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'mae_swin*'")
    m.add_argument("--kind", choices=("pretrain", "classify"), help="only pre-training models or only classifiers")

    from .config import builtin_configs

    for name, (cls, help_, _) in RUNS.items():
        r = sub.add_parser(name, help=help_, description=cls.__doc__)
        r.add_argument("--config", help=f"YAML file of options, or a built-in config name ({', '.join(builtin_configs())}); command-line flags override it")
        add_dataclass_flags(r, cls)

    e = sub.add_parser("export", help="write a checkpoint's inference weights as safetensors (decoder dropped)")
    e.add_argument("--checkpoint", required=True, help="an ummae checkpoint (pre-training or fine-tuning)")
    e.add_argument("--output", required=True, help="the .safetensors file to write")
    e.add_argument("--encoder-only", action="store_true", help="drop a fine-tuned classifier's head too")

    from .bench import add_bench_args

    b = sub.add_parser("bench", help="time full training steps of models side by side")
    add_bench_args(b)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "models":
            from .registry import list_models

            for name in list_models(args.pattern, kind=args.kind):
                print(name)
            return 0
        if args.command == "bench":
            from .bench import bench_main

            return bench_main(args)
        if args.command == "export":
            from .tasks.pretrained import export

            if not args.output.endswith(".safetensors"):
                raise ValueError(f"--output must name a .safetensors file, got {args.output}")
            meta = export(args.checkpoint, args.output, args.encoder_only)
            print(f"wrote {args.output}: {meta['contents']} of {meta['source_model']}; load it with "
                  f"`ummae finetune --model {meta['model_name']} --pretrained {args.output}` or "
                  f"timm.create_model('{meta['timm_model_name']}') + load_state_dict(..., strict=False)")
            return 0
        if args.command in RUNS:
            import importlib

            cls, _, target = RUNS[args.command]
            module, fn = target.split(":")
            result = getattr(importlib.import_module(f".{module}", __package__), fn)(config_from_args(cls, args))
            if args.command in ("eval", "knn") and int(os.environ.get("RANK", "0")) == 0:
                import json

                print(json.dumps(result))  # one JSON line on stdout, from rank 0 only
            return 0
    except ValueError as e:  # bad input: one clear message, no traceback
        print(f"ummae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .engine.loop import NonFiniteLossError

        if isinstance(e, NonFiniteLossError):
            print(f"ummae {args.command}: error: {e}", file=sys.stderr)
            return 3
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
