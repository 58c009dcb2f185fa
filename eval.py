"""Evaluate a trained RGB+X segmentation model, or segment your own images.

    python eval.py --checkpoint runs/demo-early_fusion-swin-nano/best.pt
    python eval.py --checkpoint best.pt --data-root DIR --multi-scale --flip --modality rgb
    python eval.py --checkpoint best.pt --save-pred preds/          # colourised maps + RGB | X | GT | prediction panels
    python eval.py --checkpoint best.pt --rgb room.png --x room_depth.png --out room_seg.png
    python eval.py --benchmark [--checkpoint best.pt | --method ktb --backbone swin-base]
    python eval.py --checkpoint nyu_ktb_swinb.pth --method ktb --backbone swin-base --dataset nyudv2 --data-root DIR
                                        # a trained KTB of the authors' release (no rgbx config inside)
    python eval.py --checkpoint runs/mm-pre/last.pt --reconstruct recon/  # MaskMentor Fig. 4 from a pre-training run

Metrics and inference (one confusion matrix; mIoU over the classes present in
the ground truth or the prediction; multi-scale, flip, sliding window, missing
modality) are rgbx.evaluate and the functions it calls; the run configuration is
data.Config, shared with train.py.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

import data
import rgbx
from data import shard_loader
from rgbx import SCALES, drop_modality, evaluate, format_metrics, metrics, predict

# ----------------------------------------------------------------------------
# Loading a trained model, saving pictures
# ----------------------------------------------------------------------------

def load_model(path, pretrained=None, device='cpu'):
    """Rebuild the model of a training checkpoint and load its weights. The frozen
    backbone comes from the checkpoint when it holds every weight (--save-full, or
    a run without a pretrained file), else from the run's --pretrained file (or
    `pretrained`), checked against the fingerprint stored at training time.
    Returns (model, data.Config)."""
    ckpt = rgbx.load_run_checkpoint(path)
    cfg = data.config_from_dict(ckpt['config'], path)
    if pretrained:
        cfg.pretrained = pretrained
    preset = data.PRESETS[cfg.dataset]
    x_channels = preset.x_channels(cfg.x_modality or None)
    model = build_model(dataclasses.replace(cfg, pretrained='none'), preset, x_channels)  # first without the file
    full = set(ckpt['model']) == set(model.state_dict())
    if not full and cfg.pretrained not in ('', 'none'):  # the frozen weights come from the file
        model = build_model(cfg, preset, x_channels)
    if not full and ckpt['frozen_sha1'] != rgbx.frozen_fingerprint(model):
        raise ValueError(f"{path} holds only the trained weights, and the frozen ones built here differ from those "
                         f"it was trained with: " + (
                             f"pass --pretrained with the file the run used ({cfg.pretrained!r})"
                             if cfg.pretrained not in ('', 'none') else
                             "the run had no pretrained file and this checkpoint predates saving its random frozen "
                             "weights; train it again"))
    rgbx.load_trained(model, ckpt['model'], path)
    return model.to(device).eval(), cfg


def build_model(cfg, preset, x_channels):
    """The model of a run config, as train.py builds it."""
    return rgbx.build_model(cfg.method, cfg.backbone, preset.num_classes, x_channels, **data.model_options(cfg))
def load_model_from_flags(args, device):
    """A checkpoint without rgbx's training config, e.g. a trained KTB of the
    authors' release: the model is built from --method, --backbone, --dataset
    (classes, X channels), --x-modality and --opts, and the whole file is loaded
    by rgbx.load_pretrained, which checks every key. Returns (model, config)."""
    if not (args.method and args.backbone and args.dataset):
        raise ValueError(f"{args.checkpoint} holds no rgbx training config: pass --method, --backbone and "
                         f"--dataset to build its model (e.g. --method ktb --backbone swin-base --dataset nyudv2)")
    cfg = data.resolve(data.Config(dataset=args.dataset, data_root=args.data_root or '', method=args.method,
                                   backbone=args.backbone, opts=args.opts or '', x_modality=args.x_modality or '',
                                   pretrained='none'))
    preset = data.PRESETS[cfg.dataset]
    model = build_model(cfg, preset, preset.x_channels(cfg.x_modality or None))
    rgbx.load_pretrained(model, args.checkpoint)
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


def legend(classes, class_names, palette, width, row=14):
    """A white strip (h, width, 3) uint8 of swatches and names: each class in `classes`,
    then void (hatched, as data.colorize draws it), in as many columns as fit."""
    font = ImageFont.load_default()
    entries = [(c, class_names[c]) for c in classes] + [(data.IGNORE, 'void (not scored)')]
    cell = 16 + max(int(font.getlength(name)) for _, name in entries)  # swatch, gap, the longest name
    cols = max(1, width // cell)
    strip = Image.new('RGB', (width, row * -(-len(entries) // cols) + 2), 'white')
    draw = ImageDraw.Draw(strip)
    for i, (c, name) in enumerate(entries):
        x, y = i % cols * cell + 2, i // cols * row + 2
        strip.paste(Image.fromarray(data.colorize(np.full((row - 4, row - 4), c), palette, hatch=True)), (x, y))
        draw.rectangle((x, y, x + row - 5, y + row - 5), outline=(128, 128, 128))
        draw.text((x + row, y), name, fill='black', font=font)
    return np.array(strip)


def save_panel(path, rgb_img, x_img, gt, pred, palette, class_names):
    """RGB | X | ground truth | prediction, side by side, over a legend of the classes
    present in either map (void hatched), as one PNG."""
    panel = np.concatenate([rgb_img, x_img, data.colorize(gt, palette, hatch=True), data.colorize(pred, palette)], 1)
    present = sorted(set(np.unique(gt).tolist()) - {data.IGNORE} | set(np.unique(pred).tolist()))
    Image.fromarray(np.concatenate([panel, legend(present, class_names, palette, panel.shape[1])])).save(path)


# ----------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------

def peak_memory(device, reset=False):
    """Peak memory in bytes since the last reset: CUDA max allocated, or on CPU the
    peak resident set (Linux VmHWM, reset through /proc/self/clear_refs after the heap's
    free pages are given back, which rgbx otherwise keeps: `rgbx.keep_freed_memory`)."""
    if device.type == 'cuda':
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device)
    if reset:
        rgbx.release_freed_memory()
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
    streams = getattr(model, 'streams', 1)
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
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)) \
        if amp != 'none' else (lambda: torch.autocast(device.type, enabled=False))
    model = model.to(device)
    out = dict(size=[H, W], device=str(device), threads=torch.get_num_threads(),
               trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
               total_params=sum(p.numel() for p in model.parameters()))
    out.update(floor_timings(model, size, num_classes, x_channels, device, repeats, batch, ctx))
    out['images_per_s'] = 1 / out['latency_s']
    if floor_only:
        return out
    rgb, x = torch.randn(1, 3, H, W, device=device), torch.randn(1, x_channels, H, W, device=device)
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
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--checkpoint', default=None,
                   help="a training checkpoint (last.pt / best.pt), or a file without rgbx's config (a trained "
                        "KTB of the authors' release): its model is then built from --method, --backbone, "
                        "--dataset, --x-modality and --opts")
    p.add_argument('--data-root', default=None, help='dataset folder (default: the one the run used)')
    p.add_argument('--split', default=None, help='default test')
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
    p.add_argument('--workers', type=int, default=0, help='loader processes (evaluation and benchmark); see README')
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
    args = p.parse_args(argv)
    try:
        check_flags(args)
        return run(args)
    except (ValueError, OSError, rgbx.CheckpointError) as e:
        sys.exit(f"error: {e}")


def check_flags(args):
    """Refuse flags that would be ignored: every flag given must act."""
    def given(*names):
        return ', '.join('--' + n.replace('_', '-') for n in names if getattr(args, n) not in (None, False))
    model_choice = given('method', 'backbone', 'opts', 'dataset', 'x_modality')
    if args.benchmark:
        evaluation_only = given('save_pred', 'rgb', 'x', 'out', 'multi_scale', 'flip', 'sliding', 'split', 'reconstruct')
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
        if args.reconstruct and (given('save_pred', 'rgb', 'x', 'out', 'multi_scale', 'flip', 'sliding')
                                 or args.modality != 'both'):
            raise ValueError("--reconstruct saves a pre-training run's reconstructions and takes no segmentation "
                             "flags: drop " + (given('save_pred', 'rgb', 'x', 'out', 'multi_scale', 'flip', 'sliding')
                                               or '--modality'))
        if args.save_pred and given('rgb', 'x', 'out'):
            raise ValueError(f"--save-pred saves the predictions over a dataset split, {given('rgb', 'x', 'out')} "
                             f"segment one image pair: use one or the other")
    for name in ('workers', 'batch', 'repeats'):
        low = 0 if name == 'workers' else 1
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}, not {getattr(args, name)}")


def run(args):
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if 'RANK' in os.environ else (0, 1)
    device = data.check_device(args.device)
    device = torch.device(device if world == 1 or device.type != 'cuda' else f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
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
        model, cfg = load_model(args.checkpoint, args.pretrained, device)
    else:  # e.g. a trained KTB of the authors' release: the model from the flags
        del ckpt
        model, cfg = load_model_from_flags(args, device)
    preset = data.PRESETS[cfg.dataset]
    palette = data.palette(cfg.dataset)
    scales = SCALES if args.multi_scale else (1.0,)
    crop = data.parse_size(cfg.crop, 'the checkpoint\'s crop') if args.sliding else None
    if getattr(model, 'pretraining', False) != bool(args.reconstruct):
        raise ValueError(f"{args.checkpoint} is a pre-training checkpoint: it has no segmentation to evaluate; "
                         f"save its reconstructions with --reconstruct DIR" if args.reconstruct is None else
                         f"--reconstruct needs a MaskMentor pre-training checkpoint (--opts stage=pretrain), "
                         f"not {args.checkpoint}")
    if args.reconstruct:
        dataset = data.build_dataset(cfg.dataset, args.data_root if args.data_root is not None else cfg.data_root,
                                     args.split or 'test', cfg.x_modality or None, method=cfg.method)
        save_reconstructions(model, dataset, args.reconstruct, preset.rgb_norm, device)
        print(f"wrote {len(dataset)} reconstruction panels to {args.reconstruct}")
        return

    if args.rgb or args.x or args.out:
        if not (args.rgb and args.x and args.out):
            raise ValueError("segmenting your own images needs all of --rgb, --x and --out")
        rgb, x = data.load_pair(args.rgb, args.x, cfg.dataset, cfg.x_modality or None, cfg.method)
        with torch.no_grad():
            pred = predict(model, *drop_modality(rgb[None].to(device), x[None].to(device), args.modality),
                           preset.num_classes, scales, args.flip, crop).argmax(1)[0]
        Image.fromarray(data.colorize(pred.cpu().numpy(), palette)).save(args.out)
        print(f"wrote {args.out}")
        return

    split = args.split or 'test'
    dataset = data.build_dataset(cfg.dataset, args.data_root if args.data_root is not None else cfg.data_root,
                                 split, cfg.x_modality or None, method=cfg.method)
    loader = shard_loader(dataset, rank, world, workers=args.workers, pin=device.type == 'cuda')
    on_batch = None
    if args.save_pred:
        os.makedirs(args.save_pred, exist_ok=True)
        mean_x, std_x = preset.x_norm(cfg.x_modality or None, cfg.method)

        def on_batch(i, rgb, x, label, pred):
            name = str(dataset.names[rank + i * world])
            Image.fromarray(data.colorize(pred[0].cpu().numpy(), palette)).save(os.path.join(args.save_pred, f'{name}.png'))
            save_panel(os.path.join(args.save_pred, f'{name}_panel.png'), to_image(rgb[0], *preset.rgb_norm),
                       to_image(x[0], mean_x, std_x), label[0].cpu().numpy(), pred[0].cpu().numpy(), palette,
                       preset.class_names)
    conf = evaluate(model, loader, preset.num_classes, device, scales, args.flip, crop, args.modality, args.amp, on_batch)
    m = metrics(conf)
    if rank == 0:
        print(f"{cfg.dataset} {split} ({len(dataset)} images), modality {args.modality}, "
              f"scales {list(scales)}{' + flip' if args.flip else ''}")
        print(format_metrics(m, preset.class_names))
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(dict(m, modality=args.modality, checkpoint=args.checkpoint), f, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_benchmark(args, device):
    """The cost figures of the --checkpoint model, or of a random-weights model of --method/--backbone."""
    if args.checkpoint:
        model, cfg = load_model(args.checkpoint, args.pretrained, device)
        cfg.data_root = args.data_root if args.data_root is not None else cfg.data_root
    else:
        model, cfg = None, data.resolve(data.Config(
            dataset=args.dataset or 'demo', data_root=args.data_root or '', method=args.method or 'early_fusion',
            backbone=args.backbone or 'swin-nano', opts=args.opts or '', x_modality=args.x_modality or '',
            pretrained=args.pretrained or 'none'))
    size = data.parse_size(args.size or '480x640', '--size')
    preset = data.PRESETS[cfg.dataset]
    dataset = data.build_dataset(cfg.dataset, cfg.data_root, 'train', cfg.x_modality or None, crop=size, train=True,
                                 seed=cfg.seed, method=cfg.method)
    if model is None:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, preset, dataset[0][1].shape[0])
    figures = dict(method=cfg.method, backbone=cfg.backbone, opts=cfg.opts, checkpoint=args.checkpoint,
                   **benchmark(model, dataset, preset.num_classes, size, device, args.repeats or 3, args.batch or 2,
                               args.workers, args.amp, args.floor_only))
    for k, v in figures.items():
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == '__main__':
    main()
