"""Probes of the rooms study's failures, on the validation scenes only: each varies one
validation run of the study (docs/study.md, "What the results say") in one thing that the
write-up could not rule out, and compares it, paired by seed, with the run it varies.

    python -m study.probes            # after study.run: its validation runs are read back, not redone (42 min
                                      # on 2 cores; alone, those runs are trained first: about an hour)
    python -m study.probes --quick    # every probe with a few steps, one seed, 8 scenes
    python -m study.probes --tables   # rewrite study/probes/results.md from its results.json

The probes train on the 640 training scenes of `rooms144-val` and are scored on its 160
held-out scenes, never on the test scenes: they say what to change in the next study, they
do not replace its verdicts. With 2 seeds they are diagnostics, not claims.
"""
import json
import os
import sys

import numpy as np

import data
from study import run as study_run
from study.common import HERE, VALIDATION, check_outputs

REPORT = os.path.join(HERE, 'probes')
LONG = 4  # the longer budget: this many times the study's steps

# the validation runs the probes vary (study.run.validation_plan's labels)
KTB_VAL = 'val: KTB, lr 0.001'
SWIN_EF_VAL = 'val: Swin early fusion, full FT, lr 0.003'
MM_VAL = 'val: MaskMentor FT after M2IM + STTP, lr 0.003, depth per image'
VIT_FOUNDATION = 'val: ViT foundation (RGB)'

# (name, the run it varies, what changes: 'opts' appended to its options, 'lr', 'steps' as a
# multiple of the study's, 'from' another run to start from; the question it answers)
PROBES = (
    ('KTB, ranks x4', KTB_VAL,
     dict(opts=',prompt_ranks=16:32:64:128,adapter_ranks=8:16:32:64,dscf_ranks=16:32:64:128'),
     "KTB vs full fine-tuning: are the C/8, C/16 ranks too narrow at Swin-nano (4-32, 2-16)?"),
    (f'KTB, {LONG}x steps', KTB_VAL, dict(steps=LONG),
     "KTB vs full fine-tuning: does the gap close with the budget?"),
    (f'Swin early fusion, {LONG}x steps', SWIN_EF_VAL, dict(steps=LONG),
     "the same budget for full fine-tuning, the other side of that gap"),
    ('Swin early fusion, lr 0.01', SWIN_EF_VAL, dict(lr=0.01),
     "early fusion's lr sat at the grid's top (3e-3): is it under-tuned?"),
    ('MaskMentor FT, lr 0.01', MM_VAL, dict(lr=0.01),
     "MaskMentor fine-tuning's lr sat at the grid's top (3e-3): is it under-tuned?"),
    ('MaskMentor FT, no pre-training', MM_VAL, {'from': VIT_FOUNDATION},
     "MaskMentor: what M2IM + STTP pre-training adds at the study's budget"),
    (f'MaskMentor FT, {LONG}x steps', MM_VAL, dict(steps=LONG),
     "MaskMentor: fine-tuning for longer after M2IM + STTP"),
    (f'MaskMentor FT, no pre-training, {LONG}x steps', MM_VAL, {'from': VIT_FOUNDATION, 'steps': LONG},
     "MaskMentor: does the pre-training's effect appear once fine-tuning converges?"),
)
# (A, B, what A - B measures): paired by seed (`summary`: on which inputs)
COMPARISONS = (
    ('KTB, ranks x4', KTB_VAL, "wider KTB ranks"),
    (f'KTB, {LONG}x steps', KTB_VAL, f"KTB, {LONG}x the steps"),
    (f'Swin early fusion, {LONG}x steps', SWIN_EF_VAL, f"early fusion, {LONG}x the steps"),
    (KTB_VAL, SWIN_EF_VAL, "KTB - full fine-tuning, the study's budget"),
    (f'KTB, {LONG}x steps', f'Swin early fusion, {LONG}x steps', f"KTB - full fine-tuning, {LONG}x the steps"),
    ('KTB, ranks x4', SWIN_EF_VAL, "KTB with wider ranks - full fine-tuning"),
    ('Swin early fusion, lr 0.01', SWIN_EF_VAL, "early fusion at lr 1e-2 against 3e-3"),
    ('MaskMentor FT, lr 0.01', MM_VAL, "MaskMentor fine-tuning at lr 1e-2 against 3e-3"),
    (MM_VAL, 'MaskMentor FT, no pre-training', "M2IM + STTP pre-training, the study's budget"),
    (f'MaskMentor FT, {LONG}x steps', f'MaskMentor FT, no pre-training, {LONG}x steps',
     f"M2IM + STTP pre-training, {LONG}x the fine-tuning steps"),
)


def inputs(name):
    """The inputs a row is scored on: its family's (study.run.FAMILIES), RGB+X for early fusion."""
    if 'KTB' in name or 'MaskMentor' in name:
        return ('both', 'rgb', 'x')
    return ('both',)


def plan(seeds, steps, foundation_steps, pretrain):
    """The probes' runs and the validation runs they vary or start from (read back from the
    study's folder when finished there), in study.run's run format."""
    base = {r['key']: r for r in study_run.validation_plan(seeds, steps, foundation_steps, pretrain)}
    probes = []
    for seed in seeds:
        for name, varies, change, _ in PROBES:
            run = base[f'{varies}/{seed}']
            config = dict(run['config'])
            config['opts'] += change.get('opts', '')
            config['lr'] = change.get('lr', config['lr'])
            config['max_steps'] *= change.get('steps', 1)
            need = f"{change['from']}/{seed}" if 'from' in change else run['need']
            probes.append(dict(name=f'probe: {name}', seed=seed, key=f'probe: {name}/{seed}', need=need,
                               pretraining=False, config=config))
    keys = {r['key'] for r in probes} | {f'{varies}/{s}' for _, varies, _, _ in PROBES for s in seeds}
    return study_run.with_needs([*base.values(), *probes], keys)


def row(results, name, columns):
    """{seed: mean over `columns`} of the runs of a row ('probe: ' added to a probe's name)."""
    label = name if name.startswith('val: ') else f'probe: {name}'
    return {r['seed']: float(np.mean([r[c] for c in columns])) * 100 for r in results if r['name'] == label}


def summary(results):
    """(rows, comparisons): per row its mean and per-seed figures of each input (mIoU %), and
    per comparison the paired differences A - B over the seeds both have."""
    rows = []
    for name in [KTB_VAL, SWIN_EF_VAL, MM_VAL] + [p[0] for p in PROBES]:
        label = name if name.startswith('val: ') else f'probe: {name}'
        runs = [r for r in results if r['name'] == label]
        if runs:
            rows.append(dict(name=name, n=len(runs), step_seconds=float(np.mean([r['step_seconds'] for r in runs])),
                             **{c: [r[c] * 100 for r in sorted(runs, key=lambda r: r['seed'])] for c in ('both', 'rgb', 'x')}))
    comparisons = []
    for a, b, what in COMPARISONS:
        columns = inputs(a) if inputs(a) == inputs(b) else ('both',)  # across families: RGB+X, as the study's claim
        ra, rb = row(results, a, columns), row(results, b, columns)
        seeds = sorted(set(ra) & set(rb))
        if seeds:
            comparisons.append(dict(a=a, b=b, what=what, inputs=columns, differences=[ra[s] - rb[s] for s in seeds]))
    return rows, comparisons


def write_report(report, saved):
    """results.md from the saved results.json (`saved`: setup, runs)."""
    rows, comparisons = summary(saved['runs'])
    lines = ["# Probes of the study's failures, on validation scenes", "", saved['setup'], "",
             "| row | seeds | RGB+X | RGB only | X only | step (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{np.mean(r[c]):.1f} ({', '.join(f'{v:.1f}' for v in r[c])})" for c in ('both', 'rgb', 'x')]
        lines.append(f"| {r['name']} | {r['n']} | " + ' | '.join(cells) + f" | {r['step_seconds']:.3f} |")
    lines += ["", "Paired by seed: A - B in mIoU points of the mean over the inputs (within KTB or MaskMentor: "
              "RGB+X, RGB only and X only, as the study's family scores; otherwise RGB+X, as the study's claim). Two "
              "seeds: a direction, not a verdict.", "",
              "| what | A | B | inputs | A - B: mean (per seed) |", "|---|---|---|---|---|"]
    for c in comparisons:
        d = c['differences']
        lines.append(f"| {c['what']} | {c['a']} | {c['b']} | {' and '.join(dict(study_run.COLUMNS)[i] for i in c['inputs'])} | "
                     f"{np.mean(d):+.1f} ({', '.join(f'{v:+.1f}' for v in d)}) |")
    lines += ["", "The questions:", ""] + [f"- {name}: {question}" for name, _, _, question in PROBES]
    with open(os.path.join(report, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main(argv=None):
    p = data.OneLineParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    p.add_argument('--quick', action='store_true', help='a few steps, one seed, 8 evaluation scenes')
    p.add_argument('--jobs', type=int, default=2, help='runs at a time, one thread each')
    p.add_argument('--out', default='', help="run folders (default runs/study: the study's validation runs are "
                                             "read back from there)")
    p.add_argument('--report', default='', help='where results.md / .json go (default study/probes; --quick: --out)')
    p.add_argument('--tables', action='store_true', help='rewrite results.md from results.json, without training')
    args = p.parse_args(argv)
    if args.tables:
        given = [f"--{k}" for k in ('quick', 'jobs', 'out') if getattr(args, k) != p.get_default(k)]
        if given:
            p.error(f"--tables only rewrites results.md (of --report) and takes no {' '.join(given)}")
        report = args.report or REPORT
        path = os.path.join(report, 'results.json')
        if not os.path.isfile(path):
            p.error(f"--tables reads {path}, which does not exist: run `python -m study.probes` first")
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--tables cannot read {path} ({e}): rerun `python -m study.probes` to rewrite it")
        write_report(report, saved)
        print(f"probes: rewrote {os.path.join(report, 'results.md')}")
        return 0
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, not {args.jobs}")
    out = args.out or ('runs/study-quick' if args.quick else 'runs/study')
    report = args.report or (out if args.quick else REPORT)
    check_outputs(out, report)
    seeds = range(1 if args.quick else study_run.VALIDATION_SEEDS)
    steps, foundation_steps = (4, 6) if args.quick else (study_run.STEPS, study_run.FOUNDATION_STEPS)
    pretrain = dict(lr=1e-3, steps=steps) if args.quick else study_run.pretraining_choice()
    runs = plan(seeds, steps, foundation_steps, pretrain)
    print(f"probes: {len(runs)} runs in {out} ({sum(r['name'].startswith('probe: ') for r in runs)} probes), "
          f"{args.jobs} at a time", flush=True)
    results = study_run.run_all(runs, out, args.jobs, study_run.QUICK_SCENES if args.quick else 0)
    scenes = study_run.scene_count(VALIDATION, study_run.QUICK_SCENES if args.quick else 0)
    setup = (f"`{VALIDATION}`: {len(seeds)} seed(s), trained on its training scenes, scored on {scenes} held-out "
             f"training scenes (never the test scenes); mIoU (%) mean (per seed) of the final weights; each probe "
             f"changes one thing in the study's validation run it names, everything else as there "
             f"({steps} steps of batch {study_run.BATCH}; '{LONG}x steps': {LONG * steps}); {study_run.cpus(results.values())}")
    saved = dict(setup=setup, runs=sorted(results.values(), key=lambda r: (r['name'], r['seed'])))
    os.makedirs(report, exist_ok=True)
    study_run.save_json(report, saved)
    write_report(report, saved)
    print(f"probes: {os.path.join(report, 'results.md')}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
