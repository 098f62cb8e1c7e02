"""Run presets of the tests: overrides of the default config (conf/), each named for what it is
for, smallest first. Tests add their own overrides on top. The one place a test run's size is
written; a preset's values are what the tests that use it were measured with, so change one only
with those tests."""
from __future__ import annotations

CPU = ["logger=none", "device=cpu"]

# The callbacks beyond the basic three (attention, copying, held-out loss), switched off.
EXTRA_CALLBACKS_OFF = [f"callbacks.{c}=null" for c in ("circuits", "robustness", "induction", "ablation")]

# 6 steps of 4096 tokens, checkpoints at a few of them (about 1 s): checkpoint damage, reading a
# run, the saved-config fixtures (tests/saved_configs/ were made with these, on any device).
SIX_STEPS_ANY_DEVICE = ["logger=none", "model.d_model=32", "train.total_tokens=24576", "checkpoint.n_log=2",
                        "checkpoint.n_linear=2", "probes.n_heldout=16"]
SIX_STEPS = [*SIX_STEPS_ANY_DEVICE, "device=cpu"]

# 12000 tokens of the smoke preset with batches of 16 (a sweep's jobs).
SWEEP_JOB = ["experiment=smoke", "device=cpu", "train.total_tokens=12000", "train.batch_size=16",
             "checkpoint.n_log=2", "checkpoint.n_linear=1", "probes.n_heldout=8", "callbacks.ablation=null"]

# A 1-layer model of width 8 at context 128, 60 steps of 1024 tokens with 50-odd checkpoints and
# the basic callbacks: faults, disks, directories (a few seconds).
FAULTS = [*CPU, "model.d_model=8", "model.n_heads=1", "model.d_head=8", "model.n_layers=1",
          "data.vocab_size=40", "data.n_ctx=128", "train.batch_size=8", "train.total_tokens=61440",
          "checkpoint.n_log=30", "checkpoint.n_linear=30", "checkpoint.first_tokens=1024", "probes.n_heldout=16",
          "callbacks.attention.n_heldout=16", "~callbacks.circuits", "~callbacks.robustness", "~callbacks.induction",
          "~callbacks.ablation"]

# The smoke preset (49 steps, 13 checkpoints, every default callback).
SMOKE = ["experiment=smoke", *CPU]

# 29 steps with every default callback at 7 checkpoints: series of exports.
SERIES_RUN = [*CPU, "train.total_tokens=120000", "checkpoint.n_log=5", "checkpoint.n_linear=3", "probes.n_heldout=64"]

# 73 steps of a 32-wide model, 15 checkpoints: resume, stop signals, requeues.
TINY = [*CPU, "model.d_model=32", "train.total_tokens=300000", "checkpoint.n_log=10", "checkpoint.n_linear=5",
        "probes.n_heldout=32"]

# TINY under adaptive checkpoint density, with a floor low enough for the tiny model's small moves
# to take zoomed, lead-in and tail checkpoints (20 checkpoints): exact resume, and one process
# against two (torchrun), both against one run (tests/conftest.py adaptive_run).
ADAPTIVE_TINY = [*TINY, "checkpoint=adaptive", "checkpoint.adaptive.min_change=0.002"]

# 146 steps of a 32-wide model, 20 checkpoints: one process against two (torchrun).
DISTRIBUTED = [*CPU, "model.d_model=32", "train.total_tokens=600000", "checkpoint.n_log=10", "checkpoint.n_linear=10",
               "probes.n_heldout=32"]

# A short run of the default model that still shows the phase change (about 30 s for 2 layers on
# 2 cores): the real-training tests of the analysis and the classification.
SHORT_RUN = [*CPU, "train.total_tokens=2500000", "checkpoint.n_log=30", "checkpoint.n_linear=20", "probes.n_heldout=128"]

# The smoke preset logging to an offline wandb run (80000 tokens): what the wandb files hold.
WANDB_OFFLINE = ["experiment=smoke", "device=cpu", "logger=wandb", "logger.mode=offline", "train.total_tokens=80000"]

# The smoke preset's size with the definitions preset (the out-of-distribution suite, 8 reserved
# tokens): 13 checkpoints, OOD rows at two of them.
DEFINITIONS_SMOKE = ["experiment=definitions", *CPU, "train.total_tokens=200000", "checkpoint.n_log=10",
                     "checkpoint.n_linear=5", "probes.n_heldout=64"]
