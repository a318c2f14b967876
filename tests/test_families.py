"""Model families (ummae.models.family): one registration per family gives every model name, the
classifier each pre-training model fine-tunes into, the fine-tuning defaults, the docs' table,
and the tables the importer matches a reference checkpoint's shapes against. Every enumeration
comes from the registry: a size added to a family's table is covered by each test here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch

from _reference_layout import frozen_keys, reference_shapes
from ummae.choices import HEAD_KINDS, MODEL_KINDS
from ummae.cli import main
from ummae.config.recipes import RECIPES
from ummae.models.family import families
from ummae.models.registry import (
    classifier_for,
    create_model,
    list_models,
    markdown_table,
    model_info,
    model_kind,
    parameter_count,
    registered_kinds,
)
from ummae.weights.convert import convert_checkpoint


def _expected() -> dict[str, tuple[str, str, dict | None]]:
    """name -> (kind, its classifier, its UM-MAE decoder) as the naming scheme gives them for
    each size of each family, written out here: ``mae_F_S`` (and ``mae_F_S_<suffix>`` per
    further decoder), ``simmim_F_S`` (pyramid families), ``F_S``."""
    out = {}
    for fam in families().values():
        for key, size in fam.sizes.items():
            clf = f"{fam.name}_{key}"
            out[clf] = ("classify", clf, None)
            out[f"mae_{clf}"] = ("pretrain", clf, size.decoder)
            for suffix, decoder in size.decoders.items():
                out[f"mae_{clf}_{suffix}"] = ("pretrain", clf, decoder)
            if fam.simmim:
                out[f"simmim_{clf}"] = ("pretrain", clf, None)
    return out


EXPECTED = _expected()


def _meta(name: str, **kw) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only
        return create_model(name, **kw)


def test_families__every_size_registers_its_names_and_nothing_else():
    assert set(EXPECTED) == set(list_models())
    assert {"mae_swin_small_256", "simmim_swin_small_256", "swin_small_256"} <= set(EXPECTED)
    for name, (kind, clf, _) in EXPECTED.items():
        assert model_kind(name) == kind and model_info(name).classifier == clf


@pytest.mark.parametrize("name", list_models(kind="pretrain"))
def test_classifier_for__the_classifier_carries_the_pretraining_encoder(name):
    """The registered pairing: the classifier has every encoder tensor of the pre-training model
    at its shape (its weights load with no missing or unexpected encoder key); the classifier
    only adds learnable position tables and drops the final norm (pooled features are normed
    by fc_norm instead)."""
    clf = classifier_for(name)
    assert clf == EXPECTED[name][1] and model_kind(clf) == "classify"
    pre = {k: v.shape for k, v in _meta(name).state_dict().items() if k.startswith("encoder.")}
    fine = {k: v.shape for k, v in _meta(clf).state_dict().items() if k.startswith("encoder.")}
    assert set(pre) - set(fine) == {"encoder.norm.weight", "encoder.norm.bias"}
    assert set(fine) - set(pre) <= {"encoder.pos_embed", "encoder.pos_embed_cls"}
    assert {k: s for k, s in pre.items() if k in fine} == {k: s for k, s in fine.items() if k in pre}


def test_classifier_for__refuses_a_classifier():
    with pytest.raises(ValueError, match="not a pre-training model"):
        classifier_for("swin_small_256")


def _reference_spec(name: str, kind: str) -> dict:
    """The reference layout (tests/_reference_layout.py) of a registered model, from its
    family's table: what a reference checkpoint of that architecture holds."""
    info = model_info(name)
    size = families()[info.family].sizes[info.size]
    a = size.arch
    if info.family == "swin":
        dims = [a["embed_dim"] * 2**i for i in range(len(a["depths"]))]
        spec = dict(dims=dims, depths=list(a["depths"]), heads=list(a["num_heads"]), posmlp=a["pos_hidden"])
    elif info.family == "pvt":
        spec = dict(dims=list(a["embed_dims"]), depths=list(a["depths"]), heads=list(a["num_heads"]))
        spec["mlp_ratios"] = list(a["mlp_ratios"])
    else:
        spec = dict(dim=a["embed_dim"], depth=a["depth"], heads=a["num_heads"], patch=a["patch_size"])
    spec.update(family=info.family, kind=kind, img_size=size.img_size, sm=True)
    decoder = EXPECTED[name][2]
    if kind == "mae":
        spec["decoder"] = (decoder["decoder_dim"], decoder["decoder_depth"])
    return spec


def _identified(spec: dict) -> str | None:
    """The model the importer names for a reference checkpoint of ``spec`` ("meta" tensors:
    shapes only; the sin-cos tables, whose values it checks, left out)."""
    state = {k: torch.empty(s, device="meta") for k, s in reference_shapes(spec).items() if k not in frozen_keys(spec)}
    return convert_checkpoint({"model": state, "args": {}}, "ref.pth")[1]["model_name"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_convert__every_registered_model_is_identified_by_its_shapes(name):
    """Without ``args.model``, the shapes alone name exactly this model: no two registered
    models share them (Swin-S and Swin-T share widths and heads)."""
    method = model_info(name).method
    if method == "classifier":
        assert _identified(_reference_spec(name, "classifier")) == name
        assert _identified(_reference_spec(name, "encoder")) == name  # an encoder-only file: its classifier
    else:
        assert _identified(_reference_spec(name, "mae" if method == "UM-MAE" else "simmim")) == name


def test_swin_small__parameters_counted_per_component():
    """swin_small_256 has 49,567,522 parameters; timm's swin_small (the issue's 49.6 M) has
    49,606,258. Counted here layer by layer, the 38,736 between them are the relative position
    bias (timm: a (2*7-1)^2 table per head and block, 47,658; ours: the reference's pos-MLP
    2->32->heads per block, 11,610) and the patch merging (timm: LayerNorm(4C) + Linear 4C->2C
    without bias; ours, the reference's: LayerNorm(C) + 2x2 conv C->2C with bias: 4C fewer)."""
    dims, depths, heads, pm = [96, 192, 384, 768], [2, 2, 18, 2], [3, 6, 12, 24], 32

    def block(c, h, position_bias):
        norms, qkv, proj, mlp = 2 * 2 * c, 3 * c * c + 3 * c, c * c + c, (4 * c * c + 4 * c) + (4 * c * c + c)
        return norms + qkv + proj + mlp + position_bias(h)

    def total(position_bias, merge):
        patch = 3 * 4 * 4 * dims[0] + dims[0] + 2 * dims[0]  # 4x4 conv + LayerNorm
        blocks = sum(block(dims[s], heads[s], position_bias) * depths[s] for s in range(4))
        head = 2 * dims[-1] + dims[-1] * 1000 + 1000  # norm after pooling + 1000-class linear
        return patch + blocks + sum(merge(c) for c in dims[:-1]) + head

    def pos_mlp(h):
        return (2 * pm + pm) + (pm * h + h)

    def ours_merge(c):
        return 2 * c + (2 * c * c * 2 * 2 + 2 * c)

    def table(h):
        return (2 * 7 - 1) ** 2 * h

    def timm_merge(c):
        return 2 * 4 * c + 4 * c * 2 * c

    assert parameter_count("swin_small_256") == total(pos_mlp, ours_merge) == 49_567_522
    with torch.device("meta"):
        theirs = timm.create_model("swin_small_patch4_window7_224")
    assert sum(p.numel() for p in theirs.parameters()) == total(table, timm_merge) == 49_606_258


def test_swin_small__builds_and_runs_at_a_small_size():
    torch.manual_seed(0)
    clf = create_model("swin_small_256", img_size=64, num_classes=3)
    assert [len(s) for s in clf.encoder.stages] == [2, 2, 18, 2] and clf.encoder.window_size == 16
    with torch.no_grad():
        logits = clf(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    mae = create_model("mae_swin_small_256", img_size=64)
    with torch.no_grad():
        out = mae(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert out["pred"].shape == (2, 16, 16 * 16 * 3) and torch.isfinite(out["loss"])


def test_finetune_recipes__use_their_classifiers_registered_defaults():
    """The reference's fine-tuning rows (config/recipes.py, torch-free) and the classifiers'
    registered defaults are the same values: a recipe and ``--model`` alone train alike."""
    rows = [r for r in RECIPES.values() if r.command == "finetune"]
    assert rows
    for r in rows:
        model = _meta(r.values["model"])
        assert model.default_layer_decay == r.values["layer_decay"], r.name
        assert model.model_args["drop_path"] == r.values["drop_path"], r.name


def test_markdown_table__a_row_per_registered_model_from_its_table():
    rows = {line.split("|")[1].strip(" `"): line for line in markdown_table().splitlines()[2:]}
    assert set(rows) == set(list_models())
    row = rows["swin_small_256"]
    assert "depths 2-2-18-2" in row and "num_heads 3-6-12-24" in row and "window_size 16" in row
    assert "| 49.6 M |" in row and "| classify |" in row
    assert "window_size 8" in rows["mae_swin_small_256"] and "`swin_small_256`" in rows["mae_swin_small_256"]


def test_models_kinds__the_cli_offers_every_kind_the_registry_has(capsys):
    assert registered_kinds() == set(MODEL_KINDS + HEAD_KINDS)
    for kind in MODEL_KINDS + HEAD_KINDS:
        assert main(["models", "--kind", kind]) == 0
        assert capsys.readouterr().out.split() == list_models(kind=kind)


def test_register_timm__is_the_one_explicit_step():
    """``import ummae`` changes no import machinery, loads no torch and registers nothing with
    timm; ``ummae.register_timm()`` registers every classifier as ``ummae_<name>``, and again
    changes nothing."""
    code = (
        "import sys\n"
        "finders = list(sys.meta_path)\n"
        "import ummae\n"
        "assert sys.meta_path == finders and 'torch' not in sys.modules\n"
        "import timm\n"
        "assert timm.list_models('ummae_*') == []\n"
        "names = ummae.register_timm()\n"
        "assert names == ummae.register_timm() and 'ummae_swin_small_256' in names\n"
        "from ummae.models.registry import list_models\n"
        "assert sorted(names) == sorted(timm.list_models('ummae_*')) == ['ummae_' + n for n in list_models(kind='classify')]\n"
        "assert timm.create_model('ummae_swin_test', num_classes=4).model_name == 'swin_test'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
