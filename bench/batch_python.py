#!/usr/bin/env python3
"""A manifest of prompts through Optimum's ORTDiffusionPipeline: the Python loop a user would
write instead of `diffusionctl batch`, reading the same manifest and writing the same files.

    /work/venv/ref/bin/python bench/batch_python.py MANIFEST --output-dir DIR --model-dir MODEL \
        [--steps N] [--guidance G] [--width W] [--height H] [--seed BASE] [--shard I/N] ...

MANIFEST is `.jsonl` (one JSON object per line: prompt, negative_prompt, width, height, steps,
guidance_scale, guidance_rescale, seed, rng, scheduler, num_images, model, and an optional
name) or `.txt` (one prompt per line). Blank lines are skipped but keep their place in the
line count. Item i (the zero-based line index) is written to DIR/NAME.png, NAME being its
`name` or i zero-padded to 5 digits (`00017`); DIR/NAME-K.png for each image K when it asks
for more than one. Keys a line leaves out take the flags' values; a line without a seed
gets BASE + i (BASE: --seed, else drawn at random and reported). `model` is ignored: one
pipeline (--model-dir) serves every line.

Seeds: generator=torch.Generator("cpu").manual_seed(seed) for each item, so the initial
latents are torch.randn(shape, generator) * init_noise_sigma, as diffusiond's `torch` rng.
rng "numpy": initial latents from np.random.RandomState(seed).randn(shape) (cast to float32)
and step noise from the torch generator, as diffusiond's `numpy` rng.

ONNX Runtime session options: none are set unless --intra/--inter are given, so every
session gets ONNX Runtime's defaults (intra-op threads: one per physical core; inter-op:
ONNX Runtime's choice; sequential execution; graph optimization ALL; CPU arena on), the
same thread counts and arena setting diffusiond uses when its config sets no
`[runtime.session]` (diffusiond also shrinks the arena after each batch; docs/memory.md).
bench/py_runner.py, by contrast, pins intra = inter = 1 for the stage-by-stage comparison.

Prints one JSON line at the end:
  {"images": N, "load_s": ..., "generate_s": ..., "images_per_s": N / generate_s, "total_s": ...}
load_s is building the pipeline (sessions, tokenizer, scheduler), generate_s every item's
pipeline call plus its PNG writes, total_s from interpreter start to the end (imports
included). Progress goes to stderr.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# diffusionctl's scheduler names -> diffusers classes, shared with the reference scripts
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "onnx"))
from scheduler_names import SCHEDULERS  # noqa: E402

KEYS = {"prompt", "negative_prompt", "model", "width", "height", "steps", "guidance_scale",
        "guidance_rescale", "seed", "rng", "scheduler", "num_images", "name"}


def read_manifest(path: Path, defaults: dict, base_seed: int) -> list[dict]:
    """Every item of the manifest, defaults filled in, in line order."""
    text = path.read_text(encoding="utf-8")
    jsonl = path.suffix.lower() != ".txt"
    items, errors, names = [], [], set()
    for index, line in enumerate(text.splitlines()):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}:{index + 1}"
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: not valid JSON: {e}")
                continue
            if not isinstance(obj, dict):
                errors.append(f"{where}: not a JSON object")
                continue
            unknown = sorted(set(obj) - KEYS)
            if unknown:
                errors.append(f"{where}: unknown keys {unknown}")
            if "prompt" not in obj:
                errors.append(f"{where}: prompt is required")
                continue
        else:
            obj = {"prompt": line}
        item = {k: v for k, v in defaults.items() if v is not None}
        item.update({k: v for k, v in obj.items() if v is not None})
        item.setdefault("seed", base_seed + index)
        item["index"] = index
        item.setdefault("name", f"{index:05d}")
        if item.get("scheduler") is not None and item["scheduler"] not in SCHEDULERS:
            errors.append(f"{where}: unknown scheduler {item['scheduler']!r}")
        if item.get("rng", "torch") not in ("torch", "numpy"):
            errors.append(f"{where}: rng must be torch or numpy")
        for f in files_of(item):
            if f in names:
                errors.append(f"{where}: output file {f} is also another item's")
            names.add(f)
        items.append(item)
    if errors:
        raise SystemExit("\n".join(errors))
    if not items:
        raise SystemExit(f"{path}: no items")
    return items


def files_of(item: dict) -> list[str]:
    n = int(item.get("num_images", 1))
    return [f"{item['name']}.png"] if n == 1 else [f"{item['name']}-{k}.png" for k in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--output-dir", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--guidance-rescale", type=float, default=None)
    ap.add_argument("--width", type=int, default=None, help="default: the model's native size")
    ap.add_argument("--height", type=int, default=None, help="default: the model's native size")
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="default: the model's own")
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--rng", default="torch", choices=["torch", "numpy"])
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: random, reported)")
    ap.add_argument("--shard", default="0/1", help="I/N: only the items whose line index modulo N is I")
    ap.add_argument("--intra", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    ap.add_argument("--inter", type=int, default=0, help="inter-op threads (0: ONNX Runtime's default)")
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--quiet", action="store_true", help="no per-item line on stderr")
    args = ap.parse_args()

    try:
        shard_i, shard_n = (int(x) for x in args.shard.split("/"))
        assert 0 <= shard_i < shard_n
    except (ValueError, AssertionError):
        ap.error("--shard takes I/N with 0 <= I < N")
    base_seed = args.seed if args.seed is not None else secrets.randbits(63)
    defaults = dict(negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                    steps=args.steps, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
                    rng=args.rng, scheduler=args.scheduler, num_images=args.num_images)
    items = [it for it in read_manifest(args.manifest, defaults, base_seed) if it["index"] % shard_n == shard_i]
    if any("model" in it for it in items):
        print("batch_python: `model` keys are ignored; every item uses --model-dir", file=sys.stderr)

    import numpy as np
    import onnxruntime as ort
    import torch
    import diffusers
    from optimum.onnxruntime import ORTDiffusionPipeline

    import_s = time.perf_counter() - T_START
    so = None
    if args.intra or args.inter:
        so = ort.SessionOptions()
        if args.intra:
            so.intra_op_num_threads = args.intra
        if args.inter:
            so.inter_op_num_threads = args.inter
    t0 = time.perf_counter()
    pipe = ORTDiffusionPipeline.from_pretrained(
        str(args.model_dir), providers=[args.provider], session_options=so,
        use_io_binding=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0

    native = pipe.unet.config["sample_size"] * pipe.vae_scale_factor
    model_scheduler = pipe.scheduler
    base_config = dict(pipe.scheduler.config)
    schedulers: dict[str, object] = {}
    args.output_dir.mkdir(parents=True, exist_ok=True)

    images = 0
    t_gen = time.perf_counter()
    for n, it in enumerate(items):
        name = it.get("scheduler")
        if name is None:
            pipe.scheduler = model_scheduler
        else:
            if name not in schedulers:
                cls, extra = SCHEDULERS[name]
                schedulers[name] = getattr(diffusers, cls).from_config(base_config, **extra)
            pipe.scheduler = schedulers[name]
        width = int(it.get("width") or native)
        height = int(it.get("height") or native)
        k = int(it.get("num_images", 1))
        seed = int(it["seed"])
        kwargs = dict(
            prompt=it["prompt"],
            negative_prompt=it.get("negative_prompt"),
            num_inference_steps=int(it["steps"]),
            guidance_scale=float(it["guidance_scale"]),
            width=width,
            height=height,
            num_images_per_prompt=k,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
        )
        if it.get("guidance_rescale"):
            kwargs["guidance_rescale"] = float(it["guidance_rescale"])
        if it.get("rng", "torch") == "numpy":
            shape = (k, 4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            kwargs["latents"] = torch.from_numpy(np.random.RandomState(seed).randn(*shape).astype(np.float32))
        t = time.perf_counter()
        out = pipe(**kwargs).images
        for img, f in zip(out, files_of(it)):
            img.save(args.output_dir / f, format="PNG")
        images += len(out)
        if not args.quiet:
            print(f"[{n + 1}/{len(items)}] {it['name']} seed {seed}: {time.perf_counter() - t:.3f}s",
                  file=sys.stderr, flush=True)
    generate_s = time.perf_counter() - t_gen

    print(json.dumps(dict(
        images=images,
        items=len(items),
        load_s=load_s,
        generate_s=generate_s,
        images_per_s=images / generate_s if generate_s > 0 else None,
        total_s=time.perf_counter() - T_START,
        import_s=import_s,
        base_seed=base_seed,
        intra_threads=args.intra or None,
        inter_threads=args.inter or None,
        ort_version=ort.__version__,
        providers=pipe.unet.session.get_providers(),
    )), flush=True)


if __name__ == "__main__":
    main()
