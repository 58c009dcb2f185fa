"""Data for RGB-X semantic segmentation: dataset presets (classes, X modalities,
folder layouts, training crop), the community's prepared folder layout (CMX /
SA-Gate / DFormer), a built-in synthetic RGB-D demo, rendered NYUDv2-like rooms
(in memory, or written as a dataset folder by `python data.py rooms`), joint
augmentation and colourising. Nothing here depends on a method: a method's recipe (how it scales X,
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
import colorsys
import argparse
import errno
import json
import mmap
import os
import sys
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
    generator: str = ''  # generated data: 'demo' (DemoDataset) or 'rooms' (RoomsDataset)
    holdout: int = 0  # generated data: training scenes held out as its 'test' split (validation)
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
# losslessly as 1), as CMNeXt's toolkit reads SUN RGB-D's X. No measured statistics: ImageNet's mean.
DEPTH8 = Modality(1, (0.449,), (0.226,))
# MCubeS' AoLP as its release stores it: polL_aolp_sin/ and polL_aolp_cos/ .npy in [-1, 1], stacked
# (sin, cos, sin) as CMNeXt's toolkit feeds them; fed as they are (mean 0, std 1).
AOLP_NPY = Modality(3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

NYU40 = ('wall', 'floor', 'cabinet', 'bed', 'chair', 'sofa', 'table', 'door', 'window', 'bookshelf',
         'picture', 'counter', 'blinds', 'desk', 'shelves', 'curtain', 'dresser', 'pillow', 'mirror',
         'floor mat', 'clothes', 'ceiling', 'books', 'refridgerator', 'television', 'paper', 'towel',
         'shower curtain', 'box', 'whiteboard', 'person', 'night stand', 'toilet', 'sink', 'lamp',
         'bathtub', 'bag', 'otherstructure', 'otherfurniture', 'otherprop')
RGBD_X = {'hha': 'HHA', 'depth': 'Depth', 'depth8': 'Depth'}
RGBD_LAYOUT = (Layout('RGB', 'Label', RGBD_X), Layout('RGB', 'labels', RGBD_X))  # labels/: CMNeXt's SUN


def demo_preset(size, holdout=0):
    """The built-in synthetic dataset (DemoDataset) with scenes of size x size pixels:
    no folder layout (nothing is read from disk); depth generated in [0, 1], its
    statistics measured on the scenes. holdout > 0: a validation preset whose 'train'
    split is the first 256 - holdout training scenes and whose 'test' split is the last
    `holdout` training scenes (never the test scenes)."""
    return Preset(('background', 'red low', 'red high', 'blue low', 'blue high'),
                  {'depth': Modality(1, (0.68,), (0.13,))}, 'depth', (), (size, size),
                  generator='demo', holdout=holdout,
                  # the colours the classes are named by: dark = low, light = high
                  palette=((0, 0, 0), (128, 0, 0), (255, 96, 96), (0, 0, 128), (96, 128, 255)),
                  defaults=dict(epochs=20, lr=1e-3, weight_decay=0.01, batch_size=4, warmup_epochs=1))


def rooms_preset(holdout=0, size=(240, 320)):
    """Rendered rooms (RoomsDataset; `python data.py rooms` writes the same scenes as
    files): NYUDv2's classes, X modalities and statistics, scenes of `size`. holdout > 0:
    a validation preset whose 'train' split is the first 800 - holdout training scenes
    and whose 'test' split the last `holdout` (never the test scenes). `defaults`: the
    training settings of every method here (no paper trains on rooms)."""
    return Preset(NYU40, {'hha': IMAGE, 'depth': DEPTH}, 'hha', (), size, label_shift=-1,
                  generator='rooms', holdout=holdout,
                  defaults=dict(epochs=40, lr=1e-3, weight_decay=0.01, batch_size=8,
                                warmup_epochs=1))


PRESETS = {
    'demo': demo_preset(64),
    'demo128': demo_preset(128),  # an 8 x 8 token grid for ViT/16: the reproduction study's data
    'demo128-val': demo_preset(128, holdout=64),  # the study's validation split, for decisions a paper leaves open
    'rooms': rooms_preset(),  # rendered indoor RGB-D scenes, NYU-40 classes (data.py rooms)
    'rooms-val': rooms_preset(holdout=160),  # its validation split, carved from the training scenes
    # the same scenes at 144 x 192 (a 9 x 12 token grid for ViT/16): the reproduction study's data
    'rooms144': rooms_preset(size=(144, 192)),
    'rooms144-val': rooms_preset(holdout=160, size=(144, 192)),
    # on disk 0 = void, 1..40 (SA-Gate / CMX / DFormer)
    'nyudv2': Preset(NYU40, {'hha': IMAGE, 'depth': DEPTH, 'depth8': DEPTH8}, 'hha', RGBD_LAYOUT,
                     (480, 640),
                     'datasets/NYUDepthv2', label_shift=-1),
    # SUN RGB-D's 37 classes are NYU-40's first 37; on disk 0 = void, 1..37. The original
    # bit-rotated 16-bit depth must be converted to millimetres first (depth), or DFormer's
    # 8-bit Depth/ PNGs read as they are (depth8: the X of CMNeXt's toolkit for SUN RGB-D).
    'sunrgbd': Preset(NYU40[:37], {'hha': IMAGE, 'depth': DEPTH, 'depth8': DEPTH8}, 'hha',
                      RGBD_LAYOUT,
                      (480, 480),
                      'datasets/SUNRGBD', label_shift=-1),
    # 0 = unlabelled is a class, as in the community. Three layouts: prepared RGB/ Thermal/
    # Label/; MFNet's release: images/ (RGBA PNG, thermal in alpha), labels/, {train,val,test}.txt;
    # CMNeXt's toolkit's: rgb/ ther/ labels/, {train,test}.txt
    'mfnet': Preset(('unlabelled', 'car', 'person', 'bike', 'curve', 'car_stop', 'guardrail', 'color_cone',
                     'bump'), {'thermal': GREY}, 'thermal',
                    (Layout('RGB', 'Label', {'thermal': 'Thermal'}),
                     Layout('images', 'labels', {'thermal': None}),
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
                      'water', 'human', 'sky'),
                     {'aolp': IMAGE, 'dolp': GREY, 'nir': GREY, 'aolp-npy': AOLP_NPY}, 'aolp',
                     (Layout('RGB', 'Label', {'aolp': 'AoLP', 'dolp': 'DoLP', 'nir': 'NIR'}),
                      Layout('polL_color', 'GT',
                             {'aolp-npy': ('polL_aolp_sin', 'polL_aolp_cos'), 'nir': 'NIR_warped'})),
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
    if mode not in modes and mode.startswith(('I', 'F')):  # 16/32-bit: convert('RGB') would clip
        raise ValueError(f"{path} stores {mode} values (PIL mode {mode!r}), which the "
                         f"{what.split(' (')[0]} cannot be: {fix16}")
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
            raise ValueError(f"{p}: MCubeS' AoLP .npy holds one (H, W) map of finite values in [-1, 1], "
                             f"not shape {a.shape} of range "
                             f"{a.min(initial=0):.3g}..{a.max(initial=0):.3g}")
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
    check_grey_palette(path, arr)
    return shift_label(arr, preset, path)


def check_grey_palette(path, arr):
    """A palette label is read by its indices; one whose palette is grey but shows other values
    than its indices (a grey label saved through a palette) would be read as other classes:
    an error saying to save it as a grey PNG of the values shown."""
    with Image.open(path) as im:
        if im.mode != 'P':
            return
        colours = np.array(im.getpalette('RGB') or [], np.int64).reshape(-1, 3)
    used = np.unique(arr)
    used = used[(used < len(colours)) & (used != IGNORE)]  # void may be drawn in any colour
    shown = colours[used]
    if len(used) and (shown == shown[:, :1]).all() and (shown[:, 0] != used).any():
        i = int(used[np.argmax(shown[:, 0] != used)])
        raise ValueError(f"{path} is a palette PNG whose grey palette shows other values than its "
                         f"indices (index {i} is shown as grey {colours[i, 0]}): labels are read "
                         f"by index; save it as a grey PNG of class indices (e.g. "
                         f"Image.open(p).convert('L').save(p) if the grey values are the classes)")


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


RUN_FILES = ('config.json', 'log.jsonl', 'last.pt', 'best.pt', 'curves.png')  # a run's folder


def is_run_folder(folder):
    """Whether `folder` holds a training run (a checkpoint, or the log of a started run)."""
    return any((folder / n).is_file() for n in ('last.pt', 'best.pt', 'log.jsonl'))


def is_dataset_root(folder):
    """Whether `folder` holds a dataset in a preset's layout (its RGB and label folders)."""
    return any((folder / lay.rgb).is_dir() and (folder / lay.label).is_dir()
               for p in PRESETS.values() for lay in p.layouts)


def check_output(flag, path, inputs=(), folder=False, own_run=None, dataset_x=None, writes=(),
                 kind=None):
    """Refuse, with a one-line ValueError naming `flag`, an output that would write over
    what a command reads or into data and runs it does not own. Every command's output
    paths pass here. Paths are compared resolved (symbolic links, '..', relative paths).

    path      the output: a file, or with folder=True a folder written into (the names it
              `writes` there, when known);
    inputs    (flag, path) pairs of what the command reads, files or folders: the output
              (and what it writes) is none of them and lies in none of the folders among them;
    own_run   the run folder the command may write into (train.py's --out-dir, the
              checkpoint's run for eval.py), never over one of its RUN_FILES as a file output;
    dataset_x an X modality whose folder of a dataset root the output folder may be, or a
              new folder there (data.py hha writes a dataset's HHA/); no other output enters
              a dataset;
    kind      'png' or 'json': an existing file at `path` is replaced only when it is one."""
    out = Path(os.path.realpath(path))
    targets = [out] + [out / n for n in writes]
    for name, p in inputs:
        if p and os.path.exists(p):
            check_not_input(flag, path, targets, name, p)
    own = Path(os.path.realpath(own_run)) if own_run else None
    if not folder and out.parent == own and out.name in RUN_FILES:
        raise ValueError(f"{flag} {path} is the run's {out.name}: it would be overwritten; "
                         f"write elsewhere")
    for a in ([out] if folder else []) + list(out.parents):
        where = f"{flag} {path} is {'' if a == out else 'inside '}"
        if a != own and is_run_folder(a):
            raise ValueError(f"{where}the folder of another run ({a}): its checkpoints and log "
                             f"are never written over; write elsewhere")
        into_x = dataset_x and a == out.parent and allowed_in_dataset(out.name, dataset_x)
        if a != own and is_dataset_root(a) and not into_x:
            raise ValueError(f"{where}the dataset at {a}: nothing is written into a dataset's "
                             f"files; write elsewhere")
    if kind and out.is_file() and not is_kind(out, kind):
        raise ValueError(f"{flag} {path} exists and is not a {kind.upper()} file: it would be "
                         f"overwritten; write elsewhere (or remove it first)")


def check_not_input(flag, path, targets, name, p):
    """Refuse output `targets` (the output path first) that are the input `p` of flag
    `name`, or lie in it when it is a folder."""
    q = Path(os.path.realpath(p))
    same = [t for t in targets if t == q or (t.exists() and os.path.samefile(t, q))]
    if same or (q.is_dir() and q in targets[0].parents):
        what = ('is inside' if not same else 'is' if same[0] == targets[0] else
                f"would write {same[0]}, which is")
        raise ValueError(f"{flag} {path} {what} the {name} {'folder' if q.is_dir() else 'file'} "
                         f"{p}: it would be overwritten; write elsewhere")


def is_kind(path, kind):
    """Whether the file `path` is a PNG image or a JSON document (`kind`)."""
    if kind == 'png':
        with open(path, 'rb') as f:
            return f.read(8) == PNG_SIGNATURE
    try:
        with open(path, encoding='utf-8') as f:
            json.load(f)
        return True
    except (ValueError, OSError):
        return False


def allowed_in_dataset(name, x):
    """Whether a folder `name` of a dataset root may receive X modality `x`: it is that
    modality's folder in a layout, or a folder no layout names."""
    layouts = [lay for p in PRESETS.values() for lay in p.layouts]
    named = {f for lay in layouts for f in (lay.rgb, lay.label, *lay.x.values()) if f}
    return name in {lay.x.get(x) for lay in layouts} or name not in named


# ----------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------

AUGMENT, DEMO, ROOMS = 0, 1, 2  # independent random streams


def sample_rng(stream, seed, step, index):
    """The random numbers of one sample, a pure function of (stream, seed, step, index),
    step = the epoch for augmentation, the split for demo scenes: any worker, any sample
    order and a resumed run draw the same numbers (the stream leads: numpy's seeding
    ignores trailing zeros)."""
    return np.random.default_rng([stream, seed, step, index])


class SegmentationDataset(torch.utils.data.Dataset):
    """Items (rgb, x, label) = transform(*read(i), rng); the augmentation rng of item i
    is sample_rng(AUGMENT, seed, epoch, i), with the epoch set by set_epoch, or given
    with the index: item (epoch, i), so that loader workers kept over epochs
    (persistent_workers) need no set_epoch."""

    def __init__(self, preset, x_modality, transform, seed):
        self.preset = get_preset(preset)
        self.x_modality = self.preset.x_name(x_modality)
        self.transform = transform or EvalTransform(self.preset.rgb_norm, self.preset.x_norm(self.x_modality))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        return self.transform(*self.read(index), sample_rng(AUGMENT, self.seed, epoch, index))

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
            raise ValueError(f"X modality {self.x_modality!r} is not stored in the layout found at "
                             f"{self.root} (its X folders: {', '.join(lay.x)}): pick one of those "
                             f"with --x-modality")
        x_folder = lay.x[self.x_modality]
        if isinstance(x_folder, tuple):  # X read from .npy files, one per folder (MCubeS' AoLP)
            x_path = tuple(self.root / folder / f"{stem}.npy" for folder in x_folder)
            for path in x_path:
                if not path.is_file():
                    raise FileNotFoundError(f"{where}: {path} not found; every sample needs its "
                                            f"{' and '.join(x_folder)} .npy files under one id")
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
    return ' or '.join(f"{root}/{{{lay.rgb}/<id>.jpg|png, {x_files(lay.x[x])}{lay.label}/<id>.png, "
                       f"train.txt, test.txt}}" + (' (RGBA: thermal in alpha)' if lay.x[x] is None else '')
                       for lay in preset.layouts if x in lay.x)


def find_layout(root, preset, x_modality):
    """The first layout of the preset whose RGB and label folders exist under root, else
    the first whose RGB folder does (SUN RGB-D's `Label/` or CMNeXt's toolkit's `labels/`)."""
    found = [lay for lay in preset.layouts if (root / lay.rgb).is_dir()]
    for lay in found:
        if (root / lay.label).is_dir():
            return lay
    if found:
        return found[0]
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
        ids = sorted(p.stem for p in images if p.suffix.lower() in EXTENSIONS and visible(p.name))
        return folder, ids, folder
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


def visible(name):
    """Whether a file listed in a folder is data: not hidden (macOS's '._0.png' metadata)."""
    return not name.startswith('.')


def find_file(root, rel, where, extensions=EXTENSIONS):
    """root/rel as listed, else root/rel with its extension replaced by one of `extensions`;
    a file found only in another format (a JPEG label) is an error that says so."""
    path = root / rel
    stem = str(path.with_suffix('') if path.suffix.lower() in EXTENSIONS else path)
    if path.is_file() and path.suffix.lower() in extensions:
        return path
    for ext in [e for ext in extensions for e in (ext, ext.upper())]:  # 0.png, then 0.PNG
        if Path(stem + ext).is_file():
            return Path(stem + ext)
    other = [stem + ext for ext in EXTENSIONS if ext not in extensions and Path(stem + ext).is_file()]
    if other:
        raise ValueError(f"{where}: {other[0]} is a lossy file; labels are read from {', '.join(extensions)} files only "
                         f"(JPEG compression changes class values at every edge): convert the labels to PNG")
    dangling = [c for c in [str(path)] + [stem + e for e in extensions] if os.path.islink(c)]
    if dangling:
        raise FileNotFoundError(f"{where}: {dangling[0]} is a symbolic link that leads to no file "
                                f"(broken, or a loop of links): point it at the file")
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


class SceneCache:
    """Scenes rendered once per run, whichever process renders them: `count` records of
    fixed-size arrays (`shapes`: ((shape, dtype), ...)) in an anonymous shared mapping, made
    before DataLoader workers fork, so that the main process and every worker, of this
    epoch or a later one, find what any of them rendered (pages are allocated as they are
    written). A copy sent to a spawned process (no fork) keeps a cache of its own."""

    def __init__(self, count, shapes):
        self.count, self.shapes = count, shapes
        self.sizes = [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in shapes]
        self.shared, self.own = mmap.mmap(-1, max(1, count * (1 + sum(self.sizes)))), {}  # flags, records

    def __getstate__(self):
        return dict(self.__dict__, shared=None)

    def get(self, index):
        """The arrays of record `index` (copies), or None if not yet stored."""
        if self.shared is None:
            return self.own.get(index)
        buf = np.frombuffer(self.shared, np.uint8)
        if not buf[index]:
            return None
        start, out = self.count + index * sum(self.sizes), []
        for (shape, dtype), size in zip(self.shapes, self.sizes):
            out.append(buf[start:start + size].view(dtype).reshape(shape).copy())
            start += size
        return tuple(out)

    def put(self, index, arrays):
        """Store the arrays of record `index`; its ready flag is set last."""
        if self.shared is None:
            self.own[index] = arrays
            return
        buf = np.frombuffer(self.shared, np.uint8)
        start = self.count + index * sum(self.sizes)
        for a, size in zip(arrays, self.sizes):
            buf[start:start + size] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            start += size
        buf[index] = 1


# (scene_seed, split, first scene, count, size, X) -> its SceneCache: the datasets of one process
# share it, so that the runs of a process (a study's runs, one after another) render each scene once
SCENE_CACHES = {}


class RoomsDataset(SegmentationDataset):
    """Rendered indoor RGB-D scenes in memory (presets 'rooms', 'rooms-val'): 800
    training and 200 test scenes of the preset's crop size, scene i of a split drawn
    from (scene_seed, split, i) by rooms_scene. An item is what RGBXDataset reads from
    the folder `python data.py rooms --scenes 1000 --seed <scene_seed>` writes: the
    uint8 RGB, X = HHA of the mm depth (rooms_hha) or the mm depth / 10000, labels
    shifted from NYU-40 ids (0 void -> 255). The scenes are fixed (scene_seed 0),
    whatever the training seed, so that test numbers compare across runs. Each scene
    is rendered once per process and kept (SceneCache, shared by the process's datasets of
    the same scenes: SCENE_CACHES; 0.5 MB a scene with HHA)."""
    SCENES = {'train': 800, 'test': 200}

    def __init__(self, split='train', preset='rooms', x_modality=None, transform=None, seed=0,
                 n=None, scene_seed=0):
        super().__init__(preset, x_modality, transform, seed)
        holdout, train = self.preset.holdout, self.SCENES['train']
        carved = {s: (s, 0, count) for s, count in self.SCENES.items()}
        if holdout:  # a validation preset: both its splits are carved from the training scenes
            carved = {'train': ('train', 0, train - holdout),
                      'test': ('train', train - holdout, holdout)}
        if split not in carved:
            raise ValueError(f"rooms split {split!r}: choose one of {tuple(carved)}")
        self.source, self.first, count = carved[split]
        self.names = [f"{self.source}_{self.first + i:04d}" for i in range(n or count)]
        self.scene_seed, self.size = scene_seed, self.preset.crop
        h, w = self.size
        x = ((h, w, 3), np.uint8) if self.x_modality == 'hha' else ((h, w), np.uint16)
        key = scene_seed, self.source, self.first, len(self.names), self.size, self.x_modality
        if key not in SCENE_CACHES:
            shapes = ((h, w, 3), np.uint8), x, ((h, w), np.uint8)
            SCENE_CACHES[key] = SceneCache(len(self.names), shapes)
        self.cache = SCENE_CACHES[key]

    def stored(self, index):
        """Scene `index` as its files store it: rgb uint8 (H, W, 3), X (HHA uint8 (H, W, 3)
        or depth uint16 (H, W) in mm) and label uint8 (H, W) of NYU-40 ids; cached."""
        stored = self.cache.get(index)
        if stored is None:
            scene = self.scene_seed, self.source, self.first + index, self.size
            rgb, _, depth, label = rooms_scene(*scene)
            x = rooms_hha(depth, rooms_camera(self.size)) if self.x_modality == 'hha' else depth
            stored = rgb, x, label
            self.cache.put(index, stored)
        return stored

    def read(self, index):
        """Scene `index`: rgb uint8 (H, W, 3), x float32 (H, W, C) on its [0, 1] scale,
        label int64 (H, W)."""
        rgb, x, label = self.stored(index)
        name, modality = self.names[index], self.preset.modalities[self.x_modality]
        return rgb, scale_x(x, modality, name), shift_label(label, self.preset, name)


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


def check_files(dataset, workers=0, say=print, rank=0, world=1):
    """Read every file of `dataset` once (exists, decodes, sizes agree, labels in
    range) before training starts, so that a bad file of either split stops the run
    before its first step rather than after an epoch; `workers` processes read in
    parallel. Under data parallelism each of the `world` processes reads its share,
    samples rank::world: the processes finish together, and none waits for another's
    reading in a collective (NCCL's watchdog ends a collective after 10 minutes). The
    generated demo has nothing to check."""
    if not isinstance(dataset, RGBXDataset):
        return
    start = time.perf_counter()
    share = torch.utils.data.Subset(Checked(dataset), range(rank, len(dataset), world))
    for _ in torch.utils.data.DataLoader(share, batch_size=16, num_workers=workers,
                                         worker_init_fn=one_thread if workers else None):
        pass
    say(f"checked the {len(dataset)} samples of {dataset.source}"
        + (f" ({len(share)} in each of {world} processes)" if world > 1 else '')
        + f" in {time.perf_counter() - start:.1f}s")


def affine_cores():
    """The cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def usable_cores():
    """The cores this process computes on (`core_budget`)."""
    return core_budget()[0]


def core_budget():
    """(cores, why): the cores this process may run on (its CPU affinity), capped by
    OMP_NUM_THREADS when set (torchrun sets it to 1 per process); otherwise less the cores
    other processes keep busy (the 1-minute load average, rounded), at least 1. Design choice:
    threads that wait for a core another process holds slow every operation down (the demo
    on 2 cores beside one busy process: 5x slower on 2 threads than on 1)."""
    cores = affine_cores()
    omp = os.environ.get('OMP_NUM_THREADS')
    if omp:
        return min(cores, int(omp)), f"OMP_NUM_THREADS={omp}"
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else 0.0
    return max(1, min(cores, cores - round(load))), (f"{cores} cores, load average {load:.1f}; "
                                                      f"OMP_NUM_THREADS=N sets them")


def one_thread(worker_id):
    """worker_init_fn: a loader worker computes on 1 thread."""
    torch.set_num_threads(1)


def loader(dataset, batch_size=1, workers=0, sampler=None, drop_last=False, pin=False,
           persistent=False):
    """A DataLoader that keeps to the cores: each of the `workers` processes runs 1
    thread and the main process usable_cores() - workers (at least 1), so that loading
    and the model never oversubscribe the cores; `persistent`: the workers live as long
    as the loader (not restarted each epoch). Worker seeds come from a fresh generator:
    the global RNG is left alone."""
    torch.set_num_threads(max(1, usable_cores() - workers))
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                                       drop_last=drop_last, worker_init_fn=one_thread if workers else None,
                                       generator=torch.Generator(),
                                       persistent_workers=persistent and workers > 0)


def build_dataset(name, root, split, x_modality=None, crop=None, train=False, seed=0, x_standardised=True,
                  augment=True):
    """The dataset `name` of PRESETS: generated (DemoDataset, RoomsDataset; root ignored) or
    RGBXDataset at `root`
    ('' or None: the preset's default root, e.g. ./datasets/NYUDepthv2). train=True
    augments with TrainTransform(crop or the preset's crop); augment=False keeps only
    the random crop; `seed` seeds augmentation (and the demo's scenes); X is
    standardised or fed as its [0, 1] values (Preset.x_norm)."""
    preset = get_preset(name)
    norms = preset.rgb_norm, preset.x_norm(x_modality, x_standardised)
    plain = {} if augment else dict(scale=(1.0, 1.0), jitter_p=0.0, blur_p=0.0, flip_p=0.0)
    transform = TrainTransform(crop or preset.crop, *norms, **plain) if train else EvalTransform(*norms)
    if preset.generator == 'rooms':
        return RoomsDataset(split, name, x_modality, transform, seed)
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
    side = 2 * HHA_PATCH[1] + 1
    if min(depth.shape) < side:
        raise ValueError(f"a depth of {depth.shape[0]} x {depth.shape[1]} pixels is smaller than "
                         f"HHA's {side} x {side} window of the gravity estimate: its HHA would be "
                         f"constant")
    if not valid.any():
        raise ValueError("the depth has no measured pixel (every value is 0 or missing): its HHA "
                         "would be constant")
    try:
        with np.errstate(over='raise'):
            return hha_channels(depth, camera, valid)
    except FloatingPointError:
        raise ValueError(f"camera {camera} puts the points beyond float range: give the "
                         f"intrinsics in pixels (e.g. nyu: "
                         f"{', '.join(f'{v:.1f}' for v in NYU_CAMERA)})") from None


def hha_channels(depth, camera, valid):
    """`hha`'s three channels, uint8 (H, W, 3), of a checked depth (metres) and its valid pixels."""
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
    if not 0 < scale < float('inf'):
        raise ValueError(f"the depth scale (--depth-scale) must be a finite number > 0 (metres "
                         f"per stored unit), not {scale}")
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
    holes = float((depth == 0).mean())  # a hole-filled depth has none
    if raw_path is not None:
        raw, missing = read_depth_metres(raw_path, scale)
        check_sizes((depth_path, depth), (raw_path, raw))
    try:
        encoded = hha(depth, camera, missing)
    except ValueError as e:
        raise ValueError(f"{depth_path}: {e}") from None
    save_png(encoded, out_path)
    return Path(out_path), holes

def check_hha_there(path, depth_path):
    """A file `path` of the output folder is skipped as done only when it can be the HHA of
    `depth_path`: an 8-bit RGB PNG of its size whose angle channel lies in HHA's 38..218;
    anything else there is an error (its folder holds other files)."""
    with Image.open(depth_path) as d:
        size = d.size
    try:
        with Image.open(path) as im:
            ok = im.format == 'PNG' and im.mode == 'RGB' and im.size == size
            angle = np.asarray(im)[..., 2] if ok else None
    except (OSError, SyntaxError, ValueError):
        ok = False
    if not ok or angle.min() < 38 or angle.max() > 218:
        raise ValueError(f"--out {path.parent} holds {path.name}, which is not the HHA of "
                         f"{depth_path} (an 8-bit RGB PNG of its size, angles 38..218): its files "
                         f"are not HHA; pass an empty folder or the HHA folder")


def _hha_job(job):
    return hha_file(*job)


HHA_RECORD = '.hha.json'  # in an HHA folder: the settings its files were made with


def hha_settings_record(out_dir, camera, raw, scale, resumed):
    """Skipping the files out_dir holds is right only when they were made with these settings:
    refuse other ones (one line naming the flags). Returns what records them once a first file
    is written into a folder that held none (None: files of unknown origin are not claimed)."""
    record, now = out_dir / HHA_RECORD, {'camera': [float(c) for c in camera], 'raw': bool(raw),
                                         'depth_scale': float(scale)}
    if resumed and record.is_file():
        try:
            was = json.loads(record.read_text())
        except (OSError, ValueError):
            was = None
        if was != now:
            raise ValueError(f"--out {out_dir} holds HHA made with other settings ({record.name}: "
                             f"{was}; now {now}): give another --out, or the same --camera, --raw "
                             f"and --depth-scale to complete it")
    return None if resumed else lambda: record.write_text(json.dumps(now))


def hha_folder(depth_dir, out_dir, camera, raw_dir=None, scale=0.001, workers=1, progress=None):
    """Convert every *.png of depth_dir to an HHA PNG of the same name in out_dir
    (created), skipping the HHA files out_dir already holds (`check_hha_there`). raw_dir: raw
    depths of the same names, whose zeros are the missing pixels (without it, the depth's own
    zeros). Returns (written, skipped, holes): holes = (the largest share of 0 pixels in a
    converted depth, its file); progress(done, total) is called after each file."""
    depth_dir, out_dir = Path(depth_dir), Path(out_dir)
    for flag, d in (('--depth', depth_dir), ('--raw', raw_dir)):
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"{flag} {d}: no such folder")
    check_output('--out', out_dir, [('--depth', depth_dir), ('--raw', raw_dir)], folder=True,
                 dataset_x='hha')
    names = sorted(p.name for p in depth_dir.iterdir()
                   if p.suffix.lower() == '.png' and p.is_file() and visible(p.name))
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
    for n in sorted(set(names) - set(todo)):
        check_hha_there(out_dir / n, depth_dir / n)
    record = hha_settings_record(out_dir, camera, raw_dir is not None, scale, len(names) > len(todo))
    jobs = [(depth_dir / n, None if raw_dir is None else Path(raw_dir) / n, out_dir / n, camera, scale) for n in todo]
    skipped, done = len(names) - len(todo), 0
    if progress:
        progress(skipped, len(names))
    holes = (0.0, None)

    def tally(results):
        nonlocal done, holes
        for path, share in results:
            holes = max(holes, (share, path.name), key=lambda h: h[0])
            done += 1
            if done == 1 and record:
                record()
            if progress:
                progress(skipped + done, len(names))
    tally(run_jobs(_hha_job, jobs, workers))
    return done, skipped, holes


# ----------------------------------------------------------------------------
# Rooms: rendered NYUDv2-like indoor RGB-D scenes
# ----------------------------------------------------------------------------
# A pinhole camera looks into a furnished box room; every pixel's ray is intersected
# analytically with the room, axis-aligned boxes and vertical cylinders (a z-buffer over
# the primitives, each tested only on the pixels its projected bounding box covers).
# RGB: procedural textures, Lambertian shading from point lights with cast shadows,
# ambient light, exposure, gamma and sensor noise. RawDepth: a Kinect's measurement
# of the exact depth; Depth: RawDepth with its holes filled; HHA: `hha` of Depth.
# World coordinates in metres: x, y horizontal, z up; the floor is z = 0.

ROOMS_VERSION = 1  # changes whenever a seed renders other files
ROOM_IDS = dict(wall=1, floor=2, cabinet=3, bed=4, chair=5, table=7, bookshelf=10, picture=11,
                mat=20, ceiling=22, box=29, lamp=35, otherprop=40)  # NYU-40 ids, 1-based as on disk
# Kinect (v1) depth: projector 7.5 cm to the camera's left, disparity measured in 1/8
# pixel at a 580 px focal length, 0.5-8 m; disparity noise of 0.049 px, so that with the
# quantisation the depth error has sd 1.425e-3 z^2 m (Khoshelham & Elberink, Sensors 2012).
KINECT = dict(baseline=0.075, focal=580.0, subpixel=8, noise=0.049, near=0.5, far=8.0)


def rooms_camera(size):
    """NYU_CAMERA scaled to an image of `size` (H, W): (fx, fy, cx, cy) in pixels, the
    centre counted from 0 at the top-left pixel (scaled about pixel centres)."""
    h, w = size
    fx, fy, cx, cy = NYU_CAMERA
    return fx * w / 640, fy * h / 480, (cx + 0.5) * w / 640 - 0.5, (cy + 0.5) * h / 480 - 0.5


def box_prim(lo, hi, cls, mat):
    """An axis-aligned box from corner lo to hi (x, y, z)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    return ('box', np.minimum(lo, hi), np.maximum(lo, hi), ROOM_IDS[cls], mat)


def cyl_prim(x, y, r, z0, z1, cls, mat):
    """A vertical cylinder of radius r around (x, y) from height z0 to z1, capped."""
    return ('cyl', np.array([x - r, y - r, z0]), np.array([x + r, y + r, z1]), ROOM_IDS[cls], mat)


def hit_box(o, d, lo, hi):
    """Ray (o + t d) - box intersection: t of the entry (inf where missed or entered at
    t <= 1e-6) and the axis (0, 1, 2) of the face entered. o (..., 3) or (3,), d (..., 3)."""
    with np.errstate(divide='ignore', invalid='ignore'):
        inv = 1 / d
        t1, t2 = (lo - o) * inv, (hi - o) * inv
    (a, b, c), tmax = np.moveaxis(np.minimum(t1, t2), -1, 0), np.maximum(t1, t2)
    near = np.maximum(np.maximum(a, b), c)
    hit = (near <= np.minimum(np.minimum(tmax[..., 0], tmax[..., 1]), tmax[..., 2])) & (near > 1e-6)
    return np.where(hit, near, np.inf), np.where(a >= np.maximum(b, c), 0, np.where(b >= c, 1, 2))


def hit_cyl(o, d, lo, hi):
    """Ray - vertical capped cylinder (bounding box lo, hi): t of the first hit (inf if
    none) and the part hit: 0 side, 2 a cap."""
    c, r = (lo[:2] + hi[:2]) / 2, (hi[0] - lo[0]) / 2
    ox, oy, oz = o[..., 0] - c[0], o[..., 1] - c[1], o[..., 2]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    a, b, cc = dx * dx + dy * dy, ox * dx + oy * dy, ox * ox + oy * oy - r * r
    with np.errstate(divide='ignore', invalid='ignore'):
        ts = (-b - np.sqrt(b * b - a * cc)) / a  # entry through the side
        zs = oz + ts * dz
        side = np.where((ts > 1e-6) & (zs >= lo[2]) & (zs <= hi[2]), ts, np.inf)
        tc = (np.where(dz < 0, hi[2], lo[2]) - oz) / dz  # the cap facing the ray
        xc, yc = ox + tc * dx, oy + tc * dy
        cap = np.where((tc > 1e-6) & (xc * xc + yc * yc <= r * r), tc, np.inf)
    return np.minimum(side, cap), np.where(cap < side, 2, 0)


def hit_prim(prim, o, d):
    """(t, part) of a primitive (see hit_box, hit_cyl)."""
    kind, lo, hi = prim[:3]
    return (hit_box if kind == 'box' else hit_cyl)(o, d, lo, hi)


def prim_normal(prim, p, part, d):
    """Unit normals (N, 3) at points p (N, 3) of a primitive, facing the rays d (N, 3)
    that hit them; part: the axis of a box face, 0 / 2 for a cylinder's side / cap."""
    kind, lo, hi = prim[:3]
    if kind == 'box':
        n = np.eye(3)[part]
    else:
        radial = np.concatenate([p[:, :2] - (lo[:2] + hi[:2]) / 2, np.zeros((len(p), 1))], 1)
        radial /= np.linalg.norm(radial, axis=1, keepdims=True)
        n = np.where(part[:, None] == 2, np.eye(3)[2], radial)
    return n * np.where((n * d).sum(1, keepdims=True) > 0, -1.0, 1.0)


def corners(prim):
    """The 8 corners (8, 3) of a primitive's bounding box."""
    lo, hi = prim[1], prim[2]
    return np.array([[(lo, hi)[i >> k & 1][k] for k in range(3)] for i in range(8)])


def screen_rect(prim, eye, R, camera, size):
    """The pixel rows and columns (r0, r1, c0, c1) that may see a primitive: the
    bounding rectangle of its projected corners, clipped to the image; the whole
    image when a corner lies behind the camera; None when nothing is in view."""
    c = (corners(prim) - eye) @ R  # (8, 3) in camera coordinates: x right, y down, z forward
    h, w = size
    if c[:, 2].min() < 1e-3:
        return 0, h, 0, w
    fx, fy, cx, cy = camera
    u, v = fx * c[:, 0] / c[:, 2] + cx, fy * c[:, 1] / c[:, 2] + cy
    r0, r1 = max(0, int(np.floor(v.min()))), min(h, int(np.ceil(v.max())) + 1)
    c0, c1 = max(0, int(np.floor(u.min()))), min(w, int(np.ceil(u.max())) + 1)
    return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


def camera_rays(R, camera, size):
    """Ray directions (H, W, 3) in world coordinates through the pixel centres, with a
    forward component of 1: a ray's t is the depth along the optical axis."""
    fx, fy, cx, cy = camera
    u = (np.arange(size[1]) - cx) / fx
    v = (np.arange(size[0]) - cy) / fy
    return R[:, 0] * u[None, :, None] + R[:, 1] * v[:, None, None] + R[:, 2]


def trace(scene, camera, size):
    """The first surface along every camera ray: depth t (H, W) along the optical axis,
    the index of the primitive hit (H, W) (-1: the room), the part hit (H, W) (the
    room's or a box's face axis, a cylinder's side or cap) and the rays (H, W, 3)."""
    eye, R = scene['eye'], scene['R']
    d = camera_rays(R, camera, size)
    with np.errstate(divide='ignore', invalid='ignore'):  # inside the room box: where rays leave it
        exits = np.where(d > 0, scene['room'], 0.0) - eye
        exits = np.where(d != 0, exits / d, np.inf)
    part, t = np.argmin(exits, -1), np.min(exits, -1)
    index = np.full(size, -1)
    for k, prim in enumerate(scene['prims']):
        rect = screen_rect(prim, eye, R, camera, size)
        if rect is None:
            continue
        block = np.s_[rect[0]:rect[1], rect[2]:rect[3]]
        th, ph = hit_prim(prim, eye, d[block])
        closer = th < t[block]
        t[block] = np.where(closer, th, t[block])
        index[block] = np.where(closer, k, index[block])
        part[block] = np.where(closer, ph, part[block])
    return t, index, part, d


def surface(scene, t, index, part, d):
    """Per pixel of a trace: points (N, 3), unit normals (N, 3) facing the camera, NYU-40
    ids (N,) and material indices (N,), N = H * W; decals (pictures, floor mats) laid
    over the room's surfaces."""
    d = d.reshape(-1, 3)
    p = scene['eye'] + t.reshape(-1, 1) * d
    index, part = index.reshape(-1), part.reshape(-1)
    normal = np.zeros_like(p)
    room = index < 0
    normal[room] = -np.eye(3)[part[room]] * np.sign(d[room, part[room], None])
    flat = np.where(d[:, 2] < 0, ROOM_IDS['floor'], ROOM_IDS['ceiling'])
    cls = np.where(part == 2, flat, ROOM_IDS['wall'])
    mat = np.where(cls == ROOM_IDS['wall'], 0, np.where(cls == ROOM_IDS['floor'], 1, 2))
    for k, prim in enumerate(scene['prims']):
        sel = np.flatnonzero(index == k)
        normal[sel] = prim_normal(prim, p[sel], part[sel], d[sel])
        cls[sel], mat[sel] = prim[3], prim[4]
    for axis, value, lo, hi, decal_cls, decal_mat in scene['decals']:
        other = [a for a in range(3) if a != axis]
        on = room & (part == axis) & (np.abs(p[:, axis] - value) < 1e-6)
        on &= ((p[:, other] >= lo) & (p[:, other] <= hi)).all(1)
        cls[on], mat[on] = ROOM_IDS[decal_cls], decal_mat
    return p, normal, cls, mat


def occluded(points, source, axis, prims):
    """Whether the segment from each point (N, 3) to a point source (3,) is blocked by a
    primitive (the room is convex and blocks nothing). A primitive is tested only on the
    points inside its shadow as seen from the source along `axis` (unit): the bounding
    rectangle of its corners projected through the source."""
    e1 = np.cross(axis, [1.0, 0, 0] if abs(axis[0]) < 0.9 else [0, 1.0, 0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    rel = points - source
    w = rel @ axis
    ahead = w > 1e-3
    with np.errstate(divide='ignore', invalid='ignore'):
        u, v = np.where(ahead, rel @ e1 / w, np.inf), rel @ e2 / w
    order = np.argsort(u, kind='stable')  # points by u: a primitive's shadow is a run of this order
    u_sorted = u[order]
    blocked = np.zeros(len(points), bool)
    for prim in prims:
        c = corners(prim) - source
        cw = c @ axis
        if cw.min() > 1e-3:  # ahead of the source: only the points in its shadow
            cu, cv = c @ e1 / cw, c @ e2 / cw
            run = np.searchsorted(u_sorted, cu.min()), np.searchsorted(u_sorted, cu.max(), 'right')
            sel = order[run[0]:run[1]]
            sel = sel[(v[sel] >= cv.min()) & (v[sel] <= cv.max()) & ~blocked[sel]]
        else:
            sel = np.flatnonzero(~blocked)
        if sel.size:
            th, _ = hit_prim(prim, points[sel], source - points[sel])
            blocked[sel[th < 1 - 1e-6]] = True
    return blocked


TEXTURES = ('plain', 'noise', 'wood', 'stripes')


def draw_material(rng, kind=None, value=(0.06, 0.9), saturation=(0.0, 0.6), gloss=0.15):
    """A material: texture kind (TEXTURES, or 'painting'), two colours, a frequency
    (cycles per metre) and direction, a value-noise lattice (16, 16), and whether it
    is glossy (probability `gloss`). Furniture draws from this one pool, so colour and
    texture do not tell its classes apart; walls, floors and ceilings narrow the colours
    and are matte."""
    kind = kind or TEXTURES[rng.choice(4, p=[0.3, 0.25, 0.25, 0.2])]
    hue = rng.uniform(0.04, 0.11) if kind == 'wood' else rng.uniform()
    c1 = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*saturation), rng.uniform(*value)))
    if kind in ('stripes', 'painting'):
        hsv = rng.uniform(), rng.uniform(*saturation), rng.uniform(*value)
        c2 = np.array(colorsys.hsv_to_rgb(*hsv))
    else:
        c2 = c1 * rng.uniform(0.45, 0.85)
    return dict(kind=kind, c1=c1, c2=c2, c3=rng.random(3), freq=rng.uniform(2, 10),
                angle=rng.uniform(0, np.pi), glossy=rng.random() < gloss,
                table=rng.random((16, 16)))


def value_noise(table, s, t):
    """Smooth noise in [0, 1] at coordinates s, t (N,): the lattice `table` (n, n),
    repeated, interpolated bilinearly with smoothstep weights."""
    n = table.shape[0]
    i, j = np.floor(s), np.floor(t)
    fs, ft = s - i, t - j
    fs, ft = fs * fs * (3 - 2 * fs), ft * ft * (3 - 2 * ft)
    i, j = i.astype(np.int64) % n, j.astype(np.int64) % n
    i1, j1 = (i + 1) % n, (j + 1) % n
    top = table[i, j] + (table[i1, j] - table[i, j]) * fs
    bottom = table[i, j1] + (table[i1, j1] - table[i, j1]) * fs
    return top + (bottom - top) * ft


def albedo(mat, s, t):
    """Reflectance (N, 3) of material `mat` at surface coordinates s, t (N,) in metres:
    plain (faint mottling), noise (two octaves), wood (grain lines bent by noise),
    stripes, or a painting (three colours blended by waves)."""
    kind, f, a = mat['kind'], mat['freq'], mat['angle']
    u, v = s * np.cos(a) + t * np.sin(a), t * np.cos(a) - s * np.sin(a)
    if kind == 'painting':
        waves = [np.sin(2 * np.pi * f / 3 * (u * np.cos(k) + v * np.sin(k)) + 4 * k)
                 for k in (0, 2, 4)]
        w = np.exp(2 * np.stack(waves, 1))
        return w @ np.stack([mat['c1'], mat['c2'], mat['c3']]) / w.sum(1, keepdims=True)
    noise = value_noise(mat['table'], f * u, f * v)
    if kind == 'plain':
        m = 0.15 * noise
    elif kind == 'noise':
        m = 0.6 * noise + 0.4 * value_noise(mat['table'], 3.1 * f * u + 5.3, 3.1 * f * v + 1.7)
    elif kind == 'wood':
        bent = 2 * f * v + 1.5 * value_noise(mat['table'], 0.5 * u, 2 * v)
        m = (0.5 + 0.5 * np.sin(2 * np.pi * bent)) ** 3
    else:
        m = np.clip(0.5 + 2 * np.sin(np.pi * f * u), 0, 1)
    return mat['c1'] + (mat['c2'] - mat['c1']) * m[:, None]


def surface_coordinates(p, normal):
    """The two world coordinates (N,) each along a surface: those other than the normal's
    largest component (a floor: x, y; a wall facing x: y, z)."""
    axis = np.abs(normal).argmax(1)
    rows = np.arange(len(p))
    return p[rows, (axis == 0).astype(int)], p[rows, 2 - (axis == 2)]


def room_view(rng):
    """The room (x, y, z extent, metres: 3-7 wide, 2.4-2.8 high) and the camera: eye (3,)
    1.0-1.6 m high near the wall y = 0, rotation R (3, 3) whose columns are the camera's
    right, down and forward axes: turned up to 35 degrees from facing +y (into the room),
    pitched down 5-35 degrees (5 + 30 u^2, u uniform: half the views below 12.5, which
    see the ceiling), rolled up to 5."""
    room = np.array([rng.uniform(3, 7), rng.uniform(3, 7), rng.uniform(2.4, 2.8)])
    eye = np.array([rng.uniform(0.3, 0.7) * room[0], rng.uniform(0.15, 0.5), rng.uniform(1.0, 1.6)])
    yaw, pitch, roll = np.radians([rng.uniform(-35, 35), 5 + 30 * rng.random() ** 2,
                                   rng.uniform(-5, 5)])
    forward = np.array([np.sin(yaw) * np.cos(pitch), np.cos(yaw) * np.cos(pitch), -np.sin(pitch)])
    right = np.array([np.cos(yaw), -np.sin(yaw), 0.0])
    down = np.cross(forward, right)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, c * down - s * right
    return room, eye, np.stack([right, down, forward], 1)


def find_spot(rng, room, taken, eye, w, d, wall, margin=0.1):
    """A free footprint for an object w wide (along its back) and d deep: ((x0, y0, x1, y1),
    facing k) with k = 0..3 for +y, -y, +x, -x, the direction its front faces. wall: its
    back against one of the three walls in front of the camera; else free-standing.
    Footprints keep `margin` from those in `taken` and 0.9 m from the camera; None
    after 30 draws."""
    wx, wy = room[:2]
    for _ in range(30):
        k = int(rng.integers(1, 4)) if wall else int(rng.integers(4))
        fw, fd = (w, d) if k < 2 else (d, w)
        if wall:
            x0 = (rng.uniform(0, wx - fw), 0.0, wx - fw)[k - 1]
            y0 = wy - fd if k == 1 else rng.uniform(0, wy - fd)
        else:
            x0, y0 = rng.uniform(0.3, wx - fw - 0.3), rng.uniform(0.3, wy - fd - 0.3)
        if find_free(room, taken, eye, (x0, y0, x0 + fw, y0 + fd), margin):
            return taken[-1], k
    return None


def part(spot, u, v, z, cls, mat):
    """A box of an object given in its own frame: u (lo, hi) along its back, v (lo, hi)
    from its back towards its front, z (lo, hi) up; spot = (footprint, facing)."""
    (x0, y0, x1, y1), k = spot
    xs, ys = ((x0 + u[0], x0 + u[1]), (y0 + v[0], y0 + v[1])) if k == 0 else \
        ((x1 - u[0], x1 - u[1]), (y1 - v[0], y1 - v[1])) if k == 1 else \
        ((x0 + v[0], x0 + v[1]), (y1 - u[0], y1 - u[1])) if k == 2 else \
        ((x1 - v[0], x1 - v[1]), (y0 + u[0], y0 + u[1]))
    return box_prim((xs[0], ys[0], z[0]), (xs[1], ys[1], z[1]), cls, mat)


def legs(spot, w, d, top, size, cls, mat):
    """Four square legs of `size` under the corners of a w x d top at height `top`."""
    return [part(spot, (a, a + size), (b, b + size), (0, top), cls, mat)
            for a in (0.02, w - 0.02 - size) for b in (0.02, d - 0.02 - size)]


def pool(rng, mats):
    """Index of a new material from the shared pool, appended to mats."""
    mats.append(draw_material(rng))
    return len(mats) - 1


def furniture(rng, room, taken, eye, mats):
    """Beds, cabinets, bookshelves and a table with chairs, against the walls or free:
    primitives, and the tops (x0, y0, x1, y1, height) where small things may stand."""
    prims, tops = [], []
    if rng.random() < 0.7:  # bed: base, mattress, headboard against the wall
        w, d = rng.uniform(0.9, 1.8), rng.uniform(1.9, 2.1)
        spot = find_spot(rng, room, taken, eye, w, d, wall=True)
        if spot:
            base, top, head = rng.uniform(0.2, 0.35), rng.uniform(0.15, 0.25), rng.uniform(0.8, 1.2)
            a, b = pool(rng, mats), pool(rng, mats)
            prims += [part(spot, (0, w), (0.06, d), (0, base), 'bed', a),
                      part(spot, (0, w), (0, 0.06), (0, head), 'bed', a),
                      part(spot, (0.02, w - 0.02), (0.06, d - 0.02), (base, base + top), 'bed', b)]
    for _ in range(rng.integers(1, 3)):  # cabinets, with two handles
        w, d, h = rng.uniform(0.5, 1.6), rng.uniform(0.4, 0.6), rng.uniform(0.5, 2.0)
        spot = find_spot(rng, room, taken, eye, w, d, wall=True)
        if spot:
            m = pool(rng, mats)
            prims += [part(spot, (0, w), (0, d), (0, h), 'cabinet', m)]
            handle = pool(rng, mats)
            prims += [part(spot, (c - 0.02, c + 0.02), (d, d + 0.025), (0.55 * h, 0.6 * h),
                           'cabinet', handle) for c in (w / 2 - 0.08, w / 2 + 0.08)]
            if h < 1.2:
                tops.append((*spot[0], h))
    if rng.random() < 0.8:
        prims += bookshelf(rng, room, taken, eye, mats)
    if rng.random() < 0.9:
        table_prims, table_top = table(rng, room, taken, eye, mats)
        prims += table_prims
        tops += table_top
    return prims, tops


def bookshelf(rng, room, taken, eye, mats):
    """Open shelves against a wall: back, sides, 4-6 boards, boxes on some boards."""
    w, d, h = rng.uniform(0.6, 1.2), rng.uniform(0.28, 0.4), rng.uniform(1.2, 2.1)
    spot = find_spot(rng, room, taken, eye, w, d, wall=True)
    if not spot:
        return []
    m = pool(rng, mats)
    prims = [part(spot, (0, w), (0, 0.02), (0, h), 'bookshelf', m),
             part(spot, (0, 0.02), (0, d), (0, h), 'bookshelf', m),
             part(spot, (w - 0.02, w), (0, d), (0, h), 'bookshelf', m)]
    levels = np.linspace(0, h - 0.02, rng.integers(4, 7))
    for z, above in zip(levels, np.diff(np.append(levels, h))):
        prims.append(part(spot, (0.02, w - 0.02), (0.02, d), (z, z + 0.02), 'bookshelf', m))
        if above > 0.15 and rng.random() < 0.35:
            a, size = rng.uniform(0.03, w / 2), rng.uniform(0.1, min(0.3, w / 2 - 0.03))
            top = z + min(above - 0.03, 0.1 + size)
            m_box = pool(rng, mats)
            prims.append(part(spot, (a, a + size), (0.04, d - 0.02), (z + 0.02, top), 'box', m_box))
    return prims


def table(rng, room, taken, eye, mats):
    """A table (a thin top on legs at 0.68-0.78 m) free or against a wall, with 1-4
    chairs (seat, legs, backrest) facing it: primitives and its top."""
    w, d, h = rng.uniform(0.8, 1.6), rng.uniform(0.6, 1.0), rng.uniform(0.68, 0.78)
    spot = find_spot(rng, room, taken, eye, w, d, wall=rng.random() < 0.3)
    if not spot:
        return [], []
    m = pool(rng, mats)
    prims = [part(spot, (0, w), (0, d), (h - rng.uniform(0.025, 0.05), h), 'table', m)] + \
        legs(spot, w, d, h - 0.02, rng.uniform(0.04, 0.07), 'table', m)
    x0, y0, x1, y1 = spot[0]
    m = pool(rng, mats)
    for _ in range(rng.integers(1, 5)):
        s, gap, side = rng.uniform(0.4, 0.5), rng.uniform(0.02, 0.25), rng.integers(4)
        along = rng.uniform(0, 1)
        x = x0 + along * (x1 - x0 - s) if side < 2 else (x1 + gap if side == 2 else x0 - gap - s)
        y = y0 + along * (y1 - y0 - s) if side >= 2 else (y1 + gap if side == 0 else y0 - gap - s)
        if find_free(room, taken, eye, (x, y, x + s, y + s)):  # its front faces the table
            prims += chair(rng, (taken[-1], (1, 0, 3, 2)[side]), s, m)
    return prims, [(x0, y0, x1, y1, h)]


def find_free(room, taken, eye, rect, margin=0.0):
    """Claim the footprint rect (x0, y0, x1, y1) (append it to `taken`) if it lies in the
    room, `margin` clear of those in `taken` and over 0.9 m from the camera."""
    x0, y0, x1, y1 = rect
    if x0 < 0 or y0 < 0 or x1 > room[0] or y1 > room[1]:
        return False
    if any(x0 < o[2] + margin and x1 > o[0] - margin and y0 < o[3] + margin and y1 > o[1] - margin
           for o in taken):
        return False
    if np.hypot(max(x0 - eye[0], 0, eye[0] - x1), max(y0 - eye[1], 0, eye[1] - y1)) <= 0.9:
        return False
    taken.append(rect)
    return True


def chair(rng, spot, s, m):
    """A chair on an s x s footprint: seat at 0.42-0.48 m, four legs, a backrest."""
    seat, back = rng.uniform(0.42, 0.48), rng.uniform(0.35, 0.5)
    return [part(spot, (0, s), (0, s), (seat - 0.04, seat), 'chair', m),
            part(spot, (0, s), (0, 0.04), (seat, seat + back), 'chair', m),
            *legs(spot, s, s, seat - 0.04, 0.03, 'chair', m)]


def small_things(rng, room, taken, eye, mats, tops):
    """Boxes (1-3), a lamp and an other-prop (a vase or bin), each on the floor or on a
    top (a table, a low cabinet). Items share a top only at different ends."""
    prims, free_tops = [], [(t, a) for t in tops for a in (0.0, 0.5)]
    order = rng.permutation(len(free_tops))
    kinds = ['box'] * int(rng.integers(1, 4)) + ['lamp'] * (rng.random() < 0.8)
    for kind in kinds + ['otherprop'] * (rng.random() < 0.8):
        on_top = len(order) and rng.random() < 0.5
        if on_top:
            (x0, y0, x1, y1, h), half = free_tops[order[0]]
            order = order[1:]
            x0, x1 = x0 + half * (x1 - x0), x1 - (0.5 - half) * (x1 - x0)  # its end of the top
            r = min(x1 - x0, y1 - y0) / 2
            s = rng.uniform(0.1, max(0.11, 1.6 * r - 0.05))
            cx, cy = (rng.uniform(a + s / 2, b - s / 2) if b - a > s else (a + b) / 2
                      for a, b in ((x0, x1), (y0, y1)))
            scale = 0.5
        else:
            s, scale, h = rng.uniform(0.25, 0.6), 1.0, 0.0
            spot = find_spot(rng, room, taken, eye, s, s, wall=rng.random() < 0.5)
            if not spot:
                continue
            (x0, y0, x1, y1), _ = spot
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        prims += thing(rng, kind, cx, cy, s, h, scale, mats)
    return prims


def thing(rng, kind, x, y, s, z, scale, mats):
    """A box (s wide), a lamp (base, pole, shade) or an other-prop (cylinder) standing at
    (x, y, z), sized by `scale` (1 on the floor, 0.5 on a top)."""
    m = pool(rng, mats)
    if kind == 'box':
        h, d = rng.uniform(0.4, 1.0) * s, rng.uniform(0.6, 1.0) * s
        return [box_prim((x - s / 2, y - d / 2, z), (x + s / 2, y + d / 2, z + h), 'box', m)]
    if kind == 'otherprop':
        r, h = rng.uniform(0.2, 0.45) * s, rng.uniform(0.4, 1.5) * s
        return [cyl_prim(x, y, r, z, z + h, 'otherprop', m)]
    height, shade = scale * rng.uniform(1.2, 1.7), scale * rng.uniform(0.15, 0.22)
    return [cyl_prim(x, y, 0.6 * shade, z, z + 0.03, 'lamp', m),
            cyl_prim(x, y, 0.015, z, z + height, 'lamp', m),
            cyl_prim(x, y, shade, z + height - 1.4 * shade, z + height, 'lamp', pool(rng, mats))]


def decals(rng, room, mats):
    """Pictures (framed paintings flat on the three walls in front of the camera) and a
    floor mat: (axis, plane value, lo (2,), hi (2,) in the plane's other two
    coordinates, class, material). They change the colours only, never the depth."""
    out = []
    for _ in range(rng.integers(1, 4)):
        axis, value = ((1, room[1]), (0, 0.0), (0, room[0]))[rng.integers(3)]
        length = room[1 - axis]
        w, h = rng.uniform(0.3, min(1.2, length - 0.4)), rng.uniform(0.3, 0.9)
        a, z = rng.uniform(0.2, length - 0.2 - w), rng.uniform(1.1, room[2] - 0.15 - h)
        frame = rng.uniform(0.02, 0.06)
        lo, hi = np.array([a, z]), np.array([a + w, z + h])
        out += [(axis, value, lo, hi, 'picture', pool(rng, mats)),
                (axis, value, lo + frame, hi - frame, 'picture', len(mats))]
        mats.append(draw_material(rng, 'painting', (0.3, 1.0), (0.3, 1.0), gloss=0))
    if rng.random() < 0.7:
        w, d = rng.uniform(0.6, 2.0), rng.uniform(0.5, 1.5)
        a, b = rng.uniform(0, room[0] - w), rng.uniform(0, room[1] - d)
        out.append((2, 0.0, np.array([a, b]), np.array([a + w, b + d]), 'mat', pool(rng, mats)))
    return out


def room_scene(rng):
    """One scene drawn from rng: dict(room (3,), eye (3,), R (3, 3), lights [(position
    (3,), power)], ambient, prims, decals, mats); mats 0, 1, 2: wall, floor, ceiling."""
    room, eye, R = room_view(rng)
    mats = [draw_material(rng, TEXTURES[rng.choice([0, 1])], (0.55, 0.95), (0, 0.25), 0),  # wall
            draw_material(rng, TEXTURES[rng.choice([1, 2, 3])], (0.2, 0.8), (0, 0.5), 0),  # floor
            draw_material(rng, 'plain', (0.8, 0.97), (0, 0.05), 0)]  # ceiling
    taken = []
    prims, tops = furniture(rng, room, taken, eye, mats)
    prims += small_things(rng, room, taken, eye, mats, tops)
    n = rng.integers(1, 3)
    lights = [(room * [rng.uniform(0.15, 0.85), rng.uniform(0.2, 0.9), 1]
               - [0, 0, rng.uniform(0.05, 0.3)], rng.uniform(3, 8) / n) for _ in range(n)]
    return dict(room=room, eye=eye, R=R, lights=lights, ambient=rng.uniform(0.15, 0.4), prims=prims,
                decals=decals(rng, room, mats), mats=mats)


def shade(scene, p, normal, colour, glossy):
    """Linear radiance (N, 3): colour x (ambient + sum over lights of power x max(0,
    n . l) / distance^2, 0 where a primitive casts its shadow), plus a Blinn-Phong
    highlight (n . h)^40 on glossy materials."""
    view = scene['eye'] - p
    view /= np.linalg.norm(view, axis=1, keepdims=True)
    light = np.full(len(p), scene['ambient'])
    highlight = np.zeros(len(p))
    for source, power in scene['lights']:
        ray = source - p
        dist2 = (ray * ray).sum(1)
        ray /= np.sqrt(dist2)[:, None]
        lit = np.clip((normal * ray).sum(1), 0, None) * power / dist2
        lit[occluded(p, source, np.array([0, 0, -1.0]), scene['prims'])] = 0
        light += lit
        half = ray + view
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        specular = np.clip((normal * half).sum(1), 0, None) ** 40
        highlight += np.where(lit > 0, 0.3 * power / dist2 * specular, 0)
    return colour * light[:, None] + (highlight * glossy)[:, None]


def blur121(v):
    """v (H, W, ...) filtered with [1, 2, 1] / 4 along rows and columns, edges repeated."""
    v = np.pad(v, [(1, 1), (1, 1)] + [(0, 0)] * (v.ndim - 2), mode='edge')
    v = (v[:-2] + 2 * v[1:-1] + v[2:]) / 4
    return (v[:, :-2] + 2 * v[:, 1:-1] + v[:, 2:]) / 4


def expose(radiance, rng, size):
    """Linear radiance (N, 3) -> uint8 (H, W, 3): auto-exposure (the 98th percentile at
    0.75-1.0 of full scale), a [1, 2, 1] / 4 lens blur, shot and read noise, gamma
    1 / 2.2, rounded."""
    v = blur121(radiance.reshape(*size, 3) * (rng.uniform(0.75, 1.0) / np.percentile(radiance, 98)))
    v = v + rng.standard_normal(v.shape) * (0.004 + 0.015 * np.sqrt(v))
    return np.round(np.clip(v, 0, 1) ** (1 / 2.2) * 255).astype(np.uint8)


def kinect(scene, depth, p, normal, d, colour, glossy, rng):
    """RawDepth uint16 (H, W) in mm (0 = no measurement) of the exact depth (H, W) in
    metres, as a Kinect measures it: disparity b f / z plus noise, quantised to
    1 / subpixel (KINECT); no measurement where the projector (baseline to the camera's
    left) does not light the point, outside 0.5-8 m, at incidence beyond 85 degrees, on
    glossy surfaces beyond 70, in blobs on dark ones (reflectance under 0.1: the darker
    the more), on half the pixels along depth edges, and in a band 1-3 % of the width at
    the left edge (where the registered depth camera does not see)."""
    size = depth.shape
    bf = KINECT['baseline'] * KINECT['focal']
    disparity = bf / depth + KINECT['noise'] * rng.standard_normal(size)
    disparity = np.round(disparity * KINECT['subpixel'])
    with np.errstate(divide='ignore'):
        raw = bf * KINECT['subpixel'] / disparity
    projector = scene['eye'] - KINECT['baseline'] * scene['R'][:, 0]
    hole = occluded(p, projector, scene['R'][:, 2], scene['prims']).reshape(size)
    incidence = np.abs((normal * d).sum(1) / np.linalg.norm(d, axis=1)).reshape(size)  # its cosine
    darkness = (0.1 - colour @ np.array([0.299, 0.587, 0.114])).reshape(size) / 0.1
    rows, cols = np.mgrid[0:size[0], 0:size[1]] / (size[1] / 50)
    hole |= value_noise(rng.random((64, 64)), rows, cols) < 0.8 * darkness
    hole |= (incidence < np.cos(np.radians(85))) | ((glossy.reshape(size) > 0) & (incidence < 0.35))
    jump = np.zeros(size, bool)
    jump[:, 1:] |= np.abs(np.diff(depth, axis=1)) > 0.04 * depth[:, 1:]
    jump[1:] |= np.abs(np.diff(depth, axis=0)) > 0.04 * depth[1:]
    hole |= jump & (rng.random(size) < 0.5)
    hole |= ~((raw >= KINECT['near']) & (raw <= KINECT['far']))
    hole[:, :int(rng.uniform(0.01, 0.03) * size[1]) + 1] = True  # outside the depth camera's view
    return np.where(hole, 0, np.round(np.where(hole, 0, raw) * 1000)).astype(np.uint16)


def fill_depth(raw):
    """Depth uint16 (H, W) in mm: raw (H, W) with its holes filled along each row
    (design choice: cheap, and exact where measured): between the nearest measured pixels
    to the left and right, linearly where they differ by under 10 % (one surface), else
    with the farther (a hole at an edge is mostly background the projector did not
    light); with one side only, that side. Rows without a measurement take the nearest
    row that has one."""
    h, w = raw.shape
    z, valid, cols = raw.astype(np.float64), raw > 0, np.arange(w)
    if not valid.any():
        return raw.copy()
    left = np.maximum.accumulate(np.where(valid, cols, -1), axis=1)
    right = np.minimum.accumulate(np.where(valid, cols, w)[:, ::-1], axis=1)[:, ::-1]
    rows = np.arange(h)[:, None]
    zl = np.where(left >= 0, z[rows, np.maximum(left, 0)], np.nan)
    zr = np.where(right < w, z[rows, np.minimum(right, w - 1)], np.nan)
    with np.errstate(invalid='ignore'):
        lerp = zl + (zr - zl) * (cols - left) / (right - left)
        fill = np.where(np.abs(zl - zr) < 0.1 * np.fmax(zl, zr), lerp, np.fmax(zl, zr))
    out = np.where(valid, z, fill)
    measured = np.flatnonzero(valid.any(1))
    nearest = measured[np.abs(np.arange(h)[:, None] - measured[None]).argmin(1)]
    return np.round(out[nearest]).astype(np.uint16)


def render_room(rng, size):
    """One scene of `size` (H, W) drawn from rng: rgb uint8 (H, W, 3), raw depth and
    depth uint16 (H, W) in mm (0 = no measurement; depth = raw depth filled, equal where
    measured) and label uint8 (H, W) of NYU-40 ids."""
    scene = room_scene(rng)
    t, index, part, d = trace(scene, rooms_camera(size), size)
    p, normal, cls, mat = surface(scene, t, index, part, d)
    colour, glossy = np.zeros_like(p), np.zeros(len(p))
    for m in np.unique(mat):
        sel = np.flatnonzero(mat == m)
        colour[sel] = albedo(scene['mats'][m], *surface_coordinates(p[sel], normal[sel]))
        glossy[sel] = scene['mats'][m]['glossy']
    rgb = expose(shade(scene, p, normal, colour, glossy), rng, size)
    raw = kinect(scene, t, p, normal, d.reshape(-1, 3), colour, glossy, rng)
    return rgb, raw, fill_depth(raw), cls.reshape(size).astype(np.uint8)


ROOMS_SPLITS = ('train', 'test')
ROOMS_FOLDERS = ('RGB', 'RawDepth', 'Depth', 'HHA', 'Label')
ROOMS_RENDERER = 'rgbx rooms'


def rooms_scene(seed, split, index, size):
    """Scene `index` of `split` ('train' / 'test') for `seed`, as stored: rgb uint8
    (H, W, 3), raw depth and depth uint16 (H, W) in mm, label uint8 (H, W) of NYU-40
    ids; a pure function of its arguments (and ROOMS_VERSION)."""
    return render_room(sample_rng(ROOMS, seed, ROOMS_SPLITS.index(split), index), size)


def rooms_hha(depth_mm, camera):
    """HHA uint8 (H, W, 3) of a depth in mm, as `python data.py hha` and eval.py --depth
    compute it from the depth file (metres = mm / 1000; the zeros are missing)."""
    return hha(depth_mm.astype(np.float64) / 1000, camera, depth_mm == 0)


def rooms_split(scenes):
    """(train, test) scene counts of a dataset of `scenes`: a fifth (at least one) for testing."""
    test = max(1, round(scenes / 5))
    return scenes - test, test


def rooms_meta(size, seed, scenes):
    """camera.json of a rooms folder: the intrinsics (pixels, centre counted from 0 at
    the top-left pixel), the image size, and what renders the same files again."""
    fx, fy, cx, cy = rooms_camera(size)
    train, test = rooms_split(scenes)
    return dict(fx=fx, fy=fy, cx=cx, cy=cy, height=size[0], width=size[1], depth_unit_m=0.001,
                renderer=ROOMS_RENDERER, version=ROOMS_VERSION, seed=seed, train=train, test=test)


def save_png(arr, path):
    """Write arr as a PNG under a temporary name, then rename: a file at path is whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with disk_full_names(path):
            Image.fromarray(arr).save(tmp, format='PNG')
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rooms_write(job):
    """Render one scene and write its five files (RGB, RawDepth, Depth, HHA, Label)."""
    out, split, index, size, seed = job
    rgb, raw, depth, label = rooms_scene(seed, split, index, size)
    arrays = (rgb, raw, depth, rooms_hha(depth, rooms_camera(size)), label)
    for folder, arr in zip(ROOMS_FOLDERS, arrays):
        save_png(arr, Path(out) / folder / f"{split}_{index:04d}.png")


def check_rooms_folder(out, meta):
    """Refuse an --out that is a file, a folder holding something other than a rooms
    dataset, or rooms of another renderer version, seed or size."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        old = json.loads((out / 'camera.json').read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or old.get('renderer') != ROOMS_RENDERER:
        raise ValueError(f"--out {out} holds files but is not a rooms dataset (no camera.json of "
                         f"{ROOMS_RENDERER}); give a new or empty folder")
    for key, flag in (('version', 'renderer version'), ('seed', '--seed'), ('height', '--size'),
                      ('width', '--size')):
        if old.get(key) != meta[key]:  # --size shown as HxW, as it is given
            was, now = (f"{m.get('height')}x{m.get('width')}" if flag == '--size' else m.get(key)
                        for m in (old, meta))
            raise ValueError(f"--out {out} holds rooms of {flag} {was}, not {now}: "
                             f"give another folder (or the same {flag} to resume)")


def rooms_sheet(seed=0, scenes=6, size=(240, 320)):
    """A contact sheet uint8 (scenes * H, 4 * W, 3) of the first training scenes of `seed`,
    one row each: RGB | raw depth (grey, nearer brighter, no measurement black) | HHA |
    label in the NYU-40 palette (void black)."""
    rows = []
    for i in range(scenes):
        rgb, raw, depth, label = rooms_scene(seed, 'train', i, size)
        grey = np.where(raw > 0, 250 - np.clip((raw - 500.0) / 5500 * 220, 0, 220), 0).astype(np.uint8)
        classes = colorize(shift_label(label, 'rooms'), palette('rooms'))
        hha_image = rooms_hha(depth, rooms_camera(size))
        rows.append(np.concatenate([rgb, np.repeat(grey[..., None], 3, -1), hha_image, classes], 1))
    return np.concatenate(rows)

def write_text(path, text):
    """Write text to a temporary name, then rename: a file at path is whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with disk_full_names(path):
        tmp.write_text(text)
    os.replace(tmp, path)


def rooms_folder(out, scenes, size=(240, 320), seed=0, workers=1, progress=None):
    """Render `scenes` scenes of `size` (H, W) for `seed` into the folder `out` in the
    NYUDv2 layout: RGB/ (8-bit), RawDepth/ and Depth/ (16-bit, mm, 0 = no measurement),
    HHA/ (rooms_hha of Depth), Label/ (0 void, NYU-40 ids 1..40), train.txt and test.txt
    (train_<i> and test_<i>, rooms_split) and camera.json (rooms_meta, written first).
    Scenes whose five files exist are skipped (resuming; each file is written whole).
    Returns (written, skipped) scene counts; progress(done, total) after each scene."""
    if scenes < 2:
        raise ValueError(f"--scenes must be >= 2 (a fifth, at least one, is the test split), "
                         f"not {scenes}")
    meta = rooms_meta(size, seed, scenes)
    check_output('--out', out)  # not inside a run or another dataset
    check_rooms_folder(out, meta)
    out = Path(out)
    try:
        for folder in ROOMS_FOLDERS:
            (out / folder).mkdir(parents=True, exist_ok=True)
        write_text(out / 'camera.json', json.dumps(meta, indent=1) + '\n')
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror or e})") from None
    scenes = [(split, i) for split, n in zip(ROOMS_SPLITS, rooms_split(scenes)) for i in range(n)]
    todo = [(out, split, i, size, seed) for split, i in scenes
            if not all((out / f / f"{split}_{i:04d}.png").is_file() for f in ROOMS_FOLDERS)]
    skipped = len(scenes) - len(todo)
    if progress:
        progress(skipped, len(scenes))
    for done, _ in enumerate(run_jobs(rooms_write, todo, workers), skipped + 1):
        if progress:
            progress(done, len(scenes))
    for name in ROOMS_SPLITS:
        ids = [f"{split}_{i:04d}" for split, i in scenes if split == name]
        write_text(out / f"{name}.txt", ''.join(f"RGB/{n}.png Label/{n}.png\n" for n in ids))
    return len(todo), skipped


def run_jobs(fn, jobs, workers):
    """fn(job) for each job, in `workers` spawned processes when above 1: the results, as
    they come."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        with multiprocessing.get_context('spawn').Pool(workers) as pool:
            yield from pool.imap_unordered(fn, jobs)
    else:
        yield from map(fn, jobs)


def parse_hw(text, flag):
    """'HxW' -> (H, W), each at least 16, or a one-line error naming the flag."""
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        h = w = 0
    if min(h, w) < 16:
        raise ValueError(f"{flag} takes HxW, two whole numbers of at least 16 pixels "
                         f"(e.g. 240x320), not {text!r}")
    return h, w


class OneLineParser(argparse.ArgumentParser):
    """argparse, whose errors (an unknown flag, a value of the wrong type, a missing one) end
    the command with one line, 'error: ...', as every other refusal does (no usage block)."""

    def error(self, message):
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


def dash_values(argv, flags):
    """argv with a value that starts with '-' attached to its flag (`--crop -1x5` ->
    `--crop=-1x5`) for the `flags` that take one, so that argparse hands it to the flag's
    own check rather than taking it for a flag ("expected one argument")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = []
    for a in argv:
        if out and out[-1] in flags and a.startswith('-') and not a.startswith('--'):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def cli_parser():
    """The command line of data.py: the subcommands hha and rooms."""
    ap = OneLineParser(prog='data.py', description="Data tools of rgbx.")
    sub = ap.add_subparsers(dest='command', required=True)
    p = sub.add_parser('hha', help="convert depth PNGs to HHA PNGs (Gupta et al., ECCV 2014)",
                       description="Convert every depth PNG of a folder to an HHA PNG of the same name "
                                   "(disparity, height, angle; as the authors' MATLAB saveHHA). Files the "
                                   "output folder already holds are skipped.")
    p.add_argument('--depth', required=True, metavar='DIR',
                   help="folder of depth PNGs (1-channel 16-bit, millimetres unless --depth-scale), "
                        "hole-filled (raw depths with holes work too, and the run says so)")
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
    r = sub.add_parser('rooms', help="render NYUDv2-like indoor RGB-D scenes into a dataset folder",
                       description="Render furnished rooms (RGB, Kinect-like raw depth, "
                                   "filled depth, HHA, NYU-40 labels) in the NYUDv2 layout, "
                                   "with train.txt, test.txt (a fifth of the scenes) and "
                                   "camera.json. The same seed and renderer version give the "
                                   "same files; scenes already written are skipped.")
    r.add_argument('--out', required=True, metavar='DIR',
                   help="dataset folder (new, empty, or rooms to resume)")
    r.add_argument('--scenes', required=True, type=int, metavar='N',
                   help="number of scenes (train + test)")
    r.add_argument('--size', default='240x320', metavar='HxW', help="image size (default 240x320)")
    r.add_argument('--seed', type=int, default=0, metavar='S',
                   help="seed of the scenes (default 0, the scenes of --dataset rooms)")
    r.add_argument('--workers', type=int, default=1, metavar='N',
                   help="processes rendering in parallel (default 1)")
    return ap


def run_command(args, progress):
    """Run a parsed data.py command; returns (written, skipped, holes) (holes: hha's
    largest share of 0 pixels in a depth and its file, see hha_folder)."""
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, not {args.workers}")
    if args.command == 'rooms':
        if not 0 <= args.seed < 2 ** 63:
            raise ValueError(f"--seed must be from 0 to 2^63 - 1, not {args.seed}")
        size = parse_hw(args.size, '--size')
        return (*rooms_folder(args.out, args.scenes, size, args.seed, args.workers, progress), (0, None))
    if not 0 < args.depth_scale < float('inf'):
        raise ValueError(f"--depth-scale must be a finite number > 0 (metres per stored unit), not "
                         f"{args.depth_scale}")
    return hha_folder(args.depth, args.out, parse_camera(args.camera), args.raw, args.depth_scale,
                      args.workers, progress)


def main(argv=None):
    """Command line: `python data.py hha ...` converts a folder of depth PNGs to HHA;
    `python data.py rooms ...` renders a rooms dataset folder."""
    args = cli_parser().parse_args(dash_values(argv, ('--camera', '--seed', '--scenes')))
    shown, unit = [], 'files' if args.command == 'hha' else 'scenes'

    def progress(done, total):  # one line rewritten in place on a terminal, a line every 10% in a log
        shown.append(done)
        if sys.stderr.isatty():
            print(f"\r{args.command}: {done}/{total} {unit}", end='', file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(f"{args.command}: {done}/{total} {unit}", file=sys.stderr, flush=True)

    def end_line():
        if shown and sys.stderr.isatty():
            print(file=sys.stderr)

    try:
        written, skipped, (holes, name) = run_command(args, progress)
    except (ValueError, OSError) as e:
        end_line()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        end_line()
        print(f"{args.command}: interrupted; finished {unit} are kept and skipped next time",
              file=sys.stderr)
        return 130
    end_line()
    if holes and args.command == 'hha' and args.raw is None:
        print(f"hha: note: the --depth files have pixels of 0 (no measurement; {holes:.0%} of "
              f"{name}): they are raw depths, whose holes are left out of the normals (Gupta's "
              f"saveHHA). The NYUDv2 HHA files the released models take were made from the "
              f"hole-filled depth: pass that as --depth", file=sys.stderr)
    print(f"{args.command}: {written} written, {skipped} already there, in {args.out}", file=sys.stderr)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
