"""Evaluate a trained RGB+X segmentation model, or segment your own images.

    python eval.py --checkpoint runs/demo-early_fusion-swin-nano/best.pt
    python eval.py --checkpoint best.pt --data-root DIR --multi-scale --flip --modality rgb
    python eval.py --checkpoint best.pt --save-pred preds/          # colourised maps + RGB | X | GT | prediction panels
    python eval.py --checkpoint best.pt --rgb room.png --x room_depth.png --out room_seg.png
    python eval.py --checkpoint runs/mm-pre/last.pt --reconstruct recon/  # MaskMentor Fig. 4 from a pre-training run

Metrics come from one confusion matrix (rows = ground truth, columns =
prediction), summed over processes under torchrun. mIoU is the mean IoU over
the classes that occur in the ground truth or in the prediction of the whole
evaluated set (a class absent from both has no IoU and is left out; a class
predicted but never present scores 0).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import data
import rgbx

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the papers' multi-scale test


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

def confusion(pred, label, num_classes, ignore=255):
    """(K, K) int64 confusion matrix, rows = ground truth, columns = prediction;
    pixels labelled `ignore` do not count."""
    valid = label != ignore
    idx = label[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def metrics(conf):
    """mIoU, per-class IoU, mAcc, pixel accuracy, and OA / AA / Cohen's kappa (the
    WHU-OPT-SAR figures: OA = pixel accuracy, AA = mAcc). Classes with an empty
    union (IoU) or no ground truth (accuracy) are NaN and left out of the means."""
    conf = conf.double()
    tp, gt, pr = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float('nan')))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float('nan')))
    n = conf.sum().clamp(min=1)
    oa = (tp.sum() / n).item()
    pe = ((gt * pr).sum() / n ** 2).item()
    return dict(miou=iou.nanmean().item(), macc=acc.nanmean().item(), pixel_acc=oa, oa=oa,
                aa=acc.nanmean().item(), kappa=(oa - pe) / (1 - pe) if pe < 1 else 0.0, iou=iou.tolist())


def format_metrics(m, class_names, short=False):
    head = (f"mIoU {100 * m['miou']:.2f} | mAcc {100 * m['macc']:.2f} | pixel acc {100 * m['pixel_acc']:.2f} | "
            f"kappa {m['kappa']:.4f}")
    if short:
        return head
    rows = [f"  {name:<24s} {'   n/a' if np.isnan(v) else f'{100 * v:6.2f}'}" for name, v in zip(class_names, m['iou'])]
    return head + '\n  class                     IoU %\n' + '\n'.join(rows)


# ----------------------------------------------------------------------------
# Inference: sliding window, multi-scale, flip, missing modality
# ----------------------------------------------------------------------------

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


def shard_loader(dataset, rank=0, world=1, workers=2, pin=False, batch_size=1):
    """Evaluation loader over this rank's share rank::world, without the padding
    duplicates of DistributedSampler (so the summed confusion counts each image once)."""
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(rank, len(dataset), world)),
                                       batch_size, shuffle=False, num_workers=workers, pin_memory=pin,
                                       generator=torch.Generator())  # leaves the global RNG alone


@torch.no_grad()
def evaluate(model, loader, num_classes, device, scales=(1.0,), flip=False, crop=None, modality='both',
             amp='none', on_batch=None):
    """Confusion matrix of `model` over `loader`, summed over processes when
    torch.distributed is initialised. `on_batch(index, rgb, x, label, pred)` sees
    every batch (used to save predictions)."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16) \
        if amp != 'none' else torch.autocast(device.type, enabled=False)
    for i, (rgb, x, label) in enumerate(loader):
        rgb, x, label = rgb.to(device), x.to(device), label.to(device)
        with ctx:
            pred = predict(model, *drop_modality(rgb, x, modality), num_classes, scales, flip, crop).argmax(1)
        conf += confusion(pred, label, num_classes)
        if on_batch is not None:
            on_batch(i, rgb, x, label, pred)
    if dist.is_initialized():
        dist.all_reduce(conf)
    model.train(was_training)
    return conf.cpu()


# ----------------------------------------------------------------------------
# Loading a trained model, saving pictures
# ----------------------------------------------------------------------------

def load_model(path, pretrained=None, device='cpu'):
    """Rebuild the model of a training checkpoint and load its weights. The frozen
    backbone comes from the run's --pretrained file (or `pretrained`), checked
    against the fingerprint stored at training time. Returns (model, config dict)."""
    import train  # train imports this module: import it here, when both are loaded
    ckpt = train.load_run_checkpoint(path)
    cfg = train.Config(**ckpt['config'])
    if pretrained:
        cfg.pretrained = pretrained
    preset = data.PRESETS[cfg.dataset]
    x_channels = preset.x_channels(cfg.x_modality or None)
    pretrained, cfg.pretrained = cfg.pretrained, 'none'
    model = train.build_model(cfg, preset.num_classes, x_channels)  # first without the backbone file
    cfg.pretrained = pretrained
    full = set(ckpt['model']) == set(model.state_dict())
    if not full and any(not p.requires_grad for p in model.parameters()):  # frozen weights come from the file
        model = train.build_model(cfg, preset.num_classes, x_channels)
    if not full and ckpt['frozen_sha1'] != rgbx.frozen_fingerprint(model):
        raise ValueError(f"{path} holds only the trained weights, and the frozen ones built here differ from those "
                         f"it was trained with: pass --pretrained with the file the run used ({cfg.pretrained!r})")
    rgbx.load_trained(model, ckpt['model'], path)
    return model.to(device).eval(), cfg


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


def save_panel(path, rgb_img, x_img, gt, pred, palette):
    """RGB | X | ground truth | prediction, side by side, as one PNG."""
    panel = np.concatenate([rgb_img, x_img, data.colorize(gt, palette), data.colorize(pred, palette)], 1)
    Image.fromarray(panel).save(path)


# ----------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------

def peak_memory(device, reset=False):
    """Peak memory in bytes since the last reset: CUDA max allocated, or on CPU the
    peak resident set (Linux VmHWM, reset through /proc/self/clear_refs)."""
    if device.type == 'cuda':
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device)
    if reset:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM'))


def timed(fn, device, repeats):
    """Best wall time of `repeats` calls after one warm-up call (seconds)."""
    fn()
    best = float('inf')
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def benchmark(model, dataset, num_classes, size, device, repeats=3, batch=2, workers=2, amp='none'):
    """Cost figures of `model` at input `size` (H, W), measured in one run so that
    ratios between them are meaningful: parameters, FLOPs of one forward pass,
    inference latency (single-scale, and multi-scale + flip), training-step time
    at `batch` (forward + backward, optimizer excluded), peak memory, data
    throughput, and the model's own backbone alone forward and forward+backward."""
    from torch.utils.flop_counter import FlopCounterMode
    H, W = size
    x_channels = dataset[0][1].shape[0]
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)) \
        if amp != 'none' else (lambda: torch.autocast(device.type, enabled=False))
    model = model.to(device).eval()
    rgb, x = torch.randn(1, 3, H, W, device=device), torch.randn(1, x_channels, H, W, device=device)
    out = dict(size=[H, W], device=str(device), threads=torch.get_num_threads(),
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
               total_params=sum(p.numel() for p in model.parameters()))
    with torch.no_grad(), ctx():
        with FlopCounterMode(display=False) as fc:
            model(rgb, x)
        out['gflops'] = fc.get_total_flops() / 1e9
        peak_memory(device, reset=True)
        out['latency_s'] = timed(lambda: model(rgb, x), device, repeats)
        out['infer_peak_mem_mb'] = peak_memory(device) / 2 ** 20
        out['latency_ms_flip_s'] = timed(lambda: predict(model, rgb, x, num_classes, SCALES, True), device, 1)
    out['images_per_s'] = 1 / out['latency_s']
    out['images_per_s_ms_flip'] = 1 / out['latency_ms_flip_s']

    model.train()
    rgb2, x2 = rgb.expand(batch, -1, -1, -1).clone(), x.expand(batch, -1, -1, -1).clone()
    label = torch.randint(0, num_classes, (batch, H, W), device=device)

    def step():
        with ctx():
            loss, _ = model(rgb2, x2, label)
        loss.backward()
        model.zero_grad(set_to_none=True)
    peak_memory(device, reset=True)
    out['train_step_s'] = timed(step, device, repeats)
    out['train_peak_mem_mb'] = peak_memory(device) / 2 ** 20

    backbone = model.backbone
    if isinstance(backbone, rgbx.MultiModalViT):  # MaskMentor: the encoder on the tokens of both modalities
        with torch.no_grad():
            tokens = backbone.embed({'rgb': rgb2, 'depth': x2})[0]  # (B, 2, N, D)
        inp = tokens.flatten(1, 2).requires_grad_()  # (B, 2N, D)
    else:
        in_chans = backbone.patch_embed.proj.in_channels  # 3, or 3 + Cx for early fusion
        inp = torch.randn(batch, in_chans, H, W, device=device, requires_grad=True)
    # the input needs a gradient, so that backward runs through every block even when all weights are frozen

    def backbone_fwd_bwd():
        with ctx():
            feats = backbone(inp)
        sum(f.float().sum() for f in (feats if isinstance(feats, list) else [feats])).backward()
        inp.grad = None
        backbone.zero_grad(set_to_none=True)
    with torch.no_grad(), ctx():
        out['backbone_fwd_s'] = timed(lambda: backbone(inp), device, repeats)
    out['backbone_fwd_bwd_s'] = timed(backbone_fwd_bwd, device, repeats)
    streams = getattr(model, 'streams', 1)  # KTB runs the backbone once per modality
    out['train_step_over_floor'] = out['train_step_s'] / (streams * out['backbone_fwd_bwd_s'])

    loader = torch.utils.data.DataLoader(dataset, batch, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == 'cuda', generator=torch.Generator())
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
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--checkpoint', default=None, help='a training checkpoint (last.pt / best.pt)')
    p.add_argument('--data-root', default=None, help='dataset folder (default: the one the run used)')
    p.add_argument('--split', default='test')
    p.add_argument('--pretrained', default=None, help='frozen backbone file, if not where the run found it')
    p.add_argument('--multi-scale', action='store_true', help=f'scales {SCALES}')
    p.add_argument('--flip', action='store_true')
    p.add_argument('--sliding', action='store_true', help='sliding-window inference with the training crop')
    p.add_argument('--modality', default='both', choices=('both', 'rgb', 'x'))
    p.add_argument('--save-pred', default=None, metavar='DIR')
    p.add_argument('--rgb', default=None, help='segment one image pair: RGB file')
    p.add_argument('--x', default=None, help='... and its X file')
    p.add_argument('--out', default=None, help='... written here as a colourised PNG')
    p.add_argument('--reconstruct', default=None, metavar='DIR',
                   help='MaskMentor pre-training checkpoint: save depth-from-RGB and RGB-from-depth panels (Fig. 4)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', default='none', choices=('none', 'bf16', 'fp16'))
    p.add_argument('--json', default=None, help='also write the metrics (or benchmark figures) here')
    b = p.add_argument_group('benchmark (no checkpoint needed: random weights)')
    b.add_argument('--benchmark', action='store_true')
    b.add_argument('--method', default='early_fusion')
    b.add_argument('--backbone', default='swin-nano')
    b.add_argument('--opts', default='', help='method options, as for train.py')
    b.add_argument('--dataset', default='demo', help='sets classes, X channels and the data-throughput source')
    b.add_argument('--size', default='480x640')
    b.add_argument('--batch', type=int, default=2)
    b.add_argument('--workers', type=int, default=2)
    b.add_argument('--repeats', type=int, default=3)
    args = p.parse_args(argv)
    if not args.benchmark and not args.checkpoint:
        p.error('--checkpoint is required (or --benchmark)')
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run(args):
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if 'RANK' in os.environ else (0, 1)
    device = torch.device(args.device if world == 1 or not args.device.startswith('cuda')
                          else f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if args.benchmark:
        return run_benchmark(args, device)
    model, cfg = load_model(args.checkpoint, args.pretrained, device)
    preset = data.PRESETS[cfg.dataset]
    palette = data.palette(cfg.dataset)
    scales = SCALES if args.multi_scale else (1.0,)
    crop = tuple(int(v) for v in cfg.crop.split('x')) if args.sliding else None
    if getattr(model, 'pretraining', False) != bool(args.reconstruct):
        raise ValueError(f"{args.checkpoint} is a pre-training checkpoint: it has no segmentation to evaluate; "
                         f"save its reconstructions with --reconstruct DIR" if args.reconstruct is None else
                         f"--reconstruct needs a MaskMentor pre-training checkpoint (--opts stage=pretrain), "
                         f"not {args.checkpoint}")
    if args.reconstruct:
        dataset = data.build_dataset(cfg.dataset, args.data_root if args.data_root is not None else cfg.data_root,
                                     args.split, cfg.x_modality or None)
        save_reconstructions(model, dataset, args.reconstruct, preset.rgb_norm, device)
        print(f"wrote {len(dataset)} reconstruction panels to {args.reconstruct}")
        return

    if args.rgb or args.x or args.out:
        if not (args.rgb and args.x and args.out):
            raise ValueError("segmenting your own images needs all of --rgb, --x and --out")
        rgb, x = data.load_pair(args.rgb, args.x, cfg.dataset, cfg.x_modality or None)
        with torch.no_grad():
            pred = predict(model, *drop_modality(rgb[None].to(device), x[None].to(device), args.modality),
                           preset.num_classes, scales, args.flip, crop).argmax(1)[0]
        Image.fromarray(data.colorize(pred.cpu().numpy(), palette)).save(args.out)
        print(f"wrote {args.out}")
        return

    dataset = data.build_dataset(cfg.dataset, args.data_root if args.data_root is not None else cfg.data_root,
                                 args.split, cfg.x_modality or None)
    loader = shard_loader(dataset, rank, world, workers=2, pin=device.type == 'cuda')
    on_batch = None
    if args.save_pred:
        os.makedirs(args.save_pred, exist_ok=True)
        mean_x, std_x = preset.x_norm(cfg.x_modality or None)

        def on_batch(i, rgb, x, label, pred):
            name = str(dataset.names[rank + i * world])
            Image.fromarray(data.colorize(pred[0].cpu().numpy(), palette)).save(os.path.join(args.save_pred, f'{name}.png'))
            save_panel(os.path.join(args.save_pred, f'{name}_panel.png'), to_image(rgb[0], *preset.rgb_norm),
                       to_image(x[0], mean_x, std_x), label[0].cpu().numpy(), pred[0].cpu().numpy(), palette)
    conf = evaluate(model, loader, preset.num_classes, device, scales, args.flip, crop, args.modality, args.amp, on_batch)
    m = metrics(conf)
    if rank == 0:
        print(f"{cfg.dataset} {args.split} ({len(dataset)} images), modality {args.modality}, "
              f"scales {list(scales)}{' + flip' if args.flip else ''}")
        print(format_metrics(m, preset.class_names))
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(dict(m, modality=args.modality, checkpoint=args.checkpoint), f, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_benchmark(args, device):
    import train
    cfg = train.resolve(train.Config(dataset=args.dataset, data_root=args.data_root or '', method=args.method,
                                     backbone=args.backbone, opts=args.opts, pretrained=args.pretrained or 'none'))
    size = tuple(int(v) for v in args.size.split('x'))
    dataset = data.build_dataset(cfg.dataset, cfg.data_root, 'train', None, crop=size, train=True, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    num_classes = data.PRESETS[cfg.dataset].num_classes
    model = train.build_model(cfg, num_classes, dataset[0][1].shape[0])
    figures = dict(method=args.method, backbone=args.backbone, opts=args.opts,
                   **benchmark(model, dataset, num_classes, size, device, args.repeats, args.batch, args.workers, args.amp))
    for k, v in figures.items():
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == '__main__':
    main()
