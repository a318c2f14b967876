"""Tests of the classifiers and the classification commands: the model surface (ours and
timm's), layer-wise lr decay groups, fine-tuning (learning, exact resume with mixup and EMA),
kNN and linear probing, evaluation (one process and two), and bad input at the command line.

Runs use the tiny ``*_test`` classifiers on 72 px images written by the tests themselves
(``_helpers``), with one intra-op thread (conftest).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import ummae
from _helpers import (
    assert_tensors_equal,
    run_torchrun,
    stable,
    tiny_finetune_config,
    write_colour_images,
    write_image,
    write_pattern_images,
)
from ummae.cli import main
from ummae.config import EvalConfig, FinetuneConfig, KnnConfig, LinprobeConfig
from ummae.engine.optim import param_groups
from ummae.evaluation.classification import knn_scores
from ummae.models.classifier import Classifier
from ummae.models.registry import create_model, list_models
from ummae.tasks import classify as finetune_module
from ummae.tasks.classify import finetune, linprobe, load_classifier, run_eval
from ummae.tasks.knn import run_knn
from ummae.weights import io as ckpt
from ummae.weights.export import export

CLASSIFIERS = list_models("*_test", kind="classify")


def _records(out: Path) -> list:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _epoch_records(out: Path) -> list:
    return [r for r in _records(out) if "train_loss" in r]


_ft_cfg = tiny_finetune_config


# ---------------------------------------------------------------- the model surface


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier__forward_backward_features_and_head_init(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, drop_path=0.0)
    assert isinstance(model, Classifier) and model.num_classes == 7
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    logits = model(x)
    assert logits.shape == (2, 7)
    F.cross_entropy(logits, torch.tensor([1, 5])).backward()
    no_grad = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not no_grad, f"parameters without a gradient: {no_grad}"

    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert feats.shape == (2, model.num_features)
        torch.testing.assert_close(model.head(feats), model(x))  # logits = head(pre-logits)
    assert model.get_classifier() is model.head
    w = model.head.weight
    assert w.shape == (7, model.num_features) and 1.6e-5 < w.std().item() < 2.4e-5  # MAE: std 2e-5
    assert torch.equal(model.head.bias, torch.zeros(7))
    assert isinstance(model.encoder.norm, nn.Identity)  # pooled features are normed by fc_norm


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_timm_create_model__gives_the_same_classifier(name):
    assert f"ummae_{name}" in ummae.register_timm()  # the one explicit step
    assert f"ummae_{name}" in timm.list_models("ummae_*")
    torch.manual_seed(0)
    ours = create_model(name, num_classes=7)
    torch.manual_seed(0)
    theirs = timm.create_model(f"ummae_{name}", num_classes=7)
    assert type(theirs) is type(ours) is Classifier
    assert theirs.model_name == name and theirs.num_classes == 7
    assert_tensors_equal(theirs.state_dict(), ours.state_dict(), "state")
    assert timm.create_model(f"ummae_{name}", num_classes=2, drop_path_rate=0.3).encoder.drop_path_rate == 0.3


def test_classifier__reset_classifier_and_probe_head():
    model = create_model("swin_test", num_classes=5)
    model.reset_classifier(9)
    assert model.num_classes == 9 and model.head.out_features == 9 and model(torch.randn(1, 3, 64, 64)).shape == (1, 9)
    model.reset_classifier(0)
    assert isinstance(model.head, nn.Identity) and model(torch.randn(1, 3, 64, 64)).shape == (1, model.num_features)
    with pytest.raises(ValueError, match="average pooling"):
        model.reset_classifier(3, global_pool="token")

    probe = create_model("swin_test", num_classes=5)
    probe.use_probe_head()
    trainable = [n for n, p in probe.named_parameters() if p.requires_grad]
    assert trainable == ["head.1.weight", "head.1.bias"]
    bn = probe.head[0]
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine
    assert probe.model_args["probe_head"] is True


# ---------------------------------------------------------------- layer-wise lr decay


# (name prefix, depth from the top: lr_scale = decay ** depth); the first matching prefix wins
LAYER_DEPTHS = {
    "swin_test": [  # depths (2, 1, 1, 1): 5 layers
        ("encoder.patch_embed.", 6),
        ("encoder.patch_norm.", 6),
        # a down-sampling layer goes with the first block after it (the reference's blocks hold it)
        ("encoder.stages.0.0.", 5),
        ("encoder.stages.0.1.", 4),
        ("encoder.downsamples.0.", 3),
        ("encoder.stages.1.0.", 3),
        ("encoder.downsamples.1.", 2),
        ("encoder.stages.2.0.", 2),
        ("encoder.downsamples.2.", 1),
        ("encoder.stages.3.0.", 1),
        ("fc_norm.", 0),
        ("head.", 0),
    ],
    "pvt_test": [  # depths (1, 1, 1, 1): 4 layers; the position table is part of the embedding
        ("encoder.patch_embed.", 5),
        ("encoder.pos_embed", 5),
        ("encoder.stages.0.0.", 4),
        ("encoder.downsamples.0.", 3),
        ("encoder.stages.1.0.", 3),
        ("encoder.downsamples.1.", 2),
        ("encoder.stages.2.0.", 2),
        ("encoder.downsamples.2.", 1),
        ("encoder.stages.3.0.", 1),
        ("fc_norm.", 0),
        ("head.", 0),
    ],
    "vit_test": [  # depth 2: embeddings, blocks.0, blocks.1, head
        ("encoder.patch_embed.", 3),
        ("encoder.cls_token", 3),
        ("encoder.pos_embed", 3),  # and pos_embed_cls
        ("encoder.blocks.0.", 2),
        ("encoder.blocks.1.", 1),
        ("fc_norm.", 0),
        ("head.", 0),
    ],
}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_param_groups__layer_decay_scales_and_weight_decay(name):
    decay = 0.5
    model = create_model(name, num_classes=3)
    assert model.num_layers == {"swin_test": 5, "pvt_test": 4, "vit_test": 2}[name]
    groups = param_groups(model, 0.05, layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) and set(seen) == set(names.values())  # each parameter exactly once
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            depth = next((d for prefix, d in LAYER_DEPTHS[name] if n.startswith(prefix)), None)
            assert depth is not None, f"{n} is in no layer of the table"
            assert g["lr_scale"] == decay**depth, f"{n}: lr_scale {g['lr_scale']} != {decay}**{depth}"
            exempt = p.ndim <= 1 or "pos_embed" in n or n.endswith("token")
            assert g["weight_decay"] == (0.0 if exempt else 0.05), n
    assert {g["lr_scale"] for g in param_groups(model, 0.05)} == {1.0}  # no layer decay: full lr


def test_finetune__optimizer_applies_the_models_layer_decay(finetuned):
    state = ckpt.load(finetuned / "checkpoint-last.pth")
    groups = state["optimizer"]["param_groups"]
    depths = sorted({round(math.log(g["lr_scale"]) / math.log(0.85)) for g in groups})
    assert depths == list(range(7))  # swin_test's default 0.85 over its 5 layers + embedding + head
    last_lr = [r for r in _records(finetuned) if "lr" in r][-1]["lr"]
    for g in groups:
        assert g["lr"] == pytest.approx(last_lr * g["lr_scale"], rel=1e-12)


# ---------------------------------------------------------------- fine-tuning learns


def test_finetune__memorises_a_few_images(tmp_path):
    """Twelve images whose classes differ by structure only (stripes / checker in random
    colours), evaluated on the same images: training accuracy with the eval transform."""
    few = write_pattern_images(tmp_path / "few", per_class=4)
    out = tmp_path / "o"
    summary = finetune(
        _ft_cfg(
            out,
            few,
            val_data=str(few),
            epochs=40,
            warmup_epochs=1,
            batch_size=4,
            mixup=0.0,
            cutmix=0.0,
            smoothing=0.0,
            auto_augment="none",
            reprob=0.0,
            drop_path=0.0,
            eval_every=0,
            log_every=100,
        )
    )
    assert summary["val_images"] == 12
    assert summary["acc1"] == 100.0, summary
    losses = [r["train_loss"] for r in _epoch_records(out)]
    assert len(losses) == 40 and min(losses[-5:]) < 0.3 * losses[0], losses


# ---------------------------------------------------------------- kNN and linear probing


def _knn_reference(train, labels, queries, num_classes, k, temperature):
    """Weighted kNN one query at a time: cosine similarity to every training vector, the k
    most similar vote for their class with weight exp(sim / T)."""
    out = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for i, q in enumerate(queries.double()):
        sims = []
        for t, y in zip(train.double(), labels.tolist(), strict=True):
            sims.append((float(q @ t / (q.norm() * t.norm())), y))
        sims.sort(key=lambda s: -s[0])
        for s, y in sims[:k]:
            out[i, y] += math.exp(s / temperature)
    return out


def test_knn_scores__matches_a_loop_and_separates_clusters():
    g = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.randn(3, 16, generator=g)
    labels = torch.arange(3).repeat_interleave(10)
    train = centres[labels] + torch.randn(30, 16, generator=g)
    q_labels = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    queries = centres[q_labels] + torch.randn(7, 16, generator=g)
    for k, temperature in ((5, 0.07), (12, 0.5), (50, 0.1)):  # k > 30 training vectors: all of them
        scores = knn_scores(train, labels, queries, 3, k=k, temperature=temperature)
        ref = _knn_reference(train, labels, queries, 3, min(k, 30), temperature)
        torch.testing.assert_close(scores.double(), ref, rtol=1e-4, atol=0)
        assert torch.equal(scores.argmax(1), q_labels)  # 100% on well-separated clusters
        chunked = knn_scores(train, labels, queries, 3, k=k, temperature=temperature, chunk=2)
        torch.testing.assert_close(chunked, scores)
    scores = knn_scores(train, labels, queries, 5, k=3)  # classes without training images score 0
    assert scores.shape == (7, 5) and torch.equal(scores[:, 3:], torch.zeros(7, 2))


def test_run_knn__separates_colour_classes(colour_data, pretrain_ckpt, tmp_path):
    path = pretrain_ckpt("mae_swin_test")
    result = run_knn(
        KnnConfig(model="swin_test", pretrained=str(path), data=str(colour_data), k=5, num_workers=0, device="cpu")
    )
    assert (result["train_images"], result["val_images"]) == (18, 9)
    assert result["knn_acc1"] >= 90.0, result
    st = tmp_path / "enc.safetensors"
    export(path, st)  # the exported encoder gives the same features
    assert (
        run_knn(
            KnnConfig(model="swin_test", pretrained=str(st), data=str(colour_data), k=5, num_workers=0, device="cpu")
        )
        == result
    )


def test_run_knn__uses_the_temperature_it_is_given(colour_data, pretrain_ckpt, monkeypatch):
    """Features placed by hand (the encoder's outputs are replaced; the images and their
    labels are the data's: 6 training and 3 val images per class, training ones first). A val
    image of class c sits at e_c; its 3 nearest training images are two of class c at cosine 0.9
    and one of class c + 1 at 0.99, every other training image is orthogonal to it. Weighted by
    exp(sim / T): at T = 1, 2 e^0.9 = 4.9 > e^0.99 = 2.7, class c wins (top-1 100 %); at
    T = 0.05, 2 e^18 = 1.3e8 < e^19.8 = 4.0e8, class c + 1 wins (0 %)."""
    import collections

    import ummae.tasks.knn as knn_module

    def unit(**at: float) -> torch.Tensor:  # e.g. unit(d0=0.9, d3=0.43): a 10-d vector
        v = torch.zeros(10)
        for name, x in at.items():
            v[int(name[1:])] = x
        return v

    def placed_features(seen: collections.Counter):
        def features(model, batch, device):
            rows = []
            for y in batch[1].tolist():
                if seen.total() < 18:  # a training image: the i-th of its class
                    i, c = seen[y], (y - 1) % 3
                    seen[y] += 1
                    if i < 2:
                        rows.append(unit(**{f"d{y}": 0.9, f"d{3 + y}": math.sqrt(1 - 0.81)}))
                    elif i == 2:  # the intruder among the neighbours of class c's val images
                        rows.append(unit(**{f"d{c}": 0.99, f"d{6 + c}": math.sqrt(1 - 0.99**2)}))
                    else:
                        rows.append(unit(d9=1.0))
                else:
                    rows.append(unit(**{f"d{y}": 1.0}))
            return torch.stack(rows)

        return features

    results = {}
    for temperature in (1.0, 0.05):
        monkeypatch.setattr(knn_module, "model_outputs", placed_features(collections.Counter()))
        results[temperature] = run_knn(
            KnnConfig(
                model="swin_test",
                pretrained=str(pretrain_ckpt("mae_swin_test")),
                data=str(colour_data),
                k=3,
                temperature=temperature,
                num_workers=0,
                device="cpu",
            )
        )["knn_acc1"]
    assert results == {1.0: 100.0, 0.05: 0.0}


def test_evaluation_and_knn_features__log_progress_lines_without_a_terminal(
    colour_data, pretrain_ckpt, caplog, monkeypatch
):
    """Without a terminal (as under pytest) the evaluation loops report through the one
    progress helper: a line with the count so far every ``log_every`` items, and a last line
    with the total and the elapsed time."""
    import functools

    import ummae.evaluation.base as loop_module
    from ummae.engine.progress import progress

    monkeypatch.setattr(loop_module, "progress", functools.partial(progress, log_every=1))
    model = create_model("swin_test", num_classes=3, drop_path=0.0)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    with caplog.at_level("INFO", logger="ummae"):
        finetune_module.evaluate(model, [(images, labels, 0)] * 3, torch.device("cpu"), "fp32")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluation: ")]
    assert [line.split(" (")[0] for line in lines[:2]] == ["evaluation: 1/3 batch", "evaluation: 2/3 batch"], lines
    assert lines[2].startswith("evaluation: 3 batch in "), lines
    caplog.clear()
    with caplog.at_level("INFO", logger="ummae"):
        run_knn(
            KnnConfig(
                model="swin_test",
                pretrained=str(pretrain_ckpt("mae_swin_test")),
                data=str(colour_data),
                k=5,
                batch_size=8,
                num_workers=0,
                device="cpu",
            )
        )
    done = [r.getMessage().split(" in ")[0] for r in caplog.records if " batch in " in r.getMessage()]
    assert done == ["kNN features (train): 3 batch", "kNN features (val): 2 batch"], done  # 18 and 9 images


def test_linprobe__frozen_encoder_separates_colour_classes(colour_data, pretrain_ckpt, tmp_path):
    # LARS scales each step of the head's weight to lr * 0.001 * |w| (MAE's trust ratio): a
    # linear probe on 18 images needs a large lr and a few dozen steps.
    path = pretrain_ckpt("mae_swin_test")
    out = tmp_path / "lp"
    summary = linprobe(
        LinprobeConfig(
            model="swin_test",
            pretrained=str(path),
            data=str(colour_data),
            output=str(out),
            epochs=30,
            warmup_epochs=1,
            batch_size=6,
            lr=1.0,
            num_workers=0,
            device="cpu",
            eval_every=0,
            log_every=100,
        )
    )
    assert summary["acc1"] >= 90.0, summary
    state = ckpt.load(out / "checkpoint-last.pth")["model"]
    src = ckpt.load(path)["model"]
    frozen = [k for k in state if k.startswith("encoder.") and not torch.equal(state[k], src[k])]
    assert not frozen, f"the probe changed encoder weights: {frozen[:5]}"
    assert {"head.0.running_mean", "head.1.weight"} <= set(state) and "head.0.weight" not in state
    # the probe's checkpoint evaluates as it was validated (BatchNorm statistics included)
    result = run_eval(
        EvalConfig(
            model="swin_test",
            checkpoint=str(out / "checkpoint-last.pth"),
            data=str(colour_data),
            num_workers=0,
            device="cpu",
        )
    )
    assert result["acc1"] == summary["acc1"] and result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)


# ---------------------------------------------------------------- exact resume


class SimulatedCrash(Exception):
    pass


def test_finetune__exact_resume_with_mixup_and_ema(colour_data, tmp_path, monkeypatch):
    # 18 images, batch 4: 4 steps per epoch; checkpoints at updates 2, 4 (epoch end), 6, ...
    # Drop path (on by default in fine-tuning) draws from torch's global RNG: a high rate makes
    # any difference in that stream after the resume show in the losses.
    kw = dict(
        epochs=3,
        warmup_epochs=1,
        batch_size=4,
        mixup=0.8,
        cutmix=1.0,
        ema=True,
        ema_decay=0.9,
        drop_path=0.3,
        save_every_steps=2,
        eval_every=1,
    )
    ref = tmp_path / "ref"
    finetune(_ft_cfg(ref, colour_data, **kw))

    real = finetune_module.ClassifyStep.__call__
    calls = {"n": 0}

    def crash_at_8(self, model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 8:
            raise SimulatedCrash("power cut at step 8")
        return real(self, model, batch, generator)

    out = tmp_path / "killed"
    monkeypatch.setattr(finetune_module.ClassifyStep, "__call__", crash_at_8)
    with pytest.raises(SimulatedCrash):
        finetune(_ft_cfg(out, colour_data, **kw))
    state = ckpt.load(out / "checkpoint-last.pth")
    assert (state["epoch"], state["step_in_epoch"], state["update"]) == (1, 2, 6) and "ema" in state
    assert [r["step"] for r in _records(out)][-1] == 7  # a line past the checkpoint

    monkeypatch.undo()
    finetune(_ft_cfg(out, colour_data, resume="auto", **kw))
    rec_ref, rec_out = stable(_records(ref)), stable(_records(out))
    assert [r["step"] for r in rec_out] == [r["step"] for r in rec_ref]
    for a, b in zip(rec_ref, rec_out, strict=True):
        assert a == b, f"metrics differ at step {a['step']}: {a} vs {b}"
    assert all("ema_acc1" in r for r in _epoch_records(out))
    a, b = ckpt.load(ref / "checkpoint-last.pth"), ckpt.load(out / "checkpoint-last.pth")
    assert_tensors_equal(a["model"], b["model"], "model")
    assert_tensors_equal(a["ema"], b["ema"], "ema")
    assert_tensors_equal(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer.state")
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["model"])  # the EMA is its own state


# ---------------------------------------------------------------- eval


def test_run_eval__reproduces_the_fine_tune_validation(finetuned, colour_data):
    logged = _epoch_records(finetuned)[-1]
    result = run_eval(
        EvalConfig(
            model="swin_test",
            checkpoint=str(finetuned / "checkpoint-last.pth"),
            data=str(colour_data),
            batch_size=4,
            num_workers=0,
            device="cpu",
        )
    )
    assert result["val_images"] == logged["val_images"] == 9
    assert result["acc1"] == logged["acc1"] and result["acc5"] == logged["acc5"]
    assert result["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


def test_run_eval__exported_classifier_gives_the_same_result(finetuned, colour_data, tmp_path):
    st = tmp_path / "clf.safetensors"
    export(finetuned / "checkpoint-last.pth", st)
    results = [
        run_eval(EvalConfig(model="swin_test", checkpoint=str(p), data=str(colour_data), num_workers=0, device="cpu"))
        for p in (finetuned / "checkpoint-last.pth", st)
    ]
    assert results[0] == results[1]


def test_run_eval__ema_weights_on_request(finetuned, colour_data, tmp_path):
    out = tmp_path / "ema_run"
    finetune(_ft_cfg(out, colour_data, epochs=2, ema=True, ema_decay=0.5, drop_path=0.0))
    logged = _epoch_records(out)[-1]
    assert logged["ema_acc1"] is not None
    ck = out / "checkpoint-last.pth"

    def evaluate_file(path, **kw):
        return run_eval(
            EvalConfig(
                model="swin_test", checkpoint=str(path), data=str(colour_data), num_workers=0, device="cpu", **kw
            )
        )

    ema = evaluate_file(ck, ema=True)
    assert ema["acc1"] == logged["ema_acc1"] and ema["val_loss"] == pytest.approx(logged["ema_val_loss"], rel=1e-5)
    assert evaluate_file(ck)["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    assert ema["val_loss"] != pytest.approx(logged["val_loss"], rel=1e-5)  # the two sets of weights differ
    exported = tmp_path / "ema.safetensors"
    assert export(ck, exported, ema=True)["weights"] == "ema"
    assert evaluate_file(exported) == ema
    with pytest.raises(ckpt.CheckpointError, match="holds no EMA weights"):
        evaluate_file(finetuned / "checkpoint-last.pth", ema=True)
    with pytest.raises(ckpt.CheckpointError, match="--ema applies to fine-tuning checkpoints"):
        evaluate_file(exported, ema=True)


def test_run_eval__pretraining_checkpoint_refused(colour_data, pretrain_ckpt, tmp_path):
    path = pretrain_ckpt("mae_swin_test")
    cfg = EvalConfig(model="swin_test", checkpoint=str(path), data=str(colour_data), num_workers=0, device="cpu")
    with pytest.raises(ckpt.CheckpointError, match=r"holds no classifier head \(model mae_swin_test\)"):
        run_eval(cfg)
    enc = tmp_path / "enc.safetensors"
    export(path, enc)
    with pytest.raises(ckpt.CheckpointError, match="holds no classifier head"):
        run_eval(EvalConfig(model="swin_test", checkpoint=str(enc), data=str(colour_data), num_workers=0, device="cpu"))


def test_run_eval__model_built_with_the_fine_tuned_window(colour_data, tmp_path):
    out = tmp_path / "w4"
    finetune(_ft_cfg(out, colour_data, window_size=4, epochs=2, mixup=0.0, cutmix=0.0))
    path = out / "checkpoint-last.pth"
    assert ckpt.load(path)["model_args"]["window_size"] == 4
    model = load_classifier(EvalConfig(model="swin_test", checkpoint=str(path), data=str(colour_data)), str(path))
    assert model.encoder.window_size == 4, "eval runs another model than the one fine-tuned"
    result = run_eval(
        EvalConfig(model="swin_test", checkpoint=str(path), data=str(colour_data), num_workers=0, device="cpu")
    )
    assert result["val_loss"] == pytest.approx(_epoch_records(out)[-1]["val_loss"], rel=1e-6)


def test_run_eval__torchrun_two_gloo_processes_match_one(finetuned, colour_data):
    path = finetuned / "checkpoint-last.pth"
    args = [
        "eval",
        "--model",
        "swin_test",
        "--checkpoint",
        str(path),
        "--data",
        str(colour_data),
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    one = run_eval(
        EvalConfig(
            model="swin_test", checkpoint=str(path), data=str(colour_data), batch_size=2, num_workers=0, device="cpu"
        )
    )
    proc = run_torchrun(args, timeout=300)
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed, proc.stdout
    two = printed[0]
    assert two["val_images"] == one["val_images"] == 9  # odd: one rank has 5 images, the other 4
    assert (two["acc1"], two["acc5"]) == (one["acc1"], one["acc5"])
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    assert len(printed) == 1, f"the result is printed once per process:\n{proc.stdout}"


# ---------------------------------------------------------------- bad input at the command line


def _error_line(capsys, argv) -> str:
    """``main(argv)`` returns 2 and prints exactly one ``ummae CMD: error:`` line on stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"ummae {argv[0]}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def bad_trees(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    flat = root / "flat"  # images, no class folders
    for i in range(4):
        write_image(flat / f"{i}.png", size=(72, 72), seed=i)
    mismatch = root / "mismatch"
    write_colour_images(mismatch / "train", 2)
    write_colour_images(mismatch / "val", 1)
    for p in (mismatch / "val" / "green").iterdir():
        p.unlink()
    (mismatch / "val" / "green").rmdir()
    return {"flat": flat, "mismatch": mismatch}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["finetune", "--model", "swin_test"], "fine-tuning needs labelled data: pass --data"),
        (["linprobe", "--model", "swin_test", "--data", "{colour}"], "linear probing needs --pretrained"),
        (
            ["finetune", "--model", "swin_test", "--data", "{colour}", "--layer-decay", "0"],
            "bad config value layer_decay=0.0: must be in (0, 1]",
        ),
        (["finetune", "--model", "swin_test", "--data", "{flat}"], "has no class sub-folders"),
        (
            ["finetune", "--model", "swin_test", "--data", "{mismatch}"],
            "differ from the training classes (2 vs 3; missing here: green)",
        ),
        (["finetune", "--model", "mae_swin_test", "--data", "{colour}"], "'mae_swin_test' is a pre-training model"),
        (
            ["knn", "--model", "mae_swin_test", "--data", "{colour}", "--pretrained", "{ckpt}"],
            "'mae_swin_test' is a pre-training model",
        ),
        (["eval", "--model", "swin_test", "--data", "{colour}"], "evaluation needs --checkpoint"),
        (["eval", "--model", "swin_test", "--data", "{colour}", "--checkpoint", "{ckpt}"], "holds no classifier head"),
    ],
)
def test_cli_classify__bad_input_one_error_line(
    capsys, tmp_path, colour_data, pretrain_ckpt, bad_trees, argv, expected
):
    values = {"colour": colour_data, "ckpt": pretrain_ckpt("mae_swin_test"), **bad_trees}
    argv = [a.format(**{k: str(v) for k, v in values.items()}) for a in argv]
    out = tmp_path / "out"
    if argv[0] in ("finetune", "linprobe"):
        argv += ["--output", str(out)]
    line = _error_line(capsys, argv + ["--num-workers", "0", "--device", "cpu"])
    assert expected in line, line
    assert not out.exists()  # refused before anything was written


def test_finetune_and_knn__val_figures_from_training_images_are_flagged(tmp_path, pretrain_ckpt, colour_data, caplog):
    """Data without a val/ split: the 'val' figures are the training images'. Said at every
    report (a warning) and recorded beside the numbers (``val_is_train``); never with a split."""
    from _helpers import write_colour_images

    flat = write_colour_images(tmp_path / "no_split", per_class=4)
    out = tmp_path / "ft"
    with caplog.at_level("WARNING", logger="ummae"):
        finetune(
            FinetuneConfig(
                model="swin_test",
                pretrained=str(pretrain_ckpt("mae_swin_test")),
                data=str(flat),
                output=str(out),
                epochs=2,
                warmup_epochs=0,
                batch_size=6,
                lr=1e-3,
                num_workers=0,
                device="cpu",
                keep_every=0,
                eval_every=1,
            )
        )
    evals = [r for r in _epoch_records(out) if "acc1" in r]
    assert len(evals) == 2 and all(r["val_is_train"] == 1.0 for r in evals)
    assert sum("measured on the TRAINING images" in m for m in caplog.messages) == 2
    result = run_knn(
        KnnConfig(
            model="swin_test",
            pretrained=str(pretrain_ckpt("mae_swin_test")),
            data=str(flat),
            k=3,
            num_workers=0,
            device="cpu",
        )
    )
    assert result["val_is_train"] is True
    # with a val split: nothing of the kind
    caplog.clear()
    out2 = tmp_path / "ft2"
    with caplog.at_level("WARNING", logger="ummae"):
        finetune(
            FinetuneConfig(
                model="swin_test",
                pretrained=str(pretrain_ckpt("mae_swin_test")),
                data=str(colour_data),
                output=str(out2),
                epochs=1,
                warmup_epochs=0,
                batch_size=6,
                lr=1e-3,
                num_workers=0,
                device="cpu",
                keep_every=0,
            )
        )
    assert all("val_is_train" not in r for r in _epoch_records(out2))
    assert not any("TRAINING images" in m for m in caplog.messages)
