"""Small-scale reproduction study: each paper's central claims, tested on CPU on rendered
rooms (README, "Results"; docs/study.md: the size, the budget and the wall time).

    python -m study.pretraining    # first: MaskMentor pre-training's lr and budget
    python -m study.run            # the whole study, from the repository's root (hours on 2 cores)
    python -m study.run --quick    # every step with a few iterations, one seed, 8 evaluation scenes
    python -m study.run --tables   # rewrite the reports and the README's claims table from the results.json
    python -m study.run --decide --seeds 2   # GoPT's open decisions on held-out training scenes (study/gopt-validation)

Set-up, mirroring the papers at toy scale (`rooms144`: indoor RGB-D scenes rendered at
144 x 192 with NYU-40 labels, HHA and depth; see data.RoomsDataset and docs/rooms.md):
1. foundation: a Swin-nano and a ViT-nano trained with RGB only (full fine-tuning,
   method rgb_only), the stand-ins for the ImageNet / MAE files the papers start
   from; their backbones are saved in the official key format and loaded with
   --pretrained like those files. One foundation per seed.
2. validation (`validation_plan`, never the test scenes): on `rooms144-val` (the last 160
   training scenes held out, foundations trained on the other 640), each method family's
   fine-tuning lr from the grid LRS (the same lr for all its rows, FAMILIES) and
   MaskMentor fine-tuning's depth scaling (per image as MultiMAE, or the dataset's mean /
   std); MaskMentor's pre-training lr and budget come from its curves against trivial
   baselines (`python -m study.pretraining`, study/maskmentor-pretraining).
3. adaptation, the same number of steps for every method, from the foundation of the same
   seed: early fusion with full fine-tuning (the papers' reference line), KTB with and
   without MMST (Swin) on HHA and on depth, and with its X patch embedding without the
   LayerNorm (a control), GoPT hard / soft / 2 and 1 prompters / w/o ACP / the other
   reading of ACP (rgbx.ACP_READINGS; its claims name the reading), VPT-shallow and
   VPT-deep at the paper's budget ratios to GoPT, the frozen foundation with a trained head
   and no prompts (ViT), MaskMentor (X = depth) fine-tuning after no pre-training, MIM,
   M2IM, M2IM + STTP, and STTP's schedule without its token loss (the control that isolates
   STTP's token loss).
4. evaluation of the final weights on the test scenes, once, with RGB + X, RGB only and
   X only (eval.py's --modality: the missing input is zeroed); GoPT's models also with
   rgbx.gopt_diagnostics. Each claim is judged by one rule (`verdict`).

Every run is a train.py configuration (its command line is in its train.log); runs go to
--out (default runs/study), each with result.json as it ends, so an interrupted study
resumes where it stopped (finished runs are read back). Reports: study/results.md (+ .png,
.json, rewritten as each run ends), study/validation/, and the README's claims table
between its `study:claims` markers.
"""
import contextlib
import json
import multiprocessing
import os
import platform
import re
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import rgbx
import train
from eval import evaluate, metrics
from study import pretraining
from study.common import DATASET, HERE, MM, MM_PRE, MM_X, VALIDATION, check_outputs

# foundations: the dataset's recipe (rooms: batch 8, lr 1e-3, 1 warm-up epoch, poly);
# every adaptation: STEPS of batch BATCH at its family's lr (docs/study.md: the budget)
STEPS, FOUNDATION_STEPS, BATCH = 400, 800, 4
QUICK_SCENES = 8  # --quick: evaluated on the first 8 scenes of each split only
VALIDATION_SEEDS = 2
LRS = (3e-4, 1e-3, 3e-3)  # each family's fine-tuning lr grid (the papers: KTB 4e-4, GoPT 4e-5, MaskMentor 3e-5)
README = os.path.join(os.path.dirname(HERE), 'README.md')
MARKERS = ('<!-- study:claims:start -->', '<!-- study:claims:end -->')

# design choice: the papers' sizes scaled to the nano widths. Swin-nano is Swin-B / 4 (C = 32): KTB's
# C/8, C/16 ranks scale by themselves, its heads 512 / 256 become 128 / 64, the baselines' head 64.
# ViT-nano has D = 64: GoPT's d_p of 55 (of 768) would not be low rank, 16 is; heads 64 wide.
HEAD = 'head_dim=64'
KTB = 'fused_head_dim=128,aux_head_dim=64'
# GoPT and its variants start Psi from the head of their foundation (decided on rooms144-val, see DECISIONS);
# GoPT's rows state their reading of ACP (eq. 11-14): rgbx's default, aligned (round 3 on rooms144-val, as
# on demo128-val before), and one row with the other reading
GOPT_BASE = 'prompt_dim=16,head_dim=64,head_from=foundation'
ACP, ACP_OTHER = rgbx.ACP_DEFAULT, next(r for r in rgbx.ACP_READINGS if r != rgbx.ACP_DEFAULT)
GOPT = GOPT_BASE + f',acp={ACP}'
# the VPT variants at the paper's budget ratios to GoPT (Table 4, ViT-B: VPT-shallow 0.54M / 0.97M = 0.56,
# VPT-deep 3.39M / 0.97M = 3.5): at nano GoPT trains 27.6k without its head, VPT-shallow with rank 48
# 15.5k (0.56), VPT-deep with rank 187 96.2k (3.5); ViT-nano's 4 layers cannot give both with one rank
VPT_SHALLOW = 'variant=vpt_shallow,vpt_rank=48,head_dim=64,head_from=foundation'
VPT_DEEP = 'variant=vpt_deep,vpt_rank=187,head_dim=64,head_from=foundation'

# X of a row when not the dataset's default (rooms: HHA): depth, for KTB's rows on depth and for
# MaskMentor (MultiMAE's depth)
DEPTH, MM_DATA = dict(x_modality='depth'), dict(x_modality=MM_X)
# the prompt-tuning rows train with the random crop only: GoPT's "no data expansion", and the
# decision on rooms144-val (R2 + no augmentation 19.8 +- 0.2 against R2's 18.4 +- 0.0, 2 of 2 seeds)
CROP = dict(augment='crop')
# (name, family, method, options, what its backbone comes from[, train.Config fields]);
# 'pretrain:<name>' = that MaskMentor pre-training run of the same seed
CONDITIONS = [
    ('Swin foundation (RGB)', 'swin', 'rgb_only', HEAD, None),
    ('Swin early fusion, full FT', 'swin', 'early_fusion', HEAD, 'foundation'),
    ('KTB', 'swin', 'ktb', KTB, 'foundation'),
    ('KTB w/o MMST', 'swin', 'ktb', KTB + ',mmst=false', 'foundation'),
    # the control for KTB's X stream: its patch embedding without the LayerNorm that, at the release's zero
    # bias, makes a flat X patch embed alike whatever its value (rgbx.KTB, x_embed_norm)
    ('KTB, X embedding w/o LayerNorm', 'swin', 'ktb', KTB + ',x_embed_norm=false', 'foundation'),
    ('KTB w/o MMST, X embedding w/o LayerNorm', 'swin', 'ktb', KTB + ',mmst=false,x_embed_norm=false', 'foundation'),
    # the release's X embedding on the other X: depth, one channel with structure inside every patch
    ('KTB, X = depth', 'swin', 'ktb', KTB, 'foundation', DEPTH),
    ('KTB w/o MMST, X = depth', 'swin', 'ktb', KTB + ',mmst=false', 'foundation', DEPTH),
    ('ViT foundation (RGB)', 'vit', 'rgb_only', HEAD, None),
    ('ViT early fusion, full FT', 'vit', 'early_fusion', HEAD, 'foundation'),
    ('Frozen foundation + head, no prompts', 'vit', 'gopt', 'variant=head_only,head_dim=64,head_from=foundation',
     'foundation', CROP),
    ('GoPT (hard, 4 prompters)', 'vit', 'gopt', GOPT, 'foundation', CROP),
    ('GoPT soft', 'vit', 'gopt', GOPT + ',assignment=soft', 'foundation', CROP),
    ('GoPT 2 prompters', 'vit', 'gopt', GOPT + ',interval=2', 'foundation', CROP),
    ('GoPT 1 prompter', 'vit', 'gopt', GOPT + ',interval=4', 'foundation', CROP),
    ('VPT-shallow', 'vit', 'gopt', VPT_SHALLOW, 'foundation', CROP),
    ('VPT-deep', 'vit', 'gopt', VPT_DEEP, 'foundation', CROP),
    ('GoPT w/o ACP', 'vit', 'gopt', GOPT_BASE + ',variant=no_acp', 'foundation', CROP),  # X by place: see docs/gopt.md
    (f'GoPT (hard, 4 prompters), ACP {ACP_OTHER}', 'vit', 'gopt', GOPT_BASE + f',acp={ACP_OTHER}', 'foundation', CROP),
    ('MIM pre-training', 'vit', 'maskmentor', MM_PRE + ',warmup=1', 'foundation', MM_DATA),  # MIM only
    ('M2IM pre-training', 'vit', 'maskmentor', MM_PRE + ',teacher_iters=0,token_weight=0',
     'foundation', MM_DATA),
    ('M2IM + STTP pre-training', 'vit', 'maskmentor', MM_PRE, 'foundation', MM_DATA),
    # the control: STTP's warm-up, 3:1 teacher / student schedule and batches, without the token loss
    ('STTP schedule w/o token loss', 'vit', 'maskmentor', MM_PRE + ',token_weight=0', 'foundation',
     MM_DATA),
    ('MaskMentor FT, no pre-training', 'vit', 'maskmentor', MM, 'foundation', MM_DATA),
    ('MaskMentor FT after MIM', 'vit', 'maskmentor', MM, 'pretrain:MIM pre-training', MM_DATA),
    ('MaskMentor FT after M2IM', 'vit', 'maskmentor', MM, 'pretrain:M2IM pre-training', MM_DATA),
    ('MaskMentor FT after M2IM + STTP', 'vit', 'maskmentor', MM,
     'pretrain:M2IM + STTP pre-training', MM_DATA),
    ('MaskMentor FT after STTP schedule w/o token loss', 'vit', 'maskmentor', MM,
     'pretrain:STTP schedule w/o token loss', MM_DATA),
]

# each claim: (paper, what it says, condition A, condition B, the inputs it is on: A - B is their mean mIoU's)
CLAIMS = [
    ('KTB', 'RGB+X beats the RGB foundation', 'KTB', 'Swin foundation (RGB)', ('both',)),
    ('KTB', 'MMST raises the single-modality columns (supp. Fig. 1, Table 5)', 'KTB', 'KTB w/o MMST', ('rgb', 'x')),
    ('KTB', 'close to full fine-tuning at a fraction of the parameters', 'KTB', 'Swin early fusion, full FT', ('both',)),
    ('KTB', 'RGB+X beats the RGB foundation (X embedding w/o LayerNorm)', 'KTB, X embedding w/o LayerNorm',
     'Swin foundation (RGB)', ('both',)),
    ('KTB', 'MMST raises the single-modality columns (X embedding w/o LayerNorm)', 'KTB, X embedding w/o LayerNorm',
     'KTB w/o MMST, X embedding w/o LayerNorm', ('rgb', 'x')),
    ('KTB', 'RGB+X beats the RGB foundation (X = depth)', 'KTB, X = depth', 'Swin foundation (RGB)',
     ('both',)),
    ('KTB', 'MMST raises the single-modality columns (X = depth)', 'KTB, X = depth',
     'KTB w/o MMST, X = depth', ('rgb', 'x')),
    # GoPT's claims, each with the reading of ACP its GoPT rows use
    ('GoPT', f'beats the foundation (ACP {ACP})', 'GoPT (hard, 4 prompters)', 'ViT foundation (RGB)', ('both',)),
    ('GoPT', f'the prompts help: beats the frozen foundation + trained head (ACP {ACP})', 'GoPT (hard, 4 prompters)',
     'Frozen foundation + head, no prompts', ('both',)),
    ('GoPT', f'beats VPT-shallow (Table 4; ACP {ACP})', 'GoPT (hard, 4 prompters)', 'VPT-shallow', ('both',)),
    ('GoPT', f'beats VPT-deep (Table 4; ACP {ACP})', 'GoPT (hard, 4 prompters)', 'VPT-deep', ('both',)),
    ('GoPT', f'ACP adds to CUP: beats w/o ACP (Table 4; ACP {ACP})', 'GoPT (hard, 4 prompters)', 'GoPT w/o ACP',
     ('both',)),
    ('GoPT', f'hard beats soft assignment (Fig. 7; ACP {ACP})', 'GoPT (hard, 4 prompters)', 'GoPT soft', ('both',)),
    ('GoPT', f'more prompters is better (Fig. 6): 4 vs 1 (ACP {ACP})', 'GoPT (hard, 4 prompters)', 'GoPT 1 prompter',
     ('both',)),
    ('GoPT', f'more prompters is better (Fig. 6): 2 vs 1 (ACP {ACP})', 'GoPT 2 prompters', 'GoPT 1 prompter',
     ('both',)),
    ('GoPT', f'beats VPT-shallow (Table 4; ACP {ACP_OTHER})', f'GoPT (hard, 4 prompters), ACP {ACP_OTHER}',
     'VPT-shallow', ('both',)),
    ('GoPT', f'beats VPT-deep (Table 4; ACP {ACP_OTHER})', f'GoPT (hard, 4 prompters), ACP {ACP_OTHER}', 'VPT-deep',
     ('both',)),
    ('GoPT', f'ACP adds to CUP: beats w/o ACP (Table 4; ACP {ACP_OTHER})', f'GoPT (hard, 4 prompters), ACP {ACP_OTHER}',
     'GoPT w/o ACP', ('both',)),
    ('MaskMentor', 'MIM pre-training helps (Table 3)', 'MaskMentor FT after MIM', 'MaskMentor FT, no pre-training', ('both', 'rgb', 'x')),
    ('MaskMentor', 'M2IM beats plain MIM (Table 3)', 'MaskMentor FT after M2IM', 'MaskMentor FT after MIM', ('both', 'rgb', 'x')),
    ('MaskMentor', 'STTP adds on top of M2IM (Table 3)', 'MaskMentor FT after M2IM + STTP', 'MaskMentor FT after M2IM', ('both', 'rgb', 'x')),
    ('MaskMentor', "STTP's token loss helps (control: its schedule without it)", 'MaskMentor FT after M2IM + STTP',
     'MaskMentor FT after STTP schedule w/o token loss', ('both', 'rgb', 'x')),
]
COLUMNS = (('both', 'RGB+X'), ('rgb', 'RGB only'), ('x', 'X only'))

# GoPT's decisions the paper leaves open (`--decide`, on the validation preset `rooms144-val`: 160
# of the training scenes held out, the foundation trained on the other 640; study/gopt-validation),
# never on the test scenes. Round 1: each switch flipped alone from the paper's xavier start with a
# fresh head; round 2: the two winners together (the defaults), then each remaining switch flipped
# alone from them. (name, options, extra train.Config fields besides the study's.) Rounds 1-2 read
# ACP literally (acp=literal); round 3: the reading of ACP (eq. 11-14, rgbx.GroupingPrompter), both
# from the round-2 defaults. The one round-2 switch that won by more than the seeds' spread, no
# augmentation, is the prompt-tuning rows' recipe (CROP).
R1 = 'prompt_dim=16,head_dim=64,identity=false,acp=literal'
R2 = GOPT_BASE + ',acp=literal'
DECISIONS = [
    ('R1: xavier start, fresh head', R1, {}),
    ('R1 + CUP attention plain (eq. 6 as written)', R1 + ',attention=plain', {}),
    ('R1 + class tokens x4 at init', R1 + ',class_scale=4.0', {}),
    ('R1 + aux tokens carried', R1 + ',carry_aux=true', {}),
    ('R1 + identity at init (up = 0)', 'prompt_dim=16,head_dim=64,identity=true,acp=literal', {}),
    ('R1 + head from the foundation', R1 + ',head_from=foundation', {}),
    ('R1 + no augmentation (random crop only)', R1, dict(augment='crop')),
    ('R1 + logits scaled by 1/sqrt(d_p)', R1 + ',scaled=true', {}),
    ('R2: identity start, head from the foundation', R2, {}),
    ('R2 + CUP attention plain (eq. 6 as written)', R2 + ',attention=plain', {}),
    ('R2 + class tokens x4 at init', R2 + ',class_scale=4.0', {}),
    ('R2 + logits scaled by 1/sqrt(d_p)', R2 + ',scaled=true', {}),
    ('R2 + no augmentation (random crop only)', R2, dict(augment='crop')),
    ('R3: R2 defaults, ACP literal', GOPT_BASE + ',acp=literal', {}),
    ('R3: R2 defaults, ACP aligned', GOPT_BASE + ',acp=aligned', {}),
]



# Each method family's fine-tuning lr, chosen on validation from LRS and the same for all its rows:
# (family, its rows, the rows its grid trains, the inputs its score averages: the ones its claims are on)
FAMILIES = [
    ('early fusion', ('Swin early fusion, full FT', 'ViT early fusion, full FT'),
     ('Swin early fusion, full FT', 'ViT early fusion, full FT'), ('both',)),
    ('KTB', tuple(c[0] for c in CONDITIONS if c[2] == 'ktb'), ('KTB',), ('both', 'rgb', 'x')),
    ('prompt tuning', tuple(c[0] for c in CONDITIONS if c[2] == 'gopt'), ('GoPT (hard, 4 prompters)',), ('both',)),
    ('MaskMentor fine-tuning', tuple(c[0] for c in CONDITIONS if c[2] == 'maskmentor' and 'stage=pretrain' not in c[3]),
     ('MaskMentor FT after M2IM + STTP',), ('both', 'rgb', 'x')),
]
# design choice, decided on validation with the MaskMentor family's lr: fine-tuning's depth as pre-training
# sees it (standardised per image, as MultiMAE fine-tunes) or as the dataset gives it (its mean / std)
DEPTH_SCALINGS = {True: 'per image', False: 'dataset mean / std'}


def family_of(name):
    """The FAMILIES entry a condition's lr comes from (None: a foundation or a pre-training)."""
    return next((f for f in FAMILIES if name in f[1]), None)


def conditions(decide=False):
    """The CONDITIONS, or with `decide` the ViT foundation and the DECISIONS, as (name,
    family, method, options, source, extra train.Config fields)."""
    rows = [(*c, {}) if len(c) == 5 else c for c in CONDITIONS]
    if decide:
        return [next(c for c in rows if c[0] == 'ViT foundation (RGB)')] + [
            (name, 'vit', 'gopt', opts, 'foundation', extra) for name, opts, extra in DECISIONS]
    return rows


def source_key(family, source, seed, prefix=''):
    """The key of the run a condition starts from (None: a foundation)."""
    if source is None:
        return None
    if source == 'foundation':
        return f"{prefix}{'Swin' if family == 'swin' else 'ViT'} foundation (RGB)/{seed}"
    return f"{prefix}{source[len('pretrain:'):]}/{seed}"


def run_config(name, method, family, opts, seed, dataset, steps, choices):
    """The train.Config fields of one run. `choices`: {'lr': {family: lr}, 'depth_standardize':
    bool, 'pretrain': {'lr', 'steps'}} (see `chosen`); None for a foundation or --decide."""
    config = dict(dataset=dataset, method=method, backbone=f'{family}-nano', opts=opts, seed=seed, max_steps=steps)
    if choices is None:
        return config
    config['batch_size'] = BATCH
    if 'stage=pretrain' in opts:  # MaskMentor pre-training: MaskMentor's recipe at the study's batch
        return dict(config, max_steps=choices['pretrain']['steps'], lr=choices['pretrain']['lr'])
    fam = family_of(name)
    if fam:
        config['lr'] = choices['lr'][fam[0]]
    if method == 'maskmentor':  # the study's common fine-tuning recipe (poly), as every adaptation
        config.update(opts=f"{opts},depth_standardize={str(choices['depth_standardize']).lower()}",
                      schedule='poly')
    return config


def plan(seeds, steps, foundation_steps, choices=None, decide=False, only=''):
    """Every run of the study: dicts with name, seed, key 'name/seed', need (the key of the
    run whose weights it starts from, None for a foundation), pretraining and the
    train.Config fields it sets. `choices` (`chosen`): the values chosen on validation;
    None plans only the foundations. `decide`: the GoPT decisions on the validation preset
    instead (see DECISIONS). `only`: a regular expression; just the conditions whose name it
    finds, and the runs they start from."""
    runs = []
    for seed in seeds:
        for name, family, method, opts, source, extra in conditions(decide):
            if source is not None and choices is None and not decide:
                continue
            need = source_key(family, source, seed)
            config = run_config(name, method, family, opts, seed, VALIDATION if decide else DATASET,
                                steps if need else foundation_steps, None if decide or not need else choices)
            runs.append(dict(name=name, seed=seed, key=f'{name}/{seed}', need=need, pretraining='stage=pretrain' in opts,
                             config={**config, **extra}))
    if only:
        runs = with_needs(runs, {r['key'] for r in runs if re.search(only, r['name'])})
    return runs


def with_needs(runs, keys):
    """The runs whose key is in `keys`, and every run they start from, directly or not (in
    the order of `runs`)."""
    keep = set(keys)
    while True:
        more = keep | {r['need'] for r in runs if r['key'] in keep and r['need']}
        if more == keep:
            return [r for r in runs if r['key'] in keep]
        keep = more


def validation_plan(seeds, steps, foundation_steps, pretrain):
    """The runs that choose each family's lr (LRS) and MaskMentor fine-tuning's depth scaling,
    on VALIDATION (never the test scenes): per seed the two foundations, MaskMentor's M2IM +
    STTP pre-training (`pretrain`: {'lr', 'steps'}), and every grid point of FAMILIES'
    grid rows, each run with its 'family', 'lr' and (MaskMentor) 'depth_standardize'."""
    spec = {c[0]: c for c in conditions()}
    runs = []
    for seed in seeds:
        for name in ('Swin foundation (RGB)', 'ViT foundation (RGB)', 'M2IM + STTP pre-training'):
            _, family, method, opts, source, extra = spec[name]
            need = source_key(family, source, seed, 'val: ')
            config = run_config(name, method, family, opts, seed, VALIDATION, foundation_steps if need is None else steps,
                                dict(pretrain=pretrain) if need else None)
            runs.append(dict(name=f'val: {name}', seed=seed, key=f'val: {name}/{seed}', need=need,
                             pretraining='stage=pretrain' in opts, config={**config, **extra}))
        for fam, _, grid_rows, _ in FAMILIES:
            for name in grid_rows:
                _, family, method, opts, source, extra = spec[name]
                for lr in LRS:
                    for scaling in (True, False) if method == 'maskmentor' else (None,):
                        label = f'val: {name}, lr {lr:g}' + (f', depth {DEPTH_SCALINGS[scaling]}' if scaling is not None else '')
                        config = {**run_config(name, method, family, opts, seed, VALIDATION, steps,
                                               dict(lr={fam: lr}, depth_standardize=scaling)),
                                  **extra}
                        runs.append(dict(name=label, seed=seed, key=f'{label}/{seed}',
                                         need=source_key(family, source, seed, 'val: '), pretraining=False, config=config,
                                         family=fam, lr=lr, **({} if scaling is None else {'depth_standardize': scaling})))
    return runs


def chosen(results):
    """The values chosen on validation from the grid runs in `results`: ({'lr': {family: lr},
    'depth_standardize': bool}, {family: {(lr, depth_standardize or None): score}}), a score
    being the mean over seeds and grid rows of the mean mIoU over the family's inputs."""
    scores = {}
    for fam, _, _, columns in FAMILIES:
        points = {}
        for r in results.values():
            if r.get('family') == fam:
                points.setdefault((r['lr'], r.get('depth_standardize')), []).append(np.mean([r[c] for c in columns]))
        scores[fam] = {k: float(np.mean(v)) for k, v in sorted(points.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))}
    best = {fam: max(s, key=s.get) for fam, s in scores.items()}
    return dict(lr={fam: b[0] for fam, b in best.items()},
                depth_standardize=best['MaskMentor fine-tuning'][1]), scores


def pretraining_choice(report=os.path.join(HERE, 'maskmentor-pretraining')):
    """MaskMentor pre-training's {'lr', 'steps'}, as study.pretraining chose them on validation
    scenes (its results.json); a missing report, or one measured on another validation preset
    or on a few of its scenes (--scenes), is an error naming the command that makes it."""
    path = os.path.join(report, 'results.json')
    run = (f"run `python -m study.pretraining` first (it chooses MaskMentor's pre-training lr and "
           f"budget on the validation scenes of {VALIDATION})")
    if not os.path.exists(path):
        raise SystemExit(f"study: {path} is missing: {run}")
    with open(path) as f:
        saved = {float(k): v for k, v in json.load(f).items()}
    measured = {v.get('dataset', 'demo128-val') for v in saved.values()}
    if measured != {VALIDATION}:
        raise SystemExit(f"study: {path} was measured on {', '.join(sorted(measured))}: {run}")
    if any(v.get('scenes') for v in saved.values()):
        raise SystemExit(f"study: {path} was measured on a few scenes only (--scenes): {run}")
    lr, steps = pretraining.choose(saved)[:2]
    return dict(lr=lr, steps=steps)


def folder(out, key):
    """The run folder of 'name/seed': 'KTB w/o MMST/0' -> out/KTB_w_o_MMST-0."""
    name, seed = key.rsplit('/', 1)
    return os.path.join(out, re.sub('[^A-Za-z0-9]+', '_', name.replace('+', 'plus')).strip('_') + f'-{seed}')


def backbone_file(out, key):
    """Where a run's weights are stored for the runs that start from it: the foundation's
    backbone in the official key format, a pre-training run's last checkpoint."""
    return os.path.join(folder(out, key), 'backbone.pth')


def execute(args):
    """Train one run, evaluate its final weights on the three inputs (on the first `scenes`
    of the split only, when > 0); returns (key, figures). Runs in a worker process with one
    thread (two runs share the two cores)."""
    run, out, scenes = args
    os.environ['OMP_NUM_THREADS'] = '1'  # data.loader keeps to it (it would give the process every core)
    torch.set_num_threads(1)
    config = dict(run['config'])
    if run['need']:  # 'head_from=foundation': Psi starts from the head of the foundation this run loads
        config['opts'] = config['opts'].replace('head_from=foundation',
                                                'head_from=' + os.path.join(folder(out, run['need']), 'last.pt'))
    cfg = train.resolve(train.Config(**config, pretrained=backbone_file(out, run['need']) if run['need'] else '',
                                     out_dir=folder(out, run['key']), workers=0, eval_every=0, log_every=50,
                                     overwrite=True))  # a run without result.json is redone
    preset = data.PRESETS[cfg.dataset]
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, 'train.log'), 'w') as log, contextlib.redirect_stdout(log):
        print('python train.py ' + ' '.join(f"--{k.replace('_', '-')} '{v}'" for k, v in asdict(cfg).items()
                                             if v != getattr(train.Config, k)))
        model = train.build_model(cfg)
        start, cpu = time.perf_counter(), time.process_time()
        report = train.train(cfg, model=model)
        seconds = time.perf_counter() - start
    result = dict(name=run['name'], seed=run['seed'], config=run['config'], trainable=report['params']['trainable'],
                  total=report['params']['total'], step_seconds=seconds / report['step'],
                  **{k: run[k] for k in ('family', 'lr', 'depth_standardize') if k in run})
    if run['pretraining']:  # its last checkpoint is what the fine-tuning runs load
        os.replace(os.path.join(cfg.out_dir, 'last.pt'), backbone_file(out, run['key']))
    else:
        spec = train.run_spec(cfg)
        test = data.build_dataset(cfg.dataset, '', 'test', spec.x_modality,
                                  x_standardised=spec.x_standardised)
        test = data.shard_loader(torch.utils.data.Subset(test, range(scenes or len(test))),
                                 batch_size=8)
        for modality, _ in COLUMNS:
            result[modality] = metrics(evaluate(model, test, preset.num_classes, torch.device('cpu'),
                                                modality=modality))['miou']
        if hasattr(model, 'diagnostics'):  # GoPT: how its prompters behave, on the first 8 evaluation scenes
            rgb, x, _ = next(iter(test))
            result['diagnostics'] = model.diagnostics(rgb, x)
        if run['need'] is None:  # a foundation: its backbone in the format of an official file, for load_pretrained
            train.save_checkpoint({'model': model.backbone.state_dict()}, backbone_file(out, run['key']))
    result['seconds'] = time.perf_counter() - start  # training and evaluation, one thread
    result['cpu_seconds'] = time.process_time() - cpu  # its wall time on a quiet machine
    result['cpu'] = machine()  # its times hold on this CPU (a study resumed elsewhere mixes CPUs)
    with open(os.path.join(cfg.out_dir, 'result.json'), 'w') as f:
        json.dump(result, f)
    return run['key'], result


def run_all(runs, out, jobs, scenes=0, on_result=None):
    """Each run starts as soon as the run it loads has finished, longest first, `jobs`
    at a time; finished runs (result.json present) are read back, not repeated. `scenes`:
    as `execute`'s; `on_result(key, result)` is called as each run ends."""
    results = {}
    for run in runs:
        done = os.path.join(folder(out, run['key']), 'result.json')
        if os.path.exists(done):
            with open(done) as f:
                results[run['key']] = json.load(f)
            if results[run['key']].get('config') != run['config']:
                raise ValueError(f"{done} was trained with {results[run['key']].get('config')}, not the planned "
                                 f"{run['config']}: give this study another --out, or delete that folder to redo it")
    pending = sorted((r for r in runs if r['key'] not in results),
                     key=lambda r: (-r['config']['max_steps'], r['config']['method'] not in ('ktb', 'maskmentor')))
    running = {}
    # spawn: no fork of a process that holds torch's threads
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context('spawn')) as pool:
        while pending or running:
            for run in [r for r in pending if r['need'] is None or r['need'] in results]:
                running[pool.submit(execute, (run, out, scenes))] = run
                pending.remove(run)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                key, result = future.result()
                del running[future]
                results[key] = result
                if on_result:
                    on_result(key, result)
                print(f"  {key}: " + ', '.join(f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)),
                      flush=True)
    return results


# ----------------------------------------------------------------------------
# Report: tables, claims, plot
# ----------------------------------------------------------------------------

DIAGNOSTICS = (('class_cos', 'class-token cosine'), ('cup_flips', 'CUP flips'), ('acp_flips', 'ACP flips'),
               ('cup_logit_std', 'CUP logit std'), ('prompt_spread', 'prompt spread'), ('locality', 'locality'),
               ('pred_change_patch', 'pred. change in patch'), ('pred_change_other', 'pred. change elsewhere'))


def summarise(results):
    """{condition: {'n', 'trainable', 'step_seconds', column: (mean, std, per-seed list), 'diagnostics':
    {key: mean over layers and seeds}}} in CONDITIONS (then DECISIONS) order."""
    table = {}
    for name in [c[0] for c in CONDITIONS] + [d[0] for d in DECISIONS]:
        rows = sorted((r for r in results.values() if r['name'] == name), key=lambda r: r['seed'])
        if not rows or name in table:
            continue
        entry = dict(n=len(rows), trainable=rows[0]['trainable'], total=rows[0]['total'],
                     step_seconds=float(np.mean([r['step_seconds'] for r in rows])))
        for column, _ in COLUMNS:
            if column in rows[0]:
                v = np.array([r[column] for r in rows])
                entry[column] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, v.tolist())
        diagnostics = [r['diagnostics'] for r in rows if r.get('diagnostics', {}).get('layers')]
        entry['diagnostics'] = {key: float(np.mean([np.mean(d[key]) for d in diagnostics]))
                                for key, _ in DIAGNOSTICS if diagnostics and key in diagnostics[0]}
        table[name] = entry
    return table


def claim_rows(results, untestable=None):
    """Per claim: the paired (same seed) differences A - B of the mean mIoU over the claim's
    inputs, the seeds' spread (the larger standard deviation of A's and B's score over the
    seeds) and the `verdict`. `untestable`: {paper: why} for claims this scale cannot test."""
    rows = []
    by = {(r['name'], r['seed']): r for r in results.values()}
    for paper, text, a, b, columns in CLAIMS:
        seeds = sorted({s for n, s in by if n == a} & {s for n, s in by if n == b})
        if not seeds:
            continue
        score = lambda name: np.array([np.mean([by[name, s][c] for c in columns]) for s in seeds])
        d = score(a) - score(b)
        spread = max(float(score(a).std(ddof=1)), float(score(b).std(ddof=1))) if len(seeds) > 1 else 0.0
        row = dict(paper=paper, claim=text, a=a, b=b, columns=columns, mean=float(d.mean()), low=float(d.min()),
                   high=float(d.max()), wins=int((d > 0).sum()), n=len(d), spread=spread)
        why = (untestable or {}).get(text)
        row['verdict'] = f'not testable at this scale: {why} (by the rule alone: {verdict(row)})' if why else verdict(row)
        rows.append(row)
    return rows


def verdict(row):
    """The one rule for every claim: 'held' when A beats B in every seed (at least 3) and
    the mean difference is larger than the seeds' spread; 'reversed' when B beats A that
    way; 'not held' otherwise (mixed, or within the spread)."""
    if row['n'] < 3:
        return 'not judged (fewer than 3 seeds)'
    if row['wins'] == row['n'] and row['mean'] > row['spread']:
        return 'held'
    if row['wins'] == 0 and -row['mean'] > row['spread']:
        return 'not held (reversed)'
    return 'not held'


def inputs_label(columns):
    return ' and '.join(dict(COLUMNS)[c] for c in columns) + (' (mean)' if len(columns) > 1 else '')


def markdown(table, claims, setup, scenes='the 64 test scenes'):
    pct = lambda m: f"{100 * m[0]:.1f} ± {100 * m[1]:.1f}"
    lines = [f"Set-up: {setup}. mIoU (%) on {scenes}, mean ± standard deviation over seeds, of "
             f"the final weights; a missing input is zeroed.", '',
             '| condition | RGB+X | RGB only | X only | trainable params | step (s) |', '|---|---|---|---|---|---|']
    for name, e in table.items():
        cells = [pct(e[c]) if c in e else '-' for c, _ in COLUMNS]
        lines.append(f"| {name} | {' | '.join(cells)} | {e['trainable'] / 1e3:.1f}k of {e['total'] / 1e3:.0f}k | "
                     f"{e['step_seconds']:.3f} |")
    healthy = {name: e['diagnostics'] for name, e in table.items() if e.get('diagnostics')}
    if healthy:
        lines += ['', "GoPT's prompters in the final models (`rgbx.gopt_diagnostics` on the first 8 evaluation "
                  "scenes, mean over prompters and seeds): the class tokens' mean pairwise cosine after CUP "
                  "(1 = one vector), the fraction of assignments one draw of Gumbel noise flips (CUP's g_m, "
                  "ACP's g_rgb,m), the std of CUP's logits over the groups (the noise's is 1.28), the "
                  "prompt's spread over the tokens relative to its norm (0 = one prompt per image), and, for a "
                  "change of the X input inside one patch only (the centre one), the prompt's locality (its "
                  "change at that token over its mean change at the other tokens: 1 = the X content reaches "
                  "the prompt without its place; 1e6 = nowhere else) and the fraction of the predicted pixels "
                  "that change in that patch and elsewhere.", '',
                  '| condition | ' + ' | '.join(label for _, label in DIAGNOSTICS) + ' |',
                  '|---|' + '---|' * len(DIAGNOSTICS)]
        for name, d in healthy.items():
            lines.append(f"| {name} | " + ' | '.join(f"{d[k]:.3g}" if k in d else '-' for k, _ in DIAGNOSTICS) + ' |')
    if not claims:
        return '\n'.join(lines) + '\n'
    lines += ['', 'Claims: A - B in mIoU points of the mean over the claim\'s inputs, paired by seed (the same '
              'foundation and data order); spread: the larger standard deviation over seeds of A and of B. ' + RULE, '',
              '| paper | claim | A | B | inputs | A - B: mean (min, max) | A > B in | spread | verdict |',
              '|---|---|---|---|---|---|---|---|---|']
    for c in claims:
        lines.append(f"| {c['paper']} | {c['claim']} | {c['a']} | {c['b']} | {inputs_label(c['columns'])} | "
                     f"{100 * c['mean']:+.1f} ({100 * c['low']:+.1f}, {100 * c['high']:+.1f}) | {c['wins']}/{c['n']} "
                     f"seeds | {100 * c['spread']:.1f} | {c['verdict']} |")
    return '\n'.join(lines) + '\n'


RULE = ("A claim is held when A beats B in every seed (at least 3) and the mean difference is larger than the "
        "seeds' spread; reversed when B beats A that way; not held otherwise.")


def readme_table(claims, saved):
    """The README's claims table (between MARKERS), from the study's results.json."""
    done, planned = saved['runs_done'], saved.get('runs_planned', saved['runs_done'])
    runs = f"{done} runs" + (f" of {planned} planned" if planned > done else '')
    lines = [MARKERS[0], f"<!-- written by `python -m study.run --tables` from study/results.json: edit neither -->", '',
             f"{saved['when']}, on `{saved.get('dataset', 'demo128')}`: {runs}, {saved['wall']}. "
             f"{RULE} The figure: A - B in mIoU points (mean over seeds, then its lowest and "
             f"highest seed).", '',
             '| paper | claim (A vs B) | inputs | A - B | A > B in | verdict |', '|---|---|---|---|---|---|']
    for c in claims:
        lines.append(f"| {c['paper']} | {c['claim']} | {inputs_label(c['columns'])} | {100 * c['mean']:+.1f} "
                     f"({100 * c['low']:+.1f}, {100 * c['high']:+.1f}) | {c['wins']}/{c['n']} | {c['verdict']} |")
    lines += ['', MARKERS[1]]
    return '\n'.join(lines)


def write_readme(claims, saved, path=README):
    """Replace the README's claims table between MARKERS; the rest of the README is left as it is."""
    with open(path) as f:
        text = f.read()
    if text.count(MARKERS[0]) != 1 or text.count(MARKERS[1]) != 1:
        raise SystemExit(f"study: {path} needs one {MARKERS[0]} and one {MARKERS[1]} line to hold the claims table")
    head, rest = text.split(MARKERS[0])
    tail = rest.split(MARKERS[1])[1]
    with open(path, 'w') as f:
        f.write(head + readme_table(claims, saved) + tail)


def plot(table, path):
    """Grouped bars (RGB+X, RGB only, X only) per condition with each seed as a dot; Pillow only."""
    names = [n for n, e in table.items() if 'both' in e]
    colours = ((70, 110, 200), (220, 90, 60), (90, 170, 90))
    W, H, left, bottom, top = 140 + 62 * len(names), 520, 60, 190, 30
    img = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(img)
    y = lambda v: H - bottom - v * (H - bottom - top)
    for t in range(0, 101, 20):
        d.line([(left, y(t / 100)), (W - 20, y(t / 100))], fill=(225, 225, 225))
        d.text((left - 28, y(t / 100) - 6), f"{t}", fill='black')
    d.text((8, top - 20), 'mIoU (%)', fill='black')
    for i, name in enumerate(names):
        x0 = left + 10 + 62 * i
        for j, (column, label) in enumerate(COLUMNS):
            mean, _, values = table[name][column]
            x = x0 + 17 * j
            d.rectangle([x, y(mean), x + 14, y(0)], fill=colours[j])
            for v in values:
                d.ellipse([x + 5, y(v) - 2, x + 9, y(v) + 2], fill='black')
        words, line, lines = name.split(), '', []
        for w in words:  # wrap the condition's name under its bars
            if len(line) + len(w) > 10 and line:
                lines.append(line)
                line = ''
            line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines[:8]):
            d.text((x0, H - bottom + 6 + 12 * k), text, fill='black')
    for j, (_, label) in enumerate(COLUMNS):
        d.rectangle([left + 120 * j, 8, left + 120 * j + 12, 20], fill=colours[j])
        d.text((left + 120 * j + 18, 8), label, fill='black')
    img.save(path)


def machine():
    """The CPU's model name and core count, for the reports."""
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            name = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def cpus(results):
    """The CPU the runs were timed on; several (a study resumed on another machine) are
    each named with their run count, and the step times compare only within one."""
    counts = {}
    for r in results:
        counts[r.get('cpu', machine())] = counts.get(r.get('cpu', machine()), 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), machine())
    return ', '.join(f"{name} ({n} run{'s' * (n > 1)})" for name, n in sorted(counts.items(), key=lambda c: -c[1])) + \
        ": step times compare only between runs on one CPU"


def wall_time(out, sitting, seconds):
    """Record that sitting number `sitting` (None: a new one) has run `seconds` in
    `out`/sittings.json; returns (its number, the wall time summed over every sitting that
    worked on `out`, their count): an interrupted study resumes in later sittings."""
    path = os.path.join(out, 'sittings.json')
    sittings = json.load(open(path)) if os.path.exists(path) else []
    if sitting is None:
        sitting = len(sittings)
        sittings.append(0.0)
    sittings[sitting] = seconds
    os.makedirs(out, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(sittings, f)
    return sitting, sum(sittings), len(sittings)


def main(argv=None):
    p = data.OneLineParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    p.add_argument('--quick', action='store_true', help='a few steps and one seed: checks that every step runs')
    p.add_argument('--seeds', type=int, default=3, help='seeds of every row (the claim rule needs at least 3)')
    p.add_argument('--steps', type=int, default=0, help="optimizer steps of each adaptation run (0 = the study's)")
    p.add_argument('--foundation-steps', type=int, default=0,
                   help="optimizer steps of each foundation (0 = the study's)")
    p.add_argument('--jobs', type=int, default=2, help='runs at a time, one thread each')
    p.add_argument('--decide', action='store_true',
                   help=f"GoPT's open decisions on the validation preset {VALIDATION} (report in "
                        f"study/gopt-validation)")
    p.add_argument('--only', default='', metavar='REGEX',
                   help="with --decide: only the decisions whose name this regular expression finds (and the "
                        "foundation); the report keeps the other decisions' runs from its results.json")
    p.add_argument('--out', default='', help='run folders (default runs/study[-gopt-val][-quick])')
    p.add_argument('--report', default='', help="where results.md/.png/.json go (default study/, with the README's "
                                                "claims table; --decide: study/gopt-validation; --quick: --out)")
    p.add_argument('--tables', action='store_true',
                   help="rewrite every report and the README's claims table from the results.json, without training")
    args = p.parse_args(argv)
    if args.tables:
        given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items() if k != 'tables' and v != p.get_default(k)]
        if given:
            p.error(f"--tables rewrites the committed reports (study/) from their results.json and takes no other "
                    f"flag: drop {' '.join(given)}")
        for part in ('', 'validation', 'gopt-validation'):
            if os.path.exists(os.path.join(HERE, part, 'results.json')):
                write_report(os.path.join(HERE, part), readme=README if part == '' else None)
                print(f"study: rewrote {os.path.join(HERE, part, 'results.md')}")
        pretraining.main(['--tables'])
        return 0
    if args.seeds < 1 or args.jobs < 1 or args.steps < 0 or args.foundation_steps < 0:
        p.error(f"need --seeds >= 1, --jobs >= 1 and step counts >= 0, got {args.seeds}, {args.jobs}, "
                f"{args.steps}, {args.foundation_steps}")
    if args.only and not args.decide:
        p.error("--only goes with --decide: the study's claims need all their rows from one sitting")
    if args.only:
        try:
            re.compile(args.only)
        except re.error as e:
            p.error(f"--only {args.only!r} is not a regular expression ({e})")
    seeds = range(1 if args.quick else args.seeds)
    steps = args.steps or (4 if args.quick else STEPS)
    foundation_steps = args.foundation_steps or (6 if args.quick else FOUNDATION_STEPS)
    out = args.out or 'runs/study' + ('-gopt-val' if args.decide else '') + ('-quick' if args.quick else '')
    report = args.report or (out if args.quick else os.path.join(HERE, 'gopt-validation' if args.decide else ''))
    check_outputs(out, report)
    if args.decide:
        return decide_gopt(args, seeds, steps, foundation_steps, out, report)
    return study(args, seeds, steps, foundation_steps, out, report)


def study(args, seeds, steps, foundation_steps, out, report):
    """The validation runs, the choices, then the study's runs; the reports are written
    after every finished run of the study (results.json with 'runs_done' so far)."""
    start, scenes = time.time(), QUICK_SCENES if args.quick else 0
    pretrain = dict(lr=1e-3, steps=steps) if args.quick else pretraining_choice()
    val_seeds = range(1 if args.quick else VALIDATION_SEEDS)
    validation = validation_plan(val_seeds, steps, foundation_steps, pretrain)
    print(f"study: {len(validation)} runs on the validation scenes choose the lrs and the depth scaling; the test "
          f"study's foundations run beside them", flush=True)
    results = run_all(validation + plan(seeds, steps, foundation_steps), out, args.jobs, scenes)
    choices, scores = chosen({k: v for k, v in results.items() if k.startswith('val: ')})
    choices['pretrain'] = pretrain
    print(f"study: chosen on validation: {choices}", flush=True)
    runs = plan(seeds, steps, foundation_steps, choices)
    print(f"study: {len(runs)} runs in {out}, {args.jobs} at a time", flush=True)
    setup = setup_text(len(seeds), steps, foundation_steps, choices)
    val_setup = (f"`{VALIDATION}`: {len(val_seeds)} seed(s), {steps} steps per run, evaluated on "
                 f"{scene_count(VALIDATION, scenes)} held-out training scenes")
    val_runs = sorted((r for k, r in results.items() if k.startswith('val: ')),
                      key=lambda r: (r['name'], r['seed']))
    val_scores = {fam: [[lr, ds, v] for (lr, ds), v in sc.items()] for fam, sc in scores.items()}
    validation_report = dict(setup=val_setup, choices=choices, scores=val_scores, runs=val_runs)
    save_json(os.path.join(report, 'validation'), validation_report)
    write_report(os.path.join(report, 'validation'))

    sitting = wall_time(out, None, 0.0)[0]

    def save(done):  # the study's report as it stands, after each finished run
        _, wall, sittings = wall_time(out, sitting, time.time() - start)
        # the sittings' wall time covers the validation runs too: so does the run time beside it
        every = [*val_runs, *done.values()]
        compute = sum(r.get('seconds', 0) for r in every)
        wall = (f"{wall / 60:.0f} min wall time with the {len(val_runs)} validation runs "
                f"({sittings} sitting{'s' * (sittings > 1)}, {args.jobs} runs at a time, "
                f"{compute / 3600:.1f} h of one-thread run time in all) on {cpus(every)}")
        save_json(report, dict(
            when=time.strftime('%Y-%m-%d'), dataset=DATASET, validation_dataset=VALIDATION,
            scenes=f"the {scene_count(DATASET, scenes)} test scenes", runs_done=len(done),
            runs_planned=len(runs), choices=choices, setup=setup, wall=wall,
            validation=dict(scores=val_scores),
            runs=sorted(done.values(), key=lambda r: (r['name'], r['seed']))))
        write_report(report, readme=README if os.path.abspath(report) == HERE else None)

    done = {k: v for k, v in results.items() if not k.startswith('val: ')}

    def finished(key, result):
        done[key] = result
        save(done)
    done.update(run_all(runs, out, args.jobs, scenes, on_result=finished))
    save(done)
    print(f"study: done, {len(done)} runs; {os.path.join(report, 'results.md')}")
    return 0


def scene_count(dataset, scenes=0):
    """The number of test scenes of a preset that the study evaluates (`scenes` > 0: that many)."""
    return scenes or len(data.build_dataset(dataset, '', 'test'))


def setup_text(seeds, steps, foundation_steps, choices):
    """The study's set-up in one paragraph, for its reports."""
    preset, pretrain = data.PRESETS[DATASET], choices['pretrain']
    d = preset.defaults
    lrs = ', '.join(f"{k} {v:g}" for k, v in choices['lr'].items())
    scaling = DEPTH_SCALINGS[choices['depth_standardize']]
    return (f"`{DATASET}` ({preset.crop[0]} x {preset.crop[1]}), {seeds} seed(s); foundations "
            f"{foundation_steps} steps of the dataset's recipe (batch {d['batch_size']}, "
            f"lr {d['lr']:g}); every adaptation {steps} steps, batch {BATCH}, AdamW (warm-up "
            f"{d['warmup_epochs']} epoch, poly decay) at its family's lr chosen on `{VALIDATION}` "
            f"({lrs}); X = {preset.default_x} unless the row says otherwise, MaskMentor's X = "
            f"{MM_X}; MaskMentor fine-tuning's depth {scaling} (chosen there too); MaskMentor "
            f"pre-training {pretrain['steps']} steps at lr {pretrain['lr']:g} (chosen by "
            f"study.pretraining), 20% MIM warm-up then 3 teacher + 1 student iterations per batch, "
            f"cosine, betas 0.9 / 0.95")


def save_json(report, saved):
    """`report`/results.json, written whole under a temporary name, then renamed."""
    os.makedirs(report, exist_ok=True)
    path = os.path.join(report, 'results.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(saved, f, indent=1)
    os.replace(path + '.tmp', path)


def decide_gopt(args, seeds, steps, foundation_steps, out, report):
    """--decide: the GoPT decisions (DECISIONS) on the validation preset, into study/gopt-validation."""
    runs = plan(seeds, steps, foundation_steps, decide=True, only=args.only)
    print(f"study: {len(runs)} runs in {out}, {args.jobs} at a time", flush=True)
    results = run_all(runs, out, args.jobs)
    preset = data.PRESETS[VALIDATION]
    d = preset.defaults
    setup = (f"`{VALIDATION}` ({preset.crop[0]} x {preset.crop[1]}), {len(seeds)} seed(s), "
             f"foundations {foundation_steps} steps, every adaptation {steps} steps, batch {d['batch_size']}, "
             f"AdamW lr {d['lr']:g} (warm-up 1 epoch, poly decay)")
    os.makedirs(report, exist_ok=True)
    if args.only and os.path.exists(os.path.join(report, 'results.json')):
        # the decisions not rerun now: their runs as the report holds them
        names = {r['name'] for r in plan(seeds, steps, foundation_steps, decide=True)}
        with open(os.path.join(report, 'results.json')) as f:
            earlier = [r for r in json.load(f)['runs'] if r['name'] in names
                       and f"{r['name']}/{r['seed']}" not in results and r['name'] not in {x['name'] for x in runs}]
        results.update({f"{r['name']}/{r['seed']}": r for r in earlier})
        kept = sorted({r['name'] for r in earlier}, key=[c[0] for c in CONDITIONS + DECISIONS].index)
        setup += (f". Rerun now (`--only '{args.only}'`): " + ', '.join(sorted({r['name'] for r in runs})) +
                  "; kept from an earlier sitting, with the foundations of that sitting (compare them with each "
                  "other, not with the rows rerun now): " + ', '.join(kept)) if kept else ''
    with open(os.path.join(report, 'results.json'), 'w') as f:
        json.dump(dict(setup=setup, scenes=f"the {scene_count(VALIDATION)} validation scenes", runs=sorted(results.values(), key=lambda r: (r['name'], r['seed']))), f, indent=1)
    write_report(report)
    print(f"study: done; {os.path.join(report, 'results.md')}")
    return 0


def untestable_claims(validation=VALIDATION):
    """{claim: why} for the claims this scale cannot test: MaskMentor's pre-training claims
    when, at the chosen budget, some pre-training output does not get below its trivial
    baseline on the validation scenes (study/maskmentor-pretraining, if measured on the
    validation preset `validation`)."""
    path = os.path.join(HERE, 'maskmentor-pretraining', 'results.json')
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = {float(k): v for k, v in json.load(f).items()}
    if any(v.get('dataset', 'demo128-val') != validation for v in saved.values()):
        return {}
    stuck = pretraining.stuck(saved)
    if not stuck:
        return {}
    lr, _, point = pretraining.chosen_point(saved)
    ratio = pretraining.ratios(point, saved[lr]['baseline'])
    learned = [f"{t} {ratio[t]:.2f}" for t in pretraining.TASKS if t not in stuck]
    spread = ''.join(f"; its {t} prediction's spread over the target's: {point['loss'][f'{t} spread']:.2f}"
                     for t in stuck if f'{t} spread' in point['loss'])
    why = (f"the pre-training's {' and '.join(stuck)} reconstruction does not beat its trivial baseline "
           f"(loss / baseline at the chosen budget: " + ', '.join(learned + [f"{t} {ratio[t]:.2f}" for t in stuck]) +
           f"{spread}; study/maskmentor-pretraining)")
    return {text: why for paper, text, *_ in CLAIMS if paper == 'MaskMentor'}


def validation_markdown(saved):
    """The validation report: each family's score per grid point, and what was chosen."""
    lines = [f"# Choices on validation scenes", '', f"Set-up: {saved['setup']}. Score: mean over seeds and the "
             f"family's grid rows of the mean mIoU (%) over the family's inputs. Chosen: the highest.", '',
             '| family | grid rows | inputs | lr | MaskMentor depth | score |', '|---|---|---|---|---|---|']
    for fam, rows, grid, columns in FAMILIES:
        for lr, ds, v in saved['scores'].get(fam, []):
            chosen = lr == saved['choices']['lr'][fam] and (ds is None or ds == saved['choices']['depth_standardize'])
            lines.append(f"| {fam} | {', '.join(grid)} | {inputs_label(columns)} | {lr:g} | "
                         f"{'-' if ds is None else DEPTH_SCALINGS[ds]} | {'**' * chosen}{100 * v:.1f}{'**' * chosen} |")
    return '\n'.join(lines) + '\n'


def write_report(report, readme=None):
    """results.md and results.png of a report folder, from its results.json alone (no
    training); with `readme`, also the README's claims table."""
    with open(os.path.join(report, 'results.json')) as f:
        saved = json.load(f)
    if 'scores' in saved:  # the validation report
        with open(os.path.join(report, 'results.md'), 'w') as f:
            f.write(validation_markdown(saved))
        return
    results = {f"{r['name']}/{r['seed']}": r for r in saved['runs']}
    table = summarise(results)
    validation = saved.get('validation_dataset', 'demo128-val')
    claims = claim_rows(results, untestable_claims(validation) if 'choices' in saved else None)
    setup = saved['setup'] + (f"; {saved['wall']}" if 'wall' in saved else '')
    scenes = saved.get('scenes', f"the 64 {'test' if 'choices' in saved else 'validation'} scenes")
    with open(os.path.join(report, 'results.md'), 'w') as f:
        f.write(markdown(table, claims, setup, scenes))
    plot(table, os.path.join(report, 'results.png'))
    if readme:
        write_readme(claims, saved, readme)


if __name__ == '__main__':
    sys.exit(main())
