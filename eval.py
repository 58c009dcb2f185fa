"""Evaluate a trained RGB+X segmentation model, or segment your own images.

    python eval.py --checkpoint runs/demo-early_fusion-swin-nano/best.pt
    python eval.py --checkpoint best.pt --data-root DIR --multi-scale --flip --modality rgb
    python eval.py --checkpoint best.pt --save-pred preds/          # colourised maps + RGB | X | GT | prediction panels
    python eval.py --checkpoint best.pt --rgb room.png --x room_depth.png --out room_seg.png
    python eval.py --benchmark [--checkpoint best.pt | --method ktb --backbone swin-base]
    python eval.py --checkpoint nyu_ktb_swinb.pth --method ktb --backbone swin-base --dataset nyudv2 --data-root DIR
                                        # a trained KTB of the authors' release (no rgbx config inside)
    python eval.py --checkpoint runs/mm-pre/last.pt --reconstruct recon/  # MaskMentor Fig. 4 from a pre-training run

Reads top to bottom: metrics and inference (one confusion matrix; mIoU over the
classes present in the ground truth or the prediction; multi-scale, flip, sliding
window, a missing modality), the evaluation loop, a run's model rebuilt from its
checkpoint (the model arguments stored in it), pictures, the benchmark, the command
line. train.py imports this file for its evaluation and its checkpoints' models.
"""
import argparse
import ctypes
import functools
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
import rgbx


SEED = 3407  # the benchmark's random weights and inputs


def error_line(e):
    """The one-line message of a user error, also when a loader worker raised it (torch
    then wraps the worker's whole traceback into the message: its last line is the error)."""
    text = str(e)
    if 'Original Traceback' in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(': ', 1)[1] if ': ' in last and last.split(': ', 1)[0].isidentifier() else last
    return ' '.join(text.split('\n'))


PEER_FAILED = "another process of this torchrun stopped (its error is above); this one stops with it"


def peer_failed(e):
    """Whether a RuntimeError is the process group reporting that another process ended
    (gloo: the connection closed; nccl: a DistBackendError), rather than a fault here."""
    return dist.is_initialized() and (isinstance(e, getattr(dist, 'DistBackendError', ())) or any(
        s in str(e) for s in ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe')))


def autocast(amp, device):
    """The precision context of `amp`: bf16 / fp16 autocast on `device`, or fp32 (none).
    fp16 runs on CUDA only (with a gradient scaler in training)."""
    if amp == 'none':
        return nullcontext()
    if amp not in ('bf16', 'fp16'):
        raise ValueError(f"--amp takes none, bf16 or fp16, not {amp!r}")
    if amp == 'fp16' and device.type != 'cuda':
        raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


def bf16_matmul_speed(n=256, repeats=3):
    """How many times faster this CPU multiplies (n, n) matrices in bf16 than in fp32, on
    this process's threads (best of `repeats`); below 1 when the CPU has no bf16 matrix
    units (AVX-512 BF16 or AMX) and emulates them."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    ab, bb = a.bfloat16(), b.bfloat16()

    def best(x, y):
        x @ y
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times)
    return best(a, b) / best(ab, bb)


def check_cpu_bf16(amp, device, say=print):
    """--amp bf16 on a CPU that emulates bf16 is many times slower than fp32: say so (once)."""
    if amp != 'bf16' or device.type != 'cpu':
        return None
    speed = bf16_matmul_speed()
    if speed < 1:
        say(f"note: --amp bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no bf16 matrix units): bf16 "
            f"matrix products run {1 / speed:.0f}x slower than fp32 here; --amp none is faster on this machine")
    return speed


def keep_freed_memory():
    """CPU speed for an entry point (train.py and eval.py call it at start): keep the
    memory that freed tensors leave in the process (glibc only).

    By default glibc's malloc serves large allocations with mmap and returns them, and
    the free top of its heap, to the OS on free; the next tensor then lands on fresh
    pages, which the kernel zero-fills on first touch (one minor page fault per 4 KiB).
    Here every allocation comes from the heap (M_MMAP_MAX = 0) and the heap is never
    trimmed (M_TRIM_THRESHOLD = -1): the process keeps its peak heap and reuses it
    (`release_freed_memory` gives it back). Nothing computed changes; the measured
    effect is in docs/performance.md. A process-wide switch: importing eval or rgbx
    does not apply it. Skipped when RGBX_KEEP_FREED_MEMORY=0 or when glibc's own
    MALLOC_* variables or GLIBC_TUNABLES are set (your settings win).
    Returns whether it applied."""
    choice = os.environ.get('RGBX_KEEP_FREED_MEMORY', '1').strip().lower()
    if choice not in ('0', '1', 'false', 'true', 'no', 'yes', 'off', 'on'):
        warnings.warn(f"RGBX_KEEP_FREED_MEMORY={choice!r} is not 0 or 1: freed memory is kept (set 0 to leave "
                      f"glibc's malloc as it is)", stacklevel=2)
    if (choice in ('0', 'false', 'no', 'off') or not sys.platform.startswith('linux')
            or any(k.startswith('MALLOC_') or k == 'GLIBC_TUNABLES' for k in os.environ)):
        return False
    try:
        if not os.confstr('CS_GNU_LIBC_VERSION'):  # None, or ValueError, off glibc (e.g. musl)
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(mallopt(M_TRIM_THRESHOLD, -1)) and bool(mallopt(M_MMAP_MAX, 0))  # -1: never trim (man mallopt)


def release_freed_memory():
    """Give the heap's free pages back to the OS now (glibc's malloc_trim), e.g. before
    measuring a peak resident set (`peak_memory`): with `keep_freed_memory` the process
    otherwise stays at its largest peak. Returns whether anything was released."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0)) if sys.platform.startswith('linux') else False
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------
# Metrics and inference (also train.py's evaluation during training). Metrics come from one confusion matrix (rows =
# ground truth, columns = prediction), summed over processes under torchrun.
# mIoU is the mean IoU over the classes that occur in the ground truth or in the
# prediction of the whole evaluated set (a class absent from both has no IoU and is
# left out; a class predicted but never present scores 0).
# ----------------------------------------------------------------------------

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the papers' multi-scale test


def confusion(pred, label, num_classes, ignore=255):
    """(K, K) int64 confusion matrix, rows = ground truth, columns = prediction;
    pixels labelled `ignore` do not count."""
    valid = label != ignore
    idx = label[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def metrics(conf, average='present'):
    """mIoU, per-class IoU, mAcc, pixel accuracy, and OA / AA / Cohen's kappa (the
    WHU-OPT-SAR figures: OA = pixel accuracy, AA = mAcc). Classes with an empty
    union (IoU) or no ground truth (accuracy) are NaN and left out of the means.
    Both averages of the IoUs: miou_present (those classes left out, NaN-mean) and
    miou_all (over all K classes, an absent class scoring 0, as the KTB release and
    DFormer average); `miou` is the one `average` ('present' or 'all') names; `absent`
    lists the classes left out."""
    conf = conf.double()
    tp, gt, pr = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float('nan')))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float('nan')))
    n = conf.sum().clamp(min=1)
    oa = (tp.sum() / n).item()
    pe = ((gt * pr).sum() / n ** 2).item()
    present, everything = iou.nanmean().item(), iou.nan_to_num(0.0).mean().item()
    if average not in ('present', 'all'):
        raise ValueError(f"average takes 'present' or 'all', not {average!r}")
    return dict(miou=present if average == 'present' else everything, miou_present=present,
                miou_all=everything, average=average,
                absent=[int(c) for c in torch.nonzero(union == 0).flatten()],
                macc=acc.nanmean().item(), pixel_acc=oa, oa=oa, aa=acc.nanmean().item(),
                kappa=(oa - pe) / (1 - pe) if pe < 1 else 0.0, iou=iou.tolist())


def format_metrics(m, class_names, short=False):
    """The metrics as text: a first line `mIoU XX.XX | ...` with the average the evaluation
    uses (`m['average']`), then (unless `short`) the other average, the classes absent from
    both ground truth and prediction, and the per-class IoUs."""
    if math.isnan(m['miou']):
        return "mIoU nan: no labelled pixel in the evaluated images (every label is void / ignore)"
    head = (f"mIoU {100 * m['miou']:.2f} | mAcc {100 * m['macc']:.2f} | pixel acc {100 * m['pixel_acc']:.2f} | "
            f"kappa {m['kappa']:.4f}")
    if short:
        return head
    every = m.get('average', 'present') == 'all'
    k = len(m['iou'])
    present = f"mIoU over the {k - len(m['absent'])} classes present {100 * m['miou_present']:.2f}"
    other = present if every else \
        f"mIoU over all {k} classes (absent = 0) {100 * m['miou_all']:.2f}"
    absent = ', '.join(class_names[c] for c in m['absent']) or 'none'
    rows = [f"  {name:<24s} {'   n/a' if math.isnan(v) else f'{100 * v:6.2f}'}" for name, v in zip(class_names, m['iou'])]
    return (head + f"\n{other}\nabsent classes (no pixel in ground truth or prediction"
            f"{', IoU 0 in the mIoU' if every else ''}): {absent}\n"
            f"  class                     IoU %\n" + '\n'.join(rows))


def window_starts(size, crop, stride):
    """Start offsets of windows of length `crop` with step `stride` that cover
    [0, size); the last window ends exactly at size."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return starts + [size - crop]


def sliding_logits(model, rgb, x, num_classes, crop, stride=None):
    """Average the logits of crop-sized windows over an image larger than the crop.
    rgb (B, 3, H, W), x (B, Cx, H, W) -> (B, K, H, W). Height and width use their
    own crop and stride (crop = (ch, cw), stride defaults to 2/3 of the crop)."""
    H, W = rgb.shape[-2:]
    (ch, cw) = crop
    sh, sw = stride or (max(1, 2 * ch // 3), max(1, 2 * cw // 3))
    if H <= ch and W <= cw:
        return model(rgb, x)
    out = rgb.new_zeros(rgb.shape[0], num_classes, H, W)
    count = rgb.new_zeros(1, 1, H, W)
    for top in window_starts(H, ch, sh):
        for left in window_starts(W, cw, sw):
            win = (..., slice(top, top + ch), slice(left, left + cw))
            out[win] += model(rgb[win], x[win])
            count[win] += 1
    return out / count


def predict(model, rgb, x, num_classes, scales=(1.0,), flip=False, crop=None):
    """Sum of softmax probabilities over scales (and horizontal flips), at the
    input size: (B, K, H, W). Each scaled input goes through `sliding_logits`
    when `crop` is given and the input is larger than it."""
    H, W = rgb.shape[-2:]
    probs = rgb.new_zeros(rgb.shape[0], num_classes, H, W)
    for s in scales:
        size = (max(1, round(H * s)), max(1, round(W * s)))
        r, t = ((F.interpolate(v, size=size, mode='bilinear', align_corners=False) if s != 1 else v) for v in (rgb, x))
        for flipped in ((False, True) if flip else (False,)):
            ri, ti = (r.flip(-1), t.flip(-1)) if flipped else (r, t)
            logits = sliding_logits(model, ri, ti, num_classes, crop) if crop else model(ri, ti)
            logits = logits.flip(-1) if flipped else logits
            if s != 1:
                logits = F.interpolate(logits, size=(H, W), mode='bilinear', align_corners=False)
            probs += logits.float().softmax(1)
    return probs


def drop_modality(rgb, x, modality):
    """--modality both|rgb|x: zero the input that is missing (normalised zero = dataset mean)."""
    if modality not in ('both', 'rgb', 'x'):
        raise ValueError(f"--modality takes both|rgb|x, not {modality!r}")
    return (rgb if modality != 'x' else torch.zeros_like(rgb)), (x if modality != 'rgb' else torch.zeros_like(x))


@torch.no_grad()
def evaluate(model, loader, num_classes, device, scales=(1.0,), flip=False, crop=None, modality='both',
             amp='none', on_batch=None, probs=None):
    """Confusion matrix of `model` over `loader`, summed over processes when
    torch.distributed is initialised. `on_batch(index, rgb, x, label, pred)` sees
    every batch (used to save predictions). `probs(model, rgb, x)`: a protocol's
    inference (Protocol.probs) instead of `predict` with scales, flip and crop."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    ctx = autocast(amp, device)
    for i, (rgb, x, label) in enumerate(loader):
        rgb, x, label = rgb.to(device), x.to(device), label.to(device)
        with ctx:
            inputs = drop_modality(rgb, x, modality)
            out = probs(model, *inputs) if probs else \
                predict(model, *inputs, num_classes, scales, flip, crop)
            pred = out.argmax(1)
        conf += confusion(pred, label, num_classes)
        if on_batch is not None:
            on_batch(i, rgb, x, label, pred)
    if dist.is_initialized():
        dist.all_reduce(conf)
    model.train(was_training)
    return conf.cpu()


# ----------------------------------------------------------------------------
# Protocols (--protocol): how the code base behind a set of checkpoints evaluated,
# step for step, so that its checkpoints give the numbers its paper reports
# (docs/protocols.md). rgbx: `predict` above, at the stored size, with the flags.
# ----------------------------------------------------------------------------

RELEASE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the release's configs' EVAL.MSF (with flip)
# the release's EVAL.IMAGE_SIZE[0] per dataset: its Resize's short side (MCubeS: none, its own crop)
RELEASE_SHORT_SIDE = {'nyudv2': 480, 'sunrgbd': 480, 'mfnet': 480, 'pst900': 720, 'deliver': 1024,
                      'mcubes': None}
MCUBES_LEFT, MCUBES_CROP = 192, 1024  # the release's MCubeS: 192 left columns off, a centred crop


def resize_rounded(t, size, nearest=False):
    """t (C, H, W) of whole numbers (uint8 pixel or label values) resized as the tensor
    `resize` of torchvision 0.11 (the release's pin) does: in float, bilinear without
    antialiasing (align_corners=False) or legacy nearest (source pixel floor(i * in / out)),
    then rounded (half to even) back to whole numbers; float (C, *size)."""
    mode = dict(mode='nearest') if nearest else dict(mode='bilinear', align_corners=False)
    return F.interpolate(t[None].float(), size=tuple(size), **mode)[0].round()


def release_resize(rgb, x, label, short):
    """The release's `Resize(EVAL.IMAGE_SIZE)` (semseg/augmentations_mm.py): the short side to
    `short` (each side round(n * short / min(H, W)), Python's rounding), then each side up to
    a multiple of 32: two `resize_rounded` of rgb (3, H, W) and x (C, H, W) (0..255 values,
    bilinear) and of the label (H, W) (nearest), whose result is what gets scored."""
    H, W = label.shape
    first = tuple(round(n * short / min(H, W)) for n in (H, W))
    for size in (first, tuple(32 * math.ceil(n / 32) for n in first)):
        rgb, x = resize_rounded(rgb, size), resize_rounded(x, size)
        label = resize_rounded(label[None], size, nearest=True)[0]
    return rgb, x, label.long()


def mcubes_crop(*maps):
    """The release's MCubeS evaluation crop (its FixScaleCrop(1024) after dropping the 192
    left columns): rows [y, y + 1024), columns [192 + x, 192 + x + 1024) with y, x the
    centring offsets round((n - 1024) / 2) of the remaining 1024 x 1032 (so columns 196-1219)."""
    H, W = maps[0].shape[-2:]
    h, w = H, W - MCUBES_LEFT
    if min(h, w) != MCUBES_CROP:
        raise ValueError(f"the release evaluates MCubeS frames of 1024 x 1224 pixels (its crop "
                         f"assumes them), not {H} x {W}")
    y, x = (int(round((n - MCUBES_CROP) / 2)) for n in (h, w))
    return [m[..., y:y + MCUBES_CROP, MCUBES_LEFT + x:MCUBES_LEFT + x + MCUBES_CROP] for m in maps]


class ReleaseTransform:
    """A sample as the KTB release feeds it: (rgb uint8 (H, W, 3), x float32 (H, W, C),
    label int64 (H, W)) -> rgb (3, H', W') v / 255 with the ImageNet mean and std, x
    (C, H', W'), label (H', W'). `short` set: X read from 8-bit files ([0, 1] = v / 255)
    goes through `release_resize` as its 0..255 values with rgb and the label, then
    v / 255 (the release's Normalize leaves X unstandardised). `short` None (MCubeS): no
    resize, `mcubes_crop`, and X as read (AoLP from the .npy files, in [-1, 1])."""

    def __init__(self, short):
        self.short = short

    def __call__(self, rgb, x, label, rng=None):
        rgb, x = (torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()
                  for a in (rgb, x))
        label = torch.from_numpy(label)
        if self.short is None:
            rgb, x, label = mcubes_crop(rgb, x, label)
        else:
            rgb, x, label = release_resize(rgb, (x * 255).round(), label, self.short)
            x = x / 255
        rgb = data.normalize(rgb / 255, x, data.IMAGENET, ((0.0,) * len(x), (1.0,) * len(x)))[0]
        return rgb, x, label


def release_probs(model, rgb, x, num_classes, scales=RELEASE_SCALES, flip=True, forward=None):
    """The release's `evaluate_msf` (val_mm.py; DFormer's is the same): each scale s feeds
    `forward` (default the model) ceil(int(s * H) / 32) * 32 x ceil(int(s * W) / 32) * 32
    inputs (bilinear, align_corners=True), its logits (flipped back first for the flipped
    pass) go back to (H, W) the same way, and the softmaxes add up: (B, K, H, W). scales
    (1.0,) without flip is its single-scale `evaluate` (the resized sides are multiples of 32)."""
    forward = forward or model
    H, W = rgb.shape[-2:]
    probs = rgb.new_zeros(rgb.shape[0], num_classes, H, W, dtype=torch.float32)
    for s in scales:
        size = tuple(32 * math.ceil(int(s * n) / 32) for n in (H, W))
        r, t = (F.interpolate(v, size=size, mode='bilinear', align_corners=True) for v in (rgb, x))
        for flipped in ((False, True) if flip else (False,)):
            logits = forward(r.flip(-1), t.flip(-1)).flip(-1) if flipped else forward(r, t)
            logits = F.interpolate(logits, size=(H, W), mode='bilinear', align_corners=True)
            probs += logits.float().softmax(1)
    return probs


def release_transform(dataset, x_modality, preset, name='release'):
    """The release's data transform for `dataset`, or an error naming what it cannot read
    (and the --protocol `name` given: both release protocols read alike)."""
    if dataset not in RELEASE_SHORT_SIDE:
        raise ValueError(f"--protocol {name} evaluates the release's datasets "
                         f"({', '.join(RELEASE_SHORT_SIDE)}), not {dataset}; use --protocol rgbx")
    npy = dataset == 'mcubes'
    if npy != (x_modality == 'aolp-npy'):
        raise ValueError(f"--protocol {name} reads MCubeS' AoLP from the .npy files (--x-modality "
                         f"aolp-npy) and the other datasets' X from 8-bit images, not X "
                         f"{x_modality!r} of {dataset}")
    if preset.modalities[x_modality].max16:
        raise ValueError(f"--protocol {name} reads X from 8-bit images; {dataset}'s X "
                         f"{x_modality!r} is 16-bit depth: evaluate a model of an 8-bit X "
                         f"(depth8, hha)")
    return ReleaseTransform(RELEASE_SHORT_SIDE[dataset])


DFORMER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)  # DFormer's utils/eval.py --mst (+ flip, --sliding)
DFORMER_CROP = {'nyudv2': (480, 640), 'sunrgbd': (480, 480)}  # eval_crop_size; stride rate 2/3
CMX_SCALES, CMX_CROP = (0.75, 1.0, 1.25), (480, 640)  # CMX's multi-scale eval_scale_array, crop


class InputTransform:
    """A code base's input conventions, nothing resized: (rgb uint8 (H, W, 3), x float32
    (H, W, C) on [0, 1], label) -> rgb and a 3-channel x in BGR order when `bgr` (cv2's,
    which DFormer and CMX read and keep: the ImageNet mean of R then applies to B),
    (v - mean) / std with `rgb_norm` and `x_norm` ((mean, std) on [0, 1]), the label as read."""

    def __init__(self, bgr, rgb_norm, x_norm):
        self.bgr, self.rgb_norm, self.x_norm = bgr, rgb_norm, x_norm

    def __call__(self, rgb, x, label, rng=None):
        rgb, x = data.to_chw(rgb, x)
        if self.bgr:
            rgb, x = rgb.flip(0), (x.flip(0) if len(x) == 3 else x)
        mean, std = self.x_norm
        rgb, x = data.normalize(rgb, x, self.rgb_norm, (mean[:len(x)], std[:len(x)]))
        return rgb, x, torch.from_numpy(label)


def dformer_windows(model, rgb, x, crop, stride_rate=2 / 3):
    """DFormer's slide_inference (utils/val_mm.py): an input smaller than the crop on
    either side is first resized to exactly the crop (bilinear, align_corners=True);
    windows of the crop at stride int(rate * crop) per side, the last ending at the border;
    logits averaged where windows overlap: (B, K, h, w) at the (maybe resized) input size."""
    ch, cw = crop
    if ch > rgb.shape[-2] or cw > rgb.shape[-1]:
        rgb, x = (F.interpolate(v, size=tuple(crop), mode='bilinear', align_corners=True)
                  for v in (rgb, x))
    H, W = rgb.shape[-2:]
    sh, sw = int(stride_rate * ch), int(stride_rate * cw)
    out, count = None, rgb.new_zeros(1, 1, H, W)
    for i in range(max(H - ch + sh - 1, 0) // sh + 1):
        for j in range(max(W - cw + sw - 1, 0) // sw + 1):
            y2, x2 = min(i * sh + ch, H), min(j * sw + cw, W)
            win = (..., slice(max(y2 - ch, 0), y2), slice(max(x2 - cw, 0), x2))
            logits = model(rgb[win], x[win])
            out = logits.new_zeros(*logits.shape[:2], H, W) if out is None else out
            out[win] += logits
            count[win] += 1
    return out / count


def dformer_probs(model, rgb, x, num_classes, crop):
    """DFormer's evaluate_msf with --sliding: `release_probs`' geometry (the same code),
    scales 0.5-1.5 + flip, each pass through `dformer_windows`."""
    return release_probs(model, rgb, x, num_classes, DFORMER_SCALES, True,
                         lambda r, t: dformer_windows(model, r, t, crop))


def cmx_pad(t, crop):
    """CMX's pad_image_to_shape: (..., h, w) padded with 0 up to `crop` where smaller,
    centred (the odd pixel at the bottom / right). Returns (padded, (top, bottom, left, right))."""
    ph, pw = max(crop[0] - t.shape[-2], 0), max(crop[1] - t.shape[-1], 0)
    m = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
    return F.pad(t, (m[2], m[3], m[0], m[1])), m


def cmx_window(model, rgb, x, crop, flip=True):
    """CMX's process_image_rgbX + val_func_process_rgbX: the normalised window padded to
    the crop (cmx_pad), the model's logits plus the flipped window's flipped back, then
    exp (of the summed logits, as CMX scores), the padding cut: (B, K, h, w)."""
    (r, m), (t, _) = cmx_pad(rgb, crop), cmx_pad(x, crop)
    score = model(r, t) + (model(r.flip(-1), t.flip(-1)).flip(-1) if flip else 0)
    return score.float().exp()[..., m[0]:score.shape[-2] - m[1], m[2]:score.shape[-1] - m[3]]


def cmx_scale(model, rgb, x, num_classes, crop=CMX_CROP, stride_rate=2 / 3, flip=True):
    """CMX's scale_process_rgbX on one scaled input (B, C, h, w) -> summed scores (B, K, h, w).
    Not larger than the crop on one side: one padded window. Else windows as CMX lays them:
    its column step and window width come from the crop's height (stride ceil(rate * crop)),
    its row step and window height from the crop's width, a window's start is its end minus
    that size (negative: counted from the far border, Python slicing), and scores add up
    without averaging."""
    h, w = rgb.shape[-2:]
    if w <= crop[1] or h <= crop[0]:
        return cmx_window(model, rgb, x, crop, flip)
    stride = (math.ceil(crop[0] * stride_rate), math.ceil(crop[1] * stride_rate))
    out = rgb.new_zeros(rgb.shape[0], num_classes, h, w, dtype=torch.float32)
    for i in range(math.ceil((h - crop[0]) / stride[0]) + 1):
        for j in range(math.ceil((w - crop[1]) / stride[1]) + 1):
            e_x, e_y = min(j * stride[0] + crop[0], w), min(i * stride[1] + crop[1], h)
            win = (..., slice(e_y - crop[1], e_y), slice(e_x - crop[0], e_x))
            out[win] += cmx_window(model, rgb[win], x[win], crop, flip)
    return out


def cmx_probs(model, rgb, x, num_classes, scales=CMX_SCALES, flip=True, crop=CMX_CROP):
    """CMX's sliding_eval_rgbX: each scale s resizes the input as cv2.resize(fx=s, fy=s)
    does: to round(s * H) x round(s * W), sampling source pixel (i + 0.5) / s - 0.5 (the
    factor, not the ratio of the sizes; CMX resizes the uint8 image before normalising,
    which differs from resizing the normalised one only by cv2's rounding), `cmx_scale`,
    and the scores go back to (H, W) (bilinear, the ratio of the sizes) and add up: (B, K, H, W)."""
    H, W = rgb.shape[-2:]
    total = rgb.new_zeros(rgb.shape[0], num_classes, H, W, dtype=torch.float32)
    for s in scales:
        size = [round(H * s), round(W * s)]
        r, t = (torch.ops.aten.upsample_bilinear2d(v, size, False, s, s)  # sampling by factor s
                for v in (rgb, x))
        total += F.interpolate(cmx_scale(model, r, t, num_classes, crop, 2 / 3, flip), size=(H, W),
                               mode='bilinear', align_corners=False)
    return total


MULTIMAE_CANVAS = 640  # NYUv2 input_size: LongestMaxSize(640), PadIfNeeded(640, 640), top-left
MULTIMAE_DEPTH_UNIT = 2 ** 16 / 10  # tools/prepare_nyuv2.py stores depth as uint16(metres * 6553.6)


def multimae_depth(depth, valid, trunc=0.1):
    """MultiMAE's standardize_depth_map (utils/datasets_semseg.py) on one depth map (H, W):
    (d - mean) / sqrt(var + 1e-6), mean and unbiased variance of the values between the
    10th and 90th percentile of the `valid` ones (not padding; here not holes either), the
    others 0 afterwards (its mask_valid step)."""
    v = depth[valid].sort().values
    mid = v[int(trunc * len(v)):int((1 - trunc) * len(v))]
    standardised = (depth - mid.mean()) / (mid.var() + 1e-6).sqrt()
    return torch.where(valid, standardised, torch.zeros_like(depth))


class MultiMAETransform:
    """MultiMAE's NYUv2 semantic-segmentation evaluation input (simple_transform(train=False)
    and DataAugmentationForSemSeg): the long side to 640 if it is not (bilinear for RGB,
    nearest for depth and labels; NYUv2's 640 x 480 frames are not resized), then a 640 x 640
    canvas holding the image at its top-left: RGB padded with 128 before normalising
    (ImageNet, RGB order), depth (in MultiMAE's unit, 6553.6 per metre, from rgbx's v / 10000
    of millimetres) standardised by `multimae_depth` with padding and holes (0) left out and
    set to 0, labels padded with ignore."""

    def __call__(self, rgb, x, label, rng=None):
        rgb, depth = data.to_chw(rgb, x)
        label = torch.from_numpy(label)
        H, W = label.shape
        if max(H, W) != MULTIMAE_CANVAS:
            size = tuple(round(n * MULTIMAE_CANVAS / max(H, W)) for n in (H, W))
            rgb = F.interpolate(rgb[None], size=size, mode='bilinear', align_corners=False)[0]
            depth, label = (F.interpolate(t[None].float(), size=size, mode='nearest')[0]
                            for t in (depth, label[None]))
            label = label[0].long()
        h, w = label.shape
        pad = (0, MULTIMAE_CANVAS - w, 0, MULTIMAE_CANVAS - h)
        rgb = F.pad(rgb, pad, value=128 / 255)
        depth = F.pad(depth[0] * 10 * MULTIMAE_DEPTH_UNIT, pad)
        valid = F.pad(torch.ones(h, w, dtype=torch.bool), pad) & (depth > 0)
        rgb, _ = data.normalize(rgb, depth[None], data.IMAGENET, ((0.0,), (1.0,)))
        return rgb, multimae_depth(depth, valid)[None], F.pad(label, pad, value=data.IGNORE)


def multimae_probs(model, rgb, x, num_classes, dataset):
    """MultiMAE's evaluate: one pass on the canvas. A model that standardises depth itself
    (MaskMentor fine-tuning, `depth_standardize`) is given the protocol's standardised depth
    as it is: its own standardisation is off for the pass."""
    own = getattr(model, 'depth_standardize', False)
    if own:
        model.depth_standardize = False
    try:
        return model(rgb, x).float().softmax(1)
    finally:
        if own:
            model.depth_standardize = True


def multimae_transform(dataset, x_modality, preset):
    """MultiMAE's NYUv2 input: depth in millimetres (rgbx's `depth`)."""
    if dataset != 'nyudv2' or x_modality != 'depth':
        raise ValueError(f"--protocol multimae evaluates NYUDv2 with depth (--x-modality depth, "
                         f"16-bit mm), as MultiMAE's NYUv2 fine-tuning does, not {dataset} with X "
                         f"{x_modality!r}")
    return MultiMAETransform()


def dformer_transform(dataset, x_modality, preset):
    """DFormer's ValPre: NYUDv2 / SUN RGB-D, its 8-bit depth, BGR, depth (v / 255 - 0.48) / 0.28."""
    if dataset not in DFORMER_CROP or x_modality != 'depth8':
        raise ValueError(f"--protocol dformer evaluates NYUDv2 and SUN RGB-D with DFormer's 8-bit "
                         f"depth (--x-modality depth8), not {dataset} with X {x_modality!r}")
    return InputTransform(True, data.IMAGENET, ((0.48,) * 3, (0.28,) * 3))


def cmx_transform(dataset, x_modality, preset):
    """CMX's input: RGB and a 3-channel X in BGR order (cv2's), both with ImageNet's statistics."""
    if preset.modalities[x_modality].channels != 3 or preset.modalities[x_modality].max16:
        raise ValueError(f"--protocol cmx normalises a 3-channel 8-bit X (HHA, ...) with the "
                         f"ImageNet statistics, not {dataset}'s X {x_modality!r}")
    return InputTransform(True, data.IMAGENET, data.IMAGENET)


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol: `transform(dataset, x_modality, preset)` gives the dataset
    transform (None: rgbx's EvalTransform), `probs(model, rgb, x, K, dataset)` the summed
    probabilities (B, K, H, W) at the scored size; `average` of the IoUs ('all' or 'present',
    see `metrics`); `amp`: the precision the code ran with on CUDA (CPU runs fp32)."""
    summary: str
    average: str = 'present'
    amp: str = 'none'
    probs: object = None
    transform: object = None


def release_single_scale(model, rgb, x, k, dataset):
    """The release's single-scale `evaluate`: one pass at the resized size."""
    return release_probs(model, rgb, x, k, (1.0,), False)


PROTOCOLS = {
    'rgbx': Protocol("this project's: the stored size, --multi-scale / --flip / --sliding as "
                     "given, mIoU over the classes present"),
    'release': Protocol("the KTB release's evaluate_msf: Resize, scales 0.5-1.75 + flip, mIoU over "
                        "all classes", 'all', 'none',
                        lambda model, rgb, x, k, dataset: release_probs(model, rgb, x, k),
                        release_transform),
    'release-single-scale': Protocol("the KTB release's single-scale evaluate: Resize, one pass, "
                                     "mIoU over all classes", 'all', 'none', release_single_scale,
                                     functools.partial(release_transform,
                                                       name='release-single-scale')),
    'multimae': Protocol("MultiMAE's NYUv2 fine-tuning evaluate: a 640 x 640 canvas padded at the "
                         "top-left, depth standardised per image, one pass, fp16 on CUDA, mIoU "
                         "over the classes present", 'present', 'fp16', multimae_probs,
                         multimae_transform),
    'dformer': Protocol("DFormer's evaluate_msf --sliding: BGR, scales 0.5-1.5 + flip, windows of "
                        "480 x 640 (SUN RGB-D 480 x 480), fp16 on CUDA, mIoU over all classes",
                        'all', 'fp16',
                        lambda model, rgb, x, k, dataset: dformer_probs(model, rgb, x, k,
                                                                        DFORMER_CROP[dataset]),
                        dformer_transform),
    'cmx': Protocol("CMX's sliding_eval_rgbX: BGR, scales 0.75-1.25 + flip, centred padding to "
                    "480 x 640 and its windows, mIoU over the classes present", 'present', 'none',
                    lambda model, rgb, x, k, dataset: cmx_probs(model, rgb, x, k), cmx_transform),
}


# ----------------------------------------------------------------------------
# A run's model and data, rebuilt from its checkpoint
# ----------------------------------------------------------------------------

def parse_size(text, flag):
    """'480x640' -> (480, 640), positive integers, or an error naming `flag`."""
    try:
        size = tuple(int(v) for v in str(text).lower().split('x'))
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{flag} takes HxW in pixels, e.g. 480x640, not {text!r}")
    return size


def check_device(name, flag='--device'):
    """A torch.device of `name` ('' = cuda if available, else cpu) that exists on this machine."""
    try:
        device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError:
        raise ValueError(f"{flag} takes cpu, cuda or cuda:N, not {name!r}") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                         f"use {flag} cpu")
    if device.type not in ('cpu', 'cuda'):
        raise ValueError(f"{flag} takes cpu, cuda or cuda:N, not {name!r}")
    count = torch.cuda.device_count() if device.type == 'cuda' else 0
    if device.type == 'cuda' and device.index is not None and device.index >= count:
        raise ValueError(f"{flag} {name}: this machine has {count} CUDA device(s), cuda:0 .. "
                         f"cuda:{count - 1}; pass one of them")
    return device


def check_cuda_bf16(amp, device):
    """--amp bf16 on a GPU without bf16 units (before Ampere, compute capability 8.0): an error."""
    if amp != 'bf16' or device.type != 'cuda':
        return
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise ValueError(f"--amp bf16: {device} ({torch.cuda.get_device_name(device)}, compute "
                         f"capability {major}.{minor}) has no bf16 units (Ampere, 8.0, and later have "
                         f"them): use --amp fp16")


def set_tf32(enabled):
    """The float32 policy on CUDA: TF32 (10-bit mantissa) tensor cores for matrix products
    and cuDNN convolutions when `enabled` (on Ampere and later: several times faster, about
    1e-3 relative error per product), true float32 when not. CPU computation is unaffected."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def setup_distributed(device_name):
    """(rank, world, device): one process, or under torchrun (RANK in the environment)
    its rank, with the process group (nccl on CUDA, gloo on CPU) and this rank's GPU
    (LOCAL_RANK). On CUDA the process's device is made the current one, so that nothing
    (the caching allocator, NCCL, pinned memory) lands on GPU 0 by default."""
    device = check_device(device_name)
    if 'RANK' not in os.environ:
        if device.type == 'cuda':  # 'cuda' names the current device: its index made explicit
            index = torch.cuda.current_device() if device.index is None else device.index
            device = torch.device('cuda', index)
            torch.cuda.set_device(device)
        return 0, 1, device
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    if device.type == 'cuda':
        if local >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"torchrun started process {local} of this machine, which has {count} CUDA "
                             f"device(s): pass --nproc_per_node {count} (one per GPU)")
        device = torch.device(f'cuda:{local}')
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def parse_opts(text):
    """'a=1, b=x,c=8:16' -> {'a': '1', 'b': 'x', 'c': '8:16'}: method options as text
    (rgbx.resolve_options gives them their types); an item without '=', an empty key or
    a key given twice is an error naming it."""
    out = {}
    for item in (i.strip() for i in (text or '').split(',')):
        if not item:
            continue
        key, eq, value = (p.strip() for p in item.partition('='))
        if not eq or not key:
            raise ValueError(f"--opts item {item!r} is not key=value")
        if key in out:
            raise ValueError(f"--opts gives {key!r} twice")
        out[key] = value
    return out


# 2: MaskMentor fine-tuning applies `depth_standardize` (in format 1 it stored the option without using it)
RUN_FORMAT = 2


@dataclass
class RunSpec:
    """What rebuilds a trained model and reads its data, as stored in its checkpoints:
    model_args = dict(method, backbone, num_classes, x_channels, options) for
    rgbx.build_model (every option after its defaults), the dataset, its X modality and
    how X is scaled (x_standardised), the data root and crop of the run, its pretrained file."""
    model_args: dict
    dataset: str
    x_modality: str
    x_standardised: bool = True
    data_root: str = ''
    crop: str = ''
    pretrained: str = ''
    seed: int = 0
    format: int = RUN_FORMAT  # of the code that wrote it (`checkpoint_run` reads older ones as they ran)

    @property
    def method(self):
        return self.model_args['method']

    def build(self, pretrained=None):
        """The model, with `pretrained` loaded into it (None: none; random frozen weights)."""
        a = self.model_args
        return rgbx.build_model(a['method'], a['backbone'], a['num_classes'], a['x_channels'], pretrained=pretrained,
                                **a['options'])


def run_spec(method, backbone, dataset, x_modality='', opts='', pretrained='', data_root='', crop='', seed=0):
    """The RunSpec of a model chosen by name: options resolved (`opts` text or dict, the
    recipe's defaults for the dataset first), X modality and scaling from the dataset
    and the method's recipe."""
    preset = data.get_preset(dataset)
    x = preset.x_name(x_modality or None)
    given = parse_opts(opts) if isinstance(opts, str) else dict(opts)
    options = rgbx.resolve_options(method, backbone, given)
    recipe = rgbx.recipe(method, dataset, options)  # e.g. MaskMentor's stage picks its recipe
    options.update({k: v for k, v in recipe.options.items() if k not in given})  # its dataset's defaults
    args = dict(method=method, backbone=backbone, num_classes=preset.num_classes, x_channels=preset.x_channels(x),
                options=options)
    return RunSpec(args, dataset, x, recipe.x_standardised, data_root, crop, pretrained, seed)


# A checkpoint of the previous format (its config and option text only) would take today's
# default for an option added since: here the value the code that wrote it used.
LEGACY_OPTIONS = {'gopt': {'acp': 'literal'}}
def as_it_ran(run):
    """A RunSpec of an older format, with the options that make today's code do what that code did."""
    options = run.model_args['options']
    if run.format < 2 and run.method == 'maskmentor' and options.get('stage') == 'finetune':
        run.model_args = dict(run.model_args, options={**options, 'depth_standardize': False})
    run.format = RUN_FORMAT
    return run


def legacy_run(config, source):
    """The RunSpec of a checkpoint written before checkpoints stored their model arguments:
    its config's method, backbone and option text, with the defaults that code used."""
    try:
        given = {**LEGACY_OPTIONS.get(config['method'], {}), **parse_opts(config['opts'])}
        if config['method'] == 'maskmentor':
            given.setdefault('stage', 'finetune')
        run = run_spec(config['method'], config['backbone'], config['dataset'], config['x_modality'], given,
                     config['pretrained'], config['data_root'], config['crop'], config.get('seed', 0))
    except KeyError as e:
        raise ValueError(f"{source} has no config field {e}: it is not a checkpoint of train.py") from None
    run.format = 1
    return as_it_ran(run)


def load_run_checkpoint(path):
    """A training checkpoint of train.py; anything else is a one-line error."""
    ckpt = rgbx.read_checkpoint(path)
    needed = {'model', 'config', 'step'}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        raise ValueError(f"{path} is not an rgbx training checkpoint (needs keys {sorted(needed)}); "
                         f"for an official backbone file use --pretrained")
    return ckpt


def checkpoint_run(ckpt, source):
    """The RunSpec a training checkpoint stores (or, for one of the previous format, `legacy_run`)."""
    if 'run' not in ckpt:
        return legacy_run(ckpt['config'], source)
    try:
        return as_it_ran(RunSpec(**{'format': 1, **ckpt['run']}))
    except TypeError:
        raise ValueError(f"{source} stores model arguments this code does not know ({sorted(ckpt['run'])}): "
                         f"use the version of the code that wrote it") from None


def trained_weights(ckpt):
    """The weights a training checkpoint holds, less the step counter older MaskMentor
    pre-training checkpoints kept as a buffer (the schedule follows the trainer's step)."""
    return {k: v for k, v in ckpt['model'].items() if k != 'steps_done'}


def load_model(path, pretrained=None, device='cpu'):
    """Rebuild the model of a training checkpoint from its stored arguments and load
    its weights. The frozen backbone comes from the checkpoint when it holds every
    weight (--save-full, or a run without a pretrained file), else from the run's
    pretrained file (or `pretrained`), checked against the fingerprint stored at
    training time. Returns (model, RunSpec)."""
    ckpt = load_run_checkpoint(path)
    run = checkpoint_run(ckpt, path)
    used = run.pretrained  # the file the run was trained with
    if pretrained:
        run.pretrained = pretrained
    start = {f.name: '' for f, _ in rgbx.option_fields(run.method, run.model_args['backbone'])
             if f.metadata['start_file'] and f.name in run.model_args['options']}  # the trained weights replace them
    run.model_args = dict(run.model_args, options={**run.model_args['options'], **start})
    model = run.build()  # first without the file
    full = set(ckpt['model']) == set(model.state_dict())
    if full and pretrained:
        raise ValueError(f"{path} holds every weight, the frozen ones too: --pretrained would be ignored; drop it")
    if not full and run.pretrained not in ('', 'none'):  # the frozen weights come from the file
        if not os.path.isfile(run.pretrained):
            raise ValueError(f"{path} holds only the trained weights; its frozen backbone comes from the run's "
                             f"pretrained file {run.pretrained}, which does not exist: pass --pretrained FILE")
        model = run.build(run.pretrained)
    if not full and ckpt['frozen_sha1'] != rgbx.frozen_fingerprint(model):
        raise ValueError(f"{path} holds only the trained weights, and the frozen ones built here differ from those "
                         f"it was trained with: " + (
                             f"pass --pretrained with the file the run used ({used!r})"
                             if used not in ('', 'none') else
                             "the run had no pretrained file and this checkpoint predates saving its random frozen "
                             "weights; train it again"))
    rgbx.load_trained(model, trained_weights(ckpt), path)
    return model.to(device).eval(), run


def load_model_from_flags(args, device):
    """A checkpoint without rgbx's training config, e.g. a trained KTB of the
    authors' release: the model is built from --method, --backbone, --dataset
    (classes, X channels), --x-modality and --opts, and the whole file is loaded
    by rgbx.load_pretrained, which checks every key. Returns (model, RunSpec)."""
    if not (args.method and args.backbone and args.dataset):
        raise ValueError(f"{args.checkpoint} holds no rgbx training config: pass --method, --backbone and "
                         f"--dataset to build its model (e.g. --method ktb --backbone swin-base --dataset nyudv2)")
    run = run_spec(args.method, args.backbone, args.dataset, args.x_modality or '', args.opts or '',
                 data_root=args.data_root or '')
    model = run.build()
    rgbx.load_pretrained(model, args.checkpoint)
    return model.to(device).eval(), run


def to_image(t, mean, std):
    """A normalised (C, H, W) tensor back to uint8 (H, W, 3) for display: channel
    1 is shown grey, 3 as RGB."""
    img = (t.float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1))
    img = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, -1, -1)
    lo, hi = img.amin(), img.amax()
    if img.shape[0] and (lo < 0 or hi > 1):  # X of unknown range (depth in metres ...): stretch
        img = (img - lo) / (hi - lo).clamp(min=1e-6)
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def save_reconstructions(model, dataset, out_dir, rgb_norm, device):
    """MaskMentor Fig. 4 from a pre-training model: for each image, RGB | depth | depth
    reconstructed from RGB alone | RGB reconstructed from depth alone, as one PNG
    (`reconstruct` with one input, nothing masked). Depth is shown as the model sees it
    (MultiMAE's standardisation when the model uses it), each depth picture stretched to its range."""
    os.makedirs(out_dir, exist_ok=True)
    for i in range(len(dataset)):
        rgb, x, label = (t[None].to(device) for t in dataset[i])
        inputs, _ = model.targets(rgb, x, label)
        with torch.no_grad():
            depth_from_rgb = model.reconstruct({'rgb': rgb}, {})['depth']
            rgb_from_depth = model.reconstruct({'depth': inputs['depth']}, {})['rgb']
        grey = ([0.0], [1.0])
        panel = np.concatenate([to_image(rgb[0], *rgb_norm), to_image(inputs['depth'][0], *grey),
                                to_image(depth_from_rgb[0], *grey), to_image(rgb_from_depth[0], *rgb_norm)], 1)
        Image.fromarray(panel).save(os.path.join(out_dir, f'{dataset.names[i]}_reconstruction.png'))


def words(draw, xy, text, font):
    """Draw `text` word by word, a visible gap between words (the default font's space is
    2 px wide); returns the width drawn."""
    x, gap = xy[0], max(4, int(font.getlength(' ')))
    for word in text.split():
        if draw is not None:
            draw.text((x, xy[1]), word, fill='black', font=font)
        x += int(font.getlength(word)) + gap
    return x - gap - xy[0]


def legend(classes, class_names, palette, width, row=14):
    """A white strip (h, width, 3) uint8 of swatches and names: each class in `classes`,
    then void (hatched, as data.colorize draws it), in as many columns as fit."""
    font = ImageFont.load_default()
    entries = [(c, class_names[c]) for c in classes] + [(data.IGNORE, 'void (not scored)')]
    cell = 16 + max(words(None, (0, 0), name, font) for _, name in entries)  # swatch, gap, name
    cols = max(1, width // cell)
    strip = Image.new('RGB', (width, row * -(-len(entries) // cols) + 2), 'white')
    draw = ImageDraw.Draw(strip)
    for i, (c, name) in enumerate(entries):
        x, y = i % cols * cell + 2, i // cols * row + 2
        strip.paste(Image.fromarray(data.colorize(np.full((row - 4, row - 4), c), palette, hatch=True)), (x, y))
        draw.rectangle((x, y, x + row - 5, y + row - 5), outline=(128, 128, 128))
        words(draw, (x + row, y), name, font)
    return np.array(strip)


PANEL_TITLES = ('RGB', 'X', 'ground truth', 'prediction')


def captions(titles, column, row=14):
    """A white strip (row, len(titles) * column, 3) uint8 with each title under its column."""
    font = ImageFont.load_default()
    strip = Image.new('RGB', (len(titles) * column, row), 'white')
    draw = ImageDraw.Draw(strip)
    for i, title in enumerate(titles):
        left = i * column + max(2, (column - words(None, (0, 0), title, font)) // 2)  # centred
        words(draw, (left, 1), title, font)
    return np.array(strip)


def save_panel(path, rgb_img, x_img, gt, pred, palette, class_names):
    """RGB | X | ground truth | prediction, side by side, their titles under them, over a
    legend of the classes present in either map (void hatched), as one PNG."""
    panel = np.concatenate([rgb_img, x_img, data.colorize(gt, palette, hatch=True), data.colorize(pred, palette)], 1)
    present = sorted(set(np.unique(gt).tolist()) - {data.IGNORE} | set(np.unique(pred).tolist()))
    strips = [captions(PANEL_TITLES, rgb_img.shape[1]),
              legend(present, class_names, palette, panel.shape[1])]
    Image.fromarray(np.concatenate([panel, *strips])).save(path)


# ----------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------

def peak_memory(device, reset=False):
    """Peak memory in bytes since the last reset: CUDA max allocated, or on CPU the
    peak resident set (Linux VmHWM, reset through /proc/self/clear_refs after the heap's
    free pages are given back, which this process otherwise keeps: `keep_freed_memory`)."""
    if device.type == 'cuda':
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device)
    if reset:
        release_freed_memory()
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM'))


def wall(fn, device):
    """Wall time of one call of `fn` (seconds), the device synchronised on both sides."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def timed(fn, device, repeats):
    """Best wall time of `repeats` calls after one warm-up call (seconds)."""
    fn()
    return min(wall(fn, device) for _ in range(repeats))


def floor_timings(model, size, num_classes, x_channels, device, repeats=3, batch=2, ctx=None):
    """A method's training step and inference against its frozen-backbone floor,
    timed in turns in one process (seconds, the best of `repeats` rounds after a
    warm-up round; each round runs all four, so that other jobs on the machine
    weigh on them alike; the machine's load still blurs the ratios).

    - train_step_s: forward + loss + backward at `batch` (optimizer excluded);
    - backbone_fwd_bwd_s, the training floor: the model's backbone forward +
      backward on the images of every stream as one batch (streams x batch; KTB
      runs the frozen Swin once per modality), the input requiring a gradient so
      that backward runs through every block even when all weights are frozen,
      in eval mode (the plain backbone: KTB's stochastic depth is part of its step);
    - latency_s: inference on one image (every stream);
    - backbone_fwd_s, the inference floor: the backbone forward on `streams` images.
    Returns those and train_step_over_floor, latency_over_floor. Leaves the model in eval mode.
    """
    H, W = size
    ctx = ctx or (lambda: torch.autocast(device.type, enabled=False))
    streams = model.streams
    rgb, x = torch.randn(batch, 3, H, W, device=device), torch.randn(batch, x_channels, H, W, device=device)
    label = torch.randint(0, num_classes, (batch, H, W), device=device)
    backbone = model.backbone

    def floor_input(n):  # n samples of the backbone's own input
        if isinstance(backbone, rgbx.MultiModalViT):  # MaskMentor: the encoder on the tokens of both modalities
            with torch.no_grad():
                rgb_n, x_n = torch.randn(n, 3, H, W, device=device), torch.randn(n, x_channels, H, W, device=device)
                return backbone.embed({'rgb': rgb_n, 'depth': x_n})[0].flatten(1, 2)  # (n, 2N, D)
        return torch.randn(n, backbone.patch_embed.proj.in_channels, H, W, device=device)  # 3, or 3 + Cx (early fusion)
    train_in, infer_in = floor_input(streams * batch).requires_grad_(), floor_input(streams)

    def train_step():
        model.train()
        with ctx():
            loss, _ = model(rgb, x, label)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def floor_train():
        backbone.eval()  # the plain frozen backbone: no stochastic depth (KTB trains with it), no dropout
        with ctx():
            feats = backbone(train_in)
        sum(f.float().sum() for f in (feats if isinstance(feats, list) else [feats])).backward()
        train_in.grad = None
        backbone.zero_grad(set_to_none=True)

    def infer():
        model.eval()
        with torch.no_grad(), ctx():
            model(rgb[:1], x[:1])

    def floor_infer():
        with torch.no_grad(), ctx():
            backbone(infer_in)
    fns = dict(train_step_s=train_step, backbone_fwd_bwd_s=floor_train, latency_s=infer, backbone_fwd_s=floor_infer)
    out = {k: float('inf') for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t = wall(fn, device)
            if r:  # round 0 warms up
                out[k] = min(out[k], t)
    out['train_step_over_floor'] = out['train_step_s'] / out['backbone_fwd_bwd_s']
    out['latency_over_floor'] = out['latency_s'] / out['backbone_fwd_s']
    return out


def bf16_column(model, rgb, x, device, repeats):
    """Inference under bf16 autocast against fp32 on one image: latency_bf16_s and the
    relative error of the logits, ||bf16 - fp32|| / ||fp32||. On a CPU that emulates bf16
    (`bf16_matmul_speed` < 1) it is not timed: bf16_cpu_matmul_speed says why."""
    if device.type == 'cpu':
        speed = bf16_matmul_speed()
        if speed < 1:
            return dict(bf16_cpu_matmul_speed=speed)
    model.eval()
    with torch.no_grad():
        ref = model(rgb, x).float()
        with autocast('bf16', device):
            low = model(rgb, x).float()
            latency = timed(lambda: model(rgb, x), device, repeats)
    return dict(latency_bf16_s=latency, bf16_rel_err=((low - ref).norm() / ref.norm()).item())


def benchmark(model, dataset, num_classes, size, device, repeats=3, batch=2, workers=2, amp='none', floor_only=False):
    """Cost figures of `model` at input `size` (H, W), measured in one run so that
    ratios between them are meaningful: parameters, FLOPs of one forward pass,
    inference latency (single-scale, and multi-scale + flip), training-step time
    at `batch` (forward + backward, optimizer excluded), peak memory, data
    throughput, and the frozen-backbone floors (`floor_timings`, timed in turns
    with the step and the latency). `floor_only`: the parameters and `floor_timings` alone."""
    from torch.utils.flop_counter import FlopCounterMode
    H, W = size
    x_channels = dataset[0][1].shape[0]
    ctx = (lambda: autocast(amp, device)) if amp != 'none' else (lambda: torch.autocast(device.type, enabled=False))
    model = model.to(device)
    out = dict(size=[H, W], device=str(device), threads=torch.get_num_threads(),
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
               total_params=sum(p.numel() for p in model.parameters()))
    out.update(floor_timings(model, size, num_classes, x_channels, device, repeats, batch, ctx))
    out['images_per_s'] = 1 / out['latency_s']
    if floor_only:
        return out
    rgb, x = torch.randn(1, 3, H, W, device=device), torch.randn(1, x_channels, H, W, device=device)
    if amp == 'none':
        out.update(bf16_column(model, rgb, x, device, repeats))
    with torch.no_grad(), ctx():
        with FlopCounterMode(display=False) as fc:
            model(rgb, x)
        out['gflops'] = fc.get_total_flops() / 1e9
        peak_memory(device, reset=True)
        model(rgb, x)
        out['infer_peak_mem_mb'] = peak_memory(device) / 2 ** 20
        out['latency_ms_flip_s'] = timed(lambda: predict(model, rgb, x, num_classes, SCALES, True), device, 1)
    out['images_per_s_ms_flip'] = 1 / out['latency_ms_flip_s']

    model.train()
    rgb2, x2 = rgb.expand(batch, -1, -1, -1).clone(), x.expand(batch, -1, -1, -1).clone()
    label = torch.randint(0, num_classes, (batch, H, W), device=device)
    peak_memory(device, reset=True)
    with ctx():
        loss, _ = model(rgb2, x2, label)
    loss.backward()
    model.zero_grad(set_to_none=True)
    out['train_peak_mem_mb'] = peak_memory(device) / 2 ** 20

    loader = data.loader(dataset, batch, workers, pin=device.type == 'cuda')
    n, t = 0, time.perf_counter()
    for i, (r, _, _) in enumerate(loader):
        n += r.shape[0]
        if i == 4 * max(1, workers):
            break
    out['data_samples_per_s'] = n / (time.perf_counter() - t)
    return out


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def main(argv=None):
    p = data.OneLineParser(description=__doc__.split('\n')[0])
    p.add_argument('--checkpoint', default=None,
                   help="a training checkpoint (last.pt / best.pt), or a file without rgbx's config (a trained "
                        "KTB of the authors' release): its model is then built from --method, --backbone, "
                        "--dataset, --x-modality and --opts")
    p.add_argument('--data-root', default=None, help='dataset folder (default: the one the run used)')
    p.add_argument('--split', default=None, help='default test')
    p.add_argument('--pretrained', default=None, help='frozen backbone file, if not where the run found it')
    p.add_argument('--protocol', default='rgbx', choices=tuple(PROTOCOLS),
                   help='how to evaluate: ' + '; '.join(f'{k}: {v.summary}' for k, v in PROTOCOLS.items()) +
                        ' (docs/protocols.md)')
    p.add_argument('--multi-scale', action='store_true', help=f'scales {SCALES}')
    p.add_argument('--flip', action='store_true')
    p.add_argument('--sliding', action='store_true',
                   help="sliding-window inference with the training crop (a checkpoint without rgbx's config: "
                        "the dataset's training crop)")
    p.add_argument('--modality', default='both', choices=('both', 'rgb', 'x'))
    p.add_argument('--save-pred', default=None, metavar='DIR')
    p.add_argument('--rgb', default=None, help='segment one image pair: RGB file')
    p.add_argument('--x', default=None, help='... and its X file')
    p.add_argument('--depth', default=None, help="... or, instead of --x, its depth image (16-bit PNG, mm): a model "
                                                 "trained on HHA gets HHA computed from it, one trained on depth the depth")
    p.add_argument('--camera', default=None, help="with --depth for an HHA model: nyu or FX,FY,CX,CY (pixels, "
                                                  "centre 0-based from the top-left pixel)")
    p.add_argument('--depth-scale', type=float, default=None, help="with --depth: metres per stored unit (default 0.001: mm)")
    p.add_argument('--out', default=None, help='... written here as a colourised PNG')
    p.add_argument('--reconstruct', default=None, metavar='DIR',
                   help='MaskMentor pre-training checkpoint: save depth-from-RGB and RGB-from-depth panels (Fig. 4)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', default=None, choices=('none', 'bf16', 'fp16'),
                   help="default none (a --protocol other than rgbx: the precision that code ran with on CUDA)")
    p.add_argument('--tf32', default=True, action=argparse.BooleanOptionalAction,
                   help="on CUDA, TF32 tensor cores for float32 matrix products and convolutions "
                        "(--no-tf32: true float32)")
    p.add_argument('--workers', type=int, default=0, help="loader processes (evaluation and benchmark); see docs/performance.md")
    p.add_argument('--json', default=None, help='also write the metrics (or benchmark figures) here')
    b = p.add_argument_group('model from flags: --benchmark (the --checkpoint model, or a random-weights one chosen by '
                             "these flags), or a --checkpoint without rgbx's config (a trained KTB of the authors' "
                             "release), whose model these flags describe")
    b.add_argument('--benchmark', action='store_true')
    b.add_argument('--method', default=None, help='default early_fusion (benchmark)')
    b.add_argument('--backbone', default=None, help='default swin-nano (benchmark)')
    b.add_argument('--opts', default=None, help='method options, as for train.py')
    b.add_argument('--dataset', default=None, help='sets classes, X channels and the data-throughput source; '
                                                   'default demo (benchmark)')
    b.add_argument('--x-modality', default=None, help="X modality of a checkpoint without rgbx's config")
    b.add_argument('--size', default=None, help='input HxW, default 480x640')
    b.add_argument('--batch', type=int, default=None, help='training-step batch, default 2')
    b.add_argument('--repeats', type=int, default=None, help='default 3')
    b.add_argument('--floor-only', action='store_true',
                   help='only the training step and latency against the frozen-backbone floor, timed in turns')
    args = p.parse_args(data.dash_values(argv, ('--camera', '--size')))
    keep_freed_memory()  # this process keeps the memory freed tensors leave (RGBX_KEEP_FREED_MEMORY=0: not)
    try:
        check_flags(args)
        return run_command(args)
    except (ValueError, OSError, rgbx.CheckpointError) as e:
        sys.exit(f"error: {error_line(e)}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted")
    except RuntimeError as e:
        if not peer_failed(e):
            raise
        sys.exit(f"error: {PEER_FAILED}")
    finally:  # also after an error: a process group left to the interpreter's exit can abort it
        if dist.is_initialized():
            dist.destroy_process_group()


def check_flags(args):
    """Refuse flags that would be ignored: every flag given must act."""
    def given(*names):
        return ', '.join('--' + n.replace('_', '-') for n in names if getattr(args, n) not in (None, False))
    if args.protocol != 'rgbx':
        fixed = given('multi_scale', 'flip', 'sliding', 'amp')
        if fixed:
            raise ValueError(f"--protocol {args.protocol} fixes the scales, flip, sliding windows and precision as "
                             f"its code ran: drop {fixed}")
        other = given('benchmark', 'reconstruct', 'rgb', 'x', 'depth', 'out')
        if other:
            raise ValueError(f"--protocol {args.protocol} evaluates a dataset split: drop {other}")
    model_choice = given('method', 'backbone', 'opts', 'dataset', 'x_modality')
    if args.benchmark:
        evaluation_only = given('save_pred', 'rgb', 'x', 'depth', 'camera', 'out', 'multi_scale', 'flip', 'sliding', 'split', 'reconstruct')
        if evaluation_only or args.modality != 'both':
            raise ValueError(f"--benchmark measures a model and takes no evaluation flags: drop "
                             f"{evaluation_only or '--modality'}")
        if args.checkpoint and model_choice:
            raise ValueError(f"--benchmark --checkpoint measures the checkpoint's model: drop {model_choice} "
                             f"(they choose a random-weights model)")
    else:
        if not args.checkpoint:
            raise ValueError("--checkpoint is required (or --benchmark)")
        benchmark_only = given('size', 'batch', 'repeats', 'floor_only')
        if benchmark_only:
            raise ValueError(f"{benchmark_only} act only with --benchmark")
        if args.reconstruct and (given('save_pred', 'rgb', 'x', 'depth', 'camera', 'out', 'multi_scale', 'flip', 'sliding')
                                 or args.modality != 'both'):
            raise ValueError("--reconstruct saves a pre-training run's reconstructions and takes no segmentation "
                             "flags: drop " + (given('save_pred', 'rgb', 'x', 'depth', 'camera', 'out', 'multi_scale', 'flip', 'sliding')
                                               or '--modality'))
        if (args.camera or args.depth_scale is not None) and not args.depth:
            raise ValueError("--camera and --depth-scale act only with --depth")
        if args.save_pred and given('rgb', 'x', 'depth', 'out'):
            raise ValueError(f"--save-pred saves the predictions over a dataset split, {given('rgb', 'x', 'depth', 'out')} "
                             f"segment one image pair: use one or the other")
    if args.json and (args.reconstruct or given('rgb', 'x', 'depth', 'out')):
        others = '--reconstruct' if args.reconstruct else given('rgb', 'x', 'depth', 'out')
        raise ValueError(f"--json writes the metrics of a dataset split (or the benchmark's "
                         f"figures); {others} computes none: drop --json")
    if args.out is not None and not args.out.lower().endswith('.png'):
        raise ValueError(f"--out {args.out}: the colourised segmentation is written as PNG: "
                         f"name it *.png")
    check_outputs(args)
    if args.amp is None:
        args.amp = PROTOCOLS[args.protocol].amp if check_device(args.device).type == 'cuda' else 'none'
    if args.amp == 'fp16' and check_device(args.device).type != 'cuda':
        raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    for name in ('workers', 'batch', 'repeats'):
        low = 0 if name == 'workers' else 1
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}, not {getattr(args, name)}")


# What eval.py reads and writes, by flag: every output flag is checked by `check_outputs`
# (a new one joins OUTPUT_FILES or OUTPUT_FOLDERS); a file's kind is what may be replaced.
INPUT_FLAGS = ('checkpoint', 'rgb', 'x', 'depth', 'pretrained', 'data_root', 'split')
OUTPUT_FILES = {'out': 'png', 'json': 'json'}
OUTPUT_FOLDERS = ('save_pred', 'reconstruct')


def check_outputs(args):
    """Every output flag: its folder exists, and it writes over no input, into no dataset
    and into no other run's folder (data.check_output; the checkpoint's own run folder
    may receive pictures and metrics, never over its run files)."""
    inputs = [('--' + n.replace('_', '-'), getattr(args, n)) for n in INPUT_FLAGS]
    own = os.path.dirname(os.path.abspath(args.checkpoint)) if args.checkpoint else None
    for name, kind in OUTPUT_FILES.items():
        flag, path = '--' + name.replace('_', '-'), getattr(args, name)
        folder = os.path.dirname(os.path.abspath(path)) if path else ''
        if path and not os.path.isdir(folder):
            raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
        if path and os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a folder: name the file to write")
        if path:
            data.check_output(flag, path, inputs, own_run=own, kind=kind)
    for name in OUTPUT_FOLDERS:
        flag, path = '--' + name.replace('_', '-'), getattr(args, name)
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a file: pass a folder for the pictures")
        if path:
            data.check_output(flag, path, inputs, folder=True, own_run=own)


def run_command(args):
    rank, world, device = setup_distributed(args.device)
    check_cuda_bf16(args.amp, device)
    if device.type == 'cuda':
        set_tf32(args.tf32)
    if rank == 0:
        check_cpu_bf16(args.amp, device)
    if args.benchmark:
        return run_benchmark(args, device)
    ckpt = rgbx.read_checkpoint(args.checkpoint)
    if isinstance(ckpt, dict) and 'config' in ckpt:  # an rgbx run: the checkpoint sets the model and dataset
        del ckpt
        model_choice = ', '.join('--' + n.replace('_', '-') for n in ('method', 'backbone', 'opts', 'dataset', 'x_modality')
                                 if getattr(args, n) is not None)
        if model_choice:
            raise ValueError(f"{args.checkpoint} holds its run's config, which sets the model and dataset: drop "
                             f"{model_choice}")
        model, run = load_model(args.checkpoint, args.pretrained, device)
    else:  # e.g. a trained KTB of the authors' release: the model from the flags
        del ckpt
        model, run = load_model_from_flags(args, device)
    if model.pretraining != bool(args.reconstruct):
        raise ValueError(f"{args.checkpoint} is a pre-training checkpoint: it has no segmentation to evaluate; "
                         f"save its reconstructions with --reconstruct DIR" if args.reconstruct is None else
                         f"--reconstruct needs a MaskMentor pre-training checkpoint (--opts stage=pretrain), "
                         f"not {args.checkpoint}")
    if args.data_root is not None and data.get_preset(run.dataset).generated:
        raise ValueError(f"--data-root: {args.checkpoint} was trained on the generated {run.dataset} data, which "
                         f"reads no folder; drop --data-root")
    root = args.data_root if args.data_root is not None else run.data_root
    if args.reconstruct:
        dataset = data.build_dataset(run.dataset, root, args.split or 'test', run.x_modality,
                                     x_standardised=run.x_standardised)
        save_reconstructions(model, dataset, args.reconstruct, data.get_preset(run.dataset).rgb_norm, device)
        print(f"wrote {len(dataset)} reconstruction panels to {args.reconstruct}")
    elif args.rgb or args.x or args.depth or args.out:
        segment_pair(args, model, run, device)
    else:
        evaluate_split(args, model, run, root, rank, world, device)


def inference(args, run):
    """(scales, crop) of the inference flags: multi-scale, and for --sliding the run's
    training crop (a model built from flags, whose run has none: its dataset's crop)."""
    scales = SCALES if args.multi_scale else (1.0,)
    if not args.sliding:
        return scales, None
    return scales, (parse_size(run.crop, "the checkpoint's crop") if run.crop else data.get_preset(run.dataset).crop)


def segment_pair(args, model, run, device):
    """--rgb, --x (or --depth), --out: one image pair segmented, written as a colourised PNG."""
    if not (args.rgb and (args.x or args.depth) and args.out) or (args.x and args.depth):
        raise ValueError("segmenting your own images needs --rgb, --out and one of --x or --depth")
    preset = data.get_preset(run.dataset)
    x = None
    if args.depth:
        camera = data.parse_camera(args.camera) if args.camera else None
        x, done = data.x_from_depth(args.depth, preset, run.x_modality, camera, args.depth_scale or 0.001)
        print(f"X: {done}")
    rgb, x = data.load_pair(args.rgb, args.x or args.depth, preset, run.x_modality, run.x_standardised, x)
    scales, crop = inference(args, run)
    with torch.no_grad(), autocast(args.amp, device):
        pred = predict(model, *drop_modality(rgb[None].to(device), x[None].to(device), args.modality),
                       preset.num_classes, scales, args.flip, crop).argmax(1)[0]
    Image.fromarray(data.colorize(pred.cpu().numpy(), data.palette(run.dataset))).save(args.out)
    print(f"wrote {args.out}")


def evaluate_split(args, model, run, root, rank, world, device):
    """The metrics of a dataset split (this rank's share under torchrun), with --save-pred pictures."""
    preset = data.get_preset(run.dataset)
    palette = data.palette(run.dataset)
    protocol = PROTOCOLS[args.protocol]
    scales, crop = inference(args, run)
    split = args.split or 'test'
    dataset = data.build_dataset(run.dataset, root, split, run.x_modality, x_standardised=run.x_standardised)
    probs = None
    if protocol.probs:
        dataset.transform = protocol.transform(run.dataset, run.x_modality, preset)
        probs = lambda model, rgb, x: protocol.probs(model, rgb, x, preset.num_classes, run.dataset)  # noqa: E731
    loader = data.shard_loader(dataset, rank, world, workers=args.workers, pin=device.type == 'cuda')
    on_batch = None
    if args.save_pred:
        os.makedirs(args.save_pred, exist_ok=True)
        mean_x, std_x = preset.x_norm(run.x_modality, run.x_standardised and not protocol.probs)

        def on_batch(i, rgb, x, label, pred):
            path = os.path.join(args.save_pred, str(dataset.names[rank + i * world]))  # ids 'a/0' keep their folders
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with data.disk_full_names(path + '.png'):
                Image.fromarray(data.colorize(pred[0].cpu().numpy(), palette)).save(path + '.png')
                shown = rgb[0].flip(0) if getattr(dataset.transform, 'bgr', False) else rgb[0]  # a BGR protocol's input
                save_panel(path + '_panel.png', to_image(shown, *preset.rgb_norm), to_image(x[0], mean_x, std_x),
                           label[0].cpu().numpy(), pred[0].cpu().numpy(), palette, preset.class_names)
    conf = evaluate(model, loader, preset.num_classes, device, scales, args.flip, crop, args.modality, args.amp, on_batch,
                    probs)
    m = metrics(conf, protocol.average)
    if rank == 0:
        how = (f"protocol {args.protocol} ({protocol.summary})" if protocol.probs else
               f"scales {list(scales)}{' + flip' if args.flip else ''}")
        print(format_metrics(m, preset.class_names))  # first line: mIoU XX.XX, as the protocol averages
        print(f"evaluated: {run.dataset} {split} ({len(dataset)} images), modality {args.modality}, {how}")
        if args.save_pred:
            print(f"wrote the predictions and panels of the {len(dataset)} images to "
                  f"{args.save_pred}")
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(dict(m, modality=args.modality, protocol=args.protocol, checkpoint=args.checkpoint), f, indent=2)
            print(f"wrote {args.json}")


def run_benchmark(args, device):
    """The cost figures of the --checkpoint model, or of a random-weights model of --method/--backbone."""
    if args.checkpoint:
        model, run = load_model(args.checkpoint, args.pretrained, device)
        run.data_root = args.data_root if args.data_root is not None else run.data_root
    else:
        dataset = args.dataset or 'demo'
        method = args.method or 'early_fusion'
        model, run = None, run_spec(method, args.backbone or rgbx.paper_backbone(method).replace('-base', '-nano'),
                                  dataset, args.x_modality or '', args.opts or '', data_root=args.data_root or '')
    size = parse_size(args.size or '480x640', '--size')
    preset = data.get_preset(run.dataset)
    dataset = data.build_dataset(run.dataset, run.data_root, 'train', run.x_modality, crop=size, train=True,
                                 seed=SEED, x_standardised=run.x_standardised)
    if model is None:
        torch.manual_seed(SEED)
        model = run.build(args.pretrained)
    figures = dict(method=run.method, backbone=run.model_args['backbone'], opts=args.opts or '',
                   checkpoint=args.checkpoint,
                   **benchmark(model, dataset, preset.num_classes, size, device, args.repeats or 3, args.batch or 2,
                               args.workers, args.amp, args.floor_only))
    for k, v in figures.items():
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(figures, f, indent=2)
        print(f"wrote {args.json}")
    return figures


if __name__ == '__main__':
    main()
