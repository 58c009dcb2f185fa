"""Train an RGB+X segmentation model.

    python train.py                                    # the demo: a small model on built-in data, CPU, minutes
    python train.py --dataset nyudv2 --data-root DIR --method ktb --backbone swin-base \\
                    --pretrained swin_base_patch4_window12_384_22k.pth
    torchrun --nproc_per_node 4 train.py ...           # DDP: one process per GPU (gloo on CPU)
    python train.py ... --resume                       # continue the run in --out-dir exactly where it stopped

Reads top to bottom: configuration, set-up (DDP from the RANK environment
variable, device, precision), data, model, optimizer, the loop, checkpoints.
A run directory holds config.json, log.jsonl, last.pt and best.pt.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import rgbx
from eval import evaluate, format_metrics, metrics, shard_loader


@dataclass
class Config:
    # data
    dataset: str = 'demo'           # a key of data.PRESETS
    data_root: str = ''             # '' = the dataset's default place (see data.py)
    x_modality: str = ''            # '' = the dataset's default X (nyudv2: hha)
    split: str = 'train'            # the training split (demo: 'fit' leaves the 'val' scenes out)
    # model
    method: str = 'early_fusion'    # early_fusion | rgb_only | ktb | gopt | maskmentor
    backbone: str = 'swin-nano'     # swin-{nano,tiny,small,base,large} | vit-{nano,base,large}
    pretrained: str = ''            # official backbone file; 'none' trains a PEFT method from scratch on purpose
    opts: str = ''                  # method options, e.g. "variant=vpt_deep,interval=2", "stage=pretrain", "adapter_ranks=64:64:64:64"
    # optimisation; 0 or -1 = the dataset preset's recipe
    epochs: int = 0
    batch_size: int = 0             # per process; the global batch is batch_size * processes * grad_accum
    lr: float = 0.0
    weight_decay: float = -1.0
    warmup_epochs: float = -1.0
    schedule: str = ''              # poly | cosine; '' = the method's recipe (MaskMentor: cosine), else poly
    beta2: float = 0.0              # AdamW beta2; 0 = the method's recipe (MaskMentor pre-training: 0.95), else 0.999
    crop: str = ''                  # training crop "HxW"
    grad_accum: int = 1
    max_steps: int = 0              # stop after this many optimizer steps (0 = all epochs)
    # system
    device: str = ''                # '' = cuda if available, else cpu
    amp: str = 'none'               # none | bf16 | fp16 (fp16 on CUDA, with a gradient scaler)
    compile: bool = False
    sync_bn: bool = False           # SyncBatchNorm across GPUs (CUDA only)
    workers: int = 2
    seed: int = 3407
    # run
    out_dir: str = ''               # '' = runs/<dataset>-<method>-<backbone>
    resume: bool = False
    save_every: int = 0             # also checkpoint every N steps (0 = at the end of each epoch only)
    eval_every: int = 1             # epochs (0 = never)
    log_every: int = 10             # steps
    save_full: bool = False         # also store the frozen weights in checkpoints
    nonfinite: str = 'stop'         # stop | skip: what a non-finite loss does


def parse_config(argv=None):
    """argparse built from the Config fields; a preset fills what is left at 0 / -1 / ''."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    for f in fields(Config):
        flag = '--' + f.name.replace('_', '-')
        if f.type is bool or f.type == 'bool':
            p.add_argument(flag, action='store_true')
        else:
            p.add_argument(flag, type=eval_type(f.type), default=f.default)
    return resolve(Config(**vars(p.parse_args(argv))))


def eval_type(t):
    return {'int': int, 'float': float, 'str': str}.get(t, t) if isinstance(t, str) else t


PEFT = ('ktb', 'gopt')  # methods that freeze a pretrained backbone

# MaskMentor Sec. 4.1: pre-training AdamW lr 1e-5, cosine, batch 12 (reach it with --batch-size B
# --grad-accum 12/B when 12 do not fit), betas 0.9 / 0.95 as MultiMAE pre-trains; fine-tuning lr 3e-5,
# cosine, batch 2. Epochs, crop, weight decay and lr warm-up come from the dataset preset.
MASKMENTOR_RECIPES = {'pretrain': dict(lr=1e-5, batch_size=12, schedule='cosine', beta2=0.95),
                      'finetune': dict(lr=3e-5, batch_size=2, schedule='cosine')}


def resolve(cfg):
    """Fill the recipe fields left unset from the dataset preset (design/ktb.md sec. 7)."""
    if cfg.dataset not in data.PRESETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of {sorted(data.PRESETS)}")
    recipe = data.PRESETS[cfg.dataset].recipe
    if cfg.method == 'maskmentor':  # the paper's recipe first, the dataset's for the rest
        for k, v in MASKMENTOR_RECIPES[parse_opts(cfg.opts).get('stage', 'finetune')].items():
            if getattr(cfg, k) in (0, -1, ''):
                setattr(cfg, k, v)
    fill = dict(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, weight_decay=recipe.weight_decay,
                warmup_epochs=recipe.warmup_epochs, crop='%dx%d' % tuple(recipe.crop))
    for k, v in fill.items():
        if getattr(cfg, k) in (0, -1, ''):
            setattr(cfg, k, v)
    if not cfg.out_dir:
        cfg.out_dir = os.path.join('runs', f'{cfg.dataset}-{cfg.method}-{cfg.backbone}')
    if cfg.method in PEFT and not cfg.pretrained:
        raise ValueError(f"{cfg.method} adapts a frozen pretrained backbone: pass --pretrained FILE "
                         f"(see README, 'Pretrained files'), or --pretrained none to train it from scratch on purpose")
    cfg.schedule, cfg.beta2 = cfg.schedule or 'poly', cfg.beta2 or 0.999
    if cfg.schedule not in ('poly', 'cosine') or not 0 < cfg.beta2 < 1:
        raise ValueError(f"--schedule takes poly|cosine and --beta2 a value in (0, 1), "
                         f"not {cfg.schedule!r} / {cfg.beta2}")
    if cfg.nonfinite not in ('stop', 'skip') or cfg.amp not in ('none', 'bf16', 'fp16'):
        raise ValueError(f"--nonfinite takes stop|skip and --amp none|bf16|fp16, not {cfg.nonfinite!r} / {cfg.amp!r}")
    return cfg


def parse_opts(text):
    """"a=1,b=x,c=true,d=8:16:32:64" -> {'a': 1, 'b': 'x', 'c': True, 'd': [8, 16, 32, 64]}
    (numbers and booleans converted; ':' separates the items of a list, e.g. KTB's per-stage ranks)."""
    out = {}
    for item in filter(None, text.split(',')):
        if '=' not in item:
            raise ValueError(f"--opts item {item!r} is not key=value")
        k, v = item.split('=', 1)
        low = v.lower()
        out[k.strip()] = True if low == 'true' else False if low == 'false' else \
            [_number(i) for i in v.split(':')] if ':' in v else _number(v)
    return out


def _number(v):
    for t in (int, float):
        try:
            return t(v)
        except ValueError:
            pass
    return v


def build_model(cfg, num_classes, x_channels):
    """The model of `cfg` (rgbx.build_model), with pretrained weights when given."""
    pretrained = None if cfg.pretrained in ('', 'none') else cfg.pretrained
    opts = parse_opts(cfg.opts)
    if cfg.method == 'maskmentor' and 'stage' not in opts:
        opts['stage'] = 'finetune'
    if cfg.method == 'ktb' and cfg.dataset == 'mcubes':
        opts.setdefault('ohem', True)  # KTB's release trains MCubeS with OHEM cross-entropy
    return rgbx.build_model(cfg.method, cfg.backbone, num_classes, x_channels, pretrained=pretrained, **opts)


# ----------------------------------------------------------------------------
# Learning rate, optimizer, sampling
# ----------------------------------------------------------------------------

def lr_at(step, total, warmup, base, warmup_ratio=0.1, power=0.9, schedule='poly'):
    """Linear warm-up from warmup_ratio * base to base over `warmup` steps, then to 0
    at `total` by poly decay base * (1 - t)^power or cosine decay base * (1 + cos(pi t)) / 2
    (a pure function of the step)."""
    if step < warmup:
        return base * (warmup_ratio + (1 - warmup_ratio) * step / warmup)
    t = (step - warmup) / max(1, total - warmup)
    return base * (1 + math.cos(math.pi * t)) / 2 if schedule == 'cosine' else base * (1 - t) ** power


def param_groups(model, weight_decay):
    """AdamW groups over the trainable parameters only: no weight decay on norms,
    biases, embeddings, tokens and bias tables (every tensor of ndim <= 1, and by name)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.ndim <= 1 or any(s in name for s in ('token', 'pos_embed', 'bias_table', 'embed.weight',
                                                        'class_emb', 'task_embeddings'))
        (no_decay if plain else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


class ResumableSampler(torch.utils.data.Sampler):
    """DistributedSampler semantics (a seeded shuffle per epoch, the shard
    rank::world of it, set_epoch) plus `start`: the number of this rank's samples
    of the epoch already consumed, so that a resumed run sees the same order."""

    def __init__(self, n, seed, rank=0, world=1, batch=1):
        self.n, self.seed, self.rank, self.world, self.batch = n, seed, rank, world, batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def indices(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        per_rank = len(order) // (self.world * self.batch) * self.batch  # whole batches only (drop_last)
        return order[self.rank::self.world][:per_rank]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self):
        return len(self.indices()) - self.start


def fresh_batch(batch_of, step):
    """Whether `step` draws a new batch. `batch_of(step)` names the batch a step trains on:
    the step itself, or for MaskMentor's STTP (Sec. 3.4: "for each input batch", three
    teacher iterations then one student iteration) one batch per cycle."""
    return step == 0 or batch_of(step) != batch_of(step - 1)


def draws(batch_of, start, stop):
    """How many batches steps start..stop-1 draw from the loader."""
    return sum(fresh_batch(batch_of, s) for s in range(start, stop))


def cycle_start(batch_of, step):
    """The first step that trains on the batch of `step`."""
    while step > 0 and batch_of(step - 1) == batch_of(step):
        step -= 1
    return step


# ----------------------------------------------------------------------------
# Checkpoints: atomic, verified, exact
# ----------------------------------------------------------------------------

def save_checkpoint(obj, path):
    """Write atomically: temporary file, flush + fsync, rename, fsync the folder.
    A crash at any moment leaves either the old file or the new one, never a torn one."""
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state():
    """Every random state a step draws from, in weights_only-loadable types."""
    np_state = np.random.get_state()
    return dict(python=[random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate((s['python'][0], tuple(s['python'][1]), s['python'][2]))
    np.random.set_state((s['numpy'][0], s['numpy'][1].numpy().astype(np.uint32), *s['numpy'][2:]))
    torch.set_rng_state(s['torch'])
    if s['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s['cuda'])


def load_run_checkpoint(path):
    """Read a training checkpoint, refusing anything that is not one of ours."""
    ckpt = rgbx.read_checkpoint(path)
    needed = {'model', 'config', 'step'}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        raise ValueError(f"{path} is not an rgbx training checkpoint (needs keys {sorted(needed)}); "
                         f"for an official backbone file use --pretrained")
    return ckpt


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    pass


def setup_distributed(cfg):
    """DDP when launched by torchrun (RANK in the environment): nccl on CUDA, gloo on CPU."""
    if 'RANK' not in os.environ:
        device = torch.device(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        return 0, 1, device
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = (cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda')
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if use_cuda else 'gloo')
    return rank, world, torch.device(f'cuda:{local}' if use_cuda else 'cpu')


def autocast(cfg, device):
    """bf16 / fp16 autocast, or a null context (fp32)."""
    if cfg.amp == 'none':
        return nullcontext()
    if cfg.amp == 'fp16' and device.type != 'cuda':
        raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == 'bf16' else torch.float16)


def train(cfg, model=None, on_step=None):
    """Run training as `cfg` says; `model` replaces the one `cfg` would build (tests),
    `on_step(step)` is called after each optimizer step and its checkpoint.
    Returns a dict with the last evaluation and the run's figures."""
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    os.makedirs(cfg.out_dir, exist_ok=True)

    # data: augmentation randomness is a function of (seed, epoch, sample), so the
    # order of workers and a resume cannot change it
    preset = data.PRESETS[cfg.dataset]
    crop = tuple(int(v) for v in cfg.crop.split('x'))
    train_set = data.build_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.x_modality or None, crop=crop,
                                   train=True, seed=cfg.seed)
    test_set = data.build_dataset(cfg.dataset, cfg.data_root, 'test', cfg.x_modality or None)
    sampler = ResumableSampler(len(train_set), cfg.seed, rank, world, cfg.batch_size)
    if len(sampler.indices()) < cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"{len(train_set)} training samples cannot fill one step of {world} x {cfg.batch_size} x "
                         f"{cfg.grad_accum} (processes x batch x accumulation)")
    pin = device.type == 'cuda'
    loader = torch.utils.data.DataLoader(
        train_set, cfg.batch_size, sampler=sampler, num_workers=cfg.workers, pin_memory=pin, drop_last=True,
        persistent_workers=False,  # the sampler's start offset changes per epoch; workers restart with it
        generator=torch.Generator())  # worker seeds drawn from here, not from the global RNG
    test_loader = shard_loader(test_set, rank, world, cfg.workers, pin)

    # model
    x_channels = train_set[0][1].shape[0]
    if model is None:
        model = build_model(cfg, preset.num_classes, x_channels)
    model.to(device)
    if cfg.sync_bn:
        if device.type != 'cuda':
            raise ValueError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernel); drop it on CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    counts = dict(trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  total=sum(p.numel() for p in model.parameters()))
    say(f"config: {json.dumps(asdict(cfg))}")
    say(f"parameters: trainable {counts['trainable']:,} of {counts['total']:,} total"
        + (f" | {model.param_counts()}" if hasattr(model, 'param_counts') else ''))
    fingerprint = rgbx.frozen_fingerprint(model)

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                  fused=device.type == 'cuda')
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
    steps_per_epoch = len(sampler.indices()) // (cfg.batch_size * cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if hasattr(model, 'plan'):  # MaskMentor pre-training: its MIM warm-up is a fraction of the run's steps
        model.plan(total)

    # resume
    step, best, skipped = 0, -1.0, 0
    last_path, best_path = os.path.join(cfg.out_dir, 'last.pt'), os.path.join(cfg.out_dir, 'best.pt')
    if cfg.resume:
        if not os.path.exists(last_path):
            raise FileNotFoundError(f"--resume: no checkpoint {last_path}; start without --resume or set --out-dir")
        ckpt = load_run_checkpoint(last_path)
        if ckpt['frozen_sha1'] != fingerprint:
            raise ValueError(f"{last_path} was trained on other frozen weights: pass the same --pretrained "
                             f"({ckpt['config']['pretrained']!r})")
        rgbx.load_trained(model, ckpt['model'], last_path)
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        step, best, skipped = ckpt['step'], ckpt['best'], ckpt['skipped']
        set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0])
        say(f"resumed from {last_path} at step {step}")
    if master:
        with open(os.path.join(cfg.out_dir, 'config.json'), 'w') as f:
            json.dump(asdict(cfg), f, indent=2)

    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None,
                    find_unused_parameters=getattr(raw, 'find_unused_parameters', False))

    def checkpoint(path, evaluation=None):
        """Every rank's RNG state is gathered; rank 0 writes."""
        states = [rng_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if master:
            save_checkpoint(dict(model=raw.state_dict() if cfg.save_full else rgbx.trainable_state(raw),
                                 optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, best=best,
                                 skipped=skipped, config=asdict(cfg), rng=states, frozen_sha1=fingerprint,
                                 evaluation=evaluation), path)

    # a pre-training model (MaskMentor stage 1) takes the global step for its schedule and has no logits to evaluate
    pretraining = getattr(raw, 'pretraining', False)
    log = open(os.path.join(cfg.out_dir, 'log.jsonl'), 'a') if master else None
    result, t0, t_last, step_at_t = {}, time.time(), time.time(), step
    batch_of = getattr(raw, 'batch_index', lambda s: s)  # MaskMentor STTP: one batch per teacher/student cycle
    per_draw = cfg.batch_size * cfg.grad_accum
    held = None  # (batch index, its micro-batches)
    while step < total:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        if held is None and not fresh_batch(batch_of, step):  # resumed inside a cycle: draw its batch again
            first = cycle_start(batch_of, step)
            first_epoch = first // steps_per_epoch
            sampler.set_epoch(first_epoch, draws(batch_of, first_epoch * steps_per_epoch, first) * per_draw)
            train_set.set_epoch(first_epoch)
            again = iter(loader)
            held = (batch_of(step), [next(again) for _ in range(cfg.grad_accum)])
        sampler.set_epoch(epoch, draws(batch_of, epoch * steps_per_epoch, step) * per_draw)
        train_set.set_epoch(epoch)
        model.train()
        batches = iter(loader)
        for _ in range(done_in_epoch, steps_per_epoch):
            lr = lr_at(step, total, warmup, cfg.lr, schedule=cfg.schedule)
            for g in optimizer.param_groups:
                g['lr'] = lr
            loss_sum = torch.zeros((), device=device)
            if held is None or held[0] != batch_of(step):
                held = (batch_of(step), [next(batches) for _ in range(cfg.grad_accum)])
            for micro, batch in enumerate(held[1]):
                rgb, x, label = (t.to(device, non_blocking=pin) for t in batch)
                if world > 1:  # sync gradients on the last micro-step only
                    model.require_backward_grad_sync = micro == cfg.grad_accum - 1
                with autocast(cfg, device):
                    loss, _ = model(rgb, x, label, **({'step': step} if pretraining else {}))
                    loss = loss / cfg.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            step += 1
            if not torch.isfinite(loss_sum):
                optimizer.zero_grad(set_to_none=True)
                if cfg.nonfinite == 'stop':
                    raise NonFiniteLoss(f"non-finite loss ({loss_sum.item()}) at step {step}; the last good "
                                        f"checkpoint is {last_path if os.path.exists(last_path) else 'none (none saved yet)'}. "
                                        f"Lower --lr, try --amp none, or pass --nonfinite skip")
                skipped += 1
                say(f"step {step}: non-finite loss, step skipped ({skipped} so far)")
            else:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            if master and (step % cfg.log_every == 0 or step == total):
                now = time.time()
                rate = (step - step_at_t) / max(now - t_last, 1e-9)
                t_last, step_at_t = now, step
                eta = (total - step) / max(rate, 1e-9)
                say(f"step {step}/{total} | epoch {epoch + 1} | loss {loss_sum.item():.4f} | lr {lr:.2e} | "
                    f"{rate:.2f} it/s | ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
                log.write(json.dumps(dict(step=step, epoch=epoch + 1, loss=loss_sum.item(), lr=lr,
                                          time=now - t0)) + '\n')
                log.flush()
            end_of_epoch = step % steps_per_epoch == 0 or step == total
            if cfg.save_every and step % cfg.save_every == 0 and not end_of_epoch:
                checkpoint(last_path)
            if end_of_epoch:
                evaluation = None
                if not pretraining and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or step == total):
                    conf = evaluate(raw, test_loader, preset.num_classes, device, amp=cfg.amp)
                    evaluation = metrics(conf)
                    result = dict(evaluation)
                    say(format_metrics(evaluation, preset.class_names, short=True))
                    if master:
                        log.write(json.dumps(dict(step=step, epoch=epoch + 1, eval={k: v for k, v in evaluation.items()
                                                                                   if k != 'iou'})) + '\n')
                        log.flush()
                    if evaluation['miou'] > best:
                        best = evaluation['miou']
                        checkpoint(best_path, evaluation)
                checkpoint(last_path, evaluation)
            if on_step is not None:
                on_step(step)
            if step >= total:
                break
    if master:
        log.close()
        say(f"done: {step} steps in {time.time() - t0:.0f}s" + (f", best mIoU {100 * best:.2f}" if best >= 0 else "")
            + f", checkpoints in {cfg.out_dir}")
    return dict(result, best=best, step=step, skipped=skipped, params=counts)


def main(argv=None):
    try:
        train(parse_config(argv))
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
