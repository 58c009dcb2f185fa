"""Train an RGB+X segmentation model.

    python train.py                                    # the demo: a small model on built-in data, CPU, minutes
    python train.py --dataset nyudv2 --data-root DIR --method ktb \\
                    --pretrained swin_base_patch4_window12_384_22k.pth
    torchrun --standalone --nproc_per_node 4 train.py ...  # DDP: one process per GPU (gloo on CPU)
    python train.py ... --resume                       # continue the run in --out-dir exactly where it stopped
    python train.py --method ktb --list-opts           # a method's options (--opts), their defaults and types

Reads top to bottom: the configuration (Config, its command line, and `resolve`,
which fills what the command line leaves open from the method's recipe in rgbx and
the dataset); the run folder's guard in one place (the lock, --resume / --overwrite,
atomic writes, log trimming, and RunFiles, what a run writes); the set-up (processes
with DDP from the RANK environment variable, global-batch draws and loss means,
synchronised BatchNorm, data, model, optimizer, resume: `setup` gives a Session); the
loop (learning rate, the schedule's batches, one optimizer step, epochs: `train`); the
command line. A run directory holds config.json, log.jsonl, last.pt and best.pt; a new
run never writes into a folder holding a run's checkpoints (--resume or --overwrite),
and a resume with another config is refused. Checkpoints store the model's resolved
arguments (eval.RunSpec), which rebuild it.
"""
import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import eval as ev
import rgbx


# ----------------------------------------------------------------------------
# Configuration: Config, its command line, and `resolve`, which fills what the command
# line leaves open from the method's recipe (rgbx) and the dataset
# ----------------------------------------------------------------------------

BACKBONES = [f'swin-{s}' for s in rgbx.SWIN_PRESETS] + [f'vit-{s}' for s in rgbx.VIT_PRESETS]
X_MODALITIES = sorted({x for p in data.PRESETS.values() for x in p.modalities})
# Fields a resumed run may change with --allow-changes: they decide what is logged,
# saved, evaluated or where files are found, not what a step computes (device, tf32 and
# compile: only its float rounding; pretrained: the frozen weights are checked by
# fingerprint; data_root: the files are checked to be the same number of samples).
HARMLESS_CHANGES = ('data_root', 'pretrained', 'save_every', 'eval_every', 'log_every', 'save_full', 'nonfinite',
                    'device', 'tf32', 'compile', 'tensorboard')


def flag(default, help, choices=None):
    """A Config field with its command-line help (and choices)."""
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class Config:
    """A run's configuration: every field is a flag (`batch_size` -> --batch-size).
    None (and '' for the backbone) = the method's recipe for the dataset, filled by
    `resolve`, so that every real value, 0 included, is taken as given."""
    # data
    dataset: str = flag('demo', "dataset preset (demo: built-in synthetic RGB-D, no download)", list(data.PRESETS))
    data_root: str = flag('', "dataset folder ('' = the preset's place, e.g. datasets/NYUDepthv2)")
    x_modality: str = flag('', "X modality ('' = the dataset's default: nyudv2 hha, mfnet thermal, ...)",
                           [''] + X_MODALITIES)
    split: str = flag('train', "the training split (a name in the data root, or a split file); "
                               "demo: 'fit' holds out the 'val' scenes")
    # model
    method: str = flag('early_fusion', "the method", list(rgbx.METHODS))
    backbone: str = flag('', "the backbone ('' = the method's paper backbone, swin-base / vit-base; "
                             "on the demo its nano size)", [''] + BACKBONES)
    pretrained: str = flag('', "official pretrained backbone file (ktb, gopt: required; 'none' trains them "
                               "from random weights on purpose)")
    opts: str = flag('', "method options key=value,... e.g. 'mmst=false,adapter_ranks=8:8:8:8' "
                         "(--list-opts lists them)")
    # optimisation; None = the method's recipe for the dataset
    epochs: Optional[int] = flag(None, "epochs (default: the recipe's; with --max-steps alone: as "
                                       "many as its steps take)")
    batch_size: Optional[int] = flag(None, "batch per process; the global batch is batch x processes x grad-accum "
                                           "(default: the recipe's)")
    lr: Optional[float] = flag(None, "AdamW learning rate (default: the recipe's)")
    weight_decay: Optional[float] = flag(None, "AdamW weight decay (default: the recipe's)")
    warmup_epochs: Optional[float] = flag(None, "linear warm-up from 0.1 x lr (default: the "
                                                "recipe's); a warm-up as long as the run or longer "
                                                "is kept, and the run says which share of --lr it "
                                                "reaches")
    schedule: Optional[str] = flag(None, "learning-rate decay after the warm-up (default: the recipe's, else poly)",
                                   ['poly', 'cosine'])
    beta2: Optional[float] = flag(None, "AdamW beta2 (default: the recipe's, else 0.999)")
    crop: Optional[str] = flag(None, "training crop HxW (default: the dataset's)")
    grad_accum: Optional[int] = flag(None, "micro-batches per optimizer step (default: 1, or what reaches the "
                                           "recipe's global batch, e.g. gopt's 64)")
    augment: Optional[str] = flag(None, "full = the joint augmentation, crop = the random crop only "
                                        "(default: the recipe's, else full)", ['full', 'crop'])
    max_steps: Optional[int] = flag(None, "stop after this many optimizer steps (default: all "
                                          "epochs); with --epochs too, the run stops at whichever "
                                          "comes first (said at the start)")
    # system
    device: str = flag('', "cpu, cuda or cuda:N ('' = cuda if available, else cpu)")
    amp: str = flag('none', "mixed precision: bf16 (CPU or CUDA), fp16 (CUDA, with a gradient scaler)",
                    ['none', 'bf16', 'fp16'])
    tf32: bool = flag(True, "on CUDA, TF32 tensor cores for float32 matrix products and convolutions (--no-tf32: "
                            "true float32, as the parity checks use)")
    compile: bool = flag(False, "torch.compile the model (after its DDP wrapper)")
    workers: Optional[int] = flag(None, "data-loading processes, kept for the whole run (default: 0 on CPU, where "
                                        "the model takes the cores; on CUDA this process's share of the cores less "
                                        "one, at most 8)")
    seed: int = flag(3407, "seed of the initialisation, the sample order and the augmentation")
    # run
    out_dir: str = flag('', "run folder ('' = runs/<dataset>-<method>-<backbone>)")
    resume: bool = flag(False, "continue the run in --out-dir where it stopped (refused if the config differs)")
    allow_changes: bool = flag(False, "with --resume: accept changes to the settings that do not change what a "
                                      "step computes (" + ', '.join('--' + k.replace('_', '-') for k in
                                      HARMLESS_CHANGES) + ")")
    overwrite: bool = flag(False, "start afresh in an --out-dir that holds a run (its files are replaced once the "
                                  "new run has started)")
    save_every: int = flag(0, "also save last.pt every N steps (0: at the end of each epoch only)")
    eval_every: int = flag(1, "evaluate every N epochs (0: never)")
    log_every: int = flag(10, "a progress line every N steps")
    save_full: bool = flag(False, "also store the frozen weights in the checkpoints")
    nonfinite: str = flag('stop', "on a non-finite loss: stop, or skip the step (at most 5% of the steps)",
                          ['stop', 'skip'])
    tensorboard: bool = flag(False, "also write TensorBoard event files into --out-dir (needs the "
                                    "tensorboard package; curves.png is drawn from log.jsonl in "
                                    "any case)")


RUN_ONLY = ('resume', 'allow_changes', 'overwrite', 'out_dir', 'workers')  # say how to run, not what: never compared
# design choice: a run may skip at most 5% of its steps (at least 1) under --nonfinite skip; a diverged run
# (lr 1e9 skipped 63 of 64) then stops instead of "finishing" on the few steps it took
MAX_SKIPPED = 0.05
RETIRED = ('sync_bn',)  # fields of older configs that no longer act (BatchNorm is always synchronised under DDP)
# (field, lowest allowed value, whether the lowest is allowed itself)
RANGES = (('epochs', 1, True), ('batch_size', 1, True), ('lr', 0, False), ('weight_decay', 0, True),
          ('warmup_epochs', 0, True), ('grad_accum', 1, True), ('max_steps', 1, True), ('workers', 0, True),
          ('seed', 0, True), ('save_every', 0, True), ('eval_every', 0, True), ('log_every', 1, True))
MAX_SEED = 2 ** 32 - 1  # numpy's seeds
RECIPE_FIELDS = ('epochs', 'lr', 'weight_decay', 'batch_size', 'warmup_epochs', 'schedule', 'beta2', 'augment')


def parser():
    """argparse built from the Config fields, each with its help, default and choices."""
    p = data.OneLineParser(description=__doc__.split('\n')[0], epilog="Methods and their recipes: README.md and docs/; "
                                "options of a method: python train.py --method NAME --list-opts")
    for f in fields(Config):
        meta = f.metadata
        opt = '--' + f.name.replace('_', '-')
        shown = '' if f.default is None or f.default == '' or f.type is bool else f" (default: {f.default})"
        if f.type is bool:  # off by default: --flag; on by default: --flag / --no-flag
            p.add_argument(opt, action=argparse.BooleanOptionalAction if f.default else 'store_true',
                           default=f.default, help=meta['help'])
        else:
            p.add_argument(opt, type=flag_type(f.type), default=f.default, help=meta['help'].replace('%', '%%') + shown,
                           choices=meta['choices'], metavar=None if meta['choices'] is None else
                           '{' + ','.join(c or "''" for c in meta['choices']) + '}')
    p.add_argument('--list-opts', action='store_true', help="print the options of --method (on --backbone) with "
                                                            "their defaults and types, and exit")
    return p


def parse_config(argv=None):
    """The Config of a command line, resolved (`resolve`); --list-opts prints the options and exits."""
    p = parser()
    args = vars(p.parse_args(data.dash_values(argv, ('--crop',))))
    if args.pop('list_opts'):
        ignored = [n for n, v in args.items()  # it trains nothing: a flag beside it would be ignored
                   if n not in ('method', 'backbone', 'dataset') and v != p.get_default(n)]
        if ignored:
            raise ValueError(f"--list-opts prints the options of --method on --backbone and trains "
                             f"nothing: drop --{ignored[0].replace('_', '-')}")
        print(list_opts(args['method'], args['backbone'] or default_backbone(args['method'], args['dataset'])))
        sys.exit(0)
    return resolve(Config(**args))


def flag_type(t):
    """The argparse type of a field: int, float or str (Optional[int] -> int)."""
    return next((a for a in typing.get_args(t) if a is not type(None)), t)


def default_backbone(method, dataset):
    """The backbone of `method`'s paper (swin-base / vit-base); on the generated demo its nano size."""
    return rgbx.paper_backbone(method).replace('-base', '-nano' if data.get_preset(dataset).generated else '-base')


def list_opts(method, backbone):
    """The options of `method` on `backbone`: per option a line with its name, type, default
    (where it comes from), choices or range, and a line saying what it is."""
    lines = [f"options of {method} on {backbone} (--opts key=value,...; lists as a:b:c):"]
    for f, default in rgbx.option_fields(method, backbone):
        kind = rgbx.option_kind(f).__name__
        meta = f.metadata
        shown = f"default {default!r}" + (f" ({meta['none']})" if default is None and meta['none'] else '') \
            + (f", {meta['default_from']}" if meta['default_from'] else '')
        takes = f"  one of {'|'.join(meta['choices'])}" if meta['choices'] else ''
        if meta['range']:
            low, high, low_open, high_open = meta['range']
            takes = f"  in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        lines.append(f"  {f.name:18s} {'ints a:b:c' if kind == 'list' else kind:10s} {shown}{takes}")
        lines.append(f"      {meta['meaning']}")
    return '\n'.join(lines)


def config_from_dict(d, source):
    """A Config from a saved dict (config.json, a checkpoint's 'config'), naming unknown fields."""
    d = {k: v for k, v in d.items() if k not in RETIRED}
    unknown = sorted(set(d) - {f.name for f in fields(Config)})
    if unknown:
        raise ValueError(f"{source} has config fields this code does not know: {unknown}; "
                         f"use the version of the code that wrote it")
    if d.get('max_steps') == 0:  # written when 0 meant "all epochs" (now None)
        d = dict(d, max_steps=None)
    return Config(**d)


def resolve(cfg):
    """Fill what `cfg` leaves open (None, and '' for the backbone) from the method's
    recipe for the dataset (rgbx.recipe) and the dataset's own settings, and check
    every field, raising a one-line error naming the flag. Returns `cfg` (resolving
    twice changes nothing)."""
    preset = data.get_preset(cfg.dataset)
    rgbx.method_spec(cfg.method)
    cfg.backbone = cfg.backbone or default_backbone(cfg.method, cfg.dataset)
    run = ev.run_spec(cfg.method, cfg.backbone, cfg.dataset, cfg.x_modality, cfg.opts)
    recipe = rgbx.recipe(cfg.method, cfg.dataset, run.model_args['options'])
    given = {k: v for k, v in asdict(recipe).items() if k in RECIPE_FIELDS and v is not None}
    fill = {**dict(batch_size=4, warmup_epochs=10, schedule='poly', beta2=0.999, augment='full'), **preset.defaults,
            **given}  # the method's recipe over the dataset's own settings (the demo's) over the trainer's
    for k, v in fill.items():
        if vars(cfg)[k] is None and not (k == 'epochs' and cfg.max_steps is not None):  # its length
            setattr(cfg, k, v)
    if (cfg.epochs is None and cfg.max_steps is None) or cfg.lr is None or cfg.weight_decay is None:
        raise ValueError(f"{cfg.method} has no recipe for {cfg.dataset}: pass --epochs, --lr and --weight-decay")
    if cfg.grad_accum is None:  # a recipe's global batch (GoPT: 64) is reached by accumulation
        per_step = cfg.batch_size * int(os.environ.get('WORLD_SIZE', 1))
        cfg.grad_accum = max(1, recipe.global_batch // per_step) if recipe.global_batch else 1
    cfg.crop = '%dx%d' % (ev.parse_size(cfg.crop, '--crop') if cfg.crop else preset.crop)
    if cfg.workers is None:
        cfg.workers = default_workers(ev.check_device(cfg.device))
    check_fields(cfg)
    if cfg.data_root and preset.generated:
        raise ValueError(f"--data-root: the {cfg.dataset} data is generated in memory and reads no folder; drop it")
    if cfg.pretrained not in ('', 'none') and not os.path.isfile(cfg.pretrained):
        raise ValueError(f"--pretrained {cfg.pretrained}: " + ("a folder; pass the .pth file in it"
                         if os.path.isdir(cfg.pretrained) else "no such file"))
    if recipe.frozen_backbone and not cfg.pretrained:
        raise ValueError(f"{cfg.method} adapts a frozen pretrained backbone: pass --pretrained FILE "
                         f"(see README, 'Pretrained files'), or --pretrained none to train it from scratch on purpose")
    if not cfg.out_dir:
        cfg.out_dir = os.path.join('runs', f'{cfg.dataset}-{cfg.method}-{cfg.backbone}')
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out-dir {cfg.out_dir} is a file, not a folder: pass a folder")
    if cfg.tensorboard and importlib.util.find_spec('tensorboard') is None:
        raise ValueError("--tensorboard writes TensorBoard's event files, which needs the "
                         "tensorboard package: pip install tensorboard (curves.png is drawn "
                         "without it)")
    split_file = cfg.split if cfg.split.endswith('.txt') else ''
    inputs = [('--pretrained', cfg.pretrained if cfg.pretrained != 'none' else ''),
              ('--data-root', cfg.data_root), ('--split', split_file)]
    data.check_output('--out-dir', cfg.out_dir, inputs, folder=True, own_run=cfg.out_dir,
                      writes=data.RUN_FILES)
    return cfg


def default_workers(device):
    """Loader processes: 0 on CPU (the model's threads take the cores, data.loader); on CUDA
    the cores of this process's share of the machine (torchrun: LOCAL_WORLD_SIZE processes)
    less one for the main process, at most 8."""
    if device.type != 'cuda':
        return 0
    return max(0, min(8, data.affine_cores() // int(os.environ.get('LOCAL_WORLD_SIZE', 1)) - 1))


def check_fields(cfg):
    """Raise a one-line error naming the flag of any field out of its range or choices."""
    for f in fields(Config):
        v = vars(cfg)[f.name]
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, not {v}")
    for name, low, inclusive in RANGES:
        v = vars(cfg)[name]
        if v is not None and (v < low or (v == low and not inclusive)):
            raise ValueError(f"--{name.replace('_', '-')} must be {'>=' if inclusive else '>'} {low}, not {v}")
    if cfg.seed > MAX_SEED:
        raise ValueError(f"--seed must be <= {MAX_SEED} (numpy's seeds), not {cfg.seed}")
    for f in fields(Config):
        choices = f.metadata['choices']
        if choices and vars(cfg)[f.name] not in choices:
            raise ValueError(f"--{f.name.replace('_', '-')} takes {'|'.join(c or repr(c) for c in choices)}, "
                             f"not {vars(cfg)[f.name]!r}")
    ev.check_device(cfg.device)
    if cfg.amp == 'fp16' and ev.check_device(cfg.device).type != 'cuda':
        raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    if not 0 < cfg.beta2 < 1:
        raise ValueError(f"--beta2 must be in (0, 1), not {cfg.beta2}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")
    if cfg.allow_changes and not cfg.resume:
        raise ValueError("--allow-changes only acts with --resume")


def run_spec(cfg):
    """The eval.RunSpec of a resolved config: what its checkpoints store to rebuild the model."""
    return ev.run_spec(cfg.method, cfg.backbone, cfg.dataset, cfg.x_modality, cfg.opts, cfg.pretrained, cfg.data_root,
                     cfg.crop, cfg.seed)


def build_model(cfg):
    """The model of a resolved config, with its pretrained file loaded (rgbx.build_model). A
    training checkpoint of this script that does not fit (only a MaskMentor pre-training run
    feeds its fine-tuning) is said as such, in place of the list of its keys."""
    pretrained = None if cfg.pretrained in ('', 'none') else cfg.pretrained
    try:
        return run_spec(cfg).build(pretrained)
    except ValueError:
        ckpt = rgbx.read_checkpoint(pretrained) if pretrained else None
        if not (isinstance(ckpt, dict) and {'model', 'config', 'step'} <= set(ckpt)):
            raise
        c = ckpt['config']
        folder = os.path.dirname(pretrained) or '.'  # --resume reads the folder's last.pt
        resume = (f", continue its run with --resume --out-dir {folder}"
                  if os.path.isfile(os.path.join(folder, 'last.pt')) else '')
        raise ValueError(f"--pretrained {pretrained} is a training checkpoint of train.py (a "
                         f"{c.get('method')} {c.get('backbone')} run on {c.get('dataset')}, step "
                         f"{ckpt['step']}), not a backbone file for {cfg.method} {cfg.backbone}: "
                         f"evaluate it with `python eval.py --checkpoint {pretrained}`{resume}; "
                         f"a new run starts from an "
                         f"official backbone file (README, 'Pretrained files')") from None


def resume_changes(saved, cfg, allow, source):
    """Check that a resumed run's config `cfg` is the saved one: a one-line error listing
    every differing field (run value -> now); with `allow`, the HARMLESS_CHANGES pass.
    Returns the accepted changes as text ('' when none)."""
    saved, now = asdict(config_from_dict(saved, source)), asdict(cfg)
    changed = {k: (saved[k], now[k]) for k in now if k not in RUN_ONLY and saved[k] != now[k]}
    refused = {k: v for k, v in changed.items() if not (allow and k in HARMLESS_CHANGES)}
    text = lambda d: ', '.join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in d.items())
    if refused:
        weights = [k for k in refused if k not in HARMLESS_CHANGES]
        flags = lambda ks: ', '.join('--' + k.replace('_', '-') for k in ks)
        raise ValueError(f"--resume: the config differs from the run in {source}: {text(refused)}. "
                         + (f"{flags(weights)} change what is trained: pass the run's values (its config.json) or "
                            f"start a new run in another --out-dir" if weights else '')
                         + ('; ' if weights and len(weights) < len(refused) else '')
                         + (f"--allow-changes accepts {flags(k for k in refused if k in HARMLESS_CHANGES)}"
                            if len(weights) < len(refused) else ''))
    return text(changed)


# ----------------------------------------------------------------------------
# The run folder, one guard: the lock, --resume / --overwrite, atomic writes, log trimming
# and what a run writes (RunFiles); nothing of another run is ever overwritten
# ----------------------------------------------------------------------------

RUN_FILES = data.RUN_FILES  # what a run writes into its folder


class RunLock:
    """An exclusive lock on a run folder while a run writes it (rank 0): an advisory
    lock (fcntl.flock) on `<folder>/.lock`, which the OS releases when the process ends
    in any way, so a killed run leaves no lock behind. A second run into the same
    folder is refused with a one-line error. `release` unlocks and removes the file,
    and the folder too when this run created it and left nothing in it."""

    def __init__(self, folder):
        self.folder, self.created = folder, not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, '.lock')
        self.file = open(self.path, 'a+')
        try:
            import fcntl  # POSIX
        except ImportError:
            print(f"note: this OS has no fcntl: {folder} is not locked against a second run", file=sys.stderr)
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or 'unknown'
            self.file.close()
            raise ValueError(f"{folder} is being written by another run (process {holder}): wait for it to end, "
                             f"or pass another --out-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self):
        if self.file.closed:
            return
        os.remove(self.path)
        self.file.close()  # closing releases the lock
        if self.created and not os.listdir(self.folder):
            os.rmdir(self.folder)


def check_out_dir(cfg, master, say):
    """Before anything is written: a folder holding a run's checkpoint is continued
    (--resume) or replaced (--overwrite), never overwritten silently; a folder whose
    config.json or log.jsonl is not a run's is never written. Rank 0 removes stale
    temporary files. Returns the run files an --overwrite will replace."""
    held = [n for n in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, n))]
    if os.path.exists(os.path.join(cfg.out_dir, 'config.json')):
        try:
            with open(os.path.join(cfg.out_dir, 'config.json')) as f:
                config_from_dict(json.load(f), 'config.json')
        except (ValueError, TypeError, AttributeError, OSError):
            raise ValueError(f"{cfg.out_dir} holds a config.json that is not a run's of train.py: its files are "
                             f"not replaced; pass another --out-dir") from None
    elif 'log.jsonl' in held:
        raise ValueError(f"{cfg.out_dir} holds a log.jsonl but no run config: its files are not replaced; "
                         f"pass another --out-dir")
    if held and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{cfg.out_dir} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                         f"another --out-dir, or --overwrite to replace it")
    if master:
        stale = remove_stale_tmp(cfg.out_dir)
        if stale:
            say(f"removed {len(stale)} temporary file(s) of killed runs: {', '.join(stale)}")
    return held if cfg.overwrite else []


REPLACED = '.replaced'  # where --overwrite keeps the old run's files until the new run saves its first checkpoint


def set_old_run_aside(cfg, held, say):
    """--overwrite, once the new run is set up (config, data, every file, model): the old
    run's files move to <out-dir>/.replaced/ (an older set there goes). RunFiles.checkpoint
    deletes them once the new run has saved its first checkpoint; `restore_old_run` moves
    them back when the new run stops before; after a kill they stay there."""
    if not held:
        return
    aside = os.path.join(cfg.out_dir, REPLACED)
    shutil.rmtree(aside, ignore_errors=True)
    os.makedirs(aside)
    for n in held:
        os.replace(os.path.join(cfg.out_dir, n), os.path.join(aside, n))
    say(f"--overwrite: the run in {cfg.out_dir} ({', '.join(held)}) is kept in {REPLACED}/ until this run saves "
        f"its first checkpoint")


def restore_old_run(out_dir, say):
    """Move the files an --overwrite set aside back (the new run stopped before its first checkpoint)."""
    aside = os.path.join(out_dir, REPLACED)
    if not os.path.isdir(aside):
        return
    for n in os.listdir(aside):
        os.replace(os.path.join(aside, n), os.path.join(out_dir, n))
    os.rmdir(aside)
    say(f"the run this one was to replace is back in {out_dir}")


def save_checkpoint(obj, path):
    """Write atomically: temporary file, flush + fsync, rename, fsync the folder.
    A crash at any moment leaves either the old file or the new one, never a torn one;
    a failed write removes its temporary file, and a full disk raises data.DiskFull naming `path`."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with data.disk_full_names(path), open(tmp, 'wb') as f:
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


class NonFiniteLoss(RuntimeError):
    pass


def tensorboard_writer(folder, step):
    """--tensorboard: a SummaryWriter on `folder`; a resumed run drops the events after `step`."""
    from torch.utils.tensorboard import SummaryWriter  # the tensorboard package: optional
    return SummaryWriter(folder, purge_step=step or None)


def plot_log(log_path, png_path, size=(480, 160)):
    """curves.png of a run: the training loss, the learning rate and each evaluation's mIoU
    over the steps, one panel each, from its log.jsonl, drawn with pillow; written atomically."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    series = [('training loss', [(r['step'], r['loss']) for r in records if 'loss' in r]),
              ('learning rate', [(r['step'], r['lr']) for r in records if 'lr' in r]),
              ('test mIoU', [(r['step'], r['eval']['miou']) for r in records if 'eval' in r])]
    series = [(name, pts) for name, pts in series if pts]
    w, h = size
    font = ImageFont.load_default()
    img = Image.new('RGB', (w, h * max(1, len(series))), 'white')
    draw = ImageDraw.Draw(img)
    last = max((p[0] for _, pts in series for p in pts), default=1)
    for i, (name, pts) in enumerate(series):
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        box = (60, i * h + 20, w - 10, (i + 1) * h - 20)  # the plot area: left, top, right, bottom
        xy = [(box[0] + (box[2] - box[0]) * step / max(last, 1),
               box[3] - (box[3] - box[1]) * (v - lo) / ((hi - lo) or 1)) for step, v in pts]
        draw.rectangle(box, outline=(160, 160, 160))
        if len(xy) > 1:
            draw.line(xy, fill=(31, 119, 180), width=2)
        else:  # one point: a dot
            (x, y), = xy
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(31, 119, 180))
        ev.words(draw, (box[0], i * h + 4), f"{name} over steps 0..{last}", font)
        draw.text((2, box[1]), f"{hi:.3g}", fill='black')
        draw.text((2, box[3] - 10), f"{lo:.3g}", fill='black')
    tmp = f"{png_path}.tmp.{os.getpid()}"
    with data.disk_full_names(png_path):
        img.save(tmp, format='PNG')
    os.replace(tmp, png_path)


class RunFiles:
    """What a run writes to its folder (rank 0): config.json, the log.jsonl records and
    the progress line, and the checkpoints, which hold every rank's RNG state and
    never non-finite weights. Without a pretrained file the frozen weights are random
    and exist nowhere else: checkpoints then hold them too."""

    def __init__(self, *, cfg, run, model, optimizer, scaler, fingerprint, world, master, step, train_samples,
                 device):
        self.cfg, self.run, self.model, self.optimizer, self.scaler = cfg, run, model, optimizer, scaler
        self.device = device
        self.train_samples = train_samples
        self.fingerprint, self.world, self.master = fingerprint, world, master
        self.last, self.best = os.path.join(cfg.out_dir, 'last.pt'), os.path.join(cfg.out_dir, 'best.pt')
        self.log = None
        self.log_path = os.path.join(cfg.out_dir, 'log.jsonl')
        if master:
            config_path = os.path.join(cfg.out_dir, 'config.json')
            with data.disk_full_names(config_path), open(config_path, 'w') as f:
                json.dump(asdict(cfg), f, indent=2)
            self.log = open(self.log_path, 'a' if cfg.resume else 'w')
        self.board = tensorboard_writer(cfg.out_dir, step) if master and cfg.tensorboard else None
        self.t0 = self.t_last = time.time()
        self.step_at_t = self.step_at_start = step

    def say(self, *text):
        if self.master:
            print(*text)

    def record(self, **record):
        if self.master:
            with data.disk_full_names(self.log_path):
                self.log.write(json.dumps(record) + '\n')
                self.log.flush()
        if self.board is not None:  # the log's numbers, as TensorBoard scalars
            scalars = {f'train/{k}': record[k] for k in ('loss', 'lr') if k in record}
            scalars.update({f'eval/{k}': v for k, v in record.get('eval', {}).items()})
            for tag, value in scalars.items():
                self.board.add_scalar(tag, value, record['step'])

    def plot(self):
        """Draw curves.png from log.jsonl (rank 0)."""
        if self.master:
            plot_log(self.log_path, os.path.join(self.cfg.out_dir, 'curves.png'))

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
        """Save a checkpoint at `step` (`skipped`: the SkippedSteps, read)."""
        full = self.cfg.save_full or self.cfg.pretrained in ('', 'none')
        state = self.model.state_dict() if full else rgbx.trainable_state(self.model)
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLoss(f"the weights are non-finite at step {step} ({len(bad)} tensors, the first {bad[0]!r}) "
                                f"and were not saved; {self.last_good()}. Lower --lr or try --amp none")
        states = [rng_state(self.device)]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, rng_state(self.device))
        if self.master:
            save_checkpoint(dict(model=state, optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                                 step=step, best=best, skipped=skipped.skipped, overflows=skipped.overflows,
                                 config=asdict(self.cfg), rng=states,
                                 run=asdict(self.run), train_samples=self.train_samples,
                                 frozen_sha1=self.fingerprint, evaluation=evaluation), path)
            shutil.rmtree(os.path.join(self.cfg.out_dir, REPLACED), ignore_errors=True)  # --overwrite: now replaced

    def close(self):
        if self.master:
            with data.disk_full_names(self.log_path):
                self.log.close()
        if self.board is not None:
            self.board.close()


# ----------------------------------------------------------------------------
# Set-up: processes (DDP from the RANK environment variable), data, model, optimizer,
# resume; data parallelism computes what one process computes at the global batch
# ----------------------------------------------------------------------------

# Process `rank` of `world` holds samples rank*B .. (rank+1)*B - 1 of the global batch
# of world*B (ResumableSampler deals them so). The models draw their per-sample random
# numbers and take their loss means through rgbx.draw_policy(); under DDP the loop runs
# inside `rgbx.draws(GlobalBatch(device))`: every process draws for the global batch
# (the generators, seeded alike, stay in step) and keeps its rows, and loss means divide
# by the global count. BatchNorm uses the global batch's statistics (sync_batchnorm).

class GlobalBatch(rgbx.DrawPolicy):
    """rgbx.DrawPolicy under torch.distributed: draws for the global batch, cut to this
    process's rows; counts summed and values gathered over the processes."""

    def __init__(self, device):
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), device

    def draw(self, draw, n, dim=0):
        """draw(world * n), rows rank*n .. (rank+1)*n - 1 along `dim`."""
        return draw(self.world * n).narrow(dim, self.rank * n, n)

    def count(self, n):
        """The global count / world (at least 1): DDP averages the processes' gradients,
        which then equal the gradient of the global batch's mean. A collective: every
        process computes the same losses."""
        total = torch.as_tensor(n, dtype=torch.float64, device=self.device).reshape(1)
        dist.all_reduce(total)  # on the device: nothing is read on the host
        return (total.clamp(min=1) / self.world).float().reshape(())

    def gather(self, values):
        """The 1-D `values` of every process, concatenated in rank order (no gradient). Every
        process passes as many values (the loop's batches are whole and of one crop size),
        so no size is exchanged and nothing is read on the host."""
        parts = [torch.empty_like(values) for _ in range(self.world)]
        dist.all_gather(parts, values.detach().contiguous())
        return torch.cat(parts)


class AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the processes; its gradient is the sum of theirs."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        return AllReduceSum.forward(ctx, grad)


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with the statistics of the global batch in training: the per-channel
    sum and sum of squared deviations are summed over the processes (AllReduceSum), as
    in torch.nn.SyncBatchNorm, which has CUDA kernels only; this one runs on any backend
    (gloo on CPU). In eval mode and in one process it is BatchNorm2d."""

    def forward(self, x):
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        xf = x.float()  # statistics in float32 also under autocast
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)  # pixels per channel
        dist.all_reduce(count)
        mean = AllReduceSum.apply(xf.sum((0, 2, 3))) / count  # (C,)
        var = AllReduceSum.apply(((xf - mean[:, None, None]) ** 2).sum((0, 2, 3))) / count  # (C,), biased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * count / (count - 1).clamp(min=1), m)
        out = (xf - mean[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
        return (out * self.weight[:, None, None] + self.bias[:, None, None] if self.affine else out).to(x.dtype)


def sync_batchnorm(module, device):
    """`module` with every BatchNorm2d made to use the global batch's statistics under
    data parallelism: torch.nn.SyncBatchNorm on CUDA, SyncBatchNorm above elsewhere
    (same parameters, buffers and names)."""
    if device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(child.weight.device if child.affine else device)
            synced.load_state_dict(child.state_dict())
            synced.train(child.training).requires_grad_(child.affine and child.weight.requires_grad)
            setattr(module, name, synced)
        else:
            sync_batchnorm(child, device)
    return module


class ResumableSampler(torch.utils.data.Sampler):
    """A seeded shuffle per epoch (set_epoch), dealt in global batches of world x
    batch: rank r takes rows r*batch .. (r+1)*batch - 1 of each, so the processes
    together see exactly one process's batches at the global batch size (GlobalBatch);
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
        """(epoch, index) pairs: the dataset draws the sample's augmentation of that epoch."""
        return iter([(self.epoch, i) for i in self.indices()[self.start:]])

    def __len__(self):
        return len(self.indices()) - self.start


def make_loaders(cfg, run, rank, world, device):
    """The training set, its resumable sampler and loader, and the test loader. The
    augmentation randomness is a function of (seed, epoch, sample), so the order of
    workers and a resume cannot change it."""
    train_set = data.build_dataset(cfg.dataset, cfg.data_root, cfg.split, run.x_modality,
                                   crop=ev.parse_size(cfg.crop, '--crop'), train=True, seed=cfg.seed,
                                   x_standardised=run.x_standardised, augment=cfg.augment == 'full')
    test_set = data.build_dataset(cfg.dataset, cfg.data_root, 'test', run.x_modality,
                                  x_standardised=run.x_standardised)
    sampler = ResumableSampler(len(train_set), cfg.seed, rank, world, cfg.batch_size)
    if len(sampler.indices()) < cfg.batch_size * cfg.grad_accum:
        recipe = rgbx.recipe(cfg.method, cfg.dataset, run.model_args['options']).global_batch
        raise ValueError(f"{len(train_set)} training samples cannot fill one step of {world} x {cfg.batch_size} x "
                         f"{cfg.grad_accum} (processes x batch x accumulation)"
                         + (f"; --grad-accum {cfg.grad_accum} comes from {cfg.method}'s recipe (a global batch of "
                            f"{recipe}): pass a smaller --grad-accum or --batch-size" if recipe else ''))
    pin = device.type == 'cuda'
    loader = data.loader(train_set, cfg.batch_size, cfg.workers, sampler, drop_last=True, pin=pin, persistent=True)
    return train_set, sampler, loader, data.shard_loader(test_set, rank, world, cfg.workers, pin)


def prepare_model(cfg, model, device, world, say):
    """The model `cfg` names (or `model`, an rgbx.RGBXModel) on `device`, its BatchNorms
    synchronised across processes under DDP; prints the config and the parameter counts.
    Returns (model, counts)."""
    model = (model if model is not None else build_model(cfg)).to(device)
    if not isinstance(model, rgbx.RGBXModel):
        raise TypeError(f"train takes an rgbx.RGBXModel (the interface it trains through), not {type(model).__name__}")
    if world > 1:  # BatchNorm on the global batch's statistics (docs/distributed.md)
        model = sync_batchnorm(model, device)
    counts = model.param_counts()
    say(f"config: {json.dumps(asdict(cfg))}")
    parts = {k: v for k, v in counts.items() if k not in ('trainable', 'total')}
    say(f"parameters: trainable {counts['trainable']:,} of {counts['total']:,} total" + (f" | {parts}" if parts else ''))
    return model, counts


def rng_state(device):
    """Every random state a step draws from, in weights_only-loadable types: Python's,
    numpy's, torch's CPU generator and, on CUDA, the generator of the GPU this process
    computes on (the only one it draws from)."""
    np_state = np.random.get_state()
    return dict(python=[random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
                torch=torch.get_rng_state(),
                cuda=[torch.cuda.get_rng_state(device)] if device.type == 'cuda' else [])


def set_rng_state(s, device, say=print):
    """Restore `rng_state`'s states. CUDA: this device's generator takes the saved one;
    checkpoints written before hold one state per GPU visible to each process, of
    which this device's index is the one it drew from (a run resumed with fewer GPUs
    visible takes its device's; a CPU run's states leave the CUDA generator seeded)."""
    random.setstate((s['python'][0], tuple(s['python'][1]), s['python'][2]))
    np.random.set_state((s['numpy'][0], s['numpy'][1].numpy().astype(np.uint32), *s['numpy'][2:]))
    torch.set_rng_state(s['torch'])
    if device.type == 'cuda' and s['cuda']:
        index = 0 if len(s['cuda']) == 1 else device.index or 0
        if index >= len(s['cuda']):
            say(f"note: the checkpoint holds no CUDA random state for {device}: its CUDA draws "
                f"start from the seed")
            return
        torch.cuda.set_rng_state(s['cuda'][index], device)


def resume_checkpoint(cfg):
    """--resume: the run's last.pt, read before anything is built, refused unless it
    was trained with this config (resume_changes)."""
    last_path = os.path.join(cfg.out_dir, 'last.pt')
    if not os.path.exists(last_path):
        aside = os.path.join(cfg.out_dir, REPLACED)
        raise FileNotFoundError(f"--resume: no checkpoint {last_path}; " + (
            f"the run an interrupted --overwrite replaced is in {aside}: move its files back to continue it, or "
            if os.path.isdir(aside) else "") + "start afresh without --resume (with --overwrite if the folder "
            "holds a run) or set another --out-dir")
    ckpt = ev.load_run_checkpoint(last_path)
    ckpt['changes'] = resume_changes(ckpt['config'], cfg, cfg.allow_changes, last_path)
    return ckpt


def restore(ckpt, cfg, model, optimizer, scaler, fingerprint, rank, device, say):
    """Load a resume checkpoint into model, optimizer, scaler and the RNGs, after
    checking the frozen weights; log.jsonl is cut back to its step. Returns (step, best, SkippedSteps)."""
    last_path = os.path.join(cfg.out_dir, 'last.pt')
    if ckpt['frozen_sha1'] != fingerprint:
        raise ValueError(f"{last_path} was trained on other frozen weights than those of --pretrained "
                         f"{cfg.pretrained!r}: pass the run's file, {ckpt['config']['pretrained']!r}")
    rgbx.load_trained(model, ev.trained_weights(ckpt), last_path)
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0], device, say)
    if rank == 0:
        trim_log(os.path.join(cfg.out_dir, 'log.jsonl'), ckpt['step'])
    say(f"resumed from {last_path} at step {ckpt['step']}"
        + (f", with the changes {ckpt['changes']}" if ckpt['changes'] else ''))
    return ckpt['step'], ckpt['best'], SkippedSteps(device, ckpt['skipped'], ckpt.get('overflows', 0))


@dataclass(kw_only=True)
class Session:
    """Everything a training run holds while it runs (`setup` builds it, by keyword)."""
    cfg: Config
    run: ev.RunSpec
    rank: int
    world: int
    device: torch.device
    raw: rgbx.RGBXModel  # the model itself; `model` is what is called (compiled, DDP-wrapped)
    model: nn.Module
    counts: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_set: torch.utils.data.Dataset
    sampler: ResumableSampler
    loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    files: 'RunFiles'
    steps_per_epoch: int
    total: int
    warmup: int
    step: int
    best: float
    skipped: 'SkippedSteps'
    policy: rgbx.DrawPolicy | None  # the draws of the loop: GlobalBatch under DDP, None: the default


def setup(cfg, model=None):
    """Processes, the run folder, seeds, data, model, optimizer, schedule and resume: a Session."""
    rank, world, device = ev.setup_distributed(cfg.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    ev.check_cpu_bf16(cfg.amp, device, say)
    ev.check_cuda_bf16(cfg.amp, device)
    if device.type == 'cuda':
        ev.set_tf32(cfg.tf32)
    run = run_spec(cfg)
    resumed = resume_checkpoint(cfg) if cfg.resume else None
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    train_set, sampler, loader, test_loader = make_loaders(cfg, run, rank, world, device)
    say(f"threads: {torch.get_num_threads()} ({data.core_budget()[1]})")
    held = check_out_dir(cfg, rank == 0, say)
    for dataset in (train_set, test_loader.dataset.dataset):  # every file of both splits, before the first step
        data.check_files(dataset, cfg.workers, say, rank, world)
    raw, counts = prepare_model(cfg, model, device, world, say)
    fingerprint = rgbx.frozen_fingerprint(raw)
    optimizer = torch.optim.AdamW(raw.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2),
                                  fused=device.type == 'cuda')
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == 'fp16')
    steps_per_epoch = len(sampler.indices()) // (cfg.batch_size * cfg.grad_accum)
    total = run_length(cfg, steps_per_epoch, say)
    if resumed and resumed.get('train_samples', len(train_set)) != len(train_set):
        raise ValueError(f"--resume: the training split now has {len(train_set)} samples, the run had "
                         f"{resumed['train_samples']} (its schedule, warm-up and epochs depend on them): pass the "
                         f"run's --data-root ({resumed['config']['data_root']!r}) or start a new run")
    step, best, skipped = (restore(resumed, cfg, raw, optimizer, scaler, fingerprint, rank, device, say) if resumed
                           else (0, -1.0, SkippedSteps(device)))
    if rank == 0:
        set_old_run_aside(cfg, held, say)
    files = RunFiles(cfg=cfg, run=run, model=raw, optimizer=optimizer, scaler=scaler, fingerprint=fingerprint,
                     world=world, master=rank == 0, step=step, train_samples=len(train_set), device=device)
    model = raw
    if world > 1:
        model = DDP(raw, device_ids=[device.index] if device.type == 'cuda' else None,
                    find_unused_parameters=raw.find_unused_parameters)
    if cfg.compile:  # the DDP model compiled: its gradient all-reduces overlap the compiled backward
        model = torch.compile(model)
    policy = GlobalBatch(device) if world > 1 else None
    return Session(cfg=cfg, run=run, rank=rank, world=world, device=device, raw=raw, model=model, counts=counts,
                   optimizer=optimizer, scaler=scaler, train_set=train_set, sampler=sampler, loader=loader,
                   test_loader=test_loader, files=files, steps_per_epoch=steps_per_epoch, total=total,
                   warmup=int(cfg.warmup_epochs * steps_per_epoch), step=step, best=best, skipped=skipped,
                   policy=policy)


def run_length(cfg, steps_per_epoch, say):
    """The run's optimizer steps: --max-steps, or --epochs, or with both whichever ends first;
    a warm-up at least as long as the run is said with the share of --lr it reaches."""
    lengths = [n for n in (cfg.max_steps, cfg.epochs and cfg.epochs * steps_per_epoch) if n]
    total = min(lengths)
    if len(set(lengths)) > 1:
        say(f"note: --epochs {cfg.epochs} ({cfg.epochs * steps_per_epoch} steps) and --max-steps "
            f"{cfg.max_steps}: the run stops at whichever comes first, after {total} steps")
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if warmup >= total:
        reach = lr_at(total - 1, total, warmup, 1.0)
        say(f"note: the warm-up ({cfg.warmup_epochs:g} epochs, {warmup} steps) is as long as the "
            f"run ({total} steps) or longer: the learning rate reaches {reach:.0%} of --lr "
            f"{cfg.lr:g} at the last step; pass --warmup-epochs below "
            f"{total / steps_per_epoch:.3g} for a full warm-up")
    return total


# ----------------------------------------------------------------------------
# The loop: the learning rate, the batches of the schedule, one optimizer step, epochs
# ----------------------------------------------------------------------------

def lr_at(step, total, warmup, base, warmup_ratio=0.1, power=0.9, schedule='poly'):
    """Linear warm-up from warmup_ratio * base to base over `warmup` steps, then to 0
    at `total` by poly decay base * (1 - t)^power or cosine decay base * (1 + cos(pi t)) / 2
    (a pure function of the step)."""
    if step < warmup:
        return base * (warmup_ratio + (1 - warmup_ratio) * step / warmup)
    t = (step - warmup) / max(1, total - warmup)
    return base * (1 + math.cos(math.pi * t)) / 2 if schedule == 'cosine' else base * (1 - t) ** power


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


def train_step(model, batches, optimizer, scaler, cfg, device, world, lr, step_inputs):
    """One optimizer step over cfg.grad_accum micro-batches (gradient sync on the
    last one only); a non-finite loss or gradient leaves the weights untouched
    (`apply_step`). `step_inputs`: what the model's schedule gives this step's forward.
    Returns the mean loss over micro-batches and processes, `apply_step`'s flags, and
    the last micro-batch's (rgb, x); all on the device, nothing read on the host."""
    for g in optimizer.param_groups:
        g['lr'] = lr
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        rgb, x, label = (t.to(device, non_blocking=device.type == 'cuda') for t in next(batches))
        sync = world == 1 or micro == cfg.grad_accum - 1  # DDP all-reduces the last one's gradients
        with nullcontext() if sync else model.no_sync(), ev.autocast(cfg.amp, device):
            loss, _ = model(rgb, x, label, **step_inputs)
            loss = loss / cfg.grad_accum
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= world
    flags = apply_step(optimizer, scaler, loss_sum)
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, flags, (rgb, x)


def apply_step(optimizer, scaler, loss):
    """The optimizer step unless the loss or a gradient is non-finite, decided where
    the numbers are: fused AdamW (CUDA) takes the flag as `found_inf` (GradScaler's
    protocol) and skips on the device, no host read; the CPU optimizer's step reads the
    flag (a CPU tensor: no device to wait for). fp16: the gradients are unscaled first,
    and the scaler lowers its scale after an overflow. Returns booleans on the device:
    (the loss is non-finite, the gradients alone overflowed)."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    grads = [p.grad for g in optimizer.param_groups for p in g['params'] if p.grad is not None]
    # the sum of the gradients' norms: inf or nan if any element is
    norm = torch.stack(torch._foreach_norm(grads)).sum() if grads else loss.new_zeros(())
    loss_bad, grad_bad = ~torch.isfinite(loss), ~torch.isfinite(norm)
    bad = loss_bad | grad_bad
    if optimizer.defaults.get('fused'):
        optimizer.found_inf = bad.float()
        optimizer.step()
        del optimizer.found_inf
    elif not bad:
        optimizer.step()
    if scaler.is_enabled():
        scaler.update()
    return loss_bad, grad_bad & ~loss_bad


class SkippedSteps:
    """The steps `apply_step` skipped, counted on the device and read on the host every
    log step and before every checkpoint (one read per log step, none per step):
    non-finite losses (and gradients), which --nonfinite governs, and under fp16 the
    gradient scaler's overflows, which are part of its scale search."""

    def __init__(self, device, skipped=0, overflows=0):
        self.skipped, self.overflows = skipped, overflows  # read so far
        # (non-finite, overflows) since the last read, and the first non-finite step since then
        self.new = torch.zeros(2, dtype=torch.long, device=device)
        self.first = torch.zeros((), dtype=torch.long, device=device)

    def add(self, flags, step):
        loss_bad, overflow = flags
        self.first = torch.where(loss_bad & (self.new[0] == 0), step, self.first)
        self.new += torch.stack([loss_bad, overflow]).long()

    def read(self, cfg, step, total, files):
        """Take the counts to the host; a non-finite step ends the run unless --nonfinite
        skip allows it (at most MAX_SKIPPED of the run's steps, at least 1)."""
        (new, overflows), first = self.new.tolist(), int(self.first)
        self.new.zero_()
        self.overflows += overflows
        if not new:
            return
        self.skipped += new
        limit = max(1, int(MAX_SKIPPED * total))
        if cfg.nonfinite == 'skip' and self.skipped <= limit:
            more = f" and {new - 1} more" if new > 1 else ''
            files.say(f"step {step}: non-finite loss at step {first}{more}, skipped ({self.skipped} so far, "
                      f"at most {limit})")
            return
        capped = (f", {self.skipped} of {step} steps skipped, more than --nonfinite skip allows ({limit}: "
                  f"{MAX_SKIPPED:.0%} of {total})" if cfg.nonfinite == 'skip' else '')
        raise NonFiniteLoss(f"non-finite loss at step {first}{capped}; {files.last_good()}. Lower --lr, try "
                            f"--amp none" + ('' if cfg.nonfinite == 'skip' else ', or pass --nonfinite skip'))


def train(cfg, model=None, on_step=None):
    """Run training as `cfg` says; `model` replaces the one `cfg` would build (tests),
    `on_step(step)` is called after each optimizer step and its checkpoint.
    Returns a dict with the last evaluation and the run's figures."""
    cfg = resolve(cfg)
    lock = RunLock(cfg.out_dir) if int(os.environ.get('RANK', 0)) == 0 else None  # before anything is read or written
    try:
        s = setup(cfg, model)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    result = {}
    try:
        with rgbx.draws(s.policy):
            while s.step < s.total:
                result = run_epoch(s, on_step) or result
    except BaseException:
        if s.rank == 0:
            restore_old_run(cfg.out_dir, s.files.say)
        raise
    finally:
        s.files.close()
        if lock is not None:
            lock.release()
    skipped = f" ({s.skipped.skipped} skipped: non-finite loss)" if cfg.nonfinite == 'skip' else ''
    overflows = f" ({s.skipped.overflows} skipped by the fp16 gradient scaler)" if cfg.amp == 'fp16' else ''
    s.files.say(f"done: {s.total} steps{skipped}{overflows}"
                + f" ({s.step - s.files.step_at_start} in this session, {time.time() - s.files.t0:.0f}s)"
                + (f", best mIoU {100 * s.best:.2f}" if s.best >= 0 else "") + f", checkpoints in {cfg.out_dir}")
    return dict(result, best=s.best, step=s.step, skipped=s.skipped.skipped, overflows=s.skipped.overflows,
                params=s.counts)


def batch_of(s, step):
    """The index of the batch global step `step` trains on (the model's schedule)."""
    return s.raw.schedule(step, s.total)[0]


def run_epoch(s, on_step):
    """Optimizer steps from s.step to the end of its epoch (or of the run), each epoch
    ended by an evaluation and the checkpoints. Returns the epoch's evaluation, if any."""
    cfg = s.cfg
    epoch, done_in_epoch = divmod(s.step, s.steps_per_epoch)
    of = lambda step: batch_of(s, step)
    per_draw = cfg.batch_size * cfg.grad_accum
    held = None  # (batch index, its micro-batches): the batch the current step trains on
    if not fresh_batch(of, s.step):  # resumed inside a cycle of steps on one batch: draw its batch again
        first = cycle_start(of, s.step)
        first_epoch = first // s.steps_per_epoch
        s.sampler.set_epoch(first_epoch, draws(of, first_epoch * s.steps_per_epoch, first) * per_draw)
        again = iter(s.loader)
        held = (of(s.step), [next(again) for _ in range(cfg.grad_accum)])
    s.sampler.set_epoch(epoch, draws(of, epoch * s.steps_per_epoch, s.step) * per_draw)
    s.model.train()
    batches, evaluation = iter(s.loader), None
    for _ in range(done_in_epoch, s.steps_per_epoch):
        lr = lr_at(s.step, s.total, s.warmup, cfg.lr, schedule=cfg.schedule)
        index, step_inputs = s.raw.schedule(s.step, s.total)
        if held is None or held[0] != index:
            held = (index, [next(batches) for _ in range(cfg.grad_accum)])
        loss, flags, inputs = train_step(s.model, iter(held[1]), s.optimizer, s.scaler, cfg, s.device, s.world, lr,
                                         step_inputs)
        s.step += 1
        s.skipped.add(flags, s.step)
        log = s.step % cfg.log_every == 0 or s.step == s.total
        end_of_epoch = s.step % s.steps_per_epoch == 0 or s.step == s.total
        save = cfg.save_every and s.step % cfg.save_every == 0 and not end_of_epoch
        if log or save or end_of_epoch:  # the host reads the step's numbers here only
            s.skipped.read(cfg, s.step, s.total, s.files)
        if log:
            health = s.raw.diagnostics(*inputs)  # GoPT: gopt_diagnostics on the last micro-batch
            s.files.progress(s.step, s.total, epoch, loss.item(), lr, **(dict(diagnostics=health) if health else {}))
        if save:
            s.files.checkpoint(s.files.last, s.step, s.best, s.skipped)
        if end_of_epoch:
            evaluation = end_epoch(s, epoch)
        if on_step is not None:
            on_step(s.step)
        if s.step >= s.total:
            break
    return evaluation


def end_epoch(s, epoch):
    """The evaluation of an epoch's end (every --eval-every epochs and at the end of the
    run; none in pre-training) and its checkpoints. Returns the evaluation, if any."""
    cfg, evaluation = s.cfg, None
    if not s.raw.pretraining and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or s.step == s.total):
        preset = data.get_preset(cfg.dataset)
        evaluation = ev.metrics(ev.evaluate(s.raw, s.test_loader, preset.num_classes, s.device, amp=cfg.amp))
        s.files.say(ev.format_metrics(evaluation, preset.class_names, short=True))
        s.files.record(step=s.step, epoch=epoch + 1, eval={k: v for k, v in evaluation.items() if k != 'iou'})
        if evaluation['miou'] > s.best:
            s.best = evaluation['miou']
            s.files.checkpoint(s.files.best, s.step, s.best, s.skipped, evaluation)
    s.files.checkpoint(s.files.last, s.step, s.best, s.skipped, evaluation)
    s.files.plot()
    return evaluation


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler, torchrun stopping its processes): ended as Ctrl-C."""


def on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None):
    ev.keep_freed_memory()  # this process keeps the memory freed tensors leave (RGBX_KEEP_FREED_MEMORY=0: not)
    cfg = None
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        cfg = parse_config(argv)
        train(cfg)
    except (ValueError, OSError, NonFiniteLoss, rgbx.CheckpointError) as e:
        sys.exit(f"error: {ev.error_line(e)}")
    except KeyboardInterrupt as e:
        last = cfg is not None and os.path.exists(os.path.join(cfg.out_dir, 'last.pt'))
        how = 'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'
        sys.exit(f"error: {how}; " + ("continue from the last checkpoint with --resume" if last else
                                      "no checkpoint was saved: nothing to resume"))
    except RuntimeError as e:
        if not ev.peer_failed(e):
            raise
        sys.exit(f"error: {ev.PEER_FAILED}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
