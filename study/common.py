"""What the study's two entry points share (study.run, study.pretraining): the study's folder,
its validation preset, MaskMentor's options at the study's scale, and the check of their outputs."""
import os
import sys

import data

HERE = os.path.dirname(os.path.abspath(__file__))
# the study's data: rendered rooms at 144 x 192 (docs/study.md: the size and the wall time); its
# validation preset holds the last 160 of the 800 training scenes out, never the test scenes
DATASET, VALIDATION = 'rooms144', 'rooms144-val'
MM_X = 'depth'  # MaskMentor's X: MultiMAE's depth (rooms' filled depth), whatever the default
# MaskMentor: a decoder and a ConvNeXt head as wide as the encoder
MM = 'decoder_dim=64,decoder_heads=4,decoder_depth=1,head_dim=64,head_depth=2'
# MaskMentor pre-training in the paper's shape (Sec. 3.4, 4.1): complete-modality MIM warm-up for the first
# 20% of the steps (the default `warmup`), then cycles of 3 teacher + 1 student iterations on one batch;
# its lr and number of steps: chosen on validation scenes by its losses against trivial baselines
# (study.pretraining; study.run's `pretraining_choice` reads its choice)
MM_PRE = MM + ',stage=pretrain'


def check_outputs(out, report):
    """--out (the run folders) and --report: not in a dataset nor in a run's folder
    (data.check_output); a refusal ends the command with one line."""
    try:
        for flag, path in (('--out', out), ('--report', report)):
            if os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(f"{flag} {path} is a file: give a folder")
            data.check_output(flag, path, folder=True)
    except ValueError as e:
        sys.exit(f"error: {e}")
