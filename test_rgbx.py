"""Tests for rgbx: tiny configs on CPU, each checked against something computed another way."""
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rgbx

REALDATA = Path(__file__).resolve().parent.parent / 'shared' / 'realdata'


def tiny_swin(**kw):
    return rgbx.SwinTransformer(**{**dict(embed_dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window_size=4), **kw})


def tiny_vit(**kw):
    return rgbx.VisionTransformer(**{**dict(dim=32, depth=2, heads=2, img_size=64), **kw})


# ----------------------------------------------------------------------------
# Foundations: Swin
# ----------------------------------------------------------------------------

def test_swin_shapes_any_size():
    model = tiny_swin().eval()
    outs = model(torch.randn(2, 3, 97, 131))
    expect = [(2, 16 * 2 ** i, math.ceil(97 / 2 ** (i + 2)), math.ceil(131 / 2 ** (i + 2))) for i in range(4)]
    assert [tuple(o.shape) for o in outs] == expect
    assert all(torch.isfinite(o).all() for o in outs)


def brute_force_swa(x, attn, shift):
    """Reference (S)W-MSA written from the definition, one query at a time: the map
    is padded to a multiple of the window and shifted; query p attends to every real
    key that shares its window in the shifted frame and its region of the unshifted
    map; the bias is read at their offset in the shifted frame. x: (H, W, C)."""
    H, W, C = x.shape
    w, nh = attn.window, attn.heads
    Hp, Wp = H + (-H) % w, W + (-W) % w
    qkv = attn.qkv(x)  # (H, W, 3C)
    q, k, v = qkv.split(C, -1)
    out = torch.zeros(H, W, C)

    def shifted(i, n):  # position of token i in the shifted frame
        return (i - shift) % n

    def region(i, n):
        s = shifted(i, n)
        return 0 if s < n - w else (1 if s < n - shift else 2) if shift else 0

    for i, j in itertools.product(range(H), range(W)):
        si, sj = shifted(i, Hp), shifted(j, Wp)
        keys = [(a, b) for a, b in itertools.product(range(H), range(W))
                if shifted(a, Hp) // w == si // w and shifted(b, Wp) // w == sj // w
                and region(a, Hp) == region(i, Hp) and region(b, Wp) == region(j, Wp)]
        for h in range(nh):
            sl = slice(h * C // nh, (h + 1) * C // nh)
            logits = []
            for a, b in keys:
                dy, dx = si - shifted(a, Hp), sj - shifted(b, Wp)
                bias = attn.relative_position_bias_table[(dy + w - 1) * (2 * w - 1) + dx + w - 1, h]
                logits.append(q[i, j, sl] @ k[a, b, sl] / math.sqrt(C // nh) + bias)
            p = torch.stack(logits).softmax(0)
            out[i, j, sl] = sum(pi * v[a, b, sl] for pi, (a, b) in zip(p, keys))
    return attn.proj(out)


@pytest.mark.parametrize('size', [(8, 12), (7, 10)])  # no padding / padding on both axes
@pytest.mark.parametrize('shift', [0, 2])
def test_window_attention_matches_definition(size, shift):
    torch.manual_seed(0)
    blk = rgbx.SwinTransformerBlock(dim=8, heads=2, window=4)
    x = torch.randn(1, *size, 8)
    with torch.no_grad():
        got = blk.attention(x, rgbx.window_layout(*size, 4, shift, 'cpu'))[0]
        ref = brute_force_swa(x[0], blk.attn, shift)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_padding_never_leaks():
    """Point the padded window slots at other tokens: real outputs must not move."""
    torch.manual_seed(0)
    blk = rgbx.SwinTransformerBlock(dim=8, heads=2, window=4).eval()
    x = torch.randn(2, 7, 10, 8)
    for shift in (0, 2):
        order, back, mask = rgbx.window_layout(7, 10, 4, shift, 'cpu')
        padded = torch.ones_like(order, dtype=torch.bool)
        padded[back] = False
        assert padded.sum() == 8 * 12 - 7 * 10
        other = order.clone()
        other[padded] = torch.randint(0, 70, (int(padded.sum()),))
        with torch.no_grad():
            a = blk(x, (order, back, mask))
            b = blk(x, (other, back, mask))
        assert torch.equal(a, b)


def test_shifted_window_receptive_field():
    """Perturb one token: exactly the tokens of its shifted window and region change."""
    torch.manual_seed(0)
    H, W, w, s = 8, 12, 4, 2
    blk = rgbx.SwinTransformerBlock(dim=8, heads=2, window=w).eval()
    x = torch.randn(1, H, W, 8)
    layout = rgbx.window_layout(H, W, w, s, 'cpu')
    for (pi, pj) in [(0, 0), (3, 5), (7, 11), (6, 1)]:
        y = x.clone()
        y[0, pi, pj] += 1.0
        with torch.no_grad():
            changed = (blk.attention(y, layout) - blk.attention(x, layout)).abs().sum(-1)[0] > 0
        # by hand: shifted frame coordinate, window index and region along each axis
        def group(i, n):
            t = (i - s) % n
            return t // w, (t >= n - w) + (t >= n - s)
        expect = torch.tensor([[group(i, H) == group(pi, H) and group(j, W) == group(pj, W)
                                for j in range(W)] for i in range(H)])
        assert torch.equal(changed, expect), (pi, pj)


def test_padded_path_equals_plain_path():
    """A map that needs no padding gives the same output alone and as the top-left
    of a padded map whose extra rows are then cropped by the stage (W-MSA only:
    padding stays invisible, and without a shift the windows coincide)."""
    torch.manual_seed(0)
    blk = rgbx.SwinTransformerBlock(dim=8, heads=2, window=4).eval()
    x = torch.randn(1, 8, 8, 8)
    big = torch.cat([x, torch.randn(1, 1, 8, 8)], 1)  # 9 x 8: padded to 12 x 8
    with torch.no_grad():
        plain = blk(x, rgbx.window_layout(8, 8, 4, 0, 'cpu'))
        padded = blk(big, rgbx.window_layout(9, 8, 4, 0, 'cpu'))[:, :8]
    assert rgbx.window_layout(8, 8, 4, 0, 'cpu')[2] is None
    torch.testing.assert_close(plain, padded, atol=1e-6, rtol=1e-6)


def test_patch_merging_channel_order():
    merge = rgbx.PatchMerging(3)
    x = torch.randn(1, 5, 7, 3)  # odd on both axes: zero-padded to 6 x 8
    seen = {}
    merge.norm.register_forward_hook(lambda m, inp, out: seen.setdefault('x', inp[0]))
    out = merge(x)
    xp = torch.zeros(1, 6, 8, 3)
    xp[:, :5, :7] = x
    expect = torch.stack([torch.stack([torch.cat([xp[0, 2 * i, 2 * j], xp[0, 2 * i + 1, 2 * j],
                                                  xp[0, 2 * i, 2 * j + 1], xp[0, 2 * i + 1, 2 * j + 1]])
                                       for j in range(4)]) for i in range(3)])
    assert torch.equal(seen['x'][0], expect)
    assert out.shape == (1, 3, 4, 6)


def official_swin_state_dict(model):
    """A state dict with exactly the names of the Microsoft release, including the
    buffers and the classifier that load_pretrained must drop."""
    sd = dict(model.state_dict())
    w = model.window_size
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            sd[f'layers.{i}.blocks.{j}.attn.relative_position_index'] = rgbx.relative_position_index(w)
            if j % 2:
                sd[f'layers.{i}.blocks.{j}.attn_mask'] = torch.zeros(4, w * w, w * w)
    sd['head.weight'] = torch.randn(1000, model.dims[-1])
    sd['head.bias'] = torch.zeros(1000)
    return sd


def test_swin_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = tiny_swin().eval()
    sd = official_swin_state_dict(src)
    assert sum(k.endswith('reduction.weight') for k in sd) == 3 and 'norm.weight' in sd
    path = tmp_path / 'swin.pth'
    torch.save({'model': sd}, path)
    dst = rgbx.load_pretrained(tiny_swin().eval(), path)
    x = torch.randn(1, 3, 61, 45)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(src(x), dst(x)))
    table = 'layers.0.blocks.0.attn.relative_position_bias_table'
    assert torch.equal(dst.state_dict()[table], sd[table])  # native window: bit-identical

    big = rgbx.load_pretrained(tiny_swin(window_size=6), path)  # another window: bicubic resize
    assert big.state_dict()[table].shape == (11 * 11, 1)
    sd[table] = torch.full_like(sd[table], 0.25)
    torch.save({'model': sd}, path)
    assert torch.allclose(rgbx.load_pretrained(tiny_swin(window_size=6), path).state_dict()[table],
                          torch.tensor(0.25), atol=1e-6)


def test_checkpoint_errors(tmp_path):
    sd = official_swin_state_dict(tiny_swin())
    bad = dict(sd)
    bad['layers.0.blocks.0.mlp.fc3.weight'] = bad.pop('layers.0.blocks.0.mlp.fc2.weight')
    torch.save({'model': bad}, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match=r"(?s)missing keys.*mlp\.fc2\.weight.*unexpected keys.*mlp\.fc3\.weight"):
        rgbx.load_pretrained(tiny_swin(), tmp_path / 'bad.pth')
    torch.save(sd, tmp_path / 'ok.pth')
    with pytest.raises(ValueError, match=r"shape mismatches.*patch_embed\.proj\.weight"):
        rgbx.load_pretrained(tiny_swin(embed_dim=32, heads=(2, 2, 4, 4)), tmp_path / 'ok.pth')
    data = (tmp_path / 'ok.pth').read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match=r"cut\.pth.*truncated"):
        rgbx.load_pretrained(tiny_swin(), tmp_path / 'cut.pth')
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        rgbx.load_pretrained(tiny_swin(), tmp_path / 'nowhere.pth')


# ----------------------------------------------------------------------------
# Foundations: ViT
# ----------------------------------------------------------------------------

def mae_sincos(dim, g):
    """MAE's get_2d_sincos_pos_embed, written out in numpy from its definition."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    gw, gh = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))
    return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], 1)


def test_sincos_matches_mae():
    np.testing.assert_allclose(rgbx.sincos_pos_embed(32, 4, 4).numpy(), mae_sincos(32, 4), atol=1e-6)


def test_vit_shapes_and_driving_by_hand():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        out = model(x)
        t, grid = model.embed(x)
        for blk in model.blocks:
            t = blk(t)
    assert out.shape == (2, 1 + 7 * 9, 32) and grid == (7, 9)
    assert torch.equal(out, model.norm(t))


def test_vit_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    src = tiny_vit().eval()
    sd = dict(src.state_dict())
    assert set(sd) >= {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'norm.weight', 'blocks.1.mlp.fc2.bias'}
    full = {**sd, 'mask_token': torch.zeros(1, 1, 16), 'decoder_embed.weight': torch.zeros(16, 32),
            'decoder_pred.bias': torch.zeros(768)}  # the MAE `_full` release: decoder ignored
    torch.save({'model': full}, tmp_path / 'mae.pth')
    dst = rgbx.load_pretrained(tiny_vit(), tmp_path / 'mae.pth').eval()
    assert torch.equal(dst.pos_embed, src.pos_embed)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    big = rgbx.load_pretrained(tiny_vit(img_size=96), tmp_path / 'mae.pth').eval()
    assert big.pos_embed.shape == (1, 1 + 36, 32)
    assert torch.equal(big.pos_embed[:, 0], src.pos_embed[:, 0])
    full['pos_embed'][:, 1:] = torch.linspace(-1, 1, 32)  # constant over the grid: stays so when resized
    torch.save(full, tmp_path / 'mae.pth')
    big = rgbx.load_pretrained(tiny_vit(img_size=96), tmp_path / 'mae.pth')
    torch.testing.assert_close(big.pos_embed[0, 1:], torch.linspace(-1, 1, 32).expand(36, 32))


# ----------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------

def test_heads_odd_sizes():
    size = (97, 131)
    swin = tiny_swin().eval()
    feats = swin(torch.randn(2, 3, *size))
    assert rgbx.SegFormerHead(swin.dims, 24, 5).eval()(feats, size).shape == (2, 5, *size)
    tokens = tiny_vit().eval()(torch.randn(2, 3, *size))[:, 1:]
    assert rgbx.SETRNaiveHead(32, 5).eval()(tokens, (7, 9), size).shape == (2, 5, *size)
    assert rgbx.ConvNeXtHead(32, 5, dim=16, depth=1).eval()(tokens, (7, 9), size).shape == (2, 5, *size)


def test_segformer_head_layout():
    """KTB's S1 head for Swin-B with 40 classes holds 2.055M parameters (design/ktb.md)."""
    head = rgbx.SegFormerHead([128, 256, 512, 1024], 512, 40)
    assert sum(p.numel() for p in head.parameters()) == 2_055_208


def test_resize_logits_keeps_cells_over_their_pixels():
    logits = torch.arange(6.0).view(1, 1, 2, 3)  # a 2 x 3 grid of stride 4 over a 7 x 10 image
    out = rgbx.resize_logits(logits, (7, 10), 4)
    assert out.shape == (1, 1, 7, 10)
    # logits = 3 r + c is linear, so bilinear sampling at pixel (i, j) gives 3 r(i) + c(j) at the
    # cell coordinates r(i) = (i + 0.5) / 4 - 0.5 (clamped to the grid) of the *padded* layout
    r = np.clip((np.arange(7) + 0.5) / 4 - 0.5, 0, 1)
    c = np.clip((np.arange(10) + 0.5) / 4 - 0.5, 0, 2)
    np.testing.assert_allclose(out[0, 0].numpy(), 3 * r[:, None] + c[None, :], atol=1e-6)
