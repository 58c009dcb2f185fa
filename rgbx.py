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
        bias = bias.view(N_, N_, self.heads).permute(2, 0, 1).to(x.dtype)  # (heads, N, N)
        qkv = self.qkv(x).view(B, nW, N, 3, self.heads, C // self.heads).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, heads, N, d)
        if mask is None:  # one bias for every window
            q, k, v = qkv.flatten(1, 2).unbind(0)  # each (B*nW, heads, N, d)
            bias = bias.expand(B * nW, -1, -1, -1)  # (B*nW, heads, N, N), a view
        else:  # a bias per window: windows join the heads axis, the batch axis stays a view
            q, k, v = qkv.reshape(3, B, nW * self.heads, N, -1).unbind(0)  # each (B, nW*heads, N, d)
            bias = (bias + mask.to(x.dtype)).flatten(0, 1).expand(B, -1, -1, -1)  # (B, nW*heads, N, N)
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


SWIN_PRESETS = {  # embed dim, depths, heads (Swin Table 1)
    'tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24)),
    'small': dict(embed_dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24)),
    'base': dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32)),
    'large': dict(embed_dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48)),
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
    """Build a Swin preset: rgbx.swin('base', window_size=12) for the 384 / 22K files."""
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


VIT_PRESETS = {  # ViT Table 1
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
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, rates[i]) for i in range(depth))
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
    raises an error listing every missing, unexpected or mis-shaped key.
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
    missing = sorted(set(own) - set(sd))
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
    target.load_state_dict(sd)
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
