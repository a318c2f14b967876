"""``ummae`` command line: one sub-command per job, flags generated from the config dataclass.

    ummae models [PATTERN]
    ummae pretrain [--config run.yaml] [--flag value ...]
    ummae bench --models a,b [...]
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .config import PretrainConfig, add_dataclass_flags, config_from_args


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ummae", description="Uniform Masking (UM-MAE) pre-training for pyramid vision transformers")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the registered models, one per line")
    m.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'mae_swin*'")

    pt = sub.add_parser("pretrain", help="pre-train an encoder (UM-MAE, MAE or SimMIM)")
    pt.add_argument("--config", help="YAML file of options, or a built-in config name (demo, swin_tiny_in1k); command-line flags override it")
    add_dataclass_flags(pt, PretrainConfig)

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

            for name in list_models(args.pattern):
                print(name)
            return 0
        if args.command == "bench":
            from .bench import bench_main

            return bench_main(args)
        if args.command == "pretrain":
            from .train import pretrain

            pretrain(config_from_args(PretrainConfig, args))
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
