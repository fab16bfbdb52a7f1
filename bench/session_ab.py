#!/usr/bin/env python3
"""Times single ONNX Runtime session runs of one model part, diffusiond's runtime wrapper
against Python's onnxruntime, alternated round by round (see docs/benchmarks.md).

Both sides load the same file with the same session options (CPU EP, intra/inter threads as
given, sequential execution, optimization level ALL, CPU arena and memory pattern on) and
run it on the same inputs, so a gap seen in the pipeline benchmark can be placed inside
ONNX Runtime (it shows here too) or in the code around it (it does not).

    cargo build --release --example session_bench
    /work/venv/ref/bin/python bench/session_ab.py --model-dir onnx/build/small \\
        --parts unet,vae_decoder --size 256 --rounds 4 --repeats 3 --name session-small

Runners per round, in rotating order: `rust` (Session::run, inputs by reference, outputs
allocated by ORT), `rust-bound` (IoBinding, as the pipeline's UNet), `python`
(InferenceSession.run with numpy inputs, as Optimum on CPU). Each is a fresh process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "target" / "release" / "examples" / "session_bench"

PY_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
model, inputs, repeats, intra, inter = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
so = ort.SessionOptions()
so.intra_op_num_threads = intra
so.inter_op_num_threads = inter
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.enable_cpu_mem_arena = True
so.enable_mem_pattern = True
t = time.perf_counter()
s = ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t
feed = {i.name: np.load(f"{inputs}/{i.name}.npy") for i in s.get_inputs()}
times = []
for _ in range(repeats + 1):
    t = time.perf_counter()
    s.run(None, feed)
    times.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"ort_version": ort.__version__, "load_s": load_s, "first_ms": times[0], "run_ms": times[1:]}))
"""


def make_inputs(model: Path, out: Path, size: int, batch: int) -> None:
    """Writes seeded random inputs for the part's graph inputs (SD shapes at `size`)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    lat = size // 8
    for i in sess.get_inputs():
        if i.name == "input_ids":
            a = rng.integers(0, 49407, size=(batch, 77), dtype=np.int64)
        elif i.name == "timestep":
            a = np.array(500.0, dtype=np.float32).reshape([1] * len(i.shape))
        elif i.name == "encoder_hidden_states":
            a = rng.standard_normal((batch, 77, i.shape[2]), dtype=np.float32)
        elif i.name in ("sample", "latent_sample"):
            a = rng.standard_normal((batch, 4, lat, lat), dtype=np.float32)
        else:
            raise SystemExit(f"{model}: no input recipe for {i.name}")
        np.save(out / f"{i.name}.npy", a)


def command(runner: str, model: Path, inputs: Path, args) -> list[str]:
    common = [str(args.repeats), str(args.intra), str(args.inter)]
    if runner == "python":
        cmd = [sys.executable, "-c", PY_CHILD, str(model), str(inputs), *common]
    else:
        cmd = [str(BIN), "--model", str(model), "--inputs", str(inputs),
               "--repeats", common[0], "--intra", common[1], "--inter", common[2]]
        if runner == "rust-bound":
            cmd.append("--io-binding")
    return cmd


def run_one(runner: str, model: Path, inputs: Path, args) -> dict:
    res = subprocess.run(command(runner, model, inputs, args), capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{runner} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_pair(runners: list[str], rnd: int, model: Path, inputs: Path, args) -> dict:
    """Both runners at once, each pinned to its own core (`taskset`), cores swapped every
    round: a machine whose speed drifts slows both alike, so their ratio stays sharp."""
    procs = {}
    for core, r in enumerate(runners):
        cpu = (core + rnd) % 2
        procs[r] = subprocess.Popen(["taskset", "-c", str(cpu), *command(r, model, inputs, args)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for r, p in procs.items():
        so, se = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{r} failed: {se[-2000:]}")
        out[r] = json.loads(so.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--parts", default="unet,vae_decoder")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=2, help="rows (2 = one image with CFG for the UNet)")
    ap.add_argument("--runners", default="rust,rust-bound,python")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--intra", type=int, default=1)
    ap.add_argument("--inter", type=int, default=1)
    ap.add_argument("--concurrent", action="store_true",
                    help="run two runners at the same time, one per core, swapping cores each round")
    ap.add_argument("--name", default=None, help="write bench/results/NAME.json")
    args = ap.parse_args()
    if not BIN.exists():
        raise SystemExit(f"{BIN} missing: cargo build --release --example session_bench")
    runners = args.runners.split(",")
    if args.concurrent and len(runners) != 2:
        raise SystemExit("--concurrent takes exactly two runners")
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            model = args.model_dir / part / "model.onnx"
            inputs = Path(tmp) / part
            inputs.mkdir()
            batch = 1 if part == "vae_decoder" and args.batch == 2 else args.batch
            make_inputs(model, inputs, args.size, batch)
            runs: dict = {r: [] for r in runners}
            for rnd in range(args.rounds):
                if args.concurrent:
                    for r, res in run_pair(runners, rnd, model, inputs, args).items():
                        runs[r].append(res)
                    print(f"[{part} round {rnd}] pair done", file=sys.stderr)
                    continue
                order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
                for r in order:
                    t = time.perf_counter()
                    runs[r].append(run_one(r, model, inputs, args))
                    print(f"[{part} round {rnd}] {r}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
            results["parts"][part] = runs
            report(part, runs)
    if args.name:
        out = REPO / "bench" / "results" / f"{args.name}.json"
        out.write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")


def report(part: str, runs: dict) -> None:
    base = None
    for r, rs in runs.items():
        ms = [t for x in rs for t in x["run_ms"]]
        med = statistics.median(ms)
        base = base if base is not None else med
        print(f"{part:12} {r:11} median {med:9.2f} ms  min {min(ms):9.2f}  max {max(ms):9.2f}  "
              f"n {len(ms):3}  vs first runner {med / base:.3f}  load {statistics.median(x['load_s'] for x in rs):.2f}s")
        per_process = sorted(statistics.median(x["run_ms"]) for x in rs)
        print(f"{'':12} {'':11} per-process medians: {' '.join(f'{m:.2f}' for m in per_process)}")


if __name__ == "__main__":
    main()
