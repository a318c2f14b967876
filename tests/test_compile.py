"""``--compile`` (issue 27): the model call of every family compiles to one graph without a
graph break (``fullgraph=True`` refuses any), the compiled model computes what the eager one
does (loss and every gradient, fp32), and a training run compiles once: no recompile across
steps, epochs, an EMA update, an evaluation pass, a checkpoint and a resume.

The tests compile with the ``aot_eager`` backend: dynamo captures the forward, AOTAutograd the
backward, as inductor gets them, without inductor's code generation (seconds, not minutes)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from _helpers import smooth_images, tiny_finetune_config, tiny_pretrain_config, write_colour_dataset
from ummae.engine.trainer import compiled
from ummae.models.dense import build_stage_maps
from ummae.models.registry import create_model
from ummae.tasks.classify import finetune
from ummae.tasks.pretrain import pretrain

BACKEND = "aot_eager"


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _pretrain_call(name: str, **kw):
    """A pre-training model and its call as the training step makes it: masks drawn first,
    from a generator, outside the call."""
    model = create_model(name, **kw)
    imgs = _images(2, model.img_size, 1)
    mask, sm_mask = model.sample_masks(2, imgs.device, torch.Generator().manual_seed(3))
    return model, (imgs,), dict(mask=mask, sm_mask=sm_mask, validate=False), lambda out: out["loss"]


def _classifier_call(name: str):
    model = create_model(name, num_classes=5, drop_path=0.0)
    targets = torch.tensor([1, 4])
    return model, (_images(2, 64, 1),), {}, lambda out: torch.nn.functional.cross_entropy(out, targets)


def _stage_maps_call(backbone: str):
    model = build_stage_maps(backbone, 64, out_channels=32, drop_path=0.0)
    return model, (_images(2, 64, 1),), {}, lambda out: sum(m.square().mean() for m in out.values())


def _detector_region_call():
    """A detector compiles its ``compile_region`` (backbone + FPN), not the whole model."""
    det = create_model("gfl_pvt_test", num_classes=3, img_size=64, neck_channels=32, fpn_channels=32, drop_path=0.0)
    region = det.get_submodule(det.compile_region)
    return region, (_images(2, 64, 1),), {}, lambda out: sum(m.square().mean() for m in out.values())


CALLS = {
    "um-mae swin": lambda: _pretrain_call("mae_swin_test"),
    "um-mae pvt": lambda: _pretrain_call("mae_pvt_test"),
    "um-mae vit": lambda: _pretrain_call("mae_vit_test"),
    "mae vit random sampling": lambda: _pretrain_call("mae_vit_test", sampling="random", sm_ratio=0.0),
    "simmim swin": lambda: _pretrain_call("simmim_swin_test"),
    "simmim pvt": lambda: _pretrain_call("simmim_pvt_test"),
    "classifier swin": lambda: _classifier_call("swin_test"),
    "classifier pvt": lambda: _classifier_call("pvt_test"),
    "classifier vit": lambda: _classifier_call("vit_test"),
    "stage maps swin": lambda: _stage_maps_call("swin_test"),
    "gfl compile region (stage maps pvt + fpn)": _detector_region_call,
}


@pytest.mark.parametrize("family", list(CALLS))
def test_compile__one_graph_no_break_and_equal_to_eager(family):
    torch.manual_seed(0)
    model, args, kwargs, loss_of = CALLS[family]()
    model.train()
    twin = copy.deepcopy(model)
    eager_loss = loss_of(model(*args, **kwargs))
    eager_loss.backward()

    dynamo.reset()
    counters.clear()
    fast = torch.compile(twin, backend=BACKEND, fullgraph=True)  # fullgraph: a graph break raises
    loss = loss_of(fast(*args, **kwargs))
    loss.backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])

    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    twin_grads = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    assert grads.keys() == twin_grads.keys() and grads
    for n, g in grads.items():
        torch.testing.assert_close(twin_grads[n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"gradient of {n}: {m}")


_pretrain_cfg = functools.partial(
    tiny_pretrain_config,
    epochs=2,
    vis_every=1,  # an evaluation pass (the reconstruction pictures) after every epoch
    vis_images=2,
    save_every_steps=2,  # checkpoints inside the epoch too
)


def _compiles_once(run) -> None:
    """``run()`` compiles exactly one frame into one graph: any recompile raises."""
    with dynamo.config.patch(error_on_recompile=True):
        run()
    assert counters["frames"]["total"] == 1, dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile__pretrain_compiles_once_across_epochs_evaluation_checkpoints_and_resume(tmp_path):
    data = smooth_images(tmp_path / "data", 16)
    dynamo.reset()
    counters.clear()
    out = tmp_path / "compiled"
    cfg = dict(compile=True, compile_backend=BACKEND)
    # 2 epochs of 4 steps, masks of another pattern every step, pictures after each epoch,
    # checkpoints every 2 steps; then a resumed run (a new model and Trainer) for a third epoch
    _compiles_once(lambda: pretrain(_pretrain_cfg(out, data, **cfg)))
    _compiles_once(lambda: pretrain(_pretrain_cfg(out, data, epochs=3, resume="auto", **cfg)))

    eager = tmp_path / "eager"  # the same runs without --compile: the same weights
    pretrain(_pretrain_cfg(eager, data))
    pretrain(_pretrain_cfg(eager, data, epochs=3, resume="auto"))
    a = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(eager / "checkpoint-last.pth", weights_only=True)["model"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_compile__finetune_with_ema_compiles_once_across_evaluation_checkpoints_and_resume(tmp_path):
    data = write_colour_dataset(tmp_path / "data")  # 18 training images: 3 batches of 6
    values = dict(
        epochs=2,
        ema=True,  # an EMA update after every optimiser step, and an evaluation of it
        eval_every=1,
        save_every_steps=1,
        compile=True,
        compile_backend=BACKEND,
    )
    dynamo.reset()
    counters.clear()
    _compiles_once(lambda: finetune(tiny_finetune_config(tmp_path / "out", data, **values)))
    _compiles_once(
        lambda: finetune(tiny_finetune_config(tmp_path / "out", data, **{**values, "epochs": 3, "resume": "auto"}))
    )


def test_compile__a_detector_compiles_its_region_in_place_and_keeps_its_keys():
    det = create_model("gfl_swin_test", num_classes=3, img_size=64, neck_channels=32, fpn_channels=32)
    keys = list(det.state_dict())
    assert compiled(det, BACKEND) is det
    assert det.get_submodule(det.compile_region)._compiled_call_impl is not None
    assert list(det.state_dict()) == keys
