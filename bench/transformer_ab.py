#!/usr/bin/env python3
"""A/B benchmark of diffusiond's flow-matching transformer pipeline (SD3, FLUX) against
Optimum's ORTStableDiffusion3Pipeline / ORTFluxPipeline on the same ONNX folder.

For each model, each round runs both runners one after the other (order alternating from
round to round), each in a fresh process: diffusiond's `examples/bench_flow.rs` and this
file's Python runner (`--_python-runner`). Each process loads the folder once, runs one
warm-up generation (its image is written as PNG) and N timed generations. Both sides: the
same prompt, size, steps, guidance, seed and T5 sequence length, CPUExecutionProvider,
1 intra-op and 1 inter-op thread, sequential execution, graph optimization ALL, Optimum
without IO binding. The first round's warm-up images of both runners are compared pixel by
pixel (maximum per-channel difference).

    /work/venv/ref/bin/python bench/transformer_ab.py --rounds 3 --repeats 2
    /work/venv/ref/bin/python bench/transformer_ab.py --models small-flux --rounds 1

Writes bench/results/transformer-<model>-<size>-s<steps>.json: every run of every round,
the medians over all timed runs, the ratio Optimum ÷ diffusiond (> 1: diffusiond faster),
the per-round ratios and the pixel difference. The diffusiond binary is built with
`CARGO_TARGET_DIR=/tmp/target-rel cargo build --release --example bench_flow`.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from py_runner import session_options, vm_hwm_kib  # noqa: E402  (bench/ is on sys.path: this script's folder)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 42

# model folder (under onnx/build), Optimum class, guidance, T5 tokens (the pipelines' defaults)
MODELS = {
    "small-sd3": dict(cls="ORTStableDiffusion3Pipeline", guidance=7.0, max_sequence_length=256),
    "small-flux": dict(cls="ORTFluxPipeline", guidance=0.0, max_sequence_length=512),
}


def python_runner(args) -> None:
    """Optimum's pipeline in this process: load, warm-up (PNG written), N timed runs; one JSON line."""
    import onnxruntime as ort
    import optimum.onnxruntime as ortm
    import torch

    t_import = time.perf_counter() - T_START
    so = session_options(args.intra, args.inter)
    t0 = time.perf_counter()
    pipe = getattr(ortm, args.cls).from_pretrained(
        str(args.model_dir),
        provider="CPUExecutionProvider",
        session_options=so,
        use_io_binding=False,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    kw = dict(prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
              width=args.size, height=args.size, max_sequence_length=args.max_sequence_length)
    runs, first_s = [], None
    for i in range(args.repeats + 1):
        t = time.perf_counter()
        img = pipe(**kw, generator=torch.Generator("cpu").manual_seed(args.seed)).images[0]
        s = time.perf_counter() - t
        if i == 0:
            first_s = s
            if args.png_out:
                img.save(args.png_out)
        else:
            runs.append(s)
    print(json.dumps(dict(
        runner="optimum", cls=args.cls, ort_version=ort.__version__, intra_threads=args.intra,
        inter_threads=args.inter, size=args.size, steps=args.steps, guidance=args.guidance, seed=args.seed,
        max_sequence_length=args.max_sequence_length, import_s=t_import, load_s=load_s, first_s=first_s,
        runs_s=runs, median_s=statistics.median(runs) if runs else None, vm_hwm_kib=vm_hwm_kib(),
    )))


def run_child(cmd: list) -> tuple[float, dict]:
    t0 = time.monotonic()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, RUST_LOG="warn"))
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    line = next(x for x in reversed(p.stdout.strip().splitlines()) if x.startswith("{"))
    return wall, json.loads(line)


def pixel_diff(a: Path, b: Path) -> int:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        return 10**6
    return int(np.abs(x - y).max())


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    vers = {}
    for pkg in ("onnxruntime", "torch", "diffusers", "transformers", "optimum-onnx", "numpy"):
        try:
            import importlib.metadata as m

            vers[pkg] = m.version(pkg)
        except Exception as e:  # noqa: BLE001
            vers[pkg] = str(e)
    vers["python"] = platform.python_version()
    vers["rustc"] = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    vers["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip()
    return dict(nproc=os.cpu_count(), cpu=cpu, kernel=platform.release(),
                mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                loadavg_start=os.getloadavg(), versions=vers)


def bench_model(args, name: str, tmp: Path) -> Path:
    spec = MODELS[name]
    model_dir = (ROOT / "onnx/build" / name).resolve()
    common = ["--size", args.size, "--steps", args.steps, "--guidance", spec["guidance"], "--seed", SEED,
              "--max-sequence-length", spec["max_sequence_length"], "--repeats", args.repeats,
              "--intra", args.intra, "--inter", args.inter]
    rounds, parity = [], None
    for rnd in range(args.rounds):
        order = ["diffusiond", "optimum"] if rnd % 2 == 0 else ["optimum", "diffusiond"]
        res = {"order": order, "loadavg_before": os.getloadavg()}
        for runner in order:
            png = tmp / f"{name}-{runner}-{rnd}.png"
            if runner == "diffusiond":
                cmd = [args.bin, "--model-dir", model_dir, "--prompt", PROMPT, *common, "--png-out", png]
            else:
                cmd = [PY, __file__, "--_python-runner", "--cls", spec["cls"], "--model-dir", model_dir,
                       "--prompt", PROMPT, *common, "--png-out", png]
            wall, out = run_child(cmd)
            out["process_wall_s"] = wall
            res[runner] = out
            print(f"{name} round {rnd} {runner}: median {out['median_s']:.3f} s, runs "
                  + ", ".join(f"{x:.3f}" for x in out["runs_s"]) + f" (load {out['load_s']:.2f} s)", flush=True)
        res["ratio"] = res["optimum"]["median_s"] / res["diffusiond"]["median_s"]
        if parity is None:
            parity = pixel_diff(tmp / f"{name}-diffusiond-{rnd}.png", tmp / f"{name}-optimum-{rnd}.png")
            print(f"{name}: max pixel difference {parity}", flush=True)
        rounds.append(res)

    def pooled(runner: str, key: str = "runs_s") -> list[float]:
        return [x for r in rounds for x in r[runner][key]]

    med_d = statistics.median(pooled("diffusiond"))
    med_p = statistics.median(pooled("optimum"))
    summary = dict(
        diffusiond=dict(median_s=med_d, min_s=min(pooled("diffusiond")), max_s=max(pooled("diffusiond")),
                        n=len(pooled("diffusiond")),
                        load_s_median=statistics.median(r["diffusiond"]["load_s"] for r in rounds),
                        vm_hwm_mib=max(r["diffusiond"]["vm_hwm_kib"] for r in rounds) / 1024),
        optimum=dict(median_s=med_p, min_s=min(pooled("optimum")), max_s=max(pooled("optimum")),
                     n=len(pooled("optimum")),
                     load_s_median=statistics.median(r["optimum"]["load_s"] for r in rounds),
                     vm_hwm_mib=max(r["optimum"]["vm_hwm_kib"] for r in rounds) / 1024),
        ratio_optimum_over_diffusiond=med_p / med_d,
        round_ratios=[r["ratio"] for r in rounds],
        max_pixel_diff=parity,
    )
    out = dict(
        model=name, model_dir=str(model_dir.relative_to(ROOT)), optimum_class=spec["cls"], prompt=PROMPT,
        seed=SEED, size=args.size, steps=args.steps, guidance=spec["guidance"],
        max_sequence_length=spec["max_sequence_length"], intra=args.intra, inter=args.inter,
        rounds_n=args.rounds, repeats=args.repeats, note=args.note, machine=machine(),
        loadavg_end=os.getloadavg(), summary=summary, rounds=rounds,
    )
    path = ROOT / "bench/results" / f"transformer-{name}-{args.size}-s{args.steps}{args.suffix}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{name}: Optimum {med_p:.3f} s, diffusiond {med_d:.3f} s, Optimum / diffusiond {med_p / med_d:.3f}; "
          f"wrote {path.relative_to(ROOT)}", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list from {list(MODELS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="timed generations per process, after a warm-up")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--intra", type=int, default=1)
    ap.add_argument("--inter", type=int, default=1)
    ap.add_argument("--bin", type=Path, default=Path("/tmp/target-rel/release/examples/bench_flow"))
    ap.add_argument("--suffix", default="", help="appended to the result file's name")
    ap.add_argument("--note", default="", help="recorded in the result file (e.g. machine load)")
    # the Python runner (a child process of the above)
    ap.add_argument("--_python-runner", dest="python_runner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cls", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--prompt", default=PROMPT, help=argparse.SUPPRESS)
    ap.add_argument("--guidance", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    ap.add_argument("--max-sequence-length", dest="max_sequence_length", type=int, default=256,
                    help=argparse.SUPPRESS)
    ap.add_argument("--png-out", dest="png_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.python_runner:
        python_runner(args)
        return
    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}")
    with tempfile.TemporaryDirectory(prefix="transformer-ab-") as td:
        for n in names:
            bench_model(args, n, Path(td))


if __name__ == "__main__":
    main()
