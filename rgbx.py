"""rgbx: reference implementations of RGB+X semantic segmentation methods.

One file of models, readable beside the papers:

- Foundations: the Swin Transformer (Liu et al., ICCV 2021) and the ViT of MAE
  (He et al., CVPR 2022), hand-written so that they load the official
  checkpoints, run at any input size and expose the seams the methods need;
  `load_pretrained`; the SegFormer, SETR-Naive and ConvNeXt segmentation heads.

Layout conventions: images are (B, C, H, W) float tensors; Swin keeps its token
maps channels-last as (B, H, W, C) (LayerNorm and Linear act on the last axis,
windows are plain reshapes); ViT tokens are (B, 1 + N, D) with the cls token first.
"""
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch per sample."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Mlp(nn.Module):
    """Transformer feed-forward network: fc1 -> GELU -> fc2 (names as in both checkpoints)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def pad_to_multiple(x, multiple, dims):
    """Zero-pad the trailing end of the given spatial `dims` of `x` to a multiple of `multiple`."""
    pad = [0] * (2 * x.ndim)
    for d in dims:  # F.pad lists (left, right) pairs from the last dim backwards
        pad[2 * (x.ndim - 1 - d) + 1] = (-x.shape[d]) % multiple
    return F.pad(x, pad) if any(pad) else x


def resize_logits(logits, size, stride):
    """Upsample head logits computed on a padded grid back to the input size.

    logits: (B, K, h, w) on a grid of `stride` pixels per cell that covers the
    bottom/right-padded image; returns (B, K, H, W) with (H, W) = size. Upsampling
    to the padded extent and cropping keeps every cell over the pixels it saw.
    """
    h, w = logits.shape[-2:]
    logits = F.interpolate(logits, size=(h * stride, w * stride), mode='bilinear', align_corners=False)
    return logits[..., :size[0], :size[1]]


# ----------------------------------------------------------------------------
# Swin Transformer (Liu et al., "Swin Transformer: Hierarchical Vision
# Transformer using Shifted Windows", ICCV 2021). Module names are the names of
# the official checkpoint keys.
# ----------------------------------------------------------------------------

def relative_position_index(window):
    """Swin eq. 4 index: for each (query, key) pair of a window, the row of the
    (2w-1)^2 bias table that holds their relative offset. Returns (w*w, w*w) long."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), offsets shifted to >= 0
    return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x, window):
    """(B, Hp, Wp, C) -> (B, nW, w*w, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)  # (B, nh, w, nw, w, C)
    return x.transpose(2, 3).reshape(B, -1, window * window, C)


def window_layout(H, W, window, shift, device):
    """Where each token of an H x W map sits when (S)W-MSA attends (Swin Sec. 3.2).

    The map is padded at the bottom/right to Hp x Wp, a multiple of the window,
    cyclically shifted by -shift and cut into nW windows of N = w*w tokens.
    Gathering by index does the pad, the shift and the partition in one copy:
      order: (nW*N,) long, the flat index (row*W + col) of the token in each window
             slot; padded slots repeat token 0, since the mask makes them invisible;
      back:  (H*W,) long, the window slot of each real token (undoes `order`);
      mask:  additive (nW, 1, N, N), 0 = may attend, -inf = may not, or None when
             every window sees all of its keys (no shift, no padding). A query
             attends to a key when both come from the same region of the unshifted
             map (the cyclic-shift mask) and the key is real, so padding never
             leaks into real tokens; a padded query attends to itself, which keeps
             every softmax row finite.
    """
    Hp, Wp = H + (-H) % window, W + (-W) % window
    r = torch.arange(Hp, device=device)[:, None]
    c = torch.arange(Wp, device=device)[None, :]
    src_r, src_c = (r + shift) % Hp, (c + shift) % Wp  # torch.roll(x, -shift): slot (r, c) holds x[r + shift, c + shift]
    real = (src_r < H) & (src_c < W)  # (Hp, Wp)
    band = lambda i, n: (i >= n - window).long() + (i >= n - shift).long() if shift else 0 * i
    region = band(r, Hp) * 3 + band(c, Wp)  # (Hp, Wp), the 9 regions of the shifted frame
    part = lambda t: window_partition(t.expand(Hp, Wp)[None, :, :, None], window).flatten()  # (Hp, Wp) -> (nW*N,)
    order, real, region = part(torch.where(real, src_r * W + src_c, 0)), part(real), part(region)
    back = torch.empty(H * W, dtype=torch.long, device=device)
    back[order[real]] = torch.arange(order.numel(), device=device)[real]
    if shift == 0 and (Hp, Wp) == (H, W):
        return order, back, None
    N = window * window
    real, region = real.view(-1, N), region.view(-1, N)  # (nW, N)
    same = region[:, :, None] == region[:, None, :]  # (nW, N, N)
    allowed = same & (real[:, None, :] | torch.eye(N, dtype=torch.bool, device=device))
    mask = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float('-inf'))
    return order, back, mask[:, None]  # mask (nW, 1, N, N)


class WindowAttention(nn.Module):
    """W-MSA / SW-MSA core (Swin eq. 4): softmax(Q K^T / sqrt(d) + B) V inside windows.

    B is read from the learned relative-position bias table, (2w-1)^2 x heads.
    forward(x: (B, nW, N, C), mask: additive (nW, 1, N, N) or None) -> (B, nW, N, C).

    Speed: SDPA's fused CPU/GPU kernels take a mask broadcast over the batch as
    a stride-0 view, but not a materialised per-window copy of it; the layouts
    below keep every broadcast axis a view.
    """

    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads = heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # a buffer rebuilt from the window size, never loaded (not in state_dict)
        self.register_buffer('relative_position_index', relative_position_index(window), persistent=False)

    def forward(self, x, mask=None):
        B, nW, N, C = x.shape
        N_ = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, heads)
        qkv = self.qkv(x).view(B, nW, N, 3, self.heads, C // self.heads).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, heads, N, d)
        bias = bias.view(N_, N_, self.heads).permute(2, 0, 1).to(qkv.dtype)  # (heads, N, N), in autocast's dtype
        if mask is None:  # one bias for every window
            q, k, v = qkv.flatten(1, 2).unbind(0)  # each (B*nW, heads, N, d)
            bias = bias.expand(B * nW, -1, -1, -1)  # (B*nW, heads, N, N), a view
        else:  # a bias per window: windows join the heads axis, the batch axis stays a view
            q, k, v = qkv.reshape(3, B, nW * self.heads, N, -1).unbind(0)  # each (B, nW*heads, N, d)
            bias = (bias + mask.to(qkv.dtype)).flatten(0, 1).expand(B, -1, -1, -1)  # (B, nW*heads, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.view(B, nW, self.heads, N, -1).transpose(2, 3).reshape(B, nW, N, C))


class SwinTransformerBlock(nn.Module):
    """One Swin block (Swin eq. 3): z = x + (S)W-MSA(LN(x)); out = z + MLP(LN(z)).

    forward(x: (B, H, W, C), layout, parallel=None) -> (B, H, W, C). The stage
    passes the `window_layout` of this block's shift (0 for W-MSA). `parallel`, when given, is
    a module applied to z whose output is added beside the MLP: the seam through
    which a method adds an adapter to a frozen block without copying it
    (KTB's MAPA adapters: out = z + MLP(LN(z)) + parallel(z)).
    """

    def __init__(self, dim, heads, window, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def attention(self, x, layout):
        """(S)W-MSA of a normed map x: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        order, back, mask = layout
        x = x.reshape(B, H * W, C).index_select(1, order)  # pad, cyclic shift, partition: (B, nW*N, C)
        x = self.attn(x.view(B, -1, self.window ** 2, C), mask)  # (B, nW, N, C)
        return x.flatten(1, 2).index_select(1, back).view(B, H, W, C)  # reverse shift, crop

    def forward(self, x, layout, parallel=None):
        z = x + self.drop_path(self.attention(self.norm1(x), layout))
        out = z + self.drop_path(self.mlp(self.norm2(z)))
        return out if parallel is None else out + parallel(z)


class PatchMerging(nn.Module):
    """Swin patch merging: concat each 2x2 neighbourhood (4C), LayerNorm, linear 4C -> 2C.

    The concat order is the official one: x0 = x[0::2, 0::2], x1 = x[1::2, 0::2],
    x2 = x[0::2, 1::2], x3 = x[1::2, 1::2] in (row, column); any other order
    scrambles the pretrained `reduction.weight`. Odd maps are zero-padded.
    forward(x: (B, H, W, C)) -> (B, ceil(H/2), ceil(W/2), 2C).
    """

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = pad_to_multiple(x, 2, (1, 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One Swin stage: `depth` blocks alternating W-MSA and SW-MSA, then (except
    in the last stage) a `downsample` patch merging, kept separate so that the
    stage output can be taken before it.

    forward(x: (B, H, W, C), parallel=None) -> (B, H, W, C); `parallel` is a
    list with one module (or None) per block, see SwinTransformerBlock.
    """

    def __init__(self, dim, depth, heads, window, mlp_ratio, drop_paths, downsample):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, heads, window, mlp_ratio, drop_paths[i]) for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None
        self._layouts = {}

    def layouts(self, H, W, device):
        """`window_layout` of the W-MSA and of the SW-MSA blocks for an H x W map,
        cached per size and device. A map that fits in one window is not shifted
        (as in the official code): the shift would only cut the window apart."""
        key = (H, W, str(device))
        if key not in self._layouts:
            one_window = H <= self.window and W <= self.window
            self._layouts[key] = tuple(window_layout(H, W, self.window, s, device)
                                       for s in (0, 0 if one_window else self.window // 2))
        return self._layouts[key]

    def forward(self, x, parallel=None):
        layouts = self.layouts(x.shape[1], x.shape[2], x.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, layouts[i % 2], None if parallel is None else parallel[i])
        return x


class PatchEmbed(nn.Module):
    """Split an image into p x p patches and embed each linearly (a stride-p conv).

    The image is zero-padded at the bottom/right to a multiple of p, so
    forward(img: (B, in_chans, H, W)) -> (B, ceil(H/p), ceil(W/p), dim), channels-last,
    followed by LayerNorm when `norm` (Swin) and not (ViT).
    """

    def __init__(self, in_chans, dim, patch, norm):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, img):
        x = self.proj(pad_to_multiple(img, self.patch, (2, 3)))  # (B, dim, h, w)
        return self.norm(x.permute(0, 2, 3, 1))  # (B, h, w, dim)


SWIN_PRESETS = {  # embed dim, depths, heads (Swin Table 1); window of the official files (7: 224 px, 12: 384 px / 22K)
    'nano': dict(embed_dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window_size=4),  # demo and tests only
    'tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window_size=7),
    'small': dict(embed_dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24), window_size=7),
    'base': dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window_size=12),
    'large': dict(embed_dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48), window_size=12),
}


class SwinTransformer(nn.Module):
    """Swin Transformer backbone for dense prediction, any input size.

    forward(img: (B, in_chans, H, W)) -> list of 4 maps (B, C_i, ceil(H/2^(i+2)), ceil(W/2^(i+2))),
    C_i = embed_dim * 2^i, each taken after stage i's blocks and before its patch
    merging; the last map passes through the checkpoint's final `norm`.

    Driving it by hand (what KTB does per stream):
        x = model.patch_embed(img)                      # (B, H/4, W/4, C)
        for i, layer in enumerate(model.layers):
            x = layer(x, parallel=...)                  # stage i output, (B, h, w, C_i)
            if layer.downsample is not None:
                x = layer.downsample(x)                 # next stage input
    """

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window_size=7,
                 mlp_ratio=4.0, drop_path_rate=0.0, in_chans=3):
        super().__init__()
        self.window_size = window_size
        self.dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(in_chans, embed_dim, 4, norm=True)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth decay rule
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            BasicLayer(self.dims[i], depths[i], heads[i], window_size, mlp_ratio,
                       rates[starts[i]:starts[i] + depths[i]], downsample=i < len(depths) - 1)
            for i in range(len(depths)))
        self.norm = nn.LayerNorm(self.dims[-1])
        self.apply(_init_transformer_weights)

    def forward(self, img):
        x = self.patch_embed(img)
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        outs[-1] = self.norm(outs[-1])
        return [o.permute(0, 3, 1, 2) for o in outs]

    def adapt_checkpoint(self, sd):
        """Official Microsoft Swin keys -> this model: drop the classifier and the
        buffers we rebuild, resize bias tables trained with another window."""
        sd = {k: v for k, v in sd.items()
              if not (k.startswith('head.') or k.endswith('relative_position_index') or k.endswith('attn_mask'))}
        n = 2 * self.window_size - 1
        for k, v in sd.items():
            if k.endswith('relative_position_bias_table') and v.shape[0] != n * n:
                m = math.isqrt(v.shape[0])  # (m*m, heads) -> (1, heads, m, m) -> bicubic -> (n*n, heads)
                grid = v.T.reshape(1, -1, m, m).float()
                sd[k] = F.interpolate(grid, size=(n, n), mode='bicubic', align_corners=False)[0].flatten(1).T.to(v.dtype)
        return sd


def swin(name, **overrides):
    """Build a Swin preset: rgbx.swin('base') has window 12 for the 384 / 22K files;
    rgbx.swin('base', window_size=7) for the 224 files."""
    if name not in SWIN_PRESETS:
        raise ValueError(f"unknown Swin preset {name!r}; choose one of {sorted(SWIN_PRESETS)}")
    return SwinTransformer(**{**SWIN_PRESETS[name], **overrides})


# ----------------------------------------------------------------------------
# ViT of MAE (Dosovitskiy et al. ICLR 2021; He et al. "Masked Autoencoders Are
# Scalable Vision Learners", CVPR 2022). Module names are the checkpoint keys.
# ----------------------------------------------------------------------------

def sincos_pos_embed(dim, h, w):
    """Fixed 2-D sin-cos position embedding of MAE: (h*w, dim), half the channels
    encode the row, half the column, each as [sin(p w_k), cos(p w_k)], w_k = 10000^(-k/(dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing='ij')
    out = [torch.cat([torch.sin(p.flatten()[:, None] * omega), torch.cos(p.flatten()[:, None] * omega)], 1)
           for p in (cols, rows)]  # MAE's order: the first half encodes the column (grid[0] = w)
    return torch.cat(out, 1).float()


def resize_pos_embed(pos, grid, new_grid, extra=1):
    """Bicubic resize of a (1, extra + gh*gw, D) position embedding to a new grid; the
    first `extra` rows (cls token) are kept as they are."""
    if tuple(grid) == tuple(new_grid):
        return pos
    head, body = pos[:, :extra], pos[:, extra:]
    body = body.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    body = F.interpolate(body.float(), size=tuple(new_grid), mode='bicubic', align_corners=False).to(pos.dtype)
    return torch.cat([head, body.flatten(2).transpose(1, 2)], 1)  # (1, extra + h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA. forward(x: (B, T, D)) -> (B, T, D)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). (B, T, D) -> (B, T, D)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def vit_blocks(dim, depth, heads, mlp_ratio=4.0, drop_path_rate=0.0):
    """`depth` Blocks with stochastic depth rising linearly to drop_path_rate."""
    rates = torch.linspace(0, drop_path_rate, depth).tolist()
    return nn.ModuleList(Block(dim, heads, mlp_ratio, rates[i]) for i in range(depth))


VIT_PRESETS = {  # ViT Table 1
    'nano': dict(dim=64, depth=4, heads=4),  # demo and tests only
    'tiny': dict(dim=192, depth=12, heads=3),
    'small': dict(dim=384, depth=12, heads=6),
    'base': dict(dim=768, depth=12, heads=12),
    'large': dict(dim=1024, depth=24, heads=16),
}


class VisionTransformer(nn.Module):
    """ViT/16 with a cls token, as pre-trained by MAE, any input size.

    forward(img: (B, in_chans, H, W)) -> tokens (B, 1 + h*w, D) after the final `norm`,
    with (h, w) = (ceil(H/16), ceil(W/16)) (the image is zero-padded). The
    position embedding, stored for `img_size`, is resized bicubically (cls row
    kept) to the grid of each input.

    Driving it by hand (what prompt methods do between blocks):
        x, grid = model.embed(img)        # (B, 1 + N, D), (h, w)
        for blk in model.blocks:
            x = blk(prompt(x))
        x = model.norm(x)
    """

    def __init__(self, dim=768, depth=12, heads=12, mlp_ratio=4.0, patch_size=16, img_size=224,
                 drop_path_rate=0.0, in_chans=3):
        super().__init__()
        self.dim = dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size, norm=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.cat([torch.zeros(1, dim), sincos_pos_embed(dim, *self.grid)])[None],
                                      requires_grad=False)  # MAE: fixed sin-cos, cls row zeros
        self.blocks = vit_blocks(dim, depth, heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_transformer_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, img):
        """Patch tokens plus position embedding, cls token first: (B, 1 + h*w, D), (h, w)."""
        x = self.patch_embed(img)  # (B, h, w, D)
        grid = tuple(x.shape[1:3])
        pos = resize_pos_embed(self.pos_embed, self.grid, grid)  # (1, 1 + h*w, D)
        x = x.flatten(1, 2) + pos[:, 1:]  # (B, h*w, D)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], 1), grid

    def forward(self, img):
        x, _ = self.embed(img)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def adapt_checkpoint(self, sd):
        """MAE keys -> this model: drop the MAE decoder of the `_full` files and any
        classifier, resize `pos_embed` to this model's grid."""
        sd = {k: v for k, v in sd.items()
              if not k.startswith(('decoder_', 'mask_token', 'head.', 'fc_norm.'))}
        if 'pos_embed' in sd:
            n = sd['pos_embed'].shape[1] - 1
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"checkpoint pos_embed has {n} patch rows, not a square grid; "
                                 f"expected a (1, 1 + g*g, D) MAE position embedding")
            sd['pos_embed'] = resize_pos_embed(sd['pos_embed'], (side, side), self.grid)
        return sd


def vit(name, **overrides):
    """Build a ViT/16 preset: rgbx.vit('base') for mae_pretrain_vit_base.pth."""
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; choose one of {sorted(VIT_PRESETS)}")
    return VisionTransformer(**{**VIT_PRESETS[name], **overrides})


def _init_transformer_weights(m):
    """Initialisation of the official releases: trunc-normal(0.02) linears, zero biases, unit norms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------
# Loading official checkpoints
# ----------------------------------------------------------------------------

def read_checkpoint(path):
    """torch.load a checkpoint safely (weights_only) with a clear error when the
    file is missing, truncated or not a PyTorch file."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. The file is truncated, "
                           f"corrupted or not a PyTorch checkpoint; download or copy it again.") from None


def load_pretrained(model, path):
    """Load an official pretrained file into a backbone (or a model's `.backbone`).

    Reads the Microsoft Swin `.pth` and the MAE ViT `.pth` (also MAE's `_full`
    file, whose decoder is ignored) with weights_only=True; unwraps "model" or
    "state_dict"; lets the backbone's `adapt_checkpoint` drop classifier heads
    and rebuilt buffers and resize bias tables / `pos_embed`; then loads and
    raises an error listing every missing, unexpected or mis-shaped key. A
    backbone whose checkpoints legitimately lack some of its keys (a multi-modal
    encoder started from an RGB file) names them in `checkpoint_absent_keys(sd)`.
    Returns the model.
    """
    target = getattr(model, 'backbone', model)
    sd = read_checkpoint(path)
    for wrapper in ('model', 'state_dict'):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors (top-level keys: "
                         f"{list(sd)[:8] if isinstance(sd, dict) else type(sd).__name__})")
    sd = target.adapt_checkpoint(sd)
    own = target.state_dict()
    absent = target.checkpoint_absent_keys(sd) if hasattr(target, 'checkpoint_absent_keys') else set()
    missing = sorted(set(own) - set(sd) - absent)
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {path} does not fit {type(target).__name__}:\n"
            + (f"  missing keys ({len(missing)}): {missing}\n" if missing else '')
            + (f"  unexpected keys ({len(unexpected)}): {unexpected}\n" if unexpected else '')
            + (f"  shape mismatches: {shapes}\n" if shapes else '')
            + "Check that the preset (tiny/small/base/large) and the file belong together.")
    target.load_state_dict(sd, strict=False)  # only the declared `absent` keys keep their initial values
    return model


# ----------------------------------------------------------------------------
# Segmentation heads; each returns logits at the input size (B, K, H, W)
# ----------------------------------------------------------------------------

class SegFormerHead(nn.Module):
    """All-MLP decoder of SegFormer (Xie et al., NeurIPS 2021), as used by KTB (S1-S3).

    Per-stage linear C_i -> E, upsample to the 1/4 map, concat (4E, deepest
    first as in SegFormer), 1x1 conv 4E -> E (no bias) + BN + ReLU, dropout 0.1,
    1x1 conv E -> classes, bilinear to the input size.
    forward(feats: list of (B, C_i, H_i, W_i), size=(H, W)) -> (B, classes, H, W).
    """

    stride = 4

    def __init__(self, in_dims, embed_dim, num_classes, dropout=0.1):
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(c, embed_dim) for c in in_dims)
        self.linear_fuse = nn.Sequential(nn.Conv2d(len(in_dims) * embed_dim, embed_dim, 1, bias=False),
                                         nn.BatchNorm2d(embed_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, feats, size):
        h, w = feats[0].shape[-2:]
        x = [F.interpolate(lin(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(f.shape[0], -1, *f.shape[-2:]),
                           size=(h, w), mode='bilinear', align_corners=False)  # (B, E, h, w)
             for lin, f in zip(self.linear_c, feats)]
        x = self.linear_fuse(torch.cat(x[::-1], 1))  # (B, E, h, w)
        return resize_logits(self.linear_pred(self.dropout(x)), size, self.stride)


class SETRNaiveHead(nn.Module):
    """SETR-Naive head (Zheng et al., CVPR 2021), GoPT's Psi: LayerNorm, 1x1 conv
    D -> 256, BN, ReLU, 1x1 conv -> classes, bilinear x16 to the input size.
    forward(tokens: (B, h*w, D) without the cls token, grid=(h, w), size=(H, W)) -> (B, classes, H, W).
    """

    stride = 16

    def __init__(self, dim, num_classes, hidden=256):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.conv1 = nn.Conv2d(dim, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, tokens, grid, size):
        x = self.norm(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)  # (B, D, h, w)
        x = self.conv2(F.relu(self.bn(self.conv1(x))))
        return resize_logits(x, size, self.stride)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (Liu et al., CVPR 2022): dw 7x7 conv, LN, 4x MLP with GELU,
    layer scale, residual. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim, layer_scale=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        return x + (self.gamma * self.mlp(y)).permute(0, 3, 1, 2)


class ConvNeXtHead(nn.Module):
    """MultiMAE's ConvNeXt-style segmentation decoder (MaskMentor fine-tuning).

    Linear D_in -> 16 * C per token (4x4 sub-patches, C = 384 by default), laid
    out as a 1/4-resolution map, `depth` ConvNeXt blocks, 1x1 conv to classes,
    bilinear to the input size.
    forward(tokens: (B, h*w, D_in), grid=(h, w), size=(H, W)) -> (B, classes, H, W).
    """

    stride = 4

    def __init__(self, in_dim, num_classes, dim=384, depth=4, patch_size=16):
        super().__init__()
        self.sub = patch_size // self.stride  # sub-patches per side
        self.proj_dec = nn.Linear(in_dim, self.sub * self.sub * dim)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
        self.final_layer = nn.Conv2d(dim, num_classes, 1)

    def forward(self, tokens, grid, size):
        B, (h, w), s = tokens.shape[0], grid, self.sub
        x = self.proj_dec(tokens).view(B, h, w, s, s, -1)  # (B, h, w, s, s, C)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, h * s, w * s)  # (B, C, h*s, w*s)
        return resize_logits(self.final_layer(self.blocks(x)), size, self.stride)


# ----------------------------------------------------------------------------
# Baseline: early fusion with full fine-tuning (the reference line of the papers)
# ----------------------------------------------------------------------------

def backbone_from_name(name, **overrides):
    """'swin-base' -> rgbx.swin('base'), 'vit-large' -> rgbx.vit('large'), ..."""
    family, _, size = name.partition('-')
    if family not in ('swin', 'vit'):
        raise ValueError(f"unknown backbone {name!r}: use swin-<{'|'.join(SWIN_PRESETS)}> or vit-<{'|'.join(VIT_PRESETS)}>")
    return (swin if family == 'swin' else vit)(size, **overrides)


class EarlyFusion(nn.Module):
    """Baseline: RGB and X stacked as input channels of one backbone, all weights trained.

    The patch embedding is widened from 3 to 3 + Cx input channels after the
    pretrained weights are loaded; with x_channels = 0 the model sees RGB only
    (the RGB "foundation" of the papers). Swin gets a SegFormer head, ViT a
    SETR-Naive head. forward(rgb: (B, 3, H, W), x: (B, Cx, H, W), label=None)
    -> logits (B, K, H, W), or (loss, logits) with cross-entropy when label is given.
    """

    def __init__(self, backbone, num_classes, x_channels, head_dim=256):
        super().__init__()
        self.backbone, self.x_channels = backbone, x_channels
        proj = backbone.patch_embed.proj
        if x_channels:
            wide = nn.Conv2d(3 + x_channels, proj.out_channels, proj.kernel_size, proj.stride)
            with torch.no_grad():  # design choice: X filters start as the mean RGB filter, as in depth-aware fine-tuning
                wide.weight.copy_(torch.cat([proj.weight, proj.weight.mean(1, keepdim=True).expand(-1, x_channels, -1, -1)], 1))
                wide.bias.copy_(proj.bias)
            backbone.patch_embed.proj = wide
        if isinstance(backbone, SwinTransformer):
            self.head = SegFormerHead(backbone.dims, head_dim, num_classes)
        else:
            self.head = SETRNaiveHead(backbone.dim, num_classes, head_dim)

    def forward(self, rgb, x, label=None):
        img = torch.cat([rgb, x], 1) if self.x_channels else rgb
        size = img.shape[-2:]
        if isinstance(self.backbone, SwinTransformer):
            logits = self.head(self.backbone(img), size)
        else:
            grid = (-(-size[0] // 16), -(-size[1] // 16))
            logits = self.head(self.backbone(img)[:, 1:], grid, size)
        if label is None:
            return logits
        return F.cross_entropy(logits, label, ignore_index=255), logits


def build_early_fusion(backbone_name, num_classes, x_channels, pretrained=None, use_x=True, **overrides):
    """Early fusion (use_x=True) or RGB-only (use_x=False) baseline, fully trainable."""
    backbone = backbone_from_name(backbone_name, **overrides)
    if pretrained:
        load_pretrained(backbone, pretrained)
    return EarlyFusion(backbone, num_classes, x_channels if use_x else 0)


def build_rgb_only(backbone_name, num_classes, x_channels, pretrained=None, **overrides):
    """The RGB "foundation" baseline: the early-fusion model with X ignored."""
    return build_early_fusion(backbone_name, num_classes, x_channels, pretrained, use_x=False, **overrides)


# ----------------------------------------------------------------------------
# Building a method by name, and the trained part of a model
# ----------------------------------------------------------------------------

METHOD_FAMILY = {'ktb': 'swin', 'gopt': 'vit', 'maskmentor': 'vit'}  # the backbone each paper uses


def build_model(method, backbone, num_classes, x_channels, pretrained=None, **options):
    """Build `method` ('early_fusion', 'rgb_only', 'ktb', 'gopt', 'maskmentor') on
    `backbone` ('swin-base', 'vit-large', ...) through its `build_<method>` function."""
    builder = globals().get('build_' + method)
    if builder is None or method == 'model':
        raise ValueError(f"unknown method {method!r}; choose early_fusion, rgb_only, {', '.join(METHOD_FAMILY)}")
    if method in METHOD_FAMILY:
        family, _, size = backbone.partition('-')
        if family != METHOD_FAMILY[method]:
            raise ValueError(f"{method} is built on a {METHOD_FAMILY[method]} backbone, not {backbone!r}: "
                             f"use --backbone {METHOD_FAMILY[method]}-base (or -large)")
        backbone = size
    return builder(backbone, num_classes, x_channels, pretrained=pretrained, **options)


def trainable_state(model):
    """What training changes: every parameter that requires grad and every
    persistent buffer (BatchNorm statistics). {name: tensor}."""
    state = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


def frozen_fingerprint(model):
    """SHA-1 of the frozen parameters (names and bytes): a trained checkpoint holds
    only the trained part, so this checks it is joined with the same frozen weights."""
    h = hashlib.sha1()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            h.update(n.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_trained(model, state, source='checkpoint'):
    """Load a `trainable_state` (or a full state dict) into `model`, raising an
    error that lists every missing or unexpected key."""
    expected = set(trainable_state(model))
    full = set(model.state_dict())
    keys = set(state)
    if keys != expected and keys != full:
        missing, unexpected = sorted(expected - keys), sorted(keys - full)
        raise ValueError(f"{source} does not fit this model: missing {missing[:20]}{'...' if len(missing) > 20 else ''}, "
                         f"unexpected {unexpected[:20]}{'...' if len(unexpected) > 20 else ''}. Build the model with the "
                         f"method, backbone and options the checkpoint was trained with.")
    model.load_state_dict(state, strict=keys == full)
    return model


# ----------------------------------------------------------------------------
# MaskMentor (Masked self-teaching for missing-modality RGB-D segmentation,
# ACM MM 2024) on a MultiMAE-style multi-modal ViT (Bachmann et al., ECCV 2022).
#
# Pre-training (MaskMentorPretrain): K = 3 modalities (RGB, depth, semantic
# map), M2IM masking (Alg. 1: modality-level, then MAE patch-level), one MIM
# decoder per modality, and STTP (Sec. 3.4): the same network is trained as a
# teacher on complete modalities and as a student on M2IM input, the student
# also matching the teacher's output tokens. Fine-tuning (MaskMentorSeg, Sec.
# 3.5): the decoders are dropped, a ConvNeXt head is added, and the whole
# network is trained with randomly missing modalities, so that one model serves
# RGB-D, RGB-only and depth-only input (Table 2).
#
# Token layout: an input adapter turns each modality into a (B, h, w, D) map;
# modality tokens are stacked as (B, K, N, D), N = h*w, and flattened
# modality-major to (B, K*N, D); the encoder appends one global token last.
# ----------------------------------------------------------------------------

def m2im_keep(num_modalities, p_m=0.5, generator=None):
    """MaskMentor Alg. 1, lines 1-16: modality-level masking of one sample.

    Returns a (num_modalities,) bool tensor, True = modality kept (in O); at
    least one modality is always kept. Random draws come from `generator`, or
    from torch's global RNG when it is None.
    """
    if num_modalities < 1 or not 0.0 <= p_m <= 1.0:
        raise ValueError(f"m2im_keep needs num_modalities >= 1 and 0 <= p_m <= 1, got {num_modalities}, {p_m}")
    kept, g = torch.zeros(num_modalities, dtype=torch.bool), False  # line 1: O = {}, g = 0 (the paper's "q" is g)
    order = torch.randperm(num_modalities, generator=generator).tolist()  # line 2: Q <- RandomSort(Q)
    for k in order[:-1]:  # line 3: for k = 1 .. K-1
        if torch.rand((), generator=generator) >= p_m:  # lines 4-5: v ~ U[0, 1], v >= p_m
            kept[k], g = True, True  # line 6: O <- O + {X_k}, g <- 1
    if not g:  # line 9
        kept[order[-1]] = True  # line 10: the last modality survives when all others were masked
    elif torch.rand((), generator=generator) >= p_m:  # lines 12-13
        kept[order[-1]] = True  # line 14
    return kept


def m2im_keep_batch(batch, num_modalities, p_m=0.5, device=None):
    """An independent `m2im_keep` draw per sample: (batch, num_modalities) bool, True = kept."""
    return torch.stack([m2im_keep(num_modalities, p_m) for _ in range(batch)]).to(device)


def visible_counts(keep, budget):
    """MultiMAE's token budget: each sample shows exactly `budget` tokens, split
    between its kept modalities by a Dirichlet(1) draw (normalised Exp(1) draws).

    keep: (B, K) bool -> (B, K) long counts, each row summing to `budget`, 0 for
    a dropped modality. Rounding the cumulative shares keeps the sum exact.
    """
    # design choice: MultiMAE's Dirichlet(1) split of one fixed budget, so that every sample has T tokens
    share = torch.empty(keep.shape, device=keep.device).exponential_() * keep  # (B, K)
    cum = (share.cumsum(1) / share.sum(1, keepdim=True) * budget).round().long()  # (B, K)
    return cum.diff(dim=1, prepend=cum.new_zeros(keep.shape[0], 1))


def random_masking(counts, num_tokens):
    """MAE patch masking (MaskMentor Alg. 1, lines 17-19) of K modality grids at once:
    per-sample shuffling by argsort of random noise, per modality.

    counts: (B, K) visible tokens per sample and modality, every row summing to T.
    Returns ids_keep (B, T): flat indices into the (B, K*N) modality-major tokens
    of the visible ones; ids_restore (B, K*N): the place of every token in the
    visible-first order (< T means visible), for `unshuffle`; mask (B, K, N)
    bool, True = masked.
    """
    B, K = counts.shape
    total = counts.sum(1)
    if (total != total[0]).any():
        raise ValueError(f"every sample must show the same number of tokens, got {total.tolist()}")
    rank = torch.rand(B, K, num_tokens, device=counts.device).argsort(-1).argsort(-1)  # (B, K, N) noise rank per modality
    mask = rank >= counts[..., None]  # (B, K, N): the counts[b, k] lowest-noise tokens stay visible
    ids_shuffle = mask.flatten(1).int().argsort(dim=1, stable=True)  # (B, K*N): visible tokens first, in grid order
    return ids_shuffle[:, :int(total[0])], ids_shuffle.argsort(1), mask


def unshuffle(visible, mask_token, ids_restore):
    """MAE's un-shuffle: put visible tokens back at their grid places and fill
    the masked places with `mask_token`. visible (B, T, D), mask_token (1, 1, D),
    ids_restore (B, L) (any subset of `random_masking`'s columns) -> (B, L, D)."""
    T = visible.shape[1]
    out = torch.gather(visible, 1, ids_restore.clamp(max=T - 1)[..., None].expand(-1, -1, visible.shape[-1]))
    return torch.where((ids_restore < T)[..., None], out, mask_token.to(out.dtype))


def patchify(img, patch, value=0.0):
    """(B, C, H, W) -> (B, N, patch*patch, C) in token order, the map padded at
    the bottom/right with `value` to a multiple of `patch` (as the input adapters pad)."""
    img = F.pad(img, (0, (-img.shape[-1]) % patch, 0, (-img.shape[-2]) % patch), value=value)
    B, C, H, W = img.shape
    x = img.view(B, C, H // patch, patch, W // patch, patch)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, -1, patch * patch, C)  # (B, h*w, p*p, C)


def sttp_phase(step, warmup_steps, teacher_iters=3):
    """STTP schedule (MaskMentor Sec. 3.4-3.5) as a pure function of the global
    iteration: 'mim' during the warm-up (complete-modality MIM), then cycles of
    `teacher_iters` 'teacher' iterations followed by one 'student' iteration."""
    if step < 0 or warmup_steps < 0 or teacher_iters < 0:
        raise ValueError(f"sttp_phase needs step, warmup_steps, teacher_iters >= 0, got {step}, {warmup_steps}, {teacher_iters}")
    if step < warmup_steps:
        return 'mim'
    return 'teacher' if (step - warmup_steps) % (teacher_iters + 1) < teacher_iters else 'student'


def sttp_batch_index(step, warmup_steps, teacher_iters=3):
    """Which batch iteration `step` trains on under the paper's reading "for each
    input batch, three teacher iterations then one student iteration": one new
    batch per warm-up step, then one batch per STTP cycle of teacher_iters + 1 steps."""
    sttp_phase(step, warmup_steps, teacher_iters)  # checks the arguments
    if step < warmup_steps:
        return step
    return warmup_steps + (step - warmup_steps) // (teacher_iters + 1)


class InputAdapter(nn.Module):
    """MultiMAE input adapter of an image-like modality (RGB, depth, HHA): a
    stride-p patch embedding plus a learnable modality embedding.
    forward(img: (B, in_chans, H, W)) -> (B, ceil(H/p), ceil(W/p), D), position added by the encoder."""

    def __init__(self, in_chans, dim, patch):
        super().__init__()
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(in_chans, dim, patch, norm=False)
        self.modality_embed = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.modality_embed, std=0.02)

    def forward(self, img):
        if img.ndim != 4 or img.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, H, W) input, got {tuple(img.shape)}")
        return self.patch_embed(img)


class SemSegInputAdapter(InputAdapter):
    """MultiMAE semantic-map input adapter: the label map is taken at 1/`stride`
    resolution (nearest), each class index becomes a learned `class_dim` vector
    (ignore 255 -> an extra "unlabelled" row), then a patch conv of patch/stride.
    forward(label: (B, H, W) int64, 0..C-1 or 255) -> (B, ceil(H/p), ceil(W/p), D)."""

    def __init__(self, num_classes, dim, patch, stride=4, class_dim=64):
        super().__init__(class_dim, dim, patch // stride)
        self.num_classes, self.stride = num_classes, stride
        self.class_embed = nn.Embedding(num_classes + 1, class_dim)

    def downsample(self, label):
        """(B, H, W) -> (B, ceil(H/stride), ceil(W/stride)), the map the patches cut."""
        if label.ndim != 3 or label.dtype != torch.long:
            raise ValueError(f"expected a (B, H, W) int64 semantic map, got {tuple(label.shape)} {label.dtype}")
        if not ((label >= 0) & (label < self.num_classes) | (label == 255)).all():
            raise ValueError(f"semantic map values must be 0..{self.num_classes - 1} or 255 (ignore)")
        return label[:, ::self.stride, ::self.stride]

    def forward(self, label):
        lab = self.downsample(label)
        lab = torch.where(lab == 255, self.num_classes, lab)
        return super().forward(self.class_embed(lab).permute(0, 3, 1, 2))  # (B, class_dim, H/s, W/s) -> (B, h, w, D)


class MultiModalViT(nn.Module):
    """MultiMAE-style multi-modal ViT encoder, any input size.

    One input adapter per modality (`adapters`, a dict name -> InputAdapter), a
    fixed 2-D sin-cos position embedding shared by all modalities (stored for
    `img_size`, resized bicubically to each grid), a learnable global token
    appended last, ViT blocks and a final norm; block names are MAE's.
        tokens, grid = enc.embed({'rgb': rgb, 'depth': x})  # (B, M, N, D), (h, w)
        out = enc(tokens.flatten(1, 2))                      # (B, M*N + 1, D), global token last
    """

    def __init__(self, adapters, dim=768, depth=12, heads=12, mlp_ratio=4.0, patch_size=16, img_size=224,
                 drop_path_rate=0.0):
        super().__init__()
        self.dim, self.patch_size = dim, patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.adapters = nn.ModuleDict(adapters)
        self.global_token = nn.Parameter(torch.zeros(1, 1, dim))
        # design choice: the fixed sin-cos table is rebuilt, never loaded (MAE's pos_embed holds the same values)
        self.register_buffer('pos_embed', sincos_pos_embed(dim, *self.grid)[None], persistent=False)  # (1, N0, D)
        self.blocks = vit_blocks(dim, depth, heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_transformer_weights)
        nn.init.normal_(self.global_token, std=0.02)

    def embed(self, inputs):
        """{name: input} -> tokens (B, M, N, D) in the order of `inputs` (adapter
        output + position + modality embedding), and the grid (h, w)."""
        unknown = set(inputs) - set(self.adapters)
        if unknown:
            raise ValueError(f"no input adapter for {sorted(unknown)}; this encoder has {list(self.adapters)}")
        maps = {n: self.adapters[n](v) for n, v in inputs.items()}  # each (B, h, w, D)
        grids = {tuple(m.shape[1:3]) for m in maps.values()}
        if len(grids) != 1:
            raise ValueError(f"modalities give different token grids {sorted(grids)}; pass inputs of one size")
        grid = grids.pop()
        pos = resize_pos_embed(self.pos_embed, self.grid, grid, extra=0)  # (1, N, D)
        tokens = [m.flatten(1, 2) + pos + self.adapters[n].modality_embed for n, m in maps.items()]  # each (B, N, D)
        return torch.stack(tokens, 1), grid  # (B, M, N, D)

    def forward(self, tokens):
        x = torch.cat([tokens, self.global_token.expand(tokens.shape[0], -1, -1)], 1)  # (B, T + 1, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def checkpoint_absent_keys(self, sd):
        """Our keys that a checkpoint legitimately lacks: everything outside the
        MAE encoder (the non-RGB adapters, the modality embeddings) when `sd` is
        an adapted MAE file, nothing for a MaskMentor checkpoint."""
        if any(k.startswith('adapters.depth.') for k in sd):
            return set()
        return {k for k in self.state_dict()
                if k.startswith('adapters.') and not k.startswith('adapters.rgb.patch_embed.')}

    def adapt_checkpoint(self, sd):
        """Checkpoint -> this encoder, for `load_pretrained`. Two sources:
        - an MAE ViT file: blocks.* and norm.* as they are, patch_embed.* -> the
          RGB adapter, cls_token -> global_token (design choice: both are the one
          learned summary token without a position); pos_embed and the MAE decoder dropped;
        - a MaskMentor model state dict (pre-training or fine-tuning, keys
          'backbone.*'): the encoder is carried over, decoders / head / step
          counter and the adapters this encoder lacks (the semantic map) are dropped.
        The keys of `checkpoint_absent_keys` keep this model's initial values."""
        if any(k.startswith('backbone.') for k in sd):
            sd = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
            sd = {k: v for k, v in sd.items()
                  if not k.startswith('adapters.') or k.split('.')[1] in self.adapters}
        else:
            sd = {('adapters.rgb.' + k if k.startswith('patch_embed.') else 'global_token' if k == 'cls_token' else k): v
                  for k, v in sd.items()
                  if not k.startswith(('decoder_', 'mask_token', 'head.', 'fc_norm.', 'pos_embed'))}
        return sd


class CrossAttention(nn.Module):
    """Multi-head cross-attention through SDPA (MultiMAE output adapter):
    forward(query: (B, Tq, D), context: (B, Tc, D)) -> (B, Tq, D)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query, context):
        B, Tq, D = query.shape
        q = self.q(query).view(B, Tq, self.heads, -1).transpose(1, 2)  # (B, nh, Tq, hd)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, Tc, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, Tq, hd)
        return self.proj(x.transpose(1, 2).reshape(B, Tq, D))  # (B, Tq, D)


class MIMDecoder(nn.Module):
    """MIM head of one modality (MaskMentor Sec. 3.3, MultiMAE's spatial output adapter).

    Encoder tokens are projected D -> dim; the context (all visible tokens plus
    the global token) gets position + modality embeddings; this modality's full
    query grid is its visible tokens put back in place with mask tokens in the
    gaps (`unshuffle`); one cross-attention from the queries to the context
    (+ MLP) gives the output tokens (the "output token embeddings" of Sec. 3.3,
    STTP's token targets); `depth` transformer blocks and a linear layer give
    the patch predictions.
    forward(x: (B, T + 1, D), ids_keep (B, T), ids_restore (B, K*N), grid) ->
        (pred (B, N, out_dim), tokens (B, N, dim)).
    """

    def __init__(self, index, num_modalities, in_dim, dim, heads, depth, out_dim, grid):
        super().__init__()
        self.index, self.grid = index, grid
        self.proj_context = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_embed = nn.Embedding(num_modalities, dim)
        self.register_buffer('pos_embed', sincos_pos_embed(dim, *grid)[None], persistent=False)  # (1, N0, dim)
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.context_norm = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, heads)
        self.out_norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out_proj = nn.Linear(dim, out_dim)
        self.apply(_init_transformer_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.modality_embed.weight, std=0.02)

    def attend(self, x, ids_keep, ids_restore, grid):
        """The output tokens of this modality's grid: (B, N, dim)."""
        B = x.shape[0]
        x = self.proj_context(x)  # (B, T + 1, dim)
        visible, glob = x[:, :-1], x[:, -1:]
        pos = resize_pos_embed(self.pos_embed, self.grid, grid, extra=0)[0]  # (N, dim)
        N = pos.shape[0]
        embed = (pos[None] + self.modality_embed.weight[:, None]).flatten(0, 1)  # (K*N, dim), modality-major
        context = torch.cat([visible + embed[ids_keep], glob], 1)  # (B, T + 1, dim)
        own = ids_restore.view(B, -1, N)[:, self.index]  # (B, N): this modality's columns
        query = unshuffle(visible, self.mask_token, own) + embed[self.index * N:(self.index + 1) * N]  # (B, N, dim)
        query = query + self.cross_attn(self.query_norm(query), self.context_norm(context))
        return query + self.mlp(self.out_norm(query))

    def forward(self, x, ids_keep, ids_restore, grid):
        tokens = y = self.attend(x, ids_keep, ids_restore, grid)
        for blk in self.blocks:
            y = blk(y)
        return self.out_proj(y), tokens


class MaskMentorModel(nn.Module):
    """What both MaskMentor stages share: the parameter counts of the contract."""

    def param_counts(self):
        counts = {'trainable': sum(p.numel() for p in self.parameters() if p.requires_grad),
                  'total': sum(p.numel() for p in self.parameters())}
        return {**counts, **{name: sum(p.numel() for p in child.parameters()) for name, child in self.named_children()}}


class MaskMentorPretrain(MaskMentorModel):
    """MaskMentor pre-training: M2IM (Alg. 1) + STTP (Sec. 3.4), K = 3 modalities.

    forward(rgb (B, 3, H, W), x (B, Cx, H, W) depth, label (B, H, W) int64
    semantic map (255 = ignore), step=None) -> (loss, None), the objective of
    `sttp_phase(step, warmup_steps, teacher_iters)`:
    - 'mim' (warm-up) and 'teacher': complete modalities, patch masking only
      (`budget` visible tokens per sample, split by Dirichlet(1)), pixel
      reconstruction of the masked patches of every modality;
    - 'student': M2IM input (modality masking per sample, then patch masking
      of the kept modalities with the same budget); a dropped modality has all
      its patches masked, so its loss covers the whole map. Pixel losses plus
      `token_weight` * the mean over modalities and grid places of
      1 - cos(student token, teacher token). The teacher's tokens come from a
      no-grad pass of the same network, within the student iteration, on the
      same batch with complete modalities and a fresh patch mask; the tokens
      compared are the MIM decoders' output tokens (after the cross-attention,
      the "output token embeddings" of Sec. 3.3), which exist at every grid
      place whatever either side saw, so the student also predicts the teacher's
      tokens of the modality it lost. Design choice: all grid places count.
    Pixel losses (MultiMAE): RGB MSE on the (dataset-)normalised pixels, depth
    L1 on per-image standardised depth, semantic map cross-entropy at 1/4
    resolution; each a mean over the masked pixels of its modality, summed.

    Schedule. The paper trains, "for each input batch", the teacher for three
    iterations and then the student for one: the same batch for a whole cycle.
    The phase is a pure function of the global step; a loop following the paper
    feeds batch `sttp_batch_index(step, ...)` at each step (the same batch four
    times per cycle). A loop that feeds a new batch every step (train.py as it
    is) keeps the 3:1 teacher:student update ratio and the student's token
    targets still come from the student's own images. When `step` is None the
    model counts its own training forward calls in the `steps_done` buffer
    (saved with the model, so resume is exact); with gradient accumulation pass `step`.
    Masking is the objective, so this model draws it from the global RNG in train and eval mode alike.
    """

    pretraining = True  # train.py passes the global step and does not evaluate: there are no logits

    def __init__(self, backbone, num_classes, decoder_dim=256, decoder_heads=8, decoder_depth=2, mask_ratio=5 / 6,
                 p_m=0.5, warmup_steps=0, teacher_iters=3, token_weight=1.0):
        super().__init__()
        if list(backbone.adapters) != ['rgb', 'depth', 'semseg']:
            raise ValueError(f"pre-training needs the adapters rgb, depth, semseg, got {list(backbone.adapters)}")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.backbone = backbone
        self.mask_ratio, self.p_m, self.token_weight = mask_ratio, p_m, token_weight
        self.warmup_steps, self.teacher_iters = warmup_steps, teacher_iters
        K = len(backbone.adapters)
        outputs = {'rgb': 3, 'depth': backbone.adapters['depth'].in_chans, 'semseg': num_classes}  # channels predicted
        self.decoders = nn.ModuleDict({
            name: MIMDecoder(k, K, backbone.dim, decoder_dim, decoder_heads, decoder_depth,
                             adapter.patch_embed.patch ** 2 * outputs[name], backbone.grid)
            for k, (name, adapter) in enumerate(backbone.adapters.items())})
        self.register_buffer('steps_done', torch.zeros((), dtype=torch.long))

    def budget(self, num_tokens):
        """Visible tokens per sample: (1 - mask_ratio) of all K*N tokens (MultiMAE:
        98 of 3 x 196); at most N, so that a single kept modality can hold them."""
        K = len(self.decoders)
        T = round((1 - self.mask_ratio) * K * num_tokens)
        if not 1 <= T <= num_tokens:
            raise ValueError(f"mask_ratio {self.mask_ratio:.3f} leaves {T} visible tokens of {K} x {num_tokens}; "
                             f"need 1..{num_tokens} (mask_ratio >= {1 - 1 / K:.3f})")
        return T

    def reconstruct(self, inputs, keep):
        """Encode the visible tokens of `keep`'s modalities and decode every modality.
        inputs {name: input}, keep (B, K) bool -> ({name: (pred, tokens)}, mask (B, K, N))."""
        tokens, grid = self.backbone.embed(inputs)  # (B, K, N, D)
        B, K, N, D = tokens.shape
        ids_keep, ids_restore, mask = random_masking(visible_counts(keep, self.budget(N)), N)
        x = torch.gather(tokens.flatten(1, 2), 1, ids_keep[..., None].expand(-1, -1, D))  # (B, T, D)
        x = self.backbone(x)  # (B, T + 1, D)
        return {name: dec(x, ids_keep, ids_restore, grid) for name, dec in self.decoders.items()}, mask

    def pixel_loss(self, name, pred, inp, masked):
        """MultiMAE's loss of one modality over its masked patches.
        pred (B, N, p*p*C), inp the modality's input, masked (B, N) bool -> scalar."""
        adapter = self.backbone.adapters[name]
        p = adapter.patch_embed.patch
        if name == 'semseg':  # design choice (MultiMAE): cross-entropy at the adapter's 1/4 resolution
            target = patchify(adapter.downsample(inp)[:, None], p, 255)[..., 0]  # (B, N, p*p)
            logits = pred.reshape(target.numel(), -1)  # (B*N*p*p, classes)
            loss = F.cross_entropy(logits, target.flatten(), ignore_index=255, reduction='none').view(target.shape)  # (B, N, p*p)
            weight = (target != 255).float()
        else:
            if name == 'depth':  # design choice: standardised per image and channel (MultiMAE: per image)
                inp = (inp - inp.mean((2, 3), keepdim=True)) / inp.std((2, 3), keepdim=True).clamp(min=1e-6)
            target = patchify(inp, p)  # (B, N, p*p, C)
            err = pred.view(target.shape) - target  # (B, N, p*p, C)
            # design choice: plain MSE on the dataset-normalised RGB (not MAE's per-patch normalisation)
            loss = (err.square() if name == 'rgb' else err.abs()).mean(-1)  # (B, N, p*p)
            weight = patchify(torch.ones_like(inp[:, :1]), p)[..., 0]  # (B, N, p*p), 0 on the padding
        weight = weight * masked[..., None]
        return (loss * weight).sum() / weight.sum().clamp(min=1)

    def losses(self, rgb, x, label, phase):
        """The terms of `phase`'s objective: {'rgb', 'depth', 'semseg'[, 'token']} -> scalars."""
        inputs = {'rgb': rgb, 'depth': x, 'semseg': label}
        if phase not in ('mim', 'teacher', 'student'):
            raise ValueError(f"phase must be 'mim', 'teacher' or 'student', not {phase!r}")
        keep = torch.ones(rgb.shape[0], len(inputs), dtype=torch.bool, device=rgb.device)  # complete modalities
        if phase == 'student':
            with torch.no_grad():  # the teacher: complete modalities, patch masking only; its tokens carry no gradient
                teacher, _ = self.reconstruct(inputs, keep)
            keep = m2im_keep_batch(rgb.shape[0], len(inputs), self.p_m, rgb.device)
        outs, mask = self.reconstruct(inputs, keep)
        terms = {name: self.pixel_loss(name, outs[name][0], inputs[name], mask[:, k]) for k, name in enumerate(inputs)}
        if phase == 'student':
            # design choice: token loss = mean over modalities and grid places, weight token_weight (1)
            cos = torch.stack([F.cosine_similarity(outs[n][1], teacher[n][1], dim=-1) for n in inputs])  # (K, B, N)
            terms['token'] = self.token_weight * (1 - cos).mean()
        return terms

    def forward(self, rgb, x, label=None, step=None):
        if label is None:
            raise ValueError("MaskMentor pre-training reconstructs the semantic map too: pass label (B, H, W)")
        if step is None:
            step = int(self.steps_done)
            if self.training:
                self.steps_done += 1
        phase = sttp_phase(step, self.warmup_steps, self.teacher_iters)
        return sum(self.losses(rgb, x, label, phase).values()), None


class MaskMentorSeg(MaskMentorModel):
    """MaskMentor fine-tuning (Sec. 3.5): the pre-trained encoder (RGB and depth
    adapters) and MultiMAE's ConvNeXt decoder, one model for RGB-D, RGB-only and
    depth-only input (Table 2).

    forward(rgb (B, 3, H, W), x (B, Cx, H, W), label=None, present=None) ->
    logits (B, K, H, W), or (cross-entropy loss, logits) when label is given.
    Which modalities a sample has: `present`, a tuple of names out of
    ('rgb', 'depth') for the whole batch; when None, a modality whose tensor is
    exactly all zeros for a sample is absent for that sample, which is how
    eval.py's --modality rgb|x (it zeroes the missing input) reaches the model.
    An absent modality contributes no token: samples are grouped by the set of
    modalities they have, each group is encoded with those tokens only, and the
    head sees, per patch place, the mean of the present modalities' output
    tokens (design choice; MultiMAE concatenates them, which needs every input).
    Training drops modalities per sample with M2IM's rule (`m2im_keep`,
    p = modality_drop; 0 trains on complete input) among the present ones.
    """

    # an absent or dropped modality's adapter gets no gradient in a step where no sample has it
    find_unused_parameters = True

    def __init__(self, backbone, num_classes, head_dim=384, head_depth=4, modality_drop=0.5):
        super().__init__()
        if list(backbone.adapters) != ['rgb', 'depth']:
            raise ValueError(f"fine-tuning needs the adapters rgb, depth, got {list(backbone.adapters)}")
        self.backbone, self.modality_drop = backbone, modality_drop
        self.head = ConvNeXtHead(backbone.dim, num_classes, head_dim, head_depth, backbone.patch_size)

    def presence(self, inputs, present):
        """(B, M) bool, True = the sample has the modality."""
        names = list(inputs)
        B = inputs[names[0]].shape[0]
        if present is not None:
            if isinstance(present, str) or not present or set(present) - set(names):
                raise ValueError(f"present must be a non-empty tuple out of {names}, got {present!r}")
            return torch.tensor([n in present for n in names], device=inputs[names[0]].device).expand(B, -1)
        # design choice: a modality that is exactly all zeros for a sample (eval.py's missing input) is absent
        has = torch.stack([v.flatten(1).ne(0).any(1) for v in inputs.values()], 1)  # (B, M)
        if not has.any(1).all():
            raise ValueError(f"samples {(~has.any(1)).nonzero()[:, 0].tolist()} have no modality: all inputs are zeros")
        return has

    def features(self, inputs, keep):
        """Mean output token of the kept modalities per place: (B, N, D), and the grid."""
        patterns, group = keep.unique(dim=0, return_inverse=True)
        feats, order = [], []
        for i, pattern in enumerate(patterns.tolist()):  # at most 2^M - 1 groups
            idx = (group == i).nonzero()[:, 0]
            tokens, grid = self.backbone.embed({n: v[idx] for (n, v), k in zip(inputs.items(), pattern) if k})  # (b, m, N, D)
            y = self.backbone(tokens.flatten(1, 2))[:, :-1]  # (b, m*N, D), global token dropped
            feats.append(y.view(tokens.shape).mean(1))  # (b, N, D)
            order.append(idx)
        return torch.cat(feats)[torch.cat(order).argsort()], grid

    def forward(self, rgb, x, label=None, present=None):
        inputs = {'rgb': rgb, 'depth': x}
        keep = self.presence(inputs, present)
        if self.training and self.modality_drop > 0:  # design choice: M2IM's rule drops modalities in fine-tuning
            drop = keep & m2im_keep_batch(rgb.shape[0], len(inputs), self.modality_drop, rgb.device)
            keep = torch.where(drop.any(1, keepdim=True), drop, keep)
        feats, grid = self.features(inputs, keep)  # design choice: mean of the present modalities' tokens
        logits = self.head(feats, grid, rgb.shape[-2:])
        if label is None:
            return logits
        return F.cross_entropy(logits, label, ignore_index=255), logits


def build_maskmentor(backbone_name, num_classes, x_channels, pretrained=None, stage='finetune', img_size=224,
                     drop_path_rate=0.0, decoder_dim=256, decoder_heads=8, decoder_depth=2, mask_ratio=5 / 6, p_m=0.5,
                     warmup_steps=0, teacher_iters=3, token_weight=1.0, head_dim=384, head_depth=4,
                     modality_drop=0.5, freeze_backbone=False, **overrides):
    """MaskMentor on a ViT preset ('base' = ViT-B/16; `overrides` change dim, depth, heads, mlp_ratio).

    stage='pretrain': MaskMentorPretrain (adapters rgb, depth, semseg; options
    decoder_*, mask_ratio, p_m, warmup_steps, teacher_iters, token_weight).
    stage='finetune': MaskMentorSeg (adapters rgb, depth; options head_*,
    modality_drop, freeze_backbone; the paper trains the whole network).
    `pretrained`: an MAE ViT file (encoder blocks and RGB patch embedding), or,
    for fine-tuning, a MaskMentor pre-training checkpoint (its encoder; decoders
    and the semantic-map adapter are dropped), both through `load_pretrained`.
    """
    if stage not in ('pretrain', 'finetune'):
        raise ValueError(f"stage must be 'pretrain' or 'finetune', not {stage!r}")
    if backbone_name not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {backbone_name!r}; choose one of {sorted(VIT_PRESETS)}")
    if x_channels < 1:
        raise ValueError("MaskMentor is an RGB-D method: x_channels must be >= 1")
    cfg = {**VIT_PRESETS[backbone_name], **overrides}
    patch = 16
    adapters = {'rgb': InputAdapter(3, cfg['dim'], patch), 'depth': InputAdapter(x_channels, cfg['dim'], patch)}
    if stage == 'pretrain':
        adapters['semseg'] = SemSegInputAdapter(num_classes, cfg['dim'], patch)
    backbone = MultiModalViT(adapters, patch_size=patch, img_size=img_size, drop_path_rate=drop_path_rate, **cfg)
    if stage == 'pretrain':
        model = MaskMentorPretrain(backbone, num_classes, decoder_dim, decoder_heads, decoder_depth, mask_ratio, p_m,
                                   warmup_steps, teacher_iters, token_weight)
    else:
        model = MaskMentorSeg(backbone, num_classes, head_dim, head_depth, modality_drop)
    if pretrained:
        load_pretrained(model, pretrained)
    if stage == 'finetune' and freeze_backbone:
        model.backbone.requires_grad_(False)
    return model
