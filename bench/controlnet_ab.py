#!/usr/bin/env python3
"""What a ControlNet costs in diffusiond, measured side by side in one run, and the same
generation with diffusers' torch ControlNet pipeline (the reference; Optimum has no
ControlNet pipeline).

Model: the benchmark-scale `small` pipeline (onnx/build_bench_models.py: SD1.x layout,
50.7M-parameter UNet) rebuilt in torch from its spec, a ControlNet made from its UNet with
`ControlNetModel.from_unet` and seeded random weights (onnx/make_controlnet_references.py's
rule), and both exported with `scripts/export-model SRC OUT --controlnet CN=canny` into
onnx/build/small-controlnet (built once, `--rebuild` to redo). Control image: the edge-like
pattern of the ControlNet goldens at the output size.

Runners, alternated round by round (the order rotates), each a fresh process that loads once,
runs one warm-up generation and N timed ones:

  stock     examples/bench_pipeline on onnx/build/small (Optimum's UNet), no ControlNet
  ready     the same on onnx/build/small-controlnet (UNet with residual inputs, fed zeros)
  control   the same with `--control canny=IMAGE` (the ControlNet every step)
  torch     diffusers' StableDiffusionControlNetPipeline on the torch weights (CPU, float32,
            torch threads = --threads), same prompt, size, steps, guidance and seed
  python-ort  the same Python pipeline loop with its UNet and ControlNet calls running the
            exported graphs in onnxruntime (make_controlnet_references.OnnxBackend: --threads
            intra-op threads, sequential): a Python loop over the same ONNX Runtime kernels
            (the text encoder and VAE stay torch: Optimum has no ControlNet pipeline)

ONNX Runtime: --threads intra-op threads, 1 inter-op, as the config written here says. The
first round's warm-up images of `control` and `torch` are compared (max per-channel level).

    cargo build --release --example bench_pipeline
    /work/venv/ref/bin/python bench/controlnet_ab.py --rounds 3 --repeats 3

Writes bench/results/controlnet-small-<size>-s<steps>.json (every run, medians, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "onnx"))
PY = sys.executable
PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
BUILD = ROOT / "onnx" / "build"
CN_SEED = 7301


def build(rebuild: bool) -> Path:
    """onnx/build/small-controlnet (the export) and onnx/build/small-controlnet-torch (the
    diffusers folders the torch runner loads)."""
    out = BUILD / "small-controlnet"
    torch_dir = BUILD / "small-controlnet-torch"
    if out.is_dir() and torch_dir.is_dir() and not rebuild:
        return out
    import shutil

    import build_fixtures as bf
    import fixture_lib as fl
    import make_controlnet_references as mcr

    for d in (out, torch_dir):
        if d.exists():
            shutil.rmtree(d)
    spec = bf.all_specs()["small"]
    with tempfile.TemporaryDirectory(prefix="cn-bench-") as td:
        tok_cache = Path(td) / "tok"
        stage = torch_dir / "pipeline"
        bf.save_torch_pipeline("small", spec, stage, tok_cache)
        for t in ["tokenizer"]:
            shutil.rmtree(stage / t)
            fl.copy_tree_files(tok_cache / ("pad-eos" if spec["tokenizer_pad"] == fl.EOS else "pad-bang"), stage / t)
        bf.write_scheduler_config(spec, stage)
        mcr.make_controlnet(stage, CN_SEED, torch_dir / "canny")
        env = dict(os.environ, EXPORT_MODEL_PYTHON=PY)
        t0 = time.monotonic()
        subprocess.run(
            [str(ROOT / "scripts" / "export-model"), str(stage), str(out), "--controlnet", f"{torch_dir / 'canny'}=canny"],
            check=True,
            env=env,
        )
        print(f"export-model: {time.monotonic() - t0:.1f} s", flush=True)
    return out


def control_image(size: int, path: Path) -> None:
    import make_controlnet_references as mcr
    from PIL import Image

    Image.fromarray(mcr._edges(size, size)).save(path)


def run_rust(folder: Path, args, control: Path | None, png: Path, config: Path) -> dict:
    cmd = [
        str(ROOT / "target" / "release" / "examples" / "bench_pipeline"), "local", "--config", str(config),
        "--model-dir", str(folder), "--prompt", PROMPT, "--steps", str(args.steps),
        "--width", str(args.size), "--height", str(args.size), "--seed", str(args.seed),
        "--repeats", str(args.repeats), "--png-out", str(png),
    ]
    if control:
        cmd += ["--control", f"canny={control}"]
    r = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    out = json.loads(r.stdout)
    timed = [x for x in out["runs"] if not x["first"]]
    return dict(
        times=[x["generate_s"] for x in timed],
        unet=[x["unet_s"] for x in timed],
        controlnet=[x["controlnet_s"] for x in timed],
        load_s=out["load_s"],
        vm_hwm_mib=(out["vm_hwm_kib"] or 0) / 1024,
    )


def python_runner(args) -> None:
    """The Python side, in its own process (--_torch-runner; --_ort: UNet and ControlNet in
    onnxruntime)."""
    import numpy as np
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    torch.set_num_threads(args.threads)
    torch_dir = BUILD / "small-controlnet-torch"
    cn = ControlNetModel.from_pretrained(str(torch_dir / "canny"), torch_dtype=torch.float32)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(torch_dir / "pipeline"), controlnet=cn, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, torch_dtype=torch.float32,
    )
    if args.ort:
        import make_controlnet_references as mcr

        mcr.OnnxBackend(pipe, [cn], BUILD / "small-controlnet", ["canny"], threads=args.threads)
    image = Image.open(args.control).convert("RGB")
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        out = pipe(
            PROMPT, image=image, num_inference_steps=args.steps, guidance_scale=7.5,
            width=args.size, height=args.size, negative_prompt=None,
            generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np",
        ).images[0]
        dt = time.perf_counter() - t0
        if i == 0:
            Image.fromarray((out * 255).round().astype(np.uint8)).save(args.png)
        else:
            times.append(dt)
    hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    print(json.dumps(dict(times=times, vm_hwm_mib=hwm)))


def run_torch(args, control: Path, png: Path, ort: bool = False) -> dict:
    cmd = [PY, __file__, "--_torch-runner", "--control", str(control), "--png", str(png),
           "--steps", str(args.steps), "--size", str(args.size), "--seed", str(args.seed),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if ort:
        cmd.append("--_ort")
    r = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def max_level_diff(a: Path, b: Path) -> int:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    return int(np.abs(x - y).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--_torch-runner", dest="torch_runner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_ort", dest="ort", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--control", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--png", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_runner:
        python_runner(args)
        return

    folder = build(args.rebuild)
    work = Path(tempfile.mkdtemp(prefix="cn-ab-"))
    control = work / "control.png"
    control_image(args.size, control)
    config = work / "bench.toml"
    config.write_text(f"[runtime.session]\nintra_threads = {args.threads}\ninter_threads = 1\n")
    runners = ["stock", "ready", "control", "torch", "python-ort"]
    results = {r: [] for r in runners}
    pixel = None
    for rnd in range(args.rounds):
        order = runners[rnd % len(runners):] + runners[: rnd % len(runners)]
        for r in order:
            png = work / f"{r}-{rnd}.png"
            if r == "stock":
                res = run_rust(BUILD / "small", args, None, png, config)
            elif r == "ready":
                res = run_rust(folder, args, None, png, config)
            elif r == "control":
                res = run_rust(folder, args, control, png, config)
            elif r == "torch":
                res = run_torch(args, control, png)
            else:
                res = run_torch(args, control, png, ort=True)
            results[r].append(res)
            print(f"round {rnd} {r}: {statistics.median(res['times']):.3f} s", flush=True)
        if rnd == 0:
            pixel = max_level_diff(work / "control-0.png", work / "torch-0.png")
            pixel_ort = max_level_diff(work / "control-0.png", work / "python-ort-0.png")
            plain_same = max_level_diff(work / "stock-0.png", work / "ready-0.png")
    med = {r: statistics.median([t for x in results[r] for t in x["times"]]) for r in runners}
    summary = dict(
        median_s=med,
        control_over_ready=med["control"] / med["ready"],
        ready_over_stock=med["ready"] / med["stock"],
        torch_over_control=med["torch"] / med["control"],
        python_ort_over_control=med["python-ort"] / med["control"],
        controlnet_share=statistics.median(
            [c / t for x in results["control"] for c, t in zip(x["controlnet"], x["times"])]
        ),
        vm_hwm_mib={r: max(x["vm_hwm_mib"] for x in results[r]) for r in runners},
        control_vs_torch_max_level=pixel,
        control_vs_python_ort_max_level=pixel_ort,
        stock_vs_ready_max_level=plain_same,
    )
    out = dict(
        harness="bench/controlnet_ab.py",
        machine=dict(cpus=os.cpu_count(), platform=platform.platform()),
        args=dict(size=args.size, steps=args.steps, seed=args.seed, rounds=args.rounds,
                  repeats=args.repeats, threads=args.threads),
        runs=results,
        summary=summary,
    )
    path = ROOT / "bench" / "results" / f"controlnet-small-{args.size}-s{args.steps}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
