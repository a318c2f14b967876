"""Checkpoints: written atomically (temp file + rename, so a kill never leaves a torn file),
read with ``weights_only=True`` (a checkpoint is untrusted input)."""

from __future__ import annotations

import argparse
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ummae.errors import CheckpointError


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def write_atomic(path: str | Path, write, mode: str = "wb") -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it to ``path``: a
    kill or a full disk never leaves a torn file (the folder is made if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp(folder: str | Path) -> None:
    """Delete temp files that a kill during :func:`save_atomic` left behind (each can be as
    large as a checkpoint)."""
    for tmp in Path(folder).glob(".checkpoint-*.tmp"):
        tmp.unlink(missing_ok=True)


def load(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint, read with ``weights_only=True``; ``mmap``: tensors stay on disk until
    touched (to read a checkpoint's settings without loading its weights; a legacy-format file
    is read whole)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # The reference code bases store their argparse options with the weights: that one
        # plain class is allowed, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"cannot read checkpoint {path}: {_load_error(path, e)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} is not an ummae checkpoint (no 'model' entry)")
    return ckpt


def _is_zip(path: Path) -> bool:
    """torch's zip format (the only one that can be memory-mapped), not its legacy pickle one."""
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def _load_error(path: Path, e: Exception) -> str:
    """One line for why ``torch.load`` refused a file (its own texts run to many lines)."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"it holds a Python object of class {found.group(1)}, which a checkpoint reader must not "
            f"unpickle (only weights and plain values are loaded)"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:3] == b"\xff\xd8\xff" or head == b"\x89PNG":
        return "it is an image, not a checkpoint"
    if head[:2] != b"PK" and head[:1] != b"\x80":  # zip archive, or torch's legacy pickle format
        return "not a PyTorch checkpoint"
    return " ".join(text.split())[:300]


def check_run_state(state: dict[str, Any], path) -> None:
    """Refuse a checkpoint whose training state would break the resumed run, before using it."""
    if "model_name" not in state:
        raise CheckpointError(
            f"{path} is not an ummae training checkpoint (a reference or exported one?): it cannot "
            f"resume a run; start from its weights with --init (pre-training) or --pretrained"
        )
    for key in ("epoch", "step_in_epoch", "update"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"checkpoint {path} is damaged or not a training checkpoint: {key}={value!r}")
    for key in ("optimizer", "scaler"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(
                f"checkpoint {path} has no {key} state: it cannot resume a run (use --init to start from its weights)"
            )


def check_compatible(ckpt: dict[str, Any], path, model_name: str, model_args: dict[str, Any]) -> None:
    """Refuse a checkpoint of another model or of the same model built differently."""
    theirs = ckpt.get("model_name")
    if theirs != model_name:
        raise CheckpointError(f"checkpoint {path} was written for model {theirs!r}, but this run uses {model_name!r}")
    their_args = ckpt.get("model_args", {})
    diff = {
        k: (their_args.get(k), model_args.get(k))
        for k in set(their_args) | set(model_args)
        if their_args.get(k) != model_args.get(k)
    }
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"checkpoint {path} was built with other model options ({detail})")


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            parts.append(f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shapes[:5]]}")
        raise CheckpointError(f"checkpoint {path} does not match the model: {'; '.join(parts)}")
    module.load_state_dict(state)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
