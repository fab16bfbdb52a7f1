"""Process environment for the reference generators: import this module first.

`import _env` (or `from _env import HERE, REPO`) must come before numpy, torch,
onnxruntime, transformers or diffusers are imported: the thread pools and the Hugging
Face libraries read these variables once, when they are loaded, so setting them later
has no effect. Each is set with os.environ.setdefault, so a value the caller exported
wins (e.g. OMP_NUM_THREADS=8 for a faster, not necessarily byte-identical, run).

- OMP_NUM_THREADS=1, MKL_NUM_THREADS=1: one OpenMP / MKL thread for numpy and torch.
  Multi-threaded reductions may sum in a different order from run to run and machine to
  machine; single-threaded CPU runs are what make the goldens byte-reproducible.
- TOKENIZERS_PARALLELISM=false: the Rust tokenizers library runs without its thread
  pool (and without the warning it prints when a process forks after using it).
- HF_HUB_OFFLINE=1: huggingface_hub never goes to the network; every model, tokenizer
  and config comes from the local folders in this repository (or fails).
- CUDA_VISIBLE_DEVICES="": torch and onnxruntime see no GPU, so every reference is
  computed on the CPU even on a machine that has one.

HERE is this folder (onnx/), REPO the repository root. Scripts run as
`python onnx/NAME.py` have onnx/ on sys.path already, so `import _env` finds this file.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
