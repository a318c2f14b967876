"""Tests of the encoders and pre-training wrappers (UM-MAE / MAE / SimMIM).

Golden values come from plain re-computations written here (loops over images, units, pairs);
the tiny ``*_test`` models of the registry run at 64 px on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import _reference_forward as ref
from _helpers import brute_unit_orders
from _reference_layout import mae_sincos
from ummae.models import pvt as pvt_module
from ummae.models.base import PyramidBackbone
from ummae.models.mae import MaskedAutoencoder, patchify, unpatchify
from ummae.models.masking import (
    block_choice,
    compact_positions,
    dense_positions,
    kept_unit_index,
    secondary_masking,
)
from ummae.models.pvt import PyramidVisionTransformer, SRAttention
from ummae.models.registry import create_model, list_models
from ummae.models.simmim import SimMIM
from ummae.models.swin import PosMLPBias, SwinBlock, SwinTransformer
from ummae.sampling.random import random_masking
from ummae.sampling.uniform import uniform_sampling

TEST_MODELS = list_models("*_test", kind="pretrain")
MAE_TEST_MODELS = [n for n in TEST_MODELS if n.startswith("mae_")]
PYRAMID_TEST_ENCODERS = ["mae_swin_test", "mae_pvt_test"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)  # model init uses the global generator
    return create_model(name, **kw)


def _imgs(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=_gen(seed))


def _smooth_imgs(n: int, size: int, seed: int) -> torch.Tensor:
    """Low-frequency noise upsampled: learnable, not white noise."""
    low = torch.randn(n, 3, 4, 4, generator=_gen(seed))
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)


def brute_positions(choice: torch.Tensor, k: int) -> torch.Tensor:
    """Full-grid (row, col) of every compact token, by a loop over compact tokens."""
    n, bh, bw = choice.shape
    out = torch.zeros(n, bh * k, bw * k, 2, dtype=torch.long)
    for b in range(n):
        for i in range(bh * k):
            for j in range(bw * k):
                c = int(choice[b, i // k, j // k])
                out[b, i, j, 0] = (2 * (i // k) + c // 2) * k + i % k
                out[b, i, j, 1] = (2 * (j // k) + c % 2) * k + j % k
    return out


def brute_patchify(x: torch.Tensor, u: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, u*u*C], pixels ordered (dy, dx, c) (MAE's layout)."""
    n, c, h, w = x.shape
    gh, gw = h // u, w // u
    out = torch.zeros(n, gh * gw, u * u * c, dtype=x.dtype)
    for b in range(n):
        for ui in range(gh):
            for uj in range(gw):
                block = x[b, :, ui * u : (ui + 1) * u, uj * u : (uj + 1) * u]  # [C, u, u]
                out[b, ui * gw + uj] = block.permute(1, 2, 0).reshape(-1)
    return out


# ------------------------------------------------------------------- registry / construction

REFERENCE_NAMES = [
    "mae_swin_tiny_256",
    "mae_swin_large_256",
    "mae_pvt_small_256",
    "simmim_swin_tiny_256",
    "simmim_pvt_small_256",
    "mae_vit_base_patch16",
]


def test_registry__reference_names_listed():
    names = list_models()
    for n in REFERENCE_NAMES:
        assert n in names
    assert set(TEST_MODELS) >= {"mae_swin_test", "mae_pvt_test", "mae_vit_test", "simmim_swin_test", "simmim_pvt_test"}


@pytest.mark.parametrize("name", list_models("*_nano_128", kind="pretrain"))
def test_registry__construct(name):
    """The demo models run (the paper-size ones are checked against the reference's layout
    and parameter counts in test_reference_models.py)."""
    m = _build(name)
    assert m.model_name == name
    assert isinstance(m, (MaskedAutoencoder, SimMIM))
    with torch.no_grad():
        out = m(_imgs(1, 128), generator=_gen(0))
    assert torch.isfinite(out["loss"])
    assert out["pred"].shape == (1, 64, 16 * 16 * 3)


def test_registry__unknown_name_suggests():
    with pytest.raises(ValueError, match="Did you mean.*mae_swin_tiny_256"):
        create_model("mae_swin_tiny_265")


# ------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize(
    "name,sm_ratio",
    [(n, None) for n in TEST_MODELS] + [(n, 0.0) for n in MAE_TEST_MODELS],
)
def test_model__forward_backward_every_param_has_grad(name, sm_ratio):
    model = _build(name, sm_ratio=sm_ratio) if sm_ratio is not None else _build(name)
    if sm_ratio == 0.0:
        assert model.sm_token is None
    elif name.startswith("mae_"):
        assert model.sm_token is not None
    imgs = _imgs(2, 64)
    out = model(imgs, generator=_gen(1))
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert out["pred"].shape == (2, 16, 16 * 16 * 3)
    assert out["mask"].shape == (2, 16) and out["mask"].dtype == torch.bool
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    bad = [n for n, p in model.named_parameters() if not torch.all(torch.isfinite(p.grad))]
    assert not bad, bad


def test_model__mae_forward_is_seed_reproducible():
    model = _build("mae_swin_test")
    imgs = _imgs(2, 64)
    a, b = model(imgs, generator=_gen(5)), model(imgs, generator=_gen(5))
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["sm_mask"], b["sm_mask"])
    torch.testing.assert_close(a["loss"], b["loss"])
    # uniform masks: one visible per 2x2 block, SM unit among the visible ones
    assert torch.all((~a["mask"]).sum(1) == 4)
    block_choice(a["mask"], 4, 4)
    assert torch.all(a["sm_mask"].sum(1) == 1) and not torch.any(a["sm_mask"] & a["mask"])


# ------------------------------------------------------------------- patchify


@pytest.mark.parametrize("unit,channels", [(16, 3), (8, 3), (16, 1)])
def test_patchify__matches_loop_and_round_trips(unit, channels):
    x = torch.randn(2, channels, 64, 48, generator=_gen(3))
    p = patchify(x, unit)
    assert torch.equal(p, brute_patchify(x, unit))
    assert torch.equal(unpatchify(p, unit, (64 // unit, 48 // unit), channels), x)


# ------------------------------------------------------------------- Swin pos-MLP bias


@pytest.mark.parametrize("frac_bits", [0, 1, 2])
def test_pos_mlp_bias__table_gather_equals_per_pair_mlp(frac_bits):
    """Positions on a grid of step 2**-frac_bits (half-integers at the compact map's last
    stage); the MLP takes key minus query (the reference's sign)."""
    torch.manual_seed(0)
    m = PosMLPBias(num_heads=3, hidden=8)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    extent, t = 7, 6
    step = 2**frac_bits
    pos = torch.randint(0, extent * step, (2, 3, t, 2), generator=_gen(4)).float() / step
    with torch.no_grad():
        bias = m(pos, extent, frac_bits)
    assert bias.shape == (2, 3, 3, t, t)
    w1, b1, w2, b2 = (x.detach() for x in (m.mlp[0].weight, m.mlp[0].bias, m.mlp[2].weight, m.mlp[2].bias))
    for a in range(2):
        for w in range(3):
            for i in range(t):
                for j in range(t):
                    d = (pos[a, w, j] - pos[a, w, i]).tolist()  # key j minus query i
                    feat = torch.tensor([math.copysign(math.log1p(abs(v)), v) if v else 0.0 for v in d])
                    want = w2 @ torch.relu(w1 @ feat + b1) + b2  # [heads]
                    torch.testing.assert_close(bias[a, w, :, i, j], want, rtol=1e-5, atol=1e-5)
                    # and the module's own per-pair path agrees
                    torch.testing.assert_close(m.mlp_of_offsets(torch.tensor(d)).detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "side,ws,shift,compact",
    [
        (8, 4, False, True),
        (8, 4, True, True),  # compact map: irregular true positions
        (32, 16, True, False),
        (16, 16, True, False),  # fine-tuning / SimMIM window 16 (= the map: no shift)
    ],
)
def test_swin_block__equals_reference_attention(side, ws, shift, compact):
    """A Swin block == global attention restricted to the pairs in the same (shifted) window
    that were neighbours before the cyclic shift, with the pos-MLP bias of the TRUE offset
    key - query (tests/_reference_forward.py)."""
    torch.manual_seed(1)
    dim, heads = 8, 2
    blk = SwinBlock(dim, heads, ws, shift=shift, pos_hidden=8)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.5)
    if compact:
        pos = brute_positions(torch.randint(0, 4, (2, 2, 2), generator=_gen(31)), 4).float()  # on a 16x16 grid
        extent = 16
    else:
        pos = dense_positions(1, side, side).float()
        extent = side
    x = torch.randn(2, side, side, dim, generator=_gen(32))
    with torch.no_grad():
        got = blk(x, pos, extent)
        want = ref.swin_block(x, pos, blk, ws, shift)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sr", [1, 2, 4, 8])
def test_pvt_sr_attention__equals_reference(sr):
    """Spatial-reduction attention == attention to the map average-pooled by sr, through the
    1x1 conv and the kv LayerNorm (eps 1e-5, the reference's)."""
    torch.manual_seed(2)
    attn = SRAttention(16, 2, sr)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 16, 16, generator=_gen(33))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref.sr_attention(x, attn, sr), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,setting",
    [("mae_swin_test", 8), ("mae_swin_test", 16), ("mae_pvt_test", (4, 2, 1, 1)), ("mae_pvt_test", (8, 4, 2, 1))],
)
def test_forward_dense__equals_reference_forward(name, setting):
    """The dense encoder (fine-tuning, SimMIM, transfer) == the plain forward written from the
    method (tests/_reference_forward.py), at the pre-training and the fine-tuning settings."""
    torch.manual_seed(3)
    enc = _build(name).encoder
    for p in enc.parameters():  # away from the init, so that every weight matters
        p.data.add_(0.05 * torch.randn_like(p))
    imgs = _imgs(2, 64, seed=34)
    with torch.no_grad():
        if isinstance(enc, SwinTransformer):
            enc.set_window_size(setting)
            want = ref.swin_dense(enc, imgs, setting)
        else:
            enc.set_sr_ratios(setting)
            table = torch.from_numpy(mae_sincos(enc.embed_dims[0], 16, cls=False)).float().view(16, 16, -1)
            want = ref.pvt_dense(enc, imgs, table, setting)
        got = enc.forward_dense(imgs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------- compact encoder


def _record_stage_positions(monkeypatch, encoder):
    """Record (pos, extent) seen by each stage of a Swin (its blocks) or PVT (its sin-cos)."""
    seen = []
    if isinstance(encoder, SwinTransformer):
        orig = SwinBlock.forward

        def fwd(self, x, pos, extent, frac_bits=0):
            seen.append((x.shape[1], pos.clone(), extent))
            return orig(self, x, pos, extent, frac_bits)

        monkeypatch.setattr(SwinBlock, "forward", fwd)
    else:  # PVT: positions reach the stage-1 embedding, then every down-sampling
        orig_pe = pvt_module.PyramidVisionTransformer.position_embedding
        orig_ds = pvt_module.Downsample.forward

        def pe(self, pos, extent):
            seen.append((pos.shape[1], pos.clone(), None))
            return orig_pe(self, pos, extent)

        def ds(self, x, pos):
            x, pos = orig_ds(self, x, pos)
            seen.append((pos.shape[1], pos.clone(), None))
            return x, pos

        monkeypatch.setattr(pvt_module.PyramidVisionTransformer, "position_embedding", pe)
        monkeypatch.setattr(pvt_module.Downsample, "forward", ds)
    return seen


@pytest.mark.parametrize("name", PYRAMID_TEST_ENCODERS)
def test_forward_compact__true_positions_at_every_stage(monkeypatch, name):
    size = 128
    model = _build(name, img_size=size)
    enc = model.encoder
    seen = _record_stage_positions(monkeypatch, enc)
    mask = uniform_sampling(2, size // 16, size // 16, generator=_gen(6))
    choice = block_choice(mask, size // 16, size // 16)
    with torch.no_grad():
        enc.forward_compact(_imgs(2, size), choice, 16)
    pos0 = brute_positions(choice, 4)  # [2, 16, 16, 2] on the 32x32 full token grid
    full = size // 4
    sides = {s: size // 8 // 2**s for s in range(4)}
    by_side = {}
    for side, pos, extent in seen:
        by_side.setdefault(side, []).append((pos, extent))
    assert sorted(by_side) == sorted(sides.values())
    for s, side in sides.items():
        f = 2**s
        want = torch.zeros(2, side, side, 2)
        for b in range(2):
            for i in range(side):
                for j in range(side):
                    # top-left of the 2^s x 2^s group, divided exactly (the reference's rule)
                    want[b, i, j] = pos0[b, i * f, j * f].float() / f
        if s == 3:  # at 16 px units the last stage sits at half-integer positions (75 % of tokens)
            assert 0.6 < (want.frac() != 0).any(-1).float().mean() < 0.9
        for pos, extent in by_side[side]:
            assert torch.equal(pos, want), (name, s)
            if extent is not None:
                assert extent == full // f
                assert int(pos.max()) < extent


@pytest.mark.parametrize("name", PYRAMID_TEST_ENCODERS)
@pytest.mark.parametrize("unit", [8, 16, 32])
def test_forward_compact__equals_stages_on_compacted_full_tokens(name, unit):
    """Compaction of pixels then patch-embedding == patch-embedding of the full image then
    gathering the kept tokens: the whole encoder gives the same output."""
    model = _build(name, unit_size=unit)
    enc = model.encoder
    grid, k = 64 // unit, unit // 4
    imgs = _imgs(2, 64, seed=7)
    mask = uniform_sampling(2, grid, grid, generator=_gen(7))
    sm = secondary_masking(mask, 0.25, generator=_gen(8))
    choice = block_choice(mask, grid, grid)
    with torch.no_grad():
        got = enc.forward_compact(imgs, choice, unit, sm, model.sm_token)
        full = enc.patch_embed(imgs)  # [2, 16, 16, C]
        pos = brute_positions(choice, k)
        tokens = torch.stack([full[b, pos[b, ..., 0], pos[b, ..., 1]] for b in range(2)])
        for b in range(2):  # SM units: their tokens replaced by the shared token
            for i in range(8):
                for j in range(8):
                    r, c = pos[b, i, j].tolist()
                    if sm[b, (r // k) * grid + c // k]:
                        tokens[b, i, j] = model.sm_token
        want = enc.forward_tokens(tokens, pos, 16)[-1]
    assert got.shape == (2, enc.num_features, 1, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_forward_compact__sm_token_replaces_sm_units_before_patch_norm():
    model = _build("mae_swin_test")
    enc = model.encoder
    seen = {}
    h = enc.patch_norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    imgs = _imgs(2, 64, seed=9)
    with torch.no_grad():
        out = model(imgs, generator=_gen(9))
    h.remove()
    mask, sm = out["mask"], out["sm_mask"]
    choice = block_choice(mask, 4, 4)
    pos = brute_positions(choice, 4)
    x = seen["x"]
    with torch.no_grad():
        full = enc.patch_embed(imgs)
    n_sm = 0
    for b in range(2):
        for i in range(8):
            for j in range(8):
                r, c = pos[b, i, j].tolist()
                if sm[b, (r // 4) * 4 + c // 4]:
                    n_sm += 1
                    assert torch.equal(x[b, i, j], model.sm_token.detach())
                else:
                    torch.testing.assert_close(x[b, i, j], full[b, r, c], rtol=1e-5, atol=1e-5)
    assert n_sm == 2 * 16  # one SM unit per image, 4x4 tokens each


def test_vit_forward_visible__sm_token_gets_position():
    model = _build("mae_vit_test")
    enc = model.encoder
    seen = {}
    h = enc.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    imgs = _imgs(2, 64, seed=10)
    with torch.no_grad():
        out = model(imgs, generator=_gen(10))
        emb = enc.patch_embed(imgs).flatten(1, 2)
    h.remove()
    pos = torch.from_numpy(mae_sincos(enc.num_features, 4, cls=False)).float()  # MAE's formula, in numpy
    x = seen["x"]
    assert x.shape == (2, 1 + 4, enc.num_features)
    for b in range(2):
        vis = [u for u in range(16) if not out["mask"][b, u]]
        for t, u in enumerate(vis):
            tok = model.sm_token if out["sm_mask"][b, u] else emb[b, u]
            torch.testing.assert_close(x[b, 1 + t], tok.detach() + pos[u], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["swin", "pvt"])
def test_encoder_stage0__depends_only_on_tokens_and_true_positions(family):
    """With global attention in stage 0 (Swin window = map, PVT sr = 1), permuting the compact
    tokens together with their positions permutes the stage-0 output; permuting the tokens
    but not the positions does not. So the compact layout does not matter, only pos_hw."""
    if family == "swin":
        model = _build("mae_swin_test")
        model.encoder.set_window_size(8)  # 8x8 compact map at 64 px: one window, no shift
    else:
        model = _build("mae_pvt_test")
        model.encoder.set_sr_ratios((1, 1, 1, 1))
    enc = model.encoder
    mask = uniform_sampling(2, 4, 4, generator=_gen(12))
    choice = block_choice(mask, 4, 4)
    torch.manual_seed(12)
    tokens = torch.randn(2, 8, 8, enc.embed_dims[0])
    pos = compact_positions(choice, 4)
    perm = torch.randperm(64, generator=_gen(13))

    def shuffle(t):
        return t.flatten(1, 2)[:, perm].view(t.shape)

    with torch.no_grad():
        out = enc.forward_tokens(tokens, pos, 16)[0].permute(0, 2, 3, 1)
        out_p = enc.forward_tokens(shuffle(tokens), shuffle(pos), 16)[0].permute(0, 2, 3, 1)
        out_wrong = enc.forward_tokens(shuffle(tokens), pos, 16)[0].permute(0, 2, 3, 1)
    torch.testing.assert_close(out_p, shuffle(out), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out_wrong, shuffle(out), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------- dense encoder


@pytest.mark.parametrize("name", PYRAMID_TEST_ENCODERS + ["simmim_swin_test", "simmim_pvt_test"])
def test_forward_dense__maps_match_feature_info(name):
    enc = _build(name).encoder
    assert isinstance(enc, PyramidBackbone)
    with torch.no_grad():
        maps = enc.forward_dense(_imgs(2, 64))
    assert len(maps) == len(enc.feature_info) == 4
    for f, info in zip(maps, enc.feature_info, strict=True):
        assert f.shape[:2] == (2, info["num_chs"])
        assert 64 // f.shape[-1] == info["reduction"] and 64 // f.shape[-2] == info["reduction"]
        assert torch.all(torch.isfinite(f))
    assert [i["reduction"] for i in enc.feature_info] == [4, 8, 16, 32]


@pytest.mark.parametrize("window", [8, 16])
def test_swin_set_window_size__same_weights_run_dense(window):
    enc = _build("mae_swin_test").encoder
    imgs = _imgs(2, 64, seed=14)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with torch.no_grad():
        ref = enc.forward_dense(imgs)
        enc.set_window_size(window)
        maps = enc.forward_dense(imgs)
    assert all(b.window_size == window for s in enc.stages for b in s)
    assert [m.shape for m in maps] == [m.shape for m in ref]
    assert all(torch.all(torch.isfinite(m)) for m in maps)
    assert not torch.allclose(maps[0], ref[0])  # the larger window really changes attention
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_pvt_set_sr_ratios__same_weights_run_dense():
    enc = _build("mae_pvt_test").encoder
    assert isinstance(enc, PyramidVisionTransformer)
    imgs = _imgs(2, 64, seed=15)
    with torch.no_grad():
        ref = enc.forward_dense(imgs)
        enc.set_sr_ratios((8, 4, 2, 1))
        maps = enc.forward_dense(imgs)
    assert [b.attn.sr_ratio for s in enc.stages for b in s] == [8, 4, 2, 1]
    assert [m.shape for m in maps] == [m.shape for m in ref]
    assert all(torch.all(torch.isfinite(m)) for m in maps)
    assert not torch.allclose(maps[0], ref[0])
    with pytest.raises(ValueError):
        enc.set_sr_ratios((8, 4, 2))


# ------------------------------------------------------------------- decoder positions


def _decoder_probe(model, monkeypatch):
    """Replace the encoder by a settable feature map and capture the decoder's inputs."""
    state = {}

    def fake_compact(imgs, choice, unit, sm_mask=None, sm_token=None):
        return state["feat"]

    monkeypatch.setattr(model.encoder, "forward_compact", fake_compact)
    orig = model.decoder.forward

    def dec(visible, unit_index, prefix=None):
        state["visible"], state["index"] = visible.detach().clone(), unit_index.clone()
        return orig(visible, unit_index, prefix)

    monkeypatch.setattr(model.decoder, "forward", dec)
    return state


@pytest.mark.parametrize("unit,decoder_pos", [(16, "true"), (16, "reference"), (8, "true")])
def test_decoder__visible_token_gets_its_own_unit(monkeypatch, unit, decoder_pos):
    """Perturb one cell of the last compact map at a time: exactly the decoder tokens that came
    from the 2x2 blocks under that cell must change, and they must be scattered to the kept
    units of those blocks; within a cell the r*r tokens map to the r*r blocks by one fixed rule."""
    size = 256
    grid = size // unit
    model = _build("mae_swin_test", img_size=size, unit_size=unit, sm_ratio=0, decoder_pos=decoder_pos)
    c = model.encoder.num_features
    side = size // 64  # last compact map 4x4; one cell -> r x r blocks
    r = (grid // 2) // side
    torch.nn.init.normal_(model.decoder_embed.bias)
    state = _decoder_probe(model, monkeypatch)
    imgs = torch.zeros(2, 3, size, size)
    # a mask that mixes top-kept and bottom-kept units in every block row
    mask = uniform_sampling(2, grid, grid, generator=_gen(16))
    kept, raster = brute_unit_orders(mask, grid)  # by loops over the unit grid
    assert not torch.equal(kept, raster)
    base = torch.randn(2, c, side, side, generator=_gen(17))

    def run(feat):
        state["feat"] = feat
        with torch.no_grad():
            model(imgs, mask=mask)
        return state["visible"], state["index"]

    vis0, index = run(base)
    assert vis0.shape == (2, (grid // 2) ** 2, model.decoder.mask_token.shape[-1])
    assert torch.equal(index, raster if decoder_pos == "reference" else kept)
    # every index is a visible unit, each visible unit exactly once
    for b in range(2):
        assert sorted(index[b].tolist()) == [u for u in range(grid * grid) if not mask[b, u]]

    def block_of(u):
        return (u // grid) // 2, (u % grid) // 2

    # which tokens does each cell drive? (the encoder gives one feature per cell)
    consistent = True
    for hi in range(side):
        for wi in range(side):
            feat = base.clone()
            feat[:, :, hi, wi] += 1.0
            vis1, _ = run(feat)
            changed = (vis1 - vis0).abs().amax(-1) > 1e-4  # [N, V]
            for b in range(2):
                assert int(changed[b].sum()) == r * r  # a cell drives r*r decoder tokens
                for t in range(changed.shape[1]):
                    bi, bj = block_of(int(index[b, t]))
                    if bool(changed[b, t]) != ((bi // r, bj // r) == (hi, wi)):
                        consistent = False
    # offset of the block inside its cell -> a fixed token slot: zero features expose the slot
    vis_z, _ = run(torch.zeros_like(base))
    slot_of = {}
    for b in range(2):
        for t in range(vis_z.shape[1]):
            bi, bj = block_of(int(index[b, t]))
            key = (bi % r, bj % r)
            if key in slot_of:
                if not torch.allclose(slot_of[key], vis_z[b, t], atol=1e-5):
                    consistent = False
            else:
                slot_of[key] = vis_z[b, t]
    keys = list(slot_of)
    distinct = all(not torch.allclose(slot_of[a], slot_of[k], atol=1e-3) for a in keys for k in keys if a != k)
    if decoder_pos == "true":
        assert consistent
        assert len(keys) == r * r and distinct
    else:
        assert not consistent  # the reference ordering gives tokens other units' positions


def test_decoder__scatter_equals_loop_placement():
    """MAEDecoder input = mask token everywhere, each visible token at its unit, plus the
    sin-cos position of the unit; the order of the visible tokens does not matter."""
    model = _build("mae_swin_test")
    dec = model.decoder
    d = dec.mask_token.shape[-1]
    mask = uniform_sampling(2, 4, 4, generator=_gen(18))
    index = kept_unit_index(block_choice(mask, 4, 4))
    vis = torch.randn(2, 4, d, generator=_gen(19))
    with torch.no_grad():
        got = dec(vis, index)
        x = torch.zeros(2, 16, d)
        for b in range(2):
            for u in range(16):
                x[b, u] = dec.mask_token[0, 0]
            for t in range(4):
                x[b, int(index[b, t])] = vis[b, t]
        x = x + torch.from_numpy(mae_sincos(d, 4, cls=False)).float()  # MAE's formula, in numpy
        for blk in dec.blocks:
            x = blk(x)
        want = dec.pred(dec.norm(x))
        perm = torch.tensor([2, 0, 3, 1])
        got_p = dec(vis[:, perm], index[:, perm])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_p, got, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- losses


def _plain_mae_loss(imgs, pred, mask, unit, norm_pix):
    n, _, h, w = imgs.shape
    gw = w // unit
    total, count = 0.0, 0
    for b in range(n):
        for u in range(mask.shape[1]):
            if not mask[b, u]:
                continue
            ui, uj = divmod(u, gw)
            t = (
                imgs[b, :, ui * unit : (ui + 1) * unit, uj * unit : (uj + 1) * unit]
                .permute(1, 2, 0)
                .reshape(-1)
                .double()
            )
            if norm_pix:
                mean = t.sum() / t.numel()
                var = ((t - mean) ** 2).sum() / (t.numel() - 1)  # unbiased, like MAE's .var()
                t = (t - mean) / torch.sqrt(var + 1e-6)
            total += float(((pred[b, u].double() - t) ** 2).mean())
            count += 1
    return total / count


@pytest.mark.parametrize("name,norm_pix", [("mae_swin_test", True), ("mae_pvt_test", False), ("mae_vit_test", True)])
def test_mae_loss__equals_plain_masked_mse(name, norm_pix):
    model = _build(name, norm_pix_loss=norm_pix)
    imgs = _imgs(2, 64, seed=20) * 0.5 + 0.3
    with torch.no_grad():
        out = model(imgs, generator=_gen(20))
    want = _plain_mae_loss(imgs, out["pred"], out["mask"], 16, norm_pix)
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    pred = torch.randn(out["pred"].shape, generator=_gen(21))
    got = model.forward_loss(imgs, pred, out["mask"]).item()
    assert got == pytest.approx(_plain_mae_loss(imgs, pred, out["mask"], 16, norm_pix), rel=1e-5)


def test_mae_loss__norm_pix_eps_on_flat_units():
    """Flat units (variance about the 1e-6 eps, as in sky or walls): the target's eps decides
    the loss, which must be the plain formula's."""
    model = _build("mae_swin_test")
    imgs = 0.3 + 1e-3 * _imgs(2, 64, seed=23)
    pred = torch.randn(2, 16, 768, generator=_gen(23))
    mask = uniform_sampling(2, 4, 4, generator=_gen(24))
    got = model.forward_loss(imgs, pred, mask).item()
    assert got == pytest.approx(_plain_mae_loss(imgs, pred, mask, 16, True), rel=1e-5)


def test_mae_loss__sm_and_visible_units_carry_no_loss():
    model = _build("mae_swin_test")
    imgs = _imgs(2, 64, seed=22)
    with torch.no_grad():
        out = model(imgs, generator=_gen(22))
    mask, sm, pred = out["mask"], out["sm_mask"], out["pred"]
    assert sm.any()
    base = model.forward_loss(imgs, pred, mask)
    p = pred.clone()
    p[sm] += 10.0  # SM units
    assert torch.equal(model.forward_loss(imgs, p, mask), base)
    p = pred.clone()
    p[~mask] += 10.0  # every visible unit, SM or not
    assert torch.equal(model.forward_loss(imgs, p, mask), base)
    p = pred.clone()
    u = int(mask[0].nonzero()[0])
    p[0, u] += 1.0  # one US-masked unit
    assert not torch.allclose(model.forward_loss(imgs, p, mask), base)


def test_simmim_loss__equals_plain_masked_l1():
    model = _build("simmim_swin_test")
    imgs = _imgs(2, 64, seed=23)
    with torch.no_grad():
        out = model(imgs, generator=_gen(23))
    mask, pred = out["mask"], out["pred"]
    assert torch.all(mask.sum(1) == 12)
    target = brute_patchify(imgs, 16)
    vals = [float((pred[b, u] - target[b, u]).abs().mean()) for b in range(2) for u in range(16) if mask[b, u]]
    assert out["loss"].item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)


@pytest.mark.parametrize("name", ["simmim_swin_test", "simmim_pvt_test"])
def test_simmim__mask_token_replaces_masked_units(name):
    """The mask token replaces the patch embedding AFTER the patch norm (the reference's
    SimMIM; PVT has no patch norm), so it reaches the first block as it is."""
    model = _build(name)
    enc = model.encoder
    seen = {}
    first = enc.stages[0][0]
    h = first.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    pos_add = 0
    if isinstance(enc, PyramidVisionTransformer):  # its stage-1 position is added before the block
        pos_add = enc.position_embedding(dense_positions(1, 16, 16), 16)[0]
    imgs = _imgs(2, 64, seed=24)
    with torch.no_grad():
        emb = enc.patch_norm(enc.patch_embed(imgs)) + pos_add
        model(imgs, mask=torch.ones(2, 16, dtype=torch.bool))
        x_all = seen["x"]
        model(imgs, mask=torch.zeros(2, 16, dtype=torch.bool))
        x_none = seen["x"]
        mask = random_masking(2, 16, 0.75, generator=_gen(24))
        model(imgs, mask=mask)
        x_part = seen["x"]
    h.remove()
    tok = model.mask_token.detach() + pos_add
    torch.testing.assert_close(x_all, tok.expand_as(x_all), rtol=0, atol=1e-6)
    torch.testing.assert_close(x_none, emb)
    assert not torch.allclose(x_all, x_none)
    for b in range(2):
        for i in range(16):
            for j in range(16):
                if mask[b, (i // 4) * 4 + j // 4]:
                    want = tok[i, j] if tok.ndim == 3 else tok
                else:
                    want = emb[b, i, j]
                torch.testing.assert_close(x_part[b, i, j], want, rtol=0, atol=1e-6)


def test_simmim__loss_ignores_prediction_at_visible_units():
    model = _build("simmim_swin_test")
    imgs = _imgs(2, 64, seed=25)
    mask = random_masking(2, 16, 0.75, generator=_gen(25))
    delta = {}

    def hook(mod, args, out):  # add a per-unit pixel perturbation to the linear decoder output
        if "px" not in delta:
            return out
        units = F.pixel_unshuffle(patchify(delta["px"], 16).transpose(1, 2).reshape(2, -1, 4, 4), model.shuffle)
        return out + units.permute(0, 2, 3, 1)

    h = model.decoder.register_forward_hook(hook)
    with torch.no_grad():
        base = model(imgs, mask=mask)
        unit_px = mask.view(2, 4, 4).repeat_interleave(16, 1).repeat_interleave(16, 2)  # [2, 64, 64]
        noise = torch.randn(2, 3, 64, 64, generator=_gen(26))
        delta["px"] = noise * (~unit_px).unsqueeze(1)  # visible units only
        vis = model(imgs, mask=mask)
        delta["px"] = noise * unit_px.unsqueeze(1)  # masked units only
        msk = model(imgs, mask=mask)
    h.remove()
    changed_vis = (vis["pred"] - base["pred"]).abs().amax(-1) > 1e-6
    assert torch.equal(changed_vis, ~mask)  # the perturbation really moved the visible preds
    assert vis["loss"].item() == pytest.approx(base["loss"].item(), rel=1e-6)
    assert abs(msk["loss"].item() - base["loss"].item()) > 1e-3


# ------------------------------------------------------------------- options and errors


def test_mae_vit__random_sampling_drops_masked_units(monkeypatch):
    model = _build("mae_vit_test", sampling="random", mask_ratio=0.5)
    seen = {}
    orig = model.decoder.forward

    def dec(visible, unit_index, prefix=None):
        seen["v"], seen["i"], seen["p"] = visible, unit_index, prefix
        return orig(visible, unit_index, prefix)

    monkeypatch.setattr(model.decoder, "forward", dec)
    out = model(_imgs(2, 64, seed=27), generator=_gen(27))
    mask = out["mask"]
    assert torch.all(mask.sum(1) == 8)
    assert seen["v"].shape[1] == 16 - 8
    assert seen["p"].shape[1] == 1  # MAE's decoder also attends to the cls token
    for b in range(2):
        assert sorted(seen["i"][b].tolist()) == [u for u in range(16) if not mask[b, u]]
    assert torch.isfinite(out["loss"])
    # 0.75 random: MAE RS baseline
    out = _build("mae_vit_test", sampling="random")(_imgs(2, 64), generator=_gen(28))
    assert torch.all(out["mask"].sum(1) == 12)


def test_model_options__refused_with_reason():
    with pytest.raises(ValueError, match="uniform"):
        create_model("mae_swin_test", sampling="random")
    with pytest.raises(ValueError, match="uniform"):
        create_model("mae_pvt_test", sampling="random")
    with pytest.raises(ValueError, match="0.75|mask_ratio"):
        create_model("mae_swin_test", mask_ratio=0.6)
    with pytest.raises(ValueError, match="decoder_pos"):
        create_model("mae_swin_test", decoder_pos="sorted")
    with pytest.raises(ValueError, match="sm_ratio"):
        create_model("simmim_swin_test", sm_ratio=0.25)
    with pytest.raises(ValueError, match="sampling"):
        create_model("mae_vit_test", sampling="grid")
    with pytest.raises(ValueError, match="built for 64px"):
        create_model("mae_swin_test")(_imgs(1, 128))
    # a mask passed in from outside is validated: a pyramid model needs one kept unit per block
    with pytest.raises(ValueError, match="one unit per 2x2 block"):
        create_model("mae_swin_test")(_imgs(2, 64), mask=random_masking(2, 16, 0.75, generator=_gen(33)))


# ------------------------------------------------------------------- over-fitting


@pytest.mark.parametrize("name", ["mae_swin_test", "simmim_swin_test", "mae_vit_test"])
def test_training__tiny_model_overfits_fixed_masks(name):
    model = _build(name)
    imgs = _smooth_imgs(4, 64, seed=29)
    g = _gen(30)
    if name.startswith("simmim"):
        mask, sm = random_masking(4, 16, 0.75, generator=g), None
    else:
        mask = uniform_sampling(4, 4, 4, generator=g)
        sm = secondary_masking(mask, 0.25, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        loss = model(imgs, mask=mask, sm_mask=sm)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
