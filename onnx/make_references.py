#!/usr/bin/env python3
"""Write the Python reference outputs ("goldens") the Rust parity tests compare against.

Usage (from the repository root):
    onnx/.venv/bin/python onnx/make_references.py                       # pipelines + tokenizer goldens
    onnx/.venv/bin/python onnx/make_references.py --only tokenizer
    onnx/.venv/bin/python onnx/make_references.py --out-root /tmp/check  # write elsewhere

Pipelines: Optimum's ORTDiffusionPipeline on CPUExecutionProvider, one intra-op thread, no IO
binding, fp32. Writes tests/golden/pipelines/{manifest.json,<case>/...}.

RNG rules (also written to the manifest):
  rng "torch": generator=torch.Generator("cpu").manual_seed(seed), no latents. Initial latents are
      torch.randn(shape, generator, dtype=float32) * init_noise_sigma (float32 multiply), shape
      (num_images, 4, height/8, width/8); stochastic schedulers draw their step noise from the
      same generator afterwards.
  rng "numpy": initial latents from np.random.RandomState(seed).randn(*shape) (float64 draw,
      cast to float32), multiplied by init_noise_sigma in float32 as the pipeline does; step noise
      from a torch CPU generator seeded with the same seed (nothing else drawn from it first).

Tokenizer: tests/golden/tokenizer/cases.json, ids from CLIPTokenizerFast and CLIPTokenizer loaded
from onnx/clip-tokenizer, padding="max_length", max_length=77, truncation=True.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from _env import REPO  # first: one CPU thread, offline Hub, no CUDA (see _env.py)

import numpy as np

from fixture_lib import SESSION_OPTIONS, Recorder, load_ort_pipeline, save_images
from scheduler_names import SCHEDULERS

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "Crème brûlée, café & naïve façade — 東京の夜景 🌃!!",
    "  A  red\tcube;   on (a) blue sphere... [highly detailed], 8K, f/1.8 ",
    # > 77 tokens: truncated by the tokenizer
    "an extremely detailed matte painting of a vast ancient city built into the side of a mountain, "
    "waterfalls, bridges, lanterns, flying ships, dramatic clouds, golden hour light, volumetric fog, "
    "birds, tiny people walking on stone stairs, intricate architecture, trending on artstation, "
    "octane render, 4k, ultra wide angle, by a famous artist, masterpiece, best quality, sharp focus",
    "",
]
NEGATIVES = ["blurry, low quality", "ugly, deformed, watermark 👎"]


def case_plan() -> list[dict]:
    """The covering set. Each scheduler gets steps 1/4/13, guidance 1.0/7.5, with and without
    negative prompt, 64x64 and 96x64, rng torch and numpy."""
    cases = []
    seed = 1000

    def add(**kw):
        nonlocal seed
        base = dict(
            model="onnx/tiny-sd15",
            negative_prompt=None,
            guidance_rescale=0.0,
            width=64,
            height=64,
            num_images=1,
            rng="torch",
        )
        base.update(kw)
        if "seed" not in kw:
            seed += 1
            base["seed"] = seed
        cases.append(base)
        return base

    for i, sched in enumerate(SCHEDULERS):
        p = lambda k: PROMPTS[(i + k) % 4]  # noqa: E731  (the empty prompt is used separately)
        a = add(scheduler=sched, prompt=p(0), steps=1, guidance_scale=7.5)
        b = add(scheduler=sched, prompt=p(1), steps=4, guidance_scale=1.0, width=96, height=64)
        c = add(scheduler=sched, prompt=p(2), steps=13, guidance_scale=7.5, negative_prompt=NEGATIVES[i % 2])
        del a
        for twin in (b, c):
            t = dict(twin)
            t["rng"] = "numpy"
            cases.append(t)

    # batch of two images (torch and numpy), an empty prompt, guidance rescale
    add(scheduler="pndm", prompt=PROMPTS[0], steps=4, guidance_scale=7.5, num_images=2,
        negative_prompt=NEGATIVES[0])
    t = add(scheduler="euler-a", prompt=PROMPTS[1], steps=4, guidance_scale=7.5, num_images=2)
    cases.append(dict(t, rng="numpy"))
    add(scheduler="ddim", prompt=PROMPTS[4], steps=4, guidance_scale=7.5)
    add(scheduler="euler", prompt=PROMPTS[0], steps=13, guidance_scale=7.5, guidance_rescale=0.7,
        negative_prompt=NEGATIVES[1])

    # v-prediction (SD2.x style; tokenizer pads with "!")
    v = "onnx/tiny-sd2-v"
    add(model=v, scheduler="ddim", prompt=PROMPTS[0], steps=4, guidance_scale=7.5)
    add(model=v, scheduler="ddim", prompt=PROMPTS[2], steps=13, guidance_scale=7.5, guidance_rescale=0.7,
        negative_prompt=NEGATIVES[0])
    t = add(model=v, scheduler="euler", prompt=PROMPTS[1], steps=4, guidance_scale=1.0, width=96, height=64)
    cases.append(dict(t, rng="numpy"))
    add(model=v, scheduler="euler-a", prompt=PROMPTS[3], steps=4, guidance_scale=7.5)
    add(model=v, scheduler="dpm++2m", prompt=PROMPTS[0], steps=13, guidance_scale=7.5)
    add(model=v, scheduler="unipc", prompt=PROMPTS[1], steps=4, guidance_scale=7.5)
    add(model=v, scheduler="pndm", prompt=PROMPTS[2], steps=4, guidance_scale=7.5)

    # SDXL (default scheduler of the folder is euler)
    x = "onnx/tiny-sdxl"
    t = add(model=x, scheduler="euler", prompt=PROMPTS[0], steps=4, guidance_scale=5.0)
    cases.append(dict(t, rng="numpy"))
    add(model=x, scheduler="euler", prompt=PROMPTS[1], steps=4, guidance_scale=1.0, width=96, height=64)
    add(model=x, scheduler="euler", prompt=PROMPTS[2], steps=13, guidance_scale=5.0,
        negative_prompt=NEGATIVES[1])
    add(model=x, scheduler="euler", prompt=PROMPTS[3], steps=1, guidance_scale=5.0, num_images=2)
    add(model=x, scheduler="ddim", prompt=PROMPTS[0], steps=4, guidance_scale=5.0, negative_prompt=NEGATIVES[0])
    add(model=x, scheduler="dpm++2m-karras", prompt=PROMPTS[1], steps=4, guidance_scale=5.0)

    for c in cases:
        short = c["model"].split("/")[-1].replace("tiny-", "")
        c["id"] = (
            f"{short}-{c['scheduler']}-s{c['steps']}-g{c['guidance_scale']:g}"
            + (f"-r{c['guidance_rescale']:g}" if c["guidance_rescale"] else "")
            + f"-{c['width']}x{c['height']}-n{c['num_images']}-{c['rng']}-{c['seed']}"
        )
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


# ---------------------------------------------------------------------------------------------


def load_pipeline(model_dir: Path):
    from optimum.onnxruntime import ORTDiffusionPipeline

    return load_ort_pipeline(ORTDiffusionPipeline, model_dir)


def run_case(pipe, base_sched_config: dict, case: dict, out_dir: Path) -> dict:
    import diffusers
    import torch

    cls_name, extra = SCHEDULERS[case["scheduler"]]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(base_sched_config, **extra)

    unet_rec = Recorder(pipe.unet.session, keep_outputs=False)
    te_rec = Recorder(pipe.text_encoder.session, keep_outputs=False)
    captured = {}
    orig_prepare = pipe.prepare_latents

    def prepare_latents(*a, **kw):
        lat = orig_prepare(*a, **kw)
        captured["latents"] = lat.detach().clone()
        return lat

    pipe.prepare_latents = prepare_latents
    n = case["num_images"]
    shape = (n, 4, case["height"] // 8, case["width"] // 8)
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    kwargs = dict(
        prompt=case["prompt"],
        negative_prompt=case["negative_prompt"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance_scale"],
        width=case["width"],
        height=case["height"],
        num_images_per_prompt=n,
        generator=gen,
        output_type="np",
    )
    if case["guidance_rescale"]:
        kwargs["guidance_rescale"] = case["guidance_rescale"]
    if case["rng"] == "numpy":
        raw = np.random.RandomState(case["seed"]).randn(*shape).astype(np.float32)
        kwargs["latents"] = torch.from_numpy(raw)
    try:
        images = pipe(**kwargs).images
    finally:
        pipe.prepare_latents = orig_prepare
        pipe.unet.session.run = unet_rec.orig
        pipe.text_encoder.session.run = te_rec.orig

    latents = captured["latents"].numpy().astype(np.float32)
    sigma = pipe.scheduler.init_noise_sigma
    sigma32 = torch.as_tensor(sigma, dtype=torch.float32)
    # Independent check that the recorded latents follow the documented rule.
    if case["rng"] == "torch":
        expect = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(case["seed"]), dtype=torch.float32)
    else:
        expect = torch.from_numpy(np.random.RandomState(case["seed"]).randn(*shape).astype(np.float32))
    expect = (expect * sigma32).numpy()
    assert np.array_equal(expect, latents), f"{case['id']}: latents rule mismatch"
    if not np.isfinite(images).all():
        raise FloatingPointError("non-finite image")

    out_dir.mkdir(parents=True, exist_ok=True)
    rel = out_dir.name
    np.save(out_dir / "latents.npy", latents)
    img_files, png_files = save_images(out_dir, images, pipe.numpy_to_pil(images))

    unet_calls = unet_rec.calls
    ts = [float(c["timestep"]) for c in unet_calls]
    ts_meta = {"dtype": str(unet_calls[0]["timestep"].dtype), "shape": list(unet_calls[0]["timestep"].shape)}
    ids = te_rec.calls[0]["input_ids"]
    rec = dict(case)
    rec.update(
        latents=f"{rel}/latents.npy",
        latents_shape=list(latents.shape),
        images=img_files,
        pngs=png_files,
        image_shape=list(images.shape[1:]),
        init_noise_sigma=float(sigma32),
        unet_timesteps=ts,
        unet_timestep_input=ts_meta,
        unet_calls=len(unet_calls),
        unet_batch=int(unet_calls[0]["sample"].shape[0]),
        pipeline_class=type(pipe).__name__,
        tokenizer_class=type(pipe.tokenizer).__name__,
        scheduler_class=cls_name,
        scheduler_extra=extra,
        scheduler_timesteps=[float(t) for t in pipe.scheduler.timesteps],
        text_encoder_input_ids_dtype=str(ids.dtype),
    )
    return rec


def make_pipeline_goldens(out: Path, repo_root: Path = REPO) -> None:
    import diffusers
    import onnxruntime
    import optimum.onnxruntime  # noqa: F401
    import torch
    import transformers
    from importlib.metadata import version

    torch.set_num_threads(1)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plan = case_plan()
    records, failures = [], []
    pipes = {}
    for case in plan:
        model = case["model"]
        if model not in pipes:
            pipes.clear()
            pipe = load_pipeline(repo_root / model)
            pipes[model] = (pipe, dict(pipe.scheduler.config))
        pipe, base_cfg = pipes[model]
        try:
            rec = run_case(pipe, base_cfg, case, out / case["id"])
            records.append(rec)
            print(f"ok   {case['id']}  unet calls={rec['unet_calls']}", flush=True)
        except Exception as e:  # diffusers refused this combination
            failures.append(
                {k: case[k] for k in ("id", "model", "scheduler", "steps")}
                | {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            )
            print(f"FAIL {case['id']}: {type(e).__name__}: {e}", flush=True)
            if (out / case["id"]).exists():
                shutil.rmtree(out / case["id"])

    manifest = {
        "description": "Reference outputs of optimum ORTDiffusionPipeline (diffusers) for the tiny fixtures in onnx/. "
        "Generated by onnx/make_references.py; paths of files are relative to this folder, model paths to the repo root.",
        "versions": {
            p: version(p)
            for p in ["torch", "diffusers", "transformers", "optimum-onnx", "onnx", "onnxruntime", "numpy"]
        },
        "session_options": SESSION_OPTIONS,
        "rng_rules": {
            "torch": "generator=torch.Generator('cpu').manual_seed(seed), no latents passed. initial latents = "
            "torch.randn((num_images,4,height/8,width/8), generator, dtype=float32) * float32(init_noise_sigma); "
            "stochastic schedulers then draw step noise from the same generator.",
            "numpy": "numpy mode: initial latents from RandomState(seed); step noise from a torch CPU generator "
            "seeded with the same seed. latents = np.random.RandomState(seed).randn(num_images,4,height/8,width/8)"
            ".astype(float32), passed unscaled as latents=, the pipeline multiplies by init_noise_sigma in float32.",
        },
        "scheduler_rule": "scheduler = getattr(diffusers, scheduler_class).from_config(<model>/scheduler/"
        "scheduler_config.json, **scheduler_extra)",
        "outputs": "latents: float32 NCHW as after prepare_latents (already multiplied by init_noise_sigma). "
        "images: float32 HWC in [0,1], output_type='np' (before rounding). pngs: pipeline.numpy_to_pil "
        "((x*255).round() as uint8). unet_timesteps: the value of the UNet 'timestep' input at every UNet call.",
        "sdxl_notes": "SDXL: original_size=target_size=(height,width), crops=(0,0); force_zeros_for_empty_prompt=true "
        "so with negative_prompt null and guidance>1 the negative embeddings are zeros.",
        "cases": records,
        "expected_failures": failures,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(records)} cases, {len(failures)} expected failures")


# ---------------------------------------------------------------------------------------------

TOKENIZER_CORPUS = [
    "",
    " ",
    "a",
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT Riding A Horse",
    "a   photograph\tof\nan astronaut  ",
    "\u00a0non-breaking\u00a0space and\u2003em space",
    "Hello, World!",
    "hello world!!!",
    "don't can't won't it's we're they've I'm you'll he'd",
    "(masterpiece:1.2), [best quality], {ultra-detailed}, <lora:foo:0.8>",
    "8k, 4K, 1920x1080, f/1.8, 50mm, 3.14159, 1,000,000",
    "rock'n'roll -- \"quoted\" 'single' `back` ~tilde~ ^caret^ |pipe| \\back\\slash/",
    "email@example.com https://example.com/path?q=1&r=2#frag",
    "café crème brûlée naïve façade résumé",
    "Ångström Øresund Straße ÆØÅ æøå ß",
    "e\u0301 (decomposed e + combining acute) vs é",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ﬁ ligature and ½ fraction and ² superscript",
    "東京の夜景、富士山と桜",
    "一只可爱的猫在草地上",
    "고양이와 강아지",
    "Привет, мир! Кошка",
    "Γειά σου κόσμε",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "🐱🐶 cat and dog emoji 🎉🌃",
    "👨‍👩‍👧‍👦 family zwj sequence, 👍🏽 skin tone, 🇯🇵 flag",
    "zero\u200bwidth\u200bspace and soft\u00adhyphen",
    "tab\tseparated\tvalues",
    "line1\r\nline2\rline3",
    "&amp; &lt;html&gt; entities &quot;",
    "<|startoftext|> literal special tokens <|endoftext|>",
    "!!!???...,,,;;;:::",
    "a" * 100,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["word"] * 80),
    "an extremely detailed matte painting of a vast ancient city built into the side of a mountain, "
    "waterfalls, bridges, lanterns, flying ships, dramatic clouds, golden hour light, volumetric fog, "
    "birds, tiny people walking on stone stairs, intricate architecture, trending on artstation, "
    "octane render, 4k, ultra wide angle, by a famous artist, masterpiece, best quality, sharp focus",
    " ".join(str(i) for i in range(60)),
    "Crème brûlée, café & naïve façade — 東京の夜景 🌃!!",
    "  A  red\tcube;   on (a) blue sphere... [highly detailed], 8K, f/1.8 ",
    "blurry, low quality",
    "ugly, deformed, watermark 👎",
]


def make_tokenizer_goldens(out: Path, repo_root: Path = REPO) -> None:
    import open_clip
    from importlib.metadata import version
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    tok_dir = repo_root / "onnx" / "clip-tokenizer"
    fast = CLIPTokenizerFast.from_pretrained(str(tok_dir))
    slow = CLIPTokenizer.from_pretrained(str(tok_dir))
    oc = open_clip.SimpleTokenizer()
    try:
        import ftfy  # noqa: F401

        slow_cleaner = "ftfy"
    except ImportError:
        slow_cleaner = "BasicTokenizer"
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for i, text in enumerate(TOKENIZER_CORPUS):
        kw = dict(padding="max_length", max_length=77, truncation=True)
        f_ids = fast(text, **kw).input_ids
        s_ids = slow(text, **kw).input_ids
        o_ids = [int(x) for x in oc([text])[0]]
        untrunc = fast(text).input_ids
        cases.append(
            {
                "id": i,
                "text": text,
                "input_ids": f_ids,
                "slow_input_ids": s_ids,
                "open_clip_ids": o_ids,
                "fast_slow_agree": f_ids == s_ids,
                # open_clip pads with 0; compare the unpadded part only
                "open_clip_agrees": o_ids[: min(len(untrunc), 77)] == f_ids[: min(len(untrunc), 77)],
                "untruncated_length": len(untrunc),
                "truncated": len(untrunc) > 77,
            }
        )
    doc = {
        "description": "CLIP tokenizer goldens. input_ids: transformers CLIPTokenizerFast loaded from onnx/clip-tokenizer, "
        "called with padding='max_length', max_length=77, truncation=True (BOS 49406, EOS 49407, pad 49407). "
        "slow_input_ids: CLIPTokenizer (slow) with the same arguments; open_clip_ids: open_clip.SimpleTokenizer "
        "(pads with 0, not 49407). fast_slow_agree flags disagreements.",
        "tokenizer_dir": "onnx/clip-tokenizer",
        "sha256": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tok_dir.iterdir()) if p.is_file()
        },
        "versions": {p: version(p) for p in ["transformers", "tokenizers", "open-clip-torch", "ftfy"]},
        "slow_tokenizer_text_cleaner": slow_cleaner,
        "disagreements": [c["id"] for c in cases if not c["fast_slow_agree"]],
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"tokenizer: {len(cases)} cases, fast/slow disagreements: {doc['disagreements']}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", type=Path, default=REPO / "tests" / "golden")
    ap.add_argument("--only", choices=["pipelines", "tokenizer"], default=None)
    ap.add_argument(
        "--repo-root", type=Path, default=REPO,
        help="where to find onnx/<fixture> (default: this repository; point it at a rebuild to check it)",
    )
    args = ap.parse_args(argv)
    if args.only in (None, "tokenizer"):
        make_tokenizer_goldens(args.out_root / "tokenizer", args.repo_root.resolve())
    if args.only in (None, "pipelines"):
        make_pipeline_goldens(args.out_root / "pipelines", args.repo_root.resolve())


if __name__ == "__main__":
    sys.exit(main())
