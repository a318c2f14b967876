"""Helpers of benchmarks/gpu_check.sh: data for its parts, one record per part, the report.

    python benchmarks/gpu_check.py data OUT COCO ADE JPEGS N_TRAIN N_VAL
    python benchmarks/gpu_check.py record OUT NAME RC SECONDS LIMIT
    python benchmarks/gpu_check.py report OUT PEAK_TFLOPS

``data`` writes OUT/data: a COCO subset (coco/), an ADE20K-layout subset (ade/), a flat JPEG folder
(jpegs/) and a two-class ImageFolder (classes/train, classes/val). Missing sources: JPEGs are
synthesised; detection and segmentation then have no data and their parts say so.
``record`` appends the outcome of one part to OUT/parts.jsonl (its log's tail when it failed).
``report`` writes OUT/report.json and OUT/report.md from the parts' outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np


def _subset_coco(src: Path, dst: Path, n_train: int, n_val: int) -> bool:
    if not (src / "annotations").is_dir():
        return False
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        ann = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        ids = {a["image_id"] for a in ann["annotations"]}  # images with boxes
        images = sorted((im for im in ann["images"] if im["id"] in ids), key=lambda im: im["id"])[:n]
        keep = {im["id"] for im in images}
        (dst / split).mkdir(parents=True, exist_ok=True)
        for im in images:
            os.symlink((src / split / im["file_name"]).resolve(), dst / split / im["file_name"])
        ann = {**ann, "images": images, "annotations": [a for a in ann["annotations"] if a["image_id"] in keep]}
        (dst / "annotations").mkdir(exist_ok=True)
        (dst / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))
    return True


def _subset_ade(src: Path, dst: Path, n_train: int, n_val: int) -> bool:
    if not (src / "images").is_dir():
        return False
    for split, n in (("training", n_train), ("validation", n_val)):
        for kind in ("images", "annotations"):
            (dst / kind / split).mkdir(parents=True, exist_ok=True)
        for path in sorted((src / "images" / split).glob("*.jpg"))[:n]:
            os.symlink(path.resolve(), dst / "images" / split / path.name)
            label = src / "annotations" / split / (path.stem + ".png")
            os.symlink(label.resolve(), dst / "annotations" / split / label.name)
    return True


def _jpegs(src: Path, dst: Path, n: int) -> str:
    from PIL import Image

    dst.mkdir(parents=True, exist_ok=True)
    found = sorted(src.glob("*.jpg"))[:n] if src.is_dir() else []
    for path in found:
        os.symlink(path.resolve(), dst / path.name)
    if found:
        return str(src)
    rng = np.random.default_rng(0)
    for i in range(n):  # smooth random pictures, camera-like size
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BICUBIC).save(dst / f"synthetic_{i:04d}.jpg", quality=90)
    return "synthetic"


def data(out: Path, coco: str, ade: str, jpegs: str, n_train: int, n_val: int) -> None:
    root = out / "data"
    shutil.rmtree(root, ignore_errors=True)
    info = {
        "coco": _subset_coco(Path(coco), root / "coco", n_train, n_val),
        "ade": _subset_ade(Path(ade), root / "ade", n_train, n_val),
        "jpegs": _jpegs(Path(jpegs), root / "jpegs", max(n_train * 8, 32)),
    }
    files = sorted((root / "jpegs").iterdir())
    for split, part in (("train", files[: len(files) // 2]), ("val", files[len(files) // 2 :])):
        for i, path in enumerate(part):
            folder = root / "classes" / split / f"class_{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), folder / path.name)
    (root / "data.json").write_text(json.dumps(info))
    print(json.dumps(info))


def record(out: Path, name: str, rc: int, seconds: float, limit: int) -> None:
    entry = {"part": name, "ok": rc == 0, "rc": rc, "timed_out": rc in (124, 137), "seconds": round(seconds, 1)}
    entry["limit_s"] = limit
    log = out / "logs" / f"{name}.log"
    if rc != 0 and log.exists():
        entry["log_tail"] = log.read_text(errors="replace").splitlines()[-15:]
    with open(out / "parts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_rate(records: list[dict], skip: int) -> float | None:
    """Mean images/s of the step lines after the first ``skip`` (start-up, allocator warm-up)."""
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][skip:]
    return sum(rates) / len(rates) if rates else None


def report(out: Path, peak_tflops: float) -> dict:
    parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines() if line.strip()]
    settings = _json(out / "settings.json") or {}
    rep: dict = {
        "settings": settings,
        "peak_tflops": peak_tflops,
        "parts": parts,
        "data": _json(out / "data/data.json"),
    }
    bench = []
    for name in ("bench_eager", "bench_compiled_swin", "bench_compiled_pvt"):
        rows = _json(out / f"{name}.json") or []
        bench += [{**r, "part": name} for r in rows]
    for r in bench:
        if r.get("flops_per_image"):
            r["mfu"] = r["images_per_s"] * r["flops_per_image"] / (peak_tflops * 1e12)
    rep["bench"] = bench
    flops = {r["model"]: r.get("flops_per_image") for r in bench if r.get("flops_per_image")}
    synthetic = {r["model"]: r["images_per_s"] for r in bench if not r.get("compiled") and r["part"] == "bench_eager"}
    pre = _metrics(out / "pretrain")
    model = settings.get("pretrain_model")
    e2e = _train_rate(pre, settings.get("skip_lines", 2))
    rep["pretrain"] = {
        "model": model,
        "steps": max((r.get("step", 0) for r in pre), default=0),
        "end_to_end_images_per_s": e2e,
        "synthetic_images_per_s": synthetic.get(model),
        "end_to_end_over_synthetic": e2e / synthetic[model] if e2e and synthetic.get(model) else None,
        "flops_per_image": flops.get(model),
        "mfu": e2e * flops[model] / (peak_tflops * 1e12) if e2e and flops.get(model) else None,
        "last_loss": next((r["loss"] for r in reversed(pre) if "loss" in r), None),
    }
    for name in ("finetune_ema", "gfl", "upernet", "fp16"):
        recs = _metrics(out / name)
        rep[name] = {
            "steps": max((r.get("step", 0) for r in recs), default=0),
            "last_loss": next((r.get("loss", r.get("train_loss")) for r in reversed(recs) if "loss" in r), None),
            "images_per_s": _train_rate(recs, 0),
        }
    rep["ok"] = all(p["ok"] for p in parts)
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(rep))
    return rep


def _f(v, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def _markdown(rep: dict) -> str:
    s = rep["settings"]
    lines = [
        "# gpu_check report",
        "",
        f"device {s.get('device_name')}, torch {s.get('torch')}, mode {s.get('mode')}, precision {s.get('precision')}, "
        f"batch {s.get('batch')}; MFU against {rep['peak_tflops']:g} TFLOP/s (H100 SXM bf16 dense peak).",
        "",
        "## Parts",
        "",
        "| part | ok | seconds (limit) | note |",
        "|---|---|---|---|",
    ]
    for p in rep["parts"]:
        note = (
            "timed out" if p["timed_out"] else ("" if p["ok"] else f"rc {p['rc']}: {(p.get('log_tail') or [''])[-1]}")
        )
        lines.append(f"| {p['part']} | {'yes' if p['ok'] else 'NO'} | {p['seconds']} ({p['limit_s']}) | {note} |")
    lines += [
        "",
        "## Training-step speed (synthetic batch)",
        "",
        "| model | compiled | images/s | ms/step | peak MiB | compile s | speedup | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["bench"]:
        lines.append(
            f"| {r['model']} | {'yes' if r.get('compiled') else 'no'} | {_f(r['images_per_s'])} | "
            f"{_f(r['step_time_ms'])} | {_f(r.get('peak_mem_mb'))} | {_f(r.get('compile_s'))} | "
            f"{_f(r.get('speedup'), '.2f')} | {_f(r.get('mfu'), '.1%')} |"
        )
    p = rep["pretrain"]
    lines += [
        "",
        "## Pre-training from tar shards (--input-pipeline device)",
        "",
        f"{p['model']}, {p['steps']} steps: end to end {_f(p['end_to_end_images_per_s'])} images/s, synthetic "
        f"{_f(p['synthetic_images_per_s'])} images/s (ratio {_f(p['end_to_end_over_synthetic'], '.2f')}), "
        f"{_f(p['flops_per_image'] and p['flops_per_image'] / 1e9)} GFLOP per image (forward + backward, "
        f"FlopCounterMode), MFU {_f(p['mfu'], '.1%')}, last loss {_f(p['last_loss'], '.4f')}.",
        "",
        "## One-step checks",
        "",
        "| part | steps | last loss |",
        "|---|---|---|",
    ]
    for name in ("finetune_ema", "gfl", "upernet", "fp16"):
        lines.append(f"| {name} | {rep[name]['steps']} | {_f(rep[name]['last_loss'], '.4f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    cmd, out = argv[0], Path(argv[1])
    if cmd == "data":
        data(out, argv[2], argv[3], argv[4], int(argv[5]), int(argv[6]))
    elif cmd == "record":
        record(out, argv[2], int(argv[3]), float(argv[4]), int(argv[5]))
    elif cmd == "report":
        rep = report(out, float(argv[2]))
        print((out / "report.md").read_text())
        sys.exit(0 if rep["ok"] else 1)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
