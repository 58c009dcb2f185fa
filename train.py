"""Train an RGB+X segmentation model.

    python train.py                                    # the demo: a small model on built-in data, CPU, minutes
    python train.py --dataset nyudv2 --data-root DIR --method ktb --backbone swin-base \\
                    --pretrained swin_base_patch4_window12_384_22k.pth
    torchrun --nproc_per_node 4 train.py ...           # DDP: one process per GPU (gloo on CPU)
    python train.py ... --resume                       # continue the run in --out-dir exactly where it stopped

Reads top to bottom: the command line (data.Config, shared with eval.py), the
schedule and sampler, checkpoints and the run folder, then `train`: set-up (DDP
from the RANK environment variable, device, precision, data, model, optimizer,
resume) and the loop. A run directory holds config.json, log.jsonl, last.pt and
best.pt; a new run never writes into a folder holding a run's checkpoints (--resume
or --overwrite), and a resume with another config is refused.
"""
import argparse
import errno
import json
import math
import os
import random
import sys
import time
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import rgbx
from data import MAX_SKIPPED, Config, resolve, shard_loader  # the run configuration lives in data.py, shared with eval.py
from rgbx import evaluate, format_metrics, load_run_checkpoint, metrics


def parse_config(argv=None):
    """argparse built from the Config fields; the dataset preset fills the fields left at None."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    for f in fields(Config):
        flag = '--' + f.name.replace('_', '-')
        if f.type is bool:
            p.add_argument(flag, action='store_true')
        else:
            p.add_argument(flag, type=flag_type(f.type), default=f.default)
    return resolve(Config(**vars(p.parse_args(argv))))


def flag_type(t):
    """The argparse type of a field: int, float or str (Optional[int] -> int)."""
    return next((a for a in typing.get_args(t) if a is not type(None)), t)


def build_model(cfg, num_classes, x_channels):
    """The model of `cfg` (rgbx.build_model), with pretrained weights when given."""
    return rgbx.build_model(cfg.method, cfg.backbone, num_classes, x_channels, **data.model_options(cfg))


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
    biases, embeddings, tokens and bias tables (every tensor of ndim <= 1, and by
    name), except in KTB, whose release decays every trainable tensor."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = not isinstance(model, rgbx.KTB) and (
            p.ndim <= 1 or any(s in name for s in ('token', 'pos_embed', 'bias_table', 'embed.weight',
                                                    'class_emb', 'task_embeddings')))
        (no_decay if plain else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


class ResumableSampler(torch.utils.data.Sampler):
    """A seeded shuffle per epoch (set_epoch), dealt in global batches of world x
    batch: rank r takes rows r*batch .. (r+1)*batch - 1 of each, so the processes
    together see exactly one process's batches at the global batch size (rgbx.batch_share);
    `start`: the number of this rank's samples of the epoch already consumed, so that
    a resumed run sees the same order."""

    def __init__(self, n, seed, rank=0, world=1, batch=1):
        self.n, self.seed, self.rank, self.world, self.batch = n, seed, rank, world, batch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def indices(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        steps = len(order) // (self.world * self.batch)  # whole global batches only (drop_last)
        dealt = torch.tensor(order[:steps * self.world * self.batch]).view(steps, self.world, self.batch)  # (step, rank, i)
        return dealt[:, self.rank].flatten().tolist()

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
# Checkpoints and the run folder: atomic, verified, exact, nothing overwritten
# ----------------------------------------------------------------------------

class DiskFull(OSError):
    pass


def save_checkpoint(obj, path):
    """Write atomically: temporary file, flush + fsync, rename, fsync the folder.
    A crash at any moment leaves either the old file or the new one, never a torn one;
    a failed write removes its temporary file, and a full disk raises DiskFull naming `path`."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with disk_full_names(path), open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def disk_full_names(path):
    """Turn the OS's "no space left" while writing `path` into a DiskFull error naming it."""
    try:
        yield
    except BaseException as e:
        if no_space(e):
            raise DiskFull(f"disk full: cannot write {path}; free space on that disk or pass another --out-dir") \
                from None
        raise


def no_space(e):
    """Whether an exception, or one it arose from, is the OS saying the disk is full
    (torch.save reports it as a RuntimeError "unexpected pos" raised while handling it)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def remove_stale_tmp(folder):
    """Delete the temporary checkpoint files ('<name>.tmp.<pid>') of processes that no
    longer run: a process killed while writing leaves one. Returns their names."""
    stale = []
    for name in sorted(os.listdir(folder)):
        pid = name.rpartition('.tmp.')[2]
        if '.tmp.' in name and pid.isdigit() and not process_alive(int(pid)):
            os.remove(os.path.join(folder, name))
            stale.append(name)
    return stale


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def check_out_dir(cfg, master, say):
    """Before anything is written: a folder holding a run's checkpoint is continued
    (--resume) or replaced (--overwrite, which deletes its checkpoints), never
    overwritten silently. Rank 0 removes stale temporary files."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    held = [n for n in ('last.pt', 'best.pt') if os.path.exists(os.path.join(cfg.out_dir, n))]
    if held and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{cfg.out_dir} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                         f"another --out-dir, or --overwrite to replace it")
    if master:
        stale = remove_stale_tmp(cfg.out_dir)
        if stale:
            say(f"removed {len(stale)} temporary file(s) of killed runs: {', '.join(stale)}")
        if cfg.overwrite:
            for n in held:
                os.remove(os.path.join(cfg.out_dir, n))
            if held:
                say(f"--overwrite: deleted {', '.join(held)} of the run in {cfg.out_dir}")


def trim_log(path, step):
    """Keep the records of log.jsonl up to `step`: a resumed run writes the later ones
    again (a torn last line, from a kill mid-write, goes too)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record['step'] <= step:
                keep.append(json.dumps(record) + '\n')
    with open(path + '.tmp', 'w') as f:
        f.writelines(keep)
    os.replace(path + '.tmp', path)


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


# ----------------------------------------------------------------------------
# The run: set-up steps, one optimizer step, the loop
# ----------------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    pass


def setup_distributed(cfg):
    """DDP when launched by torchrun (RANK in the environment): nccl on CUDA, gloo on CPU."""
    device = data.check_device(cfg.device)
    if 'RANK' not in os.environ:
        return 0, 1, device
    rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = device.type == 'cuda'
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


def make_loaders(cfg, rank, world, device):
    """The training set, its resumable sampler and loader, and the test loader. The
    augmentation randomness is a function of (seed, epoch, sample), so the order of
    workers and a resume cannot change it."""
    train_set = data.build_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.x_modality or None,
                                   crop=data.parse_size(cfg.crop, '--crop'), train=True, seed=cfg.seed, method=cfg.method,
                                   augment=cfg.augment == 'full')
    test_set = data.build_dataset(cfg.dataset, cfg.data_root, 'test', cfg.x_modality or None, method=cfg.method)
    sampler = ResumableSampler(len(train_set), cfg.seed, rank, world, cfg.batch_size)
    if len(sampler.indices()) < cfg.batch_size * cfg.grad_accum:
        raise ValueError(f"{len(train_set)} training samples cannot fill one step of {world} x {cfg.batch_size} x "
                         f"{cfg.grad_accum} (processes x batch x accumulation)")
    pin = device.type == 'cuda'
    # workers are not persistent: they restart each epoch with the sampler's start offset
    loader = data.loader(train_set, cfg.batch_size, cfg.workers, sampler, drop_last=True, pin=pin)
    return train_set, sampler, loader, shard_loader(test_set, rank, world, cfg.workers, pin)


def resume_checkpoint(cfg):
    """--resume: the run's last.pt, read before anything is built, refused unless it
    was trained with this config (data.resume_changes)."""
    last_path = os.path.join(cfg.out_dir, 'last.pt')
    if not os.path.exists(last_path):
        raise FileNotFoundError(f"--resume: no checkpoint {last_path}; start afresh without --resume (and with "
                                f"--overwrite if the folder holds best.pt) or set --out-dir")
    ckpt = load_run_checkpoint(last_path)
    ckpt['changes'] = data.resume_changes(ckpt['config'], cfg, cfg.allow_changes, last_path)
    return ckpt


def restore(ckpt, cfg, model, optimizer, scaler, fingerprint, rank, say):
    """Load a resume checkpoint into model, optimizer, scaler and the RNGs, after
    checking the frozen weights; log.jsonl is cut back to its step. Returns (step, best, skipped)."""
    last_path = os.path.join(cfg.out_dir, 'last.pt')
    if ckpt['frozen_sha1'] != fingerprint:
        raise ValueError(f"{last_path} was trained on other frozen weights: pass the same --pretrained "
                         f"({ckpt['config']['pretrained']!r})")
    rgbx.load_trained(model, ckpt['model'], last_path)
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0])
    if rank == 0:
        trim_log(os.path.join(cfg.out_dir, 'log.jsonl'), ckpt['step'])
    say(f"resumed from {last_path} at step {ckpt['step']}"
        + (f", with the changes {ckpt['changes']}" if ckpt['changes'] else ''))
    return ckpt['step'], ckpt['best'], ckpt['skipped']


def train_step(model, batches, optimizer, scaler, cfg, device, world, lr, schedule_step=None):
    """One optimizer step over cfg.grad_accum micro-batches (gradient sync on the
    last one only); a non-finite loss leaves the weights untouched. Returns the mean
    loss over micro-batches and processes, and the last micro-batch's (rgb, x).
    `schedule_step`: the global step, for a model with its own schedule (MaskMentor
    pre-training)."""
    for g in optimizer.param_groups:
        g['lr'] = lr
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        rgb, x, label = (t.to(device, non_blocking=device.type == 'cuda') for t in next(batches))
        if world > 1:
            model.require_backward_grad_sync = micro == cfg.grad_accum - 1
        with autocast(cfg, device):
            loss, _ = model(rgb, x, label, **({} if schedule_step is None else {'step': schedule_step}))
            loss = loss / cfg.grad_accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= world
    if torch.isfinite(loss_sum):
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, (rgb, x)


def prepare_model(cfg, model, num_classes, x_channels, device, world, say):
    """The model `cfg` names (or `model`) on `device`, its BatchNorms synchronised
    across processes under DDP; prints the config and the parameter counts.
    Returns (model, counts)."""
    model = (model if model is not None else build_model(cfg, num_classes, x_channels)).to(device)
    if world > 1:  # BatchNorm on the global batch's statistics (README, "Several processes")
        model = rgbx.sync_batchnorm(model, device)
    counts = dict(trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  total=sum(p.numel() for p in model.parameters()))
    say(f"config: {json.dumps(asdict(cfg))}")
    say(f"parameters: trainable {counts['trainable']:,} of {counts['total']:,} total"
        + (f" | {model.param_counts()}" if hasattr(model, 'param_counts') else ''))
    return model, counts


class RunFiles:
    """What a run writes to its folder (rank 0): config.json, the log.jsonl records and
    the progress line, and the checkpoints, which hold every rank's RNG state and
    never non-finite weights. Without a pretrained file the frozen weights are random
    and exist nowhere else: checkpoints then hold them too."""

    def __init__(self, cfg, model, optimizer, scaler, fingerprint, world, master, step):
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.fingerprint, self.world, self.master = fingerprint, world, master
        self.last, self.best = os.path.join(cfg.out_dir, 'last.pt'), os.path.join(cfg.out_dir, 'best.pt')
        self.log = None
        self.log_path = os.path.join(cfg.out_dir, 'log.jsonl')
        if master:
            config_path = os.path.join(cfg.out_dir, 'config.json')
            with disk_full_names(config_path), open(config_path, 'w') as f:
                json.dump(asdict(cfg), f, indent=2)
            self.log = open(self.log_path, 'a' if cfg.resume else 'w')
        self.t0 = self.t_last = time.time()
        self.step_at_t = step

    def say(self, *text):
        if self.master:
            print(*text)

    def record(self, **record):
        if self.master:
            with disk_full_names(self.log_path):
                self.log.write(json.dumps(record) + '\n')
                self.log.flush()

    def progress(self, step, total, epoch, loss, lr, **extra):
        """The progress line (loss, lr, it/s, ETA) and its log record (with `extra`)."""
        now = time.time()
        rate = (step - self.step_at_t) / max(now - self.t_last, 1e-9)
        self.t_last, self.step_at_t = now, step
        eta = (total - step) / max(rate, 1e-9)
        self.say(f"step {step}/{total} | epoch {epoch + 1} | loss {loss:.4f} | lr {lr:.2e} | {rate:.2f} it/s | "
                 f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
        self.record(step=step, epoch=epoch + 1, loss=loss, lr=lr, time=now - self.t0, **extra)

    def last_good(self):
        return f"the last good checkpoint is {self.last if os.path.exists(self.last) else 'none (none saved yet)'}"

    def checkpoint(self, path, step, best, skipped, evaluation=None):
        full = self.cfg.save_full or self.cfg.pretrained in ('', 'none')
        state = self.model.state_dict() if full else rgbx.trainable_state(self.model)
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLoss(f"the weights are non-finite at step {step} ({len(bad)} tensors, the first {bad[0]!r}) "
                                f"and were not saved; {self.last_good()}. Lower --lr or try --amp none")
        states = [rng_state()]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, rng_state())
        if self.master:
            save_checkpoint(dict(model=state, optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                                 step=step, best=best, skipped=skipped, config=asdict(self.cfg), rng=states,
                                 frozen_sha1=self.fingerprint, evaluation=evaluation), path)

    def close(self):
        if self.master:
            with disk_full_names(self.log_path):
                self.log.close()


def on_nonfinite_loss(cfg, loss, step, skipped, total, files):
    """A non-finite loss at `step` (its update was not applied, `skipped` so far with
    this one): stop, or under --nonfinite skip go on while at most MAX_SKIPPED of the
    run's steps (at least 1) are skipped."""
    limit = max(1, int(MAX_SKIPPED * total))
    if cfg.nonfinite == 'skip' and skipped <= limit:
        files.say(f"step {step}: non-finite loss, step skipped ({skipped} so far, at most {limit})")
        return
    raise NonFiniteLoss(f"non-finite loss ({loss}) at step {step}"
                        + (f", {skipped} of {step} steps skipped, more than --nonfinite skip allows ({limit}: "
                           f"{MAX_SKIPPED:.0%} of {total})" if cfg.nonfinite == 'skip' else '')
                        + f"; {files.last_good()}. Lower --lr, try --amp none"
                        + ('' if cfg.nonfinite == 'skip' else ', or pass --nonfinite skip'))


def train(cfg, model=None, on_step=None):
    """Run training as `cfg` says; `model` replaces the one `cfg` would build (tests),
    `on_step(step)` is called after each optimizer step and its checkpoint.
    Returns a dict with the last evaluation and the run's figures."""
    # set-up: processes, the run folder, seeds, data, model, optimizer, schedule, resume
    cfg = resolve(cfg)
    rank, world, device = setup_distributed(cfg)
    say = print if rank == 0 else (lambda *a, **k: None)
    check_out_dir(cfg, rank == 0, say)
    resumed = resume_checkpoint(cfg) if cfg.resume else None
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    preset = data.PRESETS[cfg.dataset]
    train_set, sampler, loader, test_loader = make_loaders(cfg, rank, world, device)
    raw, counts = prepare_model(cfg, model, preset.num_classes, train_set[0][1].shape[0], device, world, say)
    fingerprint = rgbx.frozen_fingerprint(raw)
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                  fused=device.type == 'cuda')
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
    steps_per_epoch = len(sampler.indices()) // (cfg.batch_size * cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if hasattr(raw, 'plan'):  # MaskMentor pre-training: its MIM warm-up is a fraction of the run's steps
        raw.plan(total)
    step, best, skipped = restore(resumed, cfg, raw, optimizer, scaler, fingerprint, rank, say) if resumed else (0, -1.0, 0)
    files = RunFiles(cfg, raw, optimizer, scaler, fingerprint, world, rank == 0, step)
    model = torch.compile(raw) if cfg.compile else raw
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None,
                    find_unused_parameters=getattr(raw, 'find_unused_parameters', False))
    # a pre-training model (MaskMentor stage 1) takes the global step for its schedule and has no logits to evaluate
    pretraining = getattr(raw, 'pretraining', False)

    # the loop: optimizer steps, each epoch ended by an evaluation and the checkpoints
    result = {}
    batch_of = getattr(raw, 'batch_index', lambda s: s)  # MaskMentor STTP: one batch per teacher/student cycle
    per_draw = cfg.batch_size * cfg.grad_accum
    held = None  # (batch index, its micro-batches): the batch the current step trains on
    try:
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
                if held is None or held[0] != batch_of(step):
                    held = (batch_of(step), [next(batches) for _ in range(cfg.grad_accum)])
                loss, inputs = train_step(model, iter(held[1]), optimizer, scaler, cfg, device, world, lr,
                                          step if pretraining else None)
                loss = loss.item()
                step += 1
                if not math.isfinite(loss):
                    skipped += 1
                    on_nonfinite_loss(cfg, loss, step, skipped, total, files)
                if step % cfg.log_every == 0 or step == total:
                    # a model that reports its own health (GoPT: gopt_diagnostics) logs it on the last micro-batch
                    health = dict(diagnostics=raw.diagnostics(*inputs)) if hasattr(raw, 'diagnostics') else {}
                    files.progress(step, total, epoch, loss, lr, **health)
                end_of_epoch = step % steps_per_epoch == 0 or step == total
                if cfg.save_every and step % cfg.save_every == 0 and not end_of_epoch:
                    files.checkpoint(files.last, step, best, skipped)
                if end_of_epoch:
                    evaluation = None
                    if not pretraining and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or step == total):
                        evaluation = result = metrics(evaluate(raw, test_loader, preset.num_classes, device,
                                                               amp=cfg.amp))
                        say(format_metrics(evaluation, preset.class_names, short=True))
                        files.record(step=step, epoch=epoch + 1, eval={k: v for k, v in evaluation.items() if k != 'iou'})
                        if evaluation['miou'] > best:
                            best = evaluation['miou']
                            files.checkpoint(files.best, step, best, skipped, evaluation)
                    files.checkpoint(files.last, step, best, skipped, evaluation)
                if on_step is not None:
                    on_step(step)
                if step >= total:
                    break
    finally:
        files.close()
    say(f"done: {step} steps" + (f" ({skipped} skipped: non-finite loss)" if cfg.nonfinite == 'skip' else '')
        + f" in {time.time() - files.t0:.0f}s" + (f", best mIoU {100 * best:.2f}" if best >= 0 else "")
        + f", checkpoints in {cfg.out_dir}")
    return dict(result, best=best, step=step, skipped=skipped, params=counts)


def main(argv=None):
    try:
        train(parse_config(argv))
    except (ValueError, OSError, NonFiniteLoss, rgbx.CheckpointError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
