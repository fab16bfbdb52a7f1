#!/usr/bin/env python3
"""Write the reference outputs ("goldens") for the SD3 and FLUX fixtures.

Usage (from the repository root):
    /work/venv/ref/bin/python onnx/make_transformer_references.py
    /work/venv/ref/bin/python onnx/make_transformer_references.py --out /tmp/check
    /work/venv/ref/bin/python onnx/make_transformer_references.py --repo-root /tmp/rebuild  # other fixtures
    # with a PyTorch cross-check (records torch_max_abs_diff per case, as in the committed manifest):
    /work/venv/ref/bin/python onnx/build_transformer_fixtures.py --out /tmp/fx --work /tmp/fxwork
    /work/venv/ref/bin/python onnx/make_transformer_references.py --torch-stage /tmp/fxwork/stage

Pipelines: Optimum's ORTStableDiffusion3Pipeline, ORTStableDiffusion3Img2ImgPipeline,
ORTStableDiffusion3InpaintPipeline and ORTFluxPipeline on CPUExecutionProvider, one intra/inter-op
thread, no IO binding, fp32 (the same session settings as make_references.py), loaded from
onnx/tiny-sd3, onnx/tiny-sd3-no-t5, onnx/tiny-flux and onnx/tiny-flux-dev.

Writes tests/golden/transformers/{manifest.json,<case>/...}. Per case:
    image<k>.npy / image<k>.png  output_type="np" float32 HWC images in [0, 1] and their PNGs
    latents.npy                  the latents prepare_latents returned (FLUX: packed (n, seq, 64))
    noise.npy                    the Gaussian draw behind them (FLUX: unpacked (n, 16, H/8, W/8))
    input_ids.<encoder>.<k>.npy  every text-encoder call's input_ids (int32 copy of the int64 feed)
    embeds.*.npy                 what encode_prompt returned (first case of each model and a few more)
    transformer_call0.*.npy      the transformer's ONNX feeds and output at the first call (same cases)
The manifest records every pipeline argument, the scheduler's timesteps and sigmas after the
call, the arguments of scheduler.set_timesteps (num_inference_steps / sigmas / mu), and the value
of the transformer's `timestep` (and `guidance`) input at every call.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path

from _env import REPO  # first: one CPU thread, offline Hub, no CUDA (see _env.py)

import numpy as np

from fixture_lib import SESSION_OPTIONS, Recorder, load_ort_pipeline, save_images

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "Crème brûlée, café & naïve façade — 東京の夜景 🌃!!",
    "  A  red\tcube;   on (a) blue sphere... [highly detailed], 8K, f/1.8 ",
    # > 77 CLIP tokens (truncated by the CLIP tokenizers, not by T5 at 256/512)
    "an extremely detailed matte painting of a vast ancient city built into the side of a mountain, "
    "waterfalls, bridges, lanterns, flying ships, dramatic clouds, golden hour light, volumetric fog, "
    "birds, tiny people walking on stone stairs, intricate architecture, trending on artstation, "
    "octane render, 4k, ultra wide angle, by a famous artist, masterpiece, best quality, sharp focus",
]
NEGATIVES = ["blurry, low quality", "ugly, deformed, watermark 👎"]
INIT_IMAGE = "tests/golden/edit/inputs/init-64x64.png"
MASK_IMAGE = "tests/golden/edit/inputs/mask-64x64-hard.png"

PIPELINE_CLASSES = {
    ("sd3", "txt2img"): "ORTStableDiffusion3Pipeline",
    ("sd3", "img2img"): "ORTStableDiffusion3Img2ImgPipeline",
    ("sd3", "inpaint"): "ORTStableDiffusion3InpaintPipeline",
    ("flux", "txt2img"): "ORTFluxPipeline",
}


def case_plan() -> list[dict]:
    cases = []

    def add(model, mode, seed, **kw):
        c = dict(model=model, mode=mode, seed=seed)
        c["args"] = dict(
            prompt=kw.pop("prompt", PROMPTS[0]),
            num_inference_steps=kw.pop("steps", 4),
            num_images_per_prompt=kw.pop("num_images", 1),
        )
        c["args"].update(kw)
        cases.append(c)
        return c

    sd3, nt5 = "onnx/tiny-sd3", "onnx/tiny-sd3-no-t5"
    add(sd3, "txt2img", 100, guidance_scale=7.0, negative_prompt=NEGATIVES[0], width=64, height=64, dump=True)
    add(sd3, "txt2img", 101, guidance_scale=7.0, negative_prompt=NEGATIVES[0], width=64, height=64)
    add(sd3, "txt2img", 102, prompt=PROMPTS[1], guidance_scale=1.0, width=64, height=64)
    add(sd3, "txt2img", 103, guidance_scale=7.0, num_images=2, width=64, height=64)  # negative "" (encoded)
    add(sd3, "txt2img", 104, prompt=PROMPTS[2], steps=3, guidance_scale=7.0, width=96, height=64)
    add(sd3, "txt2img", 105, prompt=PROMPTS[3], guidance_scale=7.0, negative_prompt=NEGATIVES[1],
        width=64, height=64, dump=True)
    add(sd3, "txt2img", 105, prompt=PROMPTS[3], guidance_scale=7.0, negative_prompt=NEGATIVES[1],
        width=64, height=64, max_sequence_length=77, dump=True)
    add(nt5, "txt2img", 100, guidance_scale=7.0, negative_prompt=NEGATIVES[0], width=64, height=64, dump=True)
    add(nt5, "txt2img", 106, prompt=PROMPTS[1], guidance_scale=1.0, width=96, height=64)
    add(sd3, "img2img", 110, steps=5, guidance_scale=7.0, strength=0.6, image=INIT_IMAGE, dump=True)
    add(sd3, "img2img", 111, prompt=PROMPTS[1], steps=4, guidance_scale=1.0, strength=0.6, image=INIT_IMAGE)
    add(sd3, "inpaint", 112, steps=4, guidance_scale=7.0, strength=1.0, image=INIT_IMAGE, mask_image=MASK_IMAGE,
        dump=True)
    add(sd3, "inpaint", 113, steps=5, guidance_scale=7.0, strength=0.8, image=INIT_IMAGE, mask_image=MASK_IMAGE,
        negative_prompt=NEGATIVES[0])

    fl, fd = "onnx/tiny-flux", "onnx/tiny-flux-dev"
    # schnell style: guidance_scale is ignored (no guidance input); max_sequence_length default 512
    add(fl, "txt2img", 200, guidance_scale=0.0, width=64, height=64, dump=True)
    add(fl, "txt2img", 201, guidance_scale=0.0, width=64, height=64)
    add(fl, "txt2img", 202, prompt=PROMPTS[1], guidance_scale=0.0, num_images=2, width=64, height=64)
    add(fl, "txt2img", 203, prompt=PROMPTS[2], guidance_scale=0.0, width=96, height=64)
    add(fl, "txt2img", 200, guidance_scale=0.0, width=64, height=64, max_sequence_length=256)
    add(fl, "txt2img", 204, prompt=PROMPTS[3], steps=2, guidance_scale=0.0, width=64, height=64)
    # dev style: guidance embedding, dynamic shifting (mu depends on the image size)
    add(fd, "txt2img", 300, guidance_scale=3.5, width=64, height=64, dump=True)
    add(fd, "txt2img", 301, guidance_scale=3.5, width=64, height=64)
    add(fd, "txt2img", 302, prompt=PROMPTS[2], guidance_scale=3.5, width=96, height=64)
    add(fd, "txt2img", 303, prompt=PROMPTS[1], guidance_scale=3.5, num_images=2, width=64, height=64)
    add(fd, "txt2img", 300, guidance_scale=3.5, width=64, height=64, max_sequence_length=256)
    add(fd, "txt2img", 304, prompt=PROMPTS[3], steps=3, guidance_scale=5.0, width=64, height=96)
    # FLUX "true CFG": a negative prompt and true_cfg_scale > 1 -> two transformer calls per step
    add(fd, "txt2img", 305, guidance_scale=3.5, negative_prompt=NEGATIVES[0], true_cfg_scale=2.0,
        width=64, height=64)

    for c in cases:
        a = c["args"]
        short = c["model"].split("/")[-1].replace("tiny-", "")
        size = f"{a['width']}x{a['height']}" if "width" in a else "init64x64"
        cid = f"{c['mode']}-{short}-s{a['num_inference_steps']}-g{a['guidance_scale']:g}"
        if "strength" in a:
            cid += f"-st{a['strength']:g}"
        if "true_cfg_scale" in a:
            cid += f"-tcfg{a['true_cfg_scale']:g}"
        if a.get("negative_prompt"):
            cid += "-neg"
        if "max_sequence_length" in a:
            cid += f"-msl{a['max_sequence_length']}"
        cid += f"-{size}-n{a['num_images_per_prompt']}-{c['seed']}"
        c["id"] = cid
        c["dump"] = bool(a.pop("dump", False))
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


# ---------------------------------------------------------------------------------------------


def load_pipeline(model_dir: Path, class_name: str):
    import optimum.onnxruntime as ortm

    return load_ort_pipeline(getattr(ortm, class_name), model_dir)


class Patch:
    """Wraps obj.name (an instance attribute) and records (args, kwargs, result) of every call."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name
        self.orig = getattr(obj, name)
        self.calls = []

        @functools.wraps(self.orig)  # keeps inspect.signature (diffusers checks set_timesteps' parameters)
        def wrapper(*a, **kw):
            r = self.orig(*a, **kw)
            self.calls.append((a, kw, r))
            return r

        setattr(obj, name, wrapper)

    def restore(self):
        try:
            delattr(self.obj, self.name)
        except AttributeError:
            setattr(self.obj, self.name, self.orig)


def _np(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def pack_flux(x):
    """FluxPipeline._pack_latents: (n, c, h, w) -> (n, h/2 * w/2, c * 4)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def run_case(pipe, family: str, case: dict, out_dir: Path, repo_root: Path) -> dict:
    import torch
    from PIL import Image

    a = dict(case["args"])
    call_kwargs = dict(a)
    if "image" in a:
        call_kwargs["image"] = Image.open(repo_root / a["image"]).convert("RGB")
    if "mask_image" in a:
        call_kwargs["mask_image"] = Image.open(repo_root / a["mask_image"]).convert("L")
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    call_kwargs.update(generator=gen, output_type="np")

    encoders = [e for e in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, e, None) is not None]
    te_recs = {e: Recorder(getattr(pipe, e).session) for e in encoders}
    tr_rec = Recorder(pipe.transformer.session)
    vae_enc_rec = Recorder(pipe.vae_encoder.session) if getattr(pipe, "vae_encoder", None) is not None else None
    vae_dec_rec = Recorder(pipe.vae_decoder.session)
    p_lat = Patch(pipe, "prepare_latents")
    p_enc = Patch(pipe, "encode_prompt")
    p_set = Patch(pipe.scheduler, "set_timesteps")
    p_scale = Patch(pipe.scheduler, "scale_noise")
    try:
        images = pipe(**call_kwargs).images
    finally:
        for r in [*te_recs.values(), tr_rec, vae_dec_rec] + ([vae_enc_rec] if vae_enc_rec else []):
            r.restore()
        for p in (p_lat, p_enc, p_set, p_scale):
            p.restore()
    if not np.isfinite(images).all():
        raise FloatingPointError("non-finite image")

    out_dir.mkdir(parents=True, exist_ok=True)
    rel = out_dir.name
    files = {}

    def save(name, arr, dtype=np.float32):
        arr = np.ascontiguousarray(_np(arr).astype(dtype))
        np.save(out_dir / f"{name}.npy", arr)
        files[name] = f"{rel}/{name}.npy"
        return arr

    n = a["num_images_per_prompt"]
    img_files, png_files = save_images(out_dir, images, pipe.numpy_to_pil(images))

    # --- latents and the noise behind them -------------------------------------------------
    assert len(p_lat.calls) == 1, len(p_lat.calls)
    lat_ret = p_lat.calls[0][2]
    rec_extra = {}
    seed = case["seed"]
    if family == "flux":
        latents, latent_image_ids = lat_ret
        latents = save("latents", latents)
        h8, w8 = 2 * (a["height"] // 16), 2 * (a["width"] // 16)
        noise = torch.randn((n, 16, h8, w8), generator=torch.Generator("cpu").manual_seed(seed),
                            dtype=torch.float32).numpy()
        assert np.array_equal(pack_flux(noise), latents), f"{case['id']}: FLUX latents rule mismatch"
        save("noise", noise)
        rec_extra["latent_image_ids_shape"] = list(_np(latent_image_ids).shape)
    elif case["mode"] == "txt2img":
        latents = save("latents", lat_ret)
        shape = (n, 16, a["height"] // 8, a["width"] // 8)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32).numpy()
        assert np.array_equal(noise, latents), f"{case['id']}: SD3 latents rule mismatch"
        save("noise", noise)
    else:
        # img2img: prepare_latents returns the noised image latents; inpaint returns
        # (latents, noise, image_latents). scale_noise(sample=image latents, timestep, noise) records both.
        if case["mode"] == "inpaint":
            latents = save("latents", lat_ret[0])
            save("noise", lat_ret[1])
            save("image_latents", lat_ret[2])
        else:
            latents = save("latents", lat_ret)
        sn_ts = []
        for j, (sa, skw, _) in enumerate(p_scale.calls):
            args_ = dict(zip(["sample", "timestep", "noise"], sa)) | skw
            if j == 0 and case["mode"] == "img2img":
                save("image_latents", args_["sample"])
                save("noise", args_["noise"])
            sn_ts.append([float(t) for t in _np(args_["timestep"]).reshape(-1)])
        # img2img: one call (the initial noising at the first timestep); inpaint: strength < 1 starts
        # with that call too, then one call per step but the last (re-noising the image latents to
        # the next timestep before blending with the mask)
        rec_extra["scale_noise_timesteps"] = sn_ts
        # Independent check of the generator draw order: the VAE encoder's sample comes first.
        g = torch.Generator("cpu").manual_seed(seed)
        h8, w8 = latents.shape[2], latents.shape[3]
        torch.randn((1, 16, h8, w8), generator=g, dtype=torch.float32)
        expect = torch.randn((n, 16, h8, w8), generator=g, dtype=torch.float32).numpy()
        assert np.array_equal(expect, np.load(out_dir / "noise.npy")), f"{case['id']}: noise draw order mismatch"
        if vae_enc_rec is not None:
            rec_extra["vae_encoder_calls"] = len(vae_enc_rec.calls)
            save("vae_encoder_input0", vae_enc_rec.calls[0]["sample"])

    # --- text encoders ----------------------------------------------------------------------
    te_info = []
    for e, r in te_recs.items():
        for k, c in enumerate(r.calls):
            ids = c["input_ids"]
            save(f"input_ids.{e}.{k}", ids, np.int32)
            te_info.append({"encoder": e, "call": k, "input_ids": files[f"input_ids.{e}.{k}"],
                            "shape": list(ids.shape), "dtype": str(ids.dtype),
                            "feeds": sorted(c.keys())})

    # --- encode_prompt outputs --------------------------------------------------------------
    if family == "sd3":
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    else:
        names = ["prompt_embeds", "pooled_prompt_embeds", "text_ids"]
    embeds_info = []
    for j, (_, ekw, ret) in enumerate(p_enc.calls):
        shapes = {}
        for nm, v in zip(names, ret):
            if v is None:
                shapes[nm] = None
                continue
            shapes[nm] = list(_np(v).shape)
            if case["dump"]:
                save(f"embeds.{j}.{nm}", v)
        embeds_info.append({"call": j, "shapes": shapes,
                            "kwargs": {k: v for k, v in ekw.items()
                                       if isinstance(v, (str, int, float, bool, type(None)))}})

    # --- transformer calls ------------------------------------------------------------------
    calls = tr_rec.calls
    t_in = calls[0]["timestep"]
    tr = dict(
        calls=len(calls),
        batch=int(calls[0]["hidden_states"].shape[0]),
        feeds={k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in sorted(calls[0].items())},
        timesteps=[[float(x) for x in c["timestep"].reshape(-1)] for c in calls],
        timestep_input={"dtype": str(t_in.dtype), "shape": list(t_in.shape)},
    )
    if "guidance" in calls[0]:
        tr["guidance"] = [[float(x) for x in c["guidance"].reshape(-1)] for c in calls]
    if case["dump"]:
        for k, v in calls[0].items():
            dt = v.dtype if v.dtype != np.float64 else np.float32
            save(f"transformer_call0.{k}", v, dt)
        save("transformer_call0.out_hidden_states", tr_rec.outputs[0][0])

    sched = pipe.scheduler
    set_calls = []
    for sa, skw, _ in p_set.calls:
        d = {}
        if sa:
            d["num_inference_steps"] = sa[0]
        for k, v in skw.items():
            if k == "device":
                continue
            if v is None or isinstance(v, (int, float, bool, str)):
                d[k] = v
            else:
                d[k] = [float(x) for x in np.asarray(v).reshape(-1)]
        set_calls.append(d)

    rec = dict(case)
    rec.pop("dump")
    rec.update(
        family=family,
        pipeline_class=type(pipe).__name__,
        images=img_files,
        pngs=png_files,
        image_shape=list(images.shape[1:]),
        latents_shape=list(latents.shape),
        files=files,
        scheduler_class=type(sched).__name__,
        scheduler_set_timesteps=set_calls,
        scheduler_timesteps=[float(t) for t in sched.timesteps],
        scheduler_sigmas=[float(s) for s in sched.sigmas],
        transformer=tr,
        text_encoder_calls=te_info,
        encode_prompt_calls=embeds_info,
        vae_decoder_calls=len(vae_dec_rec.calls),
        vae_decoder_input_shape=list(vae_dec_rec.calls[0]["latent_sample"].shape),
        **rec_extra,
    )
    return rec


def torch_check(stage_root: Path, cache: dict, family: str, case: dict, out: Path, rec: dict, repo_root: Path) -> float:
    """Run the diffusers (PyTorch) pipeline the fixture was exported from with the same arguments."""
    import diffusers
    import torch
    from PIL import Image

    name = case["model"].split("/")[-1]
    cls = {"txt2img": "StableDiffusion3Pipeline", "img2img": "StableDiffusion3Img2ImgPipeline",
           "inpaint": "StableDiffusion3InpaintPipeline"}[case["mode"]] if family == "sd3" else "FluxPipeline"
    key = (name, cls)
    if key not in cache:
        cache.clear()
        kw = {}
        if name == "tiny-sd3-no-t5":
            name, kw = "tiny-sd3", dict(text_encoder_3=None, tokenizer_3=None)
        pipe = getattr(diffusers, cls).from_pretrained(str(stage_root / name), **kw)
        pipe.set_progress_bar_config(disable=True)
        cache[key] = pipe
    a = dict(case["args"])
    if "image" in a:
        a["image"] = Image.open(repo_root / a["image"]).convert("RGB")
    if "mask_image" in a:
        a["mask_image"] = Image.open(repo_root / a["mask_image"]).convert("L")
    with torch.no_grad():
        images = cache[key](**a, generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np").images
    ref = np.stack([np.load(out / f) for f in rec["images"]])
    return float(np.abs(images - ref).max())


def make_goldens(out: Path, repo_root: Path, only: set[str] | None = None, torch_stage: Path | None = None) -> None:
    import torch
    from importlib.metadata import version

    torch.set_num_threads(1)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plan = [c for c in case_plan() if only is None or c["id"] in only]
    records, failures = [], []
    pipes, torch_pipes = {}, {}
    for case in plan:
        family = "flux" if "flux" in case["model"] else "sd3"
        cls = PIPELINE_CLASSES[(family, case["mode"])]
        key = (case["model"], cls)
        if key not in pipes:
            pipes.clear()
            pipes[key] = load_pipeline(repo_root / case["model"], cls)
        pipe = pipes[key]
        try:
            rec = run_case(pipe, family, case, out / case["id"], repo_root)
            if torch_stage is not None:
                rec["torch_max_abs_diff"] = torch_check(torch_stage, torch_pipes, family, case, out, rec, repo_root)
            records.append(rec)
            print(f"ok   {case['id']}  transformer calls={rec['transformer']['calls']}"
                  + (f" torch diff {rec['torch_max_abs_diff']:.2e}" if torch_stage is not None else ""), flush=True)
        except Exception as e:
            failures.append({"id": case["id"], "model": case["model"], "args": case["args"],
                             "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
            print(f"FAIL {case['id']}: {type(e).__name__}: {e}", flush=True)
            if (out / case["id"]).exists():
                shutil.rmtree(out / case["id"])

    manifest = {
        "description": "Reference outputs of Optimum's ORT SD3 / FLUX pipelines (diffusers) for the tiny fixtures "
        "onnx/tiny-sd3, onnx/tiny-sd3-no-t5, onnx/tiny-flux, onnx/tiny-flux-dev. Generated by "
        "onnx/make_transformer_references.py; file paths are relative to this folder, model and input image "
        "paths to the repository root.",
        "versions": {
            p: version(p)
            for p in ["torch", "diffusers", "transformers", "optimum-onnx", "onnx", "onnxruntime", "numpy", "pillow"]
        },
        "session_options": SESSION_OPTIONS,
        "fields": {
            "args": "the keyword arguments of the pipeline call, plus generator=torch.Generator('cpu')"
            ".manual_seed(seed) and output_type='np'. image / mask_image are repository paths, loaded as "
            "PIL.Image.open(path).convert('RGB') / .convert('L'). Pipeline defaults apply to everything not listed "
            "(SD3: max_sequence_length 256, negative_prompt '' under CFG; FLUX: max_sequence_length 512, "
            "true_cfg_scale 1.0).",
            "images": "float32 HWC in [0,1] (output_type='np', before rounding); pngs: pipeline.numpy_to_pil "
            "((x*255).round() as uint8)",
            "files.latents": "what prepare_latents returned and the denoising loop starts from. SD3 txt2img: "
            "(n,16,H/8,W/8); SD3 img2img/inpaint: the noised image latents (inpaint strength 1: the noise itself); "
            "FLUX: packed (n,(H/16)*(W/16),64)",
            "files.noise": "the Gaussian draw: SD3 txt2img and FLUX = torch.randn(shape, generator, float32) "
            "as the first draw of the generator (FLUX shape (n,16,2*(H//16),2*(W//16)), packed by "
            "view(n,16,h/2,2,w/2,2).permute(0,2,4,1,3,5).reshape(n,h/2*w/2,64)); img2img/inpaint: the noise "
            "drawn after the VAE encoder's sample (see generator_draws)",
            "files.image_latents": "img2img/inpaint: (vae_encoder latent_dist.sample(generator) - shift_factor) * "
            "scaling_factor",
            "files.input_ids.<encoder>.<k>": "the k-th call of that text encoder (int32 copy; fed as int64)",
            "files.embeds.<j>.<name>": "encode_prompt call j's outputs (dumped cases only)",
            "files.transformer_call0.<input>": "the transformer ONNX feeds at the first call and its output "
            "(dumped cases only); under CFG the batch is [negative, positive]",
            "transformer.timesteps": "the value of the transformer's 'timestep' input at every call",
            "transformer.guidance": "FLUX-dev: the 'guidance' input at every call",
            "scheduler_timesteps / scheduler_sigmas": "pipe.scheduler.timesteps / sigmas after the call (the full "
            "schedule; img2img/inpaint start at the first entry of scale_noise_timesteps / transformer.timesteps)",
            "scale_noise_timesteps": "img2img/inpaint: the timestep of every scheduler.scale_noise call (img2img: the "
            "initial noising; inpaint: the initial noising when strength < 1, then the re-noising of the image "
            "latents to timesteps[i+1] after every step but the last)",
            "torch_max_abs_diff": "only with --torch-stage: max |image - diffusers torch pipeline image| for the same "
            "arguments, run on the saved diffusers pipelines the ONNX files were exported from",
            "scheduler_set_timesteps": "the arguments of every scheduler.set_timesteps call (FLUX passes "
            "sigmas=linspace(1,1/n,n) and mu; SD3 only num_inference_steps)",
        },
        "generator_draws": {
            "sd3_txt2img": "noise = randn((n,16,H/8,W/8)); latents = noise",
            "flux_txt2img": "noise = randn((n,16,2*(H//16),2*(W//16))); latents = pack(noise)",
            "sd3_img2img": "1) VAE encoder: latent_dist.sample(generator) = mean + std * randn((1,16,H/8,W/8)); "
            "2) noise = randn((n,16,H/8,W/8)); latents = scheduler.scale_noise(image_latents, t0, noise) = "
            "sigma*noise + (1-sigma)*image_latents",
            "sd3_inpaint": "1) VAE encoder sample for the image latents, 2) noise, 3) VAE encoder sample for "
            "the masked image latents (unused by a 16-channel transformer)",
        },
        "rules": {
            "sd3_timestep": "transformer timestep input = scheduler timestep (sigma*1000, float32), one per batch row",
            "flux_timestep": "transformer timestep input = scheduler timestep / 1000 (= sigma), float32",
            "flux_guidance": "FLUX-dev: guidance input = full(batch, guidance_scale) float32 (not multiplied by "
            "1000 at the input; the model does that); schnell: no guidance input, guidance_scale ignored",
            "flux_ids": "txt_ids: zeros (seq_len,3); img_ids[..,1]=row, [..,2]=col of the packed grid, "
            "shape ((H/16)*(W/16),3). diffusers makes them float, Optimum casts them to the ONNX int64 inputs",
            "sd3_cfg": "guidance_scale > 1: batch [negative, positive]; noise = neg + g*(pos-neg). The negative "
            "prompt defaults to '' and is encoded (not zeros).",
            "sd3_no_t5": "without text_encoder_3 the T5 part of prompt_embeds is zeros of shape "
            "(n, max_sequence_length, joint_attention_dim): CLIP part padded to joint_attention_dim, then T5 zeros",
        },
        "cases": records,
        "expected_failures": failures,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(records)} cases, {len(failures)} failures")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "golden" / "transformers")
    ap.add_argument("--repo-root", type=Path, default=REPO,
                    help="where to find onnx/<fixture> and the input images (default: this repository)")
    ap.add_argument("--only", default=None, help="comma list of case ids")
    ap.add_argument("--torch-stage", type=Path, default=None,
                    help="also run the diffusers PyTorch pipelines saved in DIR/<fixture> (the stage/ folder of "
                    "build_transformer_fixtures.py --work DIR/..) and record torch_max_abs_diff per case")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    stage = args.torch_stage.resolve() if args.torch_stage else None
    make_goldens(args.out.resolve(), args.repo_root.resolve(), only, stage)


if __name__ == "__main__":
    sys.exit(main())
