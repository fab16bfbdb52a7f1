#!/usr/bin/env python3
"""Write golden Gaussian-noise vectors for `src/rng.rs` to `tests/golden/rng/`.

Run with the reference interpreter (torch + numpy):

    /work/venv/ref/bin/python onnx/golden_rng.py

Each case is a sequence of `randn` calls on ONE generator, so multi-call cases
check that the stream (MT19937 position and any cached Box-Muller / polar
second value) continues across calls, as in diffusers where the initial latents
and the per-step noise come from the same generator.

* torch: `g = torch.Generator("cpu").manual_seed(seed)`, then
  `torch.randn(shape, generator=g, dtype=torch.float32)` per call.
* numpy: `rs = np.random.RandomState(seed)`, then `rs.randn(*shape)` per call,
  stored as float64 (what numpy returns) and float32 (`.astype(np.float32)`).

torch has two float32 Box-Muller kernels for `randn` with >= 16 elements
(`NormalFill16` in aten/src/ATen/native/cpu/DistributionTemplates.h): the
`CPU_CAPABILITY_AVX2` one (Cephes `log256_ps`/`sincos256_ps` from
avx_mathfun.h) and the scalar one (libm `logf`/`cosf`/`sinf`). They differ by
up to ~1.8e-6, so both are recorded, each forced through ATEN_CPU_CAPABILITY
in a subprocess (kernel "x86_avx2" <- avx2, "scalar" <- default). The
manifest also records which set torch's own choice on this machine matched
(on an AVX512 CPU it is the AVX2 kernel).

Every case's calls are concatenated, flattened, into one .npy; the manifest
lists the shapes. The output is deterministic: fixed seeds, sorted JSON, no
timestamps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "tests" / "golden" / "rng"

# Shapes: fewer than 16 elements (scalar normal_distribution<double> path),
# exactly 16, around 16/32 (tail block recomputed), and latent shapes.
SHAPES: list[tuple[int, ...]] = [
    (1,),
    (3,),
    (15,),
    (16,),
    (17,),
    (31,),
    (33,),
    (1, 4, 8, 8),
    (2, 4, 8, 12),
    (1, 4, 64, 64),
]

TORCH_SEEDS = [0, 1, 42, 1234, 2**32 + 5, 2**63 - 1]
NUMPY_SEEDS = [0, 42, 2**32 - 1]

# Multi-call sequences on a single generator.
SEQUENCES: dict[str, list[tuple[int, ...]]] = {
    "latent_then_step": [(1, 4, 8, 8), (1, 4, 8, 8)],
    "small_small": [(3,), (3,)],
    "small_big_small": [(3,), (17,), (1,), (2, 4, 8, 12), (5,)],
    "odd_tails": [(17,), (33,), (1, 4, 8, 8), (15,)],
}
SEQ_SEEDS = [0, 42, 2**32 + 5]
# Smaller set for torch's scalar (DEFAULT capability) kernel.
SCALAR_SEEDS = [0, 42, 2**32 + 5]

# Torch Box-Muller kernel set -> ATEN_CPU_CAPABILITY that forces it.
KERNELS = {"x86_avx2": "avx2", "scalar": "default"}


def shape_tag(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def case_plan(kernel: str) -> list[tuple[str, int, list[tuple[int, ...]]]]:
    """(name, seed, shapes) for each torch case of one kernel set."""
    plan = []
    full = kernel == "x86_avx2"
    for seed in TORCH_SEEDS if full else SCALAR_SEEDS:
        for shape in SHAPES:
            if not full and shape == (1, 4, 64, 64) and seed != SCALAR_SEEDS[0]:
                continue
            plan.append((f"single_{shape_tag(shape)}", seed, [shape]))
    for name, shapes in SEQUENCES.items():
        for seed in SEQ_SEEDS if full else SCALAR_SEEDS[:2]:
            plan.append((f"seq_{name}", seed, shapes))
    return plan


def torch_worker(kernel: str, write: bool) -> None:
    """Draw the torch cases for `kernel` in this process; print them as JSON on stdout."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    cases = []
    for name, seed, shapes in case_plan(kernel):
        g = torch.Generator("cpu").manual_seed(seed)
        parts = [torch.randn(shape, generator=g, dtype=torch.float32).numpy().ravel() for shape in shapes]
        arr = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        case = {
            "kernel": kernel,
            "name": name,
            "seed": seed,
            "shapes": [list(s) for s in shapes],
            "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
        }
        if write:
            case["f32"] = f"torch_{kernel}_{name}_s{seed}.npy"
            np.save(OUT / case["f32"], arr)
        cases.append(case)
    json.dump({"capability": torch.backends.cpu.get_cpu_capability(), "cases": cases}, sys.stdout)


def run_worker(kernel: str, capability: str | None, write: bool) -> dict:
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    cmd = [sys.executable, str(Path(__file__).resolve()), "--torch-worker", kernel]
    if not write:
        cmd.append("--no-write")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def numpy_cases() -> list[dict]:
    import numpy as np

    cases = []
    plan = [(f"single_{shape_tag(s)}", seed, [s]) for seed in NUMPY_SEEDS for s in SHAPES]
    plan += [(f"seq_{n}", seed, shapes) for n, shapes in SEQUENCES.items() for seed in NUMPY_SEEDS]
    for name, seed, shapes in plan:
        rs = np.random.RandomState(seed)
        parts = [np.asarray(rs.randn(*shape)).ravel() for shape in shapes]
        a64 = np.ascontiguousarray(np.concatenate(parts))
        assert a64.dtype == np.float64
        a32 = a64.astype(np.float32)
        base = f"numpy_{name}_s{seed}"
        np.save(OUT / f"{base}_f64.npy", a64)
        np.save(OUT / f"{base}_f32.npy", a32)
        cases.append(
            {
                "name": name,
                "seed": seed,
                "shapes": [list(s) for s in shapes],
                "f32": f"{base}_f32.npy",
                "f64": f"{base}_f64.npy",
            }
        )
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-worker", choices=sorted(KERNELS), help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        torch_worker(args.torch_worker, write=not args.no_write)
        return 0

    import numpy as np
    import torch

    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.npy"):
        old.unlink()

    torch_cases = []
    for kernel, capability in KERNELS.items():
        res = run_worker(kernel, capability, write=True)
        if res["capability"] != capability.upper():
            raise SystemExit(f"asked torch for {capability}, got {res['capability']} (CPU without AVX2?)")
        torch_cases += res["cases"]
    # Which kernel does torch pick here when left alone?
    native = {}
    for kernel in KERNELS:
        res = run_worker(kernel, None, write=False)
        ref = {(c["name"], c["seed"]): c["sha256"] for c in torch_cases if c["kernel"] == kernel}
        native[kernel] = all(ref[(c["name"], c["seed"])] == c["sha256"] for c in res["cases"])
    native_capability = res["capability"]
    for c in torch_cases:
        del c["sha256"]

    manifest = {
        "generator": "onnx/golden_rng.py",
        "torch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "kernel_capability": KERNELS,
        "native_cpu_capability": native_capability,
        "native_matches_kernel": native,
        "torch": torch_cases,
        "numpy": numpy_cases(),
    }
    text = json.dumps(manifest, indent=1, sort_keys=True)
    # Keep each shape on one line.
    text = re.sub(r"\[\s*([0-9,\s]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    (OUT / "manifest.json").write_text(text + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    n = len(list(OUT.glob("*.npy")))
    print(f"wrote {n} .npy files + manifest.json to {OUT} ({total} bytes)")
    print(f"native capability {native_capability}; native output equals kernel set: {native}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
