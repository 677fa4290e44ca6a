"""``nnUNetv2_train`` for the tests' toy models: nnU-Net's own command (its entry point, its
default trainer, its checkpoints), with the default trainer's epoch cut to a few iterations so
that a real trained-model folder is made in seconds on a CPU.

    python tests/nnunet_train.py DATASET CONFIGURATION:FOLD [CONFIGURATION:FOLD ...]

runs ``nnUNetv2_train DATASET CONFIGURATION FOLD -device cpu`` for each, in one process (each
start of Python with torch and nnU-Net costs seconds here).

The trainer keeps its name (``nnUNetTrainer``), so the folder loads anywhere nnU-Net runs. A
trainer class of our own, found through ``nnUNet_extTrainer``, would not: nnU-Net looks for a
trainer by importing its own trainer modules first, and one of them (Primus) imports timm and
torchvision, which does not load beside a CPU build of torch from PyPI's torchvision wheel.
"""

import functools
import sys

from nnunetv2.run.run_training import run_training_entry
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

ITERATIONS = 3  # per epoch; nnU-Net's default is 250 (and 50 for validation), over 1000 epochs

_init = nnUNetTrainer.__init__


@functools.wraps(_init)  # nnU-Net reads the names of __init__'s arguments
def _short(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, ITERATIONS, 1


nnUNetTrainer.__init__ = _short
# the final validation predicts the held-out cases through a pool of fresh processes (half a
# minute here); the tests compare predictions themselves
nnUNetTrainer.perform_actual_validation = lambda self, save_probabilities=False: None

if __name__ == "__main__":
    dataset, runs = sys.argv[1], sys.argv[2:]
    for run in runs:
        configuration, fold = run.split(":")
        sys.argv = ["nnUNetv2_train", dataset, configuration, fold, "-device", "cpu"]
        run_training_entry()
