"""rgbx: reference implementations of RGB+X semantic segmentation methods.

One file of models, readable beside the papers (training machinery, evaluation and
data live in train.py, eval.py and data.py):

- Foundations: the Swin Transformer (Liu et al., ICCV 2021) and the ViT of MAE
  (He et al., CVPR 2022), hand-written so that they load the official
  checkpoints, run at any input size and expose the seams the methods need;
  `load_pretrained`; the SegFormer, SETR-Naive and ConvNeXt segmentation heads.
- Baselines: early fusion with full fine-tuning, and RGB only.
- KTB (MAPA prompting and adapters, DSCF, MMST) on a frozen Swin.
- GoPT (CUP and ACP grouping prompters, eq. 3-15) on a frozen MAE ViT, and its VPT baselines.
- MaskMentor (M2IM, Alg. 1; STTP) on a MultiMAE-style multi-modal ViT.
- Checkpoint conversion beside each model (`convert_checkpoint`, pure dict -> dict functions
  per source format) and `load_pretrained`; the interface a trainer uses (`RGBXModel`); each
  method's typed config and recipe beside its builder; building a method by name
  (`build_model`, `resolve_options`); random draws through `draws(policy)` (`DrawPolicy`).

Layout conventions: images are (B, C, H, W) float tensors; Swin keeps its token
maps channels-last as (B, H, W, C) (LayerNorm and Linear act on the last axis,
windows are plain reshapes); ViT tokens are (B, 1 + N, D) with the cls token first.
"""
import contextlib
import hashlib
import math
import os
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------

class DrawPolicy:
    """Where a model's per-sample random draws and loss denominators come from: this
    default is one process and its own batch, drawn as plain torch draws.

    Every per-sample draw of the models (dropout masks, stochastic depth, KTB's MMST
    masking, GoPT's Gumbel noise, MaskMentor's modality and patch masks) goes through
    `draw`, every mean over a batch's items divides by `count`, and OHEM ranks the
    losses of `gather`. A data-parallel trainer enters `draws` with a policy that
    draws for the global batch and keeps this process's rows, counts globally and
    gathers globally (train.py's `GlobalBatch`), so that N processes compute what one
    process computes at the global batch (docs/distributed.md). Models never talk to
    other processes themselves.
    """

    def draw(self, draw, n, dim=0):
        """`draw(n)`: a random tensor with n rows along `dim`, one per sample of this batch."""
        return draw(n)

    def count(self, n):
        """The denominator of a mean over n items of this batch (at least 1); n an int or a
        tensor."""
        return n.clamp(min=1) if torch.is_tensor(n) else max(n, 1)

    def gather(self, values):
        """The values (1-D) of the whole batch a mean is taken over: here this process's own."""
        return values


def context_variable(name, default):
    """A `contextvars.ContextVar` (standard library): one value per thread and asyncio task.
    Imported here, so that a module copied with the draw policy needs no import but torch."""
    import contextvars
    return contextvars.ContextVar(name, default=default)


DRAW_POLICY = context_variable('rgbx.DRAW_POLICY', DrawPolicy())
COMPILED_POLICY = [DRAW_POLICY.get()]  # what compiled code reads: the policy `draws` entered last


def draw_policy():
    """The `DrawPolicy` in force in this context (the default: one process). Code that
    torch.compile traces reads COMPILED_POLICY instead (Dynamo cannot trace
    ContextVar.get: a graph break at every draw); it guards on that object, so a forward
    under another policy recompiles. Compile and run a model in one thread."""
    return COMPILED_POLICY[0] if torch.compiler.is_compiling() else DRAW_POLICY.get()


@contextlib.contextmanager
def draws(policy):
    """`with rgbx.draws(policy): ...`: the forwards inside draw and count with `policy`
    (a `DrawPolicy`; None: the default), the one before it is back on exit."""
    policy = policy if policy is not None else DrawPolicy()
    token = DRAW_POLICY.set(policy)
    COMPILED_POLICY[0] = policy
    try:
        yield policy
    finally:
        DRAW_POLICY.reset(token)
        COMPILED_POLICY[0] = DRAW_POLICY.get()  # this context's own again, however threads interleave


class Dropout(nn.Module):
    """Dropout with its keep mask drawn through `draw_policy()` (the batch is axis `dim`): one
    draw per element (`per='element'`, nn.Dropout), per sample and channel of (B, C, ...)
    ('channel', nn.Dropout2d) or per sample ('sample': stochastic depth, Huang et al.
    2016, which drops the whole residual branch). `streams` > 1: the batch axis stacks
    that many streams of one batch (KTB's RGB rows, then X rows), each drawn on its own,
    so that a stream's rows stay one batch."""

    def __init__(self, p=0.0, per='element', dim=0, streams=1):
        super().__init__()
        self.p, self.per, self.dim, self.streams = p, per, dim, streams

    def active(self):
        return self.p != 0.0 and self.training

    def scale(self, x):
        """keep / (1 - p) for x: 0 or 1 / (1 - p), shaped to broadcast (per sample: (B, 1, ...,
        1))."""
        # leading axes drawn separately
        kept = {'element': x.ndim, 'channel': 2, 'sample': 1}[self.per]
        shape = list(x.shape[:kept]) + [1] * (x.ndim - kept)

        def draw(n):
            return x.new_empty(shape[:self.dim] + [n]
                               + shape[self.dim + 1:]).bernoulli_(1.0 - self.p)
        per_stream = x.shape[self.dim] // self.streams
        policy = draw_policy()
        keep = torch.cat([policy.draw(draw, per_stream, self.dim) for _ in range(self.streams)], self.dim)
        return keep.div_(1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x) if self.active() else x

    def residual(self, x, branch):
        """x + self(branch) in one pass over the maps (a residual connection through stochastic
        depth)."""
        return torch.addcmul(x, branch, self.scale(branch)) if self.active() else x + branch


class DropPath(Dropout):
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch per sample."""

    def __init__(self, p=0.0, streams=1):
        super().__init__(p, per='sample', streams=streams)


class Mlp(nn.Module):
    """Transformer feed-forward network: fc1 -> GELU -> fc2 (names as in both checkpoints)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


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

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.proj(pad_to_multiple(img, self.patch, (2, 3)))  # (B, dim, h, w)
        return self.norm(x.permute(0, 2, 3, 1))  # (B, h, w, dim)


def segmentation_loss(logits, label, ohem=False, ignore_index=255, thresh=0.7):
    """Pixel cross-entropy, the mean over labelled pixels (0, still a graph, when
    none is labelled). With `ohem` (KTB on MCubeS; CMNeXt's OhemCrossEntropy):
    the mean over the pixels whose loss exceeds -log(thresh), or over the
    (labelled pixels // 16) hardest ones when fewer exceed it (`ohem_weights`).
    logits (B, K, H, W), label (B, H, W) int64 -> scalar."""
    logits = logits.float()
    # (B*H*W, K) rows, a view: the fast layout
    if logits.is_contiguous(memory_format=torch.channels_last):
        loss = F.cross_entropy(logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]),
                               label.flatten(),
                               ignore_index=ignore_index, reduction='none')  # (B*H*W,)
    else:
        # (B*H*W,)
        loss = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction='none').flatten()
    valid = label.flatten() != ignore_index  # (B*H*W,)
    if ohem:
        weight = ohem_weights(loss.detach(), valid, thresh)  # (B*H*W,)
        return (loss * weight).sum() / draw_policy().count(weight.sum())
    # the mean over the batch's labelled pixels
    return loss.sum() / draw_policy().count(valid.sum())


def ohem_weights(loss, valid, thresh):
    """OHEM's pixel selection as weights (B*H*W,): 1 where the loss exceeds -log(thresh);
    when fewer than k = (labelled pixels // 16) do, 1 on the losses above the k-th largest
    v and (k - n_above) / n_at_v on those equal to v, so that the weighted mean is the
    mean of the k largest (ties shared: design choice). Ranked over `gather`'s batch.
    Shapes are fixed and counts stay tensors: nothing is read on the host."""
    policy = draw_policy()
    t = -math.log(thresh)
    # every pixel's loss of the batch, -1 where unlabelled (a cross-entropy is >= 0)
    ranked = policy.gather(torch.where(valid, loss, loss.new_full((), -1.0)))
    k = (ranked >= 0).sum() // 16  # a tensor: how many the batch keeps at least
    # the k-th largest: k is at most numel // 16, so the top numel // 16 hold it
    top = ranked.topk(max(ranked.numel() // 16, 1)).values
    v = top.index_select(0, (k - 1).clamp(min=0).view(1)).reshape(())
    above, at = (loss > v) & valid, (loss == v) & valid
    share = (k - (ranked > v).sum()) / (ranked == v).sum().clamp(min=1)  # each tie's part of the k-th place
    enough = (ranked > t).sum() >= k
    return torch.where(enough, (loss > t).float(), above.float() + at.float() * share)


@dataclass(frozen=True)
class Recipe:
    """A method's training defaults on one dataset: what train.py takes for a setting the
    command line leaves open (None: the dataset's or the trainer's own default).
    `global_batch`: reached with gradient accumulation over batch_size x processes;
    `augment`: 'full' (the joint augmentation) or 'crop' (the random crop only);
    `x_standardised`: X fed as (v - mean) / std of its modality (True) or as its [0, 1]
    values (False); `frozen_backbone`: the method adapts a frozen pretrained backbone (a
    pretrained file is expected); `options`: model option defaults for this dataset."""
    epochs: int = None
    lr: float = None
    weight_decay: float = None
    batch_size: int = None
    warmup_epochs: float = None
    schedule: str = None
    beta2: float = None
    global_batch: int = None
    augment: str = None
    x_standardised: bool = True
    frozen_backbone: bool = False
    options: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------
# Options: each method's config is a dataclass whose fields carry their type, default,
# meaning (with the paper's reference), choices and range; `--opts` text converts through it
# ----------------------------------------------------------------------------

TRUE, FALSE = ('true', 'yes', 'on', '1'), ('false', 'no', 'off', '0')


def option(default, meaning, *, choices=None, low=None, high=None, low_open=False, high_open=False,
           none=None,
           default_from='', start_file=False):
    """A config field: its `default`, its `meaning` in words, the values it takes (`choices`,
    or low .. high with `*_open` excluding that bound; else integers >= 1, numbers >= 0), what a
    None default means (`none`), where the default comes from (`default_from`: 'paper',
    'release', 'validation', 'MultiMAE', ...) and whether it only names a file that starts some
    weights (`start_file`: a model rebuilt to load its trained weights skips it)."""
    meta = dict(meaning=meaning, choices=choices, none=none, default_from=default_from,
                start_file=start_file,
                range=None if low is None and high is None else
                (-math.inf if low is None else low, math.inf if high is None else high, low_open,
                 high_open))
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def option_kind(f):
    """The type option field `f` takes: bool, int, float, str or list (of ints)."""
    union = typing.get_origin(f.type) in (typing.Union, types.UnionType)
    kind = next(t for t in typing.get_args(f.type) if t is not type(None)) if union else f.type
    return list if typing.get_origin(kind) is list else kind


def option_value(owner, f, value):
    """`value` of option field `f` (text from the command line, or a Python value) as the
    option's type, checked; or a one-line error naming the option, `owner` and what it takes."""
    kind, what = option_kind(f), f"option {f.name!r} of {owner}"
    if type(None) in typing.get_args(f.type) and (value is None
                                                  or str(value).strip().lower() in ('none', '')):
        return None
    if kind is bool:
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in TRUE + FALSE:
            return value if isinstance(value, bool) else text in TRUE
        raise ValueError(f"{what} takes true or false (also yes/no, on/off, 1/0), not {value!r}")
    try:
        if kind is list:
            items = value.split(':') if isinstance(value, str) else (value if isinstance(value, (list, tuple)) else [value])
            value = [int(str(v).strip()) if isinstance(v, str) else v for v in items]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError
        elif kind is int:
            value = int(value.strip()) if isinstance(value, str) else value
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError
        elif kind is float:
            value = float(value.strip()) if isinstance(value, str) else value
            if not isinstance(value, (int, float)) or isinstance(value,
                                                                 bool) or not math.isfinite(value):
                raise ValueError
            value = float(value)
        elif kind is str:
            value = str(value).strip()
    except ValueError:
        shape = {list: 'integers separated by ":" (one per stage), e.g. 8:16:32:64',
                 int: 'an integer',
                 float: 'a number'}[kind]
        raise ValueError(f"{what} takes {shape}, not {value!r}") from None
    check_option_range(what, f, kind, value)
    return value


def check_option_range(what, f, kind, value):
    """Raise unless `value` is one of the field's choices or lies in its range."""
    choices = f.metadata['choices']
    if choices and value not in choices:
        raise ValueError(f"{what} takes one of {', '.join(choices)}, not {value!r}")
    if kind not in (int, float, list):
        return
    default_range = (1 if kind is not float else 0, math.inf, False, False)  # ints >= 1, numbers >= 0
    low, high, low_open, high_open = f.metadata['range'] or default_range
    for v in (value if isinstance(value, list) else [value]):
        if v < low or v > high or (v == low and low_open) or (v == high and high_open):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"{what} must lie in {bounds}, not {value!r}")


@dataclass
class Options:
    """Base of the typed configs: at construction every field is converted to its type (from
    text too, as --opts gives it) and checked; errors name the option and `owner`."""
    owner: typing.ClassVar[str] = 'model'

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, option_value(self.owner, f, getattr(self, f.name)))


def split_options(config, sizes, options):
    """`options` ({name: value}) -> (a `config`, the given options that are backbone sizes,
    checked by `sizes` (SwinSizes / ViTSizes; None: the method takes none)). Unknown names
    are an error that lists the options."""
    own = [f.name for f in fields(config)]
    size_names = [f.name for f in fields(sizes) if f.name not in own] if sizes else []
    unknown = sorted(set(options) - set(own) - set(size_names))
    if unknown:
        raise ValueError(f"{config.owner} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(sorted(own + size_names))}")
    given = {k: v for k, v in options.items() if k in size_names}
    checked = asdict(sizes(**given)) if sizes else {}
    return config(**{k: v for k, v in options.items() if k in own}), {k: checked[k] for k in given}


NO_DECAY_NAMES = ('token', 'pos_embed', 'bias_table', 'embed.weight', 'class_emb',
                  'task_embeddings')


class RGBXModel(nn.Module):
    """The interface between a model and the code that trains and evaluates it, with
    its defaults; a method overrides what differs. train.py and eval.py use nothing
    else of a model.

    forward(rgb (B, 3, H, W), x (B, Cx, H, W), label=None, **step_inputs) -> logits
    (B, K, H, W), or (loss, logits) when label (B, H, W) int64 (255 = ignore) is given;
    a pre-training model returns (loss, None). `step_inputs` are what `schedule` gives.
    """

    streams = 1  # passes of the backbone per image (KTB: 2), the speed floor of eval.py's benchmark
    # True: the model learns no segmentation (nothing to evaluate; MaskMentor stage 1)
    pretraining = False
    # True: some trainable parameters get no gradient in some steps (DDP)
    find_unused_parameters = False

    def param_groups(self, weight_decay):
        """AdamW parameter groups over the trainable parameters: no weight decay on norms,
        biases, embeddings, tokens and bias tables (every tensor of ndim <= 1, and by name)."""
        decay, plain = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (plain if p.ndim <= 1 or any(s in name for s in NO_DECAY_NAMES)
                 else decay).append(p)
        return [dict(params=decay, weight_decay=weight_decay), dict(params=plain, weight_decay=0.0)]

    def schedule(self, step, total_steps):
        """What global step `step` (0-based) of a run of `total_steps` trains on: (batch
        index, forward keyword arguments). Steps with one batch index train on one batch.
        Default: a new batch every step, nothing more."""
        return step, {}

    def diagnostics(self, rgb, x):
        """Figures on the model's health for the training log, {name: float}; default none."""
        return {}

    def param_counts(self):
        """{'trainable': n, 'total': n, and any parts a method reports}."""
        return {'trainable': sum(p.numel() for p in self.parameters() if p.requires_grad),
                'total': sum(p.numel() for p in self.parameters())}

    def pretrained_target(self, sd):
        """The module a pretrained state dict `sd` is loaded into (`load_pretrained`): the
        backbone; it converts `sd` with its own `convert_checkpoint`."""
        return self.backbone


def _init_transformer_weights(m):
    """Initialisation of the official releases: trunc-normal(0.02) linears, zero biases, unit
    norms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def drop_path_rates(rate, n):
    """Stochastic depth decay rule: n rates rising linearly from 0 to `rate` (plain floats,
    so that models can be built on the meta device)."""
    return [rate * i / max(n - 1, 1) for i in range(n)]


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
    logits = F.interpolate(logits, size=(h * stride, w * stride), mode='bilinear',
                           align_corners=False)
    return logits[..., :size[0], :size[1]]


# ----------------------------------------------------------------------------
# Swin Transformer (Liu et al., "Swin Transformer: Hierarchical Vision
# Transformer using Shifted Windows", ICCV 2021). Module names are the names of
# the official checkpoint keys.
# ----------------------------------------------------------------------------

def relative_position_index(window):
    """Swin eq. 4 index: for each (query, key) pair of a window, the row of the
    (2w-1)^2 bias table that holds their relative offset. Returns (w*w, w*w) long."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                        indexing='ij')).flatten(1)  # (2, N)
    # (2, N, N), offsets shifted to >= 0
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x, window):
    """(B, Hp, Wp, C) -> (B, nW, w*w, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C)  # (B, nh, w, nw, w, C)
    return x.transpose(2, 3).reshape(B, -1, window * window, C)


def window_layout(H, W, window, shift, device):
    """Where each token of an H x W map sits when (S)W-MSA attends (Swin Sec. 3.2),
    as the segmentation Swins compute it (mmsegmentation's and Microsoft's
    Swin-Transformer-Semantic-Segmentation, hence the KTB release).

    The normed map is zero-padded at the bottom/right to Hp x Wp, a multiple of
    the window, cyclically shifted by -shift and cut into nW windows of N = w*w
    tokens. The padded tokens are real keys: zero inputs whose keys and values
    are the qkv bias, which every query in their window attends to. Gathering by
    index does the pad, the shift and the partition in one copy, from the map
    flattened with one zero token appended at index H*W:
      order: (nW*N,) long, the flat index (row*W + col, or H*W for padding) of the
             token in each window slot;
      back:  (H*W,) long, the window slot of each real token (undoes `order`);
      mask:  additive (nW, 1, N, N), 0 = may attend, -inf = may not, or None
             without a shift. Only the cyclic-shift mask: a query attends to a key
             when both come from the same region of the padded, unshifted frame.
    """
    Hp, Wp = H + (-H) % window, W + (-W) % window
    r = torch.arange(Hp, device=device)[:, None]
    c = torch.arange(Wp, device=device)[None, :]
    # torch.roll(x, -shift): slot (r, c) holds x[r + shift, c + shift]
    src_r, src_c = (r + shift) % Hp, (c + shift) % Wp
    real = (src_r < H) & (src_c < W)  # (Hp, Wp)
    band = lambda i, n: (i >= n - window).long() + (i >= n - shift).long() if shift else 0 * i
    region = band(r, Hp) * 3 + band(c, Wp)  # (Hp, Wp), the 9 regions of the shifted frame
    # (Hp, Wp) -> (nW*N,)
    part = lambda t: window_partition(t.expand(Hp, Wp)[None, :, :, None], window).flatten()
    order, region = part(torch.where(real, src_r * W + src_c, H * W)), part(region)
    slots = torch.arange(order.numel(), device=device)
    # each real token's slot; the padding slots all write index H*W, cut off
    back = torch.zeros(H * W + 1, dtype=torch.long, device=device).scatter_(0, order, slots)[:H * W]
    if shift == 0:
        return order, back, None
    region = region.view(-1, window * window)  # (nW, N)
    same = region[:, :, None] == region[:, None, :]  # (nW, N, N)
    mask = torch.zeros(same.shape, device=device).masked_fill_(~same, float('-inf'))
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
        self.register_buffer('relative_position_index', relative_position_index(window),
                             persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, nW, N, C = x.shape
        N_ = self.window * self.window
        # (N*N, heads)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        # (3, B, nW, heads, N, d)
        qkv = self.qkv(x).view(B, nW, N, 3, self.heads, C // self.heads).permute(3, 0, 1, 4, 2, 5)
        # (heads, N, N), in autocast's dtype
        bias = bias.view(N_, N_, self.heads).permute(2, 0, 1).to(qkv.dtype)
        if mask is None:  # one bias for every window
            q, k, v = qkv.flatten(1, 2).unbind(0)  # each (B*nW, heads, N, d)
            bias = bias.expand(B * nW, -1, -1, -1)  # (B*nW, heads, N, N), a view
        else:  # a bias per window: windows join the heads axis, the batch axis stays a view
            # each (B, nW*heads, N, d)
            q, k, v = qkv.reshape(3, B, nW * self.heads, N, -1).unbind(0)
            # (B, nW*heads, N, N)
            bias = (bias + mask.to(qkv.dtype)).flatten(0, 1).expand(B, -1, -1, -1)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.view(B, nW, self.heads, N, -1).transpose(2, 3).reshape(B, nW, N, C))


class SwinTransformerBlock(nn.Module):
    """One Swin block (Swin eq. 3): z = x + (S)W-MSA(LN(x)); out = z + MLP(LN(z)).

    forward(x: (B, H, W, C), layout, parallel=None) -> (B, H, W, C). The stage
    passes the `window_layout` of this block's shift (0 for W-MSA). `parallel`, when given, is
    a module beside the MLP, called as parallel(z, out) -> out + A(z): the seam through
    which a method adds an adapter A to a frozen block without copying it (KTB's MAPA
    adapters: out = z + MLP(LN(z)) + A(z)); it gets `out` so that it can add into it
    in place rather than make another full-size map.
    """

    def __init__(self, dim, heads, window, mlp_ratio=4.0, drop_path=0.0, streams=1):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.drop_path = DropPath(drop_path, streams)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def attention(self, x, layout):
        """(S)W-MSA of a normed map x: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        order, back, mask = layout
        # (B, H*W + 1, C): the zero padding token last
        x = F.pad(x.reshape(B, H * W, C), (0, 0, 0, 1))
        x = x.index_select(1, order)  # pad, cyclic shift, partition: (B, nW*N, C)
        x = self.attn(x.view(B, -1, self.window ** 2, C), mask)  # (B, nW, N, C)
        return x.flatten(1, 2).index_select(1, back).view(B, H, W, C)  # reverse shift, crop

    def forward(self, x: torch.Tensor, layout: tuple, parallel: nn.Module | None = None) -> torch.Tensor:
        # x + DropPath(attention)
        z = self.drop_path.residual(x, self.attention(self.norm1(x), layout))
        out = self.drop_path.residual(z, self.mlp(self.norm2(z)))  # z + DropPath(MLP)
        # out + parallel(z), accumulated into out
        return out if parallel is None else parallel(z, out)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 2, (1, 2))
        # (B, H/2, W/2, 4C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One Swin stage: `depth` blocks alternating W-MSA and SW-MSA, then (except
    in the last stage) a `downsample` patch merging, kept separate so that the
    stage output can be taken before it.

    forward(x: (B, H, W, C), parallel=None) -> (B, H, W, C); `parallel` is a
    list with one module (or None) per block, see SwinTransformerBlock.
    """

    def __init__(self, dim, depth, heads, window, mlp_ratio, drop_paths, downsample, streams=1):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, heads, window, mlp_ratio, drop_paths[i],
                                 streams) for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None
        self._layouts = {}

    LAYOUTS_KEPT = 16  # sizes cached per stage: multi-scale evaluation of many sizes stays bounded

    def layouts(self, H, W, device):
        """`window_layout` of the W-MSA and of the SW-MSA blocks for an H x W map,
        cached per size and device, the LAYOUTS_KEPT most recently used. Every SW-MSA
        block shifts, also on a map that fits in one window (as the segmentation Swins
        and the KTB release do)."""
        key = (H, W, str(device))
        layouts = self._layouts.pop(key, None)
        if layouts is None:
            # plain tensors: a cache filled under inference_mode must serve autograd too
            with torch.inference_mode(False):
                layouts = tuple(window_layout(H, W, self.window, s, device) for s in (0, self.window // 2))
        self._layouts[key] = layouts  # a dict keeps insertion order: the most recently used last
        while len(self._layouts) > self.LAYOUTS_KEPT:
            del self._layouts[next(iter(self._layouts))]  # the least recently used
        return layouts

    def forward(self, x: torch.Tensor, parallel: nn.ModuleList | None = None) -> torch.Tensor:
        layouts = self.layouts(x.shape[1], x.shape[2], x.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, layouts[i % 2], None if parallel is None else parallel[i])
        return x


# embed dim, depths, heads (Swin Table 1); window of the official files (7: 224 px, 12: 384 px /
# 22K)
SWIN_PRESETS = {
    # demo and tests only
    'nano': dict(embed_dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window_size=4),
    'tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window_size=7),
    'small': dict(embed_dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24), window_size=7),
    'base': dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window_size=12),
    'large': dict(embed_dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48), window_size=12),
}


class SwinTransformer(nn.Module):
    """Swin Transformer backbone for dense prediction, any input size.

    forward(img: (B, in_chans, H, W)) -> list of 4 maps (B, C_i, ceil(H/2^(i+2)), ceil(W/2^(i+2))),
    C_i = embed_dim * 2^i, each taken after stage i's blocks and before its patch
    merging; the last map passes through the checkpoint's final `norm` (none with
    final_norm=False: KTB normalises every stage output itself). `streams`: how many
    streams of one batch the batch axis stacks (KTB: 2), so that stochastic depth
    draws per stream (see Dropout).

    Driving it by hand (what KTB does per stream):
        x = model.patch_embed(img)                      # (B, H/4, W/4, C)
        for i, layer in enumerate(model.layers):
            x = layer(x, parallel=...)                  # stage i output, (B, h, w, C_i)
            if layer.downsample is not None:
                x = layer.downsample(x)                 # next stage input
    """

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window_size=7,
                 mlp_ratio=4.0, drop_path_rate=0.0, in_chans=3, final_norm=True, streams=1):
        super().__init__()
        if len(heads) != len(depths):
            raise ValueError(f"Swin needs one head count per stage: depths {list(depths)}, heads "
                             f"{list(heads)}")
        self.window_size, self.streams = window_size, streams
        self.dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(in_chans, embed_dim, 4, norm=True)
        rates = drop_path_rates(drop_path_rate, sum(depths))
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.layers = nn.ModuleList(
            BasicLayer(self.dims[i], depths[i], heads[i], window_size, mlp_ratio,
                       rates[starts[i]:starts[i] + depths[i]], downsample=i < len(depths) - 1,
                       streams=streams)
            for i in range(len(depths)))
        self.norm = nn.LayerNorm(self.dims[-1]) if final_norm else nn.Identity()
        self.apply(_init_transformer_weights)

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(img)
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        outs[-1] = self.norm(outs[-1])
        return [o.permute(0, 3, 1, 2) for o in outs]

    def convert_checkpoint(self, sd):
        """A Swin file (Microsoft's or mmsegmentation's) -> (this model's state dict, keys it
        may lack, notes) for `load_pretrained` (`swin_from_checkpoint`)."""
        return swin_from_checkpoint(sd, self.state_dict()), set(), []



def swin(name, **overrides):
    """Build a Swin preset: rgbx.swin('base') has window 12 for the 384 / 22K files;
    rgbx.swin('base', window_size=7) for the 224 files."""
    if name not in SWIN_PRESETS:
        raise ValueError(f"unknown Swin preset {name!r}; choose one of {sorted(SWIN_PRESETS)}")
    return SwinTransformer(**{**SWIN_PRESETS[name], **overrides})


@dataclass
class SwinSizes(Options):
    """A Swin's sizes as method options; None: the preset's (`SWIN_PRESETS`, Swin Table 1)."""
    owner: typing.ClassVar[str] = 'the Swin backbone'
    embed_dim: int | None = option(
        None, "C, the channels of stage 1 (Swin Table 1)", none="the preset's")
    depths: list[int] | None = option(
        None, "Swin blocks per stage (Swin Table 1)", none="the preset's")
    heads: list[int] | None = option(
        None, "attention heads per stage (Swin Table 1)", none="the preset's")
    window_size: int | None = option(
        None,
        "M, the side of an attention window in tokens (Swin Sec. 3.2; the official files: 7 at 224"
        " px, 12 at 384 px)", none="the preset's")
    mlp_ratio: float = option(
        4.0, "MLP hidden width / C", low=0, low_open=True, default_from='paper')
    drop_path_rate: float = option(
        0.0, "stochastic depth: rates rise over the blocks from 0 to this",
        low=0, high=1, high_open=True)


# mmsegmentation's Swin names -> the official ones (`rename_keys`); `(backbone\.)?` keeps a prefix
SWIN_MMSEG_KEYS = (
    (r'(backbone\.)?patch_embed\.projection\.(.*)', r'\1patch_embed.proj.\2', None),
    (r'(backbone\.)?stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.(.*)',
     r'\1layers.\2.blocks.\3.attn.\4', None),
    (r'(backbone\.)?stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(.*)',
     r'\1layers.\2.blocks.\3.mlp.fc1.\4', None),
    (r'(backbone\.)?stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.(.*)',
     r'\1layers.\2.blocks.\3.mlp.fc2.\4', None),
    (r'(backbone\.)?stages\.(\d+)\.blocks\.(\d+)\.(norm[12]\..*)', r'\1layers.\2.blocks.\3.\4',
     None),
    (r'(backbone\.)?stages\.(\d+)\.downsample\.(.*)', r'\1layers.\2.downsample.\3', 'unfold'),
)


def swin_from_microsoft(sd, own):
    """A Microsoft Swin state dict -> `own`'s (a SwinTransformer's state dict): drop the
    classifier, the buffers rebuilt here and the final norm when `own` has none (KTB's
    backbone); bias tables trained with another window are resized bicubically."""
    sd = {k: v for k, v in sd.items()
          if not (k.startswith('head.') or k.endswith('relative_position_index')
                  or k.endswith('attn_mask')
                  or (k.startswith('norm.') and 'norm.weight' not in own))}
    for k, v in sd.items():
        if k.endswith('relative_position_bias_table') and k in own and v.shape != own[k].shape:
            # (m*m, heads) -> (1, heads, m, m) -> (n*n, heads)
            m, n = math.isqrt(v.shape[0]), math.isqrt(own[k].shape[0])
            grid = v.T.reshape(1, -1, m, m).float()
            sd[k] = F.interpolate(grid, size=(n, n), mode='bicubic',
                                  align_corners=False)[0].flatten(1).T.to(v.dtype)
    return sd


def swin_from_mmseg(sd, own):
    """A mmsegmentation Swin state dict (with or without `backbone.`) -> `own`'s, by
    `SWIN_MMSEG_KEYS`."""
    if all(k.startswith('backbone.') for k in sd):
        sd = {k[len('backbone.'):]: v for k, v in sd.items()}
    return swin_from_microsoft(rename_keys(sd, SWIN_MMSEG_KEYS, own), own)




def swin_from_checkpoint(sd, own):
    """Microsoft's or mmsegmentation's Swin state dict -> `own`'s (a SwinTransformer's)."""
    if any(k.startswith('backbone.MPGBlocks.') for k in sd):
        raise ValueError("a trained KTB of the authors' release: load it into a rgbx.KTB (built "
                         "with method ktb), "
                         "not into a SwinTransformer")
    if any(k.endswith('patch_embed.projection.weight') for k in sd):
        return swin_from_mmseg(sd, own)
    return swin_from_microsoft(sd, own)


# ----------------------------------------------------------------------------
# ViT of MAE (Dosovitskiy et al. ICLR 2021; He et al. "Masked Autoencoders Are
# Scalable Vision Learners", CVPR 2022). Module names are the checkpoint keys.
# ----------------------------------------------------------------------------

def sincos_pos_embed(dim, h, w):
    """Fixed 2-D sin-cos position embedding of MAE: (h*w, dim), half the channels
    encode the row, half the column, each as [sin(p w_k), cos(p w_k)], w_k = 10000^(-k/(dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing='ij')
    out = [torch.cat([torch.sin(p.flatten()[:, None] * omega),
                      torch.cos(p.flatten()[:, None] * omega)], 1)
           for p in (cols, rows)]  # MAE's order: the first half encodes the column (grid[0] = w)
    return torch.cat(out, 1).float()


def resize_pos_embed(pos, grid, new_grid, extra=1):
    """Bicubic resize of a (1, extra + gh*gw, D) position embedding to a new grid; the
    first `extra` rows (cls token) are kept as they are."""
    if tuple(grid) == tuple(new_grid):
        return pos
    head, body = pos[:, :extra], pos[:, extra:]
    body = body.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    body = F.interpolate(body.float(), size=tuple(new_grid), mode='bicubic',
                         align_corners=False).to(pos.dtype)
    return torch.cat([head, body.flatten(2).transpose(1, 2)], 1)  # (1, extra + h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA. forward(x: (B, T, D)) -> (B, T, D)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # (B, nh, T, hd)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_path.residual(x, self.attn(self.norm1(x)))  # x + DropPath(Attn(LN(x)))
        return self.drop_path.residual(x, self.mlp(self.norm2(x)))


def vit_blocks(dim, depth, heads, mlp_ratio=4.0, drop_path_rate=0.0):
    """`depth` Blocks with stochastic depth rising linearly to drop_path_rate."""
    return nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in drop_path_rates(drop_path_rate, depth))


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
        self.pos_embed = nn.Parameter(torch.cat([torch.zeros(1, dim),
                                                 sincos_pos_embed(dim, *self.grid)])[None],
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

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x, _ = self.embed(img)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def convert_checkpoint(self, sd):
        """An MAE ViT file -> (this model's state dict, keys it may lack, notes) for
        `load_pretrained` (`vit_from_mae`)."""
        return vit_from_mae(sd, self.state_dict()), set(), []



def vit(name, **overrides):
    """Build a ViT/16 preset: rgbx.vit('base') for mae_pretrain_vit_base.pth."""
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; choose one of {sorted(VIT_PRESETS)}")
    return VisionTransformer(**{**VIT_PRESETS[name], **overrides})


@dataclass
class ViTSizes(Options):
    """A ViT's sizes as method options; None: the preset's (`VIT_PRESETS`, ViT Table 1)."""
    owner: typing.ClassVar[str] = 'the ViT backbone'
    dim: int | None = option(None, 'D, the token width (ViT Table 1)', none="the preset's")
    depth: int | None = option(None, 'transformer blocks (ViT Table 1)', none="the preset's")
    heads: int | None = option(None, 'attention heads (ViT Table 1)', none="the preset's")
    mlp_ratio: float = option(
        4.0, "MLP hidden width / D", low=0, low_open=True, default_from='paper')
    img_size: int = option(
        224, "the image side the position table is stored for (other sizes interpolate it)",
        default_from='MAE')
    drop_path_rate: float = option(
        0.0, "stochastic depth: rates rise over the blocks from 0 to this",
        low=0, high=1, high_open=True)


def vit_from_mae(sd, own):
    """An MAE ViT state dict -> `own`'s (a VisionTransformer's): drop the MAE decoder of
    the `_full` files and any classifier, resize `pos_embed` to `own`'s grid."""
    sd = {k: v for k, v in sd.items() if not k.startswith(('decoder_', 'mask_token', 'head.', 'fc_norm.'))}
    if 'pos_embed' in sd:
        sd['pos_embed'] = resize_pos_embed(sd['pos_embed'], square_grid(sd['pos_embed']),
                                           square_grid(own['pos_embed']))
    return sd


def square_grid(pos_embed):
    """(1, 1 + g*g, D) -> (g, g), or an error for a table that is not a square grid with a cls
    row."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"checkpoint pos_embed has {n} patch rows, not a square grid; "
                         f"expected a (1, 1 + g*g, D) MAE position embedding")
    return side, side


# ----------------------------------------------------------------------------
# Loading official checkpoints
# ----------------------------------------------------------------------------

class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, corrupted, not PyTorch)."""


def read_checkpoint(path):
    """torch.load a checkpoint safely (weights_only) with a clear error when the
    file is missing, truncated or not a PyTorch file."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a folder, not a file: pass the "
                         f"checkpoint file in it")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        reason = str(e)
        # torch's advice around it (weights_only=False) is not ours to give
        if 'WeightsUnpickler error:' in reason:
            reason = reason.split('WeightsUnpickler error:', 1)[1].strip().split('\n')[0].split('. ')[0]
        reason = ' '.join([type(e).__name__ + ':' if reason.strip() else type(e).__name__]
                          + reason.split())
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}. The file is truncated, "
                              f"corrupted or not a "
                              f"PyTorch checkpoint of tensors; download or "
                              f"copy it again.") from None


class CheckpointNote(UserWarning):
    """What `load_pretrained` left out of a file or re-initialised (the entry points print it)."""


def read_state_dict(path):
    """The state dict of a checkpoint file: unwrapped from "model" / "state_dict", every
    value a finite tensor, or a one-line error naming the file."""
    sd = read_checkpoint(path)
    for wrapper in ('model', 'state_dict'):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors "
                         f"(top-level keys: "
                         f"{list(sd)[:8] if isinstance(sd, dict) else type(sd).__name__})")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"checkpoint {path} holds NaN or Inf values in {len(bad)} tensors, the "
                         f"first {bad[0]!r}: "
                         f"the file is corrupted; download or copy it again")
    return sd


def load_pretrained(model, path):
    """Load a pretrained file into a model (its `pretrained_target`: the backbone, or the
    whole model for the files that hold one) or into a bare backbone; returns the model.

    Reads with weights_only=True (`read_state_dict`), asks the target to convert the state
    dict to its own names (`convert_checkpoint`, beside each model: Swin, ViT, KTB,
    MaskMentor), then loads and raises an error listing every missing, unexpected or
    mis-shaped key. Keys the target declares absent keep their initial values; its notes
    (what a MultiMAE file leaves out) are `CheckpointNote` warnings.
    """
    sd = read_state_dict(path)
    target = model.pretrained_target(sd) if isinstance(model, RGBXModel) else model
    if not callable(getattr(target, 'convert_checkpoint', None)):
        raise TypeError(f"load_pretrained loads into an rgbx model, SwinTransformer or "
                        f"VisionTransformer, "
                        f"not a {type(target).__name__}")
    try:
        sd, absent, notes = target.convert_checkpoint(sd)
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: {e}") from None
    for note in notes:
        warnings.warn(f"load_pretrained {path}: {note}", CheckpointNote, stacklevel=2)
    own = target.state_dict()
    missing = sorted(set(own) - set(sd) - absent)
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {path} does not fit {type(target).__name__}: "
            + (f"missing keys ({len(missing)}): {missing}; " if missing else '')
            + (f"unexpected keys ({len(unexpected)}): {unexpected}; " if unexpected else '')
            + (f"shape mismatches: {shapes}; " if shapes else '')
            + "build the model with the sizes (preset, window, classes, head widths) the file was "
            "trained with.")
    # only the declared `absent` keys keep their initial values
    target.load_state_dict(sd, strict=False)
    return model


def rename_keys(sd, rules, own):
    """A state dict renamed by `rules`, ((regex, name or function of the match, how the
    tensor changes), first match wins; the changes below). Keys no rule matches are kept as
    they are (the loader reports them as unexpected). `own` (the model's state dict) gives
    the shapes of the tensors stacked from one row per modality. Changes:
      unfold  nn.Unfold channel order (c*4 + j, j over (0,0) (0,1) (1,0) (1,1)) -> Microsoft's
      1x1     a 1x1 conv weight (O, I, 1, 1) -> nn.Linear's (O, I)
      yx      a 1x1 conv to (y, x) offsets -> nn.Linear to (x, y), grid_sample's order
      rgb, x  one modality's row of a tensor stacked (2, ...) here, RGB row first"""
    import re  # here, so that a model copied with its converter needs no import but torch

    def rule(key):
        for pattern, name, how in rules:
            m = re.fullmatch(pattern, key)
            if m:
                return (m.expand(name) if isinstance(name, str) else name(m)), how
        return key, None

    out, rows = {}, {}
    for key, v in sd.items():
        name, how = rule(key)
        # (..., C*4) -> (..., 4, C) in the order x0 (0,0), x1 (1,0), x2 (0,1), x3 (1,1)
        if how == 'unfold':
            v = v.unflatten(-1, (-1, 4))[..., [0, 2, 1, 3]].transpose(-1, -2).flatten(-2)
        elif how in ('1x1', 'yx') and v.ndim == 4:
            v = v.flatten(1) if how == '1x1' else v.flatten(1).flip(0)
        if how in ('rgb', 'x'):
            rows.setdefault(name, [None, None])[how == 'x'] = v
        else:
            out[name] = v
    for name, (rgb, x) in rows.items():
        if rgb is None or x is None:  # a modality's row is missing: reported as a missing key
            continue
        v = torch.stack([rgb, x])  # (2, ...): an adapter bias (2, r) becomes the model's (2, 1, r)
        out[name] = v.view(own[name].shape) if name in own and v.squeeze().shape == own[name].squeeze().shape else v
    return out


# ----------------------------------------------------------------------------
# Segmentation heads; each returns logits at the input size (B, K, H, W)
# ----------------------------------------------------------------------------

class SegFormerHead(nn.Module):
    """All-MLP decoder of SegFormer (Xie et al., NeurIPS 2021), as used by KTB (S1-S3).

    Per-stage linear C_i -> E, upsample to the 1/4 map, concat (4E, deepest
    first as in SegFormer), 1x1 conv 4E -> E (no bias) + BN + ReLU, dropout 0.1,
    1x1 conv E -> classes, bilinear to the input size.
    forward(feats: list of (B, C_i, H_i, W_i), size=(H, W)) -> (B, classes, H, W).

    Speed, same function: the fuse conv on the concat is the sum of its column
    slices W_f,i, one per stage, and bilinear upsampling is linear and acts per
    channel, so W_f,i commutes with it. Each stage's linear_c and its slice are
    composed into one C_i -> E map (W_f,i W_c,i, bias W_f,i b_c,i), applied at
    the stage's own resolution, and only the E-channel results are upsampled and
    summed; BN and ReLU follow as before. Maps stay channels-last up to the logits.
    """

    def __init__(self, in_dims, embed_dim, num_classes, dropout=0.1):
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(c, embed_dim) for c in in_dims)
        self.linear_fuse = nn.Sequential(nn.Conv2d(len(in_dims) * embed_dim, embed_dim, 1,
                                                   bias=False),
                                         nn.BatchNorm2d(embed_dim), nn.ReLU(inplace=True))
        self.dropout = Dropout(dropout, per='channel')
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int], channels_last: bool = False
                ) -> torch.Tensor:
        h, w = feats[0].shape[-2:]
        # W_f,i (E, E), in stage order
        fuse = self.linear_fuse[0].weight.flatten(1).chunk(len(feats), 1)[::-1]
        x = None
        # deepest first: x starts as a fresh map
        for lin, w_f, f in list(zip(self.linear_c, fuse, feats))[::-1]:
            # (B, H_i, W_i, E)
            y = F.linear(f.permute(0, 2, 3, 1), w_f @ lin.weight, w_f @ lin.bias)
            y = y.permute(0, 3, 1, 2)  # (B, E, H_i, W_i), a channels-last view
            if y.shape[-2:] != (h, w):
                # (B, E, h, w)
                y = F.interpolate(y, size=(h, w), mode='bilinear', align_corners=False)
            x = y if x is None else x.add_(y)  # in place: no new 1/4-resolution map per stage
        x = self.linear_fuse[2](self.linear_fuse[1](x))  # BN + ReLU, (B, E, h, w)
        pred = self.linear_pred  # the 1x1 conv as a linear map on the channels-last map
        # (B, h, w, K)
        logits = F.linear(self.dropout(x).permute(0, 2, 3, 1), pred.weight.flatten(1), pred.bias)
        logits = logits.permute(0, 3, 1, 2)  # (B, K, h, w), a channels-last view
        # memory layout of the logits, same values: channels-first for a softmax over the classes
        # (inference, ~4x faster than on channels-last); channels-last for the loss
        # (`segmentation_loss` reads
        # it as
        # (B*H*W, K) rows, ~1.5x faster with its backward) and an argmax over the classes (~3x)
        logits = logits if channels_last else logits.contiguous()
        # straight to the input size, as SegFormer and the KTB release do (not `resize_logits`)
        return F.interpolate(logits, size=size, mode='bilinear', align_corners=False)


class SETRNaiveHead(nn.Module):
    """SETR-Naive head (Zheng et al., CVPR 2021), GoPT's Psi: LayerNorm, 1x1 conv
    D -> 256, BN, ReLU, 1x1 conv -> classes, bilinear x16 to the input size.
    forward(tokens: (B, h*w, D) without the cls token, grid=(h, w), size=(H, W)) -> (B, classes, H,
    W).
    """

    stride = 16

    def __init__(self, dim, num_classes, hidden=256):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.conv1 = nn.Conv2d(dim, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        B, (h, w), s = tokens.shape[0], grid, self.sub
        x = self.proj_dec(tokens).view(B, h, w, s, s, -1)  # (B, h, w, s, s, C)
        # (B, C, h*s, w*s), channels-last
        x = x.transpose(2, 3).reshape(B, h * s, w * s, -1).permute(0, 3, 1, 2)
        # channels-last maps: the blocks' LN and MLP need no copy, the 7x7 convs run faster;
        # channels-first logits: the loss's softmax over channels is ~4x slower on channels-last
        return resize_logits(self.final_layer(self.blocks(x)).contiguous(), size, self.stride)


# ----------------------------------------------------------------------------
# Baseline: early fusion with full fine-tuning (the reference line of the papers)
# ----------------------------------------------------------------------------

def backbone_from_name(name, **overrides):
    """'swin-base' -> rgbx.swin('base'), 'vit-large' -> rgbx.vit('large'), ..."""
    family, _, size = name.partition('-')
    if family not in ('swin', 'vit'):
        raise ValueError(f"unknown backbone {name!r}: use swin-<{'|'.join(SWIN_PRESETS)}> or "
                         f"vit-<{'|'.join(VIT_PRESETS)}>")
    return (swin if family == 'swin' else vit)(size, **overrides)


class EarlyFusion(RGBXModel):
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
            # design choice: X filters start as the mean RGB filter, as in depth-aware fine-tuning
            with torch.no_grad():
                wide.weight.copy_(torch.cat([proj.weight, proj.weight.mean(1, keepdim=True).expand(-1, x_channels, -1, -1)], 1))
                wide.bias.copy_(proj.bias)
            backbone.patch_embed.proj = wide
        if isinstance(backbone, SwinTransformer):
            self.head = SegFormerHead(backbone.dims, head_dim, num_classes)
        else:
            self.head = SETRNaiveHead(backbone.dim, num_classes, head_dim)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, label: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        img = torch.cat([rgb, x], 1) if self.x_channels else rgb
        size = img.shape[-2:]
        if isinstance(self.backbone, SwinTransformer):
            # the loss's layout
            logits = self.head(self.backbone(img), size, channels_last=label is not None)
        else:
            grid = (-(-size[0] // 16), -(-size[1] // 16))
            logits = self.head(self.backbone(img)[:, 1:], grid, size)
        if label is None:
            return logits
        return segmentation_loss(logits, label), logits


@dataclass
class RGBOnlyConfig(Options):
    """The RGB-only baseline's options, besides the backbone preset's sizes (`SwinSizes`,
    `ViTSizes`)."""
    owner: typing.ClassVar[str] = 'rgb_only'
    head_dim: int = option(
        256, "the head's width: SegFormer's embedding on a Swin, SETR-Naive's hidden "
        "width on a ViT")


@dataclass
class EarlyFusionConfig(RGBOnlyConfig):
    """The early-fusion baseline's options, besides the backbone preset's sizes."""
    owner: typing.ClassVar[str] = 'early_fusion'
    use_x: bool = option(
        True, "stack X with RGB as input channels (False: the model sees RGB only)")


def build_early_fusion(backbone_name: str, num_classes: int, x_channels: int,
                       pretrained: str | None = None,
                       **options) -> 'EarlyFusion':
    """Early fusion (use_x) or RGB-only baseline on `backbone_name` ('swin-base', 'vit-large', ...),
    fully trainable; `options`: `EarlyFusionConfig`'s and the backbone's sizes."""
    family = backbone_name.partition('-')[0]
    cfg, sizes = split_options(EarlyFusionConfig, {'swin': SwinSizes, 'vit': ViTSizes}.get(family),
                               options)
    backbone = backbone_from_name(backbone_name, **sizes)
    if pretrained:
        load_pretrained(backbone, pretrained)
    return EarlyFusion(backbone, num_classes, x_channels if cfg.use_x else 0, cfg.head_dim)


def build_rgb_only(backbone_name: str, num_classes: int, x_channels: int,
                   pretrained: str | None = None,
                   **options) -> 'EarlyFusion':
    """The RGB "foundation" baseline: the early-fusion model with X ignored (`RGBOnlyConfig`)."""
    family = backbone_name.partition('-')[0]
    # checks the names
    split_options(RGBOnlyConfig, {'swin': SwinSizes, 'vit': ViTSizes}.get(family), options)
    return build_early_fusion(backbone_name, num_classes, x_channels, pretrained, use_x=False,
                              **options)


# ----------------------------------------------------------------------------
# KTB (Keep the Balance: a parameter-efficient symmetrical framework for RGB+X
# semantic segmentation). One frozen ImageNet-22K Swin runs twice, on the RGB
# and on the X token stream; only MAPA (modality-aware prompting and adapters),
# DSCF (dynamic sparse cross-modality fusion), the X patch embedding and three
# SegFormer heads are trained, with MMST (masked modality self-teaching).
# Facts and parameter counts: docs/ktb.md; rank tables: supplement Tables 1-3.
#
# Stream layout: the two streams are stacked along the batch axis,
# (2B, H, W, C) channels-last, rows [0, B) the RGB stream and [B, 2B) the X
# stream, so that every frozen Swin block runs once for both (half the kernel
# launches) while the MAPA modules treat the halves separately.
# ----------------------------------------------------------------------------

def release_init(module, conv_like=()):
    """The KTB release's initialisation of what it trains (its CMNeXt._init_weights,
    run over the whole model before the pretrained Swin is loaded over it):
    linears trunc-normal(0.02); convolutions, and the linears in `conv_like`
    (1x1 convolutions there), normal with std sqrt(2 / fan_out), fan_out =
    k*k*out_channels (groups not divided out); biases 0; norms weight 1."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) or any(m is c for c in conv_like):
            nn.init.normal_(m.weight,
                            std=math.sqrt(2.0 / (m.weight.shape[0] * math.prod(m.weight.shape[2:]))))
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.BatchNorm2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)


class MAPAPrompt(nn.Module):
    """KTB MAPA, part 1: modality-aware prompting (docs/ktb.md, part 2), once at
    the start of every Swin stage.

        X~_rgb = W_rgb X_rgb,  X~_x = W_x X_x                 (C -> r)
        X_uni  = W_up W_p [X~_rgb ; X~_x]                     (2r -> r -> C, no activation)
        P_m    = gamma_m * X_uni + beta_m                     (per channel, m = rgb, x)
        X_m   <- X_m + X_uni + P_m
    forward(streams: (2B, H, W, C), RGB rows first) -> (2B, H, W, C).
    `gamma` and `beta` are (2, C): row 0 RGB, row 1 X.
    """

    def __init__(self, dim, rank):
        super().__init__()
        self.w_rgb = nn.Linear(dim, rank)
        self.w_x = nn.Linear(dim, rank)
        self.w_p = nn.Linear(2 * rank, rank)
        self.w_up = nn.Linear(rank, dim)
        release_init(self)  # the release's: trunc-normal(0.02) linears, zero biases
        self.gamma = nn.Parameter(1 + 0.02 * torch.randn(2, dim))  # gamma ~ N(1, 0.02)
        self.beta = nn.Parameter(0.02 * torch.randn(2, dim))  # beta ~ N(0, 0.02)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        s = streams.unflatten(0, (2, -1))  # (2, B, H, W, C)
        low = torch.cat([self.w_rgb(s[0]), self.w_x(s[1])], -1)  # (B, H, W, 2r): [X~_rgb ; X~_x]
        uni = self.w_up(self.w_p(low))  # (B, H, W, C): X_uni
        # (2, 1, 1, 1, C)
        gamma, beta = self.gamma[:, None, None, None], self.beta[:, None, None, None]
        # X_m + X_uni + P_m, (2B, H, W, C), in 2 passes
        return torch.addcmul(s + beta, 1 + gamma, uni).flatten(0, 1)


class MAPAAdapter(nn.Module):
    """KTB MAPA, part 2: the modality-specific adapters of one Swin block
    (docs/ktb.md, part 3), one per modality, in parallel with the frozen FFN:

        A_m(z) = W2_m Dropout_0.1(ReLU(W1_m z))          W1_m: C -> r, W2_m: r -> C
        out    = z + FFN(LN2(z)) + 0.5 * A_m(z),  z = x + WMSA(LN1(x))
    Used as the block's `parallel` module (see SwinTransformerBlock): forward(z:
    (2B, H, W, C), RGB rows first) -> 0.5 * [A_rgb(z_rgb) ; A_x(z_x)], (2B, H, W, C);
    forward(z, out) -> out + that, added into `out` in place (no new full-size map;
    W2's bias rides in the same matmul as one more rank: [h, 1] [W2, b2]^T).
    The weights of both modalities are stacked, (2, out, in) as nn.Linear's,
    so one batched matmul serves both halves. W1 and W2 trunc-normal(0.02),
    biases 0: the release's init (its model-wide `release_init` overrides the
    adapter's own kaiming / zero init).
    """

    scale = 0.5

    def __init__(self, dim, rank, dropout=0.1):
        super().__init__()
        self.w1 = nn.Parameter(nn.init.trunc_normal_(torch.empty(2, rank, dim), std=0.02))
        self.b1 = nn.Parameter(torch.zeros(2, 1, rank))
        self.w2 = nn.Parameter(nn.init.trunc_normal_(torch.empty(2, dim, rank), std=0.02))
        self.b2 = nn.Parameter(torch.zeros(2, 1, dim))
        self.dropout = Dropout(dropout, dim=1)  # on (2, B*H*W, r): the batch is axis 1

    def forward(self, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        z2 = z.reshape(2, -1, z.shape[-1])  # (2, B*H*W, C): RGB tokens, X tokens
        # (2, B*H*W, r)
        h = self.dropout(F.relu(torch.baddbmm(self.b1, z2, self.w1.transpose(1, 2))))
        if out is None:
            return torch.baddbmm(self.b2, h, self.w2.transpose(1, 2), beta=self.scale,
                                 alpha=self.scale).view(z.shape)
        h1 = torch.cat([h, h.new_ones(*h.shape[:2], 1)], -1)  # (2, B*H*W, r + 1): [h, 1]
        w21 = torch.cat([self.w2.transpose(1, 2), self.b2], 1)  # (2, r + 1, C): [W2, b2]^T
        # an in-place matmul takes out's dtype (autocast casts none)
        h1, w21 = h1.to(out.dtype), w21.to(out.dtype)
        # out + 0.5 A_m(z)
        return out.view(2, -1, out.shape[-1]).baddbmm_(h1, w21, alpha=self.scale).view(z.shape)


def _normalised(pixels, size):
    """Pixel coordinates -> grid_sample's align_corners=True frame [-1, 1] (a map of size 1 ->
    -1)."""
    return 2 * pixels / max(size - 1, 1) - 1


def query_grid(H, W, device=None):
    """Every pixel of an H x W map in grid_sample's (x, y) order, normalised: (H*W, 2)."""
    y, x = torch.meshgrid(_normalised(torch.arange(H, device=device, dtype=torch.float), H),
                          _normalised(torch.arange(W, device=device, dtype=torch.float), W),
                          indexing='ij')
    return torch.stack([x, y], -1).view(-1, 2)


def reference_points(Hk, Wk, device=None):
    """DSCF reference points, DAT's grid as the KTB release computes it: on each
    axis of Hk (Wk) key points, (j + 0.5) / (Hk - 1) * 2 - 1, j = 0 .. Hk-1, in
    grid_sample's normalised (x, y) frame: (Hk, Wk, 2). It is slightly wider than
    [-1, 1] (the clamp of the sampling points pulls the outer ones in); on an
    axis with one key point the division by 0 gives +inf, which the clamp puts
    on the bottom / right border, as in the release."""
    axis = lambda k: (torch.arange(k, device=device, dtype=torch.float) + 0.5) / (k - 1) * 2 - 1
    y, x = torch.meshgrid(axis(Hk), axis(Wk), indexing='ij')
    return torch.stack([x, y], -1)


def relative_position_bias(table, queries, keys):
    """DSCF's relative-position bias (docs/ktb.md, part 4.6; DAT's table read by
    bilinear sampling): the learnable table (h, 2Gh - 1, 2Gw - 1), made for a
    Gh x Gw query grid, is read at (query - key) / 2 in normalised coordinates,
    which hits its cells exactly on a Gh x Gw grid and interpolates on others.

    table (h, Th, Tw); queries (Nq, 2); keys (B, g, Nk, 2) per offset group, the
    h heads split evenly over the g groups -> bias (B, h, Nq, Nk).
    """
    B, g, Nk, _ = keys.shape
    h = table.shape[0]
    # (query - key) / 2, scaled and negated on the small operands: their backward then stays small
    # too (B*g, Nq, Nk, 2), in [-1, 1]
    disp = (0.5 * queries)[None, :, None] + (-0.5 * keys).flatten(0, 1)[:, None]
    # (B*g, h/g, Th, Tw)
    tab = table.view(1, g, h // g, *table.shape[1:]).expand(B, -1, -1, -1, -1).flatten(0, 1)
    # (B*g, h/g, Nq, Nk)
    bias = F.grid_sample(tab, disp.to(tab.dtype), mode='bilinear', align_corners=True)
    return bias.view(B, h, queries.shape[0], Nk)  # (B, h, Nq, Nk), head j of group j // (h/g)


class OffsetNet(nn.Module):
    """DSCF offset network theta_m of one modality (docs/ktb.md, part 4.3, DAT's
    conv_offset), shared by the offset groups: depth-wise k x k conv of stride s,
    LayerNorm over channels, GELU, 1x1 conv to 2 (no bias).
    forward((B*g, c, H, W)) -> offsets (B*g, ceil(H/s), ceil(W/s), 2) in (x, y) order.
    """

    def __init__(self, channels, kernel, stride):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, kernel, stride, kernel // 2, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, 2, bias=False)  # the 1x1 conv, on channels-last maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.norm(self.dwconv(x).permute(0, 2, 3, 1))))  # (B*g, Hk, Wk, 2)


class DSCF(nn.Module):
    """KTB DSCF: dynamic sparse cross-modality fusion of one stage (docs/ktb.md, part 4).

    1. h_rgb = W_a X_rgb, h_x = W_b X_x                (C -> r, the normed stage outputs)
    2. Q0 = GELU(BN(Conv3x3([h_rgb ; h_x]))),  Q = W_q Q0   (2r -> r, r -> r)
    3. offsets per modality and group: theta_rgb(h_rgb), theta_x(h_x) on a grid of
       (H/s) x (W/s) reference points; p_m = clamp(ref + theta_m, -1, 1)
    4. bilinear sampling (align_corners=True) at both point sets:
       F_rgb = [h_rgb(p_rgb), h_rgb(p_x)], F_x = [h_x(p_rgb), h_x(p_x)], F_q = [Q(p_rgb), Q(p_x)]
    5. dynamic modality gate per sampled point: w = softmax_2(W_g2 ReLU(W_g1 F_q)),
       S = w_rgb F_rgb + w_x F_x                          ("dynamic")
    6. all H*W queries attend to the 2 (H/s)(W/s) keys (SDPA; "sparse"):
       O = W_o softmax(Q K^T / sqrt(d) + B) V,  K = W_k S, V = W_v S, B read from
       the relative-position table (`relative_position_bias`)
    7. Fused = alpha * O + beta * Q0 (per channel);  8. output W_up Fused (r -> C);
       the model applies the frozen fuse norm.
    forward(f_rgb, f_x: (B, H, W, C) each, any H, W) -> (B, H, W, C).
    Channel c of the sampled maps belongs to offset group c // (r/g); head j
    reads the bias at the points of group j // (h/g).
    """

    def __init__(self, dim, rank, stride, groups, heads, kernel=9, bias_grid=(60, 80), alpha=1e-3):
        super().__init__()
        if rank % groups or rank % heads or heads % groups:
            raise ValueError(f"DSCF rank {rank} must be divisible by groups {groups} and "
                             f"heads {heads}, "
                             f"and heads by groups")
        self.rank, self.stride, self.groups, self.heads = rank, stride, groups, heads
        self.w_a = nn.Linear(dim, rank)
        self.w_b = nn.Linear(dim, rank)
        self.query = nn.Sequential(nn.Conv2d(2 * rank, rank, 3, padding=1), nn.BatchNorm2d(rank),
                                   nn.GELU())  # Q0
        self.w_q = nn.Linear(rank, rank)
        self.offset_rgb = OffsetNet(rank // groups, kernel, stride)
        self.offset_x = OffsetNet(rank // groups, kernel, stride)
        self.gate = nn.Sequential(nn.Linear(rank, rank), nn.ReLU(), nn.Linear(rank, 2))
        self.w_k = nn.Linear(rank, rank)
        self.w_v = nn.Linear(rank, rank)
        self.w_o = nn.Linear(rank, rank)
        self.rpe_table = nn.Parameter(torch.zeros(heads, 2 * bias_grid[0] - 1,
                                                  2 * bias_grid[1] - 1))
        nn.init.trunc_normal_(self.rpe_table, std=0.01)  # DAT's init
        self.alpha = nn.Parameter(torch.full((rank,), float(alpha)))
        self.beta = nn.Parameter(torch.ones(rank))
        self.w_up = nn.Linear(rank, dim)
        # the release's init; its W_q, gate, W_k, W_v, W_o and offset projections are 1x1
        # convolutions, so the offsets start large (std 1: most sampling points start on the border)
        # and the gate near-hard
        release_init(self,
                     conv_like=(self.w_q, self.gate[0], self.gate[2], self.w_k, self.w_v, self.w_o,
                                      self.offset_rgb.proj, self.offset_x.proj))

    def sampling_points(self, h_rgb, h_x):
        """Step 3: h_rgb, h_x (B, H, W, r) -> points (B, g, 2 Nk, 2), p_rgb then p_x, Nk = Hk*Wk."""
        B, H, W, r = h_rgb.shape
        g = self.groups
        # (2, B*g, r/g, H, W)
        grouped = torch.stack([h_rgb, h_x]).permute(0, 1, 4, 2, 3).reshape(2, B * g, r // g, H, W)
        offsets = [self.offset_rgb(grouped[0]), self.offset_x(grouped[1])]  # each (B*g, Hk, Wk, 2)
        ref = reference_points(*offsets[0].shape[1:3], device=h_rgb.device)  # (Hk, Wk, 2)
        # (B*g, 2, Hk, Wk, 2)
        points = torch.stack([(ref + off).clamp(-1, 1) for off in offsets], 1)
        return points.view(B, g, -1, 2)  # (B, g, 2*Nk, 2)

    def forward(self, f_rgb: torch.Tensor, f_x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = f_rgb.shape
        r, g, h = self.rank, self.groups, self.heads
        h_rgb, h_x = self.w_a(f_rgb), self.w_b(f_x)  # (B, H, W, r)
        # (B, H, W, r)
        q0 = self.query(torch.cat([h_rgb, h_x], -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        q = self.w_q(q0)  # (B, H, W, r)
        points = self.sampling_points(h_rgb, h_x)  # (B, g, 2Nk, 2)
        n = points.shape[2]  # 2 Nk keys
        # one grid_sample reads h_rgb, h_x and Q of every group at that group's points
        # (B, g, 3, r/g, H, W)
        src = torch.stack([h_rgb, h_x, q], 3).view(B, H, W, 3, g, r // g).permute(0, 4, 3, 5, 1, 2)
        sampled = F.grid_sample(src.reshape(B * g, 3 * r // g, H, W),
                                points.flatten(0, 1)[:, None].to(src.dtype),
                                mode='bilinear', align_corners=True)  # (B*g, 3r/g, 1, 2Nk)
        # (3, B, 2Nk, r)
        sampled = sampled.view(B, g, 3, r // g, n).permute(2, 0, 4, 1, 3).reshape(3, B, n, r)
        feat_rgb, feat_x, feat_q = sampled  # F_rgb, F_x, F_q
        w = self.gate(feat_q).softmax(-1)  # (B, 2Nk, 2): per-point modality gate
        s = w[..., :1] * feat_rgb + w[..., 1:] * feat_x  # (B, 2Nk, r)
        k = self.w_k(s).view(B, n, h, r // h).transpose(1, 2)  # (B, h, 2Nk, d)
        v = self.w_v(s).view(B, n, h, r // h).transpose(1, 2)  # (B, h, 2Nk, d)
        qh = q.view(B, H * W, h, r // h).transpose(1, 2)  # (B, h, H*W, d)
        # (B, h, H*W, 2Nk)
        bias = relative_position_bias(self.rpe_table, query_grid(H, W, h_rgb.device), points)
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=bias.to(qh.dtype))  # (B, h, H*W, d)
        o = self.w_o(o.transpose(1, 2).reshape(B, H, W, r))  # (B, H, W, r)
        return self.w_up(self.alpha * o + self.beta * q0)  # (B, H, W, C)


def mmst_drop(batch, generator=None):
    """KTB MMST modality masking: which samples lose which modality (docs/ktb.md, part 5).

    The release hard-codes a batch of 4: one sample without RGB, one without X,
    two intact. Generalised (design choice): the batch is shuffled and dealt,
    from a random starting phase, the repeating roles (intact, no RGB, intact,
    no X). Every batch of 4k then has exactly k samples without RGB, k without
    X and 2k intact; for other sizes the counts are those in expectation (each
    sample is intact with probability 1/2 and loses either modality with 1/4);
    batch 2 always has one intact sample and one without RGB or X (a coin flip);
    batch 1 is intact, without RGB or without X with probabilities 1/2, 1/4, 1/4.
    Draws come from `generator` (torch's global RNG when None), on the host.
    Returns drop (2, batch) bool on the CPU: row 0 = RGB tokens zeroed, row 1 = X tokens zeroed.
    """
    if batch < 1:
        raise ValueError(f"mmst_drop needs a batch of at least 1, got {batch}")
    phase = torch.randint(4, (), generator=generator, device='cpu')
    order = torch.randperm(batch, generator=generator, device='cpu')
    role = torch.empty(batch, dtype=torch.long, device='cpu')
    role[order] = (torch.arange(batch, device='cpu') + phase) % 4  # 0, 2 intact; 1 no RGB; 3 no X
    return torch.stack([role == 1, role == 3])


def self_teaching_labels(logits, label, ignore_index=255):
    """KTB MMST self-teaching target M: the ground truth where the fused head S1
    is right, `ignore_index` where it is wrong (y_hat = argmax S1, no gradient).
    logits (B, K, H, W), label (B, H, W) int64 -> M (B, H, W) int64."""
    pred = logits.detach().argmax(1)
    return torch.where(pred == label, label, torch.full_like(label, ignore_index))


@dataclass
class KTBConfig(Options):
    """KTB's options (docs/ktb.md); per-stage lists hold one value per Swin stage."""
    owner: typing.ClassVar[str] = 'ktb'
    window_size: int = option(
        12, "the Swin's window side M (the official 384 px / 22K files: 12)",
        default_from='release')
    drop_path_rate: float = option(
        0.3, "stochastic depth of the frozen Swin in training: rates 0 .. this over its blocks",
        low=0, high=1, high_open=True, default_from='release')
    prompt_ranks: list[int] | None = option(
        None, "rank of the MAPA prompt per stage (Sec. 2, supplement Table 1)",
        none='C/8 per stage', default_from='paper')
    adapter_ranks: list[int] | None = option(
        None, "rank of the MAPA adapters per stage (Sec. 3, supplement Table 2)",
        none='C/16 per stage', default_from='paper')
    dscf_ranks: list[int] | None = option(
        None, "DSCF's width r_f per stage (Sec. 4, supplement Table 3)",
        none='C/8 per stage', default_from='paper')
    dscf_strides: list[int] = option(
        (8, 4, 2, 1),
        "DSCF's stride s per stage: keys sampled at (H/s) x (W/s) reference points (Sec. 4)",
        default_from='release')
    dscf_groups: list[int] = option(
        (1, 2, 4, 8),
        "DSCF's offset groups per stage: each group of r_f/g channels samples its own points (Sec."
        " 4)", default_from='release')
    dscf_heads: list[int] = option(
        (2, 4, 8, 16), "DSCF's attention heads per stage (Sec. 4)", default_from='release')
    dscf_kernel: int = option(
        9, "kernel side of DSCF's depth-wise offset convolution (Sec. 4.3)", default_from='release')
    bias_grid: list[int] = option(
        (60, 80),
        "Gh, Gw: the query grid of DSCF's relative-position bias tables, (heads, 2Gh-1, 2Gw-1); "
        "other grids read it bilinearly (Sec. 4.6)", default_from='release')
    mmst: bool = option(
        True,
        "MMST: modality masking in training and the self-teaching heads S2, S3 (Sec. 5; False: the"
        " ablation)", default_from='paper')
    dscf: bool = option(
        True, "DSCF fusion (Sec. 4; False: the stage outputs are added)", default_from='paper')
    prompting: bool = option(
        True, "MAPA prompting at each stage's start (Sec. 2; False: the ablation)",
        default_from='paper')
    adapters: bool = option(
        True, "MAPA adapters in every block (Sec. 3; False: the ablation)", default_from='paper')
    lambda2: float = option(
        0.01,
        "weight of the self-teaching losses: L = CE(S1, gt) + lambda2 (CE(S2, M) + CE(S3, M)) "
        "(Sec. 5)", default_from='paper')
    ohem: bool = option(
        False,
        "OHEM cross-entropy (CMNeXt's: losses above -log 0.7, at least 1/16 of the pixels); the "
        "recipe sets it on MCubeS", default_from='release')
    fused_head_dim: int = option(
        512, "embedding width of the fused head S1 (SegFormer head)", default_from='release')
    aux_head_dim: int = option(
        256, "embedding width of the stream heads S2, S3", default_from='release')
    x_embed_norm: bool = option(
        True,
        "X's patch embedding ends in a LayerNorm as Swin's; with its zero bias a patch and its "
        "positive multiples embed alike (docs/ktb.md)", default_from='release')


# The KTB release's names -> KTB's (`rename_keys`): its Swin as mmsegmentation's, then KTB's parts
RELEASE_HEADS = {'': 's1', '_rgb': 's2', '_dte': 's3'}
KTB_RELEASE_KEYS = SWIN_MMSEG_KEYS + (
    (r'backbone\.extra_patch_embed\.projection\.(.*)', r'x_patch_embed.proj.\1', None),
    (r'backbone\.extra_patch_embed\.norm\.(.*)', r'x_patch_embed.norm.\1', None),
    (r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.MLP_RGB_Adapter\.D_fc(\d)\.weight',
     r'adapters.\1.\2.w\3', 'rgb'),
    (r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.MLP_RGB_Adapter\.D_fc(\d)\.bias',
     r'adapters.\1.\2.b\3', 'rgb'),
    (r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.MLP_DTE_Adapter\.D_fc(\d)\.weight',
     r'adapters.\1.\2.w\3', 'x'),
    (r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.MLP_DTE_Adapter\.D_fc(\d)\.bias',
     r'adapters.\1.\2.b\3', 'x'),
    (r'backbone\.MPGBlocks\.(\d+)\.D_fc1\.(.*)', r'prompts.\1.w_rgb.\2', None),
    (r'backbone\.MPGBlocks\.(\d+)\.D_fc2\.(.*)', r'prompts.\1.w_x.\2', None),
    (r'backbone\.MPGBlocks\.(\d+)\.P_fc2\.(.*)', r'prompts.\1.w_p.\2', None),
    (r'backbone\.MPGBlocks\.(\d+)\.U_fc1\.(.*)', r'prompts.\1.w_up.\2', None),
    (r'backbone\.MPGBlocks\.(\d+)\.tfts_(gamma|beta)_rgb', r'prompts.\1.\2', 'rgb'),
    (r'backbone\.MPGBlocks\.(\d+)\.tfts_(gamma|beta)_dte', r'prompts.\1.\2', 'x'),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.D_fc1\.(.*)', r'dscf.\1.w_a.\2', None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.D_fc2\.(.*)', r'dscf.\1.w_b.\2', None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.U_fc1\.(.*)', r'dscf.\1.w_up.\2', None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.deform_weight', r'dscf.\1.alpha', None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.identity_weight', r'dscf.\1.beta', None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.rpe_table', r'dscf.\1.rpe_table', None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.conv_offset_x\.0\.(.*)',
     r'dscf.\1.offset_rgb.dwconv.\2', None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.conv_offset_x\.1\.norm\.(.*)',
     r'dscf.\1.offset_rgb.norm.\2', None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.conv_offset_x\.3\.weight',
     r'dscf.\1.offset_rgb.proj.weight', 'yx'),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.conv_offset_y\.0\.(.*)',
     r'dscf.\1.offset_x.dwconv.\2', None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.conv_offset_y\.1\.norm\.(.*)',
     r'dscf.\1.offset_x.norm.\2', None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.conv_offset_y\.3\.weight',
     r'dscf.\1.offset_x.proj.weight', 'yx'),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.fuse_q\.conv\.(.*)', r'dscf.\1.query.\2',
     None),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.proj_q\.(.*)', r'dscf.\1.w_q.\2', '1x1'),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.get_sample_weight\.(.*)', r'dscf.\1.gate.\2',
     '1x1'),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.proj_(k|v)\.(.*)', r'dscf.\1.w_\2.\3',
     '1x1'),
    (r'backbone\.DeformMPGBlocks\.(\d+)\.deform_atten\.proj_out\.(.*)', r'dscf.\1.w_o.\2', '1x1'),
    (r'backbone\.norm(\d)\.(.*)', r'rgb_norms.\1.\2', None),
    (r'backbone\.extra_norm(\d)\.(.*)', r'x_norms.\1.\2', None),
    (r'backbone\.fuse_norm(\d)\.(.*)', r'fuse_norms.\1.\2', None),
    (r'decode_head(|_rgb|_dte)\.linear_c(\d)\.proj\.(.*)',
     lambda m: f"{RELEASE_HEADS[m[1]]}.linear_c.{int(m[2]) - 1}.{m[3]}", None),
    (r'decode_head(|_rgb|_dte)\.linear_fuse\.conv\.(.*)',
     lambda m: f"{RELEASE_HEADS[m[1]]}.linear_fuse.0.{m[2]}", None),
    (r'decode_head(|_rgb|_dte)\.linear_fuse\.bn\.(.*)',
     lambda m: f"{RELEASE_HEADS[m[1]]}.linear_fuse.1.{m[2]}", None),
    (r'decode_head(|_rgb|_dte)\.(linear_pred\..*)', lambda m: f"{RELEASE_HEADS[m[1]]}.{m[2]}",
     None),
)


def ktb_from_release(sd, own):
    """A trained KTB of the authors' release (its whole model) -> a `KTB` state dict `own`'s."""
    return {k: v for k, v in rename_keys(sd, KTB_RELEASE_KEYS, own).items()
            if not k.endswith('relative_position_index')}  # a buffer rebuilt here


class KTB(RGBXModel):
    """KTB: Keep the Balance (docs/ktb.md), RGB + X segmentation on one frozen Swin.

    - symmetrical streams (sec. 1): the frozen Swin (blocks, patch merging, RGB
      patch embedding) runs each stage on the RGB and the X stream; X has its
      own trainable patch embedding, freshly initialised as in the release
      (`release_init`, like the other trained parts); 1-channel X is repeated
      to 3 channels;
    - MAPA prompting (`MAPAPrompt`, sec. 2) at the start of every stage, MAPA
      adapters (`MAPAAdapter`, sec. 3) in every block;
    - DSCF (`DSCF`, sec. 4) fuses the two normed outputs of every stage;
    - heads (sec. 5): S1 (`s1`, SegFormer, embed 512) on the fused maps, S2 / S3
      (`s2`, `s3`, embed 256) on the RGB / X stream maps; only S1 at inference;
    - MMST (sec. 5): in training, `mmst_drop` zeroes a modality's tokens of some
      samples right after the patch embeddings, and
      L = CE(S1, gt) + lambda2 (CE(S2, M) + CE(S3, M)), M = `self_teaching_labels`.
    Output norms: rgb_norms[i], x_norms[i] on the stream outputs and
    fuse_norms[i] on DSCF's: twelve fresh LayerNorms (unit weight, zero bias),
    all frozen, as in the release (its norm{i}, extra_norm{i}, fuse_norm{i});
    the backbone's final `norm` is not used (`build_ktb` builds the Swin without
    one, as the release has none). The backbone is taken as it is: its stochastic
    depth must draw per stream (`swin(..., streams=2)`) when it has any.

    forward(rgb (B, 3, H, W), x (B, Cx, H, W), label=None) -> logits (B, K, H, W),
    or (L, logits) when label (B, H, W) int64 (255 = ignore) is given.
    Options (`cfg`, a `KTBConfig`, or its fields as keywords): ranks per stage (supplement
    Tables 1-3), DSCF's sizes, the ablation switches, lambda2, the head widths.
    Build from a backbone that already holds its pretrained weights, e.g. with
    `build_ktb`, or load a whole trained KTB of the release with `load_pretrained`.
    """

    streams = 2  # the frozen backbone runs once per modality (eval.py's speed floor)

    def __init__(self, backbone: SwinTransformer, num_classes: int, x_channels: int,
                 cfg: KTBConfig | None = None,
                 **options):
        super().__init__()
        if not isinstance(backbone, SwinTransformer):
            raise TypeError(f"KTB runs on a SwinTransformer backbone, got "
                            f"{type(backbone).__name__}")
        if x_channels not in (1, 3):
            raise ValueError(f"KTB's X patch embedding takes 3 channels: x_channels must be 1 "
                             f"(repeated to 3) or 3, got {x_channels}")
        if any(isinstance(m, Dropout) and m.p and m.streams != 2 for m in backbone.modules()):
            raise ValueError("KTB stacks its two streams on the batch axis: build the Swin's "
                             "stochastic depth "
                             "per stream, rgbx.swin(..., streams=2) (as build_ktb does)")
        if cfg is not None and (not isinstance(cfg, KTBConfig) or options):
            raise TypeError("KTB takes a KTBConfig or its fields as keywords, not both nor other values")
        cfg = cfg if cfg is not None else split_options(KTBConfig, None, options)[0]
        dims = backbone.dims
        n = len(dims)
        per_stage = {}  # ranks, DSCF strides, groups and heads: one value per stage
        for name, div in (('prompt_ranks', 8), ('adapter_ranks', 16), ('dscf_ranks', 8),
                          ('dscf_strides', None),
                          ('dscf_groups', None), ('dscf_heads', None)):
            given = getattr(cfg, name)
            per_stage[name] = list(given) if given is not None else [max(1, c // div) for c in dims]
            if len(per_stage[name]) != n:
                raise ValueError(f"{name} needs one value per stage ({n}), got {per_stage[name]}")
        self.x_channels, self.mmst, self.lambda2, self.ohem = x_channels, cfg.mmst, cfg.lambda2, cfg.ohem
        self.per_stage = per_stage
        self.backbone = backbone.requires_grad_(False)
        self.x_patch_embed = PatchEmbed(3, dims[0], 4, norm=cfg.x_embed_norm)
        self.prompts = nn.ModuleList(MAPAPrompt(c, r) for c, r in zip(dims, per_stage['prompt_ranks'])) \
            if cfg.prompting else None
        self.adapters = nn.ModuleList(
            nn.ModuleList(MAPAAdapter(c, r) for _ in layer.blocks)
            for c, r, layer in zip(dims, per_stage['adapter_ranks'],
                                   backbone.layers)) if cfg.adapters else None
        alphas = [1e-3] * (n - 1) + [1.0]  # alpha init: 1e-3 for stages 1-3, 1 for stage 4
        self.dscf = nn.ModuleList(
            DSCF(c, r, s, g, h, cfg.dscf_kernel, cfg.bias_grid, a)
            for c, r, s, g, h, a in zip(dims, per_stage['dscf_ranks'], per_stage['dscf_strides'],
                                        per_stage['dscf_groups'], per_stage['dscf_heads'],
                                        alphas)) if cfg.dscf else None
        self.rgb_norms, self.x_norms, self.fuse_norms = (nn.ModuleList(nn.LayerNorm(c)
                                                                       for c in dims) for _ in range(3))
        for norms in (self.rgb_norms, self.x_norms, self.fuse_norms):
            norms.requires_grad_(False)
        self.s1 = SegFormerHead(dims, cfg.fused_head_dim, num_classes)
        self.s2 = SegFormerHead(dims, cfg.aux_head_dim, num_classes) if cfg.mmst else None
        self.s3 = SegFormerHead(dims, cfg.aux_head_dim, num_classes) if cfg.mmst else None
        for part in (self.x_patch_embed, self.s1, self.s2, self.s3):
            # fresh, as in the release: its X patch embedding is not loaded from the Swin file
            if part is not None:
                release_init(part)

    def embed(self, rgb, x):
        """Patch embeddings of both streams, (2B, H/4, W/4, C), RGB rows first.
        A modality whose input is exactly all zeros for a sample (eval.py's missing
        modality) has its tokens zeroed, the state MMST trains for (design
        choice); in training, `mmst_drop` zeroes more (MMST masking)."""
        B = rgb.shape[0]
        x = x.expand(-1, 3, -1, -1)  # 1-channel X repeated to 3 channels
        tokens = torch.cat([self.backbone.patch_embed(rgb), self.x_patch_embed(x)])  # (2B, h, w, C)
        drop = torch.stack([rgb.flatten(1).eq(0).all(1), x.flatten(1).eq(0).all(1)])  # (2, B)
        if self.training and self.mmst:
            drop = drop | draw_policy().draw(mmst_drop, B, dim=1).to(rgb.device)  # (2, B)
        # keep (2B, 1, 1, 1)
        return tokens * (~drop).flatten().to(tokens.dtype)[:, None, None, None]

    def encode(self, tokens):
        """The four stages on both streams: tokens (2B, h, w, C) -> (fused, rgb, x),
        each a list of four (B, C_i, H_i, W_i) maps (fused = after DSCF and the fuse norm)."""
        B = tokens.shape[0] // 2
        s, fused, f_rgb, f_x = tokens, [], [], []
        for i, layer in enumerate(self.backbone.layers):
            if self.prompts is not None:
                s = self.prompts[i](s)
            # (2B, H_i, W_i, C_i), both streams
            s = layer(s, None if self.adapters is None else self.adapters[i])
            a, b = self.rgb_norms[i](s[:B]), self.x_norms[i](s[B:])  # (B, H_i, W_i, C_i)
            fused.append(self.fuse_norms[i](self.dscf[i](a, b) if self.dscf is not None else a + b))
            f_rgb.append(a)
            f_x.append(b)
            if layer.downsample is not None:
                s = layer.downsample(s)
        # (B, C_i, H_i, W_i)
        return tuple([f.permute(0, 3, 1, 2) for f in maps] for maps in (fused, f_rgb, f_x))

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, label: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if rgb.ndim != 4 or rgb.shape[1] != 3 or x.ndim != 4 or x.shape[1] != self.x_channels \
                or x.shape[0] != rgb.shape[0] or x.shape[-2:] != rgb.shape[-2:]:
            raise ValueError(f"expected rgb (B, 3, H, W) and x (B, {self.x_channels}, H, W), "
                             f"got {tuple(rgb.shape)} and {tuple(x.shape)}")
        size = rgb.shape[-2:]
        if label is not None and (label.shape != (rgb.shape[0], *size)
                                  or label.dtype != torch.long):
            raise ValueError(f"label must be (B, H, W) int64, got {tuple(label.shape)} "
                             f"{label.dtype}")
        fused, f_rgb, f_x = self.encode(self.embed(rgb, x))
        # for the loss: the layout it reads fastest
        logits = self.s1(fused, size, channels_last=label is not None)
        if label is None:
            return logits
        loss = segmentation_loss(logits, label, self.ohem)
        if self.mmst:
            teach = self_teaching_labels(logits, label)
            loss = loss + self.lambda2 * (segmentation_loss(self.s2(f_rgb, size, channels_last=True), teach, self.ohem)
                                          + segmentation_loss(self.s3(f_x, size, channels_last=True), teach, self.ohem))
        return loss, logits

    def param_groups(self, weight_decay):
        """AdamW groups: the KTB release decays every trainable tensor, norms and biases
        included (the second group, without decay, stays empty)."""
        return [dict(params=[p for p in self.parameters() if p.requires_grad], weight_decay=weight_decay),
                dict(params=[], weight_decay=0.0)]

    def pretrained_target(self, sd):
        """A trained KTB of the authors' release loads into the whole model, a Swin file into the
        backbone."""
        return self if any(k.startswith('backbone.MPGBlocks.') for k in sd) else self.backbone

    def convert_checkpoint(self, sd):
        """A trained KTB of the release -> (this model's state dict, keys it may lack: the
        Swin's final norm, which the release has none of; notes), `ktb_from_release`."""
        own = self.state_dict()
        return ktb_from_release(sd, own), {k for k in own if k.startswith('backbone.norm.')}, []

    def param_counts(self):
        """{'trainable', 'total', and the trainable parameters per part of the paper}."""
        count = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters()
                                                  if p.requires_grad)
        return {'trainable': count(self), 'total': sum(p.numel() for p in self.parameters()),
                'adapters': count(self.adapters), 'prompting': count(self.prompts),
                'dscf': count(self.dscf),
                'dscf_bias_tables': sum(d.rpe_table.numel() for d in self.dscf or ()),
                'x_patch_embed': count(self.x_patch_embed), 's1': count(self.s1),
                's2+s3': count(self.s2) + count(self.s3)}


def build_ktb(backbone_name: str, num_classes: int, x_channels: int, pretrained: str | None = None,
              **options) -> KTB:
    """KTB on a Swin preset ('base' or 'large'; window 12 for the official
    swin_*_patch4_window12_384_22k.pth files, Microsoft's or mmsegmentation's),
    `pretrained` loaded into the frozen backbone; `options`: `KTBConfig`'s."""
    cfg, _ = split_options(KTBConfig, None, options)
    backbone = swin(backbone_name, window_size=cfg.window_size, drop_path_rate=cfg.drop_path_rate,
                    final_norm=False,
                    streams=2)
    if pretrained:
        load_pretrained(backbone, pretrained)
    return KTB(backbone, num_classes, x_channels, cfg)


# KTB's training recipes (supplement Sec. 7), per dataset (epochs, lr, weight decay): AdamW, batch
# 4, linear warm-up over 10 epochs from 0.1 x lr, then poly decay (power 0.9); the crop is the
# dataset's. Where the supplement and the release differ, the release: SUN RGB-D 4e-4 and PST900
# 6e-4 (supplement 1e-4); MCubeS 500 epochs at 6e-5 (of sec. 7's 250-500 and 4e-4 / 6e-5); DeLiVER
# 2e-4 (the paper's "1e-4 / 2e-4"). WHU-OPT-SAR is not in sec. 7: 60 epochs at 4e-5 follow GoPT. The
# baselines train with these too.
KTB_RECIPES = {'nyudv2': (400, 4e-4, 0.01), 'sunrgbd': (300, 4e-4, 0.01),
               'mfnet': (200, 8e-5, 5e-4),
               'pst900': (200, 6e-4, 0.01), 'mcubes': (500, 6e-5, 0.01),
               'deliver': (200, 2e-4, 0.01),
               'whu-opt-sar': (60, 4e-5, 0.01)}


def baseline_recipe(dataset, options=None):
    """The recipe of the early-fusion and RGB-only baselines: KTB_RECIPES' (none for a
    dataset outside it, e.g. the built-in demo, which brings its own)."""
    if dataset not in KTB_RECIPES:
        return Recipe()
    epochs, lr, weight_decay = KTB_RECIPES[dataset]
    return Recipe(epochs, lr, weight_decay, batch_size=4, warmup_epochs=10)


def ktb_recipe(dataset, options=None):
    """KTB's recipe: KTB_RECIPES, X fed as its [0, 1] values (8-bit / 255, no mean / std,
    as the release feeds it), OHEM cross-entropy on MCubeS (the release's); stochastic
    depth and window are `build_ktb`'s."""
    return replace(baseline_recipe(dataset), x_standardised=False, frozen_backbone=True,
                   options=dict(ohem=True) if dataset == 'mcubes' else {})


# ----------------------------------------------------------------------------
# GoPT (He, "Prompting Multi-Modal Image Segmentation with Semantic Grouping",
# AAAI 2024). A frozen MAE ViT and its frozen RGB patch embedding; before each
# prompted layer l a grouping prompter turns the auxiliary modality into one
# multiplicative prompt per RGB patch token (eq. 3). A prompter is a CUP
# (eq. 4-10: self-attention over aux tokens and C class tokens, then grouping of
# the aux tokens into C class-aware prompts) followed by an ACP (eq. 11-14: RGB
# tokens cross-attend to the class-aware prompts, then a grouping of the same
# form gives each RGB token its prompt); the class-aware prompts are the class
# tokens of the next prompter (eq. 15). Trained: prompters, aux patch embedding
# and the SETR-Naive head Psi. No official code exists: what the paper leaves open
# is marked "design choice, paper silent" (or "paper ambiguous") where it is decided.
#
# Prompt space: the prompters work in a low-rank width d_p (`prompt_dim`). One
# LayerNorm + linear `down` (D -> d_p) maps both modalities into it (the paper's
# ACP "shares prompt parameters among different modalities") and one linear `up`
# (d_p -> D) maps a prompt back: p = 1 + up(prompt), the paper's "prompts added to
# the RGB stream as residuals" written in eq. 3's product: f * p = f + f * up(prompt).
# Every prompt parameter starts xavier-uniform (the paper's implementation section).
# Table 4's parameter budgets: `gopt_param_counts`; figures in docs/gopt.md. Decisions the
# paper leaves open were made on a validation split, never the test scenes (docs/gopt.md).
# ----------------------------------------------------------------------------

GUMBEL_STD = math.pi / math.sqrt(6)  # standard deviation of Gumbel(0, 1), the noise of eq. 8


def gumbel_assign(logits, tau=1.0, hard=True, noise=False):
    """GoPT eq. 8-9: assignment of S tokens to C groups.

    logits (B, ..., S, C) -> A_hat (B, ..., S, C). Gumbel(0, 1) noise (drawn from
    torch's global RNG through `draw_policy()`) is added only when `noise`
    (training). hard: the forward value is exactly one-hot (argmax), the gradient is
    that of the soft A (straight-through); written one_hot + (A - sg(A)) so that the
    forward value is bit-exact. soft: A itself (the ablation of Fig. 7).
    """
    gumbel = -draw_policy().draw(lambda n: logits.new_empty((n, *logits.shape[1:])).exponential_(),
                                # gamma ~ Gumbel(0, 1), drawn for the global batch
                                logits.shape[0]).log() if noise else 0.0
    A = F.softmax((logits + gumbel) / tau, -1)  # eq. 8
    # eq. 9
    return F.one_hot(A.argmax(-1), A.shape[-1]).to(A.dtype) + (A - A.detach()) if hard else A


class Grouping(nn.Module):
    """GoPT eq. 8-10: the grouping module, g_m of CUP (eq. 7) and g_{rgb,m} of ACP (eq. 11).

    Every token picks one of the C groups (softmax over the groups of the logits
    (W_q t_i) . (W_k g_j), unscaled as eq. 8 writes them, eq. 8-9), then eq. 10
    merges the values of one side into the other, averaged over the assignment weights:
      into groups (CUP):  out_j = g_j + W_o (sum_i A_ij W_v t_i) / (sum_i A_ij)
      into tokens (ACP):  out_i = t_i + W_o (sum_j A_ij W_v g_j) / (sum_j A_ij),
    i.e. each token receives the group it is assigned to (design choice, paper
    silent: eq. 11 outputs one prompt per RGB token, so ACP's merge runs along
    the token's row of A, where sum_j A_ij = 1).
    forward(tokens (B, S, d), groups (B, C, d), into_tokens=False)
    -> (out (B, C, d) or (B, S, d), A_hat (B, S, C)).
    """

    def __init__(self, dim, hard=True, tau=1.0, scaled=False):
        super().__init__()
        self.hard, self.tau, self.scale = hard, tau, dim ** -0.5 if scaled else 1.0
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def logits(self, tokens, groups):
        """Eq. 8 before the noise: (B, S, C); times 1/sqrt(d) when `scaled` (not in eq. 8)."""
        return self.q(tokens) @ self.k(groups).transpose(1, 2) * self.scale

    def forward(self, tokens: torch.Tensor, groups: torch.Tensor, into_tokens: bool = False) -> tuple[torch.Tensor, ...]:
        # eq. 8-9, (B, S, C)
        A_hat = gumbel_assign(self.logits(tokens, groups), self.tau, self.hard, noise=self.training)
        # M: (B, dst, src)
        M, dst, src = (A_hat, tokens, groups) if into_tokens else (A_hat.transpose(1, 2), groups, tokens)
        den = M.sum(-1, keepdim=True)  # (B, dst, 1): sum_i A_ij
        # design choice, paper silent: an empty group (hard, sum 0) merges nothing: out_j = g_j +
        # W_o 0, divided by 1 (hard counts are whole numbers, so the forward pass is unchanged, and
        # the straight-through gradient of an empty group stays bounded); a soft group lighter than
        # 1e-6 is divided by 1e-6 (eq. 8's unscaled logits can give a soft group a weight near 0);
        # docs/gopt.md eq. 10
        return dst + self.o(M @ self.v(src) / den.clamp_min(1.0 if self.hard else 1e-6)), A_hat


CUP_ATTENTION = ('prenorm', 'plain')


class CUP(nn.Module):
    """GoPT eq. 4-10, class-aware uni-modal prompter.

    Self-attention (eq. 4-6, single head, no projections) over [aux tokens ; class tokens],
    then the grouping g_m (eq. 7-10) merges the aux tokens into C class-aware prompts.
    attention: 'plain' is eq. 6 as written, z_hat = softmax(z Z^T / sqrt(d)) Z;
    'prenorm' reads the paper's "a self-attention layer" as a standard pre-norm residual
    layer, z_hat = z + softmax(n Z_n^T / sqrt(d)) Z_n with n = LayerNorm(z)
    (design choice, paper silent: 'plain' averages every token towards one vector,
    so all class tokens leave it alike, see `gopt_diagnostics`).
    forward(aux (B, S, d), classes (B, C, d)) -> (aux_hat (B, S, d), prompts (B, C, d), A_hat (B, S,
    C)).
    """

    def __init__(self, dim, hard=True, tau=1.0, attention='prenorm', scaled=False):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6) if attention == 'prenorm' else None
        self.group = Grouping(dim, hard, tau, scaled)

    def forward(self, aux: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        S = aux.shape[1]
        z = torch.cat([aux, classes], 1)  # eq. 5, (B, S + C, d)
        n = (z if self.norm is None else self.norm(z))[:, None]  # (B, 1, S + C, d): one head
        a = F.scaled_dot_product_attention(n, n, n)[:, 0]  # eq. 4, 6, (B, S + C, d)
        z = a if self.norm is None else z + a
        aux_hat, classes_hat = z[:, :S], z[:, S:]
        prompts, A_hat = self.group(aux_hat, classes_hat)  # eq. 7-10
        return aux_hat, prompts, A_hat


class ACP(nn.Module):
    """GoPT eq. 11-14, alignment-induced cross-modal prompter.

    The RGB tokens cross-attend (eq. 14, single head, no projections) to `keys` (the
    class-aware prompts P_m, eq. 12-13), then the grouping g_{rgb,m} (eq. 11)
    assigns every read-out to one of `groups` and adds that group's value.
    forward(rgb (B, S, d), keys (B, K, d), groups (B, C, d)) -> prompts (B, S, d).
    """

    def __init__(self, dim, hard=True, tau=1.0, scaled=False):
        super().__init__()
        self.group = Grouping(dim, hard, tau, scaled)

    def forward(self, rgb: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        # eq. 12, 14, (B, S, d)
        read = F.scaled_dot_product_attention(rgb[:, None], keys[:, None], keys[:, None])[:, 0]
        return self.group(read, groups, into_tokens=True)[0]  # eq. 11


ACP_READINGS = ('literal', 'aligned')
# build_gopt's `acp`; design choice, paper ambiguous: 'aligned', decided on the validation split
# (evidence: study/gopt-validation/results.md; see GroupingPrompter and docs/gopt.md)
ACP_DEFAULT = 'aligned'


class GroupingPrompter(nn.Module):
    """One grouping prompter of GoPT (Fig. 3-4), at a prompted layer l: CUP, then ACP.

    forward(rgb (B, S, d), aux (B, S, d), classes (B, C, d)) -> (prompt (B, S, d),
    CUP's self-attended aux tokens (B, S, d), class tokens for the next prompter (B, C, d)).
    The class-aware prompts are the next prompter's class tokens (eq. 15).
    reading: how the prompt of RGB token i is read from eq. 11-14 (CUP and ACP both present):
      'literal': p_i = ACP_i = r_i + W_o W_v P_{j*(i)}, r_i = phi_ca(f_rgb_i, P, P) (eq. 12, 14) and
                 j*(i) the group of r_i (eq. 8-9, 11): the aux image reaches token i only through
                 the C per-image vectors P, whatever the aux content at token i's own place;
      'aligned': p_i = ACP_i + (A_hat P)_i, adding the aligned CUP prompt: the class-aware prompt of
                 the group to which CUP assigned the aux token at the same place i (eq. 7-10; the
                 modalities are aligned, the paper's "alignment-induced"). No extra parameter.
      Design choice, paper ambiguous: 'aligned' (ACP_DEFAULT), decided on the validation split
      (docs/gopt.md: the paper's "alignment-induced" ACP, which eq. 11-14 do not write).
    Ablations of Table 4 (design choice, paper silent; `reading` does not apply):
      w/o ACP: each RGB token takes the class-aware prompt to which CUP assigned
               the aux token at the same place (the modalities are aligned): p_i = (A_hat P)_i;
      w/o CUP: ACP reads the aux tokens themselves (keys) and groups with the
               class tokens, which then stay the learned ones at every layer.
    """

    def __init__(self, dim, cup=True, acp=True, hard=True, tau=1.0, attention='prenorm',
                 scaled=False,
                 reading=ACP_DEFAULT):
        super().__init__()
        if not (cup or acp):
            raise ValueError("a grouping prompter needs CUP, ACP or both")
        if reading not in ACP_READINGS:
            raise ValueError(f"acp must be one of {ACP_READINGS}, not {reading!r}")
        self.cup = CUP(dim, hard, tau, attention, scaled) if cup else None
        self.acp = ACP(dim, hard, tau, scaled) if acp else None
        self.reading = reading

    def forward(self, rgb: torch.Tensor, aux: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.cup is None:
            return self.acp(rgb, aux, classes), aux, classes
        aux, prompts, A_hat = self.cup(aux, classes)  # eq. 4-10
        if self.acp is None:
            return A_hat @ prompts, aux, prompts  # (B, S, d)
        # design choice, paper ambiguous: P_m of eq. 15 read as CUP's class-aware prompts p_hat_m,
        # the same P_m that eq. 12-13 feed to ACP
        prompt = self.acp(rgb, prompts, prompts)  # eq. 11-14, (B, S, d)
        if self.reading == 'aligned':
            prompt = prompt + A_hat @ prompts  # the aligned CUP prompt of each token, (B, S, d)
        return prompt, aux, prompts  # eq. 15: prompts are the next class tokens


def xavier_(module):
    """Xavier-uniform weights (a conv's as MAE's patch embedding: over (out, in * k * k)),
    zero biases, for every Linear and Conv2d of `module` (GoPT's prompt initialisation)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)


class GroupingPrompts(nn.Module):
    """The prompts of GoPT (eq. 3 and 15): aux patch embedding, class tokens and
    one GroupingPrompter per prompted layer, in the low-rank prompt space.

    begin(x (B, Cx, H, W), pos (1, N, D)) -> state (first aux tokens, aux tokens, class tokens),
    forward(l, tokens (B, N, D) RGB patch tokens entering block l, state)
    -> (multiplicative prompt (B, N, D), state for the next prompted layer).
    Switches (`GoPTConfig` says what each is; defaults decided on the validation split,
    docs/gopt.md): attention, class_scale, carry_aux, identity, scaled, acp_reading.
    """

    def __init__(self, rgb_embed, x_channels, num_classes, layers, prompt_dim=55, cup=True,
                 acp=True,
                 hard=True, tau=1.0, attention='prenorm', class_scale=1.0, carry_aux=False,
                 identity=True,
                 scaled=False, acp_reading=ACP_DEFAULT):
        super().__init__()
        dim, self.x_channels, self.layers = rgb_embed.proj.out_channels, x_channels, tuple(layers)
        self.carry_aux = carry_aux
        # design choice, paper silent: a full-width aux patch embedding (the VPT variants' prompt
        # generator, the paper's large shared part: 0.68M shallow vs 0.97M deep), plus the ViT's
        # position
        self.aux_embed = PatchEmbed(x_channels, dim, rgb_embed.patch, norm=False)
        # design choice, paper silent: one `down` and one `up` serve both modalities and all layers
        self.down = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, prompt_dim))
        self.up = nn.Linear(prompt_dim, dim)
        self.class_tokens = nn.Parameter(torch.empty(1, num_classes, prompt_dim))  # c^0
        self.prompters = nn.ModuleList(GroupingPrompter(prompt_dim, cup, acp, hard, tau, attention,
                                                        scaled,
                                                        acp_reading) for _ in self.layers)
        xavier_(self)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.class_tokens[0]).mul_(class_scale)
            if identity:
                self.up.weight.zero_()

    def begin(self, x, pos):
        aux = self.down(self.aux_embed(x).flatten(1, 2) + pos)  # (B, N, d)
        # a copy, not an expanded view: a view of a parameter made under no_grad claims to need a
        # gradient without having a grad_fn, which breaks torch's module tracker (FlopCounterMode)
        return aux, aux, self.class_tokens.repeat(x.shape[0], 1, 1)

    def forward(self, l: int, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        first, aux, classes = state
        prompter = self.prompters[self.layers.index(l)]
        prompt, aux_hat, classes = prompter(self.down(tokens), aux, classes)  # (B, N, d)
        return 1 + self.up(prompt), (first, aux_hat if self.carry_aux else first, classes)


class AuxVPT(nn.Module):
    """GoPT Table 4, VPT-shallow / VPT-deep (Jia et al. 2022) as the paper adapts
    them: the prompts of a layer are an embedding of the aux image, multiplied
    element-wise into the RGB tokens (eq. 3): p_l = 1 + W_l E(x), with E a shared
    aux patch embedding of width `rank` and W_l a linear rank -> D per prompted layer.

    Design choice, paper silent: this factored patch embedding is the one construction
    found that gives both of the paper's counts with one width: rank 336 at ViT-B,
    3-channel aux, gives 0.517M for one layer (paper 0.54M) and 3.364M for 12 (3.39M),
    a shared part of 0.26M plus 0.26M per layer (the counts ask for ~0.28M + ~0.26M).
    begin(x (B, Cx, H, W), pos) -> E(x) (B, N, rank).  forward(l, tokens (B, N, D), e) -> (prompt
    (B, N, D), e).
    """

    def __init__(self, rgb_embed, x_channels, layers, rank=336, identity=True):
        super().__init__()
        self.x_channels, self.layers = x_channels, tuple(layers)
        self.embed = PatchEmbed(x_channels, rank, rgb_embed.patch, norm=False)
        self.ups = nn.ModuleList(nn.Linear(rank, rgb_embed.proj.out_channels) for _ in self.layers)
        xavier_(self)
        if identity:
            for up in self.ups:
                nn.init.zeros_(up.weight)

    def begin(self, x, pos):
        return self.embed(x).flatten(1, 2)  # (B, N, rank)

    def forward(self, l: int, tokens: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return 1 + self.ups[self.layers.index(l)](e), e  # (B, N, D)


class GoPT(RGBXModel):
    """GoPT segmentation model: frozen MAE ViT, `prompts` (GroupingPrompts or
    AuxVPT; None: the control "frozen foundation + head, no prompts") before the
    prompted blocks, SETR-Naive head Psi on the last layer.

    forward(rgb (B, 3, H, W), x (B, Cx, H, W), label=None) -> logits (B, K, H, W),
    or (cross-entropy loss, logits) when label (B, H, W) int64 (255 = ignore) is given.
    Eq. 3 multiplies the patch tokens only; the cls token is not prompted (design
    choice, paper silent). The ViT pads the input to a multiple of 16; the aux
    embedding pads the same way, so the two token grids are aligned.
    """

    def __init__(self, backbone, prompts, num_classes, x_channels, head_dim=256):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.prompts, self.x_channels = prompts, x_channels
        self.head = SETRNaiveHead(backbone.dim, num_classes, head_dim)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, label: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if rgb.ndim != 4 or rgb.shape[1] != 3 or x.ndim != 4 or x.shape[1] != self.x_channels \
                or x.shape[0] != rgb.shape[0] or x.shape[-2:] != rgb.shape[-2:]:
            raise ValueError(f"expected rgb (B, 3, H, W) and x (B, {self.x_channels}, H, W) "
                             f"of one size, "
                             f"got {tuple(rgb.shape)} and {tuple(x.shape)}")
        tokens, grid = self.backbone.embed(rgb)  # (B, 1 + N, D)
        layers = self.prompts.layers if self.prompts is not None else ()
        if layers:
            # (1, N, D)
            pos = resize_pos_embed(self.backbone.pos_embed, self.backbone.grid, grid)[:, 1:]
            state = self.prompts.begin(x, pos)
        for l, blk in enumerate(self.backbone.blocks):
            if l in layers:
                prompt, state = self.prompts(l, tokens[:, 1:], state)  # (B, N, D)
                tokens = torch.cat([tokens[:, :1], tokens[:, 1:] * prompt], 1)  # eq. 3
            tokens = blk(tokens)
        logits = self.head(self.backbone.norm(tokens)[:, 1:], grid, rgb.shape[-2:])
        if label is None:
            return logits
        return segmentation_loss(logits, label), logits

    def diagnostics(self, rgb, x):
        """`gopt_diagnostics` on this batch (train.py logs it)."""
        return gopt_diagnostics(self, rgb, x)

    def param_counts(self):
        """Trainable and total counts, with and without the head (the paper's 0.97M excludes it)."""
        count = lambda ps: sum(p.numel() for p in ps)
        trainable = count(p for p in self.parameters() if p.requires_grad)
        head = count(self.head.parameters())
        return {'trainable': trainable, 'total': count(self.parameters()),
                'trainable_without_head': trainable - head,
                'head': head, 'prompts': trainable - head,
                'backbone': count(self.backbone.parameters())}


def mean_pairwise_cosine(t):
    """t (B, C, d) -> the cosine of every pair of the C vectors (j != k), averaged over pairs and
    batch."""
    u = F.normalize(t, dim=-1)
    cos = u @ u.transpose(1, 2)  # (B, C, C)
    C = t.shape[1]
    return ((cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)) / (C * (C - 1))).mean().item()


def token_spread(t):
    """t (B, S, d) -> RMS distance of the tokens from their mean over S, over their RMS norm:
    0 when every token is the same vector, 1 when the tokens average to zero."""
    return ((t - t.mean(1, keepdim=True)).pow(2).sum(-1).mean() / t.pow(2).sum(-1).mean().clamp_min(1e-30)).sqrt().item()


def noise_flips(logits, generator):
    """logits (..., C) -> the fraction of argmaxes over C that one draw of eq. 8's Gumbel(0, 1)
    noise changes."""
    gumbel = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + gumbel).argmax(-1) != logits.argmax(-1)).float().mean().item()


def probe_patch(x, patch, generator):
    """x (B, Cx, H, W) -> (x', token, (rows, cols)): x with its content inside one patch only (the
    patch x patch cell of the centre token of the ViT's grid, `token` its index in the row-major
    grid of ceil(H / patch) x ceil(W / patch) tokens) replaced by Gaussian noise of x's
    per-channel mean and std (std 1 for a constant channel), drawn from `generator`."""
    B, Cx, H, W = x.shape
    gh, gw = -(-H // patch), -(-W // patch)
    r, c = gh // 2, gw // 2
    rows = slice(r * patch, min((r + 1) * patch, H))
    cols = slice(c * patch, min((c + 1) * patch, W))
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    std = torch.where(std > 0, std, torch.ones_like(std))  # NaN (one value) or 0 -> 1
    cell = x[:, :, rows, cols]
    noise = torch.randn(cell.shape, generator=generator, device=x.device, dtype=x.dtype)
    probe = x.clone()
    probe[:, :, rows, cols] = mean[:, None, None] + std[:, None, None] * noise
    return probe, r * gw + c, (rows, cols)


def prompt_locality(before, after, token):
    """before, after (B, N, D): a prompt on two inputs that differ in the aux content of `token`
    only -> the mean change (L2 over D) at `token` over the mean change at the other N - 1
    tokens: 1 = the change is spread alike over the image (the prompt ignores where the aux
    content is), large = it stays at its place; at most 1e6 (nothing else changes), 0 when
    nothing changes at all."""
    d = (after - before).double().norm(dim=-1)  # (B, N)
    here = d[:, token].mean()
    others = (d.sum(1) - d[:, token]).mean() / max(d.shape[1] - 1, 1)
    return (here / torch.maximum(others, (here * 1e-6).clamp_min(1e-300))).item()


@torch.no_grad()
def gopt_diagnostics(model, rgb, x, seed=0):
    """How GoPT's prompters behave on a batch (rgb (B, 3, H, W), x (B, Cx, H, W)), the
    model run in eval mode (no noise), per prompted layer, in the order of `layers`:
      class_cos      mean pairwise cosine of the class tokens after CUP's self-attention
                     (c_hat, eq. 4): 1 = the C groups are one vector;
      aux_spread     token_spread of CUP's self-attended aux tokens (f_hat): 0 = all alike;
      cup_logit_std, acp_logit_std
                     std over the C groups of eq. 8's logits (CUP's g_m, ACP's g_{rgb,m}),
                     mean over tokens; Gumbel(0, 1) noise has std GUMBEL_STD = 1.28;
      cup_flips, acp_flips
                     fraction of the tokens whose group one draw of that noise changes: the
                     assignments training sees and evaluation does not (generator `seed`);
      prompt_spread  token_spread of p - 1, the prompt multiplied into the RGB tokens
                     (eq. 3): 0 = one prompt for the whole image;
      locality       prompt_locality of p when the aux input x changes inside one patch only
                     (probe_patch, the centre token): the change of p at that token over its
                     mean change at the other tokens; 1 = the aux content reaches the prompt
                     without its place, large = at its place;
    and, once per model, for the same change of x:
      pred_change_patch, pred_change_other
                     fraction of the pixels of that patch (of the other pixels) whose predicted
                     class changes.
    Returns {'layers': [...], key: [one value per layer], pred_change_*: value}; a variant
    without CUP, ACP or grouping (VPT) has only the keys it has. The model's mode and torch's
    RNG are unchanged.
    """
    prompts = model.prompts
    out = {'layers': list(prompts.layers) if prompts is not None else []}
    if prompts is None:
        return out
    generator = torch.Generator(device=rgb.device).manual_seed(seed)
    add = lambda key, value: out.setdefault(key, []).append(value)
    seen = []  # the prompt of each prompted layer, (B, N, D)

    def on_prompt(module, args, result):
        seen.append(result[0])

    def on_group(kind):
        def hook(group, args, result):
            tokens, groups = args[:2]
            logits = group.logits(tokens, groups)  # (B, S, C)
            if kind == 'cup':
                add('class_cos', mean_pairwise_cosine(groups))
                add('aux_spread', token_spread(tokens))
            add(f'{kind}_logit_std', logits.std(-1).mean().item())
            add(f'{kind}_flips', noise_flips(logits, generator))
        return hook

    hooks = [prompts.register_forward_hook(on_prompt)]
    group_hooks = []
    for p in getattr(prompts, 'prompters', ()):
        group_hooks += [part.group.register_forward_hook(on_group(kind))
                        for kind, part in (('cup', p.cup), ('acp', p.acp)) if part is not None]
    was_training = model.training
    try:
        logits = model.eval()(rgb, x)
        for h in group_hooks:
            h.remove()
        base, seen[:] = list(seen), []
        probe, token, (rows, cols) = probe_patch(x, model.backbone.patch_embed.patch, generator)
        probed = model(rgb, probe)
    finally:
        model.train(was_training)
        for h in hooks + group_hooks:
            h.remove()
    for p in base:
        add('prompt_spread', token_spread(p - 1))
    for before, after in zip(base, seen):
        add('locality', prompt_locality(before, after, token))
    changed = logits.argmax(1) != probed.argmax(1)  # (B, H, W)
    inside = torch.zeros_like(changed)
    inside[:, rows, cols] = True
    out['pred_change_patch'] = changed[inside].float().mean().item()
    out['pred_change_other'] = changed[~inside].float().mean().item() if (~inside).any() else 0.0
    return out


def load_head(head, path):
    """Psi started from a trained segmenter's head: the 'head.*' entries of `path` (a
    train.py checkpoint such as the RGB foundation's last.pt, or a state dict)."""
    sd = read_checkpoint(path)
    sd = sd.get('model', sd) if isinstance(sd, dict) else {}
    found = {k[len('head.'):]: v for k, v in sd.items() if k.startswith('head.')}
    own = head.state_dict()
    if set(found) != set(own) or any(found[k].shape != own[k].shape for k in own):
        raise ValueError(f"head_from={path}: no SETR-Naive head of this model's shape in it (needs "
                         f"'head.*' keys "
                         f"{sorted(own)}, with {own['conv2.weight'].shape[0]} classes and head_dim "
                         f"{own['conv1.weight'].shape[0]}; found {sorted(found) or 'none'}); pass "
                         f"the checkpoint "
                         f"of an rgb_only or gopt run on the same dataset and head_dim")
    head.load_state_dict(found)


# Table 4 + control
GOPT_VARIANTS = ('gopt', 'gopt_shallow', 'no_acp', 'no_cup', 'vpt_shallow', 'vpt_deep', 'head_only')


@dataclass
class GoPTConfig(Options):
    """GoPT's options, besides the ViT preset's sizes (`ViTSizes`). Defaults named 'validation'
    were decided on the validation split (docs/gopt.md, study/gopt-validation/results.md)."""
    owner: typing.ClassVar[str] = 'gopt'
    variant: str = option(
        'gopt',
        "the prompts: 'gopt' (CUP + ACP), 'gopt_shallow' (one prompter, at block 0), 'no_acp', "
        "'no_cup' (Table 4's ablations), 'vpt_shallow', 'vpt_deep' (Table 4's baselines), "
        "'head_only' (the control: no prompts)", choices=GOPT_VARIANTS, default_from='paper')
    interval: int = option(
        1, "a prompter before every interval-th block from block 0 (Fig. 6: 1, 2, 4, 6, 12); 1 for "
        "the shallow variants", default_from='paper')
    assignment: str = option(
        'hard',
        "the groupings' assignment: 'hard', one-hot with a straight-through gradient (eq. 9), or "
        "'soft' (Fig. 7)", choices=('hard', 'soft'), default_from='paper')
    prompt_dim: int = option(
        55, "d_p, the width of the prompt space (down: D -> d_p, up: d_p -> D); 55 gives Table 4's "
        "0.97M at ViT-B", default_from="paper (Table 4's budget)")
    tau: float = option(
        1.0, "temperature of the Gumbel-softmax, eq. 8 (paper silent)",
        low=0, low_open=True, default_from='design')
    head_dim: int = option(256, 'hidden width of the SETR-Naive head Psi')
    attention: str = option(
        'prenorm', "CUP's self-attention: 'prenorm' (LayerNorm, residual) or 'plain' (see CUP)",
        choices=CUP_ATTENTION, default_from='validation')
    class_scale: float = option(
        1.0, "the first class tokens c^0 start xavier-uniform times this",
        low=0, low_open=True, default_from='validation')
    carry_aux: bool = option(
        False,
        "each prompter reads the previous CUP's self-attended aux tokens (True) or the embedded "
        "aux image (False)", default_from='validation')
    identity: bool = option(
        True, "`up` (and the VPT variants' W_l) starts at zero, so that the model starts as the "
        "foundation; the paper's xavier init is False", default_from='validation')
    scaled: bool = option(
        False, "eq. 8's logits times 1/sqrt(d_p) (not in the paper)", default_from='paper')
    vpt_rank: int = option(
        336, "the VPT variants' prompt embedding width", default_from="paper (Table 4's budget)")
    head_from: str = option(
        '', "a checkpoint whose 'head.*' entries start Psi, e.g. the RGB foundation's (the paper "
        "fine-tunes its head); '': a fresh head", start_file=True)
    acp: str = option(
        ACP_DEFAULT,
        "how eq. 11-14 give a token's prompt: 'literal', or 'aligned' (plus the aligned CUP "
        "prompt; see GroupingPrompter); variants with CUP and ACP",
        choices=ACP_READINGS, default_from='validation')

    def __post_init__(self):
        super().__post_init__()
        if self.variant.endswith('_shallow') and self.interval != 1:
            raise ValueError(f"option 'interval' of gopt must be 1 for {self.variant}, which "
                             f"prompts block 0 only, "
                             f"not {self.interval}")


def build_gopt(backbone_name: str, num_classes: int, x_channels: int, pretrained: str | None = None,
               **options) -> GoPT:
    """GoPT on a ViT preset ('base', 'large'), `pretrained` (an MAE file) loaded into the
    ViT, which is then frozen with its RGB patch embedding; `options`: `GoPTConfig`'s and
    the ViT's sizes (`ViTSizes`)."""
    cfg, sizes = split_options(GoPTConfig, ViTSizes, options)
    if x_channels < 1:
        raise ValueError(f"GoPT needs x_channels >= 1, got {x_channels}")
    backbone = vit(backbone_name, **sizes)
    if pretrained:
        load_pretrained(backbone, pretrained)
    every = range(0, len(backbone.blocks), cfg.interval)
    layers = (0,) if cfg.variant.endswith('_shallow') else every
    if cfg.variant == 'head_only':
        prompts = None
    elif cfg.variant.startswith('vpt'):
        prompts = AuxVPT(backbone.patch_embed, x_channels, layers, cfg.vpt_rank, cfg.identity)
    else:
        prompts = GroupingPrompts(backbone.patch_embed, x_channels, num_classes, layers,
                                  cfg.prompt_dim,
                                  cup=cfg.variant != 'no_cup', acp=cfg.variant != 'no_acp',
                                  hard=cfg.assignment == 'hard', tau=cfg.tau,
                                  attention=cfg.attention,
                                  class_scale=cfg.class_scale, carry_aux=cfg.carry_aux,
                                  identity=cfg.identity,
                                  scaled=cfg.scaled, acp_reading=cfg.acp)
    model = GoPT(backbone, prompts, num_classes, x_channels, cfg.head_dim)
    if cfg.head_from:
        load_head(model.head, cfg.head_from)
    return model


# GoPT's recipe ("Experimental Setup"): AdamW, lr 4e-5 with polynomial decay (no warm-up named),
# batch 64, 60 epochs, "without introducing other algorithms for data expansion" (the random crop
# only); a process keeps the dataset's batch and gradient accumulation reaches 64.
GOPT_RECIPE = dict(epochs=60, lr=4e-5, warmup_epochs=0, global_batch=64, augment='crop')


def gopt_recipe(dataset, options=None):
    """GoPT's recipe on the paper's datasets (the baselines' weight decay); none on the
    built-in demo, which gives every method the same steps and batch."""
    base = replace(baseline_recipe(dataset), **GOPT_RECIPE) if dataset in KTB_RECIPES else Recipe()
    return replace(base, frozen_backbone=True)


def gopt_param_counts(backbone_name='base', num_classes=40, x_channels=3, **options):
    """{variant: param_counts()} for every Table 4 variant (ViT-B: about 1.5 s per variant on
    CPU)."""
    return {v: build_gopt(backbone_name, num_classes, x_channels, variant=v,
                          **options).param_counts()
            for v in GOPT_VARIANTS}


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
    from torch's global RNG when it is None, on the host (a CPU tensor).
    """
    if num_modalities < 1 or not 0.0 <= p_m <= 1.0:
        raise ValueError(f"m2im_keep needs num_modalities >= 1 and 0 <= p_m <= 1, got "
                         f"{num_modalities}, {p_m}")
    # line 1: O = {}, g = 0 (the paper's "q" is g)
    kept, g = torch.zeros(num_modalities, dtype=torch.bool, device='cpu'), False
    # line 2: Q <- RandomSort(Q)
    order = torch.randperm(num_modalities, generator=generator, device='cpu').tolist()
    for k in order[:-1]:  # line 3: for k = 1 .. K-1
        # lines 4-5: v ~ U[0, 1], v >= p_m
        if torch.rand((), generator=generator, device='cpu') >= p_m:
            kept[k], g = True, True  # line 6: O <- O + {X_k}, g <- 1
    if not g:  # line 9
        kept[order[-1]] = True  # line 10: the last modality survives when all others were masked
    elif torch.rand((), generator=generator, device='cpu') >= p_m:  # lines 12-13
        kept[order[-1]] = True  # line 14
    return kept


def m2im_keep_batch(batch, num_modalities, p_m=0.5, device=None):
    """An independent `m2im_keep` draw per sample of the batch (`draw_policy()`):
    (batch, num_modalities) bool, True = kept."""
    return draw_policy().draw(lambda n: torch.stack([m2im_keep(num_modalities, p_m) for _ in range(n)]), batch).to(device)


def visible_counts(keep, budget):
    """MultiMAE's token budget: each sample shows exactly `budget` tokens, split
    between its kept modalities by a Dirichlet(1) draw (normalised Exp(1) draws).

    keep: (B, K) bool -> (B, K) long counts, each row summing to `budget`, 0 for
    a dropped modality. Rounding the cumulative shares keeps the sum exact.
    """
    # design choice: MultiMAE's Dirichlet(1) split of one fixed budget, so that every sample has T
    # tokens
    exp = draw_policy().draw(lambda n: torch.empty((n, keep.shape[1]), device=keep.device).exponential_(),
                             keep.shape[0])  # (B, K) Exp(1)
    share = exp * keep  # (B, K)
    cum = (share.cumsum(1) / share.sum(1, keepdim=True) * budget).round().long()  # (B, K)
    return cum.diff(dim=1, prepend=cum.new_zeros(keep.shape[0], 1))


def random_masking(counts, num_tokens, check=True):
    """MAE patch masking (MaskMentor Alg. 1, lines 17-19) of K modality grids at once:
    per-sample shuffling by argsort of random noise, per modality.

    counts: (B, K) visible tokens per sample and modality, every row summing to T
    (`check`: verified, a host read; `visible_counts` gives such rows by construction).
    Returns mask (B, K, N) bool, True = masked: the counts[b, k] lowest-noise tokens stay visible.
    """
    total = counts.sum(1)
    if check and (total != total[0]).any():
        raise ValueError(f"every sample must show the same number of tokens, got {total.tolist()}")
    noise = draw_policy().draw(lambda n: torch.rand(n, counts.shape[1], num_tokens, device=counts.device),
                               counts.shape[0])  # (B, K, N)
    rank = noise.argsort(-1).argsort(-1)  # (B, K, N) noise rank
    return rank >= counts[..., None]


def unshuffle(visible, mask_token, ids_restore):
    """MAE's un-shuffle: put visible tokens back at their grid places and fill
    the masked places with `mask_token`. visible (B, T, D), mask_token (1, 1, D),
    ids_restore (B, L) each place's position in the visible-first order (< T = visible) -> (B, L,
    D)."""
    T = visible.shape[1]
    out = torch.gather(visible, 1,
                       ids_restore.clamp(max=T - 1)[..., None].expand(-1, -1, visible.shape[-1]))
    return torch.where((ids_restore < T)[..., None], out, mask_token.to(out.dtype))


def sttp_phase(step, warmup_steps, teacher_iters=3):
    """STTP schedule (MaskMentor Sec. 3.4-3.5) as a pure function of the global
    iteration: 'mim' during the warm-up (complete-modality MIM), then cycles of
    `teacher_iters` 'teacher' iterations followed by one 'student' iteration."""
    if step < 0 or warmup_steps < 0 or teacher_iters < 0:
        raise ValueError(f"sttp_phase needs step, warmup_steps, teacher_iters >= 0, got {step}, "
                         f"{warmup_steps}, {teacher_iters}")
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


def multimae_sincos(dim, h, w):
    """MultiMAE's fixed sin-cos position table (MoCo v3's build_2d_sincos_posemb), stored
    as (1, dim, h, w). MultiMAE's axis order is the transpose of MAE's: for a square
    grid the first half of the channels encodes the row, the second the column."""
    return sincos_pos_embed(dim, w, h).view(w, h, dim).permute(2, 1, 0)[None]  # (1, dim, h, w)


def pos_tokens(pos_emb, grid, mode):
    """A stored (1, D, h0, w0) position table interpolated to `grid` (MultiMAE: bicubic
    in the image adapters, bilinear in the semseg adapter and the decoders) -> (1, h*w, D),
    row-major."""
    pos = F.interpolate(pos_emb, size=tuple(grid), mode=mode, align_corners=False)  # (1, D, h, w)
    return pos.flatten(2).transpose(1, 2)  # (1, h*w, D)


class PatchedInputAdapter(nn.Module):
    """MultiMAE input adapter of an image-like modality (RGB, depth, HHA): a stride-p
    patch conv `proj` plus the adapter's own stored position table `pos_emb`,
    interpolated bicubically to the token grid. No modality embedding (MultiMAE has none).
    forward(img: (B, in_chans, H, W)) -> (B, ceil(H/p), ceil(W/p), D), zero-padded to a multiple of
    p."""

    pos_mode = 'bicubic'

    def __init__(self, in_chans, dim, patch=16, img_size=224):
        super().__init__()
        self.in_chans, self.patch = in_chans, patch
        # fixed, stored
        self.register_buffer('pos_emb', multimae_sincos(dim, img_size // patch, img_size // patch))
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def as_image(self, img):
        if img.ndim != 4 or img.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, H, W) input, got {tuple(img.shape)}")
        return img

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.proj(pad_to_multiple(self.as_image(img), self.patch, (2, 3)))  # (B, D, h, w)
        # (B, h*w, D)
        x = x.flatten(2).transpose(1, 2) + pos_tokens(self.pos_emb, x.shape[-2:], self.pos_mode)
        return x.view(x.shape[0], *self.grid_of(img), -1)  # (B, h, w, D)

    def grid_of(self, img):
        return -(-img.shape[-2] // self.patch), -(-img.shape[-1] // self.patch)


class SemSegInputAdapter(PatchedInputAdapter):
    """MultiMAE semantic-map input adapter: the map is given at 1/`stride` resolution
    (B, H/4, W/4); each class index becomes a learned `class_dim` vector (`class_emb`),
    then a patch conv of patch/stride (4x4 on the 1/4 map) and the bilinear position table.
    MaskMentor addition (design choice): the ignore value 255 embeds as the zero vector,
    as MultiMAE's `emb_padding_idx` row would, so that the table keeps MultiMAE's shape.
    forward(label: (B, h4, w4) int64 in 0..C-1 or 255) -> (B, ceil(h4*stride/p), ..., D)."""

    pos_mode = 'bilinear'

    def __init__(self, num_classes, dim, patch=16, stride=4, class_dim=64, img_size=224):
        super().__init__(class_dim, dim, patch // stride, img_size // stride)
        self.num_classes, self.stride = num_classes, stride
        self.class_emb = nn.Embedding(num_classes, class_dim)
        nn.init.trunc_normal_(self.class_emb.weight, std=0.02)

    def as_image(self, label):
        if label.ndim != 3 or label.dtype != torch.long:
            raise ValueError(f"expected a (B, H/4, W/4) int64 semantic map, got "
                             f"{tuple(label.shape)} {label.dtype}")
        if not ((label >= 0) & (label < self.num_classes) | (label == 255)).all():
            raise ValueError(f"semantic map values must be 0..{self.num_classes - 1} or "
                             f"255 (ignore)")
        known = label != 255
        # (B, h4, w4, class_dim)
        emb = self.class_emb(torch.where(known, label, 0)) * known[..., None]
        return emb.permute(0, 3, 1, 2)  # (B, class_dim, h4, w4)


class MultiModalViT(nn.Module):
    """MultiMAE's encoder (MultiViT), any input size; names are MultiMAE's checkpoint keys.

    One input adapter per modality (`input_adapters`, name -> adapter, each with its
    own position table), `encoder` ViT blocks, `global_tokens` (one learned token,
    appended last, with no position). No final norm: MultiMAE has none.
        tokens, grid = enc.embed({'rgb': rgb, 'depth': x})  # (B, M, N, D) in adapter order, (h, w)
        out = enc(tokens.flatten(1, 2))                      # (B, M*N + 1, D), global token last
    """

    def __init__(self, input_adapters, dim=768, depth=12, heads=12, mlp_ratio=4.0, patch_size=16,
                 drop_path_rate=0.0):
        super().__init__()
        self.dim, self.patch_size = dim, patch_size
        self.input_adapters = nn.ModuleDict(input_adapters)
        self.global_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = vit_blocks(dim, depth, heads, mlp_ratio, drop_path_rate)
        for m in self.encoder.modules():
            _init_transformer_weights(m)
        nn.init.normal_(self.global_tokens, std=0.02)

    def embed(self, inputs):
        """{name: input} -> tokens (B, M, N, D) in adapter order (rgb, depth, semseg), and the grid
        (h, w)."""
        unknown = set(inputs) - set(self.input_adapters)
        if unknown:
            raise ValueError(f"no input adapter for {sorted(unknown)}; this encoder has "
                             f"{list(self.input_adapters)}")
        # each (B, h, w, D)
        maps = [a(inputs[n]) for n, a in self.input_adapters.items() if n in inputs]
        grids = {tuple(m.shape[1:3]) for m in maps}
        if len(grids) != 1:
            raise ValueError(f"modalities give different token grids {sorted(grids)}; pass images "
                             f"of one size "
                             f"and the semantic map at 1/4 of it")
        return torch.stack(maps, 1).flatten(2, 3), grids.pop()  # (B, M, N, D)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # (B, T + 1, D)
        x = torch.cat([tokens, self.global_tokens.expand(tokens.shape[0], -1, -1)], 1)
        for blk in self.encoder:
            x = blk(x)
        return x



class CrossAttention(nn.Module):
    """Multi-head cross-attention through SDPA (MultiMAE output adapter's `decoder`):
    forward(query: (B, Tq, D), context: (B, Tc, D)) -> (B, Tq, D)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, Tq, D = query.shape
        q = self.q(query).view(B, Tq, self.heads, -1).transpose(1, 2)  # (B, nh, Tq, hd)
        # (B, nh, Tc, hd)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, Tc, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, Tq, hd)
        return self.proj(x.transpose(1, 2).reshape(B, Tq, D))  # (B, Tq, D)


class SpatialOutputAdapter(nn.Module):
    """MIM head of one task (MaskMentor Sec. 3.3): MultiMAE's spatial output adapter, its key names.

    Encoder tokens are projected D -> dim (`proj_context`). Context: the visible
    tokens + the task embedding of the modality each came from + this adapter's
    position table (bilinear), the global token appended with no embedding. Queries:
    for a task that was an input, its grid with the visible tokens in place and
    `mask_token` in the gaps; otherwise `mask_token`; both + position + the task
    embedding of `task`. Then x = CrossAttn(query_norm(q), context_norm(ctx)) (no
    residual), x = x + MLP(out_norm(x)) -- the output tokens (STTP's token targets,
    the "output token embeddings" of Sec. 3.3) -- then `decoder_transformer` blocks and
    `out_proj` to the (C, p, p) pixels of every patch.
    forward(x (B, T + 1, D), tasks (input task names, adapter order), ids_keep (B, T)
    flat indices into the (B, M*N) concatenated input tokens, ids_restore (B, M*N)
    (< T = place in x), grid (h, w)) -> (image (B, C, h*p, w*p), tokens (B, h*w, dim)).
    """

    def __init__(self, task, context_tasks, in_dim, dim, heads, depth, out_chans, patch=16,
                 stride=1, img_size=224):
        super().__init__()
        self.task, self.out_chans, self.stride, self.p = task, out_chans, stride, patch // stride
        self.task_embeddings = nn.ParameterDict({t: nn.Parameter(torch.zeros(1, 1, dim)) for t in context_tasks})
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # fixed, stored
        self.register_buffer('pos_emb', multimae_sincos(dim, img_size // patch, img_size // patch))
        self.decoder = CrossAttention(dim, heads)
        self.context_norm = nn.LayerNorm(dim, eps=1e-6)
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.decoder_transformer = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.out_proj = nn.Linear(dim, out_chans * self.p * self.p)
        self.proj_context = nn.Linear(in_dim, dim)
        self.apply(_init_transformer_weights)
        for t in (self.mask_token, *self.task_embeddings.values()):
            nn.init.trunc_normal_(t, std=0.02)

    def attend(self, x, tasks, ids_keep, ids_restore, grid):
        """The output tokens of this task's grid: (B, N, dim)."""
        x = self.proj_context(x)  # (B, T + 1, dim)
        visible, glob = x[:, :-1], x[:, -1:]
        pos = pos_tokens(self.pos_emb, grid, 'bilinear')[0]  # (N, dim)
        N = pos.shape[0]
        # (M*N, dim), task-major
        embed = torch.cat([pos + self.task_embeddings[t][0] for t in tasks])
        context = torch.cat([visible + embed[ids_keep], glob], 1)  # (B, T + 1, dim)
        own = pos + self.task_embeddings[self.task][0]  # (N, dim)
        if self.task in tasks:
            k = tasks.index(self.task)
            # (B, N, dim)
            query = unshuffle(visible, self.mask_token, ids_restore[:, k * N:(k + 1) * N]) + own
        else:
            query = (self.mask_token + own).expand(x.shape[0], -1, -1)  # (B, N, dim)
        # MultiMAE: no residual here
        y = self.decoder(self.query_norm(query), self.context_norm(context))
        return y + self.mlp(self.out_norm(y))

    def forward(self, x: torch.Tensor, tasks: list[str], ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                grid: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        tokens = self.attend(x, tasks, ids_keep, ids_restore, grid)
        y = self.out_proj(self.decoder_transformer(tokens))  # (B, N, C*p*p)
        (h, w), p, B = grid, self.p, x.shape[0]
        img = y.view(B, h, w, self.out_chans, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
        return img.reshape(B, self.out_chans, h * p, w * p), tokens


def multimae_from_mae(sd, own):
    """An MAE ViT state dict -> MultiMAE's names, as MultiMAE's vit2multimae converter maps
    it: blocks.* -> encoder.*, patch_embed.proj -> the RGB adapter's proj, cls_token (+ its
    position row) -> global_tokens, pos_embed -> the RGB adapter's table, resized to
    `own`'s; MAE's final norm, decoder and head dropped (MultiMAE has no final norm).
    The RGB table keeps MAE's (row, column) channel order, as vit2multimae does, while
    MultiMAE's own tables are the transpose (design choice: MultiMAE's converter as is)."""
    out = {}
    for k, v in sd.items():
        if k.startswith('blocks.'):
            out['encoder.' + k[len('blocks.'):]] = v
        elif k.startswith('patch_embed.proj.'):
            out['input_adapters.rgb.proj.' + k.rsplit('.', 1)[1]] = v
    if 'cls_token' in sd:
        out['global_tokens'] = sd['cls_token'] + (sd['pos_embed'][:, :1] if 'pos_embed' in sd else 0)
    if 'pos_embed' in sd:
        side = square_grid(sd['pos_embed'])[0]
        # (1, D, g, g)
        table = sd['pos_embed'][:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        out['input_adapters.rgb.pos_emb'] = F.interpolate(
            table, size=own['backbone.input_adapters.rgb.pos_emb'].shape[-2:], mode='bicubic',
            align_corners=False)
    return out


# The tensors whose shape follows the number of semantic classes (MultiMAE's files: 133 COCO
# classes).
CLASS_COUNT_KEYS = ('backbone.input_adapters.semseg.class_emb.weight',
                    'output_adapters.semseg.out_proj.weight',
                    'output_adapters.semseg.out_proj.bias')

# MultiMAE checkpoint prefix -> this project's; below the prefix the names are MultiMAE's.
MULTIMAE_RENAMES = (
    ('input_adapters.', 'backbone.input_adapters.'),
    ('encoder.', 'backbone.encoder.'),
    ('global_tokens', 'backbone.global_tokens'),
)


def adapter_part(key):
    """'output_adapters.norm_rgb.mlp.fc1.weight' -> 'output_adapters.norm_rgb' (also
    'backbone.input_adapters.<name>'); None for keys outside the adapters."""
    parts = key.split('.')
    if parts[0] == 'output_adapters':
        return '.'.join(parts[:2])
    if parts[:2] == ['backbone', 'input_adapters']:
        return '.'.join(parts[:3])
    return None


def multimae_renamed(sd, own):
    """A MultiMAE file, an MAE ViT file or an rgbx MaskMentor state dict -> this project's
    names (`MULTIMAE_RENAMES`; an MAE file through `multimae_from_mae`), nothing dropped."""
    if any(k.startswith('backbone.') for k in sd):
        return dict(sd)
    if not any(k.startswith(('encoder.', 'input_adapters.')) for k in sd):
        sd = multimae_from_mae(sd, own)
    return {next((new + k[len(old):] for old, new in MULTIMAE_RENAMES if k.startswith(old)), k): v
            for k, v in sd.items()}


def multimae_to_rgbx(sd, own):
    """A MultiMAE / MAE / rgbx MaskMentor state dict -> a MaskMentor model's (`own`):
    renamed (`multimae_renamed`), without the adapters `own` lacks (all output adapters
    when fine-tuning; `norm_rgb` without norm_pix_rgb; the semseg input adapter) and
    without the CLASS_COUNT_KEYS tensors of another class count (they keep their initial
    values). `multimae_notes` says what was left out."""
    sd = multimae_renamed(sd, own)
    parts = {adapter_part(k) for k in own}
    return {k: v for k, v in sd.items() if (adapter_part(k) is None or adapter_part(k) in parts)
            and k != 'steps_done' and not (k in CLASS_COUNT_KEYS and k in own
                                           and v.shape != own[k].shape)}


def multimae_notes(sd, own):
    """What `multimae_to_rgbx` leaves out of `sd` for a model `own`, as sentences."""
    sd = multimae_renamed(sd, own)
    notes = []
    dropped = sorted({adapter_part(k) for k in sd} - {adapter_part(k) for k in own} - {None})
    if dropped:
        notes.append(f"ignoring parts this model does not have: {', '.join(dropped)}")
    per_class = sorted(k for k in CLASS_COUNT_KEYS if k in sd and k in own
                       and sd[k].shape != own[k].shape)
    if per_class:
        notes.append("another number of semantic classes in the checkpoint than in this model: "
                     + ', '.join(f"{k} {tuple(sd[k].shape)} -> "
                                 f"{tuple(own[k].shape)}" for k in per_class)
                     + " re-initialised")
    if any(k.startswith('output_adapters.') for k in own) and not any(k.startswith('output_adapters.') for k in sd):
        notes.append("the checkpoint holds no decoders (an encoder file): the output adapters keep "
                     "their initial values")
    elif 'output_adapters.norm_rgb' in {adapter_part(k) for k in own} - {adapter_part(k) for k in sd}:
        notes.append("the checkpoint has no norm_rgb decoder (a file trained without norm_pix_rgb): "
                     "it starts fresh "
                     "(or build with norm_pix_rgb=False)")
    return notes


class MaskMentorModel(RGBXModel):
    """What both MaskMentor stages share: the parameter counts, and loading MultiMAE's
    released files (`{'model': state_dict}`, keys `input_adapters.*`, `encoder.*`,
    `global_tokens`, `output_adapters.*`) into the whole model (`multimae_to_rgbx`)."""

    def param_counts(self):
        return {**super().param_counts(),
                **{name: sum(p.numel() for p in child.parameters()) for name, child in self.named_children()}}

    def pretrained_target(self, sd):
        return self  # MultiMAE files hold the decoders too

    def convert_checkpoint(self, sd):
        """A MultiMAE, MAE or rgbx MaskMentor file -> (this model's state dict, keys it may
        lack, notes on what it leaves out) for `load_pretrained` (`multimae_to_rgbx`). A
        position table stored for another image size is taken as it is (interpolated at use)."""
        own = self.state_dict()
        notes = multimae_notes(sd, own)
        sd = multimae_to_rgbx(sd, own)
        for k in [k for k in sd if k.endswith('.pos_emb') and k in own and sd[k].shape != own[k].shape]:
            self.get_submodule(k.rsplit('.', 1)[0]).pos_emb = sd[k].clone()
        return sd, self.absent_keys(sd), notes

    def absent_keys(self, sd):
        """Keys a converted file legitimately lacks: the fine-tuning head; class tables of
        another class count (left out by `multimae_to_rgbx`); the decoders of an
        encoder-only file; for an MAE file the input adapters it has no weights for."""
        own = self.state_dict()
        absent = {k for k in own if k.startswith('head.')} | {k for k in CLASS_COUNT_KEYS if k in own and k not in sd}
        if 'backbone.input_adapters.depth.proj.weight' not in sd:
            absent |= {k for k in own if k.startswith('backbone.input_adapters.') and k not in sd}
        if not any(k.startswith('output_adapters.') for k in sd):
            absent |= {k for k in own if k.startswith('output_adapters.')}
        given = {adapter_part(k) for k in sd}
        absent |= {k for k in own if k.startswith('output_adapters.norm_rgb.') and adapter_part(k) not in given}
        return absent



def standardize_depth(x):
    """MultiMAE's truncated depth standardisation (run_pretraining_multimae.py, on input
    and target alike): per sample, (x - mean) / sqrt(var + 1e-6) with the mean and the
    (unbiased) variance of the values between the 10th and 90th percentile of all its
    values. x (B, C, H, W) -> (B, C, H, W)."""
    flat = x.flatten(1).sort(1).values  # (B, C*H*W)
    n = flat.shape[1]
    mid = flat[:, int(0.1 * n):int(0.9 * n)]
    return (x - mid.mean(1).view(-1, 1, 1, 1)) / (mid.var(1).view(-1, 1, 1, 1) + 1e-6).sqrt()


def patch_normalised(img, patch):
    """MAE / MultiMAE `norm_pix` target: every p x p patch standardised over its
    p*p*C values (unbiased variance, eps 1e-6). (B, C, H, W), H, W multiples of p -> same shape."""
    B, C, H, W = img.shape
    x = img.view(B, C, H // patch, patch, W // patch, patch)  # (B, C, h, p, w, p)
    mean, var = x.mean((1, 3, 5), keepdim=True), x.var((1, 3, 5), keepdim=True)
    return ((x - mean) / (var + 1e-6).sqrt()).view(B, C, H, W)


def masked_mean(loss, mask, grid, valid=None):
    """MultiMAE's reduction of a masked pixel loss (criterion.py): the token mask
    (B, h*w), True = masked, is spread over its pixels, the loss (B, H', W') is averaged
    per sample over its masked pixels (and `valid` ones, a (B, H', W') bool), then over
    the samples that have any (MultiMAE's nan-mean); 0 when no sample has one."""
    B, (h, w) = mask.shape[0], grid
    s = -(-loss.shape[-2] // h)  # pixels per token side at this resolution
    m = mask.view(B, h, w).float().repeat_interleave(s, 1).repeat_interleave(s, 2)[:, :loss.shape[-2], :loss.shape[-1]]
    if valid is not None:
        m = m * valid
    count = m.flatten(1).sum(1)  # (B,)
    # (B,), 0 for a sample without any
    per_sample = (loss * m).flatten(1).sum(1) / count.clamp(min=1)
    # mean over the samples that have any
    return per_sample.sum() / draw_policy().count((count > 0).sum())


class MaskMentorPretrain(MaskMentorModel):
    """MaskMentor pre-training: M2IM (Alg. 1) + STTP (Sec. 3.4) on MultiMAE, K = 3 modalities.

    The network is MultiMAE's (MultiModalViT + one SpatialOutputAdapter per task, plus
    `norm_rgb` with norm_pix_rgb, as MultiMAE's `extra_norm_pix_loss` config), so that
    MultiMAE files load and give MultiMAE's numbers. For users:
      encode({'rgb': (B,3,H,W), 'depth': (B,1,H,W), 'semseg': (B,H/4,W/4) int64}, any subset)
          -> (B, T + 1, D): tokens rgb, depth, semseg (each row-major), global token last;
      reconstruct(inputs, masks {name: (B, N)}, 1 = masked; an input without a mask is all visible)
          -> {name: prediction}: rgb (B,3,H,W), depth (B,1,H,W), semseg logits (B,K,H/4,W/4) (+
          norm_rgb).

    forward(rgb (B, 3, H, W), x (B, Cx, H, W) depth, label (B, H, W) int64 semantic
    map (255 = ignore; the adapter takes label[:, ::4, ::4]), phase='mim') -> (loss, None),
    the objective of the phase (`sttp_phase`):
    - 'mim' (warm-up) and 'teacher': complete modalities, MultiMAE patch masking only
      (`budget` visible tokens per sample, split by Dirichlet(1)), pixel losses;
    - 'student' (MaskMentor addition): M2IM input (modality masking per sample, then
      patch masking of the kept modalities with the same budget); a dropped modality has
      all its patches masked. Pixel losses plus `token_weight` * the mean over the three
      tasks and the grid places of 1 - cos(student token, teacher token).
    The teacher: a no-grad pass of the current weights on the same images, complete, with a
    fresh patch mask; compared: each decoder's output tokens at every grid place (design
    choice, paper silent; docs/maskmentor.md, "STTP").
    Pixel losses (MultiMAE's pre-training config, criterion.py): RGB MSE on the
    dataset-normalised pixels; with norm_pix_rgb also `norm_rgb` MSE on per-patch
    normalised RGB; depth L1 on MultiMAE's truncated standardisation (input and target);
    semantic map cross-entropy at 1/4 resolution (255 ignored: MaskMentor addition);
    each on the masked tokens, a mean per sample then over samples, summed.

    Schedule (`schedule`, a pure function of the trainer's step): the phase of each step
    and one batch for every step of a 3 teacher : 1 student cycle; `warmup` is a fraction
    of the run's steps (MaskMentor Sec. 4.1: ~100 of 500 epochs of complete-modality MIM,
    0.2), unless `warmup_steps` is given. The trainer passes the phase to forward. Masking
    is the objective, so it is drawn (through `draw_policy()`) in train and eval mode alike.
    """

    pretraining = True  # no logits: nothing to evaluate

    def __init__(self, backbone, num_classes, decoder_dim=256, decoder_heads=8, decoder_depth=2,
                 mask_ratio=5 / 6,
                 p_m=0.5, warmup=0.2, warmup_steps=None, teacher_iters=3, token_weight=1.0,
                 norm_pix_rgb=True,
                 depth_standardize=True, img_size=224):
        super().__init__()
        tasks = list(backbone.input_adapters)
        if tasks != ['rgb', 'depth', 'semseg']:
            raise ValueError(f"pre-training needs the adapters rgb, depth, semseg, got {tasks}")
        if not 0 < mask_ratio < 1 or not 0 <= warmup <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1) and warmup in [0, 1], got "
                             f"{mask_ratio}, {warmup}")
        self.backbone = backbone
        self.mask_ratio, self.p_m, self.token_weight = mask_ratio, p_m, token_weight
        self.warmup, self.warmup_steps, self.teacher_iters = warmup, warmup_steps, teacher_iters
        self.depth_standardize = depth_standardize
        adapters = backbone.input_adapters
        chans = {'rgb': 3, 'depth': adapters['depth'].in_chans, 'semseg': num_classes}
        heads = {t: t for t in tasks}
        # MultiMAE's extra_norm_pix_loss: a second RGB decoder for the per-patch normalised target
        if norm_pix_rgb:
            heads['norm_rgb'] = 'rgb'
        self.output_adapters = nn.ModuleDict({
            name: SpatialOutputAdapter(task, tasks, backbone.dim, decoder_dim, decoder_heads,
                                       decoder_depth,
                                       chans[task], backbone.patch_size,
                                       getattr(adapters[task], 'stride', 1), img_size)
            for name, task in heads.items()})

    def schedule(self, step, total_steps):
        """STTP (Sec. 3.4): (the batch `step` trains on, {'phase': its phase}); one batch per
        warm-up step, then one batch for a whole teacher/student cycle."""
        warmup = self.warmup_steps if self.warmup_steps is not None else round(self.warmup * total_steps)
        return (sttp_batch_index(step, warmup, self.teacher_iters),
                {'phase': sttp_phase(step, warmup, self.teacher_iters)})

    def budget(self, num_tokens):
        """Visible tokens per sample: (1 - mask_ratio) of all K*N tokens (MultiMAE:
        98 of 3 x 196); at most N, so that a single kept modality can hold them."""
        K = len(self.backbone.input_adapters)
        T = round((1 - self.mask_ratio) * K * num_tokens)
        if T < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio:.3f} leaves no visible token of {K} x "
                             f"{num_tokens}: the "
                             f"input gives only {num_tokens} tokens per modality; use a larger crop "
                             f"or a smaller mask_ratio")
        if T > num_tokens:
            raise ValueError(f"mask_ratio {self.mask_ratio:.3f} leaves {T} visible tokens of {K} x "
                             f"{num_tokens}, more "
                             f"than one modality holds; need mask_ratio >= {1 - 1 / K:.3f}")
        return T

    def encode(self, inputs):
        """Encoder tokens of `inputs` with no masking: (B, T + 1, D), adapter order, global token
        last."""
        tokens, _ = self.backbone.embed(inputs)  # (B, M, N, D)
        return self.backbone(tokens.flatten(1, 2))

    def reconstruct(self, inputs, masks):
        """MultiMAE's forward with given task masks: {name: prediction} of every output adapter."""
        tasks = [t for t in self.backbone.input_adapters if t in inputs]
        if set(masks) - set(tasks):
            raise ValueError(f"masks for {sorted(set(masks) - set(tasks))}, which are not "
                             f"inputs ({tasks})")
        tokens, grid = self.backbone.embed(inputs)  # (B, M, N, D)
        B, N = tokens.shape[0], tokens.shape[2]
        for t, m in masks.items():
            if tuple(m.shape) != (B, N):
                raise ValueError(f"mask of {t!r} must be (B, N) = ({B}, {N}), got {tuple(m.shape)}")
        mask = torch.stack([masks[t].bool() if t in masks else tokens.new_zeros(B, N, dtype=torch.bool)
                            for t in tasks], 1)  # (B, M, N)
        return {name: pred for name, (pred, _) in self.decode(inputs, mask).items()}

    def decode(self, inputs, mask, shown=None):
        """Encode the visible tokens and run every output adapter. inputs {name: tensor},
        mask (B, M, N) bool over the inputs in adapter order, True = masked; `shown`: the
        visible tokens of every sample when the caller drew the mask with that budget
        (None: counted from the mask and checked, a host read)
        -> {output name: (prediction at the input's size, output tokens (B, N, dim))}."""
        tasks = [t for t in self.backbone.input_adapters if t in inputs]
        tokens, grid = self.backbone.embed(inputs)  # (B, M, N, D)
        D = tokens.shape[-1]
        flat = mask.flatten(1)  # (B, M*N)
        if shown is None:
            counted = (~flat).sum(1)
            if (counted != counted[0]).any() or counted[0] == 0:
                raise ValueError(f"every sample must show the same number (> 0) of tokens, got "
                                 f"{counted.tolist()}")
            shown = int(counted[0])
        # (B, M*N): visible tokens first, in grid order
        ids_shuffle = flat.int().argsort(dim=1, stable=True)
        ids_keep, ids_restore = ids_shuffle[:, :shown], ids_shuffle.argsort(1)
        # (B, T, D)
        x = torch.gather(tokens.flatten(1, 2), 1, ids_keep[..., None].expand(-1, -1, D))
        x = self.backbone(x)  # (B, T + 1, D)
        H, W = self.image_size(inputs)
        out = {}
        for name, adapter in self.output_adapters.items():
            pred, tok = adapter(x, tasks, ids_keep, ids_restore, grid)
            s = adapter.stride
            out[name] = (pred[..., :-(-H // s), :-(-W // s)], tok)
        return out

    @staticmethod
    def image_size(inputs):
        """(H, W) of the full-resolution image behind `inputs` (the semantic map is at 1/4)."""
        for name in ('rgb', 'depth'):
            if name in inputs:
                return tuple(inputs[name].shape[-2:])
        return tuple(4 * s for s in inputs['semseg'].shape[-2:])

    def targets(self, rgb, x, label):
        """The model's inputs and the pixel targets: {task: tensor}; norm_rgb's target is
        the per-patch normalised RGB (of the zero-padded image, cropped back)."""
        p = self.backbone.patch_size
        inputs = {'rgb': rgb, 'depth': standardize_depth(x) if self.depth_standardize else x,
                  'semseg': label[:, ::4, ::4]}
        padded = pad_to_multiple(rgb, p, (2, 3))
        norm = patch_normalised(padded, p)[..., :rgb.shape[-2], :rgb.shape[-1]]
        return inputs, {**inputs, 'norm_rgb': norm}

    def pixel_loss(self, name, pred, target, mask, grid):
        """MultiMAE's loss of one output over its masked tokens (criterion.py).
        pred, target at the output's resolution, mask (B, N) bool -> scalar."""
        # cross-entropy at 1/4 resolution; design choice: 255 pixels do not count
        if name == 'semseg':
            # (B, h4, w4)
            loss = F.cross_entropy(pred.float(), target, ignore_index=255, reduction='none')
            return masked_mean(loss, mask, grid, valid=target != 255)
        err = pred.float() - target
        # (B, H, W): L1 for depth, else MSE
        loss = (err.abs() if name == 'depth' else err.square()).mean(1)
        return masked_mean(loss, mask, grid)

    def draw_mask(self, keep, num_tokens):
        """MultiMAE patch masking of the kept modalities: keep (B, K) bool -> mask (B, K, N),
        True = masked."""
        counts = visible_counts(keep, self.budget(num_tokens))  # (B, K), rows summing to the budget
        return random_masking(counts, num_tokens, check=False)

    def losses(self, rgb, x, label, phase):
        """The terms of `phase`'s objective: {output name, ['token']} -> scalars."""
        if phase not in ('mim', 'teacher', 'student'):
            raise ValueError(f"phase must be 'mim', 'teacher' or 'student', not {phase!r}")
        inputs, targets = self.targets(rgb, x, label)
        p = self.backbone.patch_size
        grid = (-(-rgb.shape[-2] // p), -(-rgb.shape[-1] // p))
        tasks = list(inputs)
        # complete modalities
        keep = torch.ones(rgb.shape[0], len(tasks), dtype=torch.bool, device=rgb.device)
        # token_weight 0: M2IM without STTP's token loss
        teach = phase == 'student' and self.token_weight != 0
        N = grid[0] * grid[1]
        if teach:
            # the teacher: complete modalities, patch masking only; its tokens carry no gradient
            with torch.no_grad():
                teacher = self.decode(inputs, self.draw_mask(keep, N), self.budget(N))
        if phase == 'student':  # MaskMentor addition: M2IM's modality masking (Alg. 1)
            keep = m2im_keep_batch(rgb.shape[0], len(tasks), self.p_m, rgb.device)
        mask = self.draw_mask(keep, N)
        outs = self.decode(inputs, mask, self.budget(N))
        terms = {name: self.pixel_loss(name, pred, targets[name],
                                       mask[:, tasks.index(adapter.task)], grid)
                 for (name, (pred, _)), adapter in zip(outs.items(), self.output_adapters.values())}
        if teach:  # MaskMentor addition: STTP's token loss
            cos = torch.stack([F.cosine_similarity(outs[t][1], teacher[t][1], dim=-1) for t in tasks])  # (K, B, N)
            mean = (1 - cos).sum() / draw_policy().count(cos.numel())  # the mean over (K, B, N)
            terms['token'] = self.token_weight * mean
        return terms

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, label: torch.Tensor | None = None, phase: str = 'mim'
                ) -> tuple[torch.Tensor, None]:
        """The loss of `phase` ('mim', 'teacher' or 'student'; the trainer passes the one of
        `schedule`) on rgb (B, 3, H, W), depth x (B, 1, H, W), label (B, H, W) -> (loss, None)."""
        if label is None:
            raise ValueError("MaskMentor pre-training reconstructs the semantic map too: pass "
                             "label (B, H, W)")
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
    `depth_standardize`: depth standardised per image as in pre-training
    (`standardize_depth`, MultiMAE's fine-tuning does the same), which no affine
    scaling of the dataset changes; False feeds X as the dataset gives it.
    """

    # an absent or dropped modality's adapter gets no gradient in a step where no sample has it
    find_unused_parameters = True

    def __init__(self, backbone, num_classes, head_dim=384, head_depth=4, modality_drop=0.5,
                 depth_standardize=True):
        super().__init__()
        if list(backbone.input_adapters) != ['rgb', 'depth']:
            raise ValueError(f"fine-tuning needs the adapters rgb, depth, got "
                             f"{list(backbone.input_adapters)}")
        self.backbone, self.modality_drop, self.depth_standardize = backbone, modality_drop, depth_standardize
        self.head = ConvNeXtHead(backbone.dim, num_classes, head_dim, head_depth,
                                 backbone.patch_size)

    def presence(self, inputs, present):
        """(B, M) bool, True = the sample has the modality."""
        names = list(inputs)
        B = inputs[names[0]].shape[0]
        if present is not None:
            if isinstance(present, str) or not present or set(present) - set(names):
                raise ValueError(f"present must be a non-empty tuple out of {names}, "
                                 f"got {present!r}")
            return torch.tensor([n in present for n in names], device=inputs[names[0]].device).expand(B, -1)
        # design choice: a modality that is exactly all zeros for a sample (eval.py's missing input)
        # is absent
        has = torch.stack([v.flatten(1).ne(0).any(1) for v in inputs.values()], 1)  # (B, M)
        if not has.any(1).all():
            raise ValueError(f"samples {(~has.any(1)).nonzero()[:, 0].tolist()} have no modality: "
                             f"all inputs are zeros")
        return has

    def features(self, inputs, keep):
        """Mean output token of the kept modalities per place: (B, N, D), and the grid."""
        patterns, group = keep.unique(dim=0, return_inverse=True)
        feats, order = [], []
        for i, pattern in enumerate(patterns.tolist()):  # at most 2^M - 1 groups
            idx = (group == i).nonzero()[:, 0]
            # (b, m, N, D)
            tokens, grid = self.backbone.embed({n: v[idx] for (n, v), k in zip(inputs.items(), pattern) if k})  # (b, m, N, D)
            y = self.backbone(tokens.flatten(1, 2))[:, :-1]  # (b, m*N, D), global token dropped
            feats.append(y.view(tokens.shape).mean(1))  # (b, N, D)
            order.append(idx)
        return torch.cat(feats)[torch.cat(order).argsort()], grid

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, label: torch.Tensor | None = None,
                present: tuple[str, ...] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        inputs = {'rgb': rgb, 'depth': x}
        keep = self.presence(inputs, present)
        if self.depth_standardize:  # after `presence`: an absent (all-zero) depth stays all zeros
            inputs['depth'] = torch.where(keep[:, 1].view(-1, 1, 1, 1), standardize_depth(x), x)
        # design choice: M2IM's rule drops modalities in fine-tuning
        if self.training and self.modality_drop > 0:
            drop = keep & m2im_keep_batch(rgb.shape[0], len(inputs), self.modality_drop, rgb.device)
            keep = torch.where(drop.any(1, keepdim=True), drop, keep)
        # design choice: mean of the present modalities' tokens
        feats, grid = self.features(inputs, keep)
        logits = self.head(feats, grid, rgb.shape[-2:])
        if label is None:
            return logits
        return segmentation_loss(logits, label), logits


# MaskMentor Sec. 4.1: pre-training AdamW lr 1e-5, cosine, batch 12 (reached with accumulation when
# 12 do not fit), betas 0.9 / 0.95 as MultiMAE pre-trains; fine-tuning lr 3e-5, cosine, batch 2.
# Epochs, crop, weight decay and warm-up come from the baselines' recipe of the dataset.
MASKMENTOR_RECIPES = {'pretrain': dict(lr=1e-5, batch_size=12, schedule='cosine', beta2=0.95),
                      'finetune': dict(lr=3e-5, batch_size=2, schedule='cosine')}


def maskmentor_recipe(dataset, options=None):
    """MaskMentor's recipe for its stage (`options['stage']`, default finetune), on any dataset."""
    stage = (options or {}).get('stage', 'finetune')
    return replace(baseline_recipe(dataset), **MASKMENTOR_RECIPES[stage])


@dataclass
class MaskMentorConfig(Options):
    """MaskMentor's options, besides the ViT preset's sizes (`ViTSizes`); 'pretrain:' and
    'finetune:' name the stage an option acts in."""
    owner: typing.ClassVar[str] = 'maskmentor'
    stage: str = option(
        'finetune', "'pretrain': M2IM + STTP on MultiMAE's network (Alg. 1, Sec. 3.4); 'finetune': "
        "segmentation (Sec. 3.5)", choices=('pretrain', 'finetune'))
    img_size: int = option(
        224, "the image side the position tables are stored for (other sizes interpolate)",
        default_from='MultiMAE')
    drop_path_rate: float = option(
        0.0, "stochastic depth of the encoder: rates 0 .. this over its blocks",
        low=0, high=1, high_open=True)
    class_dim: int = option(
        64, "pretrain: width of the semantic map's class embedding", default_from='MultiMAE')
    decoder_dim: int = option(
        256, "pretrain: width of the output adapters (decoders)", default_from='MultiMAE')
    decoder_heads: int = option(
        8, "pretrain: attention heads of the output adapters", default_from='MultiMAE')
    decoder_depth: int = option(
        2, "pretrain: transformer blocks of each output adapter", default_from='MultiMAE')
    mask_ratio: float = option(
        5 / 6, "pretrain: the share of all K*N tokens masked (MultiMAE shows 98 of 3 x 196)",
        low=0, high=1, low_open=True, high_open=True, default_from='MultiMAE')
    p_m: float = option(
        0.5, "pretrain: M2IM's masking probability of each modality (Alg. 1)",
        low=0, high=1, default_from='paper')
    warmup: float = option(
        0.2,
        "pretrain: the fraction of the steps of complete-modality MIM before STTP (Sec. 4.1: ~100 "
        "of 500 epochs)", low=0, high=1, default_from='paper')
    warmup_steps: int | None = option(
        None, "pretrain: the warm-up in steps, instead of `warmup`",
        low=0, none="warmup x the run's steps")
    teacher_iters: int = option(
        3, "pretrain: teacher iterations per STTP cycle, then one student iteration (Sec. 3.4)",
        low=0, default_from='paper')
    token_weight: float = option(
        1.0,
        "pretrain: weight of STTP's token loss 1 - cos(student, teacher) (paper silent; 0: M2IM "
        "without it)", default_from='design')
    norm_pix_rgb: bool = option(
        True, "pretrain: also reconstruct per-patch normalised RGB (MultiMAE's "
        "extra_norm_pix_loss)",
        default_from='MultiMAE')
    depth_standardize: bool = option(
        True, "depth fed (and reconstructed) after MultiMAE's truncated standardisation per image",
        default_from='MultiMAE')
    head_dim: int = option(384, 'finetune: width of the ConvNeXt decoder', default_from='MultiMAE')
    head_depth: int = option(4, 'finetune: ConvNeXt blocks of the decoder', default_from='MultiMAE')
    modality_drop: float = option(
        0.5, "finetune: M2IM's p for dropping modalities of training samples (0: complete input)",
        low=0, high=1, default_from='paper')
    freeze_backbone: bool = option(
        False, "finetune: freeze the encoder (the paper trains the whole network)",
        default_from='paper')


def build_maskmentor(backbone_name: str, num_classes: int, x_channels: int,
                     pretrained: str | None = None,
                     **options) -> MaskMentorModel:
    """MaskMentor on a ViT preset ('base' = ViT-B/16, MultiMAE-B); `options`: `MaskMentorConfig`'s
    and the ViT's sizes (`ViTSizes`). stage 'pretrain': MaskMentorPretrain (adapters rgb, depth,
    semseg); 'finetune': MaskMentorSeg (adapters rgb, depth). `pretrained`: a MultiMAE file, an
    MAE ViT file or an rgbx MaskMentor checkpoint, through `load_pretrained` (which names what it
    ignores or re-initialises)."""
    cfg, sizes = split_options(MaskMentorConfig, ViTSizes, options)
    if backbone_name not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {backbone_name!r}; choose one of "
                         f"{sorted(VIT_PRESETS)}")
    if x_channels < 1:
        raise ValueError("MaskMentor is an RGB-D method: x_channels must be >= 1")
    vit_sizes = {**VIT_PRESETS[backbone_name], **sizes}
    patch, img = 16, cfg.img_size
    adapters = {'rgb': PatchedInputAdapter(3, vit_sizes['dim'], patch, img),
                'depth': PatchedInputAdapter(x_channels, vit_sizes['dim'], patch, img)}
    if cfg.stage == 'pretrain':
        adapters['semseg'] = SemSegInputAdapter(num_classes, vit_sizes['dim'], patch, 4,
                                                cfg.class_dim, img)
    backbone = MultiModalViT(adapters, patch_size=patch, drop_path_rate=cfg.drop_path_rate,
                             **vit_sizes)
    if cfg.stage == 'pretrain':
        model = MaskMentorPretrain(
            backbone, num_classes, decoder_dim=cfg.decoder_dim, decoder_heads=cfg.decoder_heads,
            decoder_depth=cfg.decoder_depth, mask_ratio=cfg.mask_ratio, p_m=cfg.p_m,
            warmup=cfg.warmup,
            warmup_steps=cfg.warmup_steps, teacher_iters=cfg.teacher_iters,
            token_weight=cfg.token_weight,
            norm_pix_rgb=cfg.norm_pix_rgb, depth_standardize=cfg.depth_standardize, img_size=img)
    else:
        model = MaskMentorSeg(backbone, num_classes, head_dim=cfg.head_dim,
                              head_depth=cfg.head_depth,
                              modality_drop=cfg.modality_drop,
                              depth_standardize=cfg.depth_standardize)
    if pretrained:
        load_pretrained(model, pretrained)
    if cfg.stage == 'finetune' and cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------
# Building a method by name: each method's builder, config, recipe and backbone
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """What `--method NAME` builds: the builder, its typed config, the recipe, the backbone
    family it runs on (None: either), its paper's backbone, and whether the backbone
    preset's sizes (`SwinSizes` / `ViTSizes`) are options of it too."""
    build: typing.Callable
    config: type
    recipe: typing.Callable
    family: str | None
    paper_backbone: str
    takes_sizes: bool = True


METHODS = {
    'early_fusion': Method(build=build_early_fusion, config=EarlyFusionConfig,
                           recipe=baseline_recipe, family=None,
                           paper_backbone='swin-base'),
    'rgb_only': Method(build=build_rgb_only, config=RGBOnlyConfig, recipe=baseline_recipe,
                       family=None,
                       paper_backbone='swin-base'),
    'ktb': Method(build=build_ktb, config=KTBConfig, recipe=ktb_recipe, family='swin',
                  paper_backbone='swin-base',
                  takes_sizes=False),
    'gopt': Method(build=build_gopt, config=GoPTConfig, recipe=gopt_recipe, family='vit',
                   paper_backbone='vit-base'),
    'maskmentor': Method(build=build_maskmentor, config=MaskMentorConfig, recipe=maskmentor_recipe,
                         family='vit',
                         paper_backbone='vit-base'),
}
# family -> presets, sizes
BACKBONES = {'swin': (SWIN_PRESETS, SwinSizes), 'vit': (VIT_PRESETS, ViTSizes)}


def method_spec(method):
    """The `Method` named `method`, or an error naming the methods."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]


def split_backbone(method, backbone):
    """'swin-base' -> ('swin', 'base'), checked against the family `method` is built on."""
    family, _, size = backbone.partition('-')
    if family not in BACKBONES or size not in BACKBONES[family][0]:
        raise ValueError(f"unknown backbone {backbone!r}: use swin-<{'|'.join(SWIN_PRESETS)}> "
                         f"or vit-<{'|'.join(VIT_PRESETS)}>")
    want = method_spec(method).family
    if want and family != want:
        raise ValueError(f"{method} is built on a {want} backbone, not {backbone!r}: use "
                         f"{want}-base (or -large)")
    return family, size


def option_fields(method, backbone):
    """The options of `method` on `backbone`: [(dataclass field, default)], the config's
    fields, then the backbone sizes it takes, whose None defaults are the preset's values."""
    spec = method_spec(method)
    family, size = split_backbone(method, backbone)
    own = fields(spec.config)
    presets, sizes = BACKBONES[family]
    extra = [f for f in fields(sizes) if f.name not in {g.name for g in own}] if spec.takes_sizes else []
    names = {f.name for f in extra}
    preset = asdict(sizes(**{k: v for k, v in presets[size].items() if k in names}))
    default = {**asdict(spec.config()), **{k: v for k, v in preset.items() if k in names}}
    return [(f, default[f.name]) for f in (*own, *extra)]


def resolve_options(method: str, backbone: str, given: dict) -> dict:
    """Every option of `method` on `backbone` after its defaults, `given` ({name: value},
    values as text or Python values) converted to each option's type and checked:
    {name: value}, the arguments that rebuild the model (a checkpoint stores them). Unknown
    names are an error that lists the method's options."""
    spec = method_spec(method)
    family, _ = split_backbone(method, backbone)
    cfg, sizes = split_options(spec.config, BACKBONES[family][1] if spec.takes_sizes else None,
                               given)
    defaults = dict((f.name, v) for f, v in option_fields(method, backbone))
    return {**defaults, **asdict(cfg), **sizes}


def build_model(method: str, backbone: str, num_classes: int, x_channels: int,
                pretrained: str | None = None,
                **options) -> 'RGBXModel':
    """Build `method` ('early_fusion', 'rgb_only', 'ktb', 'gopt', 'maskmentor') on
    `backbone` ('swin-base', 'vit-large', ...) with `options` (the method's config fields,
    as text or values), `pretrained` loaded into it (`load_pretrained`)."""
    spec = method_spec(method)
    _, size = split_backbone(method, backbone)
    return spec.build(backbone if spec.family is None else size, num_classes, x_channels,
                      pretrained=pretrained,
                      **options)


def recipe(method: str, dataset: str, options: dict | None = None) -> Recipe:
    """The training defaults (`Recipe`) of `method` on `dataset` (a preset name), with
    `options` (resolved: MaskMentor's depends on its stage)."""
    return method_spec(method).recipe(dataset, options or {})


def paper_backbone(method: str) -> str:
    """The backbone `method`'s paper uses ('swin-base' / 'vit-base'; the baselines: swin-base)."""
    return method_spec(method).paper_backbone


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
        raise ValueError(f"{source} does not fit this model: missing "
                         f"{missing[:20]}{'...' if len(missing) > 20 else ''}, "
                         f"unexpected {unexpected[:20]}{'...' if len(unexpected) > 20 else ''}. "
                         f"Build the model with the "
                         f"method, backbone and options the checkpoint was trained with.")
    model.load_state_dict(state, strict=keys == full)
    return model
