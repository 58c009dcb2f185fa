"""Data for RGB-X semantic segmentation: dataset presets (classes, X modalities,
folder layouts, training crop), the community's prepared folder layout (CMX /
SA-Gate / DFormer), a built-in synthetic RGB-D demo, joint augmentation and
colourising. Nothing here depends on a method: a method's recipe (how it scales X,
its learning rate ...) is rgbx's, and train.py passes what the data needs.

Every dataset item is a triple (rgb, x, label):
    rgb   float32 (3, H, W)    channel order R, G, B (never BGR): v / 255, then
                               (v - mean) / std with the ImageNet statistics;
    x     float32 (C_x, H, W)  8-bit files: v / 255; 16-bit grey files (depth in mm):
                               v / Modality.max16 (10000: 1.0 = 10 m; 0 = invalid
                               stays 0, nothing is filled); then (v - mean) / std of
                               the modality (Preset.x_norm; or, unstandardised, the
                               [0, 1] values as they are). Each modality reads one
                               bit depth: 8-bit depth (mm expected) and any PNG of 16
                               bits per colour channel (which Pillow cuts to 8) are
                               errors that say which conversion to do;
    label int64 (H, W)         classes 0..K-1 and 255 = ignore.
Labels on disk: value v becomes v + Preset.label_shift, computed in int64; negative
results and an on-disk 255 become 255. NYUDv2 stores 0 = void and 1..40, so with
shift -1: 0 -> 255, 1 -> 0, 40 -> 39, and 41 is an error (never `label - 1` on uint8).
Nothing is resized, clipped or skipped when reading: a missing file, undecodable image,
sizes that disagree, a label value outside the classes, an id listed twice in a split
or a split file that is not UTF-8 raises an error naming the file and the fix.
"""
import errno
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IGNORE = 255
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # (mean, std) on [0, 1] RGB
EXTENSIONS = ('.png', '.jpg', '.jpeg')  # tried in this order where a split file gives no or another extension


# ----------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Modality:
    """One X modality: channels, normalisation (mean, std per channel on the [0, 1]
    scale) and max16, the divisor of 16-bit files (0: 16-bit files are an error)."""
    channels: int
    mean: tuple
    std: tuple
    max16: float = 0.0


@dataclass(frozen=True)
class Layout:
    """Folder names under a dataset root. x maps each modality to its folder; None
    means X is the 4th channel of the RGB file (MFNet's own RGBA release)."""
    rgb: str
    label: str
    x: dict


@dataclass(frozen=True)
class Preset:
    """A dataset: classes, X modalities, folder layouts (the first whose RGB folder
    exists under the root is read; none: the generated demo), the training crop (H, W)
    and default root (relative to the working directory, as CMX's `datasets/`).
    `defaults`: training settings of the built-in demo (epochs, lr, ...), which replace
    the methods' recipes there; real datasets train with their method's recipe."""
    class_names: tuple
    modalities: dict
    default_x: str
    layouts: tuple
    crop: tuple
    root: str = ''
    label_shift: int = 0
    ignore_index: int = IGNORE
    palette: tuple = ()  # colours of the classes; () = the VOC colormap
    rgb_norm: tuple = IMAGENET
    holdout: int = 0  # the demo only: training scenes held out as its 'test' split (a validation preset)
    defaults: dict = field(default_factory=dict)

    @property
    def num_classes(self):
        return len(self.class_names)

    def x_name(self, x=None):
        """The X modality name: `x`, or the preset's default when None."""
        x = x or self.default_x
        if x not in self.modalities:
            raise ValueError(f"unknown X modality {x!r} for this dataset; choose one of {sorted(self.modalities)}")
        return x

    def x_channels(self, x=None):
        return self.modalities[self.x_name(x)].channels

    @property
    def generated(self):
        """Whether the data is generated in memory (the demo) rather than read from a folder."""
        return not self.layouts

    def x_norm(self, x=None, standardised=True):
        """(mean, std) of X on the [0, 1] scale: the modality's, or (0, 1) for X fed as
        its [0, 1] values (standardised=False, a method's recipe decides)."""
        m = self.modalities[self.x_name(x)]
        return (m.mean, m.std) if standardised else ((0.0,) * m.channels, (1.0,) * m.channels)


# X statistics. Depth: measured on real NYUDv2 frames (mm / 10000, holes included).
# Other X images have no measured statistics here: ImageNet's, as CMX normalises every
# X (their mean for 1-channel X).
IMAGE = Modality(3, *IMAGENET)  # 8-bit 3-channel X: HHA, AoLP, DeLiVER's
GREY = Modality(1, (0.449,), (0.226,))  # 8-bit 1-channel X: thermal, NIR, DoLP, SAR
DEPTH = Modality(1, (0.25,), (0.15,), max16=10000.0)
# DFormer's 8-bit depth PNGs (Depth/ of its NYUDepthv2 and SUNRGBD folders: each image's depth
# min-max stretched to 0..255), read as v / 255 (1 channel; grey saved as 3 equal channels reads
# losslessly as 1), as the KTB release reads SUN RGB-D's X. No measured statistics: ImageNet's mean.
DEPTH8 = Modality(1, (0.449,), (0.226,))
# MCubeS' AoLP as its release stores it: polL_aolp_sin/ and polL_aolp_cos/ .npy in [-1, 1], stacked
# (sin, cos, sin) as CMNeXt and the KTB release feed them; fed as they are (mean 0, std 1).
AOLP_NPY = Modality(3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

NYU40 = ('wall', 'floor', 'cabinet', 'bed', 'chair', 'sofa', 'table', 'door', 'window', 'bookshelf',
         'picture', 'counter', 'blinds', 'desk', 'shelves', 'curtain', 'dresser', 'pillow', 'mirror',
         'floor mat', 'clothes', 'ceiling', 'books', 'refridgerator', 'television', 'paper', 'towel',
         'shower curtain', 'box', 'whiteboard', 'person', 'night stand', 'toilet', 'sink', 'lamp',
         'bathtub', 'bag', 'otherstructure', 'otherfurniture', 'otherprop')
RGBD_LAYOUT = (Layout('RGB', 'Label', {'hha': 'HHA', 'depth': 'Depth', 'depth8': 'Depth'}),)


def demo_preset(size, holdout=0):
    """The built-in synthetic dataset (DemoDataset) with scenes of size x size pixels:
    no folder layout (nothing is read from disk); depth generated in [0, 1], its
    statistics measured on the scenes. holdout > 0: a validation preset whose 'train'
    split is the first 256 - holdout training scenes and whose 'test' split is the last
    `holdout` training scenes (never the test scenes)."""
    return Preset(('background', 'red low', 'red high', 'blue low', 'blue high'),
                  {'depth': Modality(1, (0.68,), (0.13,))}, 'depth', (), (size, size), holdout=holdout,
                  defaults=dict(epochs=20, lr=1e-3, weight_decay=0.01, batch_size=4, warmup_epochs=1))


PRESETS = {
    'demo': demo_preset(64),
    'demo128': demo_preset(128),  # an 8 x 8 token grid for ViT/16: the reproduction study's data
    'demo128-val': demo_preset(128, holdout=64),  # the study's validation split, for decisions a paper leaves open
    # on disk 0 = void, 1..40 (SA-Gate / CMX / DFormer)
    'nyudv2': Preset(NYU40, {'hha': IMAGE, 'depth': DEPTH, 'depth8': DEPTH8}, 'hha', RGBD_LAYOUT,
                     (480, 640),
                     'datasets/NYUDepthv2', label_shift=-1),
    # SUN RGB-D's 37 classes are NYU-40's first 37; on disk 0 = void, 1..37. The original
    # bit-rotated 16-bit depth must be converted to millimetres first (depth), or DFormer's
    # 8-bit Depth/ PNGs read as they are (depth8: the KTB release's SUN RGB-D X).
    'sunrgbd': Preset(NYU40[:37], {'hha': IMAGE, 'depth': DEPTH, 'depth8': DEPTH8}, 'hha', RGBD_LAYOUT,
                      (480, 480),
                      'datasets/SUNRGBD', label_shift=-1),
    # 0 = unlabelled is a class, as in the community. Three layouts: prepared RGB/ Thermal/
    # Label/; MFNet's release: images/ (RGBA PNG, thermal in alpha), labels/, {train,val,test}.txt;
    # the KTB release's: rgb/ ther/ labels/, {train,test}.txt
    'mfnet': Preset(('unlabelled', 'car', 'person', 'bike', 'curve', 'car_stop', 'guardrail', 'color_cone',
                     'bump'), {'thermal': GREY}, 'thermal',
                    (Layout('RGB', 'Label', {'thermal': 'Thermal'}), Layout('images', 'labels', {'thermal': None}),
                     Layout('rgb', 'labels', {'thermal': 'ther'})),
                    (480, 640), 'datasets/MFNet',
                    palette=((0, 0, 0), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 192), (128, 128, 0),
                             (64, 64, 128), (192, 128, 128), (192, 64, 0))),
    # prepared RGB/ Thermal/ Label/, or the release's rgb/ thermal/ labels/ (per split folder,
    # see RGBXDataset).
    'pst900': Preset(('background', 'fire extinguisher', 'backpack', 'hand drill', 'survivor'),
                     {'thermal': GREY}, 'thermal',
                     (Layout('RGB', 'Label', {'thermal': 'Thermal'}), Layout('rgb', 'labels', {'thermal': 'thermal'})),
                     (480, 640), 'datasets/PST900'),
    # CMNeXt's class order; GT 0..19, 255 = void. Prepared RGB/ AoLP/ DoLP/ NIR/ Label/ (8-bit
    # images: AoLP as (sin, cos, sin) scaled to 0..255), or the release's multimodal_dataset/
    # folder, whose AoLP is read from its .npy files (aolp-npy; split list_folder/test.txt).
    'mcubes': Preset(('asphalt', 'concrete', 'metal', 'road_marking', 'fabric', 'glass', 'plaster', 'plastic',
                      'rubber', 'sand', 'gravel', 'ceramic', 'cobblestone', 'brick', 'grass', 'wood', 'leaf',
                      'water', 'human', 'sky'), {'aolp': IMAGE, 'dolp': GREY, 'nir': GREY, 'aolp-npy': AOLP_NPY},
                     'aolp',
                     (Layout('RGB', 'Label', {'aolp': 'AoLP', 'dolp': 'DoLP', 'nir': 'NIR'}),
                      Layout('polL_color', 'GT', {'aolp-npy': ('polL_aolp_sin', 'polL_aolp_cos'), 'nir': 'NIR_warped'})),
                     (512, 512), 'datasets/MCubeS'),
    # CMNeXt's classes; on disk 0 and 255 = void, 1..25. X with 3 channels, as CMNeXt feeds
    # them (it repeats 1-channel files: save those as 3 channels). The release's
    # img/<weather>/<split>/... tree must be flattened into this layout. Default X = event.
    'deliver': Preset(('Building', 'Fence', 'Other', 'Pedestrian', 'Pole', 'RoadLine', 'Road', 'SideWalk',
                       'Vegetation', 'Cars', 'Wall', 'TrafficSign', 'Sky', 'Ground', 'Bridge', 'RailTrack',
                       'GroundRail', 'TrafficLight', 'Static', 'Dynamic', 'Water', 'Terrain', 'TwoWheeler', 'Bus',
                       'Truck'), {'depth': IMAGE, 'event': IMAGE, 'lidar': IMAGE}, 'event',
                      (Layout('RGB', 'Label', {'depth': 'Depth', 'event': 'Event', 'lidar': 'LiDAR'}),),
                      (768, 768), 'datasets/DELIVER',
                      label_shift=-1),
    # The official README gives 0 background, 10 farmland, ..., 70 others: 7 land-use
    # classes; background is ignored (as SOLC does). Labels must be stored divided by 10
    # (0..7).
    'whu-opt-sar': Preset(('farmland', 'city', 'village', 'water', 'forest', 'road', 'others'),
                          {'sar': GREY}, 'sar', (Layout('RGB', 'Label', {'sar': 'SAR'}),),
                          (512, 512), 'datasets/WHU-OPT-SAR',
                          label_shift=-1),
}


def get_preset(preset):
    """A Preset, given one or its name in PRESETS."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown dataset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


# ----------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
TO_8BIT = ("save it as 8 bits per channel on 0..255 (full-range 16-bit data: round(v / 257); 12-bit data: "
           "round(v * 255 / 4095))")


def png_bit_depth(path):
    """Bits per channel a PNG stores (its IHDR header), 8 for any other file."""
    with open(path, 'rb') as f:
        head = f.read(26)
    return head[24] if head[:8] == PNG_SIGNATURE and head[12:16] == b'IHDR' else 8


def open_image(path, modes, what, fix16=TO_8BIT):
    """Decode an image file with PIL into a numpy array as stored ((H, W) or (H, W, C);
    uint8, or uint16 / int32 for 16-bit grey PNGs; palette images give their indices).
    `modes` are the PIL modes accepted for `what`. A PNG of 16 bits per channel in
    colour (PIL mode RGB / RGBA, which keeps only the high byte: 12-bit data comes back
    near-black) is an error whose fix is `fix16`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the {what})")
    try:
        with Image.open(path) as im:
            mode, arr = im.mode, np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path} cannot be decoded as an image ({e}); re-save it as PNG") from e
    if mode not in modes:
        raise ValueError(f"{path} is a PIL {mode!r} image; the {what} must be one of the modes {modes}")
    if arr.dtype == np.uint8 and arr.ndim == 3 and png_bit_depth(path) == 16:
        raise ValueError(f"{path} stores 16 bits per channel in {arr.shape[2]} channels, which Pillow reads as 8 "
                         f"(the high byte only); the {what}: {fix16}")
    return arr


def read_rgb(path, alpha=False):
    """An 8-bit RGB file -> uint8 (H, W, 3); with alpha=True an RGBA file -> (H, W, 4)."""
    return open_image(path, ('RGBA',) if alpha else ('RGB',),
                      'RGBA image (RGB + thermal in alpha)' if alpha else
                      "8-bit RGB image (convert with Image.open(p).convert('RGB'); MFNet's RGBA files "
                      "belong in the images/ folder of its layout, or split them with split_rgbt)")


def split_rgbt(rgbt):
    """MFNet's 4-channel image (H, W, 4) -> rgb (H, W, 3) and thermal (H, W, 1), both uint8."""
    if rgbt.ndim != 3 or rgbt.shape[2] != 4:
        raise ValueError(f"an RGB-thermal image has shape (H, W, 4), not {rgbt.shape}")
    return rgbt[..., :3], rgbt[..., 3:]


def scale_x(arr, modality, path):
    """A stored X image -> float32 (H, W, C) on its [0, 1] scale: 8-bit / 255 for X
    without max16, 16-bit grey / modality.max16 for X with it (depth in mm); the other
    bit depth is an error. Grey saved as 3 equal channels (as many RGB-T releases do) is read
    as 1 channel, losslessly; any other channel mismatch is an error."""
    if arr.dtype == np.uint8 and modality.max16:
        raise ValueError(f"{path} is an 8-bit image; this X is read from 16-bit files (depth in millimetres, "
                         f"/ {modality.max16:g}), never as v / 255: save it as a 1-channel 16-bit PNG in millimetres "
                         f"(Image.fromarray(mm.astype(np.uint16)).save(p))")
    if arr.dtype == np.uint8:
        v = arr.astype(np.float32) / 255
    elif arr.ndim == 2 and modality.max16:
        v = arr.astype(np.float32) / modality.max16
    else:
        raise ValueError(f"{path}: a {arr.dtype} image cannot be this X (16-bit files are read for depth only, "
                         f"in millimetres); save it as an 8-bit PNG")
    v = v.reshape(*v.shape[:2], -1)  # (H, W, C)
    c, want = v.shape[2], modality.channels
    if c == want:
        return v
    if c == 3 and want == 1 and (v == v[..., :1]).all():
        return v[..., :1]
    raise ValueError(f"{path} has {c} channels; this X modality has {want}: re-save it with {want}")


def read_aolp_npy(sin_path, cos_path):
    """MCubeS' AoLP as its release stores it, sin and cos of the angle (H, W) in [-1, 1]
    in two .npy files -> float32 (H, W, 3) stacked (sin, cos, sin), as CMNeXt feeds it."""
    sin, cos = (np.load(p, allow_pickle=False) for p in (sin_path, cos_path))
    for p, a in ((sin_path, sin), (cos_path, cos)):
        if a.ndim != 2 or not np.isfinite(a).all() or np.abs(a).max(initial=0) > 1 + 1e-6:
            raise ValueError(f"{p}: MCubeS' AoLP .npy holds one (H, W) map of finite values in [-1, 1], not "
                             f"shape {a.shape} of range {a.min(initial=0):.3g}..{a.max(initial=0):.3g}")
    check_sizes((sin_path, sin), (cos_path, cos))
    return np.stack([sin, cos, sin], -1).astype(np.float32)


def read_x(path, modality):
    """An X file (8-bit grey or RGB, or 16-bit grey) -> float32 (H, W, C), see scale_x."""
    arr = open_image(path, ('L', 'RGB', 'I;16', 'I'), 'X image (8-bit grey/RGB, or 16-bit grey depth in mm)',
                     "save depth as a 1-channel 16-bit PNG in millimetres" if modality.max16 else TO_8BIT)
    return scale_x(arr, modality, path)


def shift_label(raw, preset, path='label'):
    """On-disk label values (H, W) -> classes int64 (H, W): v + shift in int64; negative
    results and on-disk 255 become 255 (NYUDv2: 0 -> 255, 1 -> 0, 40 -> 39). Any other
    value outside 0..K-1 is an error naming the file and the values."""
    preset = get_preset(preset)
    lab = raw.astype(np.int64) + preset.label_shift
    void = (lab < 0) | (raw == preset.ignore_index)
    bad = ~void & (lab >= preset.num_classes)
    if bad.any():
        stored = sorted(set(np.unique(raw[bad]).tolist()))
        raise ValueError(f"{path}: on-disk label values {stored} are outside the {preset.num_classes} classes "
                         f"(on disk {-preset.label_shift}..{preset.num_classes - 1 - preset.label_shift}, "
                         f"255 = ignore, {'0 = void, ' if preset.label_shift else ''}shift {preset.label_shift}): "
                         f"wrong dataset preset, or the labels need converting to class indices")
    lab[void] = preset.ignore_index
    return lab


def read_label(path, preset):
    """A label file of class indices (8/16-bit grey or palette PNG) -> int64 (H, W)."""
    arr = open_image(path, ('L', 'P', 'I;16', 'I'),
                     'label image of class indices (a colour-coded label must be converted to indices first)')
    return shift_label(arr, preset, path)


def check_sizes(*pairs):
    """Raise unless all arrays of (path, array) pairs share their (H, W)."""
    sizes = {str(p): a.shape[:2] for p, a in pairs}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"sizes (H, W) disagree: {sizes}; nothing is resized here: re-export the files "
                         f"at one size (and check they are the same scene)")


def load_pair(rgb_path, x_path, preset, x_modality=None, x_standardised=True, x=None):
    """Your own RGB and X images -> normalised rgb (3, H, W) and x (C, H, W) tensors
    (X standardised or not, see Preset.x_norm). `x`: X already on its [0, 1] scale,
    float (H, W, C) (e.g. HHA computed from depth), instead of reading `x_path`."""
    preset = get_preset(preset)
    rgb = read_rgb(rgb_path)
    x = read_x(x_path, preset.modalities[preset.x_name(x_modality)]) if x is None else x
    check_sizes((rgb_path, rgb), (x_path, x))
    return normalize(*to_chw(rgb, x), preset.rgb_norm, preset.x_norm(x_modality, x_standardised))


def x_from_depth(path, preset, x_modality, camera=None, scale=0.001):
    """X on its [0, 1] scale, float32 (H, W, C), from a depth image (16-bit PNG, `scale`
    metres per stored unit): HHA computed from it (`hha`, which needs the `camera`)
    when the X modality is HHA, the depth itself when it is depth. Returns (x, what was done)."""
    preset = get_preset(preset)
    name = preset.x_name(x_modality)
    depth, missing = read_depth_metres(path, scale)
    if name == 'hha':
        if camera is None:
            raise ValueError("this model takes HHA: computing it from depth needs the camera (--camera nyu or "
                             "FX,FY,CX,CY)")
        return hha(depth, camera, missing).astype(np.float32) / 255, f"HHA computed from {path}"
    modality = preset.modalities[name]
    if not modality.max16:
        raise ValueError(f"this model takes {name} as X, read from 8-bit files (v / 255" + (
            ": the demo's synthetic depth in [0, 1], not metres" if name == 'depth' else '') + "): pass that image with --x")
    return (depth * 1000 / modality.max16).astype(np.float32)[..., None], f"depth read from {path}"


# ----------------------------------------------------------------------------
# Writing files
# ----------------------------------------------------------------------------

class DiskFull(OSError):
    pass


@contextmanager
def disk_full_names(path):
    """Turn the OS's "no space left" while writing `path` into a DiskFull error naming it."""
    try:
        yield
    except BaseException as e:
        if no_space(e):
            raise DiskFull(f"disk full: cannot write {path}; free space on that disk or write to another one") \
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


# ----------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------

AUGMENT, DEMO = 0, 1  # independent random streams


def sample_rng(stream, seed, step, index):
    """The random numbers of one sample, a pure function of (stream, seed, step, index),
    step = the epoch for augmentation, the split for demo scenes: any worker, any sample
    order and a resumed run draw the same numbers (the stream leads: numpy's seeding
    ignores trailing zeros)."""
    return np.random.default_rng([stream, seed, step, index])


class SegmentationDataset(torch.utils.data.Dataset):
    """Items (rgb, x, label) = transform(*read(i), rng); the augmentation rng of item i
    is sample_rng(AUGMENT, seed, epoch, i), with the epoch set by set_epoch."""

    def __init__(self, preset, x_modality, transform, seed):
        self.preset = get_preset(preset)
        self.x_modality = self.preset.x_name(x_modality)
        self.transform = transform or EvalTransform(self.preset.rgb_norm, self.preset.x_norm(self.x_modality))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        return self.transform(*self.read(index), sample_rng(AUGMENT, self.seed, self.epoch, index))

    def __len__(self):
        return len(self.names)


class RGBXDataset(SegmentationDataset):
    """A dataset in the community's prepared layout:
        root/RGB/<id>.jpg|png, root/<X folder>/<id>.png|jpg, root/Label/<id>.png,
        root/train.txt, root/test.txt
    (folder names per preset: Preset.layouts). A split file line is either
    "RGB/<id>.jpg Label/<id>.png" (tab or space separated) or just "<id>"; the X file is
    the RGB path with the X folder instead of RGB and any of the EXTENSIONS. `split` is
    a name (root/<split>.txt) or a path to a split file (lines relative to root). When
    root/<split>.txt is absent but root/<split>/ exists (PST900's release: test/rgb/...),
    every image in its RGB folder is a sample. MFNet's release is read through its
    layout: images/<id>.png are RGBA, thermal is the alpha channel (split_rgbt).
    All files are located when the dataset is built; `names` are the sample ids."""

    def __init__(self, root, split, preset, x_modality=None, transform=None, seed=0):
        super().__init__(preset, x_modality, transform, seed)
        self.root, lines, source = read_split(Path(root), split, self.preset, self.x_modality)
        self.source = source
        self.layout = find_layout(self.root, self.preset, self.x_modality)
        self.hha_from_depth_hint()
        self.samples = [self.locate(line, f"{source} line {i + 1}") for i, line in enumerate(lines)]
        self.names = [name for name, *_ in self.samples]  # ids as listed ('a/0': RGB/a/0.png), unique
        seen = {}
        for i, name in enumerate(self.names):
            if name in seen:
                raise ValueError(f"{source}: sample {name!r} is listed twice ({'lines' if source.is_file() else 'images'} "
                                 f"{seen[name] + 1} and {i + 1}); "
                                 f"each sample once, or the mIoU counts it twice")
            seen[name] = i

    def hha_from_depth_hint(self):
        """A dataset released with depth only has no HHA folder: say how to make one (HHA is
        never converted on the fly: it would be recomputed for every sample of every epoch)."""
        folders = self.layout.x
        if self.x_modality == 'hha' and not (self.root / folders['hha']).is_dir() and 'depth' in folders \
                and (self.root / folders['depth']).is_dir():
            raise FileNotFoundError(
                f"{self.root} has {folders['depth']}/ but no {folders['hha']}/: compute HHA once with "
                f"`python data.py hha --depth {self.root / folders['depth']} --out {self.root / folders['hha']} "
                f"--camera nyu` (or FX,FY,CX,CY of your camera), or train on depth (--x-modality depth)")

    def locate(self, line, where):
        """One split-file line -> (name, rgb path, x path or None, label path)."""
        cols = line.split()
        if len(cols) > 1 and not any('/' in c for c in cols):  # a bare id with spaces in it
            cols = [line.strip()]
        if len(cols) > 2:
            raise ValueError(f"{where}: {line!r} has {len(cols)} columns; expected 'RGB/<id>.jpg Label/<id>.png' "
                             f"or '<id>'")
        lay = self.layout
        as_id = '/' not in cols[0] or (len(cols) == 1 and cols[0].split('/')[0] != lay.rgb
                                       and any((self.root / lay.rgb / (cols[0] + e)).is_file() for e in ('',) + EXTENSIONS))
        rgb = f"{lay.rgb}/{cols[0]}" if as_id else cols[0]  # an id (which may hold '/'), or a path from the root
        folder, _, rest = rgb.partition('/')
        if folder != lay.rgb:
            raise ValueError(f"{where}: {rgb!r} is not in the RGB folder {lay.rgb}/ of this layout")
        stem = str(Path(rest).with_suffix('')) if Path(rest).suffix.lower() in EXTENSIONS else rest
        if self.x_modality not in lay.x:
            raise ValueError(f"X modality {self.x_modality!r} is not stored in the layout found at {self.root} "
                             f"(its X folders: {', '.join(lay.x)}): pick one of those with --x-modality")
        x_folder = lay.x[self.x_modality]
        if isinstance(x_folder, tuple):  # X read from .npy files, one per folder (MCubeS' AoLP)
            x_path = tuple(self.root / folder / f"{stem}.npy" for folder in x_folder)
            for path in x_path:
                if not path.is_file():
                    raise FileNotFoundError(f"{where}: {path} not found; every sample needs its "
                                            f"{' and '.join(x_folder)} .npy files under the same id")
        else:
            x_path = None if x_folder is None else find_file(self.root, f"{x_folder}/{stem}", where)
        return (stem, find_file(self.root, rgb, where), x_path,
                find_file(self.root, cols[1] if len(cols) == 2 else f"{lay.label}/{stem}", where, LOSSLESS))

    def read(self, index):
        """Sample `index` before the transform: rgb uint8 (H, W, 3), x float32 (H, W, C)
        on its [0, 1] scale, label int64 (H, W)."""
        _, rgb_path, x_path, label_path = self.samples[index]
        modality = self.preset.modalities[self.x_modality]
        if x_path is None:
            rgb, x = split_rgbt(read_rgb(rgb_path, alpha=True))
            x, x_path = scale_x(x, modality, rgb_path), rgb_path
        elif isinstance(x_path, tuple):
            rgb, x = read_rgb(rgb_path), read_aolp_npy(*x_path)
        else:
            rgb, x = read_rgb(rgb_path), read_x(x_path, modality)
        label = read_label(label_path, self.preset)
        check_sizes((rgb_path, rgb), (x_path, x), (label_path, label))
        return rgb, x, label


def describe(root, preset, x_modality):
    """The layouts a preset reads, as text for error messages."""
    x = preset.x_name(x_modality)

    def x_files(folder):
        if isinstance(folder, tuple):
            return ''.join(f"{f}/<id>.npy, " for f in folder)
        return f"{folder}/<id>.png|jpg, " if folder else ''
    return ' or '.join(f"{root}/{{{lay.rgb}/<id>.jpg|png, {x_files(lay.x[x])}{lay.label}/<id>.png, train.txt, "
                       f"test.txt}}" + (' (RGBA: thermal in alpha)' if lay.x[x] is None else '')
                       for lay in preset.layouts if x in lay.x)


def find_layout(root, preset, x_modality):
    """The first layout of the preset whose RGB folder exists under root."""
    for lay in preset.layouts:
        if (root / lay.rgb).is_dir():
            return lay
    raise FileNotFoundError(f"no dataset found at {root}: expected {describe(root, preset, x_modality)}. "
                            f"Put the data there or pass the folder that holds it (--data-root)")


def read_split(root, split, preset, x_modality):
    """(root, lines, source) of a split: the non-blank lines of root/<split>.txt, or of
    the split file `split`; or, when root/<split>/ is a folder holding the layout instead
    (PST900's release), that folder as root and the ids of the images in its RGB folder."""
    named = not str(split).endswith('.txt')
    path = root / f"{split}.txt" if named else Path(split)
    if named and not path.is_file() and (root / split).is_dir():
        folder = root / split
        images = (folder / find_layout(folder, preset, x_modality).rgb).iterdir()
        return folder, sorted(p.stem for p in images if p.suffix.lower() in EXTENSIONS), folder
    if not path.is_file():
        find_layout(root, preset, x_modality)  # a root that holds no dataset at all is reported as such
        raise FileNotFoundError(f"split file {path} not found: expected lines like 'RGB/0.jpg Label/0.png' or "
                                f"'0' (or a folder {root / str(split)}/ holding the layout)")
    try:
        text = path.read_bytes().decode('utf-8-sig')  # a UTF-8 byte order mark is dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"split file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                         f"re-save it as UTF-8") from None
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if not lines:
        raise ValueError(f"split file {path} is empty: list one sample per line, e.g. 'RGB/0.jpg Label/0.png'")
    return root, lines, path


LOSSLESS = ('.png',)  # labels: a lossy format (JPEG) changes class values at edges


def find_file(root, rel, where, extensions=EXTENSIONS):
    """root/rel as listed, else root/rel with its extension replaced by one of `extensions`;
    a file found only in another format (a JPEG label) is an error that says so."""
    path = root / rel
    stem = str(path.with_suffix('') if path.suffix.lower() in EXTENSIONS else path)
    if path.is_file() and path.suffix.lower() in extensions:
        return path
    for ext in extensions:
        if Path(stem + ext).is_file():
            return Path(stem + ext)
    other = [stem + ext for ext in EXTENSIONS if ext not in extensions and Path(stem + ext).is_file()]
    if other:
        raise ValueError(f"{where}: {other[0]} is a lossy file; labels are read from {', '.join(extensions)} files only "
                         f"(JPEG compression changes class values at every edge): convert the labels to PNG")
    raise FileNotFoundError(f"{where}: {path} not found (also tried {', '.join(extensions)}); every sample needs "
                            f"its RGB, X and label file in the layout's folders, under the same id")


class DemoDataset(SegmentationDataset):
    """Built-in synthetic RGB-D scenes, generated in memory from (seed, split, index);
    presets 'demo' (64 x 64) and 'demo128' (128 x 128), X = 1-channel depth.

    A top-down view of a floor with 3-6 objects (discs and rectangles of random size
    and position, drawn in random order, so they occlude each other at random).
    Classes: 0 background, 1 red low, 2 red high, 3 blue low, 4 blue high: colour and
    height are drawn independently, so a class needs both.
    - RGB: floor of a random dull hue (never red or blue) with a smooth texture; red or
      blue objects with per-object tint and noise; a multiplicative illumination ramp
      (0.5-1.3) and pixel noise. Nothing in RGB depends on height.
    - Depth in [0, 1]: a tilted floor plane whose level varies per scene (0.6-0.85),
      objects raised 0.08-0.14 (low) or 0.20-0.28 (high) above it, noise (sigma 0.015)
      and 1 % invalid pixels (0). Absolute depth overlaps across scenes: height is
      relative to the floor around the object. Nothing in depth depends on colour.
    So RGB alone tells colour but not height, depth alone height but not colour, RGB-D
    everything. Best expected mIoU with one modality: background about 1 and each colour
    (or height) pair split at random, IoU 1/3 per object class: (1 + 4/3) / 5 = 0.47;
    with both close to 1. Measured with a per-pixel nearest-centroid classifier (tests):
    on chromaticity and depth minus the scene's median, RGB 0.43, depth 0.42, both 0.98;
    on raw RGB and depth values both reach only 0.62 (the floor level needs context).
    """
    SPLITS = ('train', 'test')
    # a validation split carved from the training scenes: 'fit' = train scenes 0-223, 'val' = 224-255
    CARVED = {'train': ('train', 0, 256), 'test': ('test', 0, 64), 'fit': ('train', 0, 224), 'val': ('train', 224, 32)}

    def __init__(self, split='train', n=None, size=64, seed=0, transform=None, preset='demo'):
        if split not in self.CARVED:
            raise ValueError(f"demo split {split!r}: choose one of {tuple(self.CARVED)}")
        super().__init__(preset, None, transform, seed)
        self.split, self.size = split, size
        holdout = self.preset.holdout  # a validation preset: both its splits are carved from the training scenes
        carved = dict(self.CARVED, train=('train', 0, 256 - holdout), test=('train', 256 - holdout, holdout)) \
            if holdout else self.CARVED
        self.source, self.first, count = carved[split]
        self.names = [f"{self.source}_{self.first + i:04d}" for i in range(n or count)]

    def read(self, index):
        """Scene `index`: rgb uint8 (H, W, 3), depth float32 (H, W, 1), label int64 (H, W)."""
        return demo_scene(sample_rng(DEMO, self.seed, self.SPLITS.index(self.source), self.first + index), self.size)


def demo_scene(rng, size):
    """One demo scene (see DemoDataset) drawn from the generator `rng`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (H, W) in [0, 1)
    floor = rng.uniform(0.6, 0.85) + rng.uniform(-0.05, 0.05) * (xx - 0.5) + rng.uniform(-0.05, 0.05) * (yy - 0.5)
    waves = sum(np.sin(2 * np.pi * (rng.uniform(1, 4) * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform()))
                for a in rng.uniform(0, np.pi, 3))
    hue = np.array([rng.uniform(0.35, 0.6), rng.uniform(0.45, 0.65), rng.uniform(0.25, 0.45)])  # dull green-grey
    rgb = hue * (1 + 0.06 * waves)[..., None]
    depth, label = floor.copy(), np.zeros((size, size), np.int64)
    for _ in range(rng.integers(3, 7)):
        cls, disc = rng.integers(1, 5), rng.random() < 0.5
        cy, cx, ry, rx = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.07, 0.18), rng.uniform(0.07, 0.18)
        mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1) if disc else \
            (abs(yy - cy) < ry) & (abs(xx - cx) < rx)
        red, high = cls in (1, 2), cls in (2, 4)
        base = np.array([0.75, 0.15, 0.15] if red else [0.15, 0.25, 0.75]) + rng.uniform(-0.08, 0.08, 3)
        rgb[mask] = base * (1 + 0.08 * rng.standard_normal((mask.sum(), 1)))
        depth[mask] = floor[mask] - (rng.uniform(0.20, 0.28) if high else rng.uniform(0.08, 0.14))
        label[mask] = cls
    light = rng.uniform(0.5, 1.3) + rng.uniform(-0.3, 0.3) * (xx - 0.5)  # illumination ramp
    rgb = rgb * light[..., None] + 0.04 * rng.standard_normal(rgb.shape)
    depth = depth + 0.015 * rng.standard_normal(depth.shape)
    depth[rng.random(depth.shape) < 0.01] = 0  # invalid pixels, as Kinect holes
    rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return rgb, np.clip(depth, 0, 1).astype(np.float32)[..., None], label


class Checked(torch.utils.data.Dataset):
    """Reads every sample of a dataset without its transform (decode, sizes, label
    values: `read`), for `check_files`; an item is the sample's index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.dataset.read(index)
        return index


def check_files(dataset, workers=0, say=print):
    """Read every file of `dataset` once (exists, decodes, sizes agree, labels in
    range) before training starts, so that a bad file of either split stops the run
    before its first step rather than after an epoch; `workers` processes read in
    parallel. The generated demo has nothing to check."""
    if not isinstance(dataset, RGBXDataset):
        return
    start = time.perf_counter()
    for _ in torch.utils.data.DataLoader(Checked(dataset), batch_size=16, num_workers=workers,
                                         worker_init_fn=one_thread if workers else None):
        pass
    say(f"checked the {len(dataset)} samples of {dataset.source} in {time.perf_counter() - start:.1f}s")


def usable_cores():
    """The cores this process may run on (its CPU affinity), capped by OMP_NUM_THREADS
    when set (torchrun sets it to 1 per process)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return min(cores, int(os.environ.get('OMP_NUM_THREADS') or cores))


def one_thread(worker_id):
    """worker_init_fn: a loader worker computes on 1 thread."""
    torch.set_num_threads(1)


def loader(dataset, batch_size=1, workers=0, sampler=None, drop_last=False, pin=False):
    """A DataLoader that keeps to the cores: each of the `workers` processes runs 1
    thread and the main process usable_cores() - workers (at least 1), so that loading
    and the model never oversubscribe the cores. Worker seeds come from a fresh
    generator: the global RNG is left alone."""
    torch.set_num_threads(max(1, usable_cores() - workers))
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                                       drop_last=drop_last, worker_init_fn=one_thread if workers else None,
                                       generator=torch.Generator())


def build_dataset(name, root, split, x_modality=None, crop=None, train=False, seed=0, x_standardised=True,
                  augment=True):
    """The dataset `name` of PRESETS: 'demo' / 'demo128' (generated; root ignored) or RGBXDataset at `root`
    ('' or None: the preset's default root, e.g. ./datasets/NYUDepthv2). train=True
    augments with TrainTransform(crop or the preset's crop); augment=False keeps only
    the random crop; `seed` seeds augmentation (and the demo's scenes); X is
    standardised or fed as its [0, 1] values (Preset.x_norm)."""
    preset = get_preset(name)
    norms = preset.rgb_norm, preset.x_norm(x_modality, x_standardised)
    plain = {} if augment else dict(scale=(1.0, 1.0), jitter_p=0.0, blur_p=0.0, flip_p=0.0)
    transform = TrainTransform(crop or preset.crop, *norms, **plain) if train else EvalTransform(*norms)
    if preset.generated:
        return DemoDataset(split, size=preset.crop[0], seed=seed, transform=transform, preset=name)
    return RGBXDataset(root or preset.root, split, preset, x_modality, transform, seed)


def shard_loader(dataset, rank=0, world=1, workers=0, pin=False, batch_size=1):
    """Evaluation loader over this rank's share rank::world, without the padding
    duplicates of DistributedSampler (so the summed confusion counts each image once)."""
    return loader(torch.utils.data.Subset(dataset, range(rank, len(dataset), world)), batch_size, workers, pin=pin)


# ----------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------

def to_chw(rgb, x):
    """numpy rgb uint8 (H, W, 3) and x float32 (H, W, C) -> tensors (3, H, W) in [0, 1] and (C, H, W)."""
    return (torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 255,
            torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), np.float32)))


def normalize(rgb, x, rgb_norm, x_norm):
    """(v - mean) / std per channel; rgb (3, H, W), x (C, H, W), norms are (mean, std)."""
    def norm(t, mean, std):
        return (t - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return norm(rgb, *rgb_norm), norm(x, *x_norm)


class EvalTransform:
    """No augmentation: (rgb uint8 (H, W, 3), x float32 (H, W, C), label int64 (H, W))
    -> normalised rgb (3, H, W), x (C, H, W) and label (H, W) tensors. rng is unused."""

    def __init__(self, rgb_norm, x_norm):
        self.rgb_norm, self.x_norm = rgb_norm, x_norm

    def __call__(self, rgb, x, label, rng=None):
        return *normalize(*to_chw(rgb, x), self.rgb_norm, self.x_norm), torch.from_numpy(label)


class TrainTransform(EvalTransform):
    """Joint augmentation (the CMNeXt pipeline, as the RGB-X code bases train):
    random resize by s in `scale` (bilinear with antialiasing for rgb and x, nearest for
    the label, the same geometry); a random crop of `crop` (H, W), at a random offset
    also where the image is smaller; on the RGB crop only, colour jitter (p 0.2;
    brightness, contrast and saturation factors in [0.5, 1.5]) and a 3x3 Gaussian blur
    (p 0.2, sigma 0.8); normalisation; padding up to `crop` where the image is smaller
    (rgb and x with 0 after normalisation, i.e. the mean; label with 255); horizontal
    flip (p 0.5). All random numbers come from `rng` (numpy Generator), drawn up front
    in a fixed order, so one rng gives the same geometry whether or not jitter or blur
    apply."""

    def __init__(self, crop, rgb_norm, x_norm, scale=(0.5, 2.0), jitter_p=0.2, blur_p=0.2, flip_p=0.5):
        super().__init__(rgb_norm, x_norm)
        self.crop, self.scale, self.jitter_p, self.blur_p, self.flip_p = tuple(crop), scale, jitter_p, blur_p, flip_p

    def __call__(self, rgb, x, label, rng):
        u = rng.random(9)
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        size = max(1, round(label.shape[0] * s)), max(1, round(label.shape[1] * s))
        rgb, x = (resize(t, size) for t in to_chw(rgb, x))
        label = resize(torch.from_numpy(label)[None].float(), size, nearest=True)[0].long()
        top, left = (offset(n, c, v) for n, c, v in zip(size, self.crop, u[1:3]))
        rgb, x, label = (t[..., max(top, 0):top + self.crop[0], max(left, 0):left + self.crop[1]]
                         for t in (rgb, x, label))  # the part of the image inside the crop
        if u[3] < self.jitter_p:
            rgb = color_jitter(rgb, *(0.5 + u[4:7]))
        if u[7] < self.blur_p:
            rgb = gaussian_blur(rgb, 0.8)
        rgb, x = normalize(rgb, x, self.rgb_norm, self.x_norm)
        rgb, x, label = (pad(t, top, left, self.crop, fill) for t, fill in ((rgb, 0), (x, 0), (label, IGNORE)))
        if u[8] < self.flip_p:
            rgb, x, label = (t.flip(-1) for t in (rgb, x, label))
        return rgb, x, label


def resize(t, size, nearest=False):
    """t (C, H, W) -> (C, *size): bilinear with antialiasing, or nearest (pixel centres)."""
    if nearest:
        return F.interpolate(t[None], size, mode='nearest-exact')[0]
    return F.interpolate(t[None], size, mode='bilinear', align_corners=False, antialias=True)[0]


def offset(n, c, u):
    """The start of a crop of c from n pixels, uniform over the valid starts; negative
    when n < c (the image lies inside the padded crop)."""
    lo, hi = min(0, n - c), max(0, n - c)
    return lo + int(u * (hi - lo + 1))


def pad(t, top, left, size, fill):
    """The image part t of a crop at (top, left) placed in a `size` (H, W) crop filled
    with `fill` (a negative top or left: the image starts inside the crop)."""
    out = t.new_full((*t.shape[:-2], *size), fill)
    y, x = max(-top, 0), max(-left, 0)
    out[..., y:y + t.shape[-2], x:x + t.shape[-1]] = t
    return out


def grey(rgb):
    """ITU-R 601 luma of rgb (3, H, W) -> (1, H, W)."""
    return (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1) * rgb).sum(0, keepdim=True)


def color_jitter(rgb, brightness, contrast, saturation):
    """rgb (3, H, W) in [0, 1] blended with black, its mean grey and its grey by the
    factors (as torchvision's adjust_brightness / contrast / saturation)."""
    rgb = (rgb * brightness).clamp(0, 1)
    mean = grey(rgb).mean()
    rgb = (mean + contrast * (rgb - mean)).clamp(0, 1)
    g = grey(rgb)
    return (g + saturation * (rgb - g)).clamp(0, 1)


def gaussian_blur(rgb, sigma):
    """rgb (3, H, W) convolved with a 3x3 Gaussian of `sigma`, replicated borders."""
    k = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma ** 2))
    k = (k[:, None] * k[None, :]) / k.sum() ** 2  # (3, 3), sums to 1
    return F.conv2d(F.pad(rgb[None], (1, 1, 1, 1), mode='replicate'), k.expand(3, 1, 3, 3), groups=3)[0]


# ----------------------------------------------------------------------------
# Colourising
# ----------------------------------------------------------------------------

def voc_colormap(n=256):
    """The PASCAL VOC colormap (n, 3) uint8: bits 3j, 3j+1, 3j+2 of the index become
    bit 7-j of R, G, B."""
    idx = np.arange(n)[:, None]
    return sum((((idx >> (3 * j + np.arange(3))) & 1) << (7 - j)) for j in range(8)).astype(np.uint8)


def palette(preset_name):
    """(256, 3) uint8 colours indexed by class; 255 (ignore) is black. MFNet: its
    community palette; others: the VOC colormap at the on-disk value (class - shift),
    so NYUDv2 class c has DFormer's nyucmap.npy colour [c + 1]."""
    preset = get_preset(preset_name)
    if preset.palette:
        colours = np.zeros((256, 3), np.uint8)
        colours[:len(preset.palette)] = preset.palette
    else:
        colours = voc_colormap()[np.clip(np.arange(256) - preset.label_shift, 0, 255)]
    colours[IGNORE] = 0
    return colours


def colorize(label, palette, hatch=False):
    """label (H, W) ints in 0..255 -> (H, W, 3) uint8 colours; ignore (255) is black,
    or with hatch=True black and white diagonal stripes (2 px), unlike any class colour
    (class 0 is black in several palettes)."""
    label = np.asarray(label)
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"labels must lie in 0..255 to colourise, got {label.min()}..{label.max()}")
    out = np.asarray(palette, np.uint8)[label]
    void = label == IGNORE
    out[void] = 0
    if hatch:
        yy, xx = np.indices(label.shape)
        out[void & ((yy + xx) // 2 % 2 == 0)] = 255
    return out


# ----------------------------------------------------------------------------
# HHA: depth -> disparity, height above the lowest point, angle with gravity
# ----------------------------------------------------------------------------
# Gupta, Girshick, Arbelaez, Malik, "Learning Rich Features from RGB-D Images for
# Object Detection and Segmentation", ECCV 2014 (sec. 4.1), computed as the authors'
# released code does (saveHHA with processDepthImage, its square-support normals and
# its gravity estimate), so that the bytes agree with their HHA images.

# NYU Depth V2's colour camera (fx, fy, cx, cy) in 0-based pixel coordinates: the
# dataset toolbox's values, whose centre (325.58, 253.74) counts pixels from 1.
NYU_CAMERA = (518.85790117450188, 519.46961112127485, 324.58244941119034, 252.73616633400465)
HHA_PATCH = (3, 10)          # half-widths of the square windows: normals for the angle, for gravity
HHA_GRAVITY = ((45, 5), (15, 5))  # (angle threshold in degrees, iterations) of the gravity estimate


def box_sum(a, r):
    """Sums over the (2r+1) x (2r+1) window around every pixel of the last two axes of
    `a` (..., H, W), zeros outside the image; same shape. Direct sums, rows then
    columns: windows of up to 7 pixels a side add their values one by one in order,
    longer ones add sums of 2^k neighbours (16 + 4 + 1 for 21). A window with one or
    two non-zero values gives their exact sum, as a direct 2-D filter does (running
    sums would leave round-off where the normal fits of sparse windows need exact
    cancellation)."""
    n = 2 * r + 1
    widths = [1] * n if n <= 7 else [1 << k for k in reversed(range(n.bit_length())) if n >> k & 1]
    for axis in (a.ndim - 2, a.ndim - 1):
        size = a.shape[axis]
        pad = [(0, 0)] * a.ndim
        pad[axis] = (r, r)

        def part(b, start, length):
            return b[(slice(None),) * axis + (slice(start, start + length),)]

        blocks, k = {1: np.pad(a, pad)}, 1  # blocks[k][i] = sum of k values from i on
        while 2 * k <= widths[0]:
            b = blocks[k]
            m = b.shape[axis] - k
            blocks[2 * k], k = part(b, 0, m) + part(b, k, m), 2 * k
        out, start = np.zeros(a.shape), 0
        for k in widths:
            out += part(blocks[k], start, size)
            start += k
        a = out
    return a


def hha_points(z, camera):
    """Depth z (H, W) float64 along the optical axis -> X, Y, Z (H, W) each, in z's unit;
    camera (fx, fy, cx, cy) with 0-based pixel coordinates, y pointing down the image."""
    fx, fy, cx, cy = camera
    h, w = z.shape
    x = (np.arange(w, dtype=np.float64) - cx)[None, :] * z / fx
    y = (np.arange(h, dtype=np.float64) - cy)[:, None] * z / fy
    return x, y, z


def hha_normals(z, valid, camera, r):
    """Unit surface normals (H, W, 3) of depth z (H, W) (cm, float64): at each pixel the
    plane n . p = 1 fitted by least squares, in the 1/Z-weighted form of the reference
    code, to the back-projected points of the (2r+1)^2 window whose `valid` is True
    (the window's other pixels add nothing; the pixel itself may be invalid). NaN where
    the window holds no valid point; with fewer than 3 points off one line the fit is
    ill-posed and its direction as arbitrary as the reference's. Oriented with n . p >= 0 for the
    point p of the (full) depth: away from the camera, so a floor under the camera
    points down, along y."""
    X, Y, Z = hha_points(z, camera)
    with np.errstate(divide='ignore', invalid='ignore'):
        iz = np.where(valid, 1 / Z, 0)
        xz, yz = np.where(valid, X / Z, 0), np.where(valid, Y / Z, 0)
        xzz, yzz = np.where(valid, X / (Z * Z), 0), np.where(valid, Y / (Z * Z), 0)
    s = box_sum(np.stack([xz * xz, xz * yz, xz, yz * yz, yz, valid.astype(np.float64), xzz, yzz, iz]), r)
    a1, a2, a3, a4, a5, a6, b1, b2, b3 = s
    # adjugate of the symmetric normal matrix [[a1 a2 a3] [a2 a4 a5] [a3 a5 a6]]; the
    # determinant cancels in the normalisation
    c1, c2, c3 = a4 * a6 - a5 * a5, -(a2 * a6 - a3 * a5), a2 * a5 - a3 * a4
    c4, c5, c6 = a1 * a6 - a3 * a3, -(a1 * a5 - a2 * a3), a1 * a4 - a2 * a2
    n = np.stack([c1 * b1 + c2 * b2 + c3 * b3, c2 * b1 + c4 * b2 + c5 * b3, c3 * b1 + c5 * b2 + c6 * b3], -1)
    with np.errstate(divide='ignore', invalid='ignore'):
        n /= np.sqrt((n * n).sum(-1, keepdims=True))
    sz = np.sign(n[..., 2:])
    sz[sz == 0] = 1
    n *= sz
    sp = np.sign(n[..., 0] * X + n[..., 1] * Y + n[..., 2] * Z)[..., None]
    sp[np.isnan(sp) | (sp == 0)] = 1
    return n * sp


def hha_gravity(normals, steps=HHA_GRAVITY):
    """The gravity direction (3,) (unit, camera coordinates, pointing down) from normals
    (H, W, 3): starting from the image's y axis, each iteration keeps the normals within
    `thresh` degrees of the current direction (floors, table tops) and those within
    `thresh` of perpendicular to it (walls), and takes the direction most aligned with
    the first and most perpendicular to the second: the eigenvector of
    sum(n_wall n_wall^T) - sum(n_floor n_floor^T) of smallest eigenvalue, signed to
    stay on the side of the previous one. NaN normals are left out."""
    nn = normals.reshape(-1, 3)
    nn = nn[~np.isnan(nn[:, 0])]
    y = np.array([0.0, 1.0, 0.0])
    for thresh, iters in steps:
        cos_t, sin_t = np.cos(np.radians(thresh)), np.sin(np.radians(thresh))
        for _ in range(iters):
            sim = np.abs(nn @ y)
            nf, nw = nn[sim > cos_t], nn[sim < sin_t]
            w, v = np.linalg.eigh(nw.T @ nw - nf.T @ nf)
            new = v[:, np.argmin(w)]
            y = new * np.sign(y @ new)
    return y


def hha_rotation(y0, y1):
    """The 3x3 rotation taking unit direction y0 to y1 about their common perpendicular
    (the identity below 0.1 degree)."""
    y0, y1 = y0 / np.linalg.norm(y0), y1 / np.linalg.norm(y1)
    phi = np.degrees(np.arccos(np.clip(y0 @ y1, -1, 1)))
    if not abs(phi) > 0.1:
        return np.eye(3)
    ax = np.cross(y0, y1)
    ax /= np.linalg.norm(ax)
    s = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
    phi = np.radians(phi)
    return np.eye(3) + np.sin(phi) * s + (1 - np.cos(phi)) * (s @ s)


def to_uint8(v):
    """float -> uint8 as MATLAB's uint8() converts: halves away from zero, saturating at
    0 and 255, NaN to 0."""
    v = np.nan_to_num(v, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.floor(np.abs(v) + 0.5) * np.sign(v), 0, 255).astype(np.uint8)


def hha(depth, camera, missing=None):
    """The HHA encoding of a depth image (Gupta et al., ECCV 2014, "Learning Rich Features
    from RGB-D Images for Object Detection and Segmentation"), equal to the authors'
    MATLAB code (saveHHA).

    depth    (H, W) float, metres along the optical axis (a hole-filled depth: every
             pixel is used for disparity and height); must be finite.
    camera   (fx, fy, cx, cy) in pixels, with 0-based pixel coordinates (the centre of
             the top-left pixel is (0, 0), as in OpenCV); the MATLAB code counts pixels
             from 1, so its cx, cy are these + 1. NYU_CAMERA is NYU Depth V2's.
    missing  (H, W) bool, pixels without a measurement (raw depth == 0): left out of the
             normal fits, as the reference code does (a pixel is still given the normal
             of its window's measured points; a pixel whose 7x7 window has none gets
             angle 218, the code's value for no normal). None: only pixels of depth <= 0
             (which are always missing).
    Returns uint8 (H, W, 3), channels in saveHHA's order:
        0  disparity 31000 / max(z, 100), z in cm;
        1  height in cm above the lowest point along the estimated gravity direction
           (above a floor 130 cm under the camera if no point lies 90 cm or more below it);
        2  angle in degrees between the surface normal (7x7 window) and gravity, + 38
           (128 - 90): 38 on floors, 128 on walls;
    each rounded half away from zero and clipped to 0..255. Gravity is estimated from
    normals of 21x21 windows (hha_gravity). Float64 throughout, for MATLAB's rounding."""
    depth = np.asarray(depth, np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be one (H, W) image, not shape {depth.shape}")
    if not np.isfinite(depth).all():
        raise ValueError("depth has NaN or infinite values; mark pixels without a measurement 0 (or in `missing`)")
    camera = tuple(float(c) for c in camera)
    if len(camera) != 4 or not (camera[0] > 0 and camera[1] > 0):
        raise ValueError(f"camera is (fx, fy, cx, cy) with fx, fy > 0, not {camera}")
    valid = depth > 0
    if missing is not None:
        missing = np.asarray(missing, bool)
        if missing.shape != depth.shape:
            raise ValueError(f"missing has shape {missing.shape}, the depth {depth.shape}")
        valid &= ~missing
    z = depth * 100
    zn = z / 100 * 100  # the reference code's normals take metres and scale them back: same rounding
    n = hha_normals(zn, valid, camera, HHA_PATCH[0])
    g = hha_gravity(hha_normals(zn, valid, camera, HHA_PATCH[1]))
    rot = hha_rotation(np.array([0.0, 1.0, 0.0]), g)
    X, Y, Z = hha_points(z, camera)
    height = -(rot[0, 1] * X + rot[1, 1] * Y + rot[2, 1] * Z)
    low = height.min()
    height -= low if low <= -90 else -130
    cos = n[..., 0] * g[0] + n[..., 1] * g[1] + n[..., 2] * g[2]
    # the reference clips with MATLAB's max(-1, .), which ignores NaN: no normal -> cos = -1
    angle = np.degrees(np.arccos(np.clip(np.nan_to_num(cos, nan=-1.0), -1, 1)))
    return np.stack([to_uint8(31000 / np.maximum(z, 100)), to_uint8(height), to_uint8(angle + 128 - 90)], -1)


def read_depth_metres(path, scale=0.001):
    """A depth image (1-channel 16-bit PNG, value v = depth / `scale` metres: millimetres
    by default, 0 = no measurement) -> depth float64 (H, W) in metres and missing bool
    (H, W) (v == 0). The metres are v / (1 / scale) when 1 / scale is a whole number,
    so one depth stored in different units gives the same floats."""
    if not scale > 0:
        raise ValueError(f"the depth scale must be > 0 (metres per stored unit), not {scale}")
    arr = open_image(path, ('1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'I;16', 'I;16B', 'I', 'F'),
                     'depth image (1-channel 16-bit PNG, millimetres)')
    if png_bit_depth(path) != 16 or arr.ndim != 2:
        raise ValueError(f"{path} is not a 1-channel 16-bit PNG; depth is read from 16-bit PNGs of millimetres "
                         f"(for another unit give its size in metres, --depth-scale)")
    v = arr.astype(np.float64)
    per_metre = 1 / scale
    depth = v / round(per_metre) if abs(per_metre - round(per_metre)) < 1e-9 * per_metre else v * scale
    return depth, arr == 0


def parse_camera(text):
    """'nyu' or 'FX,FY,CX,CY' (pixels, 0-based pixel coordinates) -> a camera tuple."""
    if text.strip().lower() == 'nyu':
        return NYU_CAMERA
    try:
        cam = tuple(float(v) for v in text.split(','))
    except ValueError:
        cam = ()
    if len(cam) != 4 or not all(np.isfinite(cam)) or not (cam[0] > 0 and cam[1] > 0):
        raise ValueError(f"--camera takes nyu or FX,FY,CX,CY (four numbers in pixels, fx, fy > 0, the centre "
                         f"counted from 0 at the top-left pixel), not {text!r}")
    return cam


def hha_file(depth_path, raw_path, out_path, camera, scale):
    """Convert one depth file (and its raw depth, whose zeros are the missing pixels) to
    an HHA PNG, written to a temporary name and renamed: a file under out_path is whole."""
    depth, missing = read_depth_metres(depth_path, scale)
    if raw_path is not None:
        raw, missing = read_depth_metres(raw_path, scale)
        check_sizes((depth_path, depth), (raw_path, raw))
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(hha(depth, camera, missing)).save(tmp, format='PNG')
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


def _hha_job(job):
    return hha_file(*job)


def hha_folder(depth_dir, out_dir, camera, raw_dir=None, scale=0.001, workers=1, progress=None):
    """Convert every *.png of depth_dir to an HHA PNG of the same name in out_dir
    (created), skipping names out_dir already holds. raw_dir: raw depths of the same
    names, whose zeros are the missing pixels (without it, the depth's own zeros).
    Returns (written, skipped) counts; progress(done, total) is called after each file."""
    depth_dir, out_dir = Path(depth_dir), Path(out_dir)
    for flag, d in (('--depth', depth_dir), ('--raw', raw_dir)):
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"{flag} {d}: no such folder")
    sources = {depth_dir.resolve()} | ({Path(raw_dir).resolve()} if raw_dir is not None else set())
    if out_dir.resolve() in sources:
        raise ValueError(f"--out {out_dir} is a source folder; give another folder (source files are never overwritten)")
    names = sorted(p.name for p in depth_dir.iterdir() if p.suffix.lower() == '.png' and p.is_file())
    if not names:
        raise FileNotFoundError(f"--depth {depth_dir} holds no .png depth files")
    if raw_dir is not None:
        absent = [n for n in names if not (Path(raw_dir) / n).is_file()]
        if absent:
            raise FileNotFoundError(f"--raw {raw_dir} lacks {len(absent)} of the depth files, e.g. {absent[0]}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test.{os.getpid()}.tmp"
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out_dir} cannot be written ({e.strerror or e})") from None
    todo = [n for n in names if not (out_dir / n).exists()]
    jobs = [(depth_dir / n, None if raw_dir is None else Path(raw_dir) / n, out_dir / n, camera, scale) for n in todo]
    skipped, done = len(names) - len(todo), 0
    if progress:
        progress(skipped, len(names))
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        with multiprocessing.get_context('spawn').Pool(workers) as pool:
            for _ in pool.imap_unordered(_hha_job, jobs):
                done += 1
                if progress:
                    progress(skipped + done, len(names))
    else:
        for job in jobs:
            _hha_job(job)
            done += 1
            if progress:
                progress(skipped + done, len(names))
    return done, skipped


def main(argv=None):
    """Command line: `python data.py hha ...` converts a folder of depth PNGs to HHA."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog='data.py', description="Data tools of rgbx.")
    sub = ap.add_subparsers(dest='command', required=True)
    p = sub.add_parser('hha', help="convert depth PNGs to HHA PNGs (Gupta et al., ECCV 2014)",
                       description="Convert every depth PNG of a folder to an HHA PNG of the same name "
                                   "(disparity, height, angle; as the authors' MATLAB saveHHA). Files the "
                                   "output folder already holds are skipped.")
    p.add_argument('--depth', required=True, metavar='DIR',
                   help="folder of depth PNGs (1-channel 16-bit, millimetres unless --depth-scale), hole-filled")
    p.add_argument('--raw', metavar='DIR',
                   help="folder of the raw depths, same names: their zeros are the pixels without a measurement, "
                        "left out of the normals (default: the zeros of --depth)")
    p.add_argument('--out', required=True, metavar='DIR', help="folder for the HHA PNGs (created; not a source folder)")
    p.add_argument('--camera', required=True, metavar='nyu|FX,FY,CX,CY',
                   help="intrinsics in pixels with the centre counted from 0 at the top-left pixel, or nyu "
                        f"for NYU Depth V2's colour camera {','.join(f'{v:.4f}' for v in NYU_CAMERA)}")
    p.add_argument('--workers', type=int, default=1, metavar='N', help="processes converting in parallel (default 1)")
    p.add_argument('--depth-scale', type=float, default=0.001, metavar='S',
                   help="metres per stored depth unit (default 0.001: millimetres; e.g. 0.0001 for 1/10 mm)")
    args = ap.parse_args(argv)

    shown = []

    def progress(done, total):  # one line rewritten in place on a terminal, a line every 10% in a log
        shown.append(done)
        if sys.stderr.isatty():
            print(f"\rhha: {done}/{total} files", end='', file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(f"hha: {done}/{total} files", file=sys.stderr, flush=True)

    def end_line():
        if shown and sys.stderr.isatty():
            print(file=sys.stderr)

    try:
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, not {args.workers}")
        if not args.depth_scale > 0:
            raise ValueError(f"--depth-scale must be > 0 (metres per stored unit), not {args.depth_scale}")
        written, skipped = hha_folder(args.depth, args.out, parse_camera(args.camera), args.raw,
                                      args.depth_scale, args.workers, progress)
    except (ValueError, OSError) as e:
        end_line()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        end_line()
        print("hha: interrupted; finished files are kept and skipped next time", file=sys.stderr)
        return 130
    end_line()
    print(f"hha: {written} written, {skipped} already there, in {args.out}", file=sys.stderr)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
