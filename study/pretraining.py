"""Does MaskMentor's pre-training learn at the study's scale? Curves of its validation
losses against trivial baselines, for choosing its budget (steps) and learning rate.

    python -m study.pretraining                      # from the repository root (~8 min on 2 cores)
    python -m study.pretraining --steps 40 --every 20 --lrs 1e-3 --out /tmp/curves   # a smoke run

The MaskMentor pre-training of the study (MultiMAE's network at nano width, the study's
decoders, `study.common.MM_PRE`, its recipe: cosine, AdamW betas 0.9 / 0.95, batch 4; 20%
complete-modality MIM warm-up, then 3 teacher + 1 student steps per batch) is trained from
random weights (the study starts it from its RGB foundation) on the training scenes of the
study's validation preset (study.common.VALIDATION, X = depth) and, every `--every` steps,
scored on its held-out scenes (never the test scenes): the pixel loss of each output on
its masked tokens, with one fixed MultiMAE mask per scene (complete modalities, as in
'mim'), and, on the same masked tokens, the loss of a trivial prediction:
    depth     the better of two (L1 on the standardised depth): each image's median (its
              mean is worse), and the training scenes' mean at each pixel position (on
              rooms floors get deeper with the image row: position alone beats the median);
    rgb       the colour prior: the training scenes' mean colour (MSE on the normalised
              pixels); each image's own mean colour, which the model cannot see (5 of
              6 tokens are masked), is reported as a stricter reference;
    norm_rgb  zero, the mean of a per-patch normalised target (MSE);
    semseg    the training scenes' class frequencies at every pixel (cross-entropy;
              the best constant, which predicts background everywhere).
A ratio loss / baseline below 1 means the model predicts more than that trivial rule.
Depth is also scored per region, against the image median (floor, objects, invalid pixels, and
the masked depth
patches whose RGB patch is visible, where RGB alone tells object from floor), which tells
where it gains. And the spatial structure of the RGB and depth predictions on the masked
pixels, deviations from each image's own mean: their correlation with the target's and
their spread (std) over the target's; a decoder that predicts one value per image has
spread 0, whatever its loss. Writes results.json, results.md (the ratios, the chosen lr and budget) and
results.png (the curves) to study/maskmentor-pretraining/.
"""
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import rgbx
import train
from study.common import HERE, MM_PRE, MM_X, VALIDATION, check_outputs

TASKS = ('rgb', 'norm_rgb', 'depth', 'semseg')
BASELINES = {'rgb': 'colour prior', 'norm_rgb': 'zero',
             'depth': 'best of median, position', 'semseg': 'class prior'}
DEPTH_BASELINE = 'the lower of the image median and the position mean'
# depth's two trivial rules; its baseline is the lower of them
DEPTH_BASELINES = (('depth_median', 'image median'), ('depth_position', 'position mean'))
# depth scored apart on each (floor / the rest / depth 0 / the masked depth patches whose RGB patch
# the model sees: there depth is predictable from RGB alone)
REGIONS = ('floor', 'objects', 'invalid', 'RGB seen')
STRUCTURE = ('rgb corr', 'rgb spread', 'depth corr', 'depth spread')  # the prediction's spatial structure (`structure`)
COLUMNS = TASKS + tuple(f'depth {r}' for r in REGIONS)  # the ratios reported (region: against the image median)
MASK_SEED = 1234  # the fixed masks of the validation scenes
PLATEAU = 0.95  # the budget: the first step with this fraction of the run's whole gain in mean ratio


def first(ds, scenes):
    """The first `scenes` items of `ds` (0: all of them)."""
    return torch.utils.data.Subset(ds, range(min(scenes, len(ds)))) if scenes else ds


def validation_batches(batch=8, scenes=0):
    """The held-out scenes of the validation preset (the first `scenes`; 0: all), as batches
    (rgb, x, label), depth in metres-like [0, 1] (0 = invalid): the model standardises it
    per image, which no affine scaling of the dataset changes."""
    ds = data.build_dataset(VALIDATION, '', 'test', MM_X, x_standardised=False)
    return list(data.loader(first(ds, scenes), batch_size=batch))


@torch.no_grad()
def priors(model, num_classes, scenes=0):
    """Over the training scenes of the validation preset (the first `scenes`; 0: all): log
    frequencies of the classes (K,), the mean of the normalised RGB (3,) and the mean of the
    model's depth target at each pixel position (1, H, W)."""
    ds = first(data.build_dataset(VALIDATION, '', 'train', MM_X, x_standardised=False), scenes)
    counts, colour, depth = torch.zeros(num_classes), torch.zeros(3), 0.0
    for i in range(len(ds)):
        rgb, x, label = ds[i]
        counts += torch.bincount(label[label != data.IGNORE], minlength=num_classes).float()
        colour += rgb.mean((1, 2)) / len(ds)
        depth = depth + model.targets(rgb[None], x[None], label[None])[1]['depth'][0] / len(ds)
    return (counts / counts.sum()).clamp_min(1e-8).log(), colour, depth


@torch.no_grad()
def scores(model, batches, prior):
    """{task: model loss} and {task: baseline loss} over the batches, one fixed mask each
    (also 'depth <region>' for REGIONS and the references 'depth_mean', 'rgb_image')."""
    was = model.training
    model.eval()
    class_prior, colour, position = prior
    names = data.get_preset(VALIDATION).class_names
    floor = names.index('floor') if 'floor' in names else 0  # the demo's floor: its background
    got = {t: [] for t in TASKS + tuple(f'depth {r}' for r in REGIONS)}
    sums = {f'{t} {part}': 0.0 for t in ('rgb', 'depth') for part in ('cov', 'var_pred', 'var_target')}
    trivials = ('rgb', 'norm_rgb', 'semseg', 'depth_median', 'depth_position', 'depth_mean',
                'rgb_image')
    base = {t: [] for t in trivials + tuple(f'depth {r}' for r in REGIONS)}
    for i, (rgb, x, label) in enumerate(batches):
        with torch.random.fork_rng():
            torch.manual_seed(MASK_SEED + i)
            terms = model.losses(rgb, x, label, 'mim')
            torch.manual_seed(MASK_SEED + i)  # the same mask again: 'mim' draws nothing before it
            grid = (-(-rgb.shape[-2] // 16), -(-rgb.shape[-1] // 16))
            mask = model.draw_mask(torch.ones(rgb.shape[0], 3, dtype=torch.bool), grid[0] * grid[1])  # (B, 3, N)
            inputs, targets = model.targets(rgb, x, label)
            decoded = model.decode(inputs, mask)
            predicted = decoded['depth'][0]  # the prediction behind terms['depth']
        depth = targets['depth'].flatten(1)
        image = lambda v: v.view(-1, 1, 1, 1).expand_as(targets['depth'])
        trivial = {'rgb': colour.view(1, 3, 1, 1).expand_as(targets['rgb']),
                   'rgb_image': targets['rgb'].mean((2, 3), keepdim=True).expand_as(targets['rgb']),
                   'norm_rgb': torch.zeros_like(targets['norm_rgb']),
                   'depth_median': image(depth.median(1).values),
                   'depth_mean': image(depth.mean(1)),
                   'depth_position': position.expand_as(targets['depth']),
                   'semseg': class_prior.view(1, -1, 1, 1).expand(rgb.shape[0], -1, *targets['semseg'].shape[-2:])}
        which = {'rgb': 0, 'rgb_image': 0, 'norm_rgb': 0, 'depth_median': 1, 'depth_position': 1,
                 'depth_mean': 1, 'semseg': 2}
        for t in TASKS:
            got[t].append(terms[t].item())
        for t, pred in trivial.items():
            name = t.split('_')[0] if t != 'norm_rgb' else t
            base[t].append(model.pixel_loss(name, pred, targets[name], mask[:, which[t]], grid).item())
        regions = {'floor': (label == floor) & (x[:, 0] > 0),
                   'objects': (label != floor) & (x[:, 0] > 0), 'invalid': x[:, 0] == 0,
                   'RGB seen': pixels(~mask[:, 0], grid, label.shape[-2:])}  # the place's RGB patch is visible
        for t, k in (('rgb', 0), ('depth', 1)):
            for part, v in zip(('cov', 'var_pred', 'var_target'), structure(decoded[t][0], targets[t], mask[:, k], grid)):
                sums[f'{t} {part}'] += v
        for r, where in regions.items():
            for into, pred in ((got, predicted), (base, trivial['depth_median'])):
                into[f'depth {r}'].append(region_loss(pred, targets['depth'], mask[:, 1], grid, where))
    model.train(was)
    got = {t: finite_mean(v) for t, v in got.items()}
    for t in ('rgb', 'depth'):  # spatial structure of the prediction: correlation, and spread relative to the target's
        cov, vp, vt = (sums[f'{t} {part}'] for part in ('cov', 'var_pred', 'var_target'))
        got[f'{t} corr'], got[f'{t} spread'] = cov / max((vp * vt) ** 0.5, 1e-12), (vp / max(vt, 1e-12)) ** 0.5
    base = {t: finite_mean(v) for t, v in base.items()}
    return got, {**base, 'depth': min(base[t] for t, _ in DEPTH_BASELINES)}  # the better rule


def finite_mean(values):
    """The mean of the finite values; NaN when there is none (a region no scored scene has,
    e.g. invalid depth on rendered rooms)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float('nan')


def structure(pred, target, mask, grid):
    """Sums over the masked pixels of the products of the prediction's and the target's
    deviations from each image's own mean: (covariance, prediction variance, target
    variance). A prediction that is one value per image scores 0 / 0 whatever its level."""
    m = pixels(mask, grid, target.shape[-2:])[:, None].expand_as(target)  # (B, C, H, W)
    p, z = pred - pred.mean((2, 3), keepdim=True), target - target.mean((2, 3), keepdim=True)
    return float((p * z)[m].sum()), float((p * p)[m].sum()), float((z * z)[m].sum())


def pixels(mask, grid, size):
    """A token mask (B, h*w) spread over the pixels of its patches: (B, H, W) for size (H, W),
    the patch side ceil(H / h), cropped to size."""
    h, w = grid
    s = -(-size[0] // h)
    return mask.view(-1, h, w).repeat_interleave(s, 1).repeat_interleave(s, 2)[:, :size[0], :size[1]]


def region_loss(pred, target, mask, grid, where):
    """Depth L1 over the masked pixels inside `where` (B, H, W), pooled over the batch."""
    m = pixels(mask, grid, target.shape[-2:]) & where
    return float((pred - target).abs()[:, 0][m].mean()) if m.any() else float('nan')


def curve(lr, steps, every, out, seed=0, scenes=0):
    """Train the study's MaskMentor pre-training at `lr` for `steps`, scoring it every `every`
    steps: [{'step', 'loss': {task: value}}], and the baselines; `scenes`: score on the
    first held-out scenes and take the priors from the first training scenes only (0: all)."""
    cfg = train.resolve(train.Config(dataset=VALIDATION, x_modality=MM_X, method='maskmentor',
                                     backbone='vit-nano', opts=MM_PRE,
                                     max_steps=steps, pretrained='none', seed=seed, eval_every=0, log_every=10 ** 6,
                                     workers=0, out_dir=os.path.join(out, f'lr{lr:g}'), overwrite=True,
                                     lr=lr, batch_size=4))
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)  # the same initial weights for every lr
    model = train.build_model(cfg)
    batches = validation_batches(scenes=scenes)
    prior = priors(model, data.get_preset(VALIDATION).num_classes, scenes)
    points, baseline = [], None

    def score(step):
        nonlocal baseline
        if step % every == 0 or step == steps:
            loss, baseline = scores(model, batches, prior)
            points.append(dict(step=step, loss=loss))
            # the points so far, as they come
            with open(os.path.join(out, f'curve-lr{lr:g}.json'), 'w') as f:
                json.dump(dict(points=points, baseline=baseline, dataset=VALIDATION, scenes=scenes), f)
            print(f"lr {lr:g} step {step}: " + ', '.join(f"{t} {loss[t] / baseline[t]:.3f}" for t in COLUMNS) +
                  ''.join(f", depth / {n} {loss['depth'] / baseline[t]:.3f}"
                          for t, n in DEPTH_BASELINES) +
                  ', ' + ', '.join(f"{t} {loss[t]:.3f}" for t in STRUCTURE),
                  flush=True)
    score(0)
    train.train(cfg, model=model, on_step=score)
    return points, baseline


def curve_job(lr, steps, every, out, scenes=0):
    """`curve` in a worker process on one thread (two jobs share two cores)."""
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)
    return curve(lr, steps, every, out, scenes=scenes)


def ratios(point, baseline):
    """{task: loss / baseline} of one scored step."""
    return {t: point['loss'][t] / baseline[t] for t in TASKS}


def choose(results):
    """The lr whose last scores have the lowest mean ratio to the baselines; its budget: the
    first scored step that has PLATEAU of the run's whole gain in mean ratio (from its first
    scored step to its last); and that mean ratio."""
    mean = lambda p, b: float(np.mean(list(ratios(p, b).values())))
    best = min(results, key=lambda lr: mean(results[lr]['points'][-1], results[lr]['baseline']))
    r = results[best]
    first, last = mean(r['points'][0], r['baseline']), mean(r['points'][-1], r['baseline'])
    point = next(p for p in r['points'] if mean(p, r['baseline']) <= last + (1 - PLATEAU) * (first - last) + 1e-12)
    return best, point['step'], mean(point, r['baseline'])


def stuck(results):
    """The tasks whose loss is not below its baseline at the chosen lr and budget."""
    lr, _, point = chosen_point(results)
    return [t for t, v in ratios(point, results[lr]['baseline']).items() if v >= 1]


def chosen_point(results):
    """(lr, budget, the scored point at that budget) of `choose`."""
    lr, steps, _ = choose(results)
    return lr, steps, next(p for p in results[lr]['points'] if p['step'] == steps)


def markdown(results, steps_run):
    lr, steps, mean = choose(results)
    dataset = next(iter(results.values())).get('dataset', 'demo128-val')
    scenes = next(iter(results.values())).get('scenes', 0)
    which = (f"the first {scenes} held-out scenes (baselines from the first {scenes} training scenes)" if scenes
             else "the held-out scenes")
    lines = [f"# MaskMentor pre-training against trivial baselines (validation scenes of "
             f"`{dataset}`)", '',
             f"{steps_run} steps per lr, batch 4, the study's pre-training recipe; loss / baseline on {which} "
             f"(below 1: better than the trivial prediction). Baselines: " +
             ', '.join(f"{t}: {dict(BASELINES, depth=DEPTH_BASELINE)[t]}" for t in TASKS) +
             '; the depth regions against the image median.', '',
             '| lr | step | ' + ' | '.join(COLUMNS) +
             ''.join(f' | depth / {n}' for _, n in DEPTH_BASELINES) +
             ' | rgb / image mean colour | ' + ' | '.join(STRUCTURE) + ' |',
             '|---|---|' + '---|' * (len(COLUMNS) + 3 + len(STRUCTURE))]
    for key, r in results.items():
        b = r['baseline']
        for p in r['points']:
            lines.append(f"| {key:g} | {p['step']} | " +
                         ' | '.join(f"{p['loss'][t] / b[t]:.3f}" for t in COLUMNS) +
                         ''.join(f" | {p['loss']['depth'] / b[t]:.3f}"
                                 for t, _ in DEPTH_BASELINES) +
                         f" | {p['loss']['rgb'] / b['rgb_image']:.3f} | " +
                         ' | '.join(f"{p['loss'][t]:.3f}" if t in p['loss'] else '-' for t in STRUCTURE) + ' |')
    b, left = results[lr]['baseline'], stuck(results)
    lines += ['', f"Baseline losses: " + ', '.join(f"{t} {b[t]:.4f}" for t in TASKS) +
              f" (depth: image median {b['depth_median']:.4f}, position mean "
              f"{b['depth_position']:.4f}, image mean "
              f"{b['depth_mean']:.4f}; rgb, each image's own mean colour: "
              f"{b['rgb_image']:.4f}).", '',
              f"Chosen: lr {lr:g} (the lowest mean ratio at the last step), budget {steps} steps (the first step "
              f"with {PLATEAU:.0%} of the run's gain in mean ratio), mean ratio there {mean:.3f}; " +
              ("every task is below its baseline there." if not left else
               f"not below its baseline there: {', '.join(left)}."), '']
    return '\n'.join(lines)


def plot(results, path):
    """Loss / baseline per task over the steps, one panel per task, one line per lr; Pillow only."""
    colours = ((70, 110, 200), (220, 90, 60), (90, 170, 90), (150, 80, 160))
    W, H, pad = 4 * 230 + 40, 300, 40
    img = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(img)
    last = max(p['step'] for r in results.values() for p in r['points']) or 1
    for k, t in enumerate(TASKS):
        x0 = 20 + 230 * k
        y = lambda v: H - pad - min(v, 1.5) / 1.5 * (H - 2 * pad)
        d.rectangle([x0, pad, x0 + 200, H - pad], outline=(200, 200, 200))
        d.line([(x0, y(1)), (x0 + 200, y(1))], fill=(160, 160, 160))
        for v in (0, 1, 1.5):
            d.text((x0 + 203, y(v) - 6), f"{v:g}", fill='black')
        d.text((x0, pad - 16), f"{t} / {BASELINES[t]}", fill='black')
        for j, (lr, r) in enumerate(results.items()):
            xy = [(x0 + 200 * p['step'] / last, y(p['loss'][t] / r['baseline'][t])) for p in r['points']]
            d.line(xy, fill=colours[j % 4], width=2)
            if k == 0:
                d.text((20 + 90 * j, H - 20), f"lr {lr:g}", fill=colours[j % 4])
    img.save(path)


def main(argv=None):
    p = data.OneLineParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    p.add_argument('--lrs', default='1e-3,3e-3', help='comma-separated learning rates (1e-4 and 3e-4 trailed 1e-3 '
                                                        'over 2000 steps)')
    p.add_argument('--steps', type=int, default=5000, help='optimizer steps per lr')
    p.add_argument('--every', type=int, default=500, help='score every N steps')
    p.add_argument('--out', default='runs/mm-pretraining', help='run folders')
    p.add_argument('--jobs', type=int, default=2, help='learning rates trained at a time, one thread each')
    p.add_argument('--report', default=os.path.join(HERE, 'maskmentor-pretraining'), help='where results.* go')
    p.add_argument('--scenes', type=int, default=0, help='score on the first N held-out scenes and take the '
                                                          'baselines from the first N training scenes (0: all; a '
                                                          'quick check: the study refuses such a report)')
    p.add_argument('--tables', action='store_true', help="rewrite results.md and results.png from results.json")
    p.add_argument('--score', metavar='CHECKPOINT', help="score a trained MaskMentor pre-training checkpoint (e.g. "
                                                         "the study's, runs/study/val_*_pre_training-0/backbone.pth) "
                                                         "against the baselines on the held-out scenes; no training")
    args = p.parse_args(argv)
    if args.score:
        return score_checkpoint(args.score, args.scenes)
    if args.tables:
        path = os.path.join(args.report, 'results.json')
        if not os.path.isfile(path):
            p.error(f"--tables reads {path}, which does not exist: point --report at a folder this command wrote")
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--tables cannot read {path} ({e}): rerun the curves to rewrite it")
        write_report({float(k): v for k, v in saved.items()}, args.report)
        return 0
    try:
        lrs = [float(v) for v in args.lrs.split(',')]
    except ValueError:
        p.error(f"--lrs takes comma-separated numbers, not {args.lrs!r}")
    if args.steps < 1 or args.every < 1 or not all(lr > 0 for lr in lrs):
        p.error("--steps, --every and every lr must be > 0")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.scenes < 0:
        p.error(f"--scenes must be >= 0 (0: all), not {args.scenes}")
    check_outputs(args.out, args.report)
    results = {}
    os.makedirs(args.report, exist_ok=True)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context('spawn')) as pool:
        futures = {pool.submit(curve_job, lr, args.steps, args.every, args.out, args.scenes): lr for lr in lrs}
        for future in as_completed(futures):
            points, baseline = future.result()
            results[futures[future]] = dict(points=points, baseline=baseline, dataset=VALIDATION, scenes=args.scenes)
            with open(os.path.join(args.report, 'results.json'), 'w') as f:  # as each lr ends: an interruption keeps them
                json.dump({f"{k:g}": results[k] for k in sorted(results)}, f, indent=1)
    write_report({k: results[k] for k in sorted(results)}, args.report)


def score_checkpoint(path, scenes=0):
    """Print a pre-training checkpoint's loss / baseline on the held-out scenes of the
    validation preset (the curves' columns, one fixed mask per scene); below 1 is better
    than the trivial prediction."""
    import eval as ev
    if not os.path.isfile(path):
        raise SystemExit(f"error: --score {path}: no such file")
    try:
        model, run = ev.load_model(path)
    except rgbx.CheckpointError as e:
        raise SystemExit(f"error: --score {path}: {e}")
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --score {path}: {str(e).split(';')[0]}: --score takes a MaskMentor "
                         f"pre-training run's checkpoint (e.g. runs/study/val_*_pre_training-0/backbone.pth)")
    if not getattr(model, 'pretraining', False) or run.dataset != VALIDATION:
        raise SystemExit(f"error: --score {path}: not a MaskMentor pre-training run on {VALIDATION} "
                         f"(its held-out scenes would not be held out)")
    torch.manual_seed(0)
    loss, baseline = scores(model, validation_batches(scenes=scenes), priors(model, data.get_preset(VALIDATION)
                                                                                .num_classes, scenes))
    print(f"{path}: " + ', '.join(f"{t} {loss[t] / baseline[t]:.3f}" for t in COLUMNS) +
          ''.join(f", depth / {n} {loss['depth'] / baseline[t]:.3f}" for t, n in DEPTH_BASELINES) +
          ', ' + ', '.join(f"{t} {loss[t]:.3f}" for t in STRUCTURE))
    return 0


def write_report(results, report):
    """results.md and results.png of {lr: {'points', 'baseline'}}."""
    steps = max(p['step'] for r in results.values() for p in r['points'])
    with open(os.path.join(report, 'results.md'), 'w') as f:
        f.write(markdown(results, steps))
    plot(results, os.path.join(report, 'results.png'))
    print(f"wrote {os.path.join(report, 'results.md')}")


if __name__ == '__main__':
    sys.exit(main())
