"""Tests for rgbx: tiny configs on CPU, each checked against something computed another way."""
import copy
import datetime
import itertools
import json
import math
import os
import re
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import eval as ev  # eval.py; the builtin `eval` is not used here
import rgbx
import train as tr

torch.set_num_threads(data.usable_cores())  # on a busy machine, the cores other processes leave free


# ----------------------------------------------------------------------------
# Shared: real-data paths, tiny models, fixtures and helpers used by several sections
# ----------------------------------------------------------------------------

# real frames: RGBX_REALDATA=DIR points the tests at yours (DIR/NYUDepthv2/{RGB,Depth,DepthFilled,HHA,Label}, ...)
REALDATA = Path(os.environ.get('RGBX_REALDATA') or Path(__file__).resolve().parent.parent / 'shared' / 'realdata')
NYU = REALDATA / 'NYUDepthv2'
needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(),
                                    reason=f"{REALDATA} is absent (the real frames are not part of a clone; "
                                           f"RGBX_REALDATA=DIR points the tests at yours)")


def png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


HHA_CAMERA = (260.0, 260.0, 159.5, 119.5)  # the synthetic scene's camera, 0-based centre


def hha_scene(h=240, w=320):
    """A scene of known geometry -> depth (H, W) in metres and part (H, W): 1 floor, 2 wall,
    3 box top, 4 box front. Camera (HHA_CAMERA) 1.2 m above the floor, pitched 20 degrees
    down and rolled 5 degrees; a wall 4 m ahead; a 0.7 x 0.4 x 0.7 m box 1.8 m ahead."""
    fx, fy, cx, cy = HHA_CAMERA
    u, v = np.meshgrid(np.arange(w) - cx, np.arange(h) - cy)
    d = np.stack([u / fx, v / fy, np.ones_like(u)], -1)  # rays in camera coordinates (y down, z ahead)
    p, r = np.radians(-20), np.radians(5)
    pitch = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    roll = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    world = d @ (pitch @ roll).T  # world: x right, y down (gravity), z ahead
    cam_h = 1.2
    with np.errstate(divide='ignore', invalid='ignore'):
        tf = np.where(world[..., 1] > 0, cam_h / world[..., 1], np.inf)  # floor y = cam_h
        tw = np.where(world[..., 2] > 0, 4.0 / world[..., 2], np.inf)  # wall z = 4
        tb = np.where(world[..., 1] > 0, (cam_h - 0.4) / world[..., 1], np.inf)  # box top
        ts = np.where(world[..., 2] > 0, 1.8 / world[..., 2], np.inf)  # box front
    xb, zb = world[..., 0] * tb, world[..., 2] * tb
    tb = np.where((np.abs(xb) < 0.35) & (zb > 1.8) & (zb < 2.5), tb, np.inf)
    xs, ys = world[..., 0] * ts, world[..., 1] * ts
    ts = np.where((np.abs(xs) < 0.35) & (ys > cam_h - 0.4) & (ys < cam_h), ts, np.inf)
    t, part = np.full((h, w), np.inf), np.zeros((h, w), int)
    for k, tk in ((1, tf), (2, tw), (3, tb), (4, ts)):
        near = tk < t
        t[near], part[near] = tk[near], k
    return t * d[..., 2], part


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """Every test runs on the CPU, also on a machine with a GPU (where the device default
    is cuda), and so do the processes it starts; a test marked `cuda` (a GPU check) runs
    only when `-m` names cuda, and only where there is a CUDA device."""
    if request.node.get_closest_marker('cuda') is None:
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
        monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
    elif 'cuda' not in (request.config.getoption('markexpr') or ''):
        pytest.skip("a GPU check: run them with python -m pytest -m cuda")
    elif not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False): the GPU checks need one")


def demo_config(tmp_path, **kw):
    return tr.resolve(tr.Config(**{**dict(dataset='demo', crop='32x32', batch_size=2, epochs=1, max_steps=4, workers=0,
                                          out_dir=str(tmp_path / 'run'), log_every=1, lr=1e-3), **kw}))


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    cfg = tr.resolve(tr.Config(dataset='demo', max_steps=150, warmup_epochs=0.3, workers=0, log_every=1000,
                               device='cpu', out_dir=str(tmp_path_factory.mktemp('demo') / 'run')))
    return cfg, tr.train(cfg)


def cli_error(main, argv):
    """The message a command line ends with: exactly one line, 'error: ...', no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


KTB_FIXTURE = Path(__file__).resolve().parent / 'fixtures' / 'ktb-release'


def release_fixture():
    if not (KTB_FIXTURE / 'ktb_release_tiny.pth').exists():
        pytest.skip(f"KTB release fixture absent ({KTB_FIXTURE})")
    cfg = json.loads((KTB_FIXTURE / 'ktb_release_tiny.json').read_text())
    io = torch.load(KTB_FIXTURE / 'ktb_release_tiny_io.pt', map_location='cpu', weights_only=True)
    return cfg, io


def release_sized_ktb(cfg, **changes):
    cfg = {**cfg, **changes}
    backbone = rgbx.SwinTransformer(embed_dim=cfg['embed_dim'], depths=cfg['depths'], heads=cfg['heads'],
                                    window_size=cfg['window_size'])
    return rgbx.KTB(backbone, cfg['num_classes'], cfg['x_channels'], fused_head_dim=cfg['fused_head_dim'],
                    aux_head_dim=cfg['aux_head_dim'])


MM_PRE_OPTS = 'stage=pretrain,dim=32,depth=2,heads=2,decoder_dim=32,decoder_heads=2,decoder_depth=1,img_size=64'
# every method at a CPU test's size (Config fields), MaskMentor's pre-training as a sixth
NANO_METHODS = {'early_fusion': dict(method='early_fusion', backbone='swin-nano'),
                'ktb': dict(method='ktb', backbone='swin-nano', pretrained='none', opts='window_size=4'),
                'gopt': dict(method='gopt', backbone='vit-nano', pretrained='none'),
                'maskmentor': dict(method='maskmentor', backbone='vit-nano', pretrained='none'),
                'maskmentor-pretrain': dict(method='maskmentor', backbone='vit-nano', opts=MM_PRE_OPTS)}
SEGMENTERS = [m for m in NANO_METHODS if m != 'maskmentor-pretrain']


def run_cli(script, *args, cwd=None, **popen):
    """Run `python script args` in a fresh process; returns the CompletedProcess (text)."""
    import subprocess
    import sys
    here = Path(__file__).resolve().parent
    return subprocess.run([sys.executable, str(here / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or here, env={**os.environ, 'OMP_NUM_THREADS': '1'}, **popen)


def one_line_error(res, *words):
    """A process that ended with exactly one 'error: ...' line on stderr and no traceback."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0 and 'Traceback' not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), res.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


class Child:
    """A `python -u train.py args` process whose stdout lines are read as they come (a thread),
    so that a test acts on what the run has said ("step 2/...") rather than on timing or on
    files appearing."""

    def __init__(self, *args):
        import queue
        import signal
        import subprocess
        import sys
        import threading
        here = Path(__file__).resolve().parent
        # SIGINT back to its default in the child: a shell starts background jobs (nohup ... &) with
        # SIGINT ignored, which the child would inherit, and then Ctrl-C could not reach it
        self.p = subprocess.Popen([sys.executable, '-u', str(here / 'train.py'), *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines = queue.Queue()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text, timeout=300):
        """The first line holding `text`; an error when the run ends (or says nothing for `timeout` s) before."""
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, f"the run ended before saying {text!r}: {self.p.stderr.read()[-2000:]}"
            if text in line:
                return line

    def finish(self, timeout=300):
        """Wait for the end; the result as run_cli gives it (returncode, stderr)."""
        self.p.wait(timeout=timeout)
        return type('Result', (), dict(returncode=self.p.returncode, stderr=self.p.stderr.read()))


def nyu_pair(tmp_path, bad_test_label=False):
    """A NYUDv2-layout folder with 4 training and 2 test frames of 16 x 16; optionally a label of 41 in test."""
    rng = np.random.default_rng(0)
    for i in range(6):
        png(tmp_path / 'RGB' / f'{i}.png', rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        png(tmp_path / 'HHA' / f'{i}.png', rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        label = rng.integers(0, 41, (16, 16)).astype(np.uint8)
        if bad_test_label and i == 5:
            label[3, 3] = 41
        png(tmp_path / 'Label' / f'{i}.png', label)
    (tmp_path / 'train.txt').write_text('0\n1\n2\n3\n')
    (tmp_path / 'test.txt').write_text('4\n5\n')
    return tmp_path


def nyu_argv(root, out, *more):
    return ['--dataset', 'nyudv2', '--data-root', str(root), '--backbone', 'swin-nano', '--crop', '16x16',
            '--batch-size', '2', '--epochs', '1', '--lr', '1e-3', '--out-dir', str(out), *more]


# ----------------------------------------------------------------------------
# Foundations (rgbx.py): Swin, ViT, heads and loss, loading and converting checkpoints
# ----------------------------------------------------------------------------

# --- Swin ---

def tiny_swin(**kw):
    return rgbx.SwinTransformer(**{**dict(embed_dim=16, depths=(2, 2, 2, 2), heads=(1, 2, 2, 4), window_size=4), **kw})


def test_swin_shapes_any_size():
    model = tiny_swin().eval()
    outs = model(torch.randn(2, 3, 97, 131))
    expect = [(2, 16 * 2 ** i, math.ceil(97 / 2 ** (i + 2)), math.ceil(131 / 2 ** (i + 2))) for i in range(4)]
    assert [tuple(o.shape) for o in outs] == expect
    assert all(torch.isfinite(o).all() for o in outs)


def test_swin_window_layout_cache_keeps_the_recently_used_sizes_only():
    """Multi-scale evaluation of images of many sizes: each stage caches at most
    LAYOUTS_KEPT layouts, dropping the least recently used; a size in use stays."""
    stage = tiny_swin().layers[0]
    kept = rgbx.BasicLayer.LAYOUTS_KEPT
    first = stage.layouts(8, 8, 'cpu')
    for h in range(9, 9 + 2 * kept):
        stage.layouts(h, 8, 'cpu')
        assert stage.layouts(8, 8, 'cpu') is first  # used every time: never dropped
    assert len(stage._layouts) == kept and (9, 8, 'cpu') not in stage._layouts
    assert (8 + 2 * kept, 8, 'cpu') in stage._layouts


def brute_force_swa(x, attn, shift):
    """Reference (S)W-MSA written from the definition, one query at a time: the map
    is zero-padded to a multiple of the window and shifted; query p attends to every
    key of the padded map (padding included: zero tokens, keys and values = the qkv
    bias) that shares its window in the shifted frame and its region of the padded,
    unshifted frame; the bias is read at their offset in the shifted frame. x: (H, W, C)."""
    H, W, C = x.shape
    w, nh = attn.window, attn.heads
    Hp, Wp = H + (-H) % w, W + (-W) % w
    qkv = attn.qkv(F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H)))  # (Hp, Wp, 3C)
    q, k, v = qkv.split(C, -1)
    out = torch.zeros(H, W, C)

    def shifted(i, n):  # position of token i in the shifted frame
        return (i - shift) % n

    def region(i, n):
        s = shifted(i, n)
        return 0 if s < n - w else (1 if s < n - shift else 2) if shift else 0

    for i, j in itertools.product(range(H), range(W)):
        si, sj = shifted(i, Hp), shifted(j, Wp)
        keys = [(a, b) for a, b in itertools.product(range(Hp), range(Wp))
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


@pytest.mark.slow
@pytest.mark.parametrize('size', [(8, 12), (7, 10), (3, 2)])  # no padding / padding on both axes / inside one window
@pytest.mark.parametrize('shift', [0, 2])
def test_swin_window_attention_matches_definition(size, shift):
    torch.manual_seed(0)
    blk = rgbx.SwinTransformerBlock(dim=8, heads=2, window=4)
    x = torch.randn(1, *size, 8)
    with torch.no_grad():
        got = blk.attention(x, rgbx.window_layout(*size, 4, shift, 'cpu'))[0]
        ref = brute_force_swa(x[0], blk.attn, shift)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_swin_padded_slots_read_the_zero_token():
    """Padding is one zero token (index H*W, appended by the block): every padded window slot
    reads it, every real token sits in exactly one slot, and without a shift there is no mask."""
    for shift in (0, 2):
        order, back, mask = rgbx.window_layout(7, 10, 4, shift, 'cpu')
        padded = torch.ones_like(order, dtype=torch.bool)
        padded[back] = False
        assert padded.sum() == 8 * 12 - 7 * 10 and (order[padded] == 70).all()
        assert torch.equal(order[back], torch.arange(70))
        assert (mask is None) == (shift == 0)
    # a map that fits in one window is shifted too (the segmentation Swins, the KTB release)
    layer = rgbx.BasicLayer(8, 2, 2, 4, 4.0, [0.0, 0.0], downsample=False)
    assert layer.layouts(3, 2, 'cpu')[1][2] is not None


def test_swin_shifted_window_receptive_field():
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


def test_swin_layout_cache_filled_in_inference_mode_serves_autograd():
    model = tiny_swin().eval()
    img = torch.randn(1, 3, 37, 53)
    with torch.inference_mode():
        expected = model(img)[-1]
    out = model(img.requires_grad_())[-1]  # same size: the cached layouts are reused under autograd
    out.sum().backward()
    assert torch.allclose(out.detach(), expected, atol=1e-5) and img.grad is not None


def test_swin_padded_path_equals_plain_path():
    """A map that needs no padding gives the same output alone and as the top-left
    of a padded map whose extra rows are then cropped by the stage (W-MSA only:
    the windows of its top rows hold no padding, and without a shift the windows coincide)."""
    torch.manual_seed(0)
    blk = rgbx.SwinTransformerBlock(dim=8, heads=2, window=4).eval()
    x = torch.randn(1, 8, 8, 8)
    big = torch.cat([x, torch.randn(1, 1, 8, 8)], 1)  # 9 x 8: padded to 12 x 8
    with torch.no_grad():
        plain = blk(x, rgbx.window_layout(8, 8, 4, 0, 'cpu'))
        padded = blk(big, rgbx.window_layout(9, 8, 4, 0, 'cpu'))[:, :8]
    assert rgbx.window_layout(8, 8, 4, 0, 'cpu')[2] is None
    torch.testing.assert_close(plain, padded, atol=1e-6, rtol=1e-6)


def test_swin_patch_merging_channel_order():
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


def test_swin_drop_path_residual_is_x_plus_drop_path_in_one_pass():
    """Dropout.residual(x, b) = x + Dropout(b) for the same draws (per sample: whole branches dropped,
    the kept ones scaled by 1 / (1 - p)); in eval mode, or with p = 0, x + b exactly."""
    dp = rgbx.DropPath(0.5).train()
    x, b = torch.randn(8, 3, 4, 5), torch.randn(8, 3, 4, 5)
    torch.manual_seed(3)
    got = dp.residual(x, b)
    torch.manual_seed(3)
    expected = x + dp(b)
    torch.testing.assert_close(got, expected)
    kept = [(got[i] - x[i]).abs().max() > 0 for i in range(8)]
    assert 0 < sum(kept) < 8  # whole samples dropped, others kept (a seed where both occur)
    for i in range(8):
        torch.testing.assert_close(got[i], x[i] + 2 * b[i] if kept[i] else x[i])
    assert torch.equal(dp.eval().residual(x, b), x + b)
    assert torch.equal(rgbx.DropPath(0.0).train().residual(x, b), x + b)


# --- Swin checkpoints: the official naming, mmseg files ---

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


@pytest.mark.slow
def test_swin_checkpoint_errors(tmp_path):
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


def mmseg_swin_state(release_sd, width):
    """The fixture's frozen Swin keys, as a mmsegmentation Swin file holds them (no adapters, a final norm)."""
    sd = {k[len('backbone.'):]: v for k, v in release_sd.items()
          if k.startswith(('backbone.patch_embed.', 'backbone.stages.')) and 'Adapter' not in k}
    torch.manual_seed(0)
    sd['norm.weight'], sd['norm.bias'] = 1 + 0.1 * torch.randn(width), 0.1 * torch.randn(width)
    return sd


def microsoft_from_mmseg(sd):
    """The Microsoft naming, written out by hand: renames, and the Unfold channel order c*4 + (2 dy + dx)
    rewritten column by column into the concat order (x0, x1, x2, x3) = offsets (0,0), (1,0), (0,1), (1,1)."""
    out = {}
    for k, v in sd.items():
        if k.endswith('relative_position_index'):
            continue
        n = (k.replace('patch_embed.projection', 'patch_embed.proj').replace('stages.', 'layers.')
             .replace('attn.w_msa.', 'attn.').replace('ffn.layers.0.0.', 'mlp.fc1.').replace('ffn.layers.1.', 'mlp.fc2.'))
        if '.downsample.' in k:
            C = v.shape[-1] // 4
            cols = [c * 4 + 2 * dy + dx for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1)) for c in range(C)]
            v = v[..., cols]
        out[n] = v
    return out


@pytest.mark.parametrize('wrap', ['plain', 'state_dict+backbone'])
def test_swin_mmseg_file_equals_microsoft_naming(tmp_path, wrap):
    cfg, io = release_fixture()
    C = cfg['embed_dim']
    mm = mmseg_swin_state(torch.load(KTB_FIXTURE / 'ktb_release_tiny.pth', map_location='cpu', weights_only=True), 8 * C)
    saved = mm if wrap == 'plain' else {'state_dict': {'backbone.' + k: v for k, v in mm.items()}}
    torch.save(saved, tmp_path / 'mmseg.pth')
    torch.save({'model': microsoft_from_mmseg(mm)}, tmp_path / 'microsoft.pth')
    make = lambda: rgbx.SwinTransformer(embed_dim=C, depths=cfg['depths'], heads=cfg['heads'],
                                        window_size=cfg['window_size']).eval()
    a, b = rgbx.load_pretrained(make(), tmp_path / 'mmseg.pth'), rgbx.load_pretrained(make(), tmp_path / 'microsoft.pth')
    with torch.no_grad():
        for x, y in zip(a(io['rgb']), b(io['rgb'])):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        # the merged downsample is nn.Unfold's, computed as mmsegmentation does, on the file's own tensors
        t = torch.randn(1, 6, 10, C)
        unfolded = F.unfold(t.permute(0, 3, 1, 2), 2, stride=2).transpose(1, 2)  # (1, 15, 4 C), c*4 + (2 dy + dx)
        ref = F.linear(F.layer_norm(unfolded, (4 * C,), mm['stages.0.downsample.norm.weight'],
                                    mm['stages.0.downsample.norm.bias']), mm['stages.0.downsample.reduction.weight'])
        torch.testing.assert_close(a.layers[0].downsample(t).flatten(1, 2), ref, atol=1e-5, rtol=1e-5)
    # the same file also fills a KTB's backbone (which has no final norm)
    rgbx.load_pretrained(release_sized_ktb(cfg), tmp_path / 'mmseg.pth')


# --- ViT ---

def mae_sincos(dim, g):
    """MAE's get_2d_sincos_pos_embed, written out in numpy from its definition."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    gw, gh = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))
    return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], 1)


def test_vit_sincos_matches_mae():
    np.testing.assert_allclose(rgbx.sincos_pos_embed(32, 4, 4).numpy(), mae_sincos(32, 4), atol=1e-6)


def tiny_vit(**kw):
    return rgbx.VisionTransformer(**{**dict(dim=32, depth=2, heads=2, img_size=64), **kw})


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


# --- Heads and loss ---

def test_heads_odd_sizes():
    size = (97, 131)
    swin = tiny_swin().eval()
    feats = swin(torch.randn(2, 3, *size))
    assert rgbx.SegFormerHead(swin.dims, 24, 5).eval()(feats, size).shape == (2, 5, *size)
    tokens = tiny_vit().eval()(torch.randn(2, 3, *size))[:, 1:]
    assert rgbx.SETRNaiveHead(32, 5).eval()(tokens, (7, 9), size).shape == (2, 5, *size)
    assert rgbx.ConvNeXtHead(32, 5, dim=16, depth=1).eval()(tokens, (7, 9), size).shape == (2, 5, *size)


def test_heads_segformer_layout():
    """KTB's S1 head for Swin-B with 40 classes holds 2.055M parameters (docs/ktb.md, part 6)."""
    head = rgbx.SegFormerHead([128, 256, 512, 1024], 512, 40)
    assert sum(p.numel() for p in head.parameters()) == 2_055_208


def test_heads_resize_logits_keeps_cells_over_their_pixels():
    logits = torch.arange(6.0).view(1, 1, 2, 3)  # a 2 x 3 grid of stride 4 over a 7 x 10 image
    out = rgbx.resize_logits(logits, (7, 10), 4)
    assert out.shape == (1, 1, 7, 10)
    # logits = 3 r + c is linear, so bilinear sampling at pixel (i, j) gives 3 r(i) + c(j) at the
    # cell coordinates r(i) = (i + 0.5) / 4 - 0.5 (clamped to the grid) of the *padded* layout
    r = np.clip((np.arange(7) + 0.5) / 4 - 0.5, 0, 1)
    c = np.clip((np.arange(10) + 0.5) / 4 - 0.5, 0, 2)
    np.testing.assert_allclose(out[0, 0].numpy(), 3 * r[:, None] + c[None, :], atol=1e-6)


@pytest.mark.parametrize('ohem', [False, True])
def test_heads_loss_on_channels_last_logits_equals_channels_first(ohem):
    """The training heads hand the loss channels-last logits (read as (B*H*W, K) rows): the same loss and
    gradient as on channels-first logits, with ignored pixels and with OHEM; the heads' values do not
    depend on the layout."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, 9, requires_grad=True)
    label = torch.randint(0, 5, (2, 7, 9))
    label[0, :3] = 255
    cl = logits.contiguous(memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    first, last = rgbx.segmentation_loss(logits, label, ohem), rgbx.segmentation_loss(cl, label, ohem)
    torch.testing.assert_close(first, last)
    torch.testing.assert_close(torch.autograd.grad(first, logits)[0], torch.autograd.grad(last, logits)[0])
    head = rgbx.SegFormerHead([8, 16], 12, 5).eval()
    feats = [torch.randn(2, 8, 6, 8), torch.randn(2, 16, 3, 4)]
    a, b = head(feats, (24, 32)), head(feats, (24, 32), channels_last=True)
    assert a.is_contiguous() and b.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b)


def segformer_head_reference(head, feats, size):
    """SegFormerHead as its definition reads: linear_c, upsample, concat (deepest first), fuse conv at 1/4."""
    h, w = feats[0].shape[-2:]
    x = [F.interpolate(lin(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(f.shape[0], -1, *f.shape[-2:]),
                       size=(h, w), mode='bilinear', align_corners=False) for lin, f in zip(head.linear_c, feats)]
    x = head.linear_fuse(torch.cat(x[::-1], 1))  # (B, E, h, w)
    return F.interpolate(head.linear_pred(head.dropout(x)), size=size, mode='bilinear', align_corners=False)


@pytest.mark.slow
@pytest.mark.parametrize('train', [True, False])
def test_heads_segformer_equals_its_definition(train):
    """The fuse conv applied per stage before upsampling, composed with linear_c, equals the
    concat-then-fuse definition: logits, every gradient, BN running statistics (random weights)."""
    torch.manual_seed(0)
    size = (45, 61)  # odd: padded grids, 1/4 .. 1/32 maps of unequal aspect
    head = rgbx.SegFormerHead([16, 32, 64, 128], 24, 5).train(train)
    for p in head.parameters():
        p.data.normal_(0, 0.2)
    ref = copy.deepcopy(head)
    feats = [f.detach().requires_grad_() for f in tiny_swin(embed_dim=16).eval()(torch.randn(2, 3, *size))]
    torch.manual_seed(1)
    out = head(feats, size)
    torch.manual_seed(1)  # the same Dropout2d mask
    expected = segformer_head_reference(ref, feats, size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), feats + list(head.parameters()))
    grads_ref = torch.autograd.grad((expected * weight).sum(), feats + list(ref.parameters()))
    names = [f'feat{i}' for i in range(4)] + [n for n, _ in head.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        if train and name.startswith('linear_c.') and name.endswith('.bias'):
            continue  # removed by training-mode BN: both are ~0 (DEAD_BY_DESIGN)
        torch.testing.assert_close(g, g_ref, atol=1e-4 * g_ref.abs().max().item(), rtol=1e-4, msg=name)
    for (name, b), b_ref in zip(head.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_ref, msg=name)
    assert set(head.state_dict()) == {f'linear_c.{i}.{p}' for i in range(4) for p in ('weight', 'bias')} | {
        'linear_fuse.0.weight', 'linear_pred.weight', 'linear_pred.bias'} | {
        f'linear_fuse.1.{k}' for k in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')}


@pytest.mark.slow
def test_heads_convnext_channels_last_equals_channels_first():
    """ConvNeXtHead on channels-last maps equals the same modules run on the channels-first layout."""
    torch.manual_seed(0)
    head = rgbx.ConvNeXtHead(32, 5, dim=16, depth=2).train()
    tokens = torch.randn(2, 7 * 9, 32, requires_grad=True)
    out = head(tokens, (7, 9), (27, 35))
    x = head.proj_dec(tokens).view(2, 7, 9, 4, 4, -1).permute(0, 5, 1, 3, 2, 4).reshape(2, -1, 28, 36)  # (B, C, H/4, W/4)
    expected = rgbx.resize_logits(head.final_layer(head.blocks(x)), (27, 35), 4)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), [tokens] + list(head.parameters()))
    for g, g_ref in zip(grads, torch.autograd.grad(expected.square().sum(), [tokens] + list(head.parameters()))):
        torch.testing.assert_close(g, g_ref, atol=1e-5 * g_ref.abs().max().item(), rtol=1e-4)


# --- Draw policy: per-sample draws and loss denominators ---

class RecordingDraws(rgbx.DrawPolicy):
    """The default policy that also records which of its methods were called."""

    def __init__(self):
        self.calls = []

    def draw(self, draw, n, dim=0):
        self.calls.append('draw')
        return super().draw(draw, n, dim)

    def count(self, n):
        self.calls.append('count')
        return super().count(n)

    def gather(self, values):
        self.calls.append('gather')
        return values


class ThreadRank(rgbx.DrawPolicy):
    """Rank `rank` of 2 threads meeting at a barrier: GlobalBatch's counts and gathers
    without processes (each thread has its own context, as each process has)."""

    def __init__(self, rank, shared, barrier):
        self.rank, self.shared, self.barrier = rank, shared, barrier

    def exchange(self, value):
        self.shared[self.rank] = value
        self.barrier.wait()
        both = list(self.shared)
        self.barrier.wait()
        return both

    def count(self, n):
        return max(sum(float(v) for v in self.exchange(n)), 1.0) / 2

    def gather(self, values):
        return torch.cat(self.exchange(values))


def on_two_threads(fn, halves):
    """fn(half) on two threads under ThreadRank policies -> their two results."""
    import threading
    shared, barrier, out = [None, None], threading.Barrier(2), [None, None]

    def rank(r):
        with rgbx.draws(ThreadRank(r, shared, barrier)):
            out[r] = fn(*halves[r])
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def test_draws_default_draws_as_plain_torch_and_the_context_restores():
    counts = torch.tensor([[2, 1, 0], [0, 0, 3]])
    torch.manual_seed(0)
    got = rgbx.random_masking(counts, 6)
    torch.manual_seed(0)
    assert torch.equal(got, torch.rand(2, 3, 6).argsort(-1).argsort(-1) >= counts[..., None])
    x = torch.randn(4, 5)
    torch.manual_seed(1)
    dropped = rgbx.Dropout(0.5).train()(x)
    torch.manual_seed(1)
    assert torch.equal(dropped, x * torch.empty(4, 5).bernoulli_(0.5) / 0.5)
    default = rgbx.draw_policy()
    outer, inner = RecordingDraws(), RecordingDraws()
    with rgbx.draws(outer):
        with rgbx.draws(inner):
            assert rgbx.draw_policy() is inner
        assert rgbx.draw_policy() is outer
    assert rgbx.draw_policy() is default and type(default) is rgbx.DrawPolicy


def test_draws_every_draw_and_denominator_goes_through_the_policy():
    """Dropout, stochastic depth, MMST, Gumbel noise, M2IM, the patch masks, the cross-entropy
    mean, OHEM and MaskMentor's masked mean each call the policy in force."""
    torch.manual_seed(0)
    logits, label = torch.randn(2, 3, 4, 4), torch.randint(3, (2, 4, 4))
    calls = {
        'dropout': lambda: rgbx.Dropout(0.5).train()(torch.randn(2, 3)),
        'drop_path': lambda: rgbx.DropPath(0.5).train()(torch.randn(2, 3)),
        'mmst': lambda: nano_ktb().train().embed(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)),
        'gumbel': lambda: rgbx.gumbel_assign(torch.randn(2, 5, 3), noise=True),
        'm2im': lambda: rgbx.m2im_keep_batch(2, 3),
        'counts': lambda: rgbx.visible_counts(torch.ones(2, 3, dtype=torch.bool), 4),
        'patches': lambda: rgbx.random_masking(torch.tensor([[2, 1, 1], [4, 0, 0]]), 4),
        'ce': lambda: rgbx.segmentation_loss(logits, label),
        'ohem': lambda: rgbx.segmentation_loss(logits, label, ohem=True),
        'masked_mean': lambda: rgbx.masked_mean(torch.rand(2, 4, 4), torch.ones(2, 4, dtype=torch.bool), (2, 2)),
    }
    for name, call in calls.items():
        policy = RecordingDraws()
        with rgbx.draws(policy):
            call()
        want = {'ce': {'count'}, 'ohem': {'count', 'gather'}, 'masked_mean': {'count'}}.get(name, {'draw'})
        assert set(policy.calls) == want, (name, policy.calls)


@pytest.mark.parametrize('case', ['hard', 'top_k_with_ties', 'masked_mean'])
def test_draws_two_ranks_compute_the_whole_batch_loss_and_gradient(case):
    """Split over two ranks (threads, counts and gathers exchanged), the mean of the two
    losses and the sum of their gradients / 2 are the whole batch's: OHEM both ways
    (ties at the k-th largest loss included) and the masked mean over samples that have
    masked pixels (one rank's sample has none)."""
    torch.manual_seed(0)
    if case == 'masked_mean':
        loss = torch.rand(4, 4, 4, requires_grad=True)
        mask = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
        fn = lambda l, m: rgbx.masked_mean(l, m, (2, 2))
        args = (loss, mask)
    else:
        label = torch.randint(3, (4, 8, 8))
        label[:, 0] = 255
        logits = F.one_hot(label.clamp(max=2), 3).permute(0, 3, 1, 2).float() * (6.0 if case != 'hard' else 0.3)
        logits[0, :, 5, 1:4] = 0.0  # 3 hard pixels; the other labelled pixels' losses are equal: tied k-th place
        logits.requires_grad_(True)
        fn = lambda z, y: rgbx.segmentation_loss(z, y, ohem=True)
        args = (logits, label)
    whole = fn(*args)
    (grad,) = torch.autograd.grad(whole, args[0])
    halves = [tuple(a[r * 2:(r + 1) * 2] for a in args) for r in range(2)]
    parts = on_two_threads(fn, halves)
    assert rgbx.COMPILED_POLICY[0] is rgbx.draw_policy()  # the threads' policies are gone for compiled code too
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole)
    split = torch.autograd.grad(sum(parts) / 2, args[0])[0]
    torch.testing.assert_close(split, grad)


# ----------------------------------------------------------------------------
# KTB (rgbx.py): MAPA, DSCF, MMST, OHEM, forward, parameter counts, release parity
# ----------------------------------------------------------------------------

# --- MAPA prompts and adapters (docs/ktb.md, parts 2-3) ---

def test_ktb_adapter_added_in_place_equals_the_sum_with_gradients():
    """MAPAAdapter(z, out), which adds into `out` in place with W2's bias as one more rank, equals
    out + 0.5 A_m(z) written with F.linear per stream, in value and in every gradient."""
    torch.manual_seed(0)
    adapter = rgbx.MAPAAdapter(16, 4).eval()
    with torch.no_grad():
        adapter.b1.normal_(std=0.1)
        adapter.b2.normal_(std=0.1)
    z, base = torch.randn(4, 3, 5, 16, requires_grad=True), torch.randn(4, 3, 5, 16, requires_grad=True)
    grad = torch.randn(4, 3, 5, 16)

    def reference(z, base):
        halves = [0.5 * F.linear(F.relu(F.linear(z[2 * m:2 * m + 2], adapter.w1[m], adapter.b1[m, 0])),
                                 adapter.w2[m], adapter.b2[m, 0]) for m in range(2)]
        return base * 1.0 + torch.cat(halves)
    got = adapter(z, base * 1.0)  # `out` is a fresh map in the block; here base * 1.0
    expected = reference(z, base)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(adapter(z), expected - base, atol=1e-6, rtol=1e-5)  # without `out`: the addend
    params = [z, base, adapter.w1, adapter.b1, adapter.w2, adapter.b2]
    for g_got, g_exp in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(g_got, g_exp, atol=1e-5, rtol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the in-place matmul takes out's dtype under autocast
        assert adapter(z, base * 1.0).dtype == torch.float32


def nano_ktb(num_classes=3, x_channels=3, seed=0, **options):
    """KTB on the 'nano' Swin (widths 32..256, window 4): fast enough for a CPU test. Without stochastic
    depth unless asked (train-mode tests compare two passes); build_ktb's default is the release's 0.3."""
    torch.manual_seed(seed)
    return rgbx.build_ktb('nano', num_classes, x_channels, window_size=4, **{'drop_path_rate': 0.0, **options})


def all_adapters(model):
    return [a for stage in model.adapters for a in stage]


@pytest.fixture(scope='module')
def ktb():
    """One nano KTB (3 classes, 3-channel X) shared by the tests that only read it; the others copy it."""
    return nano_ktb(num_classes=3)


def rgbx_batch(B, H=37, W=53, x_channels=3, num_classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, H, W, generator=g), torch.randn(B, x_channels, H, W, generator=g),
            torch.randint(num_classes, (B, H, W), generator=g))


@pytest.mark.slow
def test_ktb_adapters_with_zero_w2_add_exactly_zero(ktb):
    """The `parallel` seam adds A_m(z) and nothing else: with W2 = 0 the block is the frozen block."""
    model = copy.deepcopy(ktb).train()  # train mode: the adapters' dropout is active too
    with torch.no_grad():
        for a in all_adapters(model):
            a.w2.zero_()
    H, W = 7, 9
    for layer, adapters in zip(model.backbone.layers, model.adapters):
        z = torch.randn(4, H, W, layer.blocks[0].norm1.normalized_shape[0])  # 2 streams x batch 2
        layouts = layer.layouts(H, W, z.device)
        for i, (blk, adapter) in enumerate(zip(layer.blocks, adapters)):
            assert torch.equal(blk(z, layouts[i % 2], adapter), blk(z, layouts[i % 2], None))
    # the whole model: the same logits as without adapters
    model.eval()
    rgb, x, _ = rgbx_batch(1)
    with torch.no_grad():
        with_adapters = model(rgb, x)
        adapters, model.adapters = model.adapters, None
        without = model(rgb, x)
        model.adapters = adapters
        assert torch.equal(with_adapters, without)
        # not vacuous: once W2 moves, the adapters change the output
        for a in all_adapters(model):
            a.w2.normal_(std=0.02)
        assert not torch.allclose(model(rgb, x), without)


def test_ktb_adapter_is_its_formula():
    """MAPAAdapter against sec. 3 written per modality with nn.functional (eval: no dropout)."""
    adapter = rgbx.MAPAAdapter(12, 5).eval()
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    z = torch.randn(2 * 3, 4, 6, 12)  # (2B, H, W, C), RGB rows first
    out = adapter(z)
    for m in range(2):
        h = F.relu(F.linear(z[3 * m:3 * (m + 1)], adapter.w1[m], adapter.b1[m, 0]))
        ref = 0.5 * F.linear(h, adapter.w2[m], adapter.b2[m, 0])
        torch.testing.assert_close(out[3 * m:3 * (m + 1)], ref, atol=1e-5, rtol=1e-5)


def test_ktb_prompt_is_its_formula():
    """MAPAPrompt against sec. 2 written out: X_m + X_uni + gamma_m X_uni + beta_m."""
    torch.manual_seed(0)
    prompt = rgbx.MAPAPrompt(16, 4)
    s = torch.randn(2 * 2, 3, 5, 16)
    rgb, x = s[:2], s[2:]
    uni = prompt.w_up(prompt.w_p(torch.cat([prompt.w_rgb(rgb), prompt.w_x(x)], -1)))
    ref = torch.cat([rgb + uni + prompt.gamma[0] * uni + prompt.beta[0], x + uni + prompt.gamma[1] * uni + prompt.beta[1]])
    torch.testing.assert_close(prompt(s), ref, atol=1e-6, rtol=1e-6)


# --- What is trained and what is frozen ---

# Biases whose gradient is 0 by the algebra (float round-off only, < 1e-4 of their weight's): a bias followed by
# BatchNorm in training mode (the heads' linear_c before linear_fuse's BN; DSCF's Q0 conv before its BN),
# and W_k's bias, which adds q.b to every key logit of a query (the softmax ignores it). The release
# has them too and they count in Tables 1-3 (4576 parameters on Swin-B), so they are kept.
DEAD_BY_DESIGN = re.compile(r'(linear_c\.\d+\.bias|query\.0\.bias|w_k\.bias)$')


@pytest.mark.slow
def test_ktb_frozen_untouched_and_every_trainable_param_learns(ktb):
    model = copy.deepcopy(ktb).train()
    # alpha = 1e-3 scales DSCF's attention path (offsets, gate, keys, bias table) down to round-off size.
    # Move it, as training soon does, so that every gradient is clearly non-zero.
    with torch.no_grad():
        for d in model.dscf:
            d.alpha.fill_(1.0)
    trained_parts = ('x_patch_embed.', 'prompts.', 'adapters.', 'dscf.', 's1.', 's2.', 's3.')
    frozen_parts = ('backbone.', 'rgb_norms.', 'x_norms.', 'fuse_norms.')
    names = [n for n, _ in model.named_parameters()]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in names if n.startswith(trained_parts)}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {n for n in names if n.startswith(frozen_parts)}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # every parameter, frozen ones too
    rgb, x, label = rgbx_batch(4)
    label[:, :5] = 255
    torch.manual_seed(2)
    drop = rgbx.mmst_drop(4)
    assert drop.sum(1).tolist() == [1, 1]  # batch 4: one sample without RGB, one without X, two intact
    torch.manual_seed(2)  # the same draw inside the forward
    loss, _ = model(rgb, x, label)
    loss.backward()
    dead = set()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
        elif DEAD_BY_DESIGN.search(n):
            assert p.grad is not None and p.grad.abs().max() < 1e-4 * grads[n[:-len('bias')] + 'weight'].abs().max(), n
            dead.add(n)
        else:
            assert p.grad is not None and p.grad.abs().max() > 1e-7, n  # measured: >= 2e-6
    assert len(dead) == 3 * 4 + 2 * 4
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


# --- DSCF (docs/ktb.md, part 4) ---

def dscf_by_definition(d, f_rgb, f_x):
    """DSCF (docs/ktb.md, part 4) one sample, one offset group and one head at a time, with plain
    grid_sample calls and an explicit softmax: the reference for the batched, grouped layout of DSCF."""
    r, g, h = d.rank, d.groups, d.heads
    c, dh = r // g, r // h
    x, y = d.w_a(f_rgb), d.w_b(f_x)  # (B, H, W, r)
    q0 = d.query(torch.cat([x, y], -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    q = d.w_q(q0)
    B, H, W, _ = x.shape
    queries = rgbx.query_grid(H, W)  # (H*W, 2)
    out = []
    for b in range(B):
        maps = [t[b].permute(2, 0, 1) for t in (x, y, q)]  # (r, H, W) each
        points, sampled = [], []
        for gi in range(g):
            ch = slice(gi * c, (gi + 1) * c)
            off_rgb, off_x = d.offset_rgb(maps[0][None, ch])[0], d.offset_x(maps[1][None, ch])[0]  # (Hk, Wk, 2)
            ref = rgbx.reference_points(*off_rgb.shape[:2])
            p = torch.cat([(ref + off_rgb).clamp(-1, 1).view(-1, 2), (ref + off_x).clamp(-1, 1).view(-1, 2)])  # (2Nk, 2)
            points.append(p)
            sampled.append([F.grid_sample(m[None, ch], p[None, None], mode='bilinear', align_corners=True)[0, :, 0].T
                            for m in maps])  # [F_rgb, F_x, F_q] of this group, (2Nk, c) each
        feat_rgb, feat_x, feat_q = (torch.cat([sampled[gi][i] for gi in range(g)], -1) for i in range(3))  # (2Nk, r)
        w = d.gate(feat_q).softmax(-1)
        s = w[:, :1] * feat_rgb + w[:, 1:] * feat_x
        k, v = d.w_k(s), d.w_v(s)
        heads = []
        for j in range(h):
            ch = slice(j * dh, (j + 1) * dh)
            p = points[j // (h // g)]
            disp = (queries[:, None] - p[None]) / 2  # (H*W, 2Nk, 2)
            bias = F.grid_sample(d.rpe_table[j][None, None], disp[None], mode='bilinear', align_corners=True)[0, 0]
            a = (q[b].reshape(H * W, r)[:, ch] @ k[:, ch].T / math.sqrt(dh) + bias).softmax(-1)
            heads.append(a @ v[:, ch])  # (H*W, dh)
        o = d.w_o(torch.cat(heads, -1)).view(H, W, r)
        out.append(d.w_up(d.alpha * o + d.beta * q0[b]))
    return torch.stack(out)


def test_ktb_dscf_equals_its_definition():
    torch.manual_seed(0)
    d = rgbx.DSCF(16, 8, 2, 2, 4, kernel=3, bias_grid=(4, 5)).eval()
    with torch.no_grad():
        d.alpha.fill_(1.0)
        for off in (d.offset_rgb, d.offset_x):  # offsets of a few pixels, so that the points move
            off.proj.weight.normal_(std=0.3)
        f_rgb, f_x = torch.randn(2, 7, 11, 16), torch.randn(2, 7, 11, 16)
        torch.testing.assert_close(d(f_rgb, f_x), dscf_by_definition(d, f_rgb, f_x), atol=1e-5, rtol=1e-4)


def test_ktb_dscf_points_follow_their_group_and_modality():
    """p_rgb of group g depends only on x's channels of group g, p_x only on y's (sec. 4.3)."""
    torch.manual_seed(0)
    d = rgbx.DSCF(16, 8, 2, 2, 4).eval()
    x, y = torch.randn(1, 7, 11, 8), torch.randn(1, 7, 11, 8)
    with torch.no_grad():
        base = d.sampling_points(x, y)  # (1, g, 2Nk, 2): p_rgb then p_x
        nk = base.shape[2] // 2
        x2 = x.clone()
        x2[..., 4:] += torch.randn(1, 7, 11, 4)  # group 1 of the RGB features
        moved = (d.sampling_points(x2, y) != base).any(-1)[0]  # (g, 2Nk); a point clamped at a corner may stay
        assert moved[1, :nk].float().mean() > 0.8 and not moved[1, nk:].any() and not moved[0].any()
        y2 = y.clone()
        y2[..., :4] += torch.randn(1, 7, 11, 4)  # group 0 of the X features
        moved = (d.sampling_points(x, y2) != base).any(-1)[0]
        assert moved[0, nk:].float().mean() > 0.8 and not moved[0, :nk].any() and not moved[1].any()


@pytest.mark.slow
@pytest.mark.parametrize('stride, groups, heads', [(8, 1, 2), (2, 2, 4), (1, 4, 8)])
def test_ktb_dscf_odd_sizes_batch_equals_one_by_one(stride, groups, heads):
    torch.manual_seed(0)
    dscf = rgbx.DSCF(16, 8, stride, groups, heads).eval()  # eval: BatchNorm uses its running statistics
    with torch.no_grad():
        dscf.alpha.fill_(1.0)  # let the attention path count as much as Q0
        bn = dscf.query[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    for H, W in [(7, 11), (5, 3), (1, 1)]:
        f_rgb, f_x = torch.randn(3, H, W, 16), torch.randn(3, H, W, 16)
        with torch.no_grad():
            out = dscf(f_rgb, f_x)
            points = dscf.sampling_points(dscf.w_a(f_rgb), dscf.w_b(f_x))
            singles = torch.cat([dscf(f_rgb[i:i + 1], f_x[i:i + 1]) for i in range(3)])
        assert out.shape == (3, H, W, 16) and torch.isfinite(out).all()
        # sparse: 2 (H/s)(W/s) sampled keys per group, inside [-1, 1]
        assert points.shape == (3, groups, 2 * math.ceil(H / stride) * math.ceil(W / stride), 2)
        assert points.abs().max() <= 1
        torch.testing.assert_close(out, singles, atol=1e-5, rtol=1e-5)


def test_ktb_dscf_relative_position_bias_on_table_cells():
    """On a query grid equal to bias_grid, (query - key) / 2 falls on cells: the bias is the table entry
    at row (i_q - i_k) + Gh - 1, column (j_q - j_k) + Gw - 1; head j reads the keys of group j // (h/g)."""
    Gh, Gw, h, g, B, Nk = 3, 4, 4, 2, 2, 5
    torch.manual_seed(0)
    table = torch.randn(h, 2 * Gh - 1, 2 * Gw - 1)
    queries = rgbx.query_grid(Gh, Gw)  # (12, 2) in (x, y) order, row-major pixels
    idx = torch.stack([torch.randperm(Gh * Gw)[:Nk] for _ in range(B * g)]).view(B, g, Nk)  # key pixels
    keys = queries[idx]  # (B, g, Nk, 2)
    bias = rgbx.relative_position_bias(table, queries, keys)
    assert bias.shape == (B, h, Gh * Gw, Nk)
    expect = torch.empty(B, h, Gh * Gw, Nk)
    for b in range(B):
        for j in range(h):
            for q in range(Gh * Gw):
                for k in range(Nk):
                    key = int(idx[b, j // (h // g), k])
                    expect[b, j, q, k] = table[j, q // Gw - key // Gw + Gh - 1, q % Gw - key % Gw + Gw - 1]
    torch.testing.assert_close(bias, expect, atol=1e-5, rtol=0)
    # a key half a pixel to the right of a grid point: the mean of two neighbouring columns
    half = keys.clone()
    half[..., 0] += 1 / (Gw - 1)
    key0 = int(idx[0, 0, 0])
    q = Gh * Gw - 1  # bottom-right query, so that the shifted key stays on the table
    bias_half = rgbx.relative_position_bias(table, queries, half)[0, 0, q, 0]
    r, c = q // Gw - key0 // Gw + Gh - 1, q % Gw - key0 % Gw + Gw - 1
    torch.testing.assert_close(bias_half, (table[0, r, c] + table[0, r, c - 1]) / 2, atol=1e-5, rtol=0)


def test_ktb_dscf_reference_points_are_the_release_dat_grid():
    ref = rgbx.reference_points(4, 6)
    # DAT's grid, as the release writes it: linspace(0.5, K - 0.5, K) / (K - 1) * 2 - 1, a little wider than [-1, 1]
    ys, xs = (np.linspace(0.5, k - 0.5, k) / (k - 1) * 2 - 1 for k in (4, 6))
    np.testing.assert_allclose(ref[..., 1].numpy(), np.repeat(ys[:, None], 6, 1), atol=1e-6)
    np.testing.assert_allclose(ref[..., 0].numpy(), np.repeat(xs[None, :], 4, 0), atol=1e-6)
    assert ref[..., 0].max() > 1
    # one key point on an axis: 0.5 / 0 = +inf, which the clamp puts on the bottom / right border
    assert (rgbx.reference_points(1, 3)[..., 1] == math.inf).all()


# --- MMST (docs/ktb.md, part 5) ---

@pytest.mark.slow
def test_ktb_mmst_masks_exactly_the_drawn_samples(ktb):
    model = copy.deepcopy(ktb)
    B = 8
    rgb, x, _ = rgbx_batch(B)
    with torch.no_grad():
        plain = model.eval().embed(rgb, x)  # (2B, h, w, C), nothing masked
        assert (plain.flatten(1).abs().amax(1) > 0).all()
        for seed in range(6):
            torch.manual_seed(seed)
            drop = rgbx.mmst_drop(B)  # the pattern embed will draw with this seed
            torch.manual_seed(seed)
            tokens = model.train().embed(rgb, x)
            for row, dropped in enumerate(drop.flatten().tolist()):  # rows: RGB of samples 0..B-1, then X
                if dropped:
                    assert (tokens[row] == 0).all()
                else:
                    assert torch.equal(tokens[row], plain[row])
            torch.manual_seed(seed)
            assert torch.equal(model.eval().embed(rgb, x), plain)  # never in eval mode
        model.train().mmst = False
        assert torch.equal(model.embed(rgb, x), plain)  # nor with MMST switched off


def test_ktb_embed_zeroes_a_modality_given_as_zeros(ktb):
    """eval.py's missing modality: an all-zero input gives all-zero tokens (and only for that sample)."""
    model = ktb.eval()
    rgb, x, _ = rgbx_batch(3)
    rgb[1], x[2] = 0, 0
    with torch.no_grad():
        tokens = model.embed(rgb, x)
    zero = [bool((t == 0).all()) for t in tokens]
    assert zero == [False, True, False, False, False, True]


@pytest.mark.parametrize('k', [1, 2, 3])
def test_ktb_mmst_batch_4k_exact_counts(k):
    g = torch.Generator().manual_seed(k)
    for _ in range(200):
        drop = rgbx.mmst_drop(4 * k, g)
        assert drop.shape == (2, 4 * k) and drop.dtype == torch.bool
        assert drop[0].sum() == k and drop[1].sum() == k
        assert not (drop[0] & drop[1]).any()  # never both modalities of one sample


def role_frequencies(drop_draws):
    """(n, 2, B) bool -> (B, 3) frequencies of intact / without RGB / without X per sample."""
    d = drop_draws.double()
    return torch.stack([1 - d[:, 0] - d[:, 1], d[:, 0], d[:, 1]], -1).mean(0)


def test_ktb_mmst_distribution_small_batches():
    n = 2000
    g = torch.Generator().manual_seed(0)
    # batch 1: intact, without RGB, without X with probabilities 1/2, 1/4, 1/4
    one = torch.stack([rgbx.mmst_drop(1, g) for _ in range(n)])
    assert not (one[:, 0] & one[:, 1]).any()
    np.testing.assert_allclose(role_frequencies(one)[0].numpy(), [0.5, 0.25, 0.25], atol=0.04)
    # batch 2: always one intact sample and one without RGB or X (a coin flip), either position
    two = torch.stack([rgbx.mmst_drop(2, g) for _ in range(n)])
    dropped = two.any(1)  # (n, 2): sample lost a modality
    assert (dropped.sum(1) == 1).all() and (two.sum((1, 2)) == 1).all()
    np.testing.assert_allclose(two[:, 0].any(1).double().mean().item(), 0.5, atol=0.04)  # RGB vs X
    np.testing.assert_allclose(role_frequencies(two).numpy(), [[0.5, 0.25, 0.25]] * 2, atol=0.04)
    # other sizes: every sample intact / without RGB / without X with 1/2, 1/4, 1/4
    three = torch.stack([rgbx.mmst_drop(3, g) for _ in range(n)])
    np.testing.assert_allclose(role_frequencies(three).numpy(), [[0.5, 0.25, 0.25]] * 3, atol=0.04)
    with pytest.raises(ValueError):
        rgbx.mmst_drop(0)


def test_ktb_mmst_self_teaching_labels_hand_made():
    pred = torch.tensor([[[0, 1, 2], [2, 1, 0]],
                         [[1, 1, 1], [0, 0, 2]]])  # (2, 2, 3) the argmax of S1
    label = torch.tensor([[[0, 2, 2], [255, 1, 1]],
                          [[1, 255, 0], [0, 2, 2]]])
    expect = torch.tensor([[[0, 255, 2], [255, 1, 255]],
                           [[1, 255, 255], [0, 255, 2]]])
    logits = 3 * F.one_hot(pred, 3).permute(0, 3, 1, 2).float() + 0.1 * torch.rand(2, 3, 2, 3)
    logits.requires_grad_(True)
    teach = rgbx.self_teaching_labels(logits, label)
    assert teach.dtype == torch.int64 and torch.equal(teach, expect)
    assert torch.equal(rgbx.self_teaching_labels(logits, label, ignore_index=-1),
                       torch.where(expect == 255, -1, expect).masked_fill(label == 255, -1))


@pytest.mark.slow
def test_ktb_loss_is_the_mmst_formula(ktb):
    """L = CE(S1, gt) + 0.01 (CE(S2, M) + CE(S3, M)), M = gt where argmax S1 is right (eval: no masking)."""
    model = ktb.eval()
    rgb, x, label = rgbx_batch(2)
    label[0, :4] = 255
    with torch.no_grad():
        loss, logits = model(rgb, x, label)
        fused, f_rgb, f_x = model.encode(model.embed(rgb, x))
        s1 = model.s1(fused, (37, 53))
        pred = s1.argmax(1)
        teach = torch.where((pred == label), label, 255)
        ref = F.cross_entropy(s1, label, ignore_index=255) + 0.01 * (
            F.cross_entropy(model.s2(f_rgb, (37, 53)), teach, ignore_index=255)
            + F.cross_entropy(model.s3(f_x, (37, 53)), teach, ignore_index=255))
    assert 0 < (teach != 255).sum() < (label != 255).sum()  # S1 right on some pixels, wrong on others
    torch.testing.assert_close(logits, s1)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


# --- OHEM (CMNeXt's OhemCrossEntropy: thresh 0.7, at least valid // 16 pixels) ---

def ce_by_hand(logits, label):
    """Per-pixel cross-entropy in float64 numpy: logsumexp - logit of the label; 0 where ignored."""
    z = logits.double().numpy().transpose(0, 2, 3, 1).reshape(-1, logits.shape[1])
    y = label.numpy().reshape(-1)
    lse = np.log(np.exp(z).sum(1))
    loss = lse - z[np.arange(len(y)), np.where(y == 255, 0, y)]
    return np.where(y == 255, 0.0, loss), y != 255


@pytest.mark.parametrize('hard', [False, True])
def test_ktb_ohem_reads_nothing_on_the_host(hard):
    """OHEM's selection (either branch: enough hard pixels or the top k) keeps its counts on
    the device: no item, bool, int or boolean indexing; the weights are those of the
    hand-computed rule (test_ktb_ohem_hand_computed_both_branches)."""
    torch.manual_seed(0)
    label = torch.randint(3, (2, 8, 8))
    label[0, :2] = 255
    logits = torch.randn(2, 3, 8, 8) * (4.0 if hard else 0.1)
    logits.scatter_(1, torch.where(label == 255, 0, label)[:, None], 8.0)  # every pixel confident and right...
    if hard:
        logits[1, :, 2:6, 2:6] = -logits[1, :, 2:6, 2:6]  # ...but 16 wrong ones: enough (>= 112 // 16 = 7)
    with HostReads() as reads:
        got = rgbx.segmentation_loss(logits, label, ohem=True)
    assert reads.seen == {}
    loss, valid = ce_by_hand(logits, label)
    above = loss[valid & (loss > -math.log(0.7))]
    assert (len(above) >= 7) == hard
    np.testing.assert_allclose(got.item(), above.mean() if hard else np.sort(loss[valid])[-7:].mean(), rtol=1e-4)


def test_ktb_ohem_two_ranks_give_the_whole_batch_gradient(tmp_path):
    """A nano KTB with OHEM on its three heads (S1 and MMST's S2 / S3), its batch of 4 split
    over two ranks (threads exchanging counts and gathers): the mean of their losses and of
    their gradients are the whole batch's (evaluation mode: no drop and batch statistics
    that differ by rank). Measured: gradients within 5e-6 of the largest. Two real processes
    train alike without OHEM (test_train_two_process_ddp_equals_one_process); with it,
    rounding in the synchronised statistics flips pixels across OHEM's threshold, so that
    comparison is not exact."""
    torch.manual_seed(0)
    cfg = demo_config(tmp_path, method='ktb', backbone='swin-nano', pretrained='none', opts='window_size=4,ohem=true')
    model = tr.build_model(cfg).eval()
    demo = data.build_dataset('demo', '', 'train', crop=(64, 64), train=True)
    rgb, x, label = (torch.stack(t) for t in zip(*[demo[i] for i in range(4)]))
    params = [p for p in model.parameters() if p.requires_grad]
    fn = lambda *batch: model(*batch)[0]
    whole = fn(rgb, x, label)
    grads = torch.autograd.grad(whole, params)
    parts = on_two_threads(fn, [(rgb[r * 2:r * 2 + 2], x[r * 2:r * 2 + 2], label[r * 2:r * 2 + 2]) for r in range(2)])
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole)
    scale = max(g.abs().max() for g in grads)
    for g, split in zip(grads, torch.autograd.grad(sum(parts) / 2, params)):
        torch.testing.assert_close(split, g, rtol=0, atol=2e-5 * scale)


def test_ktb_ohem_hand_computed_both_branches():
    torch.manual_seed(0)
    label = torch.randint(3, (1, 5, 9))
    label.view(-1)[:5] = 255  # 40 labelled pixels -> at least 40 // 16 = 2 kept
    onehot = F.one_hot(torch.where(label == 255, 0, label), 3).permute(0, 3, 1, 2).float()
    easy = 6 * onehot + 0.5 * torch.rand(1, 3, 5, 9)  # every labelled pixel right and confident
    easy[0, :, 0, :5] = torch.tensor([0.0, 9.0, 0.0])[:, None]  # ignored pixels: confidently wrong, must not count
    thresh = -math.log(0.7)

    # fewer hard pixels than 40 // 16: the mean of the 2 largest losses
    loss, valid = ce_by_hand(easy, label)
    assert valid.sum() == 40 and (loss > thresh).sum() == 0
    expect = np.sort(loss)[-2:].mean()
    np.testing.assert_allclose(rgbx.segmentation_loss(easy, label, ohem=True).item(), expect, rtol=1e-5)

    # 1 hard pixel (still fewer than 2): the top 2 again, the hard one among them
    one_hard = easy.clone()
    one_hard[0, :, 3, 4] = 0.0
    loss, _ = ce_by_hand(one_hard, label)
    assert (loss > thresh).sum() == 1
    np.testing.assert_allclose(rgbx.segmentation_loss(one_hard, label, ohem=True).item(),
                               np.sort(loss)[-2:].mean(), rtol=1e-5)

    # enough hard pixels (5 >= 2): the mean over exactly the hard ones
    hard = easy.clone()
    for r, c in [(1, 1), (2, 2), (3, 3), (4, 4), (4, 8)]:
        hard[0, :, r, c] = torch.randn(3)
        hard[0, label[0, r, c], r, c] = -2.0
    loss, valid = ce_by_hand(hard, label)
    assert (loss > thresh).sum() == 5
    np.testing.assert_allclose(rgbx.segmentation_loss(hard, label, ohem=True).item(),
                               loss[loss > thresh].mean(), rtol=1e-5)
    # without OHEM: the mean over the 40 labelled pixels
    np.testing.assert_allclose(rgbx.segmentation_loss(hard, label).item(), loss[valid].mean(), rtol=1e-5)


# --- KTB forward, and one training step on real NYUDv2 samples ---

@pytest.mark.slow
def test_ktb_any_size_one_and_three_channel_x(ktb):
    m3 = ktb.eval()
    m1 = nano_ktb(num_classes=3, x_channels=1, seed=5).eval()
    m1.load_state_dict(m3.state_dict())
    rgb, depth, _ = rgbx_batch(2, x_channels=1)  # 37 x 53: no multiple of the 32-pixel stride
    with torch.no_grad():
        out = m1(rgb, depth)
        assert out.shape == (2, 3, 37, 53) and torch.isfinite(out).all()
        # 1-channel X is the 3-channel model on X repeated to 3 channels
        torch.testing.assert_close(out, m3(rgb, depth.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-5)
        # the batch is the samples one by one (padding and the stacked streams do not mix samples)
        singles = torch.cat([m1(rgb[i:i + 1], depth[i:i + 1]) for i in range(2)])
        torch.testing.assert_close(out, singles, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_ktb_stacked_streams_equal_streams_run_apart(ktb):
    """KTB.encode runs both streams as one batch (RGB rows first); the reference runs each stream by
    itself through the frozen stages with its own adapter (sec. 3), after the prompt of sec. 2."""
    model = copy.deepcopy(ktb).eval()
    with torch.no_grad():
        for a in all_adapters(model):
            a.w2.normal_(std=0.05)
            a.b1.normal_(std=0.05)
        rgb, x, _ = rgbx_batch(2)
        tokens = model.embed(rgb, x)
        fused, f_rgb, f_x = model.encode(tokens)
        streams = [tokens[:2], tokens[2:]]  # RGB, X
        for i, layer in enumerate(model.backbone.layers):
            p = model.prompts[i]
            uni = p.w_up(p.w_p(torch.cat([p.w_rgb(streams[0]), p.w_x(streams[1])], -1)))
            streams = [s + uni + p.gamma[m] * uni + p.beta[m] for m, s in enumerate(streams)]
            for m in range(2):
                adapters = [lambda z, out, a=a, m=m:  # parallel(z, out) = out + 0.5 A_m(z), per stream
                            out + 0.5 * F.linear(F.relu(F.linear(z, a.w1[m], a.b1[m, 0])), a.w2[m], a.b2[m, 0])
                            for a in model.adapters[i]]
                streams[m] = layer(streams[m], adapters)
            a, b = model.rgb_norms[i](streams[0]), model.x_norms[i](streams[1])
            torch.testing.assert_close(f_rgb[i], a.permute(0, 3, 1, 2), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(f_x[i], b.permute(0, 3, 1, 2), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(fused[i], model.fuse_norms[i](model.dscf[i](a, b)).permute(0, 3, 1, 2),
                                       atol=1e-4, rtol=1e-4)
            if layer.downsample is not None:
                streams = [layer.downsample(s) for s in streams]


def test_ktb_init_values_follow_design(ktb):
    """sec. 2-4 and the release's init (its model-wide CMNeXt._init_weights): gamma ~ N(1, 0.02), beta ~
    N(0, 0.02); linears (prompts, adapters W1 and W2, DSCF W_a / W_b / W_up, heads' linear_c) trunc-normal(0.02);
    convolutions and DSCF's 1x1-convolution linears normal with std sqrt(2 / (k*k*out)); biases 0; DSCF alpha
    1e-3 in stages 1-3 and 1 in stage 4, beta 1; the X patch embedding fresh (not a copy of the RGB one)."""
    gammas = torch.cat([p.gamma.flatten() for p in ktb.prompts])
    betas = torch.cat([p.beta.flatten() for p in ktb.prompts])
    assert abs(gammas.mean() - 1) < 0.005 and abs(gammas.std() - 0.02) < 0.003
    assert abs(betas.mean()) < 0.005 and abs(betas.std() - 0.02) < 0.003
    fan_out_std = lambda w: math.sqrt(2 / (w.shape[0] * math.prod(w.shape[2:])))
    groups = {  # weights -> expected std, pooled over the model (each divided by its own expected std)
        'trunc-normal 0.02': [(w, 0.02) for w in [a.w1 for a in all_adapters(ktb)] + [a.w2 for a in all_adapters(ktb)]
                              + [m.weight for p in ktb.prompts for m in (p.w_rgb, p.w_x, p.w_p, p.w_up)]
                              + [m.weight for d in ktb.dscf for m in (d.w_a, d.w_b, d.w_up)]
                              + [m.weight for h in (ktb.s1, ktb.s2, ktb.s3) for m in h.linear_c]],
        'he fan_out, linears': [(m.weight, fan_out_std(m.weight)) for d in ktb.dscf for m in
                                (d.w_q, d.gate[0], d.gate[2], d.w_k, d.w_v, d.w_o, d.offset_rgb.proj, d.offset_x.proj)],
        'he fan_out, convs': [(m.weight, fan_out_std(m.weight)) for m in ktb.modules()
                              if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad],
    }
    for name, pairs in groups.items():
        pooled = torch.cat([(w / std).flatten() for w, std in pairs])
        assert abs(pooled.std().item() - 1) < 0.1 and abs(pooled.mean().item()) < 0.1, name
    trained_biases = [m.bias for m in ktb.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                      and m.bias is not None and m.bias.requires_grad]
    assert len(trained_biases) > 40 and not any(b.any() for b in trained_biases)
    for a in all_adapters(ktb):
        assert not a.b1.any() and not a.b2.any()
    assert [d.alpha.unique().tolist() for d in ktb.dscf] == [[pytest.approx(1e-3)]] * 3 + [[1.0]]
    assert all((d.beta == 1).all() for d in ktb.dscf)
    assert not torch.equal(ktb.x_patch_embed.proj.weight, ktb.backbone.patch_embed.proj.weight)
    # twelve separate fresh output norms (the release's norm{i}, extra_norm{i}, fuse_norm{i}), frozen;
    # the backbone's final norm is not used
    norms = [n for group in (ktb.rgb_norms, ktb.x_norms, ktb.fuse_norms) for n in group]
    assert len({id(n) for n in norms}) == 12 and isinstance(ktb.backbone.norm, torch.nn.Identity)
    assert all((n.weight == 1).all() and not n.bias.any() and not n.weight.requires_grad for n in norms)


def test_ktb_wrong_shapes_raise(ktb):
    model = copy.copy(ktb).eval()  # a shallow copy shares the weights; only x_channels differs
    model.x_channels = 1
    rgb, x, label = rgbx_batch(2, 9, 13, x_channels=1)
    for bad_rgb, bad_x in [(rgb[:, :1], x), (rgb, x.repeat(1, 3, 1, 1)), (rgb, x[..., :12]), (rgb, x[:1]),
                           (rgb[0], x), (rgb, x[:, 0])]:
        with pytest.raises(ValueError):
            model(bad_rgb, bad_x)
    for bad_label in [label.int(), label[:, :8], label[:1], label.float()]:
        with pytest.raises(ValueError):
            model(rgb, x, bad_label)
    with pytest.raises(ValueError):
        rgbx.build_ktb('nano', 5, 2, window_size=4)
    with pytest.raises(ValueError):
        rgbx.build_ktb('nano', 5, 3, window_size=4, adapter_ranks=[2, 2, 2])
    with pytest.raises(ValueError):
        rgbx.DSCF(16, 6, 1, 4, 2)  # rank not divisible by the groups


@pytest.mark.slow
@needs_realdata
def test_ktb_train_step_on_real_nyu():
    ds = data.build_dataset('nyudv2', NYU, 'test', 'depth')
    crop = (slice(200, 264), slice(280, 360))  # a 64 x 80 piece of each 480 x 640 frame
    samples = [ds[i] for i in range(2)]
    rgb = torch.stack([s[0][:, crop[0], crop[1]] for s in samples])
    x = torch.stack([s[1][:, crop[0], crop[1]] for s in samples])
    label = torch.stack([s[2][crop] for s in samples])
    assert rgb.shape == (2, 3, 64, 80) and x.shape == (2, 1, 64, 80) and label.shape == (2, 64, 80)
    assert ((label >= 0) & (label < 40)).any()
    model = nano_ktb(num_classes=40, x_channels=1).train()
    frozen = rgbx.frozen_fingerprint(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-4, weight_decay=0.01)
    head_before = model.s1.linear_pred.weight.detach().clone()
    loss, logits = model(rgb, x, label)
    assert torch.isfinite(loss) and logits.shape == (2, 40, 64, 80)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(model.s1.linear_pred.weight, head_before)
    assert rgbx.frozen_fingerprint(model) == frozen
    loss2, _ = model(rgb, x, label)
    assert torch.isfinite(loss2)


# --- Parameter counts (supplement Tables 1-3, docs/ktb.md, part 6) ---

SWIN_B = dict(dims=[128, 256, 512, 1024], depths=[2, 2, 18, 2])
TABLE_ROWS = [  # (the one rank list changed, the supplement's total trainable parameters in M, 40 classes)
    ({}, 7.5),  # the default row of Tables 1, 2 and 3: ranks C/8, C/16, C/8
    (dict(prompt_ranks=[32, 64, 128, 256]), 8.2),  # Table 1, X~_i rank x2
    (dict(prompt_ranks=[8, 16, 32, 64]), 7.3),  # Table 1, /2
    (dict(adapter_ranks=[64, 64, 64, 64]), 8.9),  # Table 2, constant 64
    (dict(adapter_ranks=[16, 32, 64, 128]), 9.2),  # Table 2, x2
    (dict(adapter_ranks=[4, 8, 16, 32]), 6.7),  # Table 2, /2
    (dict(dscf_ranks=[32, 64, 128, 256]), 9.6),  # Table 3, DSCF rank x2
    (dict(dscf_ranks=[8, 16, 32, 64]), 6.9),  # Table 3, /2
]


def adapter_params(dims, depths, ranks):
    """Design sec. 3 by formula: per block two adapters, each W1 (C x r + r) and W2 (r x C + C)."""
    return sum(d * 2 * (2 * c * r + r + c) for c, d, r in zip(dims, depths, ranks))


def prompt_params(dims, ranks):
    """Design sec. 2 by formula: W_rgb, W_x (C -> r), W_p (2r -> r), W_up (r -> C), gamma and beta (2 x C)."""
    return sum(2 * (c * r + r) + (2 * r * r + r) + (r * c + c) + 4 * c for c, r in zip(dims, ranks))


def test_ktb_x_embedding_layernorm_hides_a_patch_value_at_the_release_init():
    """At the release's zero bias, LayerNorm(W (c x)) = LayerNorm(W x): X's patch embedding cannot tell
    a patch from its positive multiples (a flat depth patch carries no value); x_embed_norm=false can."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    for norm, alike in ((True, True), (False, False)):
        embed = rgbx.build_ktb('nano', 5, 1, fused_head_dim=32, aux_head_dim=16, x_embed_norm=norm).x_patch_embed
        assert torch.equal(embed.proj.bias, torch.zeros_like(embed.proj.bias))
        assert torch.allclose(embed(2.5 * x), embed(x), atol=1e-3) == alike
        assert isinstance(embed.norm, torch.nn.LayerNorm) == norm


@pytest.mark.parametrize('ranks, total', TABLE_ROWS)
def test_ktb_trainable_params_match_supplement_tables(ranks, total):
    with torch.device('meta'):
        model = rgbx.build_ktb('base', 40, 3, **ranks)
    counts = model.param_counts()
    assert abs(counts['trainable'] / 1e6 - total) <= 0.15
    # the parts add up to the total (no stray trainable parameter, e.g. an unfrozen norm) ...
    parts = ('adapters', 'prompting', 'dscf', 'x_patch_embed', 's1', 's2+s3')
    assert sum(counts[p] for p in parts) == counts['trainable']
    # ... and the ranks reach the modules they name
    dims, depths = SWIN_B['dims'], SWIN_B['depths']
    assert counts['adapters'] == adapter_params(dims, depths, ranks.get('adapter_ranks', [c // 16 for c in dims]))
    assert counts['prompting'] == prompt_params(dims, ranks.get('prompt_ranks', [c // 8 for c in dims]))


def test_ktb_swin_b_breakdown_matches_design():
    with torch.device('meta'):
        counts = rgbx.build_ktb('base', 40, 3).param_counts()
    expected = {'adapters': 1.770, 'prompting': 0.576, 'dscf': 1.607, 'dscf_bias_tables': 0.568,
                'x_patch_embed': 0.007, 's1': 2.055, 's2+s3': 1.531}  # docs/ktb.md, part 6, in M
    for part, m in expected.items():
        assert abs(counts[part] / 1e6 - m) <= 0.002, part
    # bias tables by hand: heads [2, 4, 8, 16] x (2*60 - 1) x (2*80 - 1)
    assert counts['dscf_bias_tables'] == 30 * 119 * 159


def test_ktb_swin_l_count():
    # docs/ktb.md, part 6: C/8, C/16, C/8 on Swin-L gives 12.7M. The 16.1M of a secondary
    # summary of the paper is unverified (the paper text is not available), so it is not asserted.
    with torch.device('meta'):
        counts = rgbx.build_ktb('large', 40, 3).param_counts()
    assert abs(counts['trainable'] / 1e6 - 12.7) <= 0.1


# --- Release parity ---
# The KTB release fixture (fixtures/ktb-release, README there): a tiny KTB saved by the authors'
# code, an input pair and the release's eval outputs.

def rel_max_err(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


def test_ktb_release_fixture_every_output_matches():
    """Same weights, same numbers: the release's saved tiny KTB, loaded through load_pretrained, gives the
    release's S1/S2/S3 logits and its fused / RGB / X stage maps (stages not multiples of the window,
    stage 4 smaller than one window) to a relative max error < 1e-5 in fp32."""
    cfg, io = release_fixture()
    model = rgbx.load_pretrained(release_sized_ktb(cfg), KTB_FIXTURE / 'ktb_release_tiny.pth').eval()
    size = io['rgb'].shape[-2:]
    with torch.no_grad():
        fused, f_rgb, f_x = model.encode(model.embed(io['rgb'], io['x']))
        for name, maps in (('fused', fused), ('rgb_stream', f_rgb), ('x_stream', f_x)):
            for i, (got, expected) in enumerate(zip(maps, io[name])):
                assert got.shape == expected.shape and rel_max_err(got, expected) < 1e-5, (name, i)
        for head, maps, name in ((model.s1, fused, 's1_logits'), (model.s2, f_rgb, 's2_logits'),
                                 (model.s3, f_x, 's3_logits')):
            assert rel_max_err(head(maps, size), io[name]) < 1e-5, name
        assert rel_max_err(model(io['rgb'], io['x']), io['s1_logits']) < 1e-5


@pytest.mark.slow
def test_ktb_release_checkpoint_bad_input_names_keys_or_file(tmp_path):
    cfg, _ = release_fixture()
    path = KTB_FIXTURE / 'ktb_release_tiny.pth'
    with pytest.raises(ValueError, match=r's1\.linear_pred\.weight: checkpoint \(5, 64, 1, 1\) vs model \(4, 64, 1, 1\)'):
        rgbx.load_pretrained(release_sized_ktb(cfg, num_classes=4), path)
    with pytest.raises(ValueError, match=r'shape mismatches.*backbone\.patch_embed\.proj\.weight'):
        rgbx.load_pretrained(release_sized_ktb(cfg, embed_dim=64), path)
    with pytest.raises(ValueError, match=r'missing keys \(34\).*adapters\.1\.2\.b1.*backbone\.layers\.1\.blocks\.2'):
        rgbx.load_pretrained(release_sized_ktb(cfg, depths=[2, 4, 2, 2]), path)
    with pytest.raises(ValueError, match='trained KTB of the authors.*not into a SwinTransformer'):
        rgbx.load_pretrained(rgbx.SwinTransformer(embed_dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8)), path)
    sd = torch.load(path, map_location='cpu', weights_only=True)
    torch.save({k: v for k, v in sd.items() if 'MPGBlocks.1.tfts_beta_dte' not in k}, tmp_path / 'part.pth')
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['prompts\.1\.beta'\]"):
        rgbx.load_pretrained(release_sized_ktb(cfg), tmp_path / 'part.pth')
    (tmp_path / 'cut.pth').write_bytes(path.read_bytes()[:100000])
    with pytest.raises(RuntimeError, match='cannot read checkpoint .*cut.pth.*truncated'):
        rgbx.load_pretrained(release_sized_ktb(cfg), tmp_path / 'cut.pth')


def test_ktb_training_defaults_follow_the_release():
    with torch.device('meta'):
        model = rgbx.build_ktb('base', 40, 3)
    rates = [b.drop_path.p for layer in model.backbone.layers for b in layer.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3) and len(rates) == 24  # stochastic depth 0 .. 0.3
    groups = model.param_groups(0.01)  # weight decay on every trainable tensor, biases and norms too
    assert [len(g['params']) for g in groups] == [sum(p.requires_grad for p in model.parameters()), 0]
    assert not rgbx.recipe('ktb', 'nyudv2').x_standardised and rgbx.recipe('gopt', 'nyudv2').x_standardised
    assert data.PRESETS['nyudv2'].x_norm('hha', standardised=False) == ((0.0,) * 3, (1.0,) * 3)  # X as [0, 1]


# ----------------------------------------------------------------------------
# GoPT (rgbx.py)
# ----------------------------------------------------------------------------

# --- Initialisation: xavier-uniform (the paper), or the identity switch (GroupingPrompts: identity) ---

GH, GW = 37, 53  # odd, not a multiple of 16: grid (3, 4), padded


def gopt(variant='gopt', num_classes=5, x_channels=2, **kw):
    torch.manual_seed(0)
    return rgbx.build_gopt('nano', num_classes, x_channels, variant=variant, **kw)


def inputs(x_channels=2, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, GH, GW, generator=g), torch.randn(B, x_channels, GH, GW, generator=g)


def wake_up(model, std=0.05):
    """With identity=True `up` (and the VPT W_l) start at zero, so p = 1 and the prompts have
    no effect; give them small random weights so that the prompts matter."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in (model.prompts.named_parameters() if model.prompts is not None else ()):
            if name.startswith(('up.', 'ups.')):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def foundation(model, rgb):
    """The frozen foundation model F = Psi o B (eq. 1-2): the head on the plain ViT's tokens."""
    grid = (math.ceil(rgb.shape[-2] / 16), math.ceil(rgb.shape[-1] / 16))
    return model.head(model.backbone(rgb)[:, 1:], grid, rgb.shape[-2:])


@pytest.mark.slow
@pytest.mark.parametrize('variant', rgbx.GOPT_VARIANTS)
def test_gopt_is_the_foundation_model_at_init_with_identity(variant):
    model = gopt(variant, identity=True).eval()
    rgb, x = inputs()
    with torch.no_grad():
        out, ref = model(rgb, x), foundation(model, rgb)
        assert out.shape == (2, 5, GH, GW) and torch.isfinite(out).all()
        assert torch.equal(out, ref)
        if variant != 'head_only':
            # control: once the prompts are non-trivial, the output is no longer the foundation's
            assert (wake_up(model)(rgb, x) - ref).abs().max() > 1e-4
            # and the paper's xavier start prompts from the first step
            assert (gopt(variant, identity=False).eval()(rgb, x) - ref).abs().max() > 1e-3


def test_gopt_prompt_parameters_start_xavier_uniform():
    model = gopt('gopt', num_classes=5, prompt_dim=16, identity=False)
    for name, p in model.prompts.named_parameters():
        if name.endswith('bias') or p.ndim == 1:  # LayerNorms are (1, 0), biases 0
            continue
        w = p.reshape(p.shape[0], -1) if name != 'class_tokens' else p[0]
        bound = math.sqrt(6 / sum(w.shape))
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound, name  # uniform up to the bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.25 * bound / math.sqrt(3), name


# --- Gumbel-softmax and straight-through (eq. 8-9) ---

@pytest.mark.parametrize('tau', [1.0, 0.5])
def test_gopt_straight_through_forward_one_hot_gradient_soft(tau):
    logits = torch.randn(2, 7, 5, requires_grad=True)
    upstream = torch.randn(2, 7, 5)
    hard = rgbx.gumbel_assign(logits, tau, hard=True, noise=False)
    soft = rgbx.gumbel_assign(logits, tau, hard=False, noise=False)
    # forward: exactly one-hot, at the argmax of the soft assignment
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.detach().sum(-1), torch.ones(2, 7))
    assert torch.equal(hard.detach().argmax(-1), soft.detach().argmax(-1))
    torch.testing.assert_close(soft, F.softmax(logits / tau, -1), rtol=0, atol=1e-7)
    # backward: the gradient of the soft A (eq. 9), and the softmax Jacobian written out
    g_hard, = torch.autograd.grad(hard, logits, upstream)
    g_soft, = torch.autograd.grad(soft, logits, upstream)
    torch.testing.assert_close(g_hard, g_soft, rtol=0, atol=1e-7)
    A = soft.detach()
    torch.testing.assert_close(g_hard, A * (upstream - (A * upstream).sum(-1, keepdim=True)) / tau,
                               rtol=1e-5, atol=1e-7)
    # with noise, the same seed gives the same noise: same argmax, same gradient
    torch.manual_seed(7)
    hard_n = rgbx.gumbel_assign(logits, tau, hard=True, noise=True)
    torch.manual_seed(7)
    soft_n = rgbx.gumbel_assign(logits, tau, hard=False, noise=True)
    assert torch.equal(hard_n.detach().argmax(-1), soft_n.detach().argmax(-1))
    g_hard_n, = torch.autograd.grad(hard_n, logits, upstream)
    g_soft_n, = torch.autograd.grad(soft_n, logits, upstream)
    torch.testing.assert_close(g_hard_n, g_soft_n, rtol=0, atol=1e-7)
    assert not torch.equal(soft_n, soft)  # the noise was there


def test_gopt_gumbel_noise_is_gumbel_0_1():
    """Gumbel-max trick: with Gumbel(0, 1) noise, argmax(logits + gamma) ~ softmax(logits)."""
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    n = 40000
    hard = rgbx.gumbel_assign(logits.expand(n, -1).clone(), hard=True, noise=True)
    freq = hard.mean(0)
    torch.testing.assert_close(freq, F.softmax(logits, -1), rtol=0, atol=0.01)  # ~4 sigma


# --- Eq. 10 by hand ---

def eq10_by_hand(g, tokens, groups, hard, into_tokens, scale=1.0):
    """The grouping written from the paper, one entry at a time, B = 1:
    A_ij = softmax_j((W_q t_i) . (W_k g_j) * scale) (eq. 8: scale 1; one-hot at the argmax when hard),
    into groups (CUP, eq. 10): out_j = g_j + W_o (sum_i A_ij W_v t_i) / (sum_i A_ij),
    into tokens (ACP):         out_i = t_i + W_o (sum_j A_ij W_v g_j) / (sum_j A_ij).
    An empty group (hard, sum 0) merges nothing: out_j = g_j + W_o 0 (the documented choice);
    a soft group lighter than 1e-6 is divided by 1e-6."""
    def lin(name, v):
        m = getattr(g, name)
        return m.weight @ v + m.bias

    t, c = tokens[0], groups[0]
    S, C, d = len(t), len(c), t.shape[1]
    A = torch.zeros(S, C)
    for i in range(S):
        e = torch.stack([torch.exp(lin('q', t[i]) @ lin('k', c[j]) * scale) for j in range(C)])
        A[i] = F.one_hot(e.argmax(), C).float() if hard else e / e.sum()
    dst, src, M = (t, c, A) if into_tokens else (c, t, A.T)  # M[a, b]: weight of src b in dst a
    out = []
    for a in range(len(dst)):
        merged = torch.zeros(d)
        for b in range(len(src)):
            merged = merged + M[a, b] * lin('v', src[b])
        den = M[a].sum()
        out.append(dst[a] + lin('o', merged / max(den, 1e-6)))
    return torch.stack(out)[None], A[None]


def grouping_example(hard, condition, dim=4, S=5, C=3, scaled=False):
    """A seeded Grouping and (tokens, groups), B = 1, for which condition(A soft (S, C)) holds."""
    for seed in range(200):
        torch.manual_seed(seed)
        g = rgbx.Grouping(dim, hard=hard, scaled=scaled).eval()
        tokens, groups = 0.5 * torch.randn(1, S, dim), 0.5 * torch.randn(1, C, dim)
        with torch.no_grad():
            logits = g.q(tokens) @ g.k(groups).transpose(1, 2) * (dim ** -0.5 if scaled else 1)
        if condition(F.softmax(logits[0], -1)):
            return g, tokens, groups
    raise AssertionError('no example found')


def every_group_used(A):
    return len(A.argmax(-1).unique()) == A.shape[1]


def some_group_empty(A):
    return len(A.argmax(-1).unique()) < A.shape[1]


def soft_sums_at_least_one(A):
    return A.sum(0).min() >= 1


@pytest.mark.parametrize('hard, into_tokens, condition, scaled', [
    (True, False, every_group_used, False),
    (True, False, some_group_empty, False),
    (True, True, some_group_empty, False),
    (False, True, some_group_empty, False),
    (False, False, soft_sums_at_least_one, False),
    (False, False, soft_sums_at_least_one, True),
])
def test_gopt_grouping_eq10_by_hand(hard, into_tokens, condition, scaled):
    g, tokens, groups = grouping_example(hard, condition, scaled=scaled)
    with torch.no_grad():
        out, A_hat = g(tokens, groups, into_tokens=into_tokens)
        ref, A_ref = eq10_by_hand(g, tokens, groups, hard, into_tokens, scale=4 ** -0.5 if scaled else 1.0)
    assert out.shape == ((1, 5, 4) if into_tokens else (1, 3, 4))
    torch.testing.assert_close(A_hat, A_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_gopt_grouping_eq10_soft_light_group():
    g, tokens, groups = grouping_example(False, lambda A: A.sum(0).min() < 0.9)
    with torch.no_grad():
        out, _ = g(tokens, groups)
        ref, _ = eq10_by_hand(g, tokens, groups, hard=False, into_tokens=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_gopt_grouping_hard_gradient_reaches_the_assignment():
    """Eq. 9 inside eq. 10: the hard grouping's gradient w.r.t. q and k is that of the
    same merge computed with A_hat = one_hot + A - sg(A) written out by hand."""
    g, tokens, groups = grouping_example(True, every_group_used)  # eval: no noise
    out, _ = g(tokens, groups)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [g.q.weight, g.k.weight], upstream)
    logits = g.q(tokens) @ g.k(groups).transpose(1, 2)  # eq. 8, unscaled
    A = F.softmax(logits, -1)
    A_hat = F.one_hot(A.argmax(-1), 3).float() + A - A.detach()
    M = A_hat.transpose(1, 2)
    ref = groups + g.o(M @ g.v(tokens) / M.sum(-1, keepdim=True))
    torch.testing.assert_close(out, ref)
    ref_grads = torch.autograd.grad(ref, [g.q.weight, g.k.weight], upstream)
    for a, b in zip(grads, ref_grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --- Noise only in training (gumbel_assign: noise) ---

@pytest.mark.slow
@pytest.mark.parametrize('assignment', ['hard', 'soft'])
def test_gopt_gumbel_noise_only_in_training(assignment):
    model = wake_up(gopt(assignment=assignment))
    rgb, x = inputs()

    def run(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(rgb, x)

    model.eval()
    assert torch.equal(run(0), run(1))
    model.train()
    assert torch.equal(run(0), run(0))  # train mode is deterministic given the seed
    assert any(not torch.equal(run(s), run(s + 100)) for s in range(5))


# --- Prompter chain: eq. 3 and eq. 15, checked with hooks ---

GOPT_GRID = (math.ceil(GH / 16), math.ceil(GW / 16))


@pytest.mark.parametrize('variant, carry_aux', [('gopt', False), ('gopt', True), ('no_acp', False), ('no_cup', False)])
def test_gopt_class_tokens_are_previous_prompts_and_eq3(variant, carry_aux):
    model = wake_up(gopt(variant, carry_aux=carry_aux)).eval()
    prompts = model.prompts
    assert prompts.layers == (0, 1, 2, 3)
    rgb, x = inputs()
    calls, block_in, block_out = [], {}, {}
    hooks = [p.register_forward_hook(lambda m, args, out: calls.append((args, out))) for p in prompts.prompters]
    for l, blk in enumerate(model.backbone.blocks):
        hooks.append(blk.register_forward_pre_hook(lambda m, args, l=l: block_in.__setitem__(l, args[0])))
        hooks.append(blk.register_forward_hook(lambda m, args, out, l=l: block_out.__setitem__(l, out)))
    with torch.no_grad():
        model(rgb, x)
        for h in hooks:
            h.remove()
        assert len(calls) == 4
        B = rgb.shape[0]
        pos = rgbx.resize_pos_embed(model.backbone.pos_embed, model.backbone.grid, GOPT_GRID)[:, 1:]
        (rgb0, aux0, classes0), _ = calls[0]
        assert torch.equal(classes0, prompts.class_tokens.expand(B, -1, -1))  # c^0: the learned class tokens
        torch.testing.assert_close(aux0, prompts.down(prompts.aux_embed(x).flatten(1, 2) + pos))
        for l, ((rgb_in, aux, classes), (prompt, aux_next, classes_next)) in enumerate(calls):
            assert prompt.shape == (B, 12, 55) and classes_next.shape == (B, 5, 55)
            # the prompter reads the RGB tokens entering block l (before the prompt), in the prompt space
            before = model.backbone.embed(rgb)[0] if l == 0 else block_out[l - 1]
            torch.testing.assert_close(rgb_in, prompts.down(before[:, 1:]))
            # eq. 3: block l sees the RGB patch tokens times p = 1 + up(prompt); the cls token is not prompted
            expect = torch.cat([before[:, :1], before[:, 1:] * (1 + prompts.up(prompt))], 1)
            torch.testing.assert_close(block_in[l], expect)
            if l + 1 < len(calls):
                (_, aux_l1, classes_l1), _ = calls[l + 1]
                # aux tokens: CUP's self-attended ones carried, or the first ones (GroupingPrompts: carry_aux)
                assert torch.equal(aux_l1, aux_next if carry_aux else aux0)
                assert torch.equal(classes_l1, classes_next)  # eq. 15: c^{l+1} = P^l
            if variant == 'no_cup':  # without CUP the class tokens stay the learned ones
                assert torch.equal(classes_next, classes0)
            else:
                assert not torch.allclose(classes_next, classes)


# --- Gradients and frozen parameters ---

GROUPING_VARIANTS = tuple(v for v in rgbx.GOPT_VARIANTS if not v.startswith('vpt') and v != 'head_only')


def backward(model, x_channels=2, seed=3):
    rgb, x = inputs(x_channels)
    label = torch.randint(0, 5, (2, GH, GW), generator=torch.Generator().manual_seed(seed))
    label[:, :4] = 255
    model.zero_grad(set_to_none=True)
    loss, logits = model(rgb, x, label)
    loss.backward()
    return loss, logits


@pytest.mark.slow
@pytest.mark.parametrize('variant', rgbx.GOPT_VARIANTS)
def test_gopt_gradients(variant):
    model = gopt(variant, identity=False).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {'backbone.' + n for n, _ in model.backbone.named_parameters()}
    if variant in GROUPING_VARIANTS:
        # with identity=True (the default), up = 0: the first backward reaches `up` and the head only
        identity = gopt(variant).train()
        backward(identity)
        for n, p in identity.prompts.named_parameters():
            assert (p.grad.abs().sum() > 0) == n.startswith('up.'), n
    backward(model)  # the paper's xavier start: every trainable parameter from the first step
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None, n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize('variant', rgbx.GOPT_VARIANTS)
@pytest.mark.parametrize('assignment', ['hard', 'soft'])
def test_gopt_every_variant_forward_backward_odd_size(variant, assignment):
    model = wake_up(gopt(variant, assignment=assignment, x_channels=1)).train()
    loss, logits = backward(model, x_channels=1)
    assert logits.shape == (2, 5, GH, GW) and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('interval, layers', [
    (1, tuple(range(12))), (2, (0, 2, 4, 6, 8, 10)), (4, (0, 4, 8)), (6, (0, 6)), (12, (0,)),
])
def test_gopt_prompter_intervals(interval, layers):
    """Fig. 6: a prompter before every `interval`-th block of a 12-block ViT, from block 0."""
    torch.manual_seed(0)
    model = rgbx.build_gopt('nano', 5, 1, interval=interval, depth=12).eval()
    assert len(model.backbone.blocks) == 12
    assert model.prompts.layers == layers and len(model.prompts.prompters) == len(layers)
    # the prompters really run before those blocks, in order
    seen, block = [], [None]
    hooks = [blk.register_forward_pre_hook(lambda m, a, l=l: block.__setitem__(0, l))
             for l, blk in enumerate(model.backbone.blocks)]
    hooks += [p.register_forward_hook(lambda m, a, o, i=i: seen.append((i, block[0])))
              for i, p in enumerate(model.prompts.prompters)]
    with torch.no_grad():
        model(*inputs(1, B=1))
    for h in hooks:
        h.remove()
    # a prompter runs after block l-1 (the hook above last saw l - 1) and before block l
    assert seen == [(i, l - 1 if l else None) for i, l in enumerate(layers)]
    assert rgbx.build_gopt('nano', 5, 1, variant='vpt_deep', interval=interval, depth=12).prompts.layers == layers
    assert rgbx.build_gopt('nano', 5, 1, variant='gopt_shallow', depth=12).prompts.layers == (0,)


# --- A training step on real NYUDv2 samples ---

@needs_realdata
def test_gopt_train_step_on_nyu():
    ds = data.build_dataset('nyudv2', NYU, 'test', 'depth', crop=(64, 80), train=True, seed=0)
    rgb, x, label = (torch.stack(t) for t in zip(ds[0], ds[1]))
    assert rgb.shape == (2, 3, 64, 80) and x.shape == (2, 1, 64, 80) and label.shape == (2, 64, 80)
    assert (label != 255).any() and label[label != 255].max() < 40
    model = gopt(num_classes=40, x_channels=1).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)  # all of them: frozen ones must not move
    loss, logits = model(rgb, x, label)
    assert torch.isfinite(loss) and logits.shape == (2, 40, 64, 80)
    assert abs(loss.item() - F.cross_entropy(logits, label, ignore_index=255).item()) < 1e-6
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            continue
        assert torch.equal(p, before[n]), n
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert {'prompts.up.weight', 'head.conv2.weight'} <= changed
    # after the step the prompts are no longer the identity
    with torch.no_grad():
        model.eval()
        assert (model(rgb, x) - foundation(model, rgb)).abs().max() > 0


# --- Parameter budget (Table 4) ---

def test_gopt_param_counts_vit_base():
    with torch.device('meta'):
        counts = rgbx.gopt_param_counts('base', 40, 3)
    D, d, C, p, cx, r = 768, 55, 40, 16, 3, 336
    patch_embed = cx * p * p * D + D
    shared = patch_embed + (2 * D + D * d + d) + (d * D + D) + C * d  # aux embed, down (LN + linear), up, c^0
    grouping = 4 * (d * d + d)  # W_q, W_k, W_v, W_o
    cup_norm = 2 * d  # CUP's pre-norm LayerNorm
    vpt_embed, vpt_up = cx * p * p * r + r, r * D + D  # VPT: shared aux embedding of width r, W_l per layer
    head = 2 * D + (D * 256 + 256) + 2 * 256 + (256 * C + C)
    expect = {
        'gopt': shared + 12 * (2 * grouping + cup_norm),  # 976631
        'gopt_shallow': shared + 2 * grouping + cup_norm,  # 704381
        'no_acp': shared + 12 * (grouping + cup_norm),  # 828791
        'no_cup': shared + 12 * grouping,  # 827471
        'vpt_shallow': vpt_embed + vpt_up,  # 517200
        'vpt_deep': vpt_embed + 12 * vpt_up,  # 3364176
        'head_only': 0,
    }
    assert set(counts) == set(rgbx.GOPT_VARIANTS)
    for v, c in counts.items():
        assert c['trainable_without_head'] == c['prompts'] == expect[v], v
        assert c['head'] == head == 209192
        assert c['trainable'] == expect[v] + head
        assert c['backbone'] == 85798656  # ViT-B/16 with its fixed pos_embed
    # Table 4, without the SETR head, each within 0.06M: GoPT 0.97M, GoPT-shallow 0.68M,
    # VPT-shallow 0.54M, VPT-deep 3.39M (w/o ACP and w/o CUP not given: here 0.829M, 0.827M)
    for v, paper in (('gopt', 0.97e6), ('gopt_shallow', 0.68e6), ('vpt_shallow', 0.54e6), ('vpt_deep', 3.39e6)):
        assert abs(counts[v]['trainable_without_head'] - paper) < 0.06e6, v


# --- The reading of ACP (eq. 11-14): literal or aligned; locality of the prompts ---

def test_gopt_acp_literal_is_unchanged():
    """acp=literal gives the outputs the model gave before the option existed (same seed, same
    input: figures recorded from that code), and its prompt is ACP read on CUP's prompts."""
    model = wake_up(gopt('gopt', acp='literal')).eval()
    rgb, x = inputs()
    with torch.no_grad():
        out = model(rgb, x)
    assert out.double().sum().item() == pytest.approx(-830.5076151383182, rel=1e-5)
    torch.testing.assert_close(out[0, :, 5, 7], torch.tensor(
        [0.4625776410102844, 0.17244169116020203, -0.1989871859550476, -0.17585305869579315, -0.3269338607788086]),
        rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1, :, 30, 40], torch.tensor(
        [0.13213932514190674, 0.12055618315935135, -0.40727686882019043, -0.16293558478355408, -0.11891920119524002]),
        rtol=1e-4, atol=1e-5)
    prompter = model.prompts.prompters[0]
    g = torch.Generator().manual_seed(2)
    rgb_t, aux, classes = (torch.randn(2, n, 55, generator=g) for n in (12, 12, 5))
    with torch.no_grad():
        _, prompts, _ = prompter.cup(aux, classes)
        assert torch.equal(prompter(rgb_t, aux, classes)[0], prompter.acp(rgb_t, prompts, prompts))


def _classes_hat(cup, aux, classes):
    """CUP's self-attended class tokens (eq. 4-6, pre-norm), written out for B of any size."""
    z = torch.cat([aux, classes], 1)
    n = cup.norm(z)
    a = torch.softmax(n @ n.transpose(1, 2) / math.sqrt(n.shape[-1]), -1) @ n
    return (z + a)[:, aux.shape[1]:]


@pytest.mark.parametrize('assignment', ['hard', 'soft'])
def test_gopt_acp_aligned_adds_only_the_aligned_term(assignment):
    """acp=aligned: the same parameters (same seed, same values) and the literal prompt plus, at
    each RGB token i, the class-aware prompt of the group CUP gave the aux token at place i
    (hard: P[argmax_j A_ij], soft: sum_j A_ij P_j), written out per token."""
    hard = assignment == 'hard'
    literal = wake_up(gopt('gopt', acp='literal', assignment=assignment)).eval()
    aligned = wake_up(gopt('gopt', acp='aligned', assignment=assignment)).eval()
    assert list(literal.state_dict()) == list(aligned.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(literal.state_dict().values(), aligned.state_dict().values()))
    g = torch.Generator().manual_seed(5)
    B, S, C, d = 2, 12, 5, 55
    rgb_t, aux, classes = torch.randn(B, S, d, generator=g), torch.randn(B, S, d, generator=g), \
        torch.randn(B, C, d, generator=g)
    p_lit, p_al = literal.prompts.prompters[1], aligned.prompts.prompters[1]
    with torch.no_grad():
        out_lit, aux_lit, next_lit = p_lit(rgb_t, aux, classes)
        out_al, aux_al, next_al = p_al(rgb_t, aux, classes)
        assert torch.equal(aux_lit, aux_al) and torch.equal(next_lit, next_al)  # eq. 15 untouched
        # by hand: CUP's self-attended tokens, its logits (eq. 8, no noise in eval) and merged prompts
        aux_hat, prompts, _ = p_al.cup(aux, classes)
        logits = p_al.cup.group.q(aux_hat) @ p_al.cup.group.k(_classes_hat(p_al.cup, aux, classes)).transpose(1, 2)
        term = torch.zeros(B, S, d)
        for b in range(B):
            for i in range(S):
                if hard:
                    term[b, i] = prompts[b, logits[b, i].argmax()]
                else:
                    w = torch.softmax(logits[b, i], -1)
                    term[b, i] = sum(w[j] * prompts[b, j] for j in range(C))
        torch.testing.assert_close(out_al - out_lit, term, rtol=1e-4, atol=1e-5)
        assert term.abs().max() > 0.1  # the term is there
    # the whole model: another output, the same parameter count
    rgb, x = inputs()
    with torch.no_grad():
        assert (aligned(rgb, x) - literal(rgb, x)).abs().max() > 1e-4
    assert aligned.param_counts() == literal.param_counts()


def test_gopt_acp_aligned_identity_gradients_and_options():
    rgb, x = inputs()
    model = gopt('gopt', acp='aligned').eval()
    with torch.no_grad():  # identity at init (up = 0) still holds
        assert torch.equal(model(rgb, x), foundation(model, rgb))
    model = gopt('gopt', acp='aligned', identity=False).train()
    backward(model)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    # reachable through --opts, checked; the ablations without CUP or ACP take it and are unchanged by it
    opts = ev.parse_opts('variant=gopt,acp=aligned')
    built = rgbx.build_model('gopt', 'vit-nano', 5, 2, **opts)
    assert all(p.reading == 'aligned' for p in built.prompts.prompters)
    assert all(p.reading == rgbx.ACP_DEFAULT for p in rgbx.build_gopt('nano', 5, 2).prompts.prompters)
    for variant in ('no_acp', 'no_cup'):
        a, b = wake_up(gopt(variant, acp='aligned')).eval(), wake_up(gopt(variant, acp='literal')).eval()
        with torch.no_grad():
            assert torch.equal(a(rgb, x), b(rgb, x))
    with pytest.raises(ValueError, match="option 'acp' of gopt takes one of literal, aligned, not 'both'"):
        rgbx.build_gopt('nano', 5, 1, acp='both')


def test_gopt_acp_aligned_param_count_vit_base():
    """Table 4's budget: the aligned term adds no parameter (0.977M at ViT-B, paper 0.97M)."""
    with torch.device('meta'):
        counts = {acp: rgbx.build_gopt('base', 40, 3, acp=acp).param_counts()['prompts'] for acp in rgbx.ACP_READINGS}
    assert counts == {'literal': 976631, 'aligned': 976631}


class _PlaceFreeVPT(rgbx.AuxVPT):
    """A prompt that ignores where the aux content is: every token gets 1 + W_l mean_t E(x)_t."""

    def forward(self, l, tokens, e):
        return (1 + self.ups[self.layers.index(l)](e.mean(1, keepdim=True))).expand(-1, e.shape[1], -1), e


@pytest.mark.slow
def test_gopt_locality_by_construction():
    """locality is 1 for a prompt that ignores place (the same change at every token), the cap
    1e6 for one that is a per-token function of the aux image (VPT: no change elsewhere), 0
    when the prompt does not change; the probe changes x inside one patch only."""
    g = torch.Generator().manual_seed(0)
    rgb, x = torch.randn(2, 3, 64, 80, generator=g), torch.randn(2, 1, 64, 80, generator=g)
    torch.manual_seed(0)  # the models' random weights below, whatever ran before
    probe, token, (rows, cols) = rgbx.probe_patch(x, 16, torch.Generator().manual_seed(1))
    assert token == 2 * 5 + 2 and (rows, cols) == (slice(32, 48), slice(32, 48))  # grid 4 x 5, centre (2, 2)
    outside = torch.ones_like(x, dtype=torch.bool)
    outside[..., rows, cols] = False
    assert torch.equal(probe[outside], x[outside]) and (probe[..., rows, cols] != x[..., rows, cols]).all()
    local = wake_up(rgbx.build_gopt('nano', 5, 1, variant='vpt_deep')).eval()
    place_free = rgbx.build_gopt('nano', 5, 1, variant='vpt_deep')
    torch.manual_seed(0)
    place_free.prompts = _PlaceFreeVPT(place_free.backbone.patch_embed, 1, (0, 1, 2, 3), 336, identity=False)
    d_local, d_free = local.diagnostics(rgb, x), place_free.eval().diagnostics(rgb, x)
    assert d_local['locality'] == pytest.approx([1e6] * 4)
    assert d_free['locality'] == pytest.approx([1.0] * 4, rel=1e-6)
    assert rgbx.build_gopt('nano', 5, 1).diagnostics(rgb, x)['locality'] == [0.0] * 4  # identity: p = 1
    for d in (d_local, d_free):
        assert 0 <= d['pred_change_other'] <= 1 and 0 <= d['pred_change_patch'] <= 1
    # the local prompt changes the prediction in its patch more than elsewhere
    assert d_local['pred_change_patch'] > d_local['pred_change_other']
    # by hand: the change at the token over the mean change at the others
    before, after = torch.zeros(1, 4, 2), torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])
    assert rgbx.prompt_locality(before, after, 0) == pytest.approx(5 / 1)


@pytest.mark.slow
def test_gopt_locality_aligned_above_literal():
    """The aligned term carries the aux content at token i's own place: on these inputs the first
    prompter's locality is higher with acp=aligned than literal for each input, and on average."""
    lit, al = [], []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        rgb, x = torch.randn(2, 3, 128, 128, generator=g), torch.randn(2, 1, 128, 128, generator=g)
        a = wake_up(gopt('gopt', acp='aligned', x_channels=1, prompt_dim=16)).diagnostics(rgb, x)['locality']
        b = wake_up(gopt('gopt', acp='literal', x_channels=1, prompt_dim=16)).diagnostics(rgb, x)['locality']
        assert a[0] > b[0], seed
        al.append(a[0])
        lit.append(b[0])
    assert sum(al) > 2 * sum(lit)


# --- Bad input ---

def test_gopt_bad_input():
    model = gopt(x_channels=2).eval()
    rgb, x = inputs(2)
    with torch.no_grad():
        with pytest.raises(ValueError, match='expected rgb'):
            model(rgb, x[:, :1])  # wrong x channel count
        with pytest.raises(ValueError, match='one size'):
            model(rgb, x[..., :-1])  # sizes differ
        with pytest.raises(ValueError):
            model(rgb[:1], x)  # batch sizes differ
        with pytest.raises(ValueError):
            model(torch.cat([rgb, x[:, :1]], 1), x)  # 4-channel "RGB"
        with pytest.raises(ValueError):
            model(rgb[0], x[0])  # no batch dimension
    with pytest.raises(ValueError, match="option 'variant' of gopt takes one of gopt, gopt_shallow"):
        rgbx.build_gopt('nano', 5, 1, variant='vpt_medium')
    with pytest.raises(ValueError, match='assignment'):
        rgbx.build_gopt('nano', 5, 1, assignment='gumbel')
    for interval in (0, -2, 1.5, 'two'):
        with pytest.raises(ValueError, match='interval'):
            rgbx.build_gopt('nano', 5, 1, interval=interval)
    for variant in ('gopt_shallow', 'vpt_shallow'):
        with pytest.raises(ValueError, match='interval'):
            rgbx.build_gopt('nano', 5, 1, variant=variant, interval=2)
    with pytest.raises(ValueError):
        rgbx.build_gopt('nano', 5, 0)
    with pytest.raises(ValueError):
        rgbx.GroupingPrompter(8, cup=False, acp=False)


# --- Diagnostics, recipe, head from a checkpoint ---

def test_gopt_diagnostic_measures_by_hand():
    e = torch.eye(3)[None]  # three orthogonal vectors
    assert rgbx.mean_pairwise_cosine(e) == pytest.approx(0, abs=1e-7)
    assert rgbx.mean_pairwise_cosine(torch.ones(2, 4, 3)) == pytest.approx(1)
    assert rgbx.mean_pairwise_cosine(torch.tensor([[[1.0, 2.0], [-1.0, -2.0]]])) == pytest.approx(-1)
    assert rgbx.token_spread(torch.ones(2, 5, 3)) == pytest.approx(0, abs=1e-7)  # one vector for all tokens
    assert rgbx.token_spread(torch.tensor([[[1.0, 2.0], [-1.0, -2.0]]])) == pytest.approx(1)  # mean 0
    # (1, 0) and (3, 0): mean (2, 0), RMS distance 1, RMS norm sqrt(5)
    assert rgbx.token_spread(torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])) == pytest.approx(5 ** -0.5)
    g = torch.Generator().manual_seed(0)
    n = 40000
    # equal logits over C groups: the noise picks uniformly, argmax without noise is group 0: (C - 1) / C flip
    assert rgbx.noise_flips(torch.zeros(n, 4), g) == pytest.approx(0.75, abs=0.01)
    # two groups a gap delta apart: the difference of two Gumbel(0, 1) is logistic, P(flip) = 1 / (1 + e^delta)
    assert rgbx.noise_flips(torch.tensor([1.0, 0.0]).expand(n, 2), g) == pytest.approx(1 / (1 + math.e), abs=0.01)
    assert rgbx.noise_flips(torch.tensor([100.0, 0.0, 0.0]).expand(n, 3), g) == 0
    assert rgbx.GUMBEL_STD == pytest.approx((-torch.empty(n).exponential_(generator=g).log()).std().item(), abs=0.03)


def test_gopt_diagnostics_sees_a_known_collapse():
    """Plain CUP attention (eq. 6 as written) with C identical class tokens: every class token
    leaves CUP as the same vector (cosine 1), the C logits of a token are equal (spread 0), so
    Gumbel noise decides the group: (C - 1) / C of the argmaxes flip."""
    model = gopt('gopt', num_classes=5, x_channels=1, attention='plain', prompt_dim=16).train()
    with torch.no_grad():
        model.prompts.class_tokens.copy_(torch.randn(1, 1, 16).expand(1, 5, 16))
    g = torch.Generator().manual_seed(4)
    rgb, x = torch.randn(4, 3, 128, 128, generator=g), torch.randn(4, 1, 128, 128, generator=g)
    rng = torch.get_rng_state()
    d = model.diagnostics(rgb, x)
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # mode and global RNG untouched
    assert d['layers'] == [0, 1, 2, 3] and all(len(d[k]) == 4 for k in d if not k.startswith('pred_change'))
    assert d['class_cos'][0] == pytest.approx(1, abs=1e-5)
    assert d['cup_logit_std'][0] < 1e-3
    assert d['cup_flips'][0] == pytest.approx(0.8, abs=0.1)  # 256 tokens, C = 5
    assert all(0 <= v <= 1.0001 for k in ('aux_spread', 'prompt_spread', 'acp_flips') for v in d[k])
    # distinct class tokens (the default, pre-norm residual attention) stay distinct
    assert gopt('gopt', num_classes=5, x_channels=1, prompt_dim=16).diagnostics(rgb, x)['class_cos'][0] < 0.5
    # variants report what they have
    assert rgbx.build_gopt('nano', 5, 1, variant='head_only').diagnostics(rgb, x) == {'layers': []}
    assert set(rgbx.build_gopt('nano', 5, 1, variant='vpt_deep').diagnostics(rgb, x)) == {
        'layers', 'prompt_spread', 'locality', 'pred_change_patch', 'pred_change_other'}
    assert 'class_cos' not in rgbx.build_gopt('nano', 5, 1, variant='no_cup').diagnostics(rgb, x)


def test_gopt_training_logs_diagnostics(tmp_path):
    cfg = tr.resolve(tr.Config(dataset='demo', method='gopt', backbone='vit-nano', pretrained='none', max_steps=2,
                               batch_size=2, crop='32x32', workers=0, eval_every=0, log_every=1,
                               opts='prompt_dim=8,head_dim=16', out_dir=str(tmp_path / 'run')))
    tr.train(cfg)
    lines = [json.loads(l) for l in open(tmp_path / 'run' / 'log.jsonl')]
    assert [l['step'] for l in lines] == [1, 2]
    for l in lines:
        assert l['diagnostics']['layers'] == [0, 1, 2, 3] and len(l['diagnostics']['cup_flips']) == 4


def test_gopt_head_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = rgbx.build_rgb_only('vit-nano', 5, 1, head_dim=16)
    tr.save_checkpoint({'model': rgbx.trainable_state(source)}, str(tmp_path / 'last.pt'))
    model = rgbx.build_gopt('nano', 5, 1, head_dim=16, head_from=str(tmp_path / 'last.pt'))
    for k, v in source.head.state_dict().items():
        assert torch.equal(model.head.state_dict()[k], v), k
    with pytest.raises(ValueError, match='head_from=.*3 classes'):
        rgbx.build_gopt('nano', 3, 1, head_dim=16, head_from=str(tmp_path / 'last.pt'))


def test_gopt_recipe_and_no_augmentation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ('mae.pth', 'swin.pth'):
        (tmp_path / name).write_bytes(b'')  # resolve checks that a pretrained file exists; these are not read
    nyu = tr.resolve(tr.Config(dataset='nyudv2', method='gopt', backbone='vit-base', pretrained='mae.pth'))
    assert (nyu.lr, nyu.epochs, nyu.warmup_epochs, nyu.augment) == (4e-5, 60, 0, 'crop')
    assert nyu.batch_size * nyu.grad_accum == 64
    mine = tr.resolve(tr.Config(dataset='nyudv2', method='gopt', pretrained='mae.pth', lr=1e-4, batch_size=8,
                                augment='full'))
    assert (mine.lr, mine.grad_accum, mine.augment) == (1e-4, 8, 'full')
    ktb = tr.resolve(tr.Config(dataset='nyudv2', method='ktb', pretrained='swin.pth'))
    assert (ktb.lr, ktb.grad_accum, ktb.augment) == (4e-4, 1, 'full')
    demo = tr.resolve(tr.Config(dataset='demo', method='gopt', pretrained='none'))
    assert (demo.lr, demo.grad_accum, demo.augment) == (1e-3, 1, 'full')  # the study's shared recipe
    with pytest.raises(ValueError, match='--augment'):
        tr.resolve(tr.Config(augment='some'))
    # the random crop only: at the full size the training sample is the evaluation sample
    plain = data.build_dataset('demo', '', 'train', train=True, augment=False)
    ref = data.build_dataset('demo', '', 'train')
    for i in range(4):
        plain.set_epoch(i)
        for a, b in zip(plain[i], ref[i]):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------
# MaskMentor (rgbx.py), with MultiMAE parity
# ----------------------------------------------------------------------------

# --- M2IM masking, the STTP schedule and recipes ---

def m2im_exact(K, p):
    """Algorithm 1's distribution over kept subsets, by enumerating its branches:
    every shuffle (prob 1/K!) and every outcome of its coins."""
    dist = {}
    for perm in itertools.permutations(range(K)):
        for coins in itertools.product((True, False), repeat=K - 1):
            pr = math.prod((1 - p) if c else p for c in coins) / math.factorial(K)
            kept = frozenset(perm[i] for i, c in enumerate(coins) if c)
            last = kept | {perm[-1]}
            outcomes = [(last, 1.0)] if not kept else [(last, 1 - p), (kept, p)]
            for subset, q in outcomes:
                dist[subset] = dist.get(subset, 0.0) + pr * q
    return dist


@pytest.mark.parametrize('K,p', [(2, 0.5), (3, 0.5), (3, 0.3)])
def test_maskmentor_m2im_keep_distribution(K, p):
    exact = m2im_exact(K, p)
    assert abs(sum(exact.values()) - 1) < 1e-12 and frozenset() not in exact
    g = torch.Generator().manual_seed(K)
    n = 6000
    draws = [frozenset(torch.nonzero(rgbx.m2im_keep(K, p, generator=g))[:, 0].tolist()) for _ in range(n)]
    assert frozenset() not in draws
    for subset in {frozenset(s) for r in range(1, K + 1) for s in itertools.combinations(range(K), r)}:
        q = exact.get(subset, 0.0)
        assert abs(draws.count(subset) / n - q) < 4.5 * math.sqrt(q * (1 - q) / n) + 1e-3, (subset, q)


def test_maskmentor_patch_masking_exact_counts():
    torch.manual_seed(0)
    B, K, N, T = 5, 3, 12, 6
    keep = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    counts = rgbx.visible_counts(keep, T)
    assert counts.sum(1).eq(T).all() and counts[~keep].eq(0).all()
    mask = rgbx.random_masking(counts, N)
    assert mask.shape == (B, K, N) and torch.equal((~mask).sum(-1), counts)
    with pytest.raises(ValueError, match='same number'):
        rgbx.random_masking(torch.tensor([[2, 1], [1, 1]]), N)


def test_maskmentor_sttp_schedule():
    phases = [rgbx.sttp_phase(s, 2) for s in range(11)]
    assert phases == ['mim', 'mim'] + ['teacher'] * 3 + ['student'] + ['teacher'] * 3 + ['student', 'teacher']
    assert [rgbx.sttp_batch_index(s, 2) for s in range(11)] == [0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    with pytest.raises(ValueError):
        rgbx.sttp_phase(-1, 0)


MM_TINY = dict(dim=32, depth=2, heads=2, img_size=64)


def mm_pretrain(**kw):
    return rgbx.build_maskmentor('nano', 5, 1, stage='pretrain',
                                 **{**MM_TINY, 'decoder_dim': 32, 'decoder_heads': 2, **kw})


def mm_batch(B=2, H=64, W=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 5, (B, H, W), generator=g)
    label[:, :5] = 255
    return torch.randn(B, 3, H, W, generator=g), torch.randn(B, 1, H, W, generator=g), label


@pytest.mark.slow
def test_maskmentor_sttp_student_step_teacher_targets_without_gradient(monkeypatch):
    torch.manual_seed(0)
    model = mm_pretrain()
    calls = []
    original = rgbx.MaskMentorPretrain.decode

    def recording(self, inputs, mask, shown=None):
        out = original(self, inputs, mask, shown)
        calls.append((mask.clone(), out, torch.is_grad_enabled()))
        return out

    monkeypatch.setattr(rgbx.MaskMentorPretrain, 'decode', recording)
    terms = model.losses(*mm_batch(B=4), 'student')
    (mask_t, teacher, grad_t), (mask_s, student, grad_s) = calls
    assert not grad_t and grad_s
    assert all(not t.requires_grad and t.grad_fn is None for _, t in teacher.values())
    assert all(t.requires_grad for _, t in student.values())
    assert mask_s.all(-1).any() and (~mask_s).flatten(1).any(1).all()  # M2IM drops modalities, never all
    cos = [torch.nn.functional.cosine_similarity(student[n][1], teacher[n][1], dim=-1) for n in ('rgb', 'depth', 'semseg')]
    torch.testing.assert_close(terms['token'], (1 - torch.stack(cos)).mean())
    assert set(terms) == {'rgb', 'depth', 'semseg', 'norm_rgb', 'token'}


@pytest.mark.slow
def test_maskmentor_m2im_without_token_loss_runs_no_teacher(monkeypatch):
    """token_weight 0 (the study's 'M2IM' pre-training): the student step is M2IM input with
    pixel losses only, and the teacher's pass, whose tokens nothing would use, is not run."""
    torch.manual_seed(0)
    model = mm_pretrain(token_weight=0.0)
    masks = []
    original = rgbx.MaskMentorPretrain.decode
    monkeypatch.setattr(rgbx.MaskMentorPretrain, 'decode',
                        lambda self, inputs, mask, shown=None: masks.append(mask.clone())
                        or original(self, inputs, mask, shown))
    torch.manual_seed(1)
    terms = model.losses(*mm_batch(B=8), 'student')
    assert len(masks) == 1 and set(terms) == {'rgb', 'depth', 'semseg', 'norm_rgb'}
    assert masks[0].all(-1).any() and (~masks[0]).flatten(1).any(1).all()  # M2IM: some modality dropped, one kept


@pytest.mark.slow
def test_maskmentor_sttp_cycle_changes_shared_weights(monkeypatch):
    torch.manual_seed(0)
    model = mm_pretrain(warmup_steps=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = []
    original = rgbx.MaskMentorPretrain.losses
    monkeypatch.setattr(rgbx.MaskMentorPretrain, 'losses',
                        lambda self, *a: seen.append(a[-1]) or original(self, *a))
    batch = mm_batch()
    shared = model.backbone.encoder[0].attn.qkv.weight
    for step in range(5):  # the phases the model's schedule gives, as train.py passes them
        before = shared.detach().clone()
        batch_index, inputs = model.schedule(step, total_steps=100)
        assert batch_index == (0 if step == 0 else 1)  # one batch for the whole teacher/student cycle
        loss, none = model(*batch, **inputs)
        assert none is None and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        assert not torch.equal(before, shared)
    assert seen == ['mim', 'teacher', 'teacher', 'teacher', 'student']
    assert model.schedule(4, 100) == model.schedule(4, 7)  # warmup_steps given: the run's length does not count
    frac = mm_pretrain()  # warm-up = 0.2 of the run's steps
    assert frac.schedule(19, 100)[1] == {'phase': 'mim'} and frac.schedule(20, 100)[1] == {'phase': 'teacher'}


def test_maskmentor_recipes_and_cosine_schedule():
    pre = tr.resolve(tr.Config(method='maskmentor', backbone='vit-base', opts='stage=pretrain'))
    ft = tr.resolve(tr.Config(method='maskmentor', backbone='vit-base'))
    assert (pre.lr, pre.batch_size, pre.schedule, pre.beta2) == (1e-5, 12, 'cosine', 0.95)
    assert (ft.lr, ft.batch_size, ft.schedule, ft.beta2) == (3e-5, 2, 'cosine', 0.999)
    mine = tr.resolve(tr.Config(method='maskmentor', opts='stage=pretrain', lr=1e-4, schedule='poly', batch_size=4))
    assert (mine.lr, mine.schedule, mine.batch_size) == (1e-4, 'poly', 4)
    assert tr.resolve(tr.Config()).schedule == 'poly'  # other methods keep their recipe
    with pytest.raises(ValueError, match='--schedule'):
        tr.resolve(tr.Config(schedule='step'))
    lrs = [tr.lr_at(s, 110, 10, 1.0, schedule='cosine') for s in (10, 60, 110)]
    assert lrs == pytest.approx([1.0, 0.5, 0.0])


@pytest.mark.slow
def test_maskmentor_sttp_trains_each_batch_for_a_whole_cycle_and_resumes_exactly(tmp_path, monkeypatch):
    """train.py feeds one batch to the 3 teacher + 1 student steps of a cycle (warm-up: 20%
    of 10 steps = 2 MIM steps, one batch each), and a run cut inside a cycle resumes exactly."""
    seen = []
    original = rgbx.MaskMentorPretrain.forward
    monkeypatch.setattr(rgbx.MaskMentorPretrain, 'forward', lambda self, rgb, x, label=None, phase='mim': seen.append(
        (None, phase, rgb.sum().item())) or original(self, rgb, x, label, phase))

    def cfg(name, **kw):
        return tr.resolve(tr.Config(method='maskmentor', backbone='vit-nano', opts=MM_PRE_OPTS, max_steps=10,
                                    batch_size=2, workers=0, log_every=100, save_every=1, lr=1e-3,
                                    out_dir=str(tmp_path / name), **kw))
    tr.train(cfg('whole'))
    phases = [p for _, p, _ in seen]
    assert phases == ['mim', 'mim'] + ['teacher'] * 3 + ['student'] + ['teacher'] * 3 + ['student']
    sums = [v for _, _, v in seen]
    assert len({sums[0], sums[1], sums[2], sums[6]}) == 4  # a new batch per warm-up step and per cycle
    assert len(set(sums[2:6])) == 1 and len(set(sums[6:10])) == 1  # the same batch for a whole cycle
    whole, seen[:] = seen[:], []

    def crash(step):
        if step == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tr.train(cfg('cut'), on_step=crash)
    tr.train(cfg('cut', resume=True))
    assert seen[4:] == whole[4:]  # the cycle's batch is drawn again on resume
    a, b = (torch.load(tmp_path / n / 'last.pt', weights_only=True)['model'] for n in ('whole', 'cut'))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- Fine-tuning ---

def mm_finetune(num_classes=5, **kw):
    return rgbx.build_maskmentor('nano', num_classes, 1, **{**MM_TINY, 'head_dim': 16, 'head_depth': 1, **kw})


def mm_read_nyu(ids, top=200, left=300, H=72, W=88):
    """NYUDv2 samples, cropped: ImageNet-normalised RGB, depth in m standardised
    roughly, label value - 1 with void -> 255."""
    root = REALDATA / 'NYUDepthv2'
    crop = (slice(top, top + H), slice(left, left + W))
    rgb = np.stack([np.asarray(Image.open(root / 'RGB' / f'{i}.png').convert('RGB'), np.float32)[crop] for i in ids])
    rgb = (torch.from_numpy(rgb).permute(0, 3, 1, 2) / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
        / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    depth = np.stack([np.asarray(Image.open(root / 'Depth' / f'{i}.png'), np.float32)[crop] / 1000 for i in ids])
    depth = (torch.from_numpy(depth)[:, None] - 2.5) / 1.5
    label = np.stack([np.asarray(Image.open(root / 'Label' / f'{i}.png'), np.int64)[crop] for i in ids]) - 1
    label = torch.from_numpy(np.where(label < 0, 255, label))
    return rgb, depth, label


@needs_realdata
def test_maskmentor_finetune_missing_modalities_on_nyu():
    torch.manual_seed(0)
    rgb, x, label = mm_read_nyu([0, 432])
    assert label.max() == 255 and label[label != 255].max() < 40
    model = mm_finetune(40).eval()
    with torch.no_grad():
        both, only_rgb, only_d = (model(rgb, x, present=p) for p in (None, ('rgb',), ('depth',)))
        assert both.shape == (2, 40, 72, 88) and torch.isfinite(both).all()
        # eval.py zeroes the missing input: that is absence
        torch.testing.assert_close(model(rgb, torch.zeros_like(x)), only_rgb)
        torch.testing.assert_close(model(torch.zeros_like(rgb), x), only_d)
        torch.testing.assert_close(model(rgb, 3 * x + 1, present=('rgb',)), only_rgb)
        assert (both - only_rgb).abs().max() > 1e-4 and (both - only_d).abs().max() > 1e-4
        rgb3, x3 = rgb[[1, 0, 1]], x[[1, 0, 1]]
        x3[1], rgb3[2] = 0, 0  # RGB-D, RGB-only and depth-only samples in one batch
        mixed = model(rgb3, x3)
        torch.testing.assert_close(mixed, torch.stack([both[1], only_rgb[0], only_d[1]]))
        with pytest.raises(ValueError, match='no modality'):
            model(torch.zeros_like(rgb), torch.zeros_like(x))
        with pytest.raises(ValueError, match='present'):
            model(rgb, x, present=('thermal',))
    model.train()
    loss, logits = model(rgb, x, label)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (2, 40, 72, 88)
    # modality_drop=0 and complete input: every trainable parameter gets a gradient
    full = mm_finetune(40, modality_drop=0.0).train()
    full(rgb, x, label)[0].backward()
    assert all(p.grad is not None for p in full.parameters())


def test_maskmentor_finetune_frozen_backbone_honoured():
    torch.manual_seed(0)
    rgb, x, label = mm_batch(H=48, W=40)
    model = mm_finetune(freeze_backbone=True).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    counts = model.param_counts()
    assert counts['trainable'] == counts['head'] and counts['total'] == counts['head'] + counts['backbone']
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = model.head.final_layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(rgb, x, label)[0].backward()
    opt.step()
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(head, model.head.final_layer.weight)


def test_maskmentor_finetune_depth_standardised_per_image_as_in_pretraining():
    """depth_standardize: fine-tuning sees depth as pre-training does (MultiMAE's per-image truncated
    standardisation), so any affine scaling of the dataset gives the same logits; an absent (all-zero)
    depth stays absent; False feeds depth as the dataset gives it."""
    torch.manual_seed(0)
    rgb, x, _ = mm_batch(B=3, H=32, W=48)
    x = x.abs() + 0.5
    torch.manual_seed(1)
    model = mm_finetune().eval()
    assert model.depth_standardize  # the default: as MultiMAE fine-tunes
    out = model(rgb, x)
    assert torch.allclose(model(rgb, 3.0 * x - 2.0), out, atol=1e-4)  # the dataset's mean / std drop out
    x0 = x.clone()
    x0[1] = 0  # sample 1 has no depth: it is still absent, as if the input were RGB only
    assert torch.allclose(model(rgb, x0)[1], model(rgb[1:2], x[1:2], present=('rgb',))[0], atol=1e-5)
    model.depth_standardize = False
    assert not torch.allclose(model(rgb, 3.0 * x - 2.0), model(rgb, x), atol=1e-2)
    assert torch.allclose(model(rgb, rgbx.standardize_depth(x)), out, atol=1e-5)  # what True feeds the encoder


def test_maskmentor_loads_mae_checkpoint(tmp_path):
    torch.manual_seed(0)
    mae = rgbx.VisionTransformer(**MM_TINY).state_dict()
    assert set(mae) == {k for k in mae if k.startswith(('blocks.', 'norm.', 'patch_embed.'))} | {'cls_token', 'pos_embed'}
    torch.save({'model': {**mae, 'mask_token': torch.zeros(1, 1, 16), 'decoder_embed.weight': torch.zeros(16, 32)}},
               tmp_path / 'mae.pth')
    model = mm_pretrain(pretrained=str(tmp_path / 'mae.pth'))
    enc = model.backbone.state_dict()
    assert torch.equal(enc['global_tokens'], mae['cls_token'] + mae['pos_embed'][:, :1])
    assert torch.equal(enc['input_adapters.rgb.proj.weight'], mae['patch_embed.proj.weight'])
    assert all(torch.equal(enc['encoder.' + k[len('blocks.'):]], v) for k, v in mae.items() if k.startswith('blocks.'))
    del mae['blocks.1.mlp.fc1.weight']
    torch.save(mae, tmp_path / 'broken.pth')
    with pytest.raises(ValueError, match=r'encoder\.1\.mlp\.fc1\.weight'):
        mm_finetune(pretrained=str(tmp_path / 'broken.pth'))


@pytest.mark.slow
def test_maskmentor_pretrain_then_finetune_end_to_end(tmp_path):
    torch.manual_seed(0)
    pre = mm_pretrain(warmup_steps=2)
    opt = torch.optim.AdamW(pre.parameters(), lr=1e-3)
    for step in range(6):  # 2 warm-up MIM, 3 teacher, 1 student iterations on the same batch
        loss, _ = pre(*mm_batch(seed=rgbx.sttp_batch_index(step, 2)), phase=rgbx.sttp_phase(step, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({'model': pre.state_dict()}, tmp_path / 'pretrain.pt')
    ft = rgbx.build_model('maskmentor', 'vit-nano', 5, 1, pretrained=str(tmp_path / 'pretrain.pt'),
                          **MM_TINY, head_dim=16, head_depth=1)
    assert isinstance(ft, rgbx.MaskMentorSeg) and 'backbone.input_adapters.semseg.class_emb.weight' not in ft.state_dict()
    src = pre.backbone.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in ft.backbone.state_dict().items())
    opt = torch.optim.AdamW(ft.parameters(), lr=1e-3)
    rgb, x, label = mm_batch()
    losses = []
    for _ in range(4):
        loss, logits = ft.train()(rgb, x, label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and logits.shape == (2, 5, 64, 80)
    assert not torch.equal(ft.backbone.encoder[1].mlp.fc2.weight, pre.backbone.encoder[1].mlp.fc2.weight)
    ft.eval()
    with torch.no_grad():
        assert ft(rgb, x).shape == (2, 5, 64, 80)


# --- MultiMAE parity ---
# MaskMentor's network is MultiMAE's: the fixture computed by MultiMAE's own code
# (fixtures/multimae, see its README) loads through load_pretrained and matches.

MULTIMAE = Path(__file__).resolve().parent / 'fixtures' / 'multimae'


def multimae_fixture():
    if not (MULTIMAE / 'multimae_tiny.json').exists():
        pytest.skip(f"MultiMAE fixture not found at {MULTIMAE}")
    cfg = json.load(open(MULTIMAE / 'multimae_tiny.json'))['config']
    io = torch.load(MULTIMAE / 'multimae_tiny_io.pt', map_location='cpu', weights_only=True)
    sem, dec = cfg['input_adapters']['semseg'], cfg['output_adapters']['rgb']
    arch = dict(dim=cfg['dim_tokens'], depth=cfg['depth'], heads=cfg['num_heads'], class_dim=sem['dim_class_emb'],
                decoder_dim=dec['dim_tokens'], decoder_depth=dec['depth'], decoder_heads=dec['num_heads'],
                img_size=cfg['adapter_image_size'])
    return arch, sem['num_classes'], io


def rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.slow
def test_maskmentor_multimae_fixture_encoder_and_reconstructions_match():
    arch, classes, io = multimae_fixture()
    model = rgbx.build_maskmentor('nano', classes, 1, stage='pretrain', norm_pix_rgb=False,
                                  pretrained=str(MULTIMAE / 'multimae_tiny.pth'), **arch).eval()
    inputs = {t: io['inputs.' + t] for t in ('rgb', 'depth', 'semseg')}
    cases = {'full': (inputs, {}), 'rgb_only': ({'rgb': inputs['rgb']}, {}),
             'masked': (inputs, {t: io[f'masked.task_masks.{t}'] for t in inputs})}
    with torch.no_grad():
        assert rel_err(model.encode(inputs), io['full.encoder_tokens']) < 1e-4
        assert rel_err(model.encode({'rgb': inputs['rgb']}), io['rgb_only.encoder_tokens']) < 1e-4
        for case, (given, masks) in cases.items():
            preds = model.reconstruct(given, masks)
            for t in inputs:
                assert preds[t].shape == io[f'{case}.preds.{t}'].shape
                assert rel_err(preds[t], io[f'{case}.preds.{t}']) < 1e-4, (case, t)
        # a plausible bug moves the outputs far beyond the tolerance: bilinear instead of bicubic tables
        model.backbone.input_adapters['rgb'].pos_mode = 'bilinear'
        assert rel_err(model.encode(inputs), io['full.encoder_tokens']) > 1e-2


@pytest.mark.slow
def test_maskmentor_multimae_any_size_and_quarter_semseg_map():
    """Any H, W multiple of 16 (here 80 x 144, non-square, another grid than the fixture's):
    predictions at the input sizes, and masked tokens change nothing but what they hide."""
    arch, classes, io = multimae_fixture()
    model = rgbx.build_maskmentor('nano', classes, 1, stage='pretrain', norm_pix_rgb=False,
                                  pretrained=str(MULTIMAE / 'multimae_tiny.pth'), **arch).eval()
    g = torch.Generator().manual_seed(0)
    H, W, N = 80, 144, 5 * 9
    inputs = {'rgb': torch.randn(2, 3, H, W, generator=g), 'depth': torch.randn(2, 1, H, W, generator=g),
              'semseg': torch.randint(0, classes, (2, H // 4, W // 4), generator=g)}
    with torch.no_grad():
        assert model.encode(inputs).shape == (2, 3 * N + 1, arch['dim'])
        masks = {'depth': torch.ones(2, N)}  # depth fully masked = depth not given, for every decoder
        full_mask, absent = model.reconstruct(inputs, masks), model.reconstruct({t: inputs[t] for t in ('rgb', 'semseg')}, {})
        assert full_mask['semseg'].shape == (2, classes, H // 4, W // 4) and full_mask['depth'].shape == (2, 1, H, W)
        for t in inputs:
            torch.testing.assert_close(full_mask[t], absent[t], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='not inputs'):
        model.reconstruct({'rgb': inputs['rgb']}, {'depth': torch.ones(2, N)})
    with pytest.raises(ValueError, match='same number'):
        model.reconstruct(inputs, {'rgb': torch.tensor([[1] * N, [0] * N])})
    with pytest.raises(ValueError, match='token grids'):
        model.encode({'rgb': inputs['rgb'], 'semseg': inputs['semseg'][:, :8]})


def checkpoint_notes(build):
    """build() and the CheckpointNote warnings it raised, one line each."""
    with pytest.warns(rgbx.CheckpointNote) as caught:
        model = build()
    return model, '\n'.join(str(w.message) for w in caught if w.category is rgbx.CheckpointNote) + '\n'


@pytest.mark.slow
def test_maskmentor_multimae_file_loads_for_finetuning_and_names_what_it_ignores(tmp_path):
    arch, classes, io = multimae_fixture()
    sd = torch.load(MULTIMAE / 'multimae_tiny.pth', map_location='cpu', weights_only=True)['model']
    ft, said = checkpoint_notes(lambda: rgbx.build_maskmentor(
        'nano', 40, 1, pretrained=str(MULTIMAE / 'multimae_tiny.pth'), head_dim=16, head_depth=1,
        **{k: v for k, v in arch.items() if not k.startswith(('class', 'decoder'))}))
    assert said.count('\n') == 1 and 'output_adapters.rgb' in said and 'backbone.input_adapters.semseg' in said
    own = ft.state_dict()
    assert all(torch.equal(own['backbone.' + k], v) for k, v in sd.items() if k.startswith(('encoder.', 'global_tokens'))
               or k.startswith(('input_adapters.rgb.', 'input_adapters.depth.')))
    with torch.no_grad():  # the fine-tuning encoder gives MultiMAE's tokens of RGB
        tokens, _ = ft.backbone.embed({'rgb': io['inputs.rgb']})
        assert rel_err(ft.backbone(tokens.flatten(1, 2)), io['rgb_only.encoder_tokens']) < 1e-4
    # a released file's extra norm_rgb decoder: loaded when the model has one, else ignored and named
    extra = {**sd, **{k.replace('output_adapters.rgb.', 'output_adapters.norm_rgb.'): v
                      for k, v in sd.items() if k.startswith('output_adapters.rgb.')}}
    torch.save({'model': extra}, tmp_path / 'released.pth')
    pre = rgbx.build_maskmentor('nano', classes, 1, stage='pretrain', pretrained=str(tmp_path / 'released.pth'), **arch)
    assert torch.equal(pre.output_adapters['norm_rgb'].out_proj.weight, sd['output_adapters.rgb.out_proj.weight'])
    _, said = checkpoint_notes(lambda: rgbx.build_maskmentor('nano', classes, 1, stage='pretrain', norm_pix_rgb=False,
                                                              pretrained=str(tmp_path / 'released.pth'), **arch))
    assert 'ignoring parts this model does not have: output_adapters.norm_rgb' in said
    # another class count (MultiMAE's 133 COCO classes into NYUDv2's 40): re-initialised and said
    torch.manual_seed(0)
    nyu, said = checkpoint_notes(lambda: rgbx.build_maskmentor('nano', 40, 1, stage='pretrain', norm_pix_rgb=False,
                                                                pretrained=str(MULTIMAE / 'multimae_tiny.pth'), **arch))
    assert 'class_emb.weight (5, 32) -> (40, 32)' in said and 're-initialised' in said
    assert torch.equal(nyu.backbone.encoder[0].attn.qkv.weight, sd['encoder.0.attn.qkv.weight'])
    # anything else missing or unexpected: an error listing the keys
    broken = {k: v for k, v in sd.items() if k != 'encoder.1.mlp.fc2.bias'}
    broken['output_adapters.rgb.surprise'] = torch.zeros(1)
    torch.save({'model': broken}, tmp_path / 'broken.pth')
    with pytest.raises(ValueError, match=r"(?s)missing.*encoder\.1\.mlp\.fc2\.bias.*unexpected.*surprise"):
        rgbx.build_maskmentor('nano', classes, 1, stage='pretrain', norm_pix_rgb=False,
                              pretrained=str(tmp_path / 'broken.pth'), **arch)


def test_maskmentor_multimae_pixel_losses_by_hand():
    """MultiMAE's pre-training losses (criterion.py, run_pretraining_multimae.py), by hand."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 10, generator=g).exp()
    flat = x.flatten(1).sort(1).values[:, 8:72]  # 10% .. 90% of 80 values
    expect = (x - flat.mean(1)[:, None, None, None]) / (flat.var(1)[:, None, None, None] + 1e-6).sqrt()
    torch.testing.assert_close(rgbx.standardize_depth(x), expect)
    img = torch.randn(1, 3, 4, 8, generator=g)
    patch = img[:, :, :, 4:]  # the second 4 x 4 patch
    torch.testing.assert_close(rgbx.patch_normalised(img, 4)[:, :, :, 4:],
                               (patch - patch.mean()) / (patch.var() + 1e-6).sqrt())
    loss = torch.arange(2 * 4 * 8, dtype=torch.float).view(2, 4, 8)
    mask = torch.tensor([[True, False], [False, False]])  # sample 0: left token masked; sample 1: none
    torch.testing.assert_close(rgbx.masked_mean(loss, mask, (1, 2)), loss[0, :, :4].mean())
    valid = torch.ones(2, 4, 8, dtype=torch.bool)
    valid[0, 0] = False
    torch.testing.assert_close(rgbx.masked_mean(loss, mask, (1, 2), valid), loss[0, 1:, :4].mean())
    assert rgbx.masked_mean(loss, torch.zeros(2, 2, dtype=torch.bool), (1, 2)) == 0


@pytest.mark.slow
def test_maskmentor_multimae_file_finetunes_with_train_py(tmp_path):
    arch, _, _ = multimae_fixture()
    encoder = ','.join(f'{k}={arch[k]}' for k in ('dim', 'depth', 'heads'))
    out = tr.train(tr.parse_config(['--method', 'maskmentor', '--backbone', 'vit-nano', '--pretrained',
                                    str(MULTIMAE / 'multimae_tiny.pth'), '--opts', encoder + ',head_dim=16,head_depth=1',
                                    '--max-steps', '3', '--workers', '0', '--out-dir', str(tmp_path / 'ft')]))
    assert out['step'] == 3 and 0 <= out['miou'] <= 1
    trained = torch.load(tmp_path / 'ft' / 'last.pt', weights_only=True)['model']
    start = torch.load(MULTIMAE / 'multimae_tiny.pth', weights_only=True)['model']
    assert not torch.equal(trained['backbone.encoder.0.attn.qkv.weight'], start['encoder.0.attn.qkv.weight'])


def test_maskmentor_multimae_encoder_only_file_starts_pretraining_with_fresh_decoders(tmp_path):
    arch, classes, io = multimae_fixture()
    sd = torch.load(MULTIMAE / 'multimae_tiny.pth', map_location='cpu', weights_only=True)['model']
    torch.save({'model': {k: v for k, v in sd.items() if not k.startswith('output_adapters.')}}, tmp_path / 'vit.pth')
    model, said = checkpoint_notes(lambda: rgbx.build_maskmentor('nano', classes, 1, stage='pretrain',
                                                                 pretrained=str(tmp_path / 'vit.pth'), **arch))
    assert 'no decoders' in said
    with torch.no_grad():
        inputs = {t: io['inputs.' + t] for t in ('rgb', 'depth', 'semseg')}
        assert rel_err(model.eval().encode(inputs), io['full.encoder_tokens']) < 1e-4


def test_maskmentor_multimae_tables_stored_for_another_image_size_are_taken_as_stored():
    """MultiMAE interpolates from whatever table a file stores: a model built for 128 px
    tables (8 x 8) takes the file's 14 x 14 tables and gives MultiMAE's numbers."""
    arch, classes, io = multimae_fixture()
    model = rgbx.build_maskmentor('nano', classes, 1, stage='pretrain', norm_pix_rgb=False,
                                  pretrained=str(MULTIMAE / 'multimae_tiny.pth'), **{**arch, 'img_size': 128}).eval()
    assert model.backbone.input_adapters['rgb'].pos_emb.shape[-2:] == (14, 14)
    with torch.no_grad():
        inputs = {t: io['inputs.' + t] for t in ('rgb', 'depth', 'semseg')}
        preds = model.reconstruct(inputs, {t: io[f'masked.task_masks.{t}'] for t in inputs})
        assert all(rel_err(preds[t], io[f'masked.preds.{t}']) < 1e-4 for t in inputs)


def test_maskmentor_too_few_tokens_names_the_crop():
    model = mm_pretrain()  # 5/6: 1 token per modality leaves round(0.5) = 0 visible
    with pytest.raises(ValueError, match='only 1 tokens per modality; use a larger crop'):
        model.budget(1)


def test_maskmentor_multimae_file_without_norm_rgb_decoder_starts_it_fresh(tmp_path):
    arch, classes, io = multimae_fixture()
    sd = torch.load(MULTIMAE / 'multimae_tiny.pth', map_location='cpu', weights_only=True)['model']
    torch.save({'model': {k: v for k, v in sd.items() if not k.startswith('output_adapters.norm_rgb.')}},
               tmp_path / 'no_norm.pth')
    model, said = checkpoint_notes(lambda: rgbx.build_maskmentor('nano', classes, 1, stage='pretrain',
                                                                 pretrained=str(tmp_path / 'no_norm.pth'), **arch))
    assert 'no norm_rgb decoder' in said and 'norm_pix_rgb=False' in said


# ----------------------------------------------------------------------------
# Data (data.py): presets, reading files, bad input, demo, augmentation, HHA
# ----------------------------------------------------------------------------

# --- Presets, labels, palettes ---

def test_data_label_shift_int64_with_explicit_void():
    raw = np.array([[0, 1, 40, 255]], np.uint8)
    assert data.shift_label(raw, 'nyudv2').tolist() == [[255, 0, 39, 255]]
    assert data.shift_label(raw[:, :2], 'mfnet').tolist() == [[0, 1]]  # no shift
    with pytest.raises(ValueError, match=r'lab\.png.*\[41\]'):
        data.shift_label(np.array([[1, 41]], np.uint8), 'nyudv2', 'lab.png')
    with pytest.raises(ValueError, match=r'\[256\]'):  # 256 - 1 = 255 must not pass as ignore
        data.shift_label(np.array([[256]], np.uint16), 'nyudv2')


@needs_realdata
def test_data_palettes():
    npy = np.load(REALDATA / 'nyuv2_meta' / 'nyu40_colormap_256x3.npy')
    assert np.array_equal(data.voc_colormap(), npy)
    nyu = data.palette('nyudv2')
    assert nyu.shape == (256, 3) and nyu.dtype == np.uint8
    assert np.array_equal(nyu[:40], npy[1:41]) and not nyu[255].any()
    mfnet = data.palette('mfnet')
    assert mfnet[:9].tolist() == [[0, 0, 0], [64, 0, 128], [64, 64, 0], [0, 128, 192], [0, 0, 192],
                                  [128, 128, 0], [64, 64, 128], [192, 128, 128], [192, 64, 0]]
    assert np.array_equal(data.palette('pst900')[:5], npy[:5])
    label = np.array([[0, 1], [39, 255]])
    img = data.colorize(label, nyu)
    assert img.shape == (2, 2, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == npy[1].tolist() and img[1, 0].tolist() == npy[40].tolist()
    assert img[1, 1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        data.colorize(np.array([[256]]), nyu)


def test_data_build_dataset_train_uses_the_preset_crop():
    ds = data.build_dataset('demo', '', 'train', train=True)
    rgb, x, label = ds[0]
    assert rgb.shape[1:] == x.shape[1:] == label.shape == data.PRESETS['demo'].crop
    assert data.PRESETS['nyudv2'].crop == (480, 640)


# --- Real samples ---

@needs_realdata
def test_data_nyu_class_names_equal_meta_file():
    names = (REALDATA / 'nyuv2_meta' / 'class_names_40.txt').read_text().splitlines()
    assert data.PRESETS['nyudv2'].class_names == tuple(names)
    assert data.PRESETS['sunrgbd'].num_classes == 37


def denorm(t, mean, std):
    """A normalised (C, H, W) tensor back to its [0, 1] scale as numpy (H, W, C)."""
    return (t * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)).permute(1, 2, 0).numpy()


@needs_realdata
def test_data_nyu_real_rgb_depth():
    ds = data.RGBXDataset(NYU, 'test', 'nyudv2', 'depth')
    assert ds.names == ['0', '432', '463']
    preset = data.PRESETS['nyudv2']
    for i, name in enumerate(ds.names):
        rgb, x, label = ds[i]
        assert rgb.shape == (3, 480, 640) and x.shape == (1, 480, 640) and label.shape == (480, 640)
        assert rgb.dtype == x.dtype == torch.float32 and label.dtype == torch.int64
        # RGB order and scale: back to uint8 it is the PNG as PIL decodes it (R, G, B)
        png_rgb = np.array(Image.open(NYU / 'RGB' / f'{name}.png'))
        assert np.abs(denorm(rgb, *preset.rgb_norm) * 255 - png_rgb).max() < 1e-3
        # depth: millimetres / 10000, holes stay 0
        mm = np.array(Image.open(NYU / 'Depth' / f'{name}.png')).astype(np.float64)
        assert np.abs(denorm(x, *preset.x_norm('depth'))[..., 0] * 10000 - mm).max() < 0.1
        raw = np.array(Image.open(NYU / 'Label' / f'{name}.png')).astype(np.int64)
        assert np.array_equal(label.numpy(), np.where(raw == 0, 255, raw - 1))
    assert sorted(ds[0][2].unique().tolist()) == [0, 1, 2, 4, 6, 11, 21, 23, 25, 37, 38, 39, 255]


@needs_realdata
def test_data_nyu_real_hha_through_a_split_file(tmp_path):
    split = tmp_path / 'hha.txt'
    split.write_text('RGB/0.jpg\tLabel/0.png\n')  # CMX writes .jpg; the files found are RGB/0.png, HHA/0.jpg
    ds = data.RGBXDataset(NYU, split, 'nyudv2', 'hha')
    rgb, x, label = ds[0]
    assert x.shape == (3, 480, 640) and data.PRESETS['nyudv2'].x_channels() == 3
    hha = np.array(Image.open(NYU / 'HHA' / '0.jpg')).astype(np.float64)
    assert np.abs(denorm(x, *data.PRESETS['nyudv2'].x_norm('hha')) * 255 - hha).max() < 1e-3
    assert label.shape == (480, 640)


@needs_realdata
def test_data_nyu_rgb_only_frames_labels_in_range():
    files = sorted((REALDATA / 'NYUDepthv2_rgb_label_only' / 'Label').glob('*.png'))
    assert len(files) == 5
    for f in files:
        label = data.read_label(f, 'nyudv2')
        raw = np.array(Image.open(f)).astype(np.int64)
        assert label.shape == (468, 625) and label.dtype == np.int64
        assert set(np.unique(label)) <= set(range(40)) | {255}
        assert np.array_equal(label, np.where(raw == 0, 255, raw - 1))


@needs_realdata
def test_data_pst900_real_sample(tmp_path):
    split = tmp_path / 'one.txt'
    split.write_text('pst900_readme_sample\n')  # one-column form: the id
    ds = data.RGBXDataset(REALDATA / 'PST900', split, 'pst900')
    assert ds.layout.rgb == 'rgb' and ds.names == ['pst900_readme_sample']
    rgb, x, label = ds[0]
    assert rgb.shape == (3, 720, 1280) and x.shape == (1, 720, 1280) and label.shape == (720, 1280)
    assert set(label.unique().tolist()) == {0, 1, 2, 3}
    thermal = np.array(Image.open(REALDATA / 'PST900' / 'thermal' / 'pst900_readme_sample.png'))
    assert np.abs(denorm(x, *data.PRESETS['pst900'].x_norm())[..., 0] * 255 - thermal).max() < 1e-3


@needs_realdata
def test_data_mfnet_rgba_splits_into_rgb_and_thermal(tmp_path):
    for f in sorted((REALDATA / 'MFNet_unlabeled' / 'rgbt_4ch').glob('*.png')):
        rgba = np.array(Image.open(f))
        rgb, thermal = data.split_rgbt(data.read_rgb(f, alpha=True))
        assert np.array_equal(rgb, rgba[..., :3]) and np.array_equal(thermal[..., 0], rgba[..., 3])
    # MFNet's own layout: images/ hold the RGBA files (linked here), labels/ the classes
    (tmp_path / 'images').mkdir()
    (tmp_path / 'images' / '01234N.png').symlink_to(REALDATA / 'MFNet_unlabeled' / 'rgbt_4ch' / '01234N.png')
    label = np.random.default_rng(0).integers(0, 9, (480, 640)).astype(np.uint8)
    png(tmp_path / 'labels' / '01234N.png', label)
    (tmp_path / 'test.txt').write_text('01234N\n')
    rgb, x, lab = data.build_dataset('mfnet', tmp_path, 'test')[0]
    preset, rgba = data.PRESETS['mfnet'], np.array(Image.open(tmp_path / 'images' / '01234N.png'))
    assert np.abs(denorm(rgb, *preset.rgb_norm) * 255 - rgba[..., :3]).max() < 1e-3
    assert np.abs(denorm(x, *preset.x_norm())[..., 0] * 255 - rgba[..., 3]).max() < 1e-3
    assert np.array_equal(lab.numpy(), label)  # no shift: 0 = unlabelled is a class


@needs_realdata
def test_data_load_pair_real_and_size_mismatch(tmp_path):
    rgb, x = data.load_pair(NYU / 'RGB' / '0.png', NYU / 'Depth' / '0.png', 'nyudv2', 'depth')
    ref_rgb, ref_x, _ = data.RGBXDataset(NYU, 'test', 'nyudv2', 'depth')[0]
    assert torch.equal(rgb, ref_rgb) and torch.equal(x, ref_x)
    png(tmp_path / 'small.png', np.zeros((100, 100), np.uint16))  # depth: 16-bit mm
    with pytest.raises(ValueError, match='disagree'):
        data.load_pair(NYU / 'RGB' / '0.png', tmp_path / 'small.png', 'nyudv2', 'depth')


def test_every_real_data_test_skips_without_the_frames():
    """A clone has no ../shared/realdata: every test that reads it (directly, through NYU
    or through a helper that reads it) carries needs_realdata, so it skips with its reason."""
    import inspect
    functions = {n: f for n, f in globals().items() if inspect.isfunction(f) and f.__module__ == __name__}
    this = test_every_real_data_test_skips_without_the_frames
    readers = {'REALDATA', 'NYU'} | {n for n, f in functions.items()
                                     if not n.startswith('test_') and 'REALDATA' in inspect.getsource(f)}
    reading = {n for n, f in functions.items() if n.startswith('test_') and f is not this
               and readers & set(re.findall(r'\w+', inspect.getsource(f).split(':', 1)[1]))}
    assert len(reading) >= 11
    for name in reading:
        assert needs_realdata.mark in getattr(functions[name], 'pytestmark', []), name


# --- Reading files: bit depths, split files, loader threads ---

@pytest.fixture
def nyu_like(tmp_path):
    """A two-sample NYUDv2-layout dataset of 8x10 images in tmp_path."""
    rng = np.random.default_rng(0)
    for i in range(2):
        png(tmp_path / 'RGB' / f'{i}.png', rng.integers(0, 256, (8, 10, 3), dtype=np.uint8))
        png(tmp_path / 'HHA' / f'{i}.png', rng.integers(0, 256, (8, 10, 3), dtype=np.uint8))
        png(tmp_path / 'Depth' / f'{i}.png', rng.integers(0, 5000, (8, 10)).astype(np.uint16))
        png(tmp_path / 'Label' / f'{i}.png', rng.integers(0, 41, (8, 10)).astype(np.uint8))
    (tmp_path / 'train.txt').write_text('RGB/0.jpg\tLabel/0.png\nRGB/1.jpg Label/1.png\n\n')
    return tmp_path


def png16(path, arr):
    """Write uint16 (H, W) or (H, W, 3) as a PNG of 16 bits per channel (Pillow cannot
    write 16-bit colour): signature, IHDR, one IDAT of unfiltered rows, IEND."""
    h, w = arr.shape[:2]
    chunk = lambda kind, body: (struct.pack('>I', len(body)) + kind + body
                                + struct.pack('>I', zlib.crc32(kind + body)))
    rows = np.concatenate([np.zeros((h, 1), np.uint8), arr.astype('>u2').view(np.uint8).reshape(h, -1)], 1)  # filter 0
    colour = 0 if arr.ndim == 2 else 2  # grey | RGB
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.PNG_SIGNATURE + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, colour, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(rows.tobytes())) + chunk(b'IEND', b''))


def test_data_bit_depth_decides_how_a_file_is_read(nyu_like):
    rng = np.random.default_rng(0)
    # 16-bit grey depth at full precision (the whole 0..65535 range, written by hand)
    mm = rng.integers(0, 65536, (8, 10)).astype(np.uint16)
    png16(nyu_like / 'Depth' / '0.png', mm)
    x = data.read_x(nyu_like / 'Depth' / '0.png', data.DEPTH)
    assert np.array_equal(x[..., 0], mm / np.float32(10000))
    ds = data.RGBXDataset(nyu_like, 'train', 'nyudv2', 'depth')
    # 8-bit depth: never v / 255 for depth in millimetres
    png(nyu_like / 'Depth' / '1.png', rng.integers(0, 256, (8, 10), dtype=np.uint8))
    with pytest.raises(ValueError, match=r'Depth/1\.png is an 8-bit image.*16-bit PNG in millimetres'):
        ds[1]
    # 3 x 16-bit depth: Pillow would keep the high byte only
    png16(nyu_like / 'Depth' / '1.png', np.repeat(mm[..., None], 3, -1))
    assert Image.open(nyu_like / 'Depth' / '1.png').mode == 'RGB'  # what Pillow makes of it
    with pytest.raises(ValueError, match=r'Depth/1\.png stores 16 bits per channel in 3 channels.*1-channel 16-bit PNG'):
        ds[1]
    # 12-bit RGB in a 16-bit PNG (near-black at 8 bits): refused with the conversion
    png16(nyu_like / 'RGB' / '0.png', rng.integers(0, 4096, (8, 10, 3)).astype(np.uint16))
    with pytest.raises(ValueError, match=r'RGB/0\.png stores 16 bits.*round\(v \* 255 / 4095\)'):
        ds[0]
    png16(nyu_like / 'HHA' / '1.png', rng.integers(0, 65536, (8, 10, 3)).astype(np.uint16))
    with pytest.raises(ValueError, match=r'HHA/1\.png stores 16 bits.*round\(v / 257\)'):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2', 'hha')[1]


def test_data_split_file_duplicates_encoding_and_bom(nyu_like):
    (nyu_like / 'train.txt').write_text('RGB/0.jpg Label/0.png\n1\n0\n')
    with pytest.raises(ValueError, match=r"train\.txt: sample '0' is listed twice \(lines 1 and 3\)"):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2')
    (nyu_like / 'train.txt').write_bytes('RGB/0.png\nRGB/caf\u00e9.png\n'.encode('latin-1'))
    with pytest.raises(ValueError, match=r'train\.txt is not UTF-8 text \(byte 0xe9 at offset 17\)'):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2')
    (nyu_like / 'train.txt').write_bytes('RGB/0.png Label/0.png\n1\n'.encode('utf-8-sig'))  # with a byte order mark
    assert data.RGBXDataset(nyu_like, 'train', 'nyudv2').names == ['0', '1']


class ThreadsSeen(torch.utils.data.Dataset):
    """Items report the torch threads of the process that loads them."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.get_num_threads()


def test_data_loader_keeps_workers_and_main_process_to_the_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3})  # a 4-core machine
    monkeypatch.setattr(os, 'getloadavg', lambda: (0.0, 0.0, 0.0))  # and a quiet one
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    try:
        loader = data.loader(ThreadsSeen(), 2, workers=1)
        assert torch.get_num_threads() == 3  # 4 cores - 1 worker
        assert next(iter(loader)).tolist() == [1, 1]  # the worker computes on 1 thread
        data.loader(ThreadsSeen(), 2, workers=0)
        assert torch.get_num_threads() == 4
        data.loader(ThreadsSeen(), 2, workers=4)  # as many workers as cores: the main process keeps 1
        assert torch.get_num_threads() == 1
        monkeypatch.setenv('OMP_NUM_THREADS', '2')  # as torchrun sets it (to 1) per process
        data.loader(ThreadsSeen(), 2, workers=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize('cores,load,omp,threads', [(2, 0.1, None, 2), (2, 1.0, None, 1), (2, 0.6, None, 1),
                                                      (2, 5.0, None, 1), (16, 3.2, None, 13), (2, 1.0, '2', 2)])
def test_data_threads_leave_the_cores_other_processes_keep_busy(monkeypatch, cores, load, omp, threads):
    """On 2 cores beside one busy process (load about 1) the model computes on 1 thread, on a quiet
    machine on every core; OMP_NUM_THREADS, when set, decides; the run says which and why."""
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cores)))
    monkeypatch.setattr(os, 'getloadavg', lambda: (load, load, load))
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    if omp:
        monkeypatch.setenv('OMP_NUM_THREADS', omp)
    n, why = data.core_budget()
    assert n == threads and (f'OMP_NUM_THREADS={omp}' if omp else f'load average {load:.1f}') in why


# --- Bad input ---

def test_data_fake_dataset_loads(nyu_like):
    ds = data.RGBXDataset(nyu_like, 'train', 'nyudv2', 'depth')
    rgb, x, label = ds[1]
    assert rgb.shape == (3, 8, 10) and x.shape == (1, 8, 10) and len(ds) == 2
    mm = np.array(Image.open(nyu_like / 'Depth' / '1.png')).astype(np.float64)
    assert np.abs(denorm(x, *data.PRESETS['nyudv2'].x_norm('depth'))[..., 0] * 10000 - mm).max() < 0.1


def test_data_missing_x_file_names_it(nyu_like):
    (nyu_like / 'HHA' / '1.png').unlink()
    with pytest.raises(FileNotFoundError, match=r'line 2.*HHA/1'):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2', 'hha')


def test_data_missing_rgb_file_names_it(nyu_like):
    (nyu_like / 'RGB' / '0.png').unlink()
    with pytest.raises(FileNotFoundError, match=r'RGB/0\.jpg not found'):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2')


def test_data_unreadable_and_truncated_images(nyu_like):
    good = (nyu_like / 'RGB' / '0.png').read_bytes()
    (nyu_like / 'RGB' / '0.png').write_bytes(b'not an image at all')
    (nyu_like / 'HHA' / '1.png').write_bytes((nyu_like / 'HHA' / '1.png').read_bytes()[:60])
    ds = data.RGBXDataset(nyu_like, 'train', 'nyudv2', 'hha')
    with pytest.raises(ValueError, match=r'RGB/0\.png cannot be decoded'):
        ds[0]
    with pytest.raises(ValueError, match=r'HHA/1\.png cannot be decoded'):
        ds[1]
    (nyu_like / 'RGB' / '0.png').write_bytes(good)
    ds[0]


def test_data_sizes_that_disagree(nyu_like):
    png(nyu_like / 'Depth' / '1.png', np.zeros((8, 11), np.uint16))
    ds = data.RGBXDataset(nyu_like, 'train', 'nyudv2', 'depth')
    with pytest.raises(ValueError, match=r'disagree.*\(8, 11\)'):
        ds[1]


def test_data_label_values_outside_the_classes(nyu_like):
    png(nyu_like / 'Label' / '0.png', np.full((8, 10), 41, np.uint8))
    with pytest.raises(ValueError, match=r'Label/0\.png.*\[41\]'):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2')[0]
    png(nyu_like / 'Label' / '1.png', np.zeros((8, 10, 3), np.uint8))  # colour-coded label
    with pytest.raises(ValueError, match=r"Label/1\.png is a PIL 'RGB' image"):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2')[1]


def test_data_wrong_image_kinds(nyu_like):
    png(nyu_like / 'RGB' / '0.png', np.zeros((8, 10, 4), np.uint8))
    png(nyu_like / 'HHA' / '1.png', np.zeros((8, 10), np.uint8))
    ds = data.RGBXDataset(nyu_like, 'train', 'nyudv2', 'hha')
    with pytest.raises(ValueError, match=r"RGB/0\.png is a PIL 'RGBA' image.*MFNet"):
        ds[0]
    with pytest.raises(ValueError, match=r'HHA/1\.png has 1 channels'):
        ds[1]
    png(nyu_like / 'Thermal' / '0.png', np.zeros((8, 10), np.uint16))
    with pytest.raises(ValueError, match='16-bit'):
        data.read_x(nyu_like / 'Thermal' / '0.png', data.PRESETS['pst900'].modalities['thermal'])


def test_data_grey_saved_as_three_channels_reads_as_one(nyu_like):
    grey = np.random.default_rng(1).integers(0, 256, (8, 10), dtype=np.uint8)
    png(nyu_like / 't.png', np.stack([grey] * 3, -1))
    x = data.read_x(nyu_like / 't.png', data.PRESETS['pst900'].modalities['thermal'])
    assert x.shape == (8, 10, 1) and np.array_equal(x[..., 0], grey / np.float32(255))
    png(nyu_like / 't.png', np.stack([grey, grey, grey // 2], -1))
    with pytest.raises(ValueError, match='3 channels'):
        data.read_x(nyu_like / 't.png', data.PRESETS['pst900'].modalities['thermal'])


def test_data_split_file_problems(nyu_like, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r'val\.txt not found'):
        data.RGBXDataset(nyu_like, 'val', 'nyudv2')
    (tmp_path / 'elsewhere').mkdir()  # nyu_like is tmp_path: run from another folder
    monkeypatch.chdir(tmp_path / 'elsewhere')
    with pytest.raises(FileNotFoundError, match=r'working folder; the data root holds .*train\.txt: '
                                                r'pass --split train '):  # a path, read from here
        data.RGBXDataset(nyu_like, 'train.txt', 'nyudv2')
    (nyu_like / 'test.txt').write_text('\n  \n')
    with pytest.raises(ValueError, match=r'test\.txt is empty'):
        data.RGBXDataset(nyu_like, 'test', 'nyudv2')
    (nyu_like / 'test.txt').write_text('RGB/0.png HHA/0.png Label/0.png\n')
    with pytest.raises(ValueError, match='3 columns'):
        data.RGBXDataset(nyu_like, 'test', 'nyudv2')
    (nyu_like / 'test.txt').write_text('images/0.png\n')
    with pytest.raises(ValueError, match=r'not in the RGB folder RGB/'):
        data.RGBXDataset(nyu_like, 'test', 'nyudv2')


def test_data_unknown_preset_or_modality(nyu_like):
    with pytest.raises(ValueError, match=r"unknown dataset 'nyu'.*nyudv2"):
        data.build_dataset('nyu', nyu_like, 'train')
    with pytest.raises(ValueError, match=r"unknown X modality 'thermal'.*depth.*hha"):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2', 'thermal')


def test_data_missing_dataset_root_describes_the_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape('datasets/NYUDepthv2/{RGB/<id>.jpg|png, HHA/')):
        data.build_dataset('nyudv2', '', 'train')
    with pytest.raises(FileNotFoundError, match=r'images/<id>.*thermal in alpha'):
        data.build_dataset('mfnet', None, 'test')


def test_data_pst900_release_split_folders(tmp_path):
    rng = np.random.default_rng(0)
    for name in ('a', 'b'):
        png(tmp_path / 'test' / 'rgb' / f'{name}.png', rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
        png(tmp_path / 'test' / 'thermal' / f'{name}.png', rng.integers(0, 256, (6, 7), dtype=np.uint8))
        png(tmp_path / 'test' / 'labels' / f'{name}.png', rng.integers(0, 5, (6, 7)).astype(np.uint8))
    ds = data.build_dataset('pst900', tmp_path, 'test')
    assert ds.names == ['a', 'b'] and ds[1][2].shape == (6, 7)


def test_data_release_inputs_depth8_aolp_npy_and_mfnet_layout(tmp_path):
    """The KTB release's inputs: DFormer's 8-bit depth (SUN RGB-D, `depth8`: v / 255, grey stored as 3 equal
    channels read as 1); MCubeS' AoLP from its .npy pair, stacked (sin, cos, sin) as stored in [-1, 1], in its
    release folders; MFNet in the release's rgb/ ther/ labels/ folders."""
    rng = np.random.default_rng(0)
    depth = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    png(tmp_path / 'sun' / 'RGB' / '0.png', rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
    png(tmp_path / 'sun' / 'Depth' / '0.png', np.repeat(depth[..., None], 3, -1))
    png(tmp_path / 'sun' / 'Label' / '0.png', rng.integers(0, 38, (6, 7)).astype(np.uint8))
    (tmp_path / 'sun' / 'test.txt').write_text('0\n')
    x = data.build_dataset('sunrgbd', tmp_path / 'sun', 'test', 'depth8', x_standardised=False)[0][1]
    assert x.shape == (1, 6, 7) and torch.equal(x[0], torch.from_numpy(depth).float() / 255)
    with pytest.raises(ValueError, match='8-bit image'):  # the millimetre reader still refuses 8-bit depth
        data.build_dataset('sunrgbd', tmp_path / 'sun', 'test', 'depth')[0]
    (tmp_path / 'sun' / 'Label').rename(tmp_path / 'sun' / 'labels')  # the KTB release's SUN RGB-D folder
    assert data.build_dataset('sunrgbd', tmp_path / 'sun', 'test', 'depth8')[0][2].shape == (6, 7)

    mc = tmp_path / 'mcubes'
    angle = rng.uniform(-np.pi, np.pi, (6, 7))
    png(mc / 'polL_color' / 'f.png', rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
    png(mc / 'GT' / 'f.png', rng.integers(0, 20, (6, 7)).astype(np.uint8))
    for folder, v in (('polL_aolp_sin', np.sin(angle)), ('polL_aolp_cos', np.cos(angle))):
        (mc / folder).mkdir()
        np.save(mc / folder / 'f.npy', v)
    (mc / 'list_folder').mkdir()
    (mc / 'list_folder' / 'test.txt').write_text('f\n')
    ds = data.build_dataset('mcubes', mc, str(mc / 'list_folder' / 'test.txt'), 'aolp-npy')
    expected = np.stack([np.sin(angle), np.cos(angle), np.sin(angle)]).astype(np.float32)
    assert torch.equal(ds[0][1], torch.from_numpy(expected))
    with pytest.raises(ValueError, match="'aolp' is not stored in the layout"):
        data.build_dataset('mcubes', mc, str(mc / 'list_folder' / 'test.txt'), 'aolp')
    (mc / 'polL_aolp_cos' / 'f.npy').unlink()
    with pytest.raises(FileNotFoundError, match='polL_aolp_cos/f.npy not found'):
        data.build_dataset('mcubes', mc, str(mc / 'list_folder' / 'test.txt'), 'aolp-npy')

    mf = tmp_path / 'mfnet'
    thermal = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    png(mf / 'rgb' / '01202N.png', rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
    png(mf / 'ther' / '01202N.png', thermal)
    png(mf / 'labels' / '01202N.png', rng.integers(0, 9, (6, 7)).astype(np.uint8))
    (mf / 'test.txt').write_text('01202N\n')
    x = data.build_dataset('mfnet', mf, 'test', x_standardised=False)[0][1]
    assert torch.equal(x[0], torch.from_numpy(thermal).float() / 255)


# --- Demo dataset ---

def test_data_demo_deterministic_splits_differ_labels_in_range():
    a, b = data.DemoDataset('train', n=4), data.DemoDataset('train', n=4)
    for i in range(4):
        assert all(torch.equal(u, v) for u, v in zip(a[i], b[i]))
    test, other_seed = data.DemoDataset('test', n=4), data.DemoDataset('train', n=4, seed=1)
    assert not np.array_equal(a.read(0)[0], test.read(0)[0])
    assert not np.array_equal(a.read(0)[0], other_seed.read(0)[0])
    rgb, x, label = a[0]
    assert rgb.shape == (3, 64, 64) and x.shape == (1, 64, 64) and label.dtype == torch.int64
    assert set(torch.cat([a[i][2].flatten() for i in range(4)]).unique().tolist()) <= set(range(5))
    assert len(data.DemoDataset('train')) == 256 and len(data.DemoDataset('test')) == 64


def test_data_demo128_is_the_demo_drawn_at_128():
    ds = data.build_dataset('demo128', '', 'test')
    rgb, x, label = ds[1]
    assert rgb.shape == (3, 128, 128) and x.shape == (1, 128, 128) and label.shape == (128, 128)
    assert np.array_equal(ds.read(1)[2], data.DemoDataset('test', size=128).read(1)[2])
    assert ds.preset is data.PRESETS['demo128'] and ds.preset.class_names == data.PRESETS['demo'].class_names


def pixel_features(ds, n):
    """Per-pixel features of n scenes: chromaticity (3) and depth relative to the
    scene's median (1), labels; invalid depth pixels dropped."""
    feats, labels = [], []
    for i in range(n):
        rgb, depth, label = ds.read(i)
        rgb = rgb.reshape(-1, 3).astype(np.float64) + 1
        d = depth.reshape(-1).astype(np.float64)
        valid = d > 0
        feats.append(np.column_stack([rgb / rgb.sum(1, keepdims=True), d - np.median(d[valid])])[valid])
        labels.append(label.reshape(-1)[valid])
    return np.concatenate(feats), np.concatenate(labels)


def nearest_centroid_miou(train, test, cols):
    (xa, ya), (xb, yb) = train, test
    scale = xa[:, cols].std(0)
    centroids = np.stack([xa[ya == c][:, cols].mean(0) for c in range(5)]) / scale
    pred = np.linalg.norm(xb[:, cols, None] / scale[:, None] - centroids.T[None], axis=1).argmin(1)
    conf = np.bincount(yb * 5 + pred, minlength=25).reshape(5, 5)
    return np.mean(np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf)))


def test_data_demo_needs_both_modalities():
    train = pixel_features(data.DemoDataset('train'), 48)
    test = pixel_features(data.DemoDataset('test'), 24)
    rgb_only = nearest_centroid_miou(train, test, [0, 1, 2])
    depth_only = nearest_centroid_miou(train, test, [3])
    both = nearest_centroid_miou(train, test, [0, 1, 2, 3])
    assert rgb_only < 0.55 and depth_only < 0.55  # each confuses half of the object classes
    assert both > 0.8 and both - max(rgb_only, depth_only) > 0.3


def test_data_demo_x_statistics_match_preset():
    ds = data.DemoDataset('train', n=32)
    x = torch.stack([ds[i][1] for i in range(32)])
    assert abs(x.mean()) < 0.1 and abs(x.std() - 1) < 0.1


def test_data_demo_validation_preset_is_carved_from_the_training_scenes():
    train, val = (data.build_dataset('demo128-val', '', s) for s in ('train', 'test'))
    full, test = (data.build_dataset('demo128', '', s) for s in ('train', 'test'))
    assert (len(train), len(val)) == (192, 64)
    assert train.names + val.names == full.names and not set(val.names) & set(test.names)
    for i, j in ((0, 0), (191, 191)):
        assert torch.equal(train[i][0], full[j][0])
    assert torch.equal(val[0][0], full[192][0]) and torch.equal(val[63][2], full[255][2])


# --- Rendered rooms ---

ROOMS_SIZE = (240, 320)


def rooms_truth(split, index, size=ROOMS_SIZE, seed=0):
    """A rooms scene's geometry (drawn first from its generator), exact depth (H, W) in metres."""
    rng = data.sample_rng(data.ROOMS, seed, data.ROOMS_SPLITS.index(split), index)
    scene = data.room_scene(rng)
    return scene, data.trace(scene, data.rooms_camera(size), size)[0]


@pytest.fixture(scope='module')
def rooms_scenes():
    """Four 240 x 320 training scenes as stored (rgb, raw, depth, label), their HHA, camera
    height and exact depth."""
    scenes = []
    for i in range(4):
        rgb, raw, depth, label = data.rooms_scene(0, 'train', i, ROOMS_SIZE)
        scene, exact = rooms_truth('train', i)
        scenes.append(dict(rgb=rgb, raw=raw, depth=depth, label=label, eye=scene['eye'],
                           exact=exact, hha=data.rooms_hha(depth, data.rooms_camera(ROOMS_SIZE))))
    return scenes


def test_data_rooms_floor_back_projects_to_a_plane_at_the_camera_height(rooms_scenes):
    camera = data.rooms_camera(ROOMS_SIZE)
    for s in rooms_scenes:
        floor = (s['label'] == data.ROOM_IDS['floor']) & (s['raw'] > 0)
        X, Y, Z = data.hha_points(s['raw'] / 1000, camera)
        p = np.stack([X[floor], Y[floor], Z[floor]], 1)
        centre = p.mean(0)
        normal = np.linalg.svd(p - centre, full_matrices=False)[2][2]
        height = abs(centre @ normal)
        assert 1.0 <= height <= 1.6 and abs(height - s['eye'][2]) < 0.02
        assert np.median(np.abs((p - centre) @ normal)) < 0.01  # a plane, up to the sensor's noise
        pitch = np.degrees(np.arcsin(abs(normal[2])))  # the floor normal against the optical axis
        assert 4 <= pitch <= 36
        assert np.degrees(np.arcsin(abs(normal[0]))) < 6  # rolled up to 5 degrees
    assert data.rooms_camera((480, 640)) == pytest.approx(data.NYU_CAMERA)
    fx, fy, cx, cy = data.NYU_CAMERA
    half = [fx / 2, fy / 2, (cx - 0.5) / 2, (cy - 0.5) / 2]  # scaled about pixel centres
    assert data.rooms_camera((240, 320)) == pytest.approx(half)


def test_data_rooms_hha_angle_on_floors_and_walls_height_on_the_floor(rooms_scenes):
    for s in rooms_scenes:
        height, angle = s['hha'][..., 1], s['hha'][..., 2]
        floor, wall = s['label'] == data.ROOM_IDS['floor'], s['label'] == data.ROOM_IDS['wall']
        assert 36 <= np.median(angle[floor]) <= 42 and 125 <= np.median(angle[wall]) <= 131
        assert np.median(height[floor]) <= 10  # cm above the lowest point


def test_data_rooms_raw_depth_has_kinect_noise_and_holes_and_depth_fills_them(rooms_scenes):
    errors = []
    for s in rooms_scenes:
        raw, depth, exact = s['raw'], s['depth'], s['exact']
        measured = raw > 0
        assert 0.01 <= 1 - measured.mean() <= 0.15
        assert not measured[:, 0].any()  # the band the depth camera does not see
        np.testing.assert_array_equal(depth[measured], raw[measured])
        assert (depth > 0).all()
        z = exact[measured]
        assert z.min() >= 0.5 and z.max() <= 8
        errors.append((raw[measured] / 1000 - z) / z ** 2)
    errors = np.concatenate(errors)
    assert abs(np.median(errors)) < 2e-4 and 1.1e-3 < np.std(errors) < 1.8e-3  # sd 1.425e-3 z^2
    steps = np.diff(np.unique(rooms_scenes[0]['raw'][rooms_scenes[0]['raw'] > 3000]))
    assert steps.min() > 15  # disparity quantisation: beyond 3 m, steps of over 1.5 cm


def test_data_rooms_classes_by_geometry_pictures_and_mats_by_colour_only():
    size, seen, colours = (120, 160), set(), {}
    for i in range(30):
        rgb, raw, depth, label = data.rooms_scene(0, 'train', i, size)
        scene, exact = rooms_truth('train', i, size)
        seen |= set(np.unique(label).tolist())
        t, index, part, d = data.trace(scene, data.rooms_camera(size), size)
        flat = (label == data.ROOM_IDS['picture']) | (label == data.ROOM_IDS['mat'])
        assert (index[flat] == -1).all()  # on the wall or floor plane: no depth of their own
        for c in ('cabinet', 'bed', 'chair', 'table', 'bookshelf', 'box'):
            sel = label == data.ROOM_IDS[c]
            if sel.sum() > 20:
                colours.setdefault(c, []).append(rgb[sel].mean(0))
    assert len(seen) >= 12 and seen <= set(data.ROOM_IDS.values())
    means = np.stack([np.mean(v, 0) for v in colours.values()])
    spread = np.mean([np.std(v, 0) for v in colours.values()], 0)
    assert (means.std(0) < 0.35 * spread).all()  # furniture colours from one pool: classes overlap


# version 1, seed 7, 48 x 64: sha256 (16 hex digits) of the files' pixels, in the order of
# data.ROOMS_FOLDERS (RGB, RawDepth, Depth, HHA, Label)
ROOMS_SHA256 = {
    'train_0000': ('f84d1093ee29da58', 'ad090bf8da37fef8', '025974495f85698a', '2ba49292a0ba752e',
                   '8bc17f3316d352a9'),
    'test_0000': ('73daa2e76c48d05b', 'd482f70f714a47f2', 'a18bc7f3298eb8d9', 'd7e66b03e28fd532',
                  '0538f7f574e4efba'),
}


def test_data_rooms_same_seed_and_version_same_files(tmp_path):
    assert data.rooms_folder(tmp_path / 'a', 5, (48, 64), 7) == (5, 0)
    meta = json.loads((tmp_path / 'a' / 'camera.json').read_text())
    assert meta['version'] == data.ROOMS_VERSION == 1 and meta['seed'] == 7
    import hashlib
    for name, want in ROOMS_SHA256.items():
        pixels = [np.array(Image.open(tmp_path / 'a' / f / f'{name}.png'))
                  for f in data.ROOMS_FOLDERS]
        assert tuple(hashlib.sha256(p.tobytes()).hexdigest()[:16] for p in pixels) == want, name
    data.rooms_folder(tmp_path / 'b', 5, (48, 64), 7, workers=2)
    for f in data.ROOMS_FOLDERS:  # the same bytes from other processes
        a, b = (tmp_path / r / f / 'train_0003.png' for r in 'ab')
        assert a.read_bytes() == b.read_bytes()
    other = data.rooms_scene(8, 'train', 0, (48, 64))[0]
    assert not np.array_equal(other, data.rooms_scene(7, 'train', 0, (48, 64))[0])


def test_data_rooms_cli_writes_the_nyudv2_layout_resumes_refuses_other_folders(tmp_path, capsys):
    out = tmp_path / 'rooms'
    res = run_data_cli('rooms', '--out', out, '--scenes', 5, '--size', '48x64', '--seed', 7)
    assert res.returncode == 0 and 'rooms: 5 written, 0 already there' in res.stderr, res.stderr
    cam = json.loads((out / 'camera.json').read_text())
    assert [cam[k] for k in ('fx', 'fy', 'cx', 'cy')] == list(data.rooms_camera((48, 64)))
    assert [cam[k] for k in ('height', 'width', 'seed', 'train', 'test')] == [48, 64, 7, 4, 1]
    assert (out / 'test.txt').read_text() == 'RGB/test_0000.png Label/test_0000.png\n'
    hha_files = sorted(p.name for p in (out / 'HHA').iterdir())
    assert hha_files == ['test_0000.png'] + [f'train_{i:04d}.png' for i in range(4)]
    camera = tuple(cam[k] for k in ('fx', 'fy', 'cx', 'cy'))
    for name in ('train_0002', 'test_0000'):
        file = {f: out / f / f'{name}.png' for f in data.ROOMS_FOLDERS}
        assert data.png_bit_depth(file['Depth']) == 16 == data.png_bit_depth(file['RawDepth'])
        assert Image.open(file['RGB']).mode == 'RGB' and Image.open(file['Label']).mode == 'L'
        depth, _ = data.read_depth_metres(file['Depth'])
        np.testing.assert_array_equal(np.array(Image.open(file['HHA'])), data.hha(depth, camera))
    for x in ('hha', 'depth'):  # read as NYUDv2
        rgb, xt, label = data.RGBXDataset(out, 'train', 'nyudv2', x)[3]
        assert rgb.shape == (3, 48, 64) and xt.shape == ((3 if x == 'hha' else 1), 48, 64)
        assert label.max() < 40
    # resume: finished scenes are kept, a scene with a file missing is rendered again
    stamp = (out / 'RGB' / 'train_0000.png').stat().st_mtime_ns
    (out / 'HHA' / 'train_0001.png').unlink()
    capsys.readouterr()
    assert data.main(['rooms', '--out', str(out), '--scenes', '5', '--size', '48x64',
                      '--seed', '7']) == 0
    assert 'rooms: 1 written, 4 already there' in capsys.readouterr().err
    assert (out / 'RGB' / 'train_0000.png').stat().st_mtime_ns == stamp
    assert (out / 'HHA' / 'train_0001.png').is_file()
    assert not [p for p in out.rglob('*') if p.name.endswith('.tmp')]

    def cli(*args, where=out):
        capsys.readouterr()
        code = data.main(['rooms', '--out', str(where), *map(str, args)])
        return type('Result', (), dict(returncode=code, stderr=capsys.readouterr().err))

    assert_one_line_error(cli('--scenes', 5, '--size', '48x64', '--seed', 8), '--seed 7', 'another')
    assert_one_line_error(cli('--scenes', 5, '--size', '64x64', '--seed', 7), '--size 48x64, not 64x64')
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep')
    assert_one_line_error(cli('--scenes', 5, where=tmp_path / 'mine'), 'not a rooms dataset')
    assert [p.name for p in (tmp_path / 'mine').iterdir()] == ['notes.txt']
    assert_one_line_error(cli('--scenes', 5, where=tmp_path / 'mine' / 'notes.txt'), 'is a file')
    assert_one_line_error(cli('--scenes', 1, where=tmp_path / 'new'), '--scenes')
    assert_one_line_error(cli('--scenes', 5, '--size', '48', where=tmp_path / 'new'), '--size')
    assert_one_line_error(cli('--scenes', 5, '--workers', 0, where=tmp_path / 'new'), '--workers')


def test_data_rooms_out_never_lands_in_a_dataset_or_a_run(tmp_path, capsys):
    root = nyu_pair(tmp_path / 'nyu')
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'best.pt').write_bytes(b'a checkpoint')
    (tmp_path / 'link').symlink_to(root)
    for out, words in ((root / 'rooms', ['--out', 'the dataset']), (tmp_path / 'link' / 'x', ['the dataset']),
                       (run_dir / 'rooms', ['--out', 'another run'])):
        assert data.main(['rooms', '--out', str(out), '--scenes', '2', '--size', '16x16']) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('error: ') and all(w in err[0] for w in words), err
    assert not (root / 'rooms').exists() and os.listdir(run_dir) == ['best.pt']


def test_data_rooms_in_memory_equals_the_files(tmp_path):
    data.rooms_folder(tmp_path, 2, ROOMS_SIZE, 0)  # train_0000 and test_0000 of --dataset rooms
    for x in ('hha', 'depth'):
        for split in ('train', 'test'):
            memory = data.build_dataset('rooms', '', split, x)
            files = data.RGBXDataset(tmp_path, split, 'nyudv2', x)
            assert memory.names[0] == files.names[0] == f'{split}_0000'
            for a, b in zip(memory[0], files[0]):
                assert a.dtype == b.dtype and torch.equal(a, b)
    train, test = (data.build_dataset('rooms', '', s) for s in ('train', 'test'))
    fit, val = (data.build_dataset('rooms-val', '', s) for s in ('train', 'test'))
    assert (len(train), len(test), len(fit), len(val)) == (800, 200, 640, 160)
    assert [val.names[0], val.names[-1], fit.names[-1]] == ['train_0640', 'train_0799', 'train_0639']
    assert torch.equal(val[0][2], train[640][2])


def test_data_rooms_contact_sheet_panels():
    size = (32, 48)
    sheet = data.rooms_sheet(seed=5, scenes=2, size=size)
    rgb, raw, depth, label = data.rooms_scene(5, 'train', 1, size)
    row = sheet[32:]
    assert sheet.shape == (64, 4 * 48, 3)
    np.testing.assert_array_equal(row[:, :48], rgb)
    assert ((row[:, 48:96, 0] == 0) == (raw == 0)).all()  # holes black, measured depth grey
    np.testing.assert_array_equal(row[:, 96:144], data.rooms_hha(depth, data.rooms_camera(size)))
    np.testing.assert_array_equal(row[:, 144:], data.palette('nyudv2')[label.astype(int) - 1])

def test_data_rooms_scenes_rendered_in_loader_workers_are_kept_for_the_next_epoch():
    ds = data.RoomsDataset('test', x_modality='depth', n=3)
    assert all(ds.cache.get(i) is None for i in range(3))
    for _ in torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2):
        pass
    for i in range(3):  # rendered in the workers, found by this process
        cached, (rgb, _, depth, label) = ds.cache.get(i), data.rooms_scene(0, 'test', i, ROOMS_SIZE)
        assert all(np.array_equal(a, b) for a, b in zip(cached, (rgb, depth, label)))
    assert all(torch.equal(a, b) for a, b in zip(ds[2], data.RoomsDataset('test', x_modality='depth', n=3)[2]))
    import pickle
    copy = pickle.loads(pickle.dumps(ds))  # a spawned worker's copy: a cache of its own
    assert copy.cache.get(0) is None and torch.equal(copy[0][1], ds[0][1]) and copy.cache.get(0) is not None

def rooms_tensors(split, n, size=(48, 64), hha=True):
    """n scenes of `split` at `size`: rgb and hha (n, 3, H, W) in [0, 1] (hha None when not
    asked for), depth (n, 1, H, W) in metres, classes (n, H, W) (the 13 room classes as 0..12)."""
    ids = sorted(data.ROOM_IDS.values())
    lut = np.zeros(41, np.int64)
    lut[ids] = np.arange(len(ids))
    rgb, hha, depth, label = [], [], [], []
    for i in range(n):
        r, _, d, lab = data.rooms_scene(0, split, i, size)
        rgb.append(r), depth.append(d)
        if hha is not False:
            hha.append(data.rooms_hha(d, data.rooms_camera(size)))
        label.append(lut[lab])
    to_chw = lambda a: torch.tensor(np.stack(a)).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    return to_chw(rgb), to_chw(hha) if hha else None, torch.tensor(np.stack(depth)[:, None] / 1000.0).float(), \
        torch.tensor(np.stack(label))


def rooms_pixel_features(x):
    """Per pixel of x (N, C, H, W): its values and their 7 x 7 and 21 x 21 means -> (N*H*W, 3C)."""
    f = [x] + [F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False) for k in (7, 21)]
    return torch.cat(f, 1).permute(0, 2, 3, 1).reshape(-1, 3 * x.shape[1])


def fit_pixel_mlp(x, y, classes, steps=800):
    """A 2-hidden-layer MLP (64 wide) on standardised per-pixel features x (P, F) -> y (P,)
    (classes > 0: cross-entropy; 0: L1 regression); returns predict(features)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                  torch.nn.ReLU(), torch.nn.Linear(64, max(classes, 1)))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(steps):
        idx = torch.randint(len(x), (2048,), generator=g)
        out = net((x[idx] - mean) / std)
        loss = F.cross_entropy(out, y[idx]) if classes else (out[:, 0] - y[idx]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z: net((z - mean) / std).detach()


@pytest.mark.slow
def test_data_rooms_rgb_and_x_complement_each_other():
    """A per-pixel probe (local colour / HHA statistics, MLP) segments the 13 room classes:
    RGB misses the geometry, HHA misses pictures and mats, RGB + HHA beats both (mIoU)."""
    (rgb, hha, _, y), (rgb_t, hha_t, _, y_t) = rooms_tensors('train', 160), rooms_tensors('test', 40)
    k, scores = len(data.ROOM_IDS), {}
    for name, a, b in (('rgb', rgb, rgb_t), ('x', hha, hha_t),
                       ('both', torch.cat([rgb, hha], 1), torch.cat([rgb_t, hha_t], 1))):
        predict = fit_pixel_mlp(rooms_pixel_features(a), y.reshape(-1), k)
        m = ev.metrics(ev.confusion(predict(rooms_pixel_features(b)).argmax(1), y_t.reshape(-1), k))
        scores[name] = m['miou']
    assert scores['both'] > max(scores['rgb'], scores['x']) + 0.01, scores
    assert scores['rgb'] > 1 / k, scores  # better than chance

class DepthProbe(torch.nn.Module):
    """A small U-Net (16-64 channels, 3 poolings) mapping RGB (N, 3, H, W) to one map (N, 1, H, W)."""

    def __init__(self, width=16):
        super().__init__()

        def block(i, o, stride=1):
            return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(o),
                                       torch.nn.ReLU())
        w = width
        self.down = torch.nn.ModuleList([block(3, w), block(w, 2 * w, 2), block(2 * w, 4 * w, 2),
                                         block(4 * w, 4 * w, 2)])
        self.up = torch.nn.ModuleList([block(8 * w, 2 * w), block(4 * w, w), block(2 * w, w)])
        self.out = torch.nn.Conv2d(w, 1, 1)

    def forward(self, x):
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = skips.pop()
        for up in self.up:
            skip = skips.pop()
            x = up(torch.cat([skip, F.interpolate(x, size=skip.shape[-2:], mode='bilinear')], 1))
        return self.out(x)


@pytest.mark.slow
def test_data_rooms_depth_is_learnable_from_rgb_beyond_position():
    """Log depth relative to each image's median, predicted from RGB alone by a small U-Net
    (400 steps on 800 scenes of 36 x 48): closer to the truth (mean absolute error) than the
    image's median and than the mean training value at each pixel position."""
    (rgb, _, depth, _), (rgb_t, _, depth_t, _) = rooms_tensors('train', 800, (36, 48), hha=False), \
        rooms_tensors('test', 40, (36, 48), hha=False)
    relative = lambda d: d.log() - d.log().flatten(1).median(1).values.view(-1, 1, 1, 1)  # noqa: E731
    target, target_t = relative(depth), relative(depth_t)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = DepthProbe()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    for step in range(400):  # 0.87 of the position's error here, 0.83 after 600 steps
        idx = torch.randint(len(rgb), (16,), generator=g)
        x, y = (rgb[idx] - 0.5) / 0.25, target[idx]
        if step % 2:
            x, y = x.flip(-1), y.flip(-1)
        loss = (net(x) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        error = (net.eval()((rgb_t - 0.5) / 0.25) - target_t).abs().mean().item()
    median_error = target_t.abs().mean().item()  # each image's median: 0 in this scale
    position_error = (target.mean(0, keepdim=True) - target_t).abs().mean().item()
    assert position_error < median_error  # floors get deeper with the image row
    assert error < 0.93 * position_error, (error, position_error, median_error)


def test_data_check_files_reads_this_processes_share_only(tmp_path):
    """Under torchrun each process reads samples rank::world of a split: the bad label of
    test sample 1 stops process 1 of 2, not process 0, which reads sample 0 only."""
    test = data.build_dataset('nyudv2', str(nyu_pair(tmp_path, bad_test_label=True)), 'test')
    said = []
    data.check_files(test, 0, said.append, rank=0, world=2)
    assert 'checked the 2 samples' in said[0] and '(1 in each of 2 processes)' in said[0]
    with pytest.raises(ValueError, match='5.png'):
        data.check_files(test, 0, said.append, rank=1, world=2)
    with pytest.raises(ValueError, match='5.png'):
        data.check_files(test, 0, said.append)


def test_data_training_loader_keeps_its_workers_and_each_epochs_augmentation(tmp_path):
    """The training loader's workers persist over epochs: the sampler gives each index with
    its epoch, so they draw that epoch's augmentation without set_epoch; the batches of
    two epochs equal those of a loader without workers."""
    batches = {}
    for workers in (0, 1):
        cfg = demo_config(tmp_path, split='val', batch_size=4, workers=workers)
        _, sampler, loader, _ = tr.make_loaders(cfg, tr.run_spec(cfg), 0, 1, torch.device('cpu'))
        assert loader.persistent_workers == (workers > 0)
        batches[workers] = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches[workers].append(torch.cat([b[0] for b in loader]))
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[1]))
    assert not torch.equal(batches[0][0], batches[0][1])
    demo = data.build_dataset('demo', '', 'train', crop=(32, 32), train=True)
    demo.set_epoch(2)
    by_epoch = demo[5]
    demo.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(demo[(2, 5)], by_epoch))


# --- Augmentation ---

COLOURS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20], [20, 230, 230]], np.uint8)
X_NORM = ((0.0,), (1.0,))


def block_sample(seed=0, h=57, w=83):
    """Random 10x10-pixel blocks of classes 0..4; rgb and x are functions of the class."""
    rng = np.random.default_rng(seed)
    label = np.kron(rng.integers(0, 5, (h // 10 + 1, w // 10 + 1)), np.ones((10, 10), np.int64))[:h, :w]
    return COLOURS[label], ((label + 1) / 10).astype(np.float32)[..., None], label


def decode(rgb, x):
    """Classes read back from augmented rgb (nearest colour) and x ((c + 1) / 10)."""
    img = denorm(rgb, *data.IMAGENET) * 255
    from_rgb = np.linalg.norm(img[:, :, None] - COLOURS[None, None].astype(float), axis=-1).argmin(-1)
    return from_rgb, np.rint(x[0].numpy() * 10).astype(np.int64) - 1


def test_data_augmentation_keeps_rgb_x_label_aligned():
    rgb, x, label = block_sample()
    tf = data.TrainTransform((64, 72), data.IMAGENET, X_NORM, jitter_p=0, blur_p=0)
    padded = 0
    for seed in range(30):
        r, xx, lab = tf(rgb, x, label, np.random.default_rng(seed))
        assert r.shape == (3, 64, 72) and xx.shape == (1, 64, 72) and lab.shape == (64, 72)
        assert lab.dtype == torch.int64 and set(lab.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
        pad = lab == 255  # the source has no ignore: 255 is padding, where rgb and x are 0
        assert torch.equal(pad, (r == 0).all(0)) and torch.equal(pad, xx[0] == 0)
        padded += bool(pad.any())
        # away from block edges (constant 5x5 label neighbourhood) rgb and x give the label
        lo = -F.max_pool2d(-lab[None, None].float(), 5, 1, 2)[0, 0]
        hi = F.max_pool2d(lab[None, None].float(), 5, 1, 2)[0, 0]
        inner = ((lo == hi) & ~pad).numpy()
        from_rgb, from_x = decode(r, xx)
        assert inner.sum() > 100
        assert (from_rgb[inner] == lab.numpy()[inner]).mean() > 0.99
        assert (from_x[inner] == lab.numpy()[inner]).mean() > 0.99
    assert 0 < padded < 30  # both small (padded) and large (cropped) scales were drawn


def test_data_augmentation_at_scale_one_is_identity_or_mirror():
    rgb, x, label = block_sample(1)
    tf = data.TrainTransform(label.shape, data.IMAGENET, X_NORM, scale=(1, 1), jitter_p=0, blur_p=0)
    ref_rgb, ref_x, ref_label = data.EvalTransform(data.IMAGENET, X_NORM)(rgb, x, label)
    flips = set()
    for seed in range(8):
        r, xx, lab = tf(rgb, x, label, np.random.default_rng(seed))
        flip = not torch.equal(lab, ref_label)
        flips.add(flip)
        expect = [t.flip(-1) if flip else t for t in (ref_rgb, ref_x, ref_label)]
        assert torch.allclose(r, expect[0], atol=1e-5) and torch.allclose(xx, expect[1], atol=1e-6)
        assert torch.equal(lab, expect[2])
    assert flips == {True, False}


def test_data_augmentation_jitter_and_blur_touch_rgb_only():
    rgb, x, label = block_sample(2)
    plain = data.TrainTransform((32, 32), data.IMAGENET, X_NORM, jitter_p=0, blur_p=0)
    both = data.TrainTransform((32, 32), data.IMAGENET, X_NORM, jitter_p=1, blur_p=1)
    for seed in range(4):
        a, b = plain(rgb, x, label, np.random.default_rng(seed)), both(rgb, x, label, np.random.default_rng(seed))
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        assert not torch.allclose(a[0], b[0])


def test_data_augmentation_is_a_function_of_seed_epoch_index():
    def make():
        return data.build_dataset('demo', '', 'train', crop=(48, 48), train=True, seed=5)
    ds, again = make(), make()
    ds.set_epoch(2)
    again.set_epoch(2)
    later = again[7]  # another access order, another object
    first = again[3]
    for a, b in zip(ds[3] + ds[7], first + later):
        assert torch.equal(a, b)
    ds.set_epoch(3)
    assert not torch.equal(ds[3][0], first[0])
    assert ds[3][0].shape == (3, 48, 48) and ds[3][1].shape == (1, 48, 48)


# --- HHA (data.hha, `python data.py hha`) ---

def interior(mask, r=6):
    """Pixels of mask whose whole (2r+1)^2 window is in mask."""
    return data.box_sum(mask.astype(np.float64), r) == (2 * r + 1) ** 2


def test_hha_synthetic_scene_geometry():
    depth, part = hha_scene()
    out = data.hha(depth, HHA_CAMERA).astype(np.int64)
    disparity, height, angle = out[..., 0], out[..., 1], out[..., 2]
    expect = {1: (0, 38), 2: (None, 128), 3: (40, 38), 4: (None, 128)}  # (height cm, angle) per part
    for k, (h, a) in expect.items():
        inside = interior(part == k)
        assert inside.sum() > 500
        assert (np.abs(angle[inside] - a) <= 1).mean() > 0.99, k
        if h is not None:
            assert (np.abs(height[inside] - h) <= 1).mean() > 0.99, k
    z_cm = depth * 100
    np.testing.assert_array_equal(disparity, np.floor(31000 / np.maximum(z_cm, 100) + 0.5))
    wall = interior(part == 2)  # the wall rises from the floor (0) to above the camera (120 cm)
    assert height[wall].min() < 20 and 130 < height[wall].max() < 255


HHA_FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'hha'


def hha_agreement(ours, ref):
    """Per channel (mean abs difference, fraction within 1)."""
    e = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
    return [(e[..., c].mean(), (e[..., c] <= 1).mean()) for c in range(3)]


def test_hha_matches_matlab_on_synthetic_scene():
    depth, missing = data.read_depth_metres(HHA_FIXTURES / 'scene_depth.png')
    _, holes = data.read_depth_metres(HHA_FIXTURES / 'scene_raw.png')
    assert not missing.any() and 0.05 < holes.mean() < 0.2
    for m, name in ((None, 'filled'), (holes, 'raw')):
        ref = np.array(Image.open(HHA_FIXTURES / f'scene_hha_matlab_{name}.png'))
        for mae, within1 in hha_agreement(data.hha(depth, HHA_CAMERA, m), ref):
            assert mae <= 0.5 and within1 >= 0.98, (name, mae, within1)
        if m is None:  # no holes: no ill-posed fits, the bytes are equal
            np.testing.assert_array_equal(data.hha(depth, HHA_CAMERA), ref)


@needs_realdata
def test_hha_nyu_frame_matches_matlab_jpeg():
    # HHA/0.jpg is the authors' HHA of NYU #1 saved as JPEG; its noise against the
    # lossless result is about 0.9 / 0.6 / 2.6 per channel. It was made without the raw
    # depth's holes (with them the angle of the hole interiors is 218, see the next test).
    depth, missing = data.read_depth_metres(NYU / 'DepthFilled' / '0.png')
    _, holes = data.read_depth_metres(NYU / 'Depth' / '0.png')
    assert not missing.any() and 0.2 < holes.mean() < 0.3
    jpeg = np.array(Image.open(NYU / 'HHA' / '0.jpg'))
    noise = (0.9, 0.65, 2.7)
    for (mae, _), bound in zip(hha_agreement(data.hha(depth, data.NYU_CAMERA), jpeg), noise):
        assert mae <= bound
    # with the raw holes: disparity and height as well; the angle where the 7x7 window
    # is fully measured
    out = data.hha(depth, data.NYU_CAMERA, holes)
    for (mae, _), bound in zip(hha_agreement(out, jpeg)[:2], noise):
        assert mae <= bound
    full = interior(~holes, 3)
    assert full.mean() > 0.6
    assert np.abs(out[..., 2][full].astype(int) - jpeg[..., 2][full]).mean() <= noise[2]


def test_hha_holes_handled_as_matlab():
    depth, part = hha_scene()
    rng = np.random.default_rng(1)
    holes = rng.random(depth.shape) < 0.1
    holes[100:140, 40:100] = True
    filled = data.hha(depth, HHA_CAMERA)
    out = data.hha(depth, HHA_CAMERA, holes)
    np.testing.assert_array_equal(out[..., 0], filled[..., 0])  # disparity reads the filled depth
    assert np.abs(out[..., 1].astype(int) - filled[..., 1]).max() <= 1  # gravity barely moves
    # a pixel whose 7x7 window has no measurement has no normal: angle 218 (cos clipped to -1)
    empty = data.box_sum((~holes).astype(np.float64), 3) == 0
    assert empty.sum() > 1000
    assert (out[..., 2][empty] == 218).all()
    # elsewhere the normal comes from the window's measured points: finite and unit
    n = data.hha_normals(depth * 100, ~holes, HHA_CAMERA, 3)
    seen = interior(np.isin(part, (1, 2)), 3) & (data.box_sum((~holes).astype(np.float64), 3) >= 10)
    assert np.isfinite(n[seen]).all()
    np.testing.assert_allclose(np.linalg.norm(n[seen], axis=-1), 1, atol=1e-9)
    inside = seen & ~empty
    assert (np.abs(out[..., 2][inside].astype(int) - filled[..., 2][inside]) <= 1).mean() > 0.99
    # zeros in the depth are missing pixels too (they only lose the orientation that the
    # filled depth gives the few ill-posed fits at the holes' edges)
    zeroed = data.hha(np.where(holes, 0.0, depth), HHA_CAMERA)
    assert (zeroed[..., 2] != out[..., 2]).mean() < 0.002


def run_data_cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(Path(data.__file__).resolve()), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_hha_depth_unit_does_not_change_the_result(tmp_path):
    mm = np.array(Image.open(HHA_FIXTURES / 'scene_depth.png')).astype(np.uint16)
    png(tmp_path / 'mm' / 'a.png', mm)
    png(tmp_path / 'tenth' / 'a.png', mm * np.uint16(10))  # the same depth in 1/10 mm
    m1, _ = data.read_depth_metres(tmp_path / 'mm' / 'a.png')
    m2, _ = data.read_depth_metres(tmp_path / 'tenth' / 'a.png', scale=0.0001)
    np.testing.assert_array_equal(m1, m2)
    for unit, scale in (('mm', 0.001), ('tenth', 0.0001)):
        res = run_data_cli('hha', '--depth', tmp_path / unit, '--out', tmp_path / f'hha_{unit}',
                           '--camera', ','.join(map(str, HHA_CAMERA)), '--depth-scale', scale)
        assert res.returncode == 0, res.stderr
    a = np.array(Image.open(tmp_path / 'hha_mm' / 'a.png'))
    np.testing.assert_array_equal(a, np.array(Image.open(tmp_path / 'hha_tenth' / 'a.png')))
    np.testing.assert_array_equal(a, data.hha(m1, HHA_CAMERA))


def assert_one_line_error(res, *words):
    assert res.returncode != 0 and 'Traceback' not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('error: '), res.stderr
    for w in words:
        assert w in last, (w, last)


@pytest.mark.slow
def test_hha_cli_converts_a_folder_skips_finished_files_and_reports_errors(tmp_path, capsys):
    depth = np.array(Image.open(HHA_FIXTURES / 'scene_depth.png')).astype(np.uint16)
    raw = np.array(Image.open(HHA_FIXTURES / 'scene_raw.png')).astype(np.uint16)
    for name, flip in (('a', False), ('b', True)):
        png(tmp_path / 'depth' / f'{name}.png', depth[:, ::-1].copy() if flip else depth)
        png(tmp_path / 'raw' / f'{name}.png', raw[:, ::-1].copy() if flip else raw)
    cam = ','.join(map(str, HHA_CAMERA))
    out = tmp_path / 'out' / 'hha'
    res = run_data_cli('hha', '--depth', tmp_path / 'depth', '--raw', tmp_path / 'raw', '--out', out,
                       '--camera', cam, '--workers', 2)
    assert res.returncode == 0 and 'Traceback' not in res.stderr, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ['.hha.json', 'a.png', 'b.png']  # no temporary file
    ref = np.array(Image.open(HHA_FIXTURES / 'scene_hha_matlab_raw.png'))
    for mae, within1 in hha_agreement(np.array(Image.open(out / 'a.png')), ref):
        assert mae <= 0.5 and within1 >= 0.98
    d, _ = data.read_depth_metres(tmp_path / 'depth' / 'b.png')
    _, m = data.read_depth_metres(tmp_path / 'raw' / 'b.png')
    np.testing.assert_array_equal(np.array(Image.open(out / 'b.png')), data.hha(d, HHA_CAMERA, m))
    # a second run skips both; a deleted output is redone
    stamp = (out / 'a.png').stat().st_mtime_ns
    (out / 'b.png').unlink()
    capsys.readouterr()
    assert data.main(['hha', '--depth', str(tmp_path / 'depth'), '--raw', str(tmp_path / 'raw'),
                      '--out', str(out), '--camera', cam]) == 0
    assert '1 written, 1 already there' in capsys.readouterr().err
    assert (out / 'a.png').stat().st_mtime_ns == stamp and (out / 'b.png').is_file()

    # user errors: one line `error: ...`, never a traceback; two through a real process
    # (one found before any file is read, one while converting), the others in this one
    png(tmp_path / 'eight' / 'a.png', (depth // 20).astype(np.uint8))
    assert_one_line_error(run_data_cli('hha', '--depth', tmp_path / 'eight', '--out', tmp_path / 'o2',
                                       '--camera', 'nyu'), '16-bit', '--depth-scale')
    assert_one_line_error(run_data_cli('hha', '--depth', tmp_path / 'depth', '--out', tmp_path / 'o2',
                                       '--camera', '1,2,3'), '--camera')

    def cli(*args, depth_dir=tmp_path / 'depth', out_dir=tmp_path / 'o2', camera=cam):
        capsys.readouterr()
        code = data.main(['hha', '--depth', str(depth_dir), '--out', str(out_dir), '--camera', camera,
                          *map(str, args)])
        return type('Result', (), dict(returncode=code, stderr=capsys.readouterr().err))

    assert_one_line_error(cli(camera='nyu,x'), '--camera')
    assert_one_line_error(cli(depth_dir=tmp_path / 'nowhere'), 'no such folder')
    assert_one_line_error(cli('--raw', tmp_path / 'nowhere'), '--raw', 'no such folder')
    assert_one_line_error(cli(out_dir=tmp_path / 'depth'), '--out', 'is the --depth folder')
    (tmp_path / 'a_file').write_text('')
    assert_one_line_error(cli(out_dir=tmp_path / 'a_file' / 'sub'), 'cannot be written')
    png(tmp_path / 'small' / 'a.png', raw[:100])
    png(tmp_path / 'small' / 'b.png', raw[:100])
    assert_one_line_error(cli('--raw', tmp_path / 'small'), 'sizes')
    png(tmp_path / 'colour' / 'a.png', np.zeros((8, 8, 3), np.uint8))
    assert_one_line_error(cli(depth_dir=tmp_path / 'colour'), '16-bit')
    assert_one_line_error(cli('--depth-scale', '0'), '--depth-scale')
    assert_one_line_error(cli('--workers', '0'), '--workers')
    (tmp_path / 'empty').mkdir()
    assert_one_line_error(cli(depth_dir=tmp_path / 'empty'), 'no .png')
    assert not [p for p in (tmp_path / 'o2').iterdir()]  # nothing written, not even half
    assert sorted(p.name for p in (tmp_path / 'depth').iterdir()) == ['a.png', 'b.png']


@pytest.mark.slow
def test_hha_cli_refuses_constant_hha_other_files_and_says_raw_depth(tmp_path, small_disk, monkeypatch, capsys):
    """data.py hha through a real process: an all-zero depth, a 3 x 3 one and a camera that
    overflows are errors naming the file or flag (no constant HHA, no numpy warning); an --out
    folder holding other images of the same names (RGB photos) is an error, not "already there";
    a raw depth (holes) converts and says so; a full disk names the file."""
    depth, _ = hha_scene()
    mm = np.round(np.nan_to_num(depth, posinf=0) * 1000).astype(np.uint16)
    raw = mm.copy()
    raw[::3] = 0  # a third of the rows unmeasured, as a raw Kinect depth has holes
    png(tmp_path / 'zero' / 'a.png', np.zeros_like(mm))
    png(tmp_path / 'tiny' / 'a.png', mm[:3, :3])
    png(tmp_path / 'raw' / 'a.png', raw)
    png(tmp_path / 'photos' / 'a.png', np.random.default_rng(0).integers(0, 256, (*mm.shape, 3), dtype=np.uint8))
    cam = ','.join(map(str, HHA_CAMERA))
    res = run_data_cli('hha', '--depth', tmp_path / 'zero', '--out', tmp_path / 'o', '--camera', cam)
    assert_one_line_error(res, 'zero/a.png', 'no measured pixel')  # a real process: no numpy warning either
    assert 'Warning' not in res.stderr
    for depth_dir, camera, words in (('tiny', cam, ['tiny/a.png', 'smaller than']),
                                     ('raw', '1e308,1e308,1e308,1e308', ['beyond float range'])):
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            code = data.main(['hha', '--depth', str(tmp_path / depth_dir), '--out', str(tmp_path / 'o'),
                              '--camera', camera])
        assert_one_line_error(type('R', (), dict(returncode=code, stderr=capsys.readouterr().err)), *words)
    assert not list((tmp_path / 'o').glob('*.png'))
    photos = (tmp_path / 'photos' / 'a.png').read_bytes()
    res = run_data_cli('hha', '--depth', tmp_path / 'raw', '--out', tmp_path / 'photos', '--camera', cam)
    assert_one_line_error(res, 'photos', 'a.png', 'not the HHA')
    assert (tmp_path / 'photos' / 'a.png').read_bytes() == photos
    res = run_data_cli('hha', '--depth', tmp_path / 'raw', '--out', tmp_path / 'o', '--camera', cam)
    assert res.returncode == 0 and 'note: the --depth files have pixels of 0 (no measurement; 33% of a.png)' in res.stderr
    assert '1 written' in res.stderr.splitlines()[-1]
    res = run_data_cli('hha', '--depth', tmp_path / 'raw', '--out', tmp_path / 'o', '--camera', cam)
    assert res.returncode == 0 and '0 written, 1 already there' in res.stderr  # a true HHA file is skipped
    if os.path.ismount(small_disk):
        free = os.statvfs(small_disk)
        (small_disk / 'filler').write_bytes(b'\0' * (free.f_bavail * free.f_frsize - 4096))
    else:
        import errno
        real_save = Image.Image.save

        def save(im, fp, *a, **k):
            if str(small_disk) in str(fp):
                raise OSError(errno.ENOSPC, 'No space left on device')
            return real_save(im, fp, *a, **k)
        monkeypatch.setattr(Image.Image, 'save', save)
    capsys.readouterr()
    assert data.main(['hha', '--depth', str(tmp_path / 'raw'), '--out', str(small_disk / 'hha'), '--camera', cam]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: disk full: cannot write {small_disk / 'hha' / 'a.png'}; free space on that disk or write to " \
                  f"another one", err
    assert not [p for p in (small_disk / 'hha').iterdir()]


def test_hha_bad_arguments_are_one_line_errors(tmp_path):
    png(tmp_path / 'eight.png', np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match='16-bit.*--depth-scale'):
        data.read_depth_metres(tmp_path / 'eight.png')
    with pytest.raises(FileNotFoundError):
        data.read_depth_metres(tmp_path / 'none.png')
    with pytest.raises(ValueError, match='NaN'):
        data.hha(np.full((8, 8), np.nan), HHA_CAMERA)
    with pytest.raises(ValueError, match='missing'):
        data.hha(np.ones((8, 8)), HHA_CAMERA, np.zeros((4, 4), bool))
    assert data.parse_camera('Nyu') == data.NYU_CAMERA  # any case
    assert data.parse_camera('1,2,3.5,4') == (1.0, 2.0, 3.5, 4.0)
    # the NYUv2 toolbox's centre counts pixels from 1
    assert data.NYU_CAMERA[2] == 325.58244941119034 - 1 and data.NYU_CAMERA[3] == 253.73616633400465 - 1


def test_data_palette_labels_with_a_grey_palette_that_disagrees_with_the_indices_are_refused(nyu_like):
    """A grey label saved through a palette (Image.quantize orders the palette by frequency) shows
    the classes as greys but stores other indices: refused; a palette whose greys are its indices,
    and a colour palette (VOC-style), are read by index."""
    grey = np.array(Image.open(nyu_like / 'Label' / '0.png'))
    quantized = Image.fromarray(grey).quantize(256)
    shown = np.array(quantized.convert('L'))
    assert (shown == grey).all() and (np.array(quantized) != grey).mean() > 0.5  # looks right, stores other values
    quantized.save(nyu_like / 'Label' / '0.png')
    with pytest.raises(ValueError, match=r'Label/0\.png is a palette PNG whose grey palette shows other values'):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2').read(0)
    for palette in ([v for i in range(256) for v in (i, i, i)], data.voc_colormap().flatten().tolist()):
        im = Image.fromarray(grey, 'P')
        im.putpalette(palette)
        im.save(nyu_like / 'Label' / '0.png')
        assert (data.RGBXDataset(nyu_like, 'train', 'nyudv2').read(0)[2] == torch.from_numpy(
            grey.astype(np.int64) - 1).where(torch.from_numpy(grey) > 0, torch.tensor(255)).numpy()).all()


@pytest.mark.parametrize('dataset,stored', [('nyudv2', 40), ('mfnet', 8)])
def test_data_label_255_is_void_in_every_dataset(tmp_path, dataset, stored):
    """255 on disk is the ignore index of every preset (README's table says so), the largest
    class stays a class, and a value just above it is an error."""
    label = np.full((4, 5), stored, np.uint8)
    label[0, :2] = 255
    png(tmp_path / 'l.png', label)
    read = data.read_label(tmp_path / 'l.png', dataset)
    assert (read[0, :2] == 255).all() and (read[1:] == data.get_preset(dataset).num_classes - 1).all()
    label[0, 0] = stored + 1
    png(tmp_path / 'l.png', label)
    with pytest.raises(ValueError, match=rf'values \[{stored + 1}\] are outside'):
        data.read_label(tmp_path / 'l.png', dataset)
    readme = (Path(__file__).resolve().parent / 'README.md').read_text()
    assert re.search(rf"\| `{dataset}` \|[^\n]*255 void", readme)


def test_data_labels_are_read_from_lossless_files_only(nyu_like):
    img = Image.open(nyu_like / 'Label' / '0.png')
    (nyu_like / 'Label' / '0.png').unlink()
    img.convert('L').save(nyu_like / 'Label' / '0.jpg')
    with pytest.raises(ValueError, match=r'Label/0\.jpg is a lossy file.*convert the labels to PNG'):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2')


def test_data_hidden_files_upper_case_extensions_and_link_loops(nyu_like, tmp_path):
    """macOS's '._0.png' beside PST900-style folders are not samples; 'RGB/0.PNG' is found for id
    0; a symbolic link loop is named as such, not "not found"; a 16-bit grey --rgb gets the
    conversion that keeps its values, not convert('RGB')."""
    release = tmp_path / 'pst' / 'test'
    for folder, arr in (('rgb', np.zeros((4, 4, 3), np.uint8)), ('thermal', np.zeros((4, 4), np.uint8)),
                        ('labels', np.zeros((4, 4), np.uint8))):
        png(release / folder / '0.png', arr)
        (release / folder / '._0.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    assert data.RGBXDataset(tmp_path / 'pst', 'test', 'pst900').names == ['0']
    (nyu_like / 'RGB' / '0.png').rename(nyu_like / 'RGB' / '0.PNG')
    (nyu_like / 'train.txt').write_text('0\n1\n')
    ds = data.RGBXDataset(nyu_like, 'train', 'nyudv2')
    assert ds.samples[0][1].name == '0.PNG' and ds[0][0].shape == (3, 8, 10)
    (nyu_like / 'HHA' / '1.png').unlink()
    os.symlink(nyu_like / 'HHA' / '1.png', nyu_like / 'HHA' / '1.png')  # a link to itself: a loop
    with pytest.raises(FileNotFoundError, match=r'HHA/1\.png is a symbolic link that leads to no file'):
        data.RGBXDataset(nyu_like, 'train', 'nyudv2')
    png(tmp_path / 'deep.png', np.full((4, 4), 4000, np.uint16))
    with pytest.raises(ValueError, match=r"I;16 values.*round\(v / 257\)") as e:
        data.read_rgb(tmp_path / 'deep.png')
    assert "convert('RGB')" not in str(e.value)


def test_data_split_ids_with_spaces_and_folders(nyu_like):
    for i in (0, 1):
        for folder in ('RGB', 'HHA', 'Label'):
            (nyu_like / folder / 'a').mkdir(exist_ok=True)
            (nyu_like / folder / f'{i}.png').rename(nyu_like / folder / ('a/0.png' if i == 0 else 'a_0 x.png'))
    (nyu_like / 'train.txt').write_text('a/0\na_0 x\n')
    ds = data.RGBXDataset(nyu_like, 'train', 'nyudv2')
    assert ds.names == ['a/0', 'a_0 x'] and ds[1][2].shape == (8, 10)


def test_data_hha_folder_refuses_other_settings_over_the_files_it_skips(tmp_path, capsys):
    """Rerun with another camera, --raw or --depth-scale, the folder's files (made with the
    first settings) are not silently kept: a one-line error; the same settings complete it."""
    rng = np.random.default_rng(0)
    for n in ('a', 'b'):
        png(tmp_path / 'depth' / f'{n}.png', rng.integers(500, 4000, (24, 32)).astype(np.uint16))

    def cli(camera, *args):
        code = data.main(['hha', '--depth', str(tmp_path / 'depth'), '--out', str(tmp_path / 'hha'),
                          '--camera', camera, *args])
        return type('Result', (), dict(returncode=code, stderr=capsys.readouterr().err))
    assert cli('30,30,15.5,11.5').returncode == 0
    first = (tmp_path / 'hha' / 'a.png').read_bytes()
    (tmp_path / 'hha' / 'b.png').unlink()
    for camera, args in (('nyu', ()), ('30,30,15.5,11.5', ('--depth-scale', '0.0001'))):
        assert_one_line_error(cli(camera, *args), '--out', 'other settings')
    assert not (tmp_path / 'hha' / 'b.png').exists()
    res = cli('30,30,15.5,11.5')
    assert res.returncode == 0 and '1 written, 1 already there' in res.stderr
    assert (tmp_path / 'hha' / 'a.png').read_bytes() == first
    assert sorted(p.name for p in (tmp_path / 'hha').iterdir()
                  if data.visible(p.name)) == ['a.png', 'b.png']


def test_data_hha_from_a_depth_only_dataset_prints_the_conversion_command(tmp_path):
    rng = np.random.default_rng(0)
    png(tmp_path / 'RGB' / '0.png', rng.integers(0, 256, (8, 10, 3), dtype=np.uint8))
    png(tmp_path / 'Depth' / '0.png', rng.integers(1, 5000, (8, 10)).astype(np.uint16))
    png(tmp_path / 'Label' / '0.png', rng.integers(0, 41, (8, 10)).astype(np.uint8))
    (tmp_path / 'train.txt').write_text('0\n')
    with pytest.raises(FileNotFoundError, match=r'python data.py hha --depth .*Depth --out .*HHA --camera nyu'):
        data.RGBXDataset(tmp_path, 'train', 'nyudv2', 'hha')
    assert len(data.RGBXDataset(tmp_path, 'train', 'nyudv2', 'depth')) == 1


# ----------------------------------------------------------------------------
# Evaluation (eval.py): metrics, inference, evaluating a run, benchmark, command line
# ----------------------------------------------------------------------------

# --- Metrics, inference, panels ---

def test_eval_metrics_hand_computed():
    label = torch.tensor([[0, 0, 1], [2, 255, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    conf = ev.confusion(pred, label, 4)
    expect = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])  # rows: ground truth
    assert torch.equal(conf, expect)  # the ignored pixel (predicted 0) does not count
    m = ev.metrics(conf)
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1 the same; class 2: 1/1; class 3 absent from both: left out
    assert m['iou'][:3] == pytest.approx([1 / 3, 1 / 3, 1.0]) and math.isnan(m['iou'][3])
    assert m['miou'] == pytest.approx(5 / 9)
    assert m['macc'] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert m['pixel_acc'] == pytest.approx(3 / 5)
    pe = (2 * 2 + 2 * 2 + 1 * 1) / 25  # chance agreement from the marginals
    assert m['kappa'] == pytest.approx((3 / 5 - pe) / (1 - pe))
    # a class predicted but absent from the ground truth scores 0 and counts
    m2 = ev.metrics(ev.confusion(torch.tensor([3, 0]), torch.tensor([0, 0]), 4))
    assert m2['iou'][3] == 0 and m2['miou'] == pytest.approx((1 / 2 + 0) / 2)


class PixelModel(torch.nn.Module):
    """A 1x1-convolution model: every pixel's logits depend on that pixel only."""

    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, k, 1)

    def forward(self, rgb, x, label=None):
        return self.conv(torch.cat([rgb, x], 1))


def test_eval_sliding_window_equals_whole_image():
    model = PixelModel()
    rgb, x = torch.randn(2, 3, 37, 53), torch.randn(2, 1, 37, 53)  # non-square, not a multiple of the stride
    with torch.no_grad():
        whole = model(rgb, x)
        slid = ev.sliding_logits(model, rgb, x, 3, crop=(16, 24))
    torch.testing.assert_close(slid, whole)
    assert ev.window_starts(37, 16, 10) == [0, 10, 20, 21] and ev.window_starts(10, 16, 10) == [0]


def test_eval_multiscale_flip_fusion():
    class Known(torch.nn.Module):  # class-0 logit = the column's position, class 1 = 0
        def forward(self, rgb, x, label=None):
            B, _, H, W = rgb.shape
            col = (torch.arange(W, dtype=torch.float32) + 0.5) / W
            return torch.stack([col.expand(B, H, W), torch.zeros(B, H, W)], 1)

    rgb, x = torch.zeros(1, 3, 8, 10), torch.zeros(1, 1, 8, 10)
    col = (torch.arange(10) + 0.5) / 10
    p0 = torch.sigmoid(col)  # softmax over (col, 0) for class 0
    got = ev.predict(Known(), rgb, x, 2, flip=True)
    # the flipped pass sees reversed columns and is flipped back: p(col) + p(1 - col)
    torch.testing.assert_close(got[0, 0, 0], p0 + torch.sigmoid(1 - col))
    torch.testing.assert_close(got.sum(1), torch.full((1, 8, 10), 2.0))

    class Constant(torch.nn.Module):
        def forward(self, rgb, x, label=None):
            return torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1).expand(rgb.shape[0], 3, *rgb.shape[-2:])

    got = ev.predict(Constant(), rgb, x, 3, scales=ev.SCALES, flip=True)
    torch.testing.assert_close(got, 12 * torch.tensor([1.0, 0.0, -1.0]).softmax(0).view(1, 3, 1, 1).expand(1, 3, 8, 10))


def test_eval_drop_modality():
    rgb, x = torch.ones(1, 3, 2, 2), torch.ones(1, 1, 2, 2)
    r, t = ev.drop_modality(rgb, x, 'rgb')
    assert r.eq(1).all() and t.eq(0).all()
    r, t = ev.drop_modality(rgb, x, 'x')
    assert r.eq(0).all() and t.eq(1).all()
    with pytest.raises(ValueError, match='both'):
        ev.drop_modality(rgb, x, 'depth')


def test_eval_panel_has_a_legend_and_void_apart_from_class_0(tmp_path):
    palette, names = data.palette('demo'), data.PRESETS['demo'].class_names
    assert palette[0].tolist() == [0, 0, 0]  # class 0 (background) is black
    gt = np.zeros((32, 40), np.int64)
    gt[:, 20:] = 255  # right half void
    gt[:8, :8] = 1
    pred = np.full((32, 40), 2)
    img = np.full((32, 40, 3), 90, np.uint8)
    ev.save_panel(tmp_path / 'p.png', img, img, gt, pred, palette, names)
    panel = np.array(Image.open(tmp_path / 'p.png'))
    assert panel.shape[1:] == (4 * 40, 3) and panel.shape[0] > 32
    shown_gt, strip = panel[:32, 80:120], panel[32:]
    assert (shown_gt[8:, :20] == 0).all()  # class 0: black
    void = shown_gt[:, 20:].reshape(-1, 3).tolist()
    assert [255, 255, 255] in void and [0, 0, 0] in void  # void: hatched, not class 0's plain black
    colours = {tuple(c) for c in strip.reshape(-1, 3).tolist()}
    assert {tuple(palette[c]) for c in (0, 1, 2)} <= colours  # a swatch per class present in either map
    assert tuple(palette[3]) not in colours and tuple(palette[4]) not in colours
    assert (255, 255, 255) in colours and (strip < 255).any(axis=2).sum() > 300  # names drawn


def test_eval_panel_draws_the_demo_classes_in_their_colours_with_titles_and_spaced_names(tmp_path):
    palette = data.palette('demo').astype(int)
    for c, name in enumerate(data.PRESETS['demo'].class_names[1:], 1):  # 'red high' is red, 'blue low' blue, ...
        hue = 0 if name.startswith('red') else 2
        assert palette[c, hue] == palette[c].max() and palette[c, hue] > palette[c, 1], (name, palette[c])
    assert palette[2].sum() > palette[1].sum() and palette[4].sum() > palette[3].sum()  # high: lighter than low
    strip = ev.legend([], ['unused'], data.palette('demo'), 200)
    text = (strip[2:12, 16:] < 128).any(axis=(0, 2))  # columns with ink right of the void swatch
    ink = np.flatnonzero(text)
    blank_runs = np.diff(ink) - 1
    assert (blank_runs >= 3).sum() == 2, blank_runs  # 'void', '(not', 'scored)': two word gaps
    gt = np.zeros((32, 40), np.int64)
    img = np.full((32, 40, 3), 90, np.uint8)
    ev.save_panel(tmp_path / 'p.png', img, img, gt, gt, data.palette('demo'), data.PRESETS['demo'].class_names)
    titles = np.array(Image.open(tmp_path / 'p.png'))[32:46]
    assert all((titles[:, 40 * i:40 * (i + 1)] < 128).any() for i in range(4))  # a title under each column


# --- Evaluating a run: the command line ---

@pytest.mark.slow
def test_eval_cli_reproduces_saves_and_segments_own_images(demo_run, tmp_path):
    cfg, out = demo_run
    best = os.path.join(cfg.out_dir, 'best.pt')
    ev.main(['--checkpoint', best, '--save-pred', str(tmp_path / 'pred'), '--json', str(tmp_path / 'm.json')])
    m = json.load(open(tmp_path / 'm.json'))
    assert m['miou'] == pytest.approx(out['best'], abs=1e-9)  # same model, same single-scale pass
    panel = np.array(Image.open(tmp_path / 'pred' / 'test_0000_panel.png'))
    assert panel.shape[0] > 64 and panel.shape[1:] == (4 * 64, 3)  # the maps over a legend
    pred = np.array(Image.open(tmp_path / 'pred' / 'test_0000.png'))
    assert np.array_equal(panel[:64, 3 * 64:], pred)
    rgb, depth, _ = data.DemoDataset('test').read(0)  # the user's own pair: an RGB PNG and an 8-bit depth PNG
    Image.fromarray(rgb).save(tmp_path / 'rgb.png')
    Image.fromarray((depth[..., 0] * 255).round().astype(np.uint8)).save(tmp_path / 'x.png')
    ev.main(['--checkpoint', best, '--rgb', str(tmp_path / 'rgb.png'), '--x', str(tmp_path / 'x.png'),
             '--out', str(tmp_path / 'seg.png')])
    seg = np.array(Image.open(tmp_path / 'seg.png'))
    colours = {tuple(c) for c in data.palette('demo')[:5].tolist()}
    assert seg.shape == (64, 64, 3) and {tuple(c) for c in seg.reshape(-1, 3).tolist()} <= colours
    with pytest.raises(SystemExit, match='--rgb, --out and one of --x or --depth'):
        ev.main(['--checkpoint', best, '--rgb', str(tmp_path / 'rgb.png')])


@pytest.mark.parametrize('argv,words', [
    (['--save-pred', 'P', '--rgb', 'a.png'], '--save-pred .*--rgb'),
    (['--benchmark', '--method', 'gopt'], "checkpoint's model: drop --method"),
    (['--benchmark', '--save-pred', 'P'], 'no evaluation flags: drop --save-pred'),
    (['--benchmark', '--modality', 'rgb'], 'drop --modality'),
    (['--size', '32x32'], '--size act only with --benchmark'),
    (['--workers', '-1'], '--workers must be >= 0'),
    (['--device', 'tpu'], '--device')])
def test_eval_conflicting_flags_are_refused(tmp_path, argv, words):
    assert re.search(words, cli_error(ev.main, ['--checkpoint', str(tmp_path / 'none.pt')] + argv))


@pytest.mark.slow
def test_eval_cli_takes_a_release_checkpoint_from_flags(capsys, tmp_path, monkeypatch):
    cfg, _ = release_fixture()
    path = str(KTB_FIXTURE / 'ktb_release_tiny.pth')
    # the fixture's Swin sizes as the 'nano' preset; its window, 5 classes (the demo's), head widths 64 / 32 by flags
    monkeypatch.setitem(rgbx.SWIN_PRESETS, 'nano', dict(embed_dim=cfg['embed_dim'], depths=tuple(cfg['depths']),
                                                        heads=tuple(cfg['heads']), window_size=cfg['window_size']))
    window = f"window_size={cfg['window_size']}"
    ev.main(['--checkpoint', path, '--method', 'ktb', '--backbone', 'swin-nano', '--dataset', 'demo',
             '--opts', 'fused_head_dim=64,aux_head_dim=32,' + window, '--device', 'cpu'])
    assert 'mIoU' in capsys.readouterr().out
    for argv, expected in (([], 'holds no rgbx training config: pass --method, --backbone and --dataset'),
                           (['--method', 'ktb', '--backbone', 'swin-nano', '--dataset', 'demo', '--opts', window],
                            r"shape mismatches: \['s1.linear_c.0.bias: checkpoint \(64,\) vs model \(512,\)")):
        with pytest.raises(SystemExit) as e:
            ev.main(['--checkpoint', path, '--device', 'cpu'] + argv)
        assert re.search(expected, str(e.value)) and '\n' not in str(e.value)
    (tmp_path / 'cut.pth').write_bytes(Path(path).read_bytes()[:5000])
    with pytest.raises(SystemExit, match=r'cut\.pth.*truncated'):
        ev.main(['--checkpoint', str(tmp_path / 'cut.pth'), '--method', 'ktb', '--backbone', 'swin-nano'])


@pytest.mark.slow
def test_eval_honours_workers(demo_run, tmp_path, monkeypatch):
    cfg, out = demo_run
    seen, make = [], data.loader
    monkeypatch.setattr(data, 'loader', lambda dataset, batch_size=1, workers=0, *a, **k:
                        seen.append(workers) or make(dataset, batch_size, workers, *a, **k))
    before = torch.get_num_threads()
    try:
        ev.main(['--checkpoint', os.path.join(cfg.out_dir, 'best.pt'), '--workers', '1', '--json', str(tmp_path / 'm.json')])
    finally:
        torch.set_num_threads(before)
    assert seen == [1] and json.load(open(tmp_path / 'm.json'))['miou'] == pytest.approx(out['best'], abs=1e-9)


@pytest.mark.slow
def test_eval_saves_cross_modal_reconstructions_of_a_pretraining_run(tmp_path):
    cfg = tr.resolve(tr.Config(method='maskmentor', backbone='vit-nano', opts=MM_PRE_OPTS, max_steps=2, batch_size=2,
                               workers=0, log_every=100, out_dir=str(tmp_path / 'pre')))
    tr.train(cfg)
    last = str(tmp_path / 'pre' / 'last.pt')
    ev.main(['--checkpoint', last, '--reconstruct', str(tmp_path / 'fig4')])
    panel = np.array(Image.open(tmp_path / 'fig4' / 'test_0000_reconstruction.png'))
    assert panel.shape == (64, 4 * 64, 3)
    model, _ = ev.load_model(last)
    rgb, x, label = (t[None] for t in data.build_dataset('demo', '', 'test')[0])
    with torch.no_grad():
        rgb_from_depth = model.reconstruct({'depth': model.targets(rgb, x, label)[0]['depth']}, {})['rgb']
    assert np.array_equal(panel[:, 3 * 64:], ev.to_image(rgb_from_depth[0], *data.PRESETS['demo'].rgb_norm))
    with pytest.raises(SystemExit, match='pre-training checkpoint'):
        ev.main(['--checkpoint', last])


# --- Protocols: the KTB release's evaluation (fixtures/ktb-release/eval, README there) ---

RELEASE_EVAL = KTB_FIXTURE / 'eval'


def release_eval_case(tmp_path, case):
    """(fixture metadata, saved tensors, the tiny release model as rgbx loads it, a pst900 dataset of
    the case in the layout the release read: <case>/test/{rgb,thermal,labels}/)."""
    if not (RELEASE_EVAL / 'release_eval.pt').exists():
        pytest.skip(f"KTB release evaluation fixture absent ({RELEASE_EVAL})")
    meta = json.loads((RELEASE_EVAL / 'release_eval.json').read_text())
    saved = torch.load(RELEASE_EVAL / 'release_eval.pt', map_location='cpu', weights_only=True)
    state = torch.load(KTB_FIXTURE / 'ktb_release_tiny.pth', map_location='cpu', weights_only=True)
    torch.save({**state, **saved['delta']}, tmp_path / 'release_eval_model.pth')
    cfg, _ = release_fixture()
    model = rgbx.load_pretrained(release_sized_ktb(cfg, x_channels=1), tmp_path / 'release_eval_model.pth').eval()
    root = tmp_path / case / 'test'
    for sub in ('rgb', 'thermal', 'labels'):
        (root / sub).mkdir(parents=True)
        for f in sorted((RELEASE_EVAL / case / sub).glob('*.png')) if (RELEASE_EVAL / case / sub).is_dir() else ():
            (root / sub / f.name).write_bytes(f.read_bytes())
    if case == 'real':  # the real frames' RGB, cropped as the fixture's script cropped them
        if not NYU.is_dir():
            pytest.skip(f"{NYU} is absent")
        (r0, r1), (c0, c1) = meta['real_crop']['rows'], meta['real_crop']['cols']
        for name in meta['real_crop']['frames']:
            png(root / 'rgb' / f'{name}.png', np.array(Image.open(NYU / 'RGB' / f'{name}.png'))[r0:r1, c0:c1])
    return meta, saved, model, data.build_dataset('pst900', tmp_path / case, 'test', 'thermal')


def check_release_case(tmp_path, case):
    """eval.py's release protocol against the release's own evaluate_msf / evaluate on one fixture case:
    the scored (resized) label sizes, the summed probabilities to 1e-5 relative, the per-class true /
    false positive / false negative counts (a near-tie pixel may differ), IoUs within 0.01 points and the
    mIoU over all classes at 2 decimals."""
    meta, saved, model, dataset = release_eval_case(tmp_path, case)
    spec = meta['cases'][case]
    dataset.transform = ev.ReleaseTransform(spec['short'])  # the case's EVAL.IMAGE_SIZE
    threads = torch.get_num_threads()
    # the fixture's threads: bilinear interpolation's last bits depend on the thread count, and rounding
    # to whole grey values (the release's Resize) can turn them into one grey level
    torch.set_num_threads(2)
    try:
        check_release_protocols(meta, saved, model, dataset, case, spec)
    finally:
        torch.set_num_threads(threads)


def check_release_protocols(meta, saved, model, dataset, case, spec):
    for protocol in [k.split('/')[1] for k in meta['results'] if k.startswith(case + '/')]:
        ref = meta['results'][f'{case}/{protocol}']
        scales, flip = (spec['scales'], spec['flip']) if protocol == 'release' else ((1.0,), False)
        conf = torch.zeros(5, 5, dtype=torch.long)
        for i, name in enumerate(dataset.names):
            assert name == ref['images'][i]
            rgb, x, label = dataset[i]
            assert list(label.shape) == ref['sizes_scored'][i]
            with torch.no_grad():
                probs = ev.release_probs(model, rgb[None], x[None], 5, scales, flip)
            stride = ref['probs_stride']
            assert rel_max_err(probs[..., ::stride, ::stride], saved['probs'][f'{case}/{protocol}/{name}']) < 1e-5
            conf += ev.confusion(probs.argmax(1), label[None], 5)
        tp, fp, fn = conf.diag(), conf.sum(0) - conf.diag(), conf.sum(1) - conf.diag()
        counts = torch.tensor([ref['tp'], ref['fp'], ref['fn']])
        # a pixel whose two best classes tie to float rounding may go either way: at most 1 in 10^4
        assert (torch.stack([tp, fp, fn]) - counts).abs().sum() <= 1e-4 * conf.sum(), protocol
        m = ev.metrics(conf, 'all')
        assert np.nan_to_num(m['iou']) == pytest.approx(ref['ious'], abs=1e-4)
        assert f"{100 * m['miou']:.2f}" == f"{ref['miou']:.2f}" and m['absent'] == [4]
        assert m['miou_present'] > m['miou_all']  # class 4 is absent: left out of one average, 0 in the other


def test_eval_protocol_release_matches_the_release_code_on_awkward_sizes(tmp_path):
    """75 x 103 and 118 x 67 frames, EVAL.IMAGE_SIZE 72 (both resizes of the release's Resize change the
    size), scales 0.5-1.75 + flip (evaluate_msf) and the single-scale evaluate."""
    check_release_case(tmp_path, 'small')


@pytest.mark.slow
@needs_realdata
def test_eval_protocol_release_matches_the_release_code_on_real_frames(tmp_path):
    """Three real NYUDv2 frames cut to 427 x 561 (X: their depth min-max stretched to 8 bits), EVAL.IMAGE_SIZE
    240, scales 0.5-1.75 + flip."""
    check_release_case(tmp_path, 'real')


@pytest.mark.slow
def test_eval_protocol_release_matches_the_release_code_on_a_720x1280_frame(tmp_path):
    """A 720 x 1280 frame (PST900's size) resized by half without antialiasing, to 384 x 640, scales 0.75 and
    1.25 + flip."""
    check_release_case(tmp_path, 'wide')


def test_eval_protocol_release_reads_mcubes_as_the_release(tmp_path):
    """MCubeS through --protocol release: the release's own MCubeS reader (its compiled file's test list,
    FixScaleCrop(1024), Normalize, ToTensor; fixtures/ktb-release/eval/mcubes.pt) on a synthetic 1024 x 1224
    frame in its folders: the crop (columns 196-1219), RGB with the ImageNet statistics, AoLP from the .npy
    stacked (sin, cos, sin) as stored, the labels."""
    if not (RELEASE_EVAL / 'mcubes.pt').exists():
        pytest.skip(f"KTB release MCubeS fixture absent ({RELEASE_EVAL})")
    saved = torch.load(RELEASE_EVAL / 'mcubes.pt', map_location='cpu', weights_only=True)
    y, x = np.meshgrid(np.arange(1024), np.arange(1224), indexing='ij')  # the fixture script's `pattern`
    rgb = np.stack([127.5 + 127.5 * np.sin(0.013 * y * (c + 1) + 0.021 * x + c) for c in range(3)], -1)
    angle = 0.004 * y - 0.003 * x + np.sin(0.01 * x)
    label = ((y // 97 + x // 131) % 20).astype(np.uint8)
    label[100:200, 150:400] = 255
    png(tmp_path / 'polL_color' / 'f.png', np.round(rgb).astype(np.uint8))
    png(tmp_path / 'GT' / 'f.png', label)
    for folder, v in (('polL_aolp_sin', np.sin(angle)), ('polL_aolp_cos', np.cos(angle))):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / 'f.npy', v)
    (tmp_path / 'list_folder').mkdir()
    (tmp_path / 'list_folder' / 'test.txt').write_text('f\n')
    dataset = data.build_dataset('mcubes', tmp_path, str(tmp_path / 'list_folder' / 'test.txt'), 'aolp-npy')
    dataset.transform = ev.release_transform('mcubes', 'aolp-npy', data.get_preset('mcubes'))
    image, aolp, lab = dataset[0]
    assert [list(image.shape), list(aolp.shape), [1] + list(lab.shape)] == saved['shapes'].tolist()
    assert rel_max_err(image[:, ::16, ::16], saved['image']) < 1e-6
    assert torch.equal(aolp[:, ::16, ::16], saved['aolp']) and torch.equal(lab[::16, ::16], saved['label'])


def test_eval_protocol_release_resize_by_hand():
    """The release's Resize: sizes (short side, then multiples of 32), bilinear on 0..255 values rounded half
    to even without antialiasing, labels by legacy nearest (source floor(i * in / out), not pixel centres)."""
    for (H, W), short, scored in (((427, 561), 480, (480, 640)), ((720, 1280), 720, (736, 1280)),
                                  ((1042, 1042), 1024, (1024, 1024)), ((480, 640), 480, (480, 640))):
        _, _, label = ev.release_resize(torch.zeros(3, H, W), torch.zeros(1, H, W), torch.zeros(H, W).long(), short)
        assert tuple(label.shape) == scored
    assert ev.resize_rounded(torch.tensor([[[0.0, 1.0, 2.0, 3.0]]]), (1, 6), nearest=True).tolist() == \
        [[[0, 0, 1, 2, 2, 3]]]
    # bilinear, align_corners=False: output pixel 1 of 3 samples the input at 0.5 -> 127.5 -> 128 (half to even)
    assert ev.resize_rounded(torch.tensor([[[0.0, 255.0]]]), (1, 3)).tolist() == [[[0, 128, 255]]]
    rgb = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    x = np.full((5, 7, 1), 128 / 255, np.float32)
    r, t, lab = ev.ReleaseTransform(32)(rgb, x, np.full((5, 7), 2))
    assert r.shape == (3, 32, 64) and lab.shape == (32, 64) and (lab == 2).all()
    assert torch.allclose(t, torch.full_like(t, 128 / 255))  # X: v / 255 after the resize, not standardised
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data.IMAGENET)
    assert torch.allclose(r[:, :1, :1], (torch.from_numpy(rgb[0, 0]).float().view(3, 1, 1) / 255 - mean) / std)


def test_eval_protocol_release_geometry_and_flip_by_hand():
    """evaluate_msf's geometry: scale s feeds ceil(int(s * H) / 32) * 32 per side (10 of 12 passes differ from
    round(s * H)), the flipped pass sees the mirrored input, and the summed softmaxes come back at (H, W)."""
    seen = []

    def model(rgb, x):
        seen.append((tuple(rgb.shape[-2:]), rgb[0, 0, 0, 0].item()))
        return torch.zeros(rgb.shape[0], 3, *rgb.shape[-2:])
    rgb = torch.arange(96 * 160, dtype=torch.float32).view(1, 1, 96, 160).expand(1, 3, -1, -1)
    probs = ev.release_probs(model, rgb, torch.zeros(1, 1, 96, 160), 3)
    sizes = [s for s, _ in seen[::2]]
    assert sizes == [(64, 96), (96, 128), (96, 160), (128, 224), (160, 256), (192, 288)]
    assert all(a == b for (a, _), (b, _) in zip(seen[::2], seen[1::2]))
    assert seen[0][1] == 0 and seen[1][1] == 159  # align_corners=True keeps the corner pixels; flip mirrors
    assert probs.shape == (1, 3, 96, 160) and torch.allclose(probs, torch.full_like(probs, 12 / 3))
    seen.clear()
    ev.PROTOCOLS['release-single-scale'].probs(model, rgb, torch.zeros(1, 1, 96, 160), 3, 'pst900')
    assert [s for s, _ in seen] == [(96, 160)]


def test_eval_protocol_release_mcubes_crop():
    """MCubeS: the 192 left columns dropped, then the centred 1024 x 1024 of the 1024 x 1032 left: columns
    196-1219, all rows; other frame sizes are refused."""
    cols = torch.arange(1224).expand(1, 1024, 1224)
    (crop,) = ev.mcubes_crop(cols)
    assert crop.shape == (1, 1024, 1024) and crop[0, 0, 0] == 196 and crop[0, -1, -1] == 1219
    with pytest.raises(ValueError, match='1024 x 1224'):
        ev.mcubes_crop(torch.zeros(1, 480, 640))


def test_eval_protocol_metrics_both_averages_by_hand():
    """One confusion matrix, two averages: over the classes present (3 of 4) and over all K (absent = 0)."""
    conf = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    present, every = ev.metrics(conf), ev.metrics(conf, 'all')
    assert present['miou'] == pytest.approx(5 / 9) and every['miou'] == pytest.approx(5 / 12)
    assert every['miou_present'] == present['miou'] and present['absent'] == every['absent'] == [3]
    text = ev.format_metrics(every, ['a', 'b', 'c', 'd']).splitlines()
    assert text[0].startswith('mIoU 41.67 |') and text[1] == 'mIoU over the 3 classes present 55.56'
    assert text[2].endswith(', IoU 0 in the mIoU): d')
    assert ev.format_metrics(present, ['a', 'b', 'c', 'd']).splitlines()[1] == \
        'mIoU over all 4 classes (absent = 0) 41.67'


def test_eval_protocol_refuses_the_flags_it_fixes_and_data_it_cannot_read():
    for flag in (['--flip'], ['--multi-scale'], ['--sliding'], ['--amp', 'none']):
        message = cli_error(ev.main, ['--checkpoint', 'any.pt', '--protocol', 'release'] + flag)
        assert flag[0] in message and 'fixes' in message
    assert '--rgb' in cli_error(ev.main, ['--checkpoint', 'any.pt', '--protocol', 'release', '--rgb', 'a.png'])
    for dataset, x, words in (('demo', 'depth', "release's datasets"), ('nyudv2', 'depth', '16-bit'),
                              ('mcubes', 'aolp', 'aolp-npy'), ('nyudv2', 'hha', None)):
        if words is None:
            assert ev.release_transform(dataset, x, data.get_preset(dataset)).short == 480
        else:
            with pytest.raises(ValueError, match=words):
                ev.release_transform(dataset, x, data.get_preset(dataset))
    with pytest.raises(ValueError, match='--protocol release-single-scale evaluates'):  # the name given
        ev.PROTOCOLS['release-single-scale'].transform('demo', 'depth', data.get_preset('demo'))


def test_eval_protocol_release_command_line_on_a_release_checkpoint(tmp_path, capsys, monkeypatch):
    """`eval.py --protocol release` on the release's tiny checkpoint and the fixture's awkward frames (as a
    PST900 split, EVAL.IMAGE_SIZE 72 for the test): the release's per-class IoUs and mIoU, first line mIoU."""
    meta, _, _, _ = release_eval_case(tmp_path, 'small')
    cfg, _ = release_fixture()
    monkeypatch.setitem(rgbx.SWIN_PRESETS, 'nano', dict(embed_dim=cfg['embed_dim'], depths=tuple(cfg['depths']),
                                                        heads=tuple(cfg['heads']), window_size=cfg['window_size']))
    monkeypatch.setitem(ev.RELEASE_SHORT_SIDE, 'pst900', meta['cases']['small']['short'])
    ref = meta['results']['small/release']
    capsys.readouterr()
    ev.main(['--checkpoint', str(tmp_path / 'release_eval_model.pth'), '--method', 'ktb', '--backbone', 'swin-nano',
             '--dataset', 'pst900', '--opts', f"fused_head_dim=64,aux_head_dim=32,window_size={cfg['window_size']}",
             '--data-root', str(tmp_path / 'small'), '--protocol', 'release', '--device', 'cpu',
             '--json', str(tmp_path / 'm.json')])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"mIoU {ref['miou']:.2f} |") and 'absent' in out[2] and 'survivor' in out[2]
    assert out[1].startswith('mIoU over the 4 classes present') and 'protocol release' in out[-2]
    m = json.loads((tmp_path / 'm.json').read_text())  # within 0.01 points (one grey level may round apart)
    assert np.nan_to_num(m['iou']) == pytest.approx(ref['ious'], abs=1e-4) and m['protocol'] == 'release'


def test_eval_sliding_on_a_checkpoint_built_from_flags(capsys, monkeypatch):
    """--sliding on a checkpoint without rgbx's config (no run crop): the dataset's training crop."""
    cfg, _ = release_fixture()
    monkeypatch.setitem(rgbx.SWIN_PRESETS, 'nano', dict(embed_dim=cfg['embed_dim'], depths=tuple(cfg['depths']),
                                                        heads=tuple(cfg['heads']), window_size=cfg['window_size']))
    calls = []
    monkeypatch.setattr(ev, 'sliding_logits', lambda model, r, x, k, crop: calls.append(crop) or model(r, x))
    ev.main(['--checkpoint', str(KTB_FIXTURE / 'ktb_release_tiny.pth'), '--method', 'ktb', '--backbone', 'swin-nano',
             '--dataset', 'demo', '--opts', f"fused_head_dim=64,aux_head_dim=32,window_size={cfg['window_size']}",
             '--device', 'cpu', '--sliding'])
    assert 'mIoU' in capsys.readouterr().out and set(calls) == {data.PRESETS['demo'].crop}


# --- Protocols: DFormer's and CMX's evaluation (fixtures/protocols: their own functions on random logits) ---

PROTOCOL_FIXTURE = Path(__file__).resolve().parent / 'fixtures' / 'protocols'
MM_EVAL = Path(__file__).resolve().parent / 'fixtures' / 'multimae' / 'eval'


def protocol_fixture():
    if not (PROTOCOL_FIXTURE / 'dformer_cmx.pt').exists():
        pytest.skip(f"DFormer / CMX fixture absent ({PROTOCOL_FIXTURE})")
    saved = torch.load(PROTOCOL_FIXTURE / 'dformer_cmx.pt', map_location='cpu', weights_only=True)
    meta = json.loads((PROTOCOL_FIXTURE / 'dformer_cmx.json').read_text())['results']
    weight, bias = saved['model.weight'], saved['model.bias']
    return meta, saved, lambda rgb, x: F.conv2d(torch.cat([rgb, x], 1), weight, bias, padding=1)


def protocol_pattern(h, w, phase):
    """The fixture script's inputs: a smooth float32 image (h, w, 3) in [0, 255] and labels (h, w)."""
    y, x, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing='ij')
    img = (127.5 + 127.5 * np.sin(0.031 * y * (c + 1) + 0.047 * x + phase + c)).astype(np.float32)
    label = (y[..., 0] // 23 + x[..., 0] // 37 + int(phase)) % 4
    label[: h // 4, : w // 5] = 255
    return img, torch.from_numpy(label)


def test_eval_protocol_dformer_matches_dformer_code_on_random_logits():
    """DFormer's evaluate_msf --sliding (scales 0.5-1.5 + flip, 480 x 640 and 480 x 480 windows at stride 2/3,
    inputs smaller than a window upsampled to it) on a 3x3-convolution model: summed probabilities to 1e-5,
    the confusion matrix, and its mIoU over all classes (class 4 absent: 0)."""
    meta, saved, model = protocol_fixture()
    for case in ('dformer_nyu', 'dformer_sun'):
        ref, conf = meta[case], torch.zeros(5, 5, dtype=torch.long)
        for i, (h, w) in enumerate(ref['sizes']):
            (img, label), (xi, _) = protocol_pattern(h, w, i), protocol_pattern(h, w, i + 0.5)
            rgb, x = (torch.from_numpy(v.transpose(2, 0, 1)[None] / 255 - 0.5) for v in (img, xi))
            with torch.no_grad():
                probs = ev.dformer_probs(model, rgb, x, 5, tuple(ref['crop']))
            s = ref['probs_stride']
            assert rel_max_err(probs[..., ::s, ::s], saved[f'{case}/{i}/probs']) < 1e-5, (case, i)
            conf += ev.confusion(probs.argmax(1), label[None], 5)
        assert conf.tolist() == ref['hist'], case
        m = ev.metrics(conf, 'all')
        assert np.round(100 * np.nan_to_num(m['iou']), 2) == pytest.approx(ref['ious'], abs=1e-4)
        assert f"{100 * m['miou']:.2f}" == f"{ref['miou']:.2f}" and m['absent'] == [4]


def test_eval_protocol_cmx_matches_cmx_code_on_random_logits():
    """CMX's sliding_eval_rgbX (scales 0.75-1.25, flip, centred padding to 480 x 640, its windows with the
    height and width steps as it lays them, exp of the summed logits) on a 3x3-convolution model, frames of
    480 x 640, 427 x 561 and 700 x 900: summed scores to 1e-5, the confusion matrix, mIoU over the present."""
    meta, saved, model = protocol_fixture()
    ref, conf = meta['cmx'], torch.zeros(5, 5, dtype=torch.long)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in data.IMAGENET)
    for i, (h, w) in enumerate(ref['sizes']):
        (img, label), (xi, _) = protocol_pattern(h, w, i), protocol_pattern(h, w, i + 0.5)
        rgb, x = (((torch.from_numpy(v.transpose(2, 0, 1)).double() / 255 - mean) / std).float()[None]
                  for v in (img, xi))
        with torch.no_grad():
            scores = ev.cmx_probs(model, rgb, x, 5)
        s = ref['scores_stride']
        assert rel_max_err(scores[..., ::s, ::s], saved[f'cmx/{i}/scores']) < 1e-5, i
        conf += ev.confusion(scores.argmax(1), label[None], 5)
    assert conf.tolist() == ref['hist']
    m = ev.metrics(conf)
    assert m['miou'] == pytest.approx(ref['miou'], abs=1e-12) and m['absent'] == [4]


def test_eval_protocol_input_conventions_by_hand():
    """DFormer and CMX keep cv2's BGR order: channel 0 fed to the model is B, normalised with the ImageNet
    mean of R; DFormer's depth (v / 255 - 0.48) / 0.28; the inputs they refuse."""
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 2] = 255  # pure blue
    r, x, _ = ev.dformer_transform('nyudv2', 'depth8', data.get_preset('nyudv2'))(
        rgb, np.full((2, 3, 1), 0.5, np.float32), np.zeros((2, 3), np.int64))
    assert r[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229) and r[2, 0, 0].item() == pytest.approx(-0.406 / 0.225)
    assert x.shape == (1, 2, 3) and x[0, 0, 0].item() == pytest.approx((0.5 - 0.48) / 0.28)
    with pytest.raises(ValueError, match='depth8'):
        ev.dformer_transform('nyudv2', 'hha', data.get_preset('nyudv2'))
    with pytest.raises(ValueError, match='3-channel'):
        ev.cmx_transform('nyudv2', 'depth', data.get_preset('nyudv2'))
    hha = np.zeros((2, 3, 3), np.float32)
    hha[..., 0] = 1.0
    _, x, _ = ev.cmx_transform('nyudv2', 'hha', data.get_preset('nyudv2'))(rgb, hha, np.zeros((2, 3), np.int64))
    assert x[2, 0, 0].item() == pytest.approx((1 - 0.406) / 0.225)  # HHA's first channel lands last (BGR)


def multimae_eval_fixture():
    if not (MM_EVAL / 'multimae_eval.pt').exists():
        pytest.skip(f"MultiMAE evaluation fixture absent ({MM_EVAL})")
    return (torch.load(MM_EVAL / 'multimae_eval.pt', map_location='cpu', weights_only=True),
            json.loads((MM_EVAL / 'multimae_eval.json').read_text()))


def test_eval_protocol_multimae_averages_as_its_mean_iou():
    """MultiMAE's mean_iou (mmseg's) on random maps (fixtures/multimae/eval): per-class IoU, NaN for a class
    in neither map, nan-mean; a class predicted but never present scores 0 and counts."""
    saved, meta = multimae_eval_fixture()
    preds, gts = saved['preds'].long(), saved['gts'].long()
    m = ev.metrics(sum(ev.confusion(p, g, 8) for p, g in zip(preds, gts)))
    assert [None if math.isnan(v) else pytest.approx(v, abs=1e-12) for v in m['iou']] == meta['mean_iou']['iou']
    assert f"{100 * m['miou']:.2f}" == f"{meta['mean_iou']['miou']:.2f}" and m['absent'] == [7]


@needs_realdata
def test_eval_protocol_multimae_matches_multimae_code_on_a_real_frame():
    """MultiMAE's NYUv2 evaluation input on a real frame: the 640 x 640 canvas with the frame at its top-left,
    depth standardised on its 10-90 % values without the padding (then 0), labels shifted with padding ignored
    (fixtures/multimae/eval)."""
    saved, _ = multimae_eval_fixture()
    rgb = np.array(Image.open(NYU / 'RGB' / '0.png'))
    x = data.read_x(NYU / 'DepthFilled' / '0.png', data.DEPTH)
    label = data.read_label(NYU / 'Label' / '0.png', 'nyudv2')
    r, d, lab = ev.multimae_transform('nyudv2', 'depth', data.get_preset('nyudv2'))(rgb, x, label)
    assert r.shape == (3, 640, 640) and d.shape == (1, 640, 640) and lab.shape == (640, 640)
    assert rel_max_err(d[0, ::4, ::4], saved['depth']) < 1e-5
    assert torch.equal(lab[::4, ::4], saved['labels'].long())
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data.IMAGENET)
    assert torch.allclose(r[:, 600:, 600:], (128 / 255 - mean) / std)  # padded with 128 before normalising


def test_eval_protocol_multimae_depth_leaves_out_holes_and_padding():
    """Holes (0) and padding take no part in the statistics and are 0 afterwards; a model that standardises
    depth itself is given the protocol's depth as it is."""
    depth = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 0.0]])
    valid = depth > 0
    out = ev.multimae_depth(depth, valid)
    mid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[0:5]  # int(0.1 * 6) = 0 .. int(0.9 * 6) = 5
    assert torch.allclose(out[valid], (depth[valid] - mid.mean()) / (mid.var() + 1e-6).sqrt())
    assert out[0, 0] == 0 and out[1, 3] == 0
    seen = []

    class Model(torch.nn.Module):
        depth_standardize = True

        def forward(self, rgb, x):
            seen.append(self.depth_standardize)
            return torch.zeros(1, 3, *rgb.shape[-2:])
    model = Model()
    ev.multimae_probs(model, torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4), 3, 'nyudv2')
    assert seen == [False] and model.depth_standardize is True
    with pytest.raises(ValueError, match='--x-modality depth'):
        ev.multimae_transform('nyudv2', 'hha', data.get_preset('nyudv2'))


# --- Benchmark ---

@pytest.mark.slow
@pytest.mark.parametrize('method,backbone', [('early_fusion', 'swin-nano'), ('ktb', 'swin-nano'),
                                              ('gopt', 'vit-nano'), ('maskmentor', 'vit-nano')])
def test_eval_benchmark_fields_present_and_positive(tmp_path, method, backbone):
    figures = ev.main(['--benchmark', '--method', method, '--backbone', backbone, '--size', '40x56',
                       '--repeats', '1', '--workers', '0', '--json', str(tmp_path / 'b.json')])
    saved = json.load(open(tmp_path / 'b.json'))
    assert saved == json.loads(json.dumps(figures))
    numbers = {k: v for k, v in saved.items() if isinstance(v, (int, float))}
    assert {'trainable_params', 'total_params', 'gflops', 'latency_s', 'latency_ms_flip_s', 'images_per_s',
            'train_step_s', 'train_peak_mem_mb', 'infer_peak_mem_mb', 'data_samples_per_s', 'backbone_fwd_s',
            'backbone_fwd_bwd_s', 'train_step_over_floor'} <= set(numbers)
    assert all(v > 0 for v in numbers.values())
    # the bf16 column: timed with its error against fp32, or (a CPU that emulates bf16) the reason it is not
    assert {'latency_bf16_s', 'bf16_rel_err'} <= set(numbers) or 0 < saved['bf16_cpu_matmul_speed'] < 1
    torch.manual_seed(0)
    model = rgbx.build_model(method, backbone, 5, 1)
    assert saved['trainable_params'] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert saved['total_params'] == sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_eval_benchmarks_the_checkpoint_and_honours_workers(tmp_path, monkeypatch):
    cfg = demo_config(tmp_path, max_steps=1, lr=0.05, eval_every=0)
    tr.train(cfg)
    best = os.path.join(cfg.out_dir, 'last.pt')
    seen = {}
    monkeypatch.setattr(ev, 'benchmark', lambda model, *a, **k: seen.update(model=model) or {})
    ev.main(['--checkpoint', best, '--benchmark', '--workers', '0'])
    trained, _ = ev.load_model(best)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in seen['model'].state_dict().items())
    real_loader = data.shard_loader
    monkeypatch.setattr(data, 'shard_loader', lambda dataset, *a, **k: seen.update(workers=k['workers'])
                        or real_loader(torch.utils.data.Subset(dataset, range(2)), *a, **k))  # 2 images suffice
    ev.main(['--checkpoint', best, '--workers', '0'])
    assert seen['workers'] == 0


@pytest.mark.slow
def test_eval_floor_timings_floor_is_the_backbone_on_every_stream():
    """KTB's floors: the frozen Swin on batch streams x batch (training, input with a gradient)
    and on one image per stream (inference); the ratios are the quotients of the timings."""
    torch.manual_seed(0)
    model = rgbx.build_ktb('nano', 5, 1)
    seen = []
    model.backbone.register_forward_hook(lambda m, inp, out: seen.append((inp[0].shape[0], inp[0].requires_grad)))
    out = ev.floor_timings(model, (40, 56), 5, 1, torch.device('cpu'), repeats=1, batch=2)
    assert set(seen) == {(4, True), (2, False)} and len(seen) == 4  # a warm-up round and one timed round
    assert out['train_step_over_floor'] == out['train_step_s'] / out['backbone_fwd_bwd_s']
    assert out['latency_over_floor'] == out['latency_s'] / out['backbone_fwd_s']
    assert all(out[k] > 0 for k in ('train_step_s', 'backbone_fwd_bwd_s', 'latency_s', 'backbone_fwd_s'))
    assert not model.training


@pytest.mark.slow
def test_eval_out_never_replaces_an_input_and_names_png(demo_run, tmp_path):
    cfg, _ = demo_run
    best = os.path.join(cfg.out_dir, 'best.pt')
    rgb, x, _ = data.DemoDataset('test', n=1).read(0)
    png(tmp_path / 'rgb.png', rgb)
    png(tmp_path / 'x.png', (x[..., 0] * 255).astype(np.uint8))
    photo = (tmp_path / 'rgb.png').read_bytes()
    assert 'would be overwritten' in cli_error(ev.main, ['--checkpoint', best, '--rgb', str(tmp_path / 'rgb.png'),
                                                         '--x', str(tmp_path / 'x.png'), '--out', str(tmp_path / 'rgb.png')])
    assert (tmp_path / 'rgb.png').read_bytes() == photo
    assert '*.png' in cli_error(ev.main, ['--checkpoint', best, '--rgb', str(tmp_path / 'rgb.png'),
                                          '--x', str(tmp_path / 'x.png'), '--out', str(tmp_path / 'seg')])
    assert 'reads no folder' in cli_error(ev.main, ['--checkpoint', best, '--data-root', str(tmp_path)])
    assert 'would be ignored' in cli_error(ev.main, ['--checkpoint', best, '--pretrained', str(tmp_path / 'rgb.png')])
    assert 'fp16 needs CUDA' in cli_error(ev.main, ['--checkpoint', best, '--amp', 'fp16', '--device', 'cpu'])
    assert 'is a folder' in cli_error(ev.main, ['--checkpoint', str(tmp_path)])


def tree_bytes(folder):
    """Every file under `folder` with its bytes: what a refused command must leave alone."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob('*')) if p.is_file()}


@pytest.mark.slow
def test_eval_outputs_never_write_over_inputs_checkpoints_or_split_files(tmp_path, monkeypatch):
    """Every output flag of eval.py, through a real process where it matters: the dataset's
    Label/ and RGB/ (--save-pred), a run's checkpoint and config (--json, also with --benchmark),
    the split file (--json), reached directly, through a symbolic link and by a relative path:
    refused with one line naming the flag, nothing changed. A success says what it wrote."""
    root = nyu_pair(tmp_path / 'nyu')
    cfg = demo_config(tmp_path, max_steps=1, eval_every=0)
    tr.train(cfg)
    run_dir = Path(cfg.out_dir)
    last = run_dir / 'last.pt'
    (tmp_path / 'link').symlink_to(root)
    before = {d: tree_bytes(d) for d in (root, run_dir)}
    monkeypatch.chdir(tmp_path / 'link' / 'RGB')
    refused = [(['--save-pred', str(root / 'Label')], ['--save-pred', 'inside the dataset']),
               (['--save-pred', '.'], ['--save-pred', 'the dataset']),
               (['--json', str(last)], ['--json', 'the --checkpoint file']),
               (['--json', str(run_dir / 'config.json')], ['--json', "the run's config.json"]),
               (['--json', '../test.txt'], ['--json', 'the dataset']),
               (['--json', str(tmp_path / 'link' / 'test.txt')], ['--json', 'the dataset'])]
    for argv, words in refused:
        message = cli_error(ev.main, ['--checkpoint', str(last), *argv])
        assert all(w in message for w in words), message
    res = run_cli('eval.py', '--benchmark', '--json', run_dir / 'last.pt', '--repeats', '1', '--size', '32x32')
    one_line_error(res, '--json', 'another run')
    res = run_cli('eval.py', '--checkpoint', last, '--save-pred', root / 'RGB')
    one_line_error(res, '--save-pred', 'dataset')
    (tmp_path / 'notes.txt').write_text('my notes')
    assert 'not a JSON file' in cli_error(ev.main, ['--checkpoint', str(last), '--json', str(tmp_path / 'notes.txt')])
    pair = ['--rgb', str(root / 'RGB' / '0.png'), '--x', str(root / 'HHA' / '0.png'), '--out', str(tmp_path / 's.png')]
    assert 'drop --json' in cli_error(ev.main, ['--checkpoint', str(last), *pair, '--json', str(tmp_path / 'm.json')])
    assert 'is a folder' in cli_error(ev.main, ['--checkpoint', str(last), '--json', str(tmp_path)])
    assert {d: tree_bytes(d) for d in (root, run_dir)} == before and (tmp_path / 'notes.txt').read_text() == 'my notes'
    res = run_cli('eval.py', '--checkpoint', last, '--json', run_dir / 'metrics.json', '--save-pred', run_dir / 'pred')
    assert res.returncode == 0, res.stderr
    assert f"wrote {run_dir / 'metrics.json'}" in res.stdout and f"to {run_dir / 'pred'}" in res.stdout
    assert json.loads((run_dir / 'metrics.json').read_text())['miou'] >= 0


def test_eval_all_void_labels_explain_the_nan(tmp_path):
    m = ev.metrics(torch.zeros(3, 3, dtype=torch.long))
    assert 'no labelled pixel' in ev.format_metrics(m, ['a', 'b', 'c'])


@pytest.mark.slow
def test_eval_worker_errors_are_one_line(tmp_path):
    root = nyu_pair(tmp_path / 'nyu')
    tr.main(nyu_argv(root, tmp_path / 'run', '--max-steps', '1', '--eval-every', '0'))
    (root / 'Label' / '5.png').write_bytes(b'not a png')
    res = run_cli('eval.py', '--checkpoint', tmp_path / 'run' / 'last.pt', '--workers', '1')
    one_line_error(res, 'Label/5.png', 'cannot be decoded')


def test_eval_own_rgbd_frame_gets_hha_from_its_depth(tmp_path, monkeypatch):
    """--depth on a model trained on HHA: HHA is computed from the depth (said in the output)
    and equals feeding the same HHA as a file with --x."""
    torch.manual_seed(0)
    run = ev.run_spec('early_fusion', 'swin-nano', 'nyudv2', 'hha', 'head_dim=8,embed_dim=8')
    model = run.build().eval()
    ckpt = tmp_path / 'hha.pt'
    from dataclasses import asdict
    config = asdict(tr.Config(dataset='nyudv2', method='early_fusion', backbone='swin-nano', pretrained='none',
                              opts='head_dim=8,embed_dim=8', crop='480x640'))
    torch.save(dict(model=model.state_dict(), config=config, step=1, frozen_sha1=rgbx.frozen_fingerprint(model),
                    run=asdict(run)), ckpt)
    depth, _ = hha_scene()
    depth_mm = np.round(np.nan_to_num(depth) * 1000).astype(np.uint16)
    png(tmp_path / 'd.png', depth_mm)
    png(tmp_path / 'rgb.png', np.random.default_rng(0).integers(0, 256, (*depth_mm.shape, 3), dtype=np.uint8))
    camera = ','.join(map(str, HHA_CAMERA))
    png(tmp_path / 'hha.png', data.hha(depth_mm / 1000.0, HHA_CAMERA, depth_mm == 0))
    ev.main(['--checkpoint', str(ckpt), '--rgb', str(tmp_path / 'rgb.png'), '--depth', str(tmp_path / 'd.png'),
             '--camera', camera, '--out', str(tmp_path / 'a.png')])
    ev.main(['--checkpoint', str(ckpt), '--rgb', str(tmp_path / 'rgb.png'), '--x', str(tmp_path / 'hha.png'),
             '--out', str(tmp_path / 'b.png')])
    assert np.array_equal(np.array(Image.open(tmp_path / 'a.png')), np.array(Image.open(tmp_path / 'b.png')))
    assert 'camera' in cli_error(ev.main, ['--checkpoint', str(ckpt), '--rgb', str(tmp_path / 'rgb.png'),
                                           '--depth', str(tmp_path / 'd.png'), '--out', str(tmp_path / 'c.png')])


def test_eval_bf16_on_a_cpu_without_bf16_units_is_said(monkeypatch):
    assert ev.bf16_matmul_speed(n=32, repeats=1) > 0
    said = []
    monkeypatch.setattr(ev, 'bf16_matmul_speed', lambda: 0.03)
    assert ev.check_cpu_bf16('bf16', torch.device('cpu'), said.append) == 0.03
    assert len(said) == 1 and '33x slower than fp32' in said[0] and '--amp none' in said[0]
    monkeypatch.setattr(ev, 'bf16_matmul_speed', lambda: 4.0)
    assert ev.check_cpu_bf16('bf16', torch.device('cpu'), said.append) == 4.0 and len(said) == 1  # fast: no note
    assert ev.check_cpu_bf16('none', torch.device('cpu'), said.append) is None and len(said) == 1


def pretend_one_gpu(monkeypatch, capability, name):
    """torch.cuda as it answers on a machine with one GPU; returns the devices set_device was given."""
    set_to = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)

    def set_device(device):  # as torch checks it: an index is needed
        if torch.device(device).index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        set_to.append(torch.device(device))
    monkeypatch.setattr(torch.cuda, 'set_device', set_device)
    return set_to


def test_eval_cuda_devices_checked_on_a_one_gpu_machine(monkeypatch, tmp_path):
    """On a machine with one GPU (as torch.cuda reports it): --device cuda:5 is a one-line
    error naming the devices there are; a single process on cuda:0 makes it the current
    device; a second torchrun process on the machine is refused (NCCL cannot share a GPU);
    --amp bf16 on a GPU before Ampere is refused, on Ampere taken."""
    set_to = pretend_one_gpu(monkeypatch, (7, 0), 'Tesla V100')
    with pytest.raises(ValueError, match=r'--device cuda:5: this machine has 1 CUDA device\(s\), cuda:0 \.\. cuda:0'):
        ev.check_device('cuda:5')
    assert '--device cuda:5' in cli_error(tr.main, ['--device', 'cuda:5', '--out-dir', str(tmp_path / 'run')])
    monkeypatch.delenv('RANK', raising=False)
    assert ev.setup_distributed('cuda:0') == (0, 1, torch.device('cuda:0')) and set_to == [torch.device('cuda:0')]
    assert ev.setup_distributed('cuda') == (0, 1, torch.device('cuda:0')) and set_to[-1] == torch.device('cuda:0')
    assert ev.setup_distributed('') == (0, 1, torch.device('cuda:0'))
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '1')
    with pytest.raises(ValueError, match='--nproc_per_node 1'):
        ev.setup_distributed('cuda')
    with pytest.raises(ValueError, match=r'--amp bf16: cuda:0 \(Tesla V100, compute capability 7.0\).*--amp fp16'):
        ev.check_cuda_bf16('bf16', torch.device('cuda:0'))
    ev.check_cuda_bf16('fp16', torch.device('cuda:0'))
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (8, 0))
    ev.check_cuda_bf16('bf16', torch.device('cuda:0'))


def test_eval_tf32_policy_sets_matrix_products_and_convolutions():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        ev.set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == 'high'
        ev.set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == 'highest'
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_eval_bf16_column_times_and_compares_with_fp32(monkeypatch):
    monkeypatch.setattr(ev, 'bf16_matmul_speed', lambda: 2.0)  # as on a CPU with bf16 units
    torch.manual_seed(0)
    model = rgbx.build_model('early_fusion', 'swin-nano', 5, 1, head_dim=8)
    col = ev.bf16_column(model, torch.randn(1, 3, 32, 32), torch.randn(1, 1, 32, 32), torch.device('cpu'), 1)
    assert col['latency_bf16_s'] > 0 and 0 < col['bf16_rel_err'] < 0.1  # bf16's 8-bit mantissa, not garbage


def eval_rank(rank, world, rendezvous, argvs, out):
    """One process of a 2-process `eval.py` (as torchrun runs it): its exit message, or 'ok'."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS='1')
    torch.distributed.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world,
                                         timeout=RENDEZVOUS_TIMEOUT)
    try:
        ev.main(argvs[rank])
        message = 'ok'
    except SystemExit as e:
        message = str(e.code)
    left = ' (its process group left to the exit, which can abort it)' if torch.distributed.is_initialized() else ''
    Path(out[rank]).write_text(message + left)


@pytest.mark.slow
def test_eval_torchrun_where_one_rank_fails_ends_in_one_line_on_each(tmp_path, demo_run):
    """Rank 1 fails on a missing checkpoint; rank 0, waiting for it in the evaluation's
    all-reduce, ends with one line saying another process stopped, not gloo's traceback."""
    cfg, _ = demo_run
    good, missing = os.path.join(cfg.out_dir, 'best.pt'), str(tmp_path / 'gone.pt')
    out = [str(tmp_path / 'rank0'), str(tmp_path / 'rank1')]
    torch.multiprocessing.spawn(eval_rank, args=(2, str(tmp_path / 'rdv'), [['--checkpoint', good],
                                                                           ['--checkpoint', missing]], out), nprocs=2)
    said = [Path(o).read_text() for o in out]
    assert said[1].startswith('error: ') and 'gone.pt' in said[1]
    assert said[0] == f'error: {ev.PEER_FAILED}', said[0]


def test_eval_run_spec_takes_the_recipes_options_unless_given():
    """One resolution: the options given, then the recipe's for the dataset where none is given
    (KTB's OHEM on MCubeS), MaskMentor's recipe picked by its stage."""
    options = lambda *a, **k: ev.run_spec(*a, **k).model_args['options']
    assert options('ktb', 'swin-base', 'mcubes')['ohem'] is True
    assert options('ktb', 'swin-base', 'mcubes', opts='ohem=no')['ohem'] is False
    assert options('ktb', 'swin-base', 'nyudv2')['ohem'] is False
    assert options('maskmentor', 'vit-base', 'nyudv2', opts='stage=pretrain') == \
        rgbx.resolve_options('maskmentor', 'vit-base', {'stage': 'pretrain'})


def test_eval_older_run_format_loads_as_it_ran():
    """Format 1 stored MaskMentor fine-tuning's depth_standardize without using it: such a run (and one of
    the format before stored runs) is read with it off, as it trained; a run of today's format keeps it."""
    from dataclasses import asdict
    stored = asdict(ev.run_spec('maskmentor', 'vit-nano', 'demo', opts='head_dim=16'))
    assert stored['format'] == ev.RUN_FORMAT and stored['model_args']['options']['depth_standardize'] is True
    old = {k: v for k, v in stored.items() if k != 'format'}
    assert ev.checkpoint_run({'run': old}, 'x.pt').model_args['options']['depth_standardize'] is False
    assert ev.checkpoint_run({'run': stored}, 'x.pt').model_args['options']['depth_standardize'] is True
    legacy = dict(method='maskmentor', backbone='vit-nano', dataset='demo', x_modality='', opts='head_dim=16',
                  pretrained='', data_root='', crop='')
    assert ev.checkpoint_run({'config': legacy}, 'x.pt').model_args['options']['depth_standardize'] is False
    pre = ev.checkpoint_run({'run': {**old, 'model_args': {**old['model_args'], 'options': {
        **old['model_args']['options'], 'stage': 'pretrain'}}}}, 'x.pt')
    assert pre.model_args['options']['depth_standardize'] is True  # pre-training always used it


def test_eval_checkpoint_with_model_arguments_of_another_version_is_one_line():
    with pytest.raises(ValueError, match='model arguments this code does not know'):
        ev.checkpoint_run({'run': {'model_args': {}, 'dataset': 'demo', 'x_modality': 'depth', 'colour': 1}}, 'x.pt')
    assert ev.trained_weights({'model': {'a': 1, 'steps_done': 2}}) == {'a': 1}


# ----------------------------------------------------------------------------
# Training (train.py): config, flags, schedule, checkpoints, resume, faults, DDP, command line
# ----------------------------------------------------------------------------

# --- Config and flags ---

@pytest.mark.parametrize('argv,flag', [
    (['--epochs', '-5'], '--epochs'), (['--epochs', '0'], '--epochs'), (['--lr', '-0.5'], '--lr'),
    (['--lr', '0'], '--lr'), (['--batch-size', '-1'], '--batch-size'), (['--save-every', '-1'], '--save-every'),
    (['--crop', '0x0'], '--crop'), (['--crop', 'abc'], '--crop'), (['--grad-accum', '0'], '--grad-accum'),
    (['--log-every', '0'], '--log-every'), (['--weight-decay', '-1'], '--weight-decay'),
    (['--warmup-epochs', '-1'], '--warmup-epochs'), (['--max-steps', '0'], '--max-steps'),
    (['--device', 'tpu'], '--device'), (['--allow-changes'], '--allow-changes only acts with --resume'),
    (['--resume', '--overwrite'], '--overwrite replaces it')]
    + ([] if torch.cuda.is_available() else [(['--device', 'cuda'], '--device cuda')]))
def test_train_bad_flags_are_one_line_errors_naming_the_flag(tmp_path, argv, flag):
    assert flag in cli_error(tr.main, argv + ['--out-dir', str(tmp_path / 'run')])
    assert not (tmp_path / 'run').exists()  # refused before anything is written


def test_train_preset_sentinels_are_none_and_real_zeros_are_honoured():
    recipe = rgbx.recipe('early_fusion', 'nyudv2')
    cfg = tr.parse_config(['--dataset', 'nyudv2', '--weight-decay', '0', '--warmup-epochs', '0'])
    assert (cfg.weight_decay, cfg.warmup_epochs) == (0.0, 0.0)
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.crop) == (recipe.epochs, recipe.lr, recipe.batch_size, '480x640')
    assert recipe.warmup_epochs > 0 and recipe.weight_decay > 0  # so the zeros above were not the preset's
    assert tr.resolve(cfg) == cfg  # resolving twice changes nothing
    assert tr.lr_at(0, 100, 0, 1e-3) == 1e-3  # zero warm-up: the base lr from the first step
    assert tr.config_from_dict(dict(max_steps=0), 'old.pt').max_steps is None  # the former "all epochs"
    with pytest.raises(ValueError, match="old.pt has config fields this code does not know: \\['colour'\\]"):
        tr.config_from_dict(dict(colour='red'), 'old.pt')


# --- Schedule, parameter groups, sampler ---

def test_train_lr_schedule():
    lrs = [tr.lr_at(s, 100, 10, 1.0) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.55) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 ** 0.9) and lrs[100] == 0.0
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))


def test_train_param_groups_no_decay_on_norms_biases_tokens():
    model = rgbx.build_model('early_fusion', 'vit-nano', 5, 1)
    model.backbone.blocks[0].requires_grad_(False)
    decay, plain = model.param_groups(0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert plain['weight_decay'] == 0 and decay['weight_decay'] == 0.01
    assert {names[id(p)] for p in plain['params']} >= {'backbone.cls_token', 'backbone.norm.weight', 'head.conv1.bias'}
    assert all(p.ndim > 1 for p in decay['params'])
    assert not any(names[id(p)].startswith('backbone.blocks.0.') for p in decay['params'] + plain['params'])


def test_train_tf32_and_workers_defaults(monkeypatch, tmp_path):
    """TF32 is on unless --no-tf32 (on CUDA only; a resume may change it with
    --allow-changes); --workers defaults to 0 on CPU and on CUDA to this process's share
    of the cores less one, at most 8 (how to run, not what: never compared on resume)."""
    out = ['--out-dir', str(tmp_path / 'run')]
    assert tr.parse_config(out).tf32 is True and tr.parse_config(['--no-tf32', *out]).tf32 is False
    assert 'tf32' in tr.HARMLESS_CHANGES and 'workers' in tr.RUN_ONLY
    assert tr.parse_config(out).workers == 0 and tr.parse_config(['--workers', '3', *out]).workers == 3
    monkeypatch.setattr(data, 'affine_cores', lambda: 16)
    assert tr.default_workers(torch.device('cpu')) == 0 and tr.default_workers(torch.device('cuda')) == 8
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert tr.default_workers(torch.device('cuda')) == 3
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '16')
    assert tr.default_workers(torch.device('cuda')) == 0


def test_train_sampler_resumes_and_shards():
    full = tr.ResumableSampler(10, seed=1, batch=2)
    full.set_epoch(3)
    order = list(full)
    assert {e for e, _ in order} == {3} and sorted(i for _, i in order) == list(range(10))
    full.set_epoch(3, start=4)
    assert list(full) == order[4:]
    shards = [tr.ResumableSampler(10, seed=1, rank=r, world=2, batch=2) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    # rank r takes rows 2r, 2r + 1 of each global batch of 4
    assert list(shards[0]) == order[0:2] + order[4:6] and list(shards[1]) == order[2:4] + order[6:8]


# --- Checkpoints ---

def test_train_checkpoint_atomic_and_verified(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    tr.save_checkpoint({'model': {'w': torch.ones(3)}, 'config': {}, 'step': 1}, path)
    real_replace = os.replace

    def crash(src, dst):  # the process dies after writing the temporary file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(tr.os, 'replace', crash)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint({'model': {'w': torch.zeros(3)}, 'config': {}, 'step': 2}, path)
    monkeypatch.setattr(tr.os, 'replace', real_replace)
    ckpt = ev.load_run_checkpoint(path)
    assert ckpt['step'] == 1 and torch.equal(ckpt['model']['w'], torch.ones(3))
    blob = open(path, 'rb').read()
    open(path, 'wb').write(blob[:len(blob) - 100])
    with pytest.raises(RuntimeError, match='truncated'):
        ev.load_run_checkpoint(path)
    torch.save({'w': torch.ones(1)}, path)
    with pytest.raises(ValueError, match='not an rgbx training checkpoint'):
        ev.load_run_checkpoint(path)


@pytest.mark.slow
def test_train_checkpoint_of_the_previous_format_still_loads_and_gives_its_numbers():
    """A checkpoint written before checkpoints stored their model arguments (config and option
    text only) rebuilds and reproduces the evaluation it stored."""
    path = Path(__file__).resolve().parent / 'fixtures' / 'checkpoints' / 'gopt_vit-nano_demo_2steps.pt'
    ckpt = ev.load_run_checkpoint(path)
    run = ev.checkpoint_run(ckpt, path)
    assert 'run' not in ckpt and run.model_args['options']['prompt_dim'] == 4
    model, run = ev.load_model(path)
    loader = data.loader(data.build_dataset('demo', '', 'test', x_standardised=run.x_standardised))
    m = ev.metrics(ev.evaluate(model, loader, 5, torch.device('cpu')))
    assert m['miou'] == pytest.approx(ckpt['evaluation']['miou'], abs=1e-12)


@pytest.mark.parametrize('name', ['ktb_swin-nano_demo_2steps', 'maskmentor_vit-nano_demo_2steps'])
def test_train_checkpoint_written_before_typed_configs_loads_and_gives_its_numbers(tmp_path, name):
    """KTB and MaskMentor fine-tuning checkpoints written by train.py before each method's options
    became a typed config (less their optimizer state; KTB's frozen Swin-nano: its seed-0
    initialisation) rebuild from their stored arguments and reproduce their stored mIoU."""
    path = Path(__file__).resolve().parent / 'fixtures' / 'checkpoints' / f'{name}.pt'
    ckpt = ev.load_run_checkpoint(path)
    pretrained = None
    if name.startswith('ktb'):
        torch.manual_seed(0)
        pretrained = str(tmp_path / 'swin_nano.pth')
        torch.save({'model': rgbx.swin('nano').state_dict()}, pretrained)
    model, run = ev.load_model(path, pretrained)
    assert run.model_args['options'] == ckpt['run']['model_args']['options']
    loader = data.loader(data.build_dataset('demo', '', 'test', x_standardised=run.x_standardised))
    m = ev.metrics(ev.evaluate(model, loader, 5, torch.device('cpu')))
    assert m['miou'] == pytest.approx(ckpt['evaluation']['miou'], abs=1e-12)


@pytest.mark.slow
def test_train_checkpoint_stores_its_model_arguments_and_rebuilds_from_them(tmp_path, monkeypatch):
    cfg = demo_config(tmp_path, method='gopt', backbone='vit-nano', pretrained='none', max_steps=1,
                      opts='prompt_dim=4,head_dim=8,carry_aux=no')
    tr.train(cfg)
    ckpt = ev.load_run_checkpoint(os.path.join(cfg.out_dir, 'last.pt'))
    run = ev.checkpoint_run(ckpt, 'last.pt')
    assert ckpt['run']['model_args']['options']['carry_aux'] is False
    assert run.model_args['options'] == rgbx.resolve_options('gopt', 'vit-nano', dict(prompt_dim=4, head_dim=8))
    today = rgbx.resolve_options
    monkeypatch.setattr(rgbx, 'resolve_options', lambda *a: {**today(*a), 'prompt_dim': 99, 'tau': 3.0})  # new defaults
    model, _ = ev.load_model(os.path.join(cfg.out_dir, 'last.pt'))
    assert model.prompts.down[1].out_features == 4  # rebuilt from the stored arguments, not today's defaults


@pytest.mark.slow
@pytest.mark.parametrize('method,backbone', [('ktb', 'swin-nano'), ('gopt', 'vit-nano')])
def test_train_peft_without_pretrained_file_is_evaluable(tmp_path, method, backbone):
    """--pretrained none: the random frozen weights exist nowhere else, so the checkpoint holds them
    and eval.py rebuilds the trained model exactly (it failed with "frozen ones differ")."""
    cfg = demo_config(tmp_path, method=method, backbone=backbone, pretrained='none', max_steps=1, batch_size=2,
                      eval_every=0)
    trained = tr.build_model(cfg)
    tr.train(cfg, model=trained)
    last = os.path.join(cfg.out_dir, 'last.pt')
    model, _ = ev.load_model(last)
    assert model.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())


class SplitInvariantModel(rgbx.RGBXModel):
    """A 1x1-conv segmenter without batch statistics whose loss is a sum over pixels
    divided by a constant, so that splitting a batch into micro-batches or across
    processes gives exactly the same gradient."""

    def __init__(self, x_channels=1, k=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3 + x_channels, k, 1)

    def forward(self, rgb, x, label=None):
        logits = self.conv(torch.cat([rgb, x], 1))
        if label is None:
            return logits
        ce = F.cross_entropy(logits, label, ignore_index=255, reduction='none')
        return ce.sum() / label.numel(), logits


@pytest.mark.slow
def test_train_stale_tmp_of_dead_runs_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys
    dead = int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                              text=True, check=True).stdout)
    live = subprocess.Popen([sys.executable, '-c', 'import signal; signal.pause()'])  # alive until killed below
    try:
        cfg = demo_config(tmp_path, max_steps=1, eval_every=0)
        os.makedirs(cfg.out_dir)
        for pid in (dead, live.pid):
            (Path(cfg.out_dir) / f'last.pt.tmp.{pid}').write_bytes(b'\0' * 1000)
        tr.train(cfg, model=SplitInvariantModel())
        assert sorted(os.listdir(cfg.out_dir)) == ['config.json', 'curves.png', 'last.pt', f'last.pt.tmp.{live.pid}',
                                                   'log.jsonl']
    finally:
        live.kill()
        live.wait()


def test_train_curves_png_is_drawn_from_the_log(tmp_path):
    """curves.png: one panel per series of log.jsonl (loss, lr, test mIoU), each point where the
    log puts it (x by step, y between the series' lowest and highest value)."""
    cfg = demo_config(tmp_path, max_steps=4)
    tr.train(cfg)
    records = [json.loads(line) for line in open(os.path.join(cfg.out_dir, 'log.jsonl'))]
    img = np.array(Image.open(os.path.join(cfg.out_dir, 'curves.png'))).astype(int)
    assert img.shape == (3 * 160, 480, 3)
    blue = (np.abs(img - [31, 119, 180]).sum(-1) < 60)
    for panel, (key, get) in enumerate((('loss', lambda r: r['loss']), ('lr', lambda r: r['lr']),
                                        ('eval', lambda r: r['eval']['miou']))):
        pts = [(r['step'], get(r)) for r in records if key in r]
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        for step, v in pts:
            x = round(60 + 410 * step / 4)
            y = round(panel * 160 + 140 - 120 * (v - lo) / ((hi - lo) or 1))
            assert blue[y - 2:y + 3, x - 2:x + 3].any(), (key, step, v)


def test_train_tensorboard_events_hold_the_logs_numbers(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = demo_config(tmp_path, max_steps=3, tensorboard=True)
    tr.train(cfg)
    records = [json.loads(line) for line in open(os.path.join(cfg.out_dir, 'log.jsonl'))]
    events = EventAccumulator(cfg.out_dir)
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars('train/loss')] == \
        [(r['step'], r['loss']) for r in records if 'loss' in r]
    assert [e.value for e in events.Scalars('eval/miou')] == pytest.approx([r['eval']['miou'] for r in records
                                                                           if 'eval' in r])


def test_train_tensorboard_without_the_package_is_a_one_line_error(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'tensorboard' else real(name, *a))
    message = cli_error(tr.main, ['--tensorboard', '--max-steps', '1', '--out-dir', str(tmp_path / 'run')])
    assert 'pip install tensorboard' in message and not (tmp_path / 'run').exists()


# --- Accumulation, resume, reruns ---

def trained_state(cfg):
    return ev.load_run_checkpoint(os.path.join(cfg.out_dir, 'last.pt'))['model']


@pytest.mark.slow
def test_train_grad_accumulation_equals_large_batch(tmp_path):
    tr.train(demo_config(tmp_path / 'a', batch_size=4, grad_accum=1), model=SplitInvariantModel())
    tr.train(demo_config(tmp_path / 'b', batch_size=2, grad_accum=2), model=SplitInvariantModel())
    a, b = trained_state(demo_config(tmp_path / 'a')), trained_state(demo_config(tmp_path / 'b'))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a['conv.weight'], SplitInvariantModel().conv.weight)


@pytest.mark.slow
def test_train_kill_and_resume_is_bit_exact(tmp_path):
    """Kill a real run (early fusion on the demo, with dropout and BatchNorm) at step 5,
    resume from the step-4 checkpoint: the final weights equal an uninterrupted run's."""
    kw = dict(method='early_fusion', backbone='swin-nano', max_steps=7, save_every=2, workers=1)
    tr.train(demo_config(tmp_path / 'full', **kw))

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tr.train(demo_config(tmp_path / 'cut', **kw), on_step=kill)
    assert ev.load_run_checkpoint(os.path.join(demo_config(tmp_path / 'cut').out_dir, 'last.pt'))['step'] == 4
    tr.train(demo_config(tmp_path / 'cut', resume=True, **kw))
    a, b = trained_state(demo_config(tmp_path / 'full')), trained_state(demo_config(tmp_path / 'cut'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_rerun_into_a_run_folder_keeps_best_pt(tmp_path):
    """A second run without --resume in the folder of a good run loses nothing."""
    cfg = demo_config(tmp_path)
    tr.train(cfg, model=SplitInvariantModel())
    best = open(os.path.join(cfg.out_dir, 'best.pt'), 'rb').read()
    with pytest.raises(ValueError, match='already holds a run.*--resume.*another --out-dir.*--overwrite'):
        tr.train(demo_config(tmp_path, max_steps=1), model=SplitInvariantModel())
    message = cli_error(tr.main, ['--max-steps', '1', '--crop', '32x32', '--out-dir', cfg.out_dir])
    assert cfg.out_dir in message
    assert open(os.path.join(cfg.out_dir, 'best.pt'), 'rb').read() == best
    out = tr.train(demo_config(tmp_path, max_steps=1, save_every=1, eval_every=0, overwrite=True),
                   model=SplitInvariantModel())  # replacing it is explicit
    assert out['step'] == 1 and not os.path.exists(os.path.join(cfg.out_dir, 'best.pt'))
    assert [r['step'] for r in map(json.loads, open(os.path.join(cfg.out_dir, 'log.jsonl')))] == [1]


def test_train_resume_with_another_config_is_refused_listing_the_fields(tmp_path):
    cfg = demo_config(tmp_path, max_steps=2, eval_every=0)
    tr.train(cfg, model=SplitInvariantModel())
    saved = open(os.path.join(cfg.out_dir, 'config.json')).read()
    for changed, listed in ((dict(batch_size=4, lr=0.1, seed=1), ['--batch-size 2 -> 4', '--lr 0.001 -> 0.1',
                                                                  '--seed 3407 -> 1']),
                            (dict(dataset='demo128'), ['--dataset']), (dict(log_every=5), ['--log-every 1 -> 5'])):
        with pytest.raises(ValueError) as e:
            tr.train(demo_config(tmp_path, max_steps=2, eval_every=0, resume=True, **changed),
                     model=SplitInvariantModel())
        assert str(e.value).startswith('--resume: the config differs') and all(s in str(e.value) for s in listed)
    assert 'allow-changes accepts --log-every' in str(e.value)
    with pytest.raises(ValueError, match='--lr change what is trained'):  # harmless ones only, even when allowed
        tr.train(demo_config(tmp_path, max_steps=2, eval_every=0, resume=True, allow_changes=True, lr=0.1),
                 model=SplitInvariantModel())
    assert open(os.path.join(cfg.out_dir, 'config.json')).read() == saved  # not overwritten by a refused resume
    out = tr.train(demo_config(tmp_path, max_steps=2, eval_every=0, resume=True, allow_changes=True, log_every=5),
                   model=SplitInvariantModel())
    assert out['step'] == 2 and json.load(open(os.path.join(cfg.out_dir, 'config.json')))['log_every'] == 5


def test_train_resumed_log_has_each_step_once(tmp_path):
    kw = dict(max_steps=6, save_every=2, eval_every=0, log_every=1)

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tr.train(demo_config(tmp_path, **kw), model=SplitInvariantModel(), on_step=kill)
    log = os.path.join(demo_config(tmp_path).out_dir, 'log.jsonl')
    with open(log, 'a') as f:
        f.write('{"step": 4, "epo')  # killed in the middle of a record
    tr.train(demo_config(tmp_path, resume=True, **kw), model=SplitInvariantModel())
    assert [json.loads(line)['step'] for line in open(log)] == [1, 2, 3, 4, 5, 6]


def test_train_resume_takes_its_own_gpus_random_state(monkeypatch):
    """A checkpoint holds the CUDA generator state of the GPU each process computed on; one
    written before held every visible GPU's (here 4): a process resumed on a machine with
    fewer GPUs takes the state of its own device index, no IndexError; a checkpoint
    without a state for its device leaves the generator seeded and says so."""
    restored = []
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device: restored.append((state, device)))
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device: torch.full((2,), device.index, dtype=torch.uint8))
    saved = tr.rng_state(torch.device('cpu'))
    assert saved['cuda'] == []
    assert torch.equal(tr.rng_state(torch.device('cuda:2'))['cuda'][0], torch.full((2,), 2, dtype=torch.uint8))
    old = dict(saved, cuda=[torch.full((2,), i, dtype=torch.uint8) for i in range(4)])
    for index in (0, 1):
        tr.set_rng_state(old, torch.device(f'cuda:{index}'))
        assert restored[-1][0] is old['cuda'][index] and restored[-1][1] == torch.device(f'cuda:{index}')
    tr.set_rng_state(dict(old, cuda=old['cuda'][3:]), torch.device('cuda:1'))  # the new format: its own only
    assert restored[-1][0] is old['cuda'][3]
    said = []
    tr.set_rng_state(dict(old, cuda=old['cuda'][:2]), torch.device('cuda:3'), said.append)
    assert len(restored) == 3 and 'no CUDA random state for cuda:3' in said[0]
    tr.set_rng_state(old, torch.device('cpu'))  # a CPU resume leaves the CUDA generators alone
    assert len(restored) == 3


# --- Faults: non-finite losses, full disks, corrupt or NaN files ---

@pytest.mark.slow
def test_train_nonfinite_loss_stops_or_skips(tmp_path):
    class Exploding(SplitInvariantModel):
        def forward(self, rgb, x, label=None):
            if label is None:
                return super().forward(rgb, x)
            loss, logits = super().forward(rgb, x, label)
            self.calls = getattr(self, 'calls', 0) + 1
            return (loss * float('nan') if self.calls == 3 else loss), logits

    with pytest.raises(tr.NonFiniteLoss, match=r'step 3.*last good checkpoint'):
        tr.train(demo_config(tmp_path / 'stop'), model=Exploding())
    out = tr.train(demo_config(tmp_path / 'skip', nonfinite='skip'), model=Exploding())
    assert out['skipped'] == 1 and out['step'] == 4
    assert all(torch.isfinite(v).all() for v in trained_state(demo_config(tmp_path / 'skip')).values())


class NaNAfter(SplitInvariantModel):
    """Its loss is NaN from the `first`-th call on: a diverged run."""

    def __init__(self, first):
        super().__init__()
        self.first, self.calls = first, 0

    def forward(self, rgb, x, label=None):
        if label is None:
            return super().forward(rgb, x)
        loss, logits = super().forward(rgb, x, label)
        self.calls += 1
        return (loss * float('nan') if self.calls >= self.first else loss), logits


def test_train_nonfinite_skip_is_capped_counted_and_never_saves_bad_weights(tmp_path, capsys):
    cfg = demo_config(tmp_path / 'skip', nonfinite='skip', max_steps=4, save_every=1)
    out = tr.train(cfg, model=NaNAfter(first=4))  # 1 of 4 steps: within 5% (at least 1)
    assert out['skipped'] == 1 and 'done: 4 steps (1 skipped: non-finite loss)' in capsys.readouterr().out
    with pytest.raises(tr.NonFiniteLoss, match=r'2 of 3 steps skipped, more than --nonfinite skip allows \(1: '):
        tr.train(demo_config(tmp_path / 'diverged', nonfinite='skip', max_steps=4, save_every=1), model=NaNAfter(2))
    kept = ev.load_run_checkpoint(os.path.join(demo_config(tmp_path / 'diverged').out_dir, 'last.pt'))
    assert kept['step'] == 2 and kept['skipped'] == 1  # the step before the one too many

    class Overflowing(SplitInvariantModel):  # a finite loss, but a weight overflows in the optimizer step
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

    model = Overflowing()

    def overflow(step):
        if step == 2:
            model.scale.data.fill_(float('inf'))
    cfg = demo_config(tmp_path / 'inf', max_steps=4, save_every=1)
    with pytest.raises(tr.NonFiniteLoss, match=r"non-finite at step 3 .*'scale'.*not saved.*last.pt"):
        tr.train(cfg, model=model, on_step=overflow)
    saved = ev.load_run_checkpoint(os.path.join(cfg.out_dir, 'last.pt'))
    assert saved['step'] == 2 and torch.isfinite(saved['model']['scale']).all()


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A folder on a real 256 KiB tmpfs where the OS allows mounting one (root);
    elsewhere a folder whose writes fail with ENOSPC after 256 KiB, injected at the
    write call."""
    import subprocess
    folder = tmp_path / 'disk'
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(folder)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        import errno
        import io
        real_save = torch.save

        def save(obj, f, *a, **k):
            buffer = io.BytesIO()
            real_save(obj, buffer, *a, **k)
            if str(folder) in getattr(f, 'name', str(f)) and buffer.tell() > 256 * 1024:
                f.write(buffer.getvalue()[:256 * 1024])
                raise RuntimeError('unexpected pos') from OSError(errno.ENOSPC, 'No space left on device')
            f.write(buffer.getvalue())
        monkeypatch.setattr(torch, 'save', save)
    yield folder
    if mounted:
        subprocess.run(['umount', str(folder)], check=True)


@pytest.mark.slow
def test_train_full_disk_is_a_one_line_error_and_leaves_no_partial_file(small_disk):
    path = str(small_disk / 'last.pt')
    tr.save_checkpoint({'model': {'w': torch.ones(8)}, 'config': {}, 'step': 1}, path)
    with pytest.raises(data.DiskFull, match=f'disk full: cannot write {re.escape(path)}'):
        tr.save_checkpoint({'model': {'w': torch.ones(1 << 20)}, 'config': {}, 'step': 2}, path)
    assert sorted(os.listdir(small_disk)) == ['last.pt'] and ev.load_run_checkpoint(path)['step'] == 1
    os.remove(path)
    message = cli_error(tr.main, ['--max-steps', '1', '--crop', '32x32', '--workers', '0', '--eval-every', '0',
                                  '--out-dir', str(small_disk)])  # a 10 MB checkpoint on a 256 KiB disk
    assert 'disk full' in message and str(small_disk) in message
    assert not [n for n in os.listdir(small_disk) if '.tmp' in n]
    if os.path.ismount(small_disk):  # the run's small files too (one 4 KiB page left)
        for name in ('config.json', 'log.jsonl'):  # the failed run's: a run folder is never written into by another
            (small_disk / name).unlink()
        free = os.statvfs(small_disk)
        (small_disk / 'filler').write_bytes(b'\0' * (free.f_bavail * free.f_frsize - 4096))
        message = cli_error(tr.main, ['--max-steps', '2', '--crop', '32x32', '--workers', '0', '--eval-every', '0',
                                      '--log-every', '1', '--out-dir', str(small_disk / 'run')])
        assert re.fullmatch(f"error: disk full: cannot write {re.escape(str(small_disk / 'run'))}/"
                            f"(log.jsonl|config.json); free space on that disk or write to another one", message)


def test_train_nan_in_a_pretrained_file_is_found_at_load(tmp_path):
    sd = rgbx.swin('nano').state_dict()
    sd['layers.1.blocks.0.mlp.fc1.weight'][0, 0] = float('nan')
    torch.save({'model': sd}, tmp_path / 'swin.pth')
    message = cli_error(tr.main, ['--method', 'ktb', '--pretrained', str(tmp_path / 'swin.pth'), '--max-steps', '1',
                                  '--out-dir', str(tmp_path / 'run')])
    assert str(tmp_path / 'swin.pth') in message and "'layers.1.blocks.0.mlp.fc1.weight'" in message


def test_train_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    cfg = demo_config(tmp_path, max_steps=1, eval_every=0)
    tr.train(cfg, model=None)
    last = os.path.join(cfg.out_dir, 'last.pt')
    blob = open(last, 'rb').read()
    open(last, 'wb').write(blob[:len(blob) // 2])  # a torn file
    argv = ['--crop', '32x32', '--batch-size', '2', '--epochs', '1', '--max-steps', '1', '--workers', '0', '--lr',
            '1e-3', '--log-every', '1', '--eval-every', '0', '--out-dir', cfg.out_dir, '--resume']
    for main, args in ((tr.main, argv), (ev.main, ['--checkpoint', last])):
        assert 'truncated' in cli_error(main, args) and last in cli_error(main, args)
    open(last, 'wb').write(bytes(range(256)) * 4)  # not a PyTorch file: torch's own message spans lines
    assert 'Unsupported operand' in cli_error(ev.main, ['--checkpoint', last])


# --- What a step waits for on a GPU: host reads and graph breaks ---

# The host reads of one training step (after a first one, which fills the window-layout
# caches), by function, at most; counted on the CPU. On a GPU each waits for the device
# except apply_step's (the CPU optimizer's skip decision: fused AdamW on CUDA takes it on the
# device) and m2im_keep's (Alg. 1 drawn on the CPU generator: host tensors by design).
# MaskMentor fine-tuning groups its samples by the modalities they have (data-dependent
# shapes: unique, and a nonzero per group, at most 3); its pre-training checks the semantic
# map's values. The loss denominators, the non-finite guard and the token budget read nothing.
HOST_READS = {'early_fusion': {'apply_step': 1}, 'ktb': {'apply_step': 1}, 'gopt': {'apply_step': 1},
              'maskmentor': {'apply_step': 1, 'presence': 1, 'features': 5, 'm2im_keep': 8},
              'maskmentor-pretrain': {'apply_step': 1, 'as_image': 2, 'm2im_keep': 8}}
EVAL_HOST_READS = {'maskmentor': {'presence': 1, 'features': 5}}


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts, by the calling function of this project, the tensor operations that bring
    a value to the host (item, bool, int, float, tolist, nonzero, unique, boolean
    indexing, ...); those inside torch.optim's CPU step are not the project's."""
    READS = {'item', '__bool__', '__int__', '__float__', '__index__', 'tolist', 'nonzero', 'unique',
             'unique_consecutive', 'masked_select', 'numpy', 'cpu'}

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import traceback
        name = getattr(func, '__name__', '')
        index = args[1] if name in ('__getitem__', '__setitem__') and len(args) > 1 else None
        masked = any(torch.is_tensor(i) and i.dtype == torch.bool for i in
                     (index if isinstance(index, tuple) else (index,)))
        if name in self.READS or masked:
            here = str(Path(__file__).resolve().parent)
            stack = traceback.extract_stack()[:-1]
            ours = [i for i, f in enumerate(stack) if f.filename.startswith(here) and 'test_rgbx' not in f.filename]
            if ours and not any('/torch/optim/' in f.filename for f in stack[ours[-1]:]):
                self.seen[stack[ours[-1]].name] = self.seen.get(stack[ours[-1]].name, 0) + 1
        return func(*args, **(kwargs or {}))


def one_step_setup(name, tmp_path):
    cfg = demo_config(tmp_path, max_steps=6, **NANO_METHODS[name])
    torch.manual_seed(0)
    model = tr.build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=1e-3)
    demo = data.build_dataset('demo', '', 'train', crop=(32, 32), train=True)
    batch = [torch.stack(t) for t in zip(*[demo[i] for i in range(2)])]
    return cfg, model, optimizer, batch


@pytest.mark.parametrize('name', list(NANO_METHODS))
def test_train_step_host_reads_are_the_listed_few(name, tmp_path):
    """One training step of each method (MaskMentor pre-training: a student step, the one
    that draws most) reads on the host only what HOST_READS lists; an evaluation forward
    only what EVAL_HOST_READS lists."""
    cfg, model, optimizer, batch = one_step_setup(name, tmp_path)
    scaler, cpu = torch.amp.GradScaler('cpu', enabled=False), torch.device('cpu')
    inputs = model.schedule(4, 6)[1]
    tr.train_step(model, iter([batch]), optimizer, scaler, cfg, cpu, 1, 1e-3, inputs)
    with HostReads() as reads:
        tr.train_step(model, iter([batch]), optimizer, scaler, cfg, cpu, 1, 1e-3, inputs)
    allowed = HOST_READS[name]
    assert set(reads.seen) <= set(allowed) and all(n <= allowed[f] for f, n in reads.seen.items()), reads.seen
    assert reads.seen['apply_step'] == 1
    if not model.pretraining:
        with HostReads() as reads, torch.no_grad():
            model.eval()(batch[0], batch[1])
        allowed = EVAL_HOST_READS.get(name, {})
        assert set(reads.seen) <= set(allowed) and all(n <= allowed[f] for f, n in reads.seen.items()), reads.seen


def test_train_apply_step_skips_on_the_device_with_fused_adamw():
    """With a fused AdamW (CUDA's; CPU's here) the non-finite guard reads nothing on the
    host: the flag goes in as `found_inf`, and a flagged step leaves weights, moments and
    the step count as they were; a finite one updates them."""
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([w], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    w.grad = torch.full((3,), 0.5)
    tr.apply_step(optimizer, scaler, torch.tensor(1.0))
    before = w.detach().clone(), optimizer.state[w]['exp_avg'].clone(), optimizer.state[w]['step'].clone()
    for loss, grad, flags in ((float('nan'), 0.5, (True, False)), (1.0, float('inf'), (False, True))):
        w.grad = torch.full((3,), grad)
        with HostReads() as reads:
            got = tr.apply_step(optimizer, scaler, torch.tensor(loss))
        assert reads.seen == {} and tuple(f.item() for f in got) == flags
        assert torch.equal(w, before[0]) and torch.equal(optimizer.state[w]['exp_avg'], before[1])
        assert torch.equal(optimizer.state[w]['step'], before[2])
    w.grad = torch.full((3,), 0.5)
    tr.apply_step(optimizer, scaler, torch.tensor(1.0))
    assert not torch.equal(w, before[0]) and optimizer.state[w]['step'].item() == before[2].item() + 1
    fp16 = torch.amp.GradScaler('cpu', init_scale=4.0)  # fp16's scaler (on CUDA), here on CPU gradients
    w.grad, kept = torch.full((3,), float('inf')), w.detach().clone()
    fp16.scale(torch.ones(()))  # the scaler starts its scale at the first scaled loss
    assert [f.item() for f in tr.apply_step(optimizer, fp16, torch.tensor(1.0))] == [False, True]  # an overflow
    assert torch.equal(w, kept) and fp16.get_scale() == 2.0


# Graph breaks of one training forward and loss under torch.compile (torch._dynamo.explain,
# torch 2.13), at most: MaskMentor's M2IM draws Alg. 1 with Python branches on the CPU
# generator; fine-tuning groups its samples (data-dependent shapes); pre-training checks
# the semantic map's values. The others trace as one graph.
GRAPH_BREAKS = {'early_fusion': 0, 'ktb': 0, 'gopt': 0, 'maskmentor': 7, 'maskmentor-pretrain': 17}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(NANO_METHODS))
def test_train_graph_breaks_are_the_listed_few(name, tmp_path):
    cfg, model, _, batch = one_step_setup(name, tmp_path)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*batch, **model.schedule(4, 6)[1])
    assert explained.graph_break_count <= GRAPH_BREAKS[name], [str(b.reason)[:200] for b in explained.break_reasons]


# --- DDP ---

# a process that never reaches the rendezvous or a collective fails the test after this, not after gloo's 30 minutes
RENDEZVOUS_TIMEOUT = datetime.timedelta(seconds=120)


def ddp_worker(rank, world, rendezvous, configs):
    """One process of a 2-process run: the process group meets through a file (no port
    to pick, so no race for it), then trains each config as torchrun would run train.py."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS='1')  # as torchrun
    torch.distributed.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world,
                                         timeout=RENDEZVOUS_TIMEOUT)
    try:
        for cfg in configs:
            tr.train(cfg)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_train_two_process_ddp_equals_one_process(tmp_path):
    """2 real processes (gloo, CPU) at batch 2 = 1 process at batch 4, for the demo
    model (SegFormer head: BatchNorm, Dropout2d), a nano KTB (MMST drops, adapter
    dropout, DSCF BatchNorm, self-teaching loss), a nano GoPT (Gumbel noise, BatchNorm
    in the SETR head) and a MaskMentor fine-tuning (M2IM modality drops), 4 AdamW steps
    at lr 1e-3. Compared:
    the loss of every step (rel 1e-5), Adam's first moments (a running sum of the
    gradients: within 1e-5 of their largest value; measured 2e-6), and every tensor of
    the final state: weights within 2e-4 (measured 3e-5, and 1.5e-4 for a few KTB
    elements whose gradient is near 0); biases and BN running means within 2.5e-3
    (measured 3e-4, KTB 1.9e-3): the biases in front of a BatchNorm have gradient 0 in
    exact arithmetic, and Adam's normalised step m / sqrt(v) turns their float rounding
    noise into steps of up to lr = 1e-3 each (and the running mean after them follows,
    summed over the fuse convolution's 4 x 512 inputs in KTB's S1 head). Float32
    rounding differs because sums are taken in another order (per process, then
    all-reduced). Without the global-batch draws and counts the weights differ by 3e-3
    and BN running means by 0.17."""
    kw = [dict(method='early_fusion', backbone='swin-nano'),
          dict(method='ktb', backbone='swin-nano', pretrained='none', opts='window_size=4'),
          dict(method='gopt', backbone='vit-nano', pretrained='none'),
          dict(method='maskmentor', backbone='vit-nano', pretrained='none')]
    one = [demo_config(tmp_path / f'one{i}', batch_size=4, eval_every=0, **k) for i, k in enumerate(kw)]
    two = [demo_config(tmp_path / f'two{i}', batch_size=2, eval_every=0, **k) for i, k in enumerate(kw)]
    torch.multiprocessing.spawn(ddp_worker, args=(2, str(tmp_path / 'rendezvous'), two), nprocs=2)
    for cfg_one, cfg_two in zip(one, two):
        tr.train(cfg_one)
        assert_same_training(cfg_one.out_dir, cfg_two.out_dir, 4, cfg_one.method)


def assert_same_training(one, two, steps, what):
    """The runs in folders `one` and `two` trained alike (test_train_two_process_ddp_equals_one_process
    gives the tolerances and why): the loss of every step, Adam's first moments, every tensor
    of the final state."""
    a, b = (ev.load_run_checkpoint(os.path.join(d, 'last.pt')) for d in (one, two))
    losses = [[json.loads(line)['loss'] for line in open(os.path.join(d, 'log.jsonl')) if '"loss"' in line]
              for d in (one, two)]
    assert len(losses[0]) == steps and losses[1] == pytest.approx(losses[0], rel=1e-5), (what, losses)
    moments = [{i: s['exp_avg'] for i, s in ckpt['optimizer']['state'].items()} for ckpt in (a, b)]
    scale = max(m.abs().max().item() for m in moments[0].values())
    assert moments[0].keys() == moments[1].keys() and scale > 0
    for i in moments[0]:
        torch.testing.assert_close(moments[1][i], moments[0][i], rtol=0, atol=1e-5 * scale,
                                   msg=lambda m: f'{what} moment {i}: {m}')
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        loose = k.endswith(('bias', 'running_mean'))
        torch.testing.assert_close(b['model'][k], a['model'][k], rtol=1e-4, atol=2.5e-3 if loose else 2e-4,
                                   msg=f'{what} {k}')


def free_port():
    """A TCP port free on localhost now (the OS picks it)."""
    import socket
    with socket.socket() as sock:
        sock.bind(('localhost', 0))
        return sock.getsockname()[1]


def torchrun(*args):
    """`torchrun ARGS` (python -m torch.distributed.run) started in the background (the GPUs
    visible to it are the test's: none unless it is marked cuda)."""
    import subprocess
    import sys
    here = Path(__file__).resolve().parent
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *map(str, args)], cwd=here,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})


def finished(process, timeout=600):
    """The output of a torchrun process that ended well (its output in the failure message)."""
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


MM_PRE_ARGV = ['--method', 'maskmentor', '--backbone', 'vit-nano', '--opts', MM_PRE_OPTS, '--crop', '32x32',
               '--epochs', '1', '--max-steps', '6', '--lr', '1e-3', '--log-every', '1', '--eval-every', '0',
               '--workers', '0']


@pytest.mark.slow
def test_train_maskmentor_pretraining_under_torchrun_equals_one_process(tmp_path):
    """torchrun with 2 processes (gloo) at batch 2 = 1 process at batch 4 for MaskMentor
    pre-training over a warm-up step, a teacher cycle and a student step: its modality
    masks (M2IM), the Dirichlet split of the token budget and the patch masks are drawn
    for the global batch, its pixel and token losses averaged over it; same tolerances
    as the other methods (test_train_two_process_ddp_equals_one_process). Without the
    global draws every process drew the same masks and the losses differ from the first step."""
    two = torchrun('--standalone', '--nproc_per_node', 2, 'train.py', *MM_PRE_ARGV, '--batch-size', 2,
                   '--out-dir', tmp_path / 'two')
    tr.main([*MM_PRE_ARGV, '--batch-size', '4', '--out-dir', str(tmp_path / 'one')])
    finished(two)
    assert_same_training(tmp_path / 'one', tmp_path / 'two', 6, 'maskmentor pre-training')


@pytest.mark.slow
def test_train_two_node_torchrun_equals_one_process(tmp_path):
    """Two torchrun node ranks on this machine (--nnodes 2, one process each, a c10d
    rendezvous on a free localhost port, gloo) train what one process trains at the
    global batch: the multi-node path (rendezvous, RANK / LOCAL_RANK / WORLD_SIZE,
    the file check per rank, rank 0 writing) short of a network between machines."""
    port, argv = free_port(), ['--method', 'early_fusion', '--backbone', 'swin-nano', '--crop', '32x32', '--epochs',
                               '1', '--max-steps', '4', '--lr', '1e-3', '--log-every', '1', '--eval-every', '0',
                               '--workers', '0']
    nodes = [torchrun('--nnodes', 2, '--node-rank', r, '--nproc_per_node', 1, '--rdzv-backend', 'c10d',
                      '--rdzv-endpoint', f'localhost:{port}', '--rdzv-id', 'two-nodes', '--rdzv-conf',
                      'join_timeout=120', 'train.py', *argv, '--batch-size', 2, '--out-dir', tmp_path / 'two')
             for r in (0, 1)]
    tr.main([*argv, '--batch-size', '4', '--out-dir', str(tmp_path / 'one')])
    for node in nodes:
        finished(node)
    assert_same_training(tmp_path / 'one', tmp_path / 'two', 4, 'two nodes')


# --- End to end: the demo trains ---

@pytest.mark.slow
def test_train_demo_trains_well_beyond_chance(demo_run):
    cfg, out = demo_run
    test = data.build_dataset('demo', '', 'test')
    labels = torch.stack([test[i][2] for i in range(len(test))])
    background_only = ev.metrics(ev.confusion(torch.zeros_like(labels), labels, 5))['miou']
    assert background_only < 0.2 and out['miou'] > 0.45 and out['miou'] > 3 * background_only


@pytest.mark.slow
def test_train_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    """Two real processes: while run A writes its folder, run B into it is refused and A's files stay A's;
    a lock left by a killed run (its process gone) does not hold a new run back. B starts once A has
    said its first step (A holds the lock from before anything is written until it ends): no timing."""
    import subprocess
    import sys
    out = tmp_path / 'twin'
    a = Child('--seed', '1', '--max-steps', '100000', '--crop', '32x32', '--eval-every', '0', '--log-every', '1',
              '--out-dir', out)  # runs until it is interrupted below
    a.wait_for('step 1/')
    b = run_cli('train.py', '--seed', '2', '--lr', '5e-4', '--max-steps', '2', '--crop', '32x32', '--out-dir', out)
    assert a.p.poll() is None, a.p.stderr.read()  # A was still writing while B tried
    a.p.send_signal(__import__('signal').SIGINT)
    a_err = a.finish().stderr
    assert 'interrupted' in a_err and 'Traceback' not in a_err, a_err
    one_line_error(b, str(out), 'another run')
    assert json.load(open(out / 'config.json'))['seed'] == 1 and not (out / '.lock').exists()
    steps = [json.loads(line)['step'] for line in open(out / 'log.jsonl')]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one run's log
    killed = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    (tmp_path / 'stale').mkdir()
    (tmp_path / 'stale' / '.lock').write_text(str(killed.pid))  # a lock file whose holder is gone
    killed.kill()
    killed.wait()
    res = run_cli('train.py', '--max-steps', '1', '--crop', '32x32', '--eval-every', '0', '--out-dir', tmp_path / 'stale')
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / 'stale' / '.lock').exists()


@pytest.mark.slow
def test_train_overwrite_replaces_nothing_before_the_new_run_is_valid(tmp_path, capsys):
    cfg = demo_config(tmp_path, max_steps=1)
    tr.train(cfg)
    before = {n: (Path(cfg.out_dir) / n).read_bytes() for n in ('last.pt', 'best.pt', 'config.json')}
    for argv in (['--opts', 'head_dims=128'], ['--opts', 'head_dim=abc'], ['--dataset', 'nyudv2']):
        cli_error(tr.main, argv + ['--overwrite', '--out-dir', cfg.out_dir])
        assert {n: (Path(cfg.out_dir) / n).read_bytes() for n in before} == before
    assert not (Path(cfg.out_dir) / '.lock').exists()


@pytest.mark.parametrize('opts,key,value', [('mmst=no', 'mmst', False), ('mmst=OFF', 'mmst', False),
                                            ('mmst=false ,dscf=false', 'dscf', False), (' mmst = yes', 'mmst', True),
                                            ('adapter_ranks=2:2:2:2', 'adapter_ranks', [2, 2, 2, 2])])
def test_train_opts_take_each_option_type(opts, key, value):
    cfg = tr.resolve(tr.Config(method='ktb', pretrained='none', opts=opts))
    assert tr.run_spec(cfg).model_args['options'][key] == value


@pytest.mark.parametrize('method,opts,words', [
    ('ktb', 'mmst=maybe', ["'mmst'", 'true or false']), ('ktb', 'prompt_ranks=8', ['prompt_ranks', 'one value per stage']),
    ('ktb', 'lambda2=abc', ["'lambda2'", 'a number']), ('gopt', 'prompt_dim=abc', ["'prompt_dim'", 'an integer']),
    ('gopt', 'head_dim=0', ["'head_dim'", '[1, inf]']), ('gopt', 'carry_aux=no,carry_aux=yes', ['twice']),
    ('maskmentor', 'stage=pretrian', ["'stage'", 'pretrain, finetune']), ('ktb', 'head_dims=3', ['head_dims', 'options:']),
    ('ktb', 'mmst', ['not key=value'])])
def test_train_bad_opts_are_one_line_errors_naming_the_key(tmp_path, method, opts, words):
    message = cli_error(tr.main, ['--method', method, '--pretrained', 'none', '--opts', opts,
                                  '--out-dir', str(tmp_path / 'run')])
    assert all(w in message for w in words), message
    assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_train_a_bad_test_file_stops_the_run_before_its_first_step(tmp_path):
    root = nyu_pair(tmp_path / 'nyu', bad_test_label=True)
    res = run_cli('train.py', *nyu_argv(root, tmp_path / 'run', '--workers', '1'))
    one_line_error(res, 'Label/5.png', '[41]')
    assert not (tmp_path / 'run' / 'log.jsonl').exists() or not (tmp_path / 'run' / 'log.jsonl').read_text()
    assert not (tmp_path / 'run' / 'last.pt').exists()


@pytest.mark.slow
def test_train_resume_onto_a_dataset_of_another_size_is_refused(tmp_path):
    root = nyu_pair(tmp_path / 'nyu')
    tr.main(nyu_argv(root, tmp_path / 'run', '--max-steps', '1', '--eval-every', '0'))
    (root / 'train.txt').write_text('0\n1\n2\n3\n0\n')  # 5 samples: listed twice is refused, so a new frame
    (root / 'train.txt').write_text('0\n1\n2\n3\n4\n5\n')
    message = cli_error(tr.main, nyu_argv(root, tmp_path / 'run', '--max-steps', '1', '--eval-every', '0',
                                          '--resume', '--allow-changes'))
    assert 'now has 6 samples, the run had 4' in message and '--data-root' in message


@pytest.mark.slow
@pytest.mark.parametrize('sig,said', [('SIGINT', 'interrupted'), ('SIGTERM', 'terminated (SIGTERM)')])
def test_train_ctrl_c_and_sigterm_are_one_line_and_resumable(tmp_path, sig, said):
    """A real Ctrl-C (SIGINT) or SIGTERM once the run has said step 2 (step 1's checkpoint is saved before
    step 2 runs): one line saying how to resume, the lock gone, a whole last.pt to resume from."""
    import signal
    run = Child('--max-steps', '400', '--crop', '32x32', '--save-every', '1', '--eval-every', '0', '--log-every', '1',
                '--out-dir', tmp_path / 'run')
    run.wait_for('step 2/')
    run.p.send_signal(getattr(signal, sig))
    one_line_error(run.finish(), said, '--resume')
    assert not (tmp_path / 'run' / '.lock').exists()
    assert ev.load_run_checkpoint(tmp_path / 'run' / 'last.pt')['step'] >= 1


def test_train_out_dir_of_someone_elses_files_is_never_written(tmp_path):
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'config.json').write_text('{"learning_rate": 3}')
    (mine / 'log.jsonl').write_text('my notes\n')
    for extra in ([], ['--overwrite']):
        assert 'not a run' in cli_error(tr.main, ['--max-steps', '1', '--out-dir', str(mine)] + extra)
    assert (mine / 'config.json').read_text() == '{"learning_rate": 3}' and (mine / 'log.jsonl').read_text() == 'my notes\n'
    assert sorted(os.listdir(mine)) == ['config.json', 'log.jsonl']
    only_log = tmp_path / 'log_only'
    only_log.mkdir()
    (only_log / 'log.jsonl').write_text('x\n')
    assert 'no run config' in cli_error(tr.main, ['--max-steps', '1', '--out-dir', str(only_log)])


@pytest.mark.parametrize('argv,flag', [(['--lr', 'nan'], '--lr'), (['--lr', 'inf'], '--lr'),
                                       (['--weight-decay', 'nan'], '--weight-decay'),
                                       (['--warmup-epochs', 'nan'], '--warmup-epochs'), (['--beta2', 'nan'], '--beta2'),
                                       (['--crop', '-1x5'], '--crop'), (['--crop', '-32'], '--crop')])
def test_train_non_finite_and_negative_values_name_the_flag_before_any_step(tmp_path, capsys, argv, flag):
    message = cli_error(tr.main, argv + ['--out-dir', str(tmp_path / 'run')])
    assert message.startswith(f'error: {flag} '), message
    assert 'step' not in capsys.readouterr().out and not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_train_pretrained_given_a_training_checkpoint_says_what_it_is(tmp_path):
    """A run's last.pt passed as --pretrained to a KTB: one short line saying what the file is
    and what to do with it, not the 117-key list of load_pretrained."""
    cfg = demo_config(tmp_path, max_steps=1, eval_every=0)
    tr.train(cfg)
    last = os.path.join(cfg.out_dir, 'last.pt')
    res = run_cli('train.py', '--method', 'ktb', '--pretrained', last, '--max-steps', '1', '--crop', '32x32',
                  '--out-dir', tmp_path / 'ktb')
    line = one_line_error(res, f'--pretrained {last} is a training checkpoint of train.py',
                          'early_fusion swin-nano run on demo, step 1', 'eval.py --checkpoint', '--resume')
    assert len(line) < 600, len(line)
    (tmp_path / 'kept').mkdir()  # a copy away from its run: no --resume there to suggest
    kept = tmp_path / 'kept' / 'early.pt'
    kept.write_bytes(Path(last).read_bytes())
    msg = cli_error(tr.main, ['--method', 'ktb', '--pretrained', str(kept), '--max-steps', '1',
                              '--crop', '32x32', '--out-dir', str(tmp_path / 'ktb2')])
    assert 'is a training checkpoint' in msg and 'eval.py --checkpoint' in msg and '--resume' not in msg


def test_train_flags_that_would_be_ignored_are_refused(tmp_path):
    assert 'generated' in cli_error(tr.main, ['--data-root', str(tmp_path), '--out-dir', str(tmp_path / 'r')])
    assert 'no such file' in cli_error(tr.main, ['--method', 'ktb', '--pretrained', str(tmp_path / 'moved.pth'),
                                                 '--out-dir', str(tmp_path / 'r')])
    assert 'a folder' in cli_error(tr.main, ['--method', 'ktb', '--pretrained', str(tmp_path),
                                             '--out-dir', str(tmp_path / 'r')])
    assert '--seed' in cli_error(tr.main, ['--seed', '99999999999', '--out-dir', str(tmp_path / 'r')])


def test_train_gopt_recipe_accumulation_error_says_the_recipe_chose_it(tmp_path):
    root = nyu_pair(tmp_path / 'nyu')
    message = cli_error(tr.main, ['--dataset', 'nyudv2', '--data-root', str(root), '--method', 'gopt',
                                  '--backbone', 'vit-nano', '--pretrained', 'none', '--crop', '16x16',
                                  '--out-dir', str(tmp_path / 'run')])
    assert "--grad-accum 16 comes from gopt's recipe (a global batch of 64)" in message


@pytest.mark.slow
def test_train_resume_with_other_frozen_weights_names_the_runs_file(tmp_path):
    torch.manual_seed(0)
    torch.save(rgbx.swin('nano', window_size=4).state_dict(), tmp_path / 'a.pth')
    torch.manual_seed(1)
    torch.save(rgbx.swin('nano', window_size=4).state_dict(), tmp_path / 'b.pth')
    argv = ['--method', 'ktb', '--opts', 'window_size=4,fused_head_dim=16,aux_head_dim=8', '--max-steps', '1',
            '--crop', '32x32', '--eval-every', '0', '--out-dir', str(tmp_path / 'run')]
    tr.main(argv + ['--pretrained', str(tmp_path / 'a.pth')])
    message = cli_error(tr.main, argv + ['--pretrained', str(tmp_path / 'b.pth'), '--resume', '--allow-changes'])
    assert f"pass the run's file, '{tmp_path / 'a.pth'}'" in message


@pytest.mark.slow
def test_train_epochs_with_max_steps_stops_at_the_first_and_a_long_warm_up_is_said(tmp_path):
    """4 samples at batch 2: --epochs 1 is 2 steps, --max-steps 6 would be 3 epochs: 2 steps run,
    and the run says so; --max-steps alone sets the length; a warm-up of 10 epochs in a run of 1
    is said with the share of --lr it reaches (lr_at at the last step)."""
    root = nyu_pair(tmp_path / 'nyu')
    res = run_cli('train.py', *nyu_argv(root, tmp_path / 'a', '--max-steps', '6', '--eval-every', '0',
                                        '--warmup-epochs', '10', '--log-every', '1'))
    assert res.returncode == 0, res.stderr
    assert 'the run stops at whichever comes first, after 2 steps' in res.stdout
    reach = tr.lr_at(1, 2, 20, 1.0)
    assert f'reaches {reach:.0%} of --lr 0.001' in res.stdout and '--warmup-epochs below 1 ' in res.stdout
    assert [json.loads(line)['step'] for line in open(tmp_path / 'a' / 'log.jsonl')] == [1, 2]
    res = run_cli('train.py', '--dataset', 'nyudv2', '--data-root', root, '--backbone', 'swin-nano', '--crop', '16x16',
                  '--batch-size', '2', '--lr', '1e-3', '--max-steps', '3', '--eval-every', '0', '--log-every', '1',
                  '--warmup-epochs', '0', '--out-dir', tmp_path / 'b')
    assert res.returncode == 0 and 'note:' not in res.stdout, res.stdout + res.stderr
    assert [json.loads(line)['step'] for line in open(tmp_path / 'b' / 'log.jsonl')] == [1, 2, 3]
    assert json.load(open(tmp_path / 'b' / 'config.json'))['epochs'] is None


@pytest.mark.slow
def test_train_closing_line_after_a_resume_counts_the_whole_run(tmp_path, capsys):
    def crash(step):
        if step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tr.train(demo_config(tmp_path, max_steps=3, save_every=1), on_step=crash)
    tr.train(demo_config(tmp_path, max_steps=3, save_every=1, resume=True))
    assert 'done: 3 steps (1 in this session' in capsys.readouterr().out


def test_train_out_dir_never_lands_in_a_dataset_or_another_run_nor_on_its_pretrained_file(tmp_path):
    root = nyu_pair(tmp_path / 'nyu')
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'log.jsonl').write_text('{"step": 1}\n')
    (tmp_path / 'link').symlink_to(root)
    torch.save(rgbx.swin('nano', window_size=4).state_dict(), tmp_path / 'pre' / 'last.pt') if (
        tmp_path / 'pre').mkdir() is None else None
    before = tree_bytes(root)
    ktb = ['--method', 'ktb', '--opts', 'window_size=4', '--max-steps', '1']
    for argv, words in ((['--out-dir', str(root / 'runs')], ['--out-dir', 'inside the --data-root folder']),
                        (['--data-root', str(tmp_path / 'link'), '--out-dir', str(root / 'r')], ['--data-root']),
                        (['--dataset', 'demo', '--data-root', '', '--out-dir', str(tmp_path / 'link' / 'r')],
                         ['--out-dir', 'the dataset']),
                        (['--dataset', 'demo', '--data-root', '', '--out-dir', str(other / 'sub')],
                         ['--out-dir', 'another run']),
                        (['--dataset', 'demo', '--data-root', '', *ktb, '--pretrained', str(tmp_path / 'pre' / 'last.pt'),
                          '--out-dir', str(tmp_path / 'pre'), '--overwrite'], ['--out-dir', 'the --pretrained file'])):
        message = cli_error(tr.main, nyu_argv(root, tmp_path / 'unused') + argv)
        assert all(w in message for w in words), message
    assert tree_bytes(root) == before and not (tmp_path / 'unused').exists()
    assert os.listdir(tmp_path / 'pre') == ['last.pt'] and os.listdir(other) == ['log.jsonl']


@pytest.mark.parametrize('method,backbone', [('early_fusion', 'swin-nano'), ('early_fusion', 'vit-nano'),
                                            ('rgb_only', 'swin-base'), ('ktb', 'swin-base'), ('gopt', 'vit-base'),
                                            ('maskmentor', 'vit-base')])
def test_train_list_opts_describes_every_option_of_every_method(method, backbone):
    """--list-opts: every option of the method on the backbone, each with its type, its default
    (the one resolve_options gives) and a line saying in words what it is."""
    lines = tr.list_opts(method, backbone).splitlines()[1:]
    resolved = rgbx.resolve_options(method, backbone, {})
    names = [line.split()[0] for line in lines[::2]]
    assert names == list(resolved)
    for (head, meaning), name in zip(zip(lines[::2], lines[1::2]), names):
        assert f"default {resolved[name]!r}" in head, head
        assert meaning.startswith('      ') and len(meaning.split()) >= 4, (name, meaning)
    for f, _ in rgbx.option_fields(method, backbone):  # every field declares its meaning and a checkable default
        assert f.metadata['meaning'] and f.type in (int, float, bool, str, list[int], int | None, list[int] | None)


def test_train_list_opts_refuses_the_flags_it_would_ignore(capsys):
    """--list-opts trains nothing: --opts (or any training flag) beside it is a one-line error,
    not silently dropped; --method, --backbone and --dataset choose what it prints."""
    for flags in (['--opts', 'mmst=false'], ['--max-steps', '3']):
        assert flags[0] in cli_error(tr.main, ['--method', 'ktb', '--list-opts', *flags])
    with pytest.raises(SystemExit) as e:
        tr.main(['--method', 'ktb', '--dataset', 'nyudv2', '--list-opts'])
    assert e.value.code == 0 and capsys.readouterr().out.startswith('options of ktb on swin-base')


def test_train_opts_keep_every_key_of_the_previous_registry():
    """The --opts keys and defaults checkpoints store: the typed configs give today's set."""
    keys = {'ktb': 'window_size drop_path_rate prompt_ranks adapter_ranks dscf_ranks dscf_strides dscf_groups '
                   'dscf_heads dscf_kernel bias_grid mmst dscf prompting adapters lambda2 ohem fused_head_dim '
                   'aux_head_dim x_embed_norm',
            'gopt': 'variant interval assignment prompt_dim tau head_dim attention class_scale carry_aux identity '
                    'scaled vpt_rank head_from acp dim depth heads mlp_ratio img_size drop_path_rate',
            'maskmentor': 'stage img_size drop_path_rate class_dim decoder_dim decoder_heads decoder_depth mask_ratio '
                          'p_m warmup warmup_steps teacher_iters token_weight norm_pix_rgb depth_standardize head_dim '
                          'head_depth modality_drop freeze_backbone dim depth heads mlp_ratio',
            'early_fusion': 'use_x head_dim embed_dim depths heads window_size mlp_ratio drop_path_rate'}
    for method, names in keys.items():
        backbone = 'vit-base' if method in ('gopt', 'maskmentor') else 'swin-base'
        assert set(rgbx.resolve_options(method, backbone, {})) == set(names.split()), method
    ktb = rgbx.resolve_options('ktb', 'swin-base', {'dscf_ranks': '8:8:8:8', 'mmst': 'off'})
    assert ktb['dscf_ranks'] == [8, 8, 8, 8] and ktb['mmst'] is False and ktb['bias_grid'] == [60, 80]
    assert rgbx.KTBConfig(lambda2='0.5').lambda2 == 0.5 and rgbx.GoPTConfig().acp == rgbx.ACP_DEFAULT


def test_train_overwrite_keeps_the_old_run_until_the_new_one_saves(tmp_path):
    """--overwrite sets the old run aside: a new run that stops before its first checkpoint
    (a diverging lr) puts it back; one that saves replaces it, old best.pt included."""
    cfg = demo_config(tmp_path, max_steps=1)
    tr.train(cfg)
    before = {n: (Path(cfg.out_dir) / n).read_bytes() for n in ('last.pt', 'best.pt', 'config.json', 'log.jsonl')}
    message = cli_error(tr.main, ['--overwrite', '--lr', '1e12', '--max-steps', '30', '--eval-every', '0',
                                  '--crop', '32x32', '--out-dir', cfg.out_dir])
    assert 'non-finite loss' in message
    assert {n: (Path(cfg.out_dir) / n).read_bytes() for n in before} == before
    assert not (Path(cfg.out_dir) / tr.REPLACED).exists()
    tr.main(['--overwrite', '--max-steps', '1', '--eval-every', '0', '--crop', '32x32', '--out-dir', cfg.out_dir])
    assert sorted(os.listdir(cfg.out_dir)) == ['config.json', 'curves.png', 'last.pt', 'log.jsonl']  # the old best.pt went
    assert json.load(open(Path(cfg.out_dir) / 'config.json'))['eval_every'] == 0


# ----------------------------------------------------------------------------
# The reproduction study (study/run.py)
# ----------------------------------------------------------------------------

STUDY_CHOICES = dict(lr={'early fusion': 3e-3, 'KTB': 3e-4, 'prompt tuning': 1e-3, 'MaskMentor fine-tuning': 3e-4},
                     depth_standardize=False, pretrain=dict(lr=2e-3, steps=7))


def test_study_plan_rows_decisions_and_vpt_budgets():
    from study import run as study
    runs = study.plan([0], 2, 2, STUDY_CHOICES)
    assert [r['name'] for r in runs] == [c[0] for c in study.CONDITIONS]
    # without choices (before the validation runs): the foundations only, which need nothing
    assert [(r['name'], r['need']) for r in study.plan([0, 1], 2, 5)] == [
        (f'{f} foundation (RGB)', None) for _ in (0, 1) for f in ('Swin', 'ViT')]
    decide = study.plan([0, 1], 2, 2, decide=True)
    assert {r['config']['dataset'] for r in decide} == {study.VALIDATION}
    assert len(decide) == 2 * (1 + len(study.DECISIONS))
    # the budgets the study's VPT ranks claim: the paper's ratios to GoPT (0.56 and 3.5), at nano
    count = lambda opts: rgbx.build_model('gopt', 'vit-nano', 5, 1, **ev.parse_opts(opts.replace(
        ',head_from=foundation', ''))).param_counts()['prompts']  # the head: started from the foundation's
    gopt_n = count(study.GOPT)
    assert count(study.VPT_SHALLOW) / gopt_n == pytest.approx(0.54 / 0.97, rel=0.05)
    assert count(study.VPT_DEEP) / gopt_n == pytest.approx(3.39 / 0.97, rel=0.05)


def test_study_gopt_acp_readings_and_only():
    from study import run as study
    gopt_runs = {r['name']: ev.parse_opts(r['config']['opts']) for r in study.plan([0], 2, 2, STUDY_CHOICES)
                 if r['config']['method'] == 'gopt'}
    assert gopt_runs['GoPT (hard, 4 prompters)']['acp'] == rgbx.ACP_DEFAULT == study.ACP
    other = f'GoPT (hard, 4 prompters), ACP {study.ACP_OTHER}'
    assert gopt_runs[other]['acp'] == study.ACP_OTHER != study.ACP
    # every claim on GoPT rows states the reading of ACP
    assert all('ACP ' in text for paper, text, *_ in study.CLAIMS if paper == 'GoPT')
    # --only: the conditions it finds and the foundation they start from
    runs = study.plan([0, 1], 2, 2, decide=True, only='R3')
    assert [r['key'] for r in runs] == [f'{n}/{s}' for s in (0, 1) for n in (
        'ViT foundation (RGB)', 'R3: R2 defaults, ACP literal', 'R3: R2 defaults, ACP aligned')]
    assert [ev.parse_opts(r['config']['opts'])['acp'] for r in runs[1:3]] == ['literal', 'aligned']
    # rounds 1-2 keep the reading they were run with
    assert all(ev.parse_opts(opts)['acp'] == 'literal' for name, opts, _ in study.DECISIONS
               if name.startswith(('R1', 'R2')))


def test_study_summary_paired_claims_and_the_rule_by_hand():
    from study import run as study
    fake = {}
    for seed, (a, b) in enumerate([(0.50, 0.40), (0.30, 0.35), (0.60, 0.40)]):
        for name, v in (('GoPT soft', b), ('GoPT (hard, 4 prompters)', a)):
            fake[f'{name}/{seed}'] = dict(name=name, seed=seed, trainable=10, total=100, step_seconds=0.1 * (seed + 1),
                                          both=v, rgb=v / 2, x=v / 4)
    table = study.summarise(fake)
    assert list(table) == ['GoPT (hard, 4 prompters)', 'GoPT soft']  # CONDITIONS order
    mean, std, values = table['GoPT (hard, 4 prompters)']['both']
    assert values == [0.5, 0.3, 0.6] and mean == pytest.approx(1.4 / 3) and std == pytest.approx(np.std(values, ddof=1))
    assert table['GoPT soft']['step_seconds'] == pytest.approx(0.2)
    (claim,) = [c for c in study.claim_rows(fake) if c['claim'].startswith('hard beats soft')]
    assert (claim['wins'], claim['n'], claim['verdict']) == (2, 3, 'not held')
    assert (claim['mean'], claim['low'], claim['high']) == pytest.approx((0.25 / 3, -0.05, 0.2))
    assert claim['spread'] == pytest.approx(np.std([0.5, 0.3, 0.6], ddof=1))
    text = study.markdown(table, study.claim_rows(fake), 'test')
    assert '| GoPT soft | 38.3 ± 2.9 |' in text and '+8.3 (-5.0, +20.0) | 2/3 seeds | 15.3 | not held |' in text
    # the rule: every seed and beyond the spread; reversed the same way; a claim's inputs are averaged
    row = lambda d, spread: dict(wins=sum(v > 0 for v in d), n=len(d), mean=np.mean(d), spread=spread)
    assert study.verdict(row([0.05, 0.06, 0.07], 0.01)) == 'held'
    assert study.verdict(row([0.05, 0.06, 0.07], 0.2)) == 'not held'  # within the seeds' spread
    assert study.verdict(row([-0.05, -0.06, -0.07], 0.01)) == 'not held (reversed)'
    assert study.verdict(row([0.05, 0.06], 0.01)).startswith('not judged')
    for seed in range(3):
        fake[f'KTB/{seed}'] = dict(name='KTB', seed=seed, both=0.8, rgb=0.5 + seed / 100, x=0.4)
        fake[f'KTB w/o MMST/{seed}'] = dict(name='KTB w/o MMST', seed=seed, both=0.9, rgb=0.3, x=0.3)
    (mmst,) = [c for c in study.claim_rows(fake) if c['b'] == 'KTB w/o MMST']
    assert mmst['columns'] == ('rgb', 'x') and mmst['mean'] == pytest.approx(0.155)  # mean over seeds of ((0.2 + s / 100) + 0.1) / 2
    untestable = {text: 'why' for paper, text, *_ in study.CLAIMS if paper == 'KTB'}
    verdicts = {c['b']: c['verdict'] for c in study.claim_rows(fake, untestable)}
    assert verdicts == {'KTB w/o MMST': 'not testable at this scale: why (by the rule alone: held)',
                        'GoPT soft': 'not held'}


def test_study_choices_on_validation_by_hand():
    """Each family's lr (and MaskMentor's depth scaling) is the grid point with the best mean over
    seeds and grid rows of the family's inputs, on validation runs only."""
    from study import run as study
    runs = study.validation_plan([0, 1], 3, 4, dict(lr=2e-3, steps=9))
    assert {r['config']['dataset'] for r in runs} == {study.VALIDATION}
    assert all(r['need'] is None or r['need'].startswith('val: ') for r in runs)
    grid = [r for r in runs if 'family' in r]
    assert len(grid) == 2 * len(study.LRS) * (2 + 1 + 1 + 2)  # 2 early fusion rows, KTB, GoPT, MaskMentor x 2 scalings
    pre = next(r for r in runs if r['pretraining'])
    assert (pre['config']['lr'], pre['config']['max_steps']) == (2e-3, 9)
    mm = [r for r in grid if r['family'] == 'MaskMentor fine-tuning']
    assert {(r['lr'], r['depth_standardize']) for r in mm} == {(lr, d) for lr in study.LRS for d in (True, False)}
    assert all(r['need'] == f"val: M2IM + STTP pre-training/{r['seed']}" for r in mm)
    fake = {}
    for r in grid:  # KTB: lr 3e-4 best on the mean of its three inputs, though not on RGB+X
        good = r['lr'] == {'KTB': 3e-4, 'MaskMentor fine-tuning': 1e-3}.get(r['family'], 3e-3) and \
            r.get('depth_standardize', True)
        fake[r['key']] = dict(r, both=0.5 + 0.1 * (r['family'] != 'KTB' and good), rgb=0.3 + 0.2 * good, x=0.3)
    choices, scores = study.chosen(fake)
    assert choices == dict(lr={'early fusion': 3e-3, 'KTB': 3e-4, 'prompt tuning': 3e-3, 'MaskMentor fine-tuning': 1e-3},
                           depth_standardize=True)
    assert scores['KTB'][(3e-4, None)] == pytest.approx((0.5 + 0.5 + 0.3) / 3)


@pytest.mark.slow
def test_study_foundation_feeds_its_adaptation_and_resumes(tmp_path):
    """A foundation run saves its backbone as an official-format file, KTB starts from
    it with --pretrained, both are evaluated on the three inputs; a second call reads the
    finished runs back instead of training them again."""
    from study import run as study
    runs = [r for r in study.plan([0], steps=2, foundation_steps=2, choices=STUDY_CHOICES)
            if r['name'] in ('Swin foundation (RGB)', 'KTB')]
    assert runs[1]['need'] == runs[0]['key']
    results = study.run_all(runs, str(tmp_path), jobs=1, scenes=4)  # evaluated on 4 test scenes
    assert set(results) == {'Swin foundation (RGB)/0', 'KTB/0'}
    for r in results.values():
        assert all(0 <= r[c] <= 1 for c in ('both', 'rgb', 'x')) and r['step_seconds'] > 0
    foundation = results['Swin foundation (RGB)/0']
    assert foundation['both'] == foundation['rgb']  # an RGB-only model does not see X
    backbone = rgbx.load_pretrained(rgbx.swin('nano'), study.backbone_file(str(tmp_path), runs[0]['key']))
    ktb = study.folder(str(tmp_path), 'KTB/0')
    assert ev.load_run_checkpoint(os.path.join(ktb, 'last.pt'))['config']['pretrained'] == \
        study.backbone_file(str(tmp_path), runs[0]['key'])
    stamp = os.path.getmtime(os.path.join(ktb, 'result.json'))
    assert study.run_all(runs, str(tmp_path), jobs=1, scenes=4) == results
    assert os.path.getmtime(os.path.join(ktb, 'result.json')) == stamp
    longer = study.plan([0], steps=3, foundation_steps=2, choices=STUDY_CHOICES)  # another budget in the same folder is refused, not reused
    with pytest.raises(ValueError, match='KTB-0.*another --out'):
        study.run_all([r for r in longer if r['name'] in ('Swin foundation (RGB)', 'KTB')], str(tmp_path), jobs=1,
                      scenes=4)
    trained = ev.load_run_checkpoint(os.path.join(study.folder(str(tmp_path), runs[0]['key']), 'last.pt'))['model']
    for name, p in backbone.named_parameters():  # the file holds exactly the foundation's trained backbone
        assert torch.equal(p, trained['backbone.' + name]), name


def test_study_rooms_plan_holds_every_claims_rows_and_its_inputs():
    """The study runs on rendered rooms: every claim's A and B rows are planned for every seed,
    on the study's preset, validation runs on scenes carved from its training scenes; KTB has
    rows on HHA (the default X) and on depth, GoPT both readings of ACP, MaskMentor depth."""
    from study import run as study
    assert data.PRESETS[study.DATASET].generator == 'rooms' and data.PRESETS[study.DATASET].crop == (144, 192)
    val = data.get_preset(study.VALIDATION)
    assert (val.generator, val.crop, val.holdout) == ('rooms', (144, 192), 160)
    runs = study.plan(range(3), 4, 6, STUDY_CHOICES)
    keys = {r['key'] for r in runs}
    for paper, text, a, b, columns in study.CLAIMS:
        assert all(f'{n}/{s}' in keys for n in (a, b) for s in range(3)), text
    assert {r['config']['dataset'] for r in runs} == {'rooms144'}
    assert {r['config']['dataset'] for r in study.validation_plan([0], 4, 6, dict(lr=1e-3, steps=4))} == \
        {'rooms144-val'}
    resolved = {r['name']: tr.resolve(tr.Config(**dict(r['config'], opts=r['config']['opts'].replace(
        ',head_from=foundation', '')), pretrained='none')) for r in runs if r['seed'] == 0}
    x = {name: ev.run_spec(c.method, c.backbone, c.dataset, c.x_modality, c.opts).x_modality
         for name, c in resolved.items()}
    assert {x[c[2]] for c in study.CLAIMS if c[0] == 'KTB'} == {'hha', 'depth'}
    assert x['KTB'] == x['KTB w/o MMST'] == 'hha' and x['KTB, X = depth'] == x['KTB w/o MMST, X = depth'] == 'depth'
    assert {x[n] for n in x if resolved[n].method == 'maskmentor'} == {'depth'}
    assert {ev.parse_opts(resolved[c[2]].opts)['acp'] for c in study.CLAIMS if c[0] == 'GoPT'} == \
        set(rgbx.ACP_READINGS)
    # every adaptation at the study's batch; the foundations at the dataset's recipe
    assert {c.batch_size for n, c in resolved.items() if 'foundation (RGB)' not in n} == {study.BATCH}
    assert resolved['Swin foundation (RGB)'].batch_size == data.PRESETS['rooms144'].defaults['batch_size']


@pytest.mark.slow
def test_study_quick_on_rooms_writes_results_that_tables_read(tmp_path):
    """`python -m study.run --quick` on rooms: every planned run ends in the report's
    results.json (dataset, runs done = runs planned, each run's three inputs), the validation
    report holds its choices, and rewriting the reports from the results.json alone gives the
    same results.md."""
    from study import run as study
    report = tmp_path / 'report'
    assert study.main(['--quick', '--jobs', '2', '--out', str(tmp_path / 'runs'), '--report', str(report)]) == 0
    saved = json.load(open(report / 'results.json'))
    planned = study.plan([0], 4, 6, dict(saved['choices'], pretrain=dict(lr=1e-3, steps=4)))
    assert (saved['dataset'], saved['validation_dataset']) == ('rooms144', 'rooms144-val')
    assert saved['runs_done'] == saved['runs_planned'] == len(planned) == len(saved['runs'])
    assert saved['scenes'] == f'the {study.QUICK_SCENES} test scenes'
    for r in saved['runs']:
        assert ('both' in r) != ('stage=pretrain' in r['config']['opts']), r['name']
        assert all(0 <= r[c] <= 1 for c in ('both', 'rgb', 'x') if c in r) and r['cpu_seconds'] > 0
    assert set(json.load(open(report / 'validation' / 'results.json'))['choices']['lr']) == \
        {f[0] for f in study.FAMILIES}
    text = (report / 'results.md').read_text()
    assert all(f"| {paper} | {claim} |" in text for paper, claim, *_ in study.CLAIMS)
    assert 'not judged (fewer than 3 seeds)' in text
    study.write_report(str(report))
    assert (report / 'results.md').read_text() == text


def test_study_pretraining_choice_only_from_the_studys_validation_scenes(tmp_path):
    """study.run takes MaskMentor pre-training's lr and budget from a report measured on its
    own validation preset; one measured on other scenes (or none) stops it with the command."""
    from study import run as study
    curve = lambda dataset: dict(baseline={t: 1.0 for t in ('rgb', 'norm_rgb', 'depth', 'semseg')}, dataset=dataset,
                                 points=[dict(step=s, loss={t: 1.0 - s / 1000 for t in ('rgb', 'norm_rgb', 'depth',
                                                                                        'semseg')})
                                         for s in (0, 100, 200)])
    with pytest.raises(SystemExit, match='is missing: run `python -m study.pretraining`'):
        study.pretraining_choice(str(tmp_path))
    (tmp_path / 'results.json').write_text(json.dumps({'0.001': curve('demo128-val')}))
    with pytest.raises(SystemExit, match='measured on demo128-val: run `python -m study.pretraining`'):
        study.pretraining_choice(str(tmp_path))
    (tmp_path / 'results.json').write_text(json.dumps({'0.001': dict(curve(study.VALIDATION), scenes=16)}))
    with pytest.raises(SystemExit, match=r'measured on a few scenes only \(--scenes\)'):
        study.pretraining_choice(str(tmp_path))
    (tmp_path / 'results.json').write_text(json.dumps({'0.001': curve(study.VALIDATION)}))
    assert study.pretraining_choice(str(tmp_path)) == dict(lr=1e-3, steps=200)


def test_study_maskmentor_plan_isolates_sttp_and_takes_the_choices():
    from study import run as study
    runs = {r['name']: r for r in study.plan([0], steps=10, foundation_steps=10, choices=STUDY_CHOICES)}
    sttp, control = runs['M2IM + STTP pre-training']['config'], runs['STTP schedule w/o token loss']['config']
    assert control == dict(sttp, opts=sttp['opts'] + ',token_weight=0')  # only the token loss differs
    assert (sttp['lr'], sttp['max_steps']) == (2e-3, 7) and tr.resolve(tr.Config(**sttp)).schedule == 'cosine'
    ft = tr.resolve(tr.Config(**runs['MaskMentor FT after M2IM + STTP']['config']))
    early = tr.resolve(tr.Config(**runs['ViT early fusion, full FT']['config']))
    assert (ft.batch_size, ft.schedule) == (early.batch_size, early.schedule) == (4, 'poly')  # a common FT recipe
    assert (ft.lr, early.lr) == (3e-4, 3e-3)  # each family's own lr
    assert ev.parse_opts(ft.opts)['depth_standardize'] == 'false'
    assert {runs[n]['config']['lr'] for n in study.FAMILIES[2][1]} == {1e-3}  # one lr for all of a family's rows
    assert 'lr' not in runs['ViT foundation (RGB)']['config']  # the foundations: the demo's lr
    assert runs['MaskMentor FT after STTP schedule w/o token loss']['need'] == 'STTP schedule w/o token loss/0'
    assert all(study.family_of(c[0]) for c in study.CONDITIONS if c[4] and 'stage=pretrain' not in c[3])


def test_study_pretraining_budget_and_what_stays_stuck_by_hand():
    from study import pretraining
    base = {t: 1.0 for t in pretraining.TASKS}
    curve = lambda *means: dict(baseline=base, points=[dict(step=100 * i, loss={**{t: m for t in base}, 'depth': 1.02})
                                                       for i, m in enumerate(means)])
    results = {1e-3: curve(2.0, 0.8, 0.72, 0.66, 0.65), 3e-3: curve(2.0, 0.9, 0.8, 0.75, 0.74)}
    lr, steps, mean = pretraining.choose(results)
    # the lowest last mean ratio: 1e-3; its whole gain in mean ratio is 3 * (2.0 - 0.65) / 4; 95% of it is first
    # reached at step 300 (0.66: 99.3% of it; 0.72 at step 200: 94.8%)
    assert (lr, steps) == (1e-3, 300) and mean == pytest.approx((3 * 0.66 + 1.02) / 4)
    assert pretraining.stuck(results) == ['depth']


def test_study_pretraining_structure_tells_a_flat_prediction_from_a_spatial_one():
    from study import pretraining
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 1, 8, 12, generator=g)
    mask = torch.tensor([[True, False, True, True, False, True], [False] * 5 + [True]])  # (B, 2 x 3) tokens of 4 x 4
    m = pretraining.pixels(mask, (2, 3), (8, 12))
    assert m.shape == (2, 8, 12) and bool(m[0, :4, :4].all()) and not bool(m[0, :4, 4:8].any())
    assert int(m[1].sum()) == 16 and bool(m[1, 4:, 8:].all())
    def corr_spread(pred):
        cov, vp, vt = pretraining.structure(pred, target, mask, (2, 3))
        return cov / max((vp * vt) ** 0.5, 1e-12), (vp / vt) ** 0.5
    assert corr_spread(target) == pytest.approx((1.0, 1.0))
    assert corr_spread(3 + 0.5 * target) == pytest.approx((1.0, 0.5))  # level and scale: corr 1, spread 0.5
    assert corr_spread(-target) == pytest.approx((-1.0, 1.0))
    flat = target.mean((2, 3), keepdim=True).expand_as(target) + 7  # one value per image, at any level
    assert corr_spread(flat)[1] == pytest.approx(0, abs=1e-5)
    # by hand: image 1, masked pixels = its last patch; deviations from the image's mean over all its pixels
    z = target[1, 0] - target[1, 0].mean()
    cov, vp, vt = pretraining.structure(target, target, mask, (2, 3))
    assert vt == pytest.approx(float((target[0, 0] - target[0, 0].mean())[m[0]].square().sum() + z[4:, 8:].square().sum()), rel=1e-5)


@pytest.mark.slow
def test_study_outputs_never_land_in_a_dataset_or_a_run(tmp_path):
    import subprocess
    import sys
    root = nyu_pair(tmp_path / 'nyu')
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'last.pt').write_bytes(b'a checkpoint')
    here = Path(__file__).resolve().parent
    for module, argv, words in (('study.run', ['--quick', '--out', root / 'runs'], ['--out', 'the dataset']),
                                ('study.run', ['--quick', '--out', tmp_path / 'o', '--report', run_dir],
                                 ['--report', 'another run']),
                                ('study.pretraining', ['--steps', '1', '--report', root / 'Label'], ['--report'])):
        res = subprocess.run([sys.executable, '-m', module, *map(str, argv)], capture_output=True, text=True, cwd=here,
                             env={**os.environ, 'OMP_NUM_THREADS': '1'})
        one_line_error(res, *words)
    assert not (root / 'runs').exists() and os.listdir(run_dir) == ['last.pt'] and not (tmp_path / 'o').exists()


def test_study_commands_refuse_bad_input_in_one_line(tmp_path, capsys):
    """study.run, study.pretraining and study.probes: a file given as a folder, a bad --only pattern, flags
    --tables would ignore, a missing results.json, and a --score file that is not a pre-training
    run end in one 'error:' line naming the flag, before any run starts."""
    from study import pretraining, probes
    from study import run as study_run
    junk, weights, empty = tmp_path / 'junk.pth', tmp_path / 'weights.pth', tmp_path / 'empty'
    junk.write_text('not a checkpoint')
    torch.save({'w': torch.zeros(2)}, weights)
    empty.mkdir()
    for main, argv, words in (
            (study_run.main, ['--out', str(junk)], ['--out', 'is a file']),
            (study_run.main, ['--quick', '--out', str(tmp_path / 'o'), '--report', str(junk)], ['--report', 'is a file']),
            (study_run.main, ['--decide', '--only', '(', '--out', str(tmp_path / 'o')], ['--only', 'regular expression']),
            (study_run.main, ['--tables', '--seeds', '2'], ['--tables', 'drop --seeds']),
            (study_run.main, ['--tables', '--report', str(empty)], ['drop --report']),
            (pretraining.main, ['--tables', '--report', str(empty)], ['--tables', 'results.json', 'does not exist']),
            (pretraining.main, ['--score', str(junk)], ['--score', 'junk.pth', 'cannot read']),
            (pretraining.main, ['--score', str(weights)], ['--score', 'pre-training run']),
            (pretraining.main, ['--report', str(junk)], ['--report', 'is a file']),
            (probes.main, ['--out', str(junk)], ['--out', 'is a file']),
            (probes.main, ['--tables', '--jobs', '3'], ['--tables', '--jobs']),
            (probes.main, ['--tables', '--report', str(empty)], ['--tables', 'results.json'])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        said = e.value.code if isinstance(e.value.code, str) else err
        one_line_error(type('R', (), dict(returncode=1, stderr=said)), *words)
    assert sorted(os.listdir(tmp_path)) == ['empty', 'junk.pth', 'weights.pth'] and not os.listdir(empty)


def test_study_probes_vary_one_thing_each_and_compare_by_seed(tmp_path):
    """study.probes: each probe is its validation run with one change (options, lr, steps, or
    the run it starts from), every run it needs is planned, no test scene is involved, and the
    report's paired differences are the hand-computed ones."""
    from study import probes
    from study import run as study_run
    runs = probes.plan(range(2), 4, 6, dict(lr=1e-3, steps=4))
    keys = {r['key'] for r in runs}
    assert all(r['need'] is None or r['need'] in keys for r in runs) and len(keys) == len(runs)
    assert all(r['config']['dataset'] == study_run.VALIDATION for r in runs)
    base = {r['key']: r for r in runs}
    for name, varies, change, _ in probes.PROBES:
        for seed in (0, 1):
            probe, run = base[f'probe: {name}/{seed}'], base[f'{varies}/{seed}']
            differ = {k for k in probe['config'] if probe['config'][k] != run['config'][k]}
            expect = {k for k, field in (('opts', 'opts'), ('lr', 'lr'), ('steps', 'max_steps')) if k in change}
            assert differ == {dict(opts='opts', lr='lr', steps='max_steps')[k] for k in expect}, (name, differ)
            assert probe['need'] == (f"{change['from']}/{seed}" if 'from' in change else run['need'])
            if 'steps' in change:
                assert probe['config']['max_steps'] == probes.LONG * run['config']['max_steps']
    ktb = base['probe: KTB, ranks x4/0']['config']['opts']
    model = rgbx.build_model('ktb', 'swin-nano', 13, 3, **dict(kv.split('=') for kv in ktb.split(',')))
    assert model.per_stage['prompt_ranks'] == [16, 32, 64, 128] and model.per_stage['adapter_ranks'] == [8, 16, 32, 64]
    # the report: A - B paired by seed, on the mean over A's family's inputs
    fake = [dict(name=probes.KTB_VAL, seed=s, both=0.2 + s / 100, rgb=0.1, x=0.15, step_seconds=1.0) for s in (0, 1)]
    fake += [dict(name='probe: KTB, ranks x4', seed=s, both=0.26, rgb=0.1 + s / 50, x=0.15, step_seconds=2.0)
             for s in (0, 1)]
    rows, comparisons = probes.summary(fake)
    wider = next(c for c in comparisons if c['what'] == 'wider KTB ranks')
    assert np.allclose(wider['differences'], [(26 + 10 + 15) / 3 - (20 + 10 + 15) / 3,
                                              (26 + 12 + 15) / 3 - (21 + 10 + 15) / 3])
    assert [c['what'] for c in comparisons] == ['wider KTB ranks']  # no comparison without both rows
    fake += [dict(name=probes.SWIN_EF_VAL, seed=s, both=0.3, rgb=0.0, x=0.0, step_seconds=1.0) for s in (0, 1)]
    across = next(c for c in probes.summary(fake)[1] if c['a'] == probes.KTB_VAL and c['b'] == probes.SWIN_EF_VAL)
    assert across['inputs'] == ('both',) and np.allclose(across['differences'], [20 - 30, 21 - 30])  # RGB+X only
    probes.write_report(str(tmp_path), dict(setup='set-up', runs=fake))
    assert '| wider KTB ranks | KTB, ranks x4 | val: KTB, lr 0.001 | RGB+X and RGB only and X only | +2.2 (+2.0, +2.3) |' in \
        (tmp_path / 'results.md').read_text()


def test_study_names_each_cpu_its_runs_were_timed_on():
    """A study resumed on another machine says so: each CPU with its run count, and that the
    step times compare only within one; one CPU is named alone."""
    from study import run as study
    assert study.cpus([{'cpu': 'A, 2 cores'}] * 3) == 'A, 2 cores'
    assert study.cpus([{'cpu': 'A'}] * 3 + [{'cpu': 'B'}]) == \
        'A (3 runs), B (1 run): step times compare only between runs on one CPU'
    assert study.cpus([]) == study.machine()


def test_study_modules_import_one_way():
    """study.probes -> study.run -> study.pretraining -> study.common: no module of the study imports one
    that imports it."""
    import ast
    here = Path(__file__).resolve().parent / 'study'
    graph = {}
    for path in here.glob('*.py'):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
                {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == 'study'
                 for a in n.names} | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        graph[path.stem] = {m.split('.')[1] for m in names if m.startswith('study.')}
    assert graph['run'] == {'pretraining', 'common'} and graph['pretraining'] == {'common'} and not graph['common']
    assert graph['probes'] == {'run', 'common'} and set(graph) == {'probes', 'run', 'pretraining', 'common'}


def test_study_tables_are_rewritten_from_results_json_alone(tmp_path):
    """`python -m study.run --tables`: a report's results.md comes from its results.json, no training:
    the GoPT decisions' report is rewritten identically."""
    import shutil
    from study import run as study
    here = Path(__file__).resolve().parent / 'study' / 'gopt-validation'
    shutil.copy(here / 'results.json', tmp_path / 'results.json')
    study.write_report(str(tmp_path))
    assert (tmp_path / 'results.md').read_text() == (here / 'results.md').read_text()


@pytest.mark.slow
def test_study_pretraining_curves_against_trivial_baselines(tmp_path, capsys):
    """`python -m study.pretraining`: the validation losses of MaskMentor's pre-training and of the trivial
    predictions on the same masked tokens; the zero prediction's MSE on the per-patch normalised RGB is that
    target's mean square over the masked pixels, checked by hand."""
    from study import pretraining
    pretraining.main(['--steps', '2', '--every', '1', '--lrs', '1e-3', '--jobs', '1', '--out', str(tmp_path / 'runs'),
                      '--report', str(tmp_path), '--scenes', '16'])
    saved = json.load(open(tmp_path / 'results.json'))['0.001']
    assert saved['scenes'] == 16 and 'on the first 16 held-out scenes' in (tmp_path / 'results.md').read_text()
    # --score: a trained checkpoint against the same baselines, without training
    checkpoint = tmp_path / 'runs' / 'lr0.001' / 'last.pt'
    assert pretraining.main(['--score', str(checkpoint), '--scenes', '16']) == 0
    said = capsys.readouterr().out.splitlines()[-1]
    last = saved['points'][-1]['loss']
    assert said.startswith(f"{checkpoint}: rgb {last['rgb'] / saved['baseline']['rgb']:.3f}, ") and 'depth / position mean' in said
    with pytest.raises(SystemExit, match='no such file'):
        pretraining.main(['--score', str(tmp_path / 'gone.pt')])
    assert [p['step'] for p in saved['points']] == [0, 1, 2]
    assert set(saved['baseline']) == set(pretraining.COLUMNS) | {'depth_mean', 'rgb_image', 'depth_median',
                                                                 'depth_position'}
    # depth's baseline is the better trivial rule; on rooms the position's mean depth beats each image's median
    b = saved['baseline']
    assert saved['dataset'] == pretraining.VALIDATION and b['depth'] == b['depth_position'] < b['depth_median']
    assert 'Chosen: lr 0.001 (the lowest mean ratio at the last step)' in (tmp_path / 'results.md').read_text()
    assert (tmp_path / 'results.png').exists()
    model = mm_pretrain()
    rgb, x, label = mm_batch(B=2, H=64, W=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mask = model.draw_mask(torch.ones(2, 3, dtype=torch.bool), 16)[:, 0]  # (B, N) the RGB tokens
    _, targets = model.targets(rgb, x, label)
    by_hand = torch.stack([targets['norm_rgb'][b].square().mean(0).view(4, 16, 4, 16).permute(0, 2, 1, 3)
                           .reshape(16, -1)[mask[b]].mean() for b in range(2)]).mean()
    got = model.pixel_loss('norm_rgb', torch.zeros_like(targets['norm_rgb']), targets['norm_rgb'], mask, (4, 4))
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)


# ----------------------------------------------------------------------------
# GPU checks: python -m pytest -q -m cuda test_rgbx.py (skipped without a CUDA device). The
# CUDA paths against the CPU's, most important first, each writing its figures to
# runs/gpu-checks/results.jsonl (or $RGBX_GPU_OUT) as soon as it has them; under 10 minutes
# on one GPU. Parity checks turn TF32 off (`exact_fp32`).
# ----------------------------------------------------------------------------

GPU_OUT = Path(os.environ.get('RGBX_GPU_OUT') or Path(__file__).resolve().parent / 'runs' / 'gpu-checks')


def gpu_record(check, **figures):
    """Append one result line to GPU_OUT/results.jsonl (device and torch named)."""
    GPU_OUT.mkdir(parents=True, exist_ok=True)
    with open(GPU_OUT / 'results.jsonl', 'a') as f:
        f.write(json.dumps(dict(check=check, device=torch.cuda.get_device_name(), torch=torch.__version__,
                                **figures)) + '\n')


@pytest.fixture
def exact_fp32():
    """TF32 off (true float32 on CUDA) for a parity check; the policy before is restored."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    ev.set_tf32(False)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def run_losses(cfg):
    return [json.loads(line)['loss'] for line in open(os.path.join(cfg.out_dir, 'log.jsonl')) if '"loss"' in line]


@pytest.mark.cuda
@pytest.mark.parametrize('amp', ['none', 'bf16', 'fp16'])
@pytest.mark.parametrize('name', list(NANO_METHODS))
def test_train_cuda_every_method_trains_in_each_precision(tmp_path, name, amp):
    """3 steps and an evaluation of every method on CUDA in each precision: finite losses,
    no step skipped for a non-finite loss (fp16's scaler may skip while it finds its
    scale: counted); the checkpoint loads on the CPU and predicts finite logits there."""
    cfg = demo_config(tmp_path, device='cuda', amp=amp, max_steps=3, **NANO_METHODS[name])
    start = time.perf_counter()
    out = tr.train(cfg)
    losses = run_losses(cfg)
    gpu_record('train', method=name, amp=amp, losses=losses, skipped=out['skipped'], overflows=out['overflows'],
               miou=out.get('miou'), seconds=round(time.perf_counter() - start, 1))
    assert out['step'] == 3 and out['skipped'] == 0 and len(losses) == 3 and all(map(math.isfinite, losses))
    model, _ = ev.load_model(os.path.join(cfg.out_dir, 'last.pt'), device='cpu')
    assert all(p.device.type == 'cpu' for p in model.parameters())
    if not model.pretraining:
        rgb, x, _ = (t[None] for t in data.build_dataset('demo', '', 'test')[0])
        with torch.no_grad():
            assert torch.isfinite(model.eval()(rgb, x)).all()


@pytest.mark.cuda
@pytest.mark.parametrize('name', ['ktb', 'maskmentor-pretrain'])
def test_train_cuda_resume_equals_uninterrupted(tmp_path, name):
    """Stopped after step 3 and resumed, a CUDA run (MMST / mask draws on the CUDA
    generator) ends where an uninterrupted one does, within the DDP test's tolerances
    (CUDA kernels with atomics may sum in another order from run to run)."""
    kw = dict(device='cuda', max_steps=6, save_every=1, **NANO_METHODS[name])
    tr.train(demo_config(tmp_path / 'whole', **kw))

    def stop(step):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tr.train(demo_config(tmp_path / 'cut', **kw), on_step=stop)
    tr.train(demo_config(tmp_path / 'cut', resume=True, **kw))
    a, b = trained_state(demo_config(tmp_path / 'whole')), trained_state(demo_config(tmp_path / 'cut'))
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    gpu_record('resume', method=name, max_abs_diff=worst)
    assert_same_training(tmp_path / 'whole' / 'run', tmp_path / 'cut' / 'run', 6, f'{name} resumed on CUDA')


@pytest.mark.cuda
@pytest.mark.parametrize('name', SEGMENTERS)
def test_eval_cuda_logits_equal_the_cpus(name, exact_fp32):
    """The same weights on CPU and CUDA: logits within 1e-4 of their largest value in
    float32 (TF32 off), 5e-2 under bf16 autocast; training-mode losses too."""
    cfg = demo_config(Path('unused'), **NANO_METHODS[name])
    torch.manual_seed(0)
    model = tr.build_model(cfg).eval()
    rgb, x, label = (torch.stack(t) for t in zip(*[data.build_dataset('demo', '', 'test')[i] for i in range(4)]))
    with torch.no_grad():
        ref = model(rgb, x)
        gpu = model.cuda()
        fp32 = gpu(rgb.cuda(), x.cuda()).cpu()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            bf16 = gpu(rgb.cuda(), x.cuda()).float().cpu()
    scale = ref.abs().max().item()
    err = dict(fp32=(fp32 - ref).abs().max().item() / scale, bf16=(bf16 - ref).abs().max().item() / scale)
    gpu_record('logits', method=name, **err)
    assert err['fp32'] <= 1e-4 and err['bf16'] <= 5e-2, err


@pytest.mark.cuda
@pytest.mark.parametrize('name', SEGMENTERS)
def test_eval_cuda_protocols_equal_the_cpus_miou(name, exact_fp32):
    """Evaluation on CUDA (single scale, multi-scale + flip, sliding windows, RGB only,
    X only) gives the CPU's mIoU within 1e-3, with the same weights (TF32 off)."""
    cfg = demo_config(Path('unused'), **NANO_METHODS[name])
    torch.manual_seed(0)
    model = tr.build_model(cfg)
    loader = data.loader(data.build_dataset('demo', '', 'test', x_standardised=tr.run_spec(cfg).x_standardised), 4)
    protocols = dict(single={}, multiscale_flip=dict(scales=ev.SCALES, flip=True), sliding=dict(crop=(32, 32)),
                     rgb_only=dict(modality='rgb'), x_only=dict(modality='x'))
    found = {}
    for what, kw in protocols.items():
        cpu = ev.metrics(ev.evaluate(model.cpu(), loader, 5, torch.device('cpu'), **kw))['miou']
        cuda = ev.metrics(ev.evaluate(model.cuda(), loader, 5, torch.device('cuda'), **kw))['miou']
        found[what] = (cpu, cuda)
    gpu_record('evaluation', method=name, miou=found)
    for what, (cpu, cuda) in found.items():
        assert abs(cpu - cuda) <= 1e-3, (what, cpu, cuda)


@pytest.mark.cuda
def test_train_cuda_torchrun_with_nccl(tmp_path):
    """torchrun on one GPU: the nccl process group, the per-rank file check and the
    evaluation's all-reduce over NCCL; the losses equal a plain CUDA run's (1e-5)."""
    argv = ['--crop', '32x32', '--batch-size', '2', '--epochs', '1', '--max-steps', '4', '--lr', '1e-3',
            '--log-every', '1', '--workers', '0', '--device', 'cuda']
    out = finished(torchrun('--standalone', '--nproc_per_node', 1, 'train.py', *argv, '--out-dir', tmp_path / 'nccl'))
    tr.main([*argv, '--out-dir', str(tmp_path / 'plain')])
    losses = [run_losses(tr.Config(out_dir=str(tmp_path / d))) for d in ('nccl', 'plain')]
    gpu_record('torchrun_nccl', losses=losses, said=out[-300:])
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)


# What a CUDA training step may wait for (beyond the log steps' reads), by function: the
# host reads of HOST_READS but apply_step's (fused AdamW decides on the device), and the
# copies of the masks MMST (KTB's embed) and M2IM draw on the CPU generator to the GPU.
CUDA_SYNCS_ALLOWED = set().union(*HOST_READS.values()) - {'apply_step'} | {'embed', 'm2im_keep_batch'}


@pytest.mark.cuda
@pytest.mark.parametrize('name', list(NANO_METHODS))
def test_train_cuda_steps_do_not_wait_for_the_gpu(tmp_path, name):
    """torch.cuda.set_sync_debug_mode over two training steps that neither log nor save:
    every operation that waits for the GPU is named by its function, which must be one
    of CUDA_SYNCS_ALLOWED."""
    import ast
    import warnings
    seen = []

    def watch(step):  # steps 2 and 3 watched
        torch.cuda.set_sync_debug_mode('warn' if step in (1, 2) else 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        tr.train(demo_config(tmp_path, device='cuda', max_steps=4, log_every=1000, eval_every=0,
                             **NANO_METHODS[name]), on_step=watch)
    torch.cuda.set_sync_debug_mode(0)
    here = Path(__file__).resolve().parent
    functions = {}
    for f in ('rgbx.py', 'train.py', 'eval.py', 'data.py'):
        for n in ast.walk(ast.parse((here / f).read_text())):
            if isinstance(n, ast.FunctionDef):  # breadth first: an inner function's lines are named last
                functions.update({(f, line): n.name for line in range(n.lineno, n.end_lineno + 1)})
    for w in caught:
        if 'synchroniz' in str(w.message):
            seen.append(functions.get((Path(w.filename).name, w.lineno), f'{Path(w.filename).name}:{w.lineno}'))
    gpu_record('syncs', method=name, where=sorted(set(seen)), count=len(seen))
    assert set(seen) <= CUDA_SYNCS_ALLOWED, sorted(set(seen) - CUDA_SYNCS_ALLOWED)


@pytest.mark.cuda
@pytest.mark.parametrize('method,backbone', [('ktb', 'swin-base'), ('gopt', 'vit-base'), ('maskmentor', 'vit-base')])
def test_eval_cuda_benchmark_at_480x640(method, backbone):
    """The benchmark of the papers' models at 480 x 640 on this GPU (random weights, the
    demo's 5 classes and 1-channel depth; the paper reports about 13 images/s for KTB
    Swin-B on an RTX 3090): figures to GPU_OUT/benchmark-<method>.json and results.jsonl."""
    out = GPU_OUT / f'benchmark-{method}.json'
    GPU_OUT.mkdir(parents=True, exist_ok=True)
    ev.main(['--benchmark', '--method', method, '--backbone', backbone, '--dataset', 'demo', '--size', '480x640',
             '--device', 'cuda', '--workers', '4', '--repeats', '3', '--json', str(out)])
    figures = json.loads(out.read_text())
    gpu_record('benchmark', method=method, backbone=backbone, figures=figures)
    assert figures


# ----------------------------------------------------------------------------
# Layout: what imports what, where code and recipes live, the allocator, the test file itself
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(NANO_METHODS))
def test_layout_no_tensor_is_made_on_the_default_device(name, tmp_path):
    """Device placement without a GPU: the model and its inputs stay on the CPU while the
    default device is `meta` (no data; torch refuses to mix its tensors with CPU ones).
    A tensor a forward, a loss, its backward or an evaluation protocol creates without
    naming a device (`torch.zeros(n)` where `x.new_zeros(n)` or `device=x.device` was
    meant) lands on meta and fails the first operation that meets the CPU tensors, as it
    would land on the CPU and fail against CUDA tensors on a GPU. (The meta device alone
    cannot run the models: MaskMentor reads values; the host draws of MMST and M2IM name
    the CPU on purpose.)"""
    cfg, model, _, batch = one_step_setup(name, tmp_path)
    phases = [{'phase': 'mim'}, {'phase': 'student'}] if model.pretraining else [{}]
    with torch.device('meta'):
        for phase in phases:
            loss, _ = model(*batch, **phase)
            loss.backward()
        if not model.pretraining:
            with torch.no_grad():
                model.eval()
                for kw in (dict(scales=(0.5, 1.0), flip=True), dict(crop=(16, 16))):
                    assert ev.predict(model, batch[0], batch[1], 5, **kw).device.type == 'cpu'
                ev.predict(model, *ev.drop_modality(batch[0], batch[1], 'x'), 5)
    assert loss.device.type == 'cpu' and all(p.grad is None or p.grad.device.type == 'cpu' for p in model.parameters())
    with torch.device('meta'), pytest.raises((RuntimeError, NotImplementedError)):
        batch[0] * torch.ones(batch[0].shape[1:])  # what the check catches


def test_layout_recipes_sit_with_their_methods():
    ktb = rgbx.recipe('ktb', 'nyudv2')
    assert (ktb.epochs, ktb.lr, ktb.weight_decay, ktb.batch_size, ktb.warmup_epochs) == (400, 4e-4, 0.01, 4, 10)
    assert not ktb.x_standardised and ktb.frozen_backbone and rgbx.recipe('ktb', 'mcubes').options == {'ohem': True}
    assert rgbx.recipe('early_fusion', 'nyudv2').x_standardised and rgbx.recipe('ktb', 'demo').epochs is None
    gopt = rgbx.recipe('gopt', 'nyudv2')
    assert (gopt.epochs, gopt.lr, gopt.global_batch, gopt.augment) == (60, 4e-5, 64, 'crop')
    assert rgbx.recipe('maskmentor', 'demo', dict(stage='pretrain')).beta2 == 0.95
    assert data.get_preset('nyudv2').x_norm('depth', standardised=False) == ((0.0,), (1.0,))
    assert data.get_preset('nyudv2').x_norm('depth') == (data.DEPTH.mean, data.DEPTH.std)


@pytest.mark.slow
def test_layout_freed_memory_is_reused_without_page_faults():
    """The entry points keep freed heap memory (glibc, eval.keep_freed_memory): allocating and
    freeing a 64 MiB tensor again and again
    touches fresh pages (minor faults) only until the heap has grown; RGBX_KEEP_FREED_MEMORY=0 or any of
    glibc's own MALLOC_* variables leave glibc's defaults alone."""
    import subprocess
    import sys
    code = ("import resource, torch, eval\n"
            "f = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "torch.set_num_threads(1)\n"
            "for _ in range(3): torch.empty(2 ** 24).fill_(1)\n"  # the heap settles
            "f0 = f()\n"
            "for _ in range(5): torch.empty(2 ** 24).fill_(1)\n"
            "kept = eval.keep_freed_memory()\n"
            "for _ in range(3): torch.empty(2 ** 24).fill_(1)\n"  # the heap settles
            "f0 = f()\n"
            "for _ in range(5): torch.empty(2 ** 24).fill_(1)\n"
            "print(kept, f() - f0)\n")
    run = lambda **env: subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                                       cwd=Path(__file__).resolve().parent,
                                       env={**{k: v for k, v in os.environ.items()
                                               if not k.startswith('MALLOC_') and k != 'GLIBC_TUNABLES'}, **env}
                                       ).stdout.split()
    applied, faults = run()
    if applied == 'False':
        pytest.skip('not glibc on Linux: malloc is left as it is')
    pages = 5 * 2 ** 26 // 4096
    assert int(faults) < pages // 20, faults  # kept: a few faults at most
    for env in ({'RGBX_KEEP_FREED_MEMORY': '0'}, {'MALLOC_ARENA_MAX': '2'}):
        applied, faults = run(**env)
        assert applied == 'False' and int(faults) > pages // 2, (env, faults)  # glibc's default: every page again
    odd = subprocess.run([sys.executable, '-c', 'import eval; print(eval.keep_freed_memory())'], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parent,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')
                                 and k != 'GLIBC_TUNABLES'}, 'RGBX_KEEP_FREED_MEMORY': 'banana'})
    assert odd.stdout.strip() == 'True' and "RGBX_KEEP_FREED_MEMORY='banana' is not 0 or 1" in odd.stderr


def test_layout_imports_flow_one_way():
    """rgbx, data <- eval <- train: nothing imports train, eval does not import train,
    rgbx and data import none of the project's files."""
    import ast
    here = Path(__file__).resolve().parent
    ours = {'rgbx', 'data', 'eval', 'train'}
    allowed = {'rgbx': set(), 'data': set(), 'eval': {'rgbx', 'data'}, 'train': {'rgbx', 'data', 'eval'}}
    for module, may in allowed.items():
        tree = ast.parse((here / f'{module}.py').read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
                   {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}  # at any depth, lazy ones too
        assert imported & ours == may, (module, imported & ours)


def test_layout_rgbx_has_no_distributed_code_and_data_no_method():
    here = Path(__file__).resolve().parent
    assert not re.search(r'torch\.distributed|\bdist\.', (here / 'rgbx.py').read_text())
    code = (here / 'data.py').read_text()
    for method in rgbx.METHODS:
        assert method not in code.lower() and 'maskmentor' not in code.lower(), method


def test_layout_no_function_over_80_lines():
    import ast
    here = Path(__file__).resolve().parent
    for f in ('rgbx.py', 'data.py', 'train.py', 'eval.py'):
        for n in ast.walk(ast.parse((here / f).read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert n.end_lineno - n.lineno + 1 <= 80, (f, n.name, n.end_lineno - n.lineno + 1)


def rgbx_definitions():
    """rgbx.py's module-level definitions in file order: {name: (node, section title)}, an
    import counting as the definition of the names it binds."""
    import ast
    text = (Path(__file__).resolve().parent / 'rgbx.py').read_text()
    lines, section, sections = text.splitlines(), '', {}
    for i, line in enumerate(lines[:-1]):
        if line.startswith('# ----') and lines[i + 1].startswith('# ') and not lines[i + 1].startswith('# ----'):
            sections[i + 2] = lines[i + 1][2:]  # the banner's title line (1-based)
    defs = {}
    for node in ast.parse(text).body:
        section = next((title for start, title in reversed(sections.items()) if start <= node.lineno), '')
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(a.asname or a.name).split('.')[0] for a in node.names]
        else:
            continue
        defs.update({name: (node, section) for name in names})
    return defs, lines


def rgbx_closure(defs, root):
    """The definitions `root` needs, itself included, in file order (the names its code uses,
    transitively), less torch, nn, F and math."""
    import ast
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name not in seen and name in defs:
            seen.add(name)
            todo += [n.id for n in ast.walk(defs[name][0]) if isinstance(n, ast.Name)]
    seen -= {'torch', 'nn', 'F', 'math'}
    return sorted(seen, key=lambda n: (defs[n][0].lineno, n))


def test_layout_each_method_needs_its_own_parts_only():
    """GoPT's definitions (build_gopt's closure) hold no KTB, DSCF or Swin definition; KTB's no GoPT
    or MaskMentor one: loading asks each model to convert its own files."""
    defs, _ = rgbx_definitions()
    section = lambda names, prefix: {n for n in names if defs[n][1].startswith(prefix)}
    gopt = set(rgbx_closure(defs, 'build_gopt'))
    assert {'GoPT', 'GroupingPrompts', 'VisionTransformer', 'load_pretrained'} <= gopt
    assert not gopt & {'KTB', 'DSCF', 'SwinTransformer', 'WindowAttention'}
    assert not section(gopt, 'Swin') | section(gopt, 'KTB') | section(gopt, 'MaskMentor'), gopt
    ktb = set(rgbx_closure(defs, 'build_ktb'))
    assert {'KTB', 'DSCF', 'SwinTransformer'} <= ktb and not section(ktb, 'GoPT') | section(ktb, 'MaskMentor')
    mm = set(rgbx_closure(defs, 'build_maskmentor'))
    assert not section(mm, 'Swin') | section(mm, 'KTB') | section(mm, 'GoPT'), mm


# Each row of docs/copying.md's table: how to build the module and its inputs.
COPY_ROWS = {
    'DSCF': (lambda m: m.DSCF(32, 8, 2, 2, 4, 3, (4, 4)), lambda: (torch.randn(2, 8, 8, 32), torch.randn(2, 8, 8, 32))),
    'MAPAPrompt': (lambda m: m.MAPAPrompt(16, 4), lambda: (torch.randn(4, 6, 6, 16),)),
    'MAPAAdapter': (lambda m: m.MAPAAdapter(16, 4), lambda: (torch.randn(4, 6, 6, 16),)),
    'CUP': (lambda m: m.CUP(16), lambda: (torch.randn(2, 9, 16), torch.randn(2, 5, 16))),
    'ACP': (lambda m: m.ACP(16), lambda: (torch.randn(2, 9, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16))),
    'GroupingPrompter': (lambda m: m.GroupingPrompter(16),
                         lambda: (torch.randn(2, 9, 16), torch.randn(2, 9, 16), torch.randn(2, 5, 16))),
    'SegFormerHead': (lambda m: m.SegFormerHead([8, 16], 12, 5),
                      lambda: ([torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)], (30, 31))),
    'SETRNaiveHead': (lambda m: m.SETRNaiveHead(16, 5, 12), lambda: (torch.randn(2, 12, 16), (3, 4), (45, 62))),
    'ConvNeXtHead': (lambda m: m.ConvNeXtHead(16, 5, 12, 1), lambda: (torch.randn(2, 12, 16), (3, 4), (45, 62))),
    'MultiModalViT': (lambda m: m.MultiModalViT({}, dim=16, depth=2, heads=2), lambda: (torch.randn(2, 10, 16),)),
    'SwinTransformer': (lambda m: m.SwinTransformer(16, (1, 1), (1, 2), 4), lambda: (torch.randn(1, 3, 40, 57),)),
    'VisionTransformer': (lambda m: m.VisionTransformer(16, 2, 2, img_size=32), lambda: (torch.randn(1, 3, 40, 57),)),
}


def test_layout_copy_table_is_the_ast_closure_and_each_row_runs_alone():
    """docs/copying.md's table is what `rgbx_closure` computes, and each row copied alone (its
    definitions in file order, with torch, nn, F and math) builds and computes what rgbx's
    module computes with the same weights."""
    import types as pytypes
    defs, lines = rgbx_definitions()
    rows = {m: rgbx_closure(defs, m) for m in COPY_ROWS}
    imports = {m: [n for n in names if type(defs[n][0]).__name__ in ('Import', 'ImportFrom')]
               for m, names in rows.items()}
    assert not any(imports.values()), imports  # a row needs no import beyond torch, nn, F and math
    table = '\n'.join(['| module | also copy |', '|---|---|'] + [
        f"| `{m}` | {', '.join(f'`{n}`' for n in names if n != m)} |" for m, names in rows.items()])
    doc = (Path(__file__).resolve().parent / 'docs' / 'copying.md').read_text()
    start = doc.index('| module | also copy |')  # the whole block up to its blank line, no stray line
    assert doc[start:doc.index('\n\n', start)] == table, 'the table of docs/copying.md:\n' + table
    for m, (build, inputs) in COPY_ROWS.items():
        nodes = list(dict.fromkeys(defs[n][0] for n in rows[m]))
        code = 'import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n\n' + '\n\n'.join(
            '\n'.join(lines[min([node.lineno] + [d.lineno for d in getattr(node, 'decorator_list', [])]) - 1:
                           node.end_lineno]) for node in nodes)
        copied = pytypes.ModuleType(f'copied_{m}')
        exec(compile(code, f'<copy of {m}>', 'exec'), copied.__dict__)
        torch.manual_seed(0)
        alone = build(copied).eval()
        torch.manual_seed(0)
        original = build(rgbx).eval()
        torch.manual_seed(1)
        args = inputs()
        with torch.no_grad():
            out, ref = alone(*args), original(*args)
        out, ref = [o for o in (out if isinstance(out, (tuple, list)) else [out])], \
            [r for r in (ref if isinstance(ref, (tuple, list)) else [ref])]
        assert len(out) == len(ref) and all(torch.isfinite(o).all() and torch.equal(o, r) for o, r in zip(out, ref)), m


def test_layout_rgbx_lines_within_100_characters_and_no_module_state_rebound():
    """At most 2 % of rgbx.py's lines exceed 100 characters, and no function rebinds a module
    name (no `global` statement: the draw policy is a context variable)."""
    import ast
    text = (Path(__file__).resolve().parent / 'rgbx.py').read_text()
    lines = text.splitlines()
    assert sum(len(line) > 100 for line in lines) <= 0.02 * len(lines)
    assert not [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Global, ast.Nonlocal))]


def test_layout_each_test_sits_in_its_modules_section():
    """A test's name carries its module, and it sits in that module's section of this file."""
    prefixes = {'Foundations': ('test_swin', 'test_vit', 'test_heads', 'test_draws'), 'KTB': ('test_ktb',),
                'GoPT': ('test_gopt',), 'MaskMentor': ('test_maskmentor',),
                'Data': ('test_data', 'test_hha', 'test_every_real_data'), 'Evaluation': ('test_eval',),
                'Training': ('test_train',), 'The reproduction study': ('test_study',), 'Layout': ('test_layout',)}
    lines, section, misplaced = Path(__file__).read_text().splitlines(), '', []
    for i, line in enumerate(lines):
        if line.startswith('# ----') and i + 1 < len(lines) and re.match(r'# \w', lines[i + 1]):
            section = lines[i + 1][2:]
        name = re.match(r'def (test_\w+)', line)
        allowed = next((p for title, p in prefixes.items() if section.startswith(title)), None)
        if name and allowed is not None and not name[1].startswith(allowed):
            misplaced.append((section.split(':')[0], name[1]))
    assert not misplaced, misplaced


def test_layout_train_calls_models_through_the_interface_only():
    code = (Path(__file__).resolve().parent / 'train.py').read_text()
    assert 'hasattr(' not in code and 'getattr(' not in code


@pytest.mark.slow
@pytest.mark.slow
def test_layout_every_command_refuses_bad_flags_in_one_line(capsys):
    """argparse's own refusals (an unknown flag, a value of the wrong type, a missing one) end
    each command with one 'error:' line and a non-zero status, like every other refusal."""
    one_line_error(run_cli('train.py', '--epochs', 'abc'), '--epochs', 'abc')  # a real process
    from study import run as study_run
    for main, argv, words in ((ev.main, ['--bogus'], ['--bogus']), (data.main, ['hha', '--depth', 'x'], ['--camera']),
                              (study_run.main, ['--seeds', 'x'], ['--seeds'])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        one_line_error(type('R', (), dict(returncode=e.value.code, stderr=err)), *words)


@pytest.mark.slow
def test_layout_readme_python_examples_run_and_write_nothing_into_the_repository(tmp_path):
    """Each ```python block of README.md that writes a file, run as a user runs it (a file in the
    repository root's working folder, the temporary folder under the test's), ends without error
    and leaves the repository's files as they were (GoPT's stand-in mae.pth goes to the temporary
    folder)."""
    import subprocess
    import sys
    here = Path(__file__).resolve().parent
    blocks = [b for b in re.findall(r'```python\n(.*?)```', (here / 'README.md').read_text(), re.S)
              if 'save(' in b or 'open(' in b]  # the examples that write files
    assert blocks
    before = sorted(os.listdir(here))
    for block in blocks:
        res = subprocess.run([sys.executable, '-c', block], cwd=here, capture_output=True, text=True,
                             env={**os.environ, 'OMP_NUM_THREADS': '1', 'TMPDIR': str(tmp_path)})
        assert res.returncode == 0, block + res.stderr[-2000:]
    assert sorted(os.listdir(here)) == before
    assert (tmp_path / 'mae.pth').is_file()


def test_layout_import_leaves_the_allocator_alone():
    """A 256 MiB tensor freed after `import rgbx` is given back to the OS (glibc's default):
    only the entry points keep freed memory (eval.keep_freed_memory)."""
    import subprocess
    import sys
    code = ("import torch, rgbx, data, eval, train\n"
            "rss = lambda: int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')))\n"
            "before = rss()\n"
            "t = torch.ones(2 ** 26)\n"
            "del t\n"
            "print(rss() - before)\n")
    if not Path('/proc/self/status').exists():
        pytest.skip('no /proc: the resident set cannot be read')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent,
                         env={k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}).stdout
    assert int(out) < 64 * 1024, out  # kB: the 256 MiB left the resident set


def test_layout_paper_methods_take_the_paper_backbone(tmp_path):
    (tmp_path / 'x.pth').write_bytes(b'')  # resolve checks that it exists; it is not read
    for method, backbone in (('ktb', 'swin-base'), ('gopt', 'vit-base'), ('maskmentor', 'vit-base')):
        cfg = tr.resolve(tr.Config(dataset='nyudv2', method=method, pretrained=str(tmp_path / 'x.pth')))
        assert cfg.backbone == backbone
    assert tr.resolve(tr.Config(method='gopt', pretrained='none')).backbone == 'vit-nano'  # the demo: nano


def test_layout_train_help_describes_every_flag_and_lists_the_methods(capsys):
    actions = [a for a in tr.parser()._actions if a.option_strings and a.dest != 'help']
    assert len(actions) == len(tr.fields(tr.Config)) + 1 and all(a.help and len(a.help) > 15 for a in actions)
    with pytest.raises(SystemExit):
        tr.parse_config(['--help'])
    text = capsys.readouterr().out
    assert all(m in text for m in rgbx.METHODS) and 'swin-base' in text and 'nyudv2' in text
    with pytest.raises(SystemExit):
        tr.parse_config(['--method', 'gopt', '--list-opts'])
    listed = capsys.readouterr().out
    assert 'acp' in listed and 'prompt_dim' in listed and 'default 55' in listed


