#!/usr/bin/env python3
"""Reference outputs ("goldens") for image-to-image, inpainting, LCM, Turbo and '!'-prompt txt2img.

Usage (from the repository root):
    onnx/.venv/bin/python onnx/make_edit_references.py                          # -> tests/golden/edit
    onnx/.venv/bin/python onnx/make_edit_references.py --out-root /tmp/a        # -> /tmp/a/edit
    onnx/.venv/bin/python onnx/make_edit_references.py --repo-root /tmp/rb      # models from a rebuild
    onnx/.venv/bin/python onnx/make_edit_references.py --only img2img-sd15-pndm-s8-st0.6-g7.5-64x64-n1-2001

Writes <out-root>/edit/manifest.json, <out-root>/edit/inputs/ (init images and masks, generated here
from seeded numpy patterns, then read back from disk exactly as a user's files would be) and one
folder per case. Pipelines: Optimum's ORT pipelines on CPUExecutionProvider, one intra-op thread,
no IO binding, fp32 (same session options as make_references.py), generator =
torch.Generator("cpu").manual_seed(seed), no latents passed, output_type="np".
The init image is passed as PIL.Image.open(path).convert("RGB"), the mask as
PIL.Image.open(path).convert("L") (diffusers' mask processor would do the same convert("L") itself,
after resizing; our masks already have the image's size and are stored as 8-bit grayscale).

Everything below was checked by reading the installed sources (diffusers 0.39.0:
image_processor.py, pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py,
pipeline_stable_diffusion_inpaint.py, pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py,
pipelines/latent_consistency_models/*.py, models/autoencoders/vae.py, schedulers/scheduling_lcm.py;
optimum-onnx 0.1.0: optimum/onnxruntime/modeling_diffusion.py, base.py). The draw order and the
latent formulas are also asserted bit-for-bit by this script against the tensors the pipeline
produced (check_* functions), so a wrong statement here fails the run.

Image preprocessing (VaeImageProcessor(vae_scale_factor=8), do_resize=True, do_normalize=True):
  * size: width, height = image size, each rounded DOWN to a multiple of 8 (x - x % 8); in img2img
    (SD, SDXL, LCM) height/width are not arguments, so the init image's own size decides (100x70 ->
    96x64). The PIL image is then ALWAYS passed through
    PIL.Image.resize((width, height), resample=PIL.Image.LANCZOS, reducing_gap=None); Pillow returns
    an unchanged copy when the size already matches, otherwise this is a Lanczos (a=3) resample of
    the whole image (aspect ratio not kept, no crop). Alpha: diffusers does NOT convert to RGB
    (do_convert_rgb=False); we pass .convert("RGB"), which in Pillow simply drops the alpha channel
    (no compositing over any background).
  * to tensor: np.array(img).astype(float32) / 255, NHWC -> NCHW, then 2*x - 1 (float32).
  * inpaint: height/width default to unet.config.sample_size * 8 when not given (64 for the tiny
    UNets), NOT to the image size, so this script always passes height=init height, width=init
    width (after rounding down to a multiple of 8). The init image goes through the same
    preprocess with that size.
  * mask (mask_processor = VaeImageProcessor(do_normalize=False, do_binarize=True,
    do_convert_grayscale=True)): resize (same Lanczos rule) -> convert("L") -> /255 float32 ->
    binarize: v < 0.5 -> 0, v >= 0.5 -> 1 (so 127 -> 0, 128 -> 1; soft masks become hard masks).
    Shape (1, 1, H, W).
  * masked_image = init_image * (mask < 0.5)  (normalized image, masked pixels become 0.0 = mid gray).
  * mask latents = torch.nn.functional.interpolate(mask, size=(H/8, W/8)) (mode "nearest"):
    mask_latent[i, j] = mask[8*i, 8*j] (top-left pixel of each 8x8 block).

VAE encoder (ORT): input `sample` float32 (N, 3, H, W); output `latent_parameters` (N, 8, H/8, W/8).
Optimum (ORTVaeEncoder.forward) wraps it as diffusers' DiagonalGaussianDistribution(parameters):
  mean, logvar = torch.chunk(params, 2, dim=1)       # channels 0..3, 4..7
  logvar = torch.clamp(logvar, -30.0, 20.0)
  std = torch.exp(0.5 * logvar)
  and retrieve_latents(..., sample_mode="sample") calls latent_dist.sample(generator):
  eps = torch.randn(mean.shape, generator=generator, dtype=float32)   # one draw, shape (N,4,H/8,W/8)
  z = mean + std * eps
  init_latents = vae.config.scaling_factor * z       # float32 multiply (0.18215 / 0.13025)
  With a single torch.Generator (not a list) the image batch is 1, so eps has batch 1; with
  num_images n > 1 the latents are then concatenated n times (torch.cat([z] * n)).

img2img timesteps (StableDiffusionImg2ImgPipeline.get_timesteps, also SDXL img2img, inpaint):
  scheduler.set_timesteps(steps); init_timestep = min(int(steps * strength), steps);
  t_start = max(steps - init_timestep, 0); timesteps = scheduler.timesteps[t_start * order:];
  scheduler.set_begin_index(t_start * order) if it has one; UNet runs len(timesteps) times
  (order 2 for Heun: its timesteps list has 2*steps-1 entries). latent_timestep =
  timesteps[:1].repeat(n). int() truncates (steps 8, strength 0.3 -> 2 steps; 0.6 -> 4; 0.8 -> 6).
  SD img2img does not refuse 0 steps (it fails later, see expected_failures); inpaint raises
  ValueError when steps - t_start < 1.
  LCM img2img instead calls scheduler.set_timesteps(steps, strength=strength): the LCM origin
  schedule is range(1, int(original_inference_steps * strength) + 1) * (1000 // 50) - 1, reversed,
  and `steps` evenly spaced indices (floor(linspace(0, len, steps, endpoint=False))) of it: always
  `steps` UNet calls; no get_timesteps truncation.

Generator draw order (single torch CPU generator, all draws float32 torch.randn):
  SD / SDXL img2img: [1] VAE eps (1,4,h,w) for the init image; [2] noise (n,4,h,w);
      latents = scheduler.add_noise(init_latents, noise, latent_timestep); then the scheduler's
      step noise (euler-a, ddpm, lcm ...) in step order. SDXL img2img: force_upcast only moves the
      (ORT) VAE to float32, no numeric effect; no latents_mean/std in the tiny config.
  LCM img2img: same as SD img2img ([1] VAE eps, [2] noise, add_noise with the LCM scheduler's
      DDPM-style add_noise at timesteps[0]), then LCM step noise (n,4,h,w) after every step except
      the last.
  inpaint, 9-channel UNet, strength 1.0: [1] noise (n,4,h,w), latents = noise * init_noise_sigma;
      [2] VAE eps for the masked image (1,4,h,w). No encode of the init image.
  inpaint, 9-channel UNet, strength < 1: [1] VAE eps of the init image; [2] noise;
      latents = add_noise(image_latents, noise, latent_timestep); [3] VAE eps of the masked image.
  inpaint, 4-channel UNet (any strength): [1] VAE eps of the init image (image_latents are always
      needed for the blending); [2] noise; latents = noise * init_noise_sigma if strength == 1.0
      else add_noise(image_latents, noise, latent_timestep); [3] VAE eps of the masked image (its
      latents are computed and then unused by a 4-channel UNet, but the draw happens).
  txt2img (SD, SDXL, Turbo, LCM): [1] latents = randn((n,4,h,w)) * init_noise_sigma; step noise.
  VAE encoder calls: once per encode with batch 1 (the image is not repeated before encoding).

inpaint UNet input and blending:
  9-channel: unet sample = cat([scale_model_input(cat([latents]*2 if CFG)), mask, masked_image_latents],
      dim=1), mask / masked_image_latents repeated to n and then doubled for CFG ([uncond; cond]).
  4-channel (Optimum's ORTStableDiffusionInpaintPipeline accepts it; diffusers only logs an info
      message): unet sample = scaled latents only; after EVERY scheduler step i:
      init_latents_proper = image_latents; if i < len(timesteps) - 1:
          init_latents_proper = scheduler.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
      latents = (1 - init_mask) * init_latents_proper + init_mask * latents
      where init_mask is the (n,1,h,w) latent mask (the uncond half when CFG) and `noise` is draw [2].
      On the last step the un-noised image_latents are used.

LCM (LatentConsistencyModelPipeline / Img2Img): no classifier-free guidance batch (batch n, one UNet
  call per step), negative prompts not supported (None). The guidance enters only through the
  UNet input `timestep_cond` (n, time_cond_proj_dim), float32:
      w = (guidance_scale - 1) * 1000; half = dim // 2
      f = exp(arange(half, float32) * -(log(10000.0) / (half - 1)))   (torch float32 ops)
      emb = cat([sin(w * f), cos(w * f)])                              (sin first)
  The denoised x0 of the LAST step (not prev_sample) is decoded. timestep input is the integer
  timestep cast to float32.

Turbo (tiny-turbo, ORTStableDiffusionPipeline): plain txt2img/img2img; guidance_scale 0 -> no CFG
  (do_classifier_free_guidance is guidance_scale > 1), batch n. EulerAncestral "trailing": 1 step ->
  timestep 999, 4 steps -> 999, 749, 499, 249; init_noise_sigma = sigma_max (14.6146...), not
  sqrt(sigma_max^2 + 1), because timestep_spacing is "trailing" (same for "linspace").

Decoding / output: image = vae_decoder(latents / scaling_factor); postprocess: (x / 2 + 0.5).clamp(0, 1),
  NCHW -> NHWC float32 (images[k] = image{k}.npy); PNG = (x * 255).round().astype(uint8).

'!' prompts: the Python pipelines always use the slow CLIPTokenizer (model_index names CLIPTokenizer),
  so tokenizer.json plays no part on this side; the "without tokenizer.json" cases exist for the Rust
  loader (it must give the same ids from vocab.json + merges.txt + the config files). The script
  asserts the outputs are identical with and without tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _env import REPO  # first: one CPU thread, offline Hub, no CUDA (see _env.py)

import numpy as np

from fixture_lib import SESSION_OPTIONS, Recorder, load_ort_pipeline, save_images, sha256
from scheduler_names import SCHEDULERS

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk",
    "  A  red\tcube;   on (a) blue sphere... [highly detailed], 8K, f/1.8 ",
    "Crème brûlée, café & naïve façade — 東京の夜景 🌃!!",
]
NEGATIVES = ["blurry, low quality", "ugly, deformed, watermark 👎"]
BANG_PROMPT = "a castle on a hill! dramatic!!"

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

INPUT_SEED = 7000


def _pattern(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth gradients + a disc + a bar + low-amplitude noise, uint8 HxWx3 (numpy only)."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 0.15 + 0.7 * x / max(w - 1, 1)
    g = 0.1 + 0.8 * y / max(h - 1, 1)
    b = 0.5 + 0.4 * np.sin(2 * np.pi * (x + 2 * y) / (0.75 * w))
    img = np.stack([r, g, b], axis=-1)
    cx, cy, rad = w * rs.uniform(0.3, 0.7), h * rs.uniform(0.3, 0.7), min(w, h) * rs.uniform(0.18, 0.3)
    disc = (x - cx) ** 2 + (y - cy) ** 2 < rad**2
    img[disc] = rs.uniform(0, 1, size=3)
    x0, y0 = int(w * rs.uniform(0.05, 0.4)), int(h * rs.uniform(0.05, 0.4))
    img[y0 : y0 + h // 6, x0 : x0 + w // 2] = rs.uniform(0, 1, size=3)
    img = img + rs.normal(0, 0.03, size=img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_inputs(inp: Path) -> dict:
    """Write the init images and masks; return {name: description}."""
    from PIL import Image

    inp.mkdir(parents=True, exist_ok=True)
    desc = {}

    def save_png(arr, name, mode, what):
        Image.fromarray(arr, mode=mode).save(inp / name, format="PNG")
        desc[name] = what

    save_png(_pattern(64, 64, INPUT_SEED + 1), "init-64x64.png", "RGB", "RGB PNG 64x64")
    save_png(_pattern(96, 64, INPUT_SEED + 2), "init-96x64.png", "RGB", "RGB PNG 96 wide x 64 high")
    save_png(
        _pattern(100, 70, INPUT_SEED + 3), "init-100x70.png", "RGB",
        "RGB PNG 100x70; diffusers rounds down to 96x64 and Lanczos-resizes (not crops) the whole image",
    )
    # RGBA: RGB pattern under an alpha ramp with fully transparent and fully opaque areas; the RGB
    # values under alpha 0 are not black/white, so any compositing would show.
    rgb = _pattern(64, 64, INPUT_SEED + 4)
    a = np.zeros((64, 64), np.uint8)
    a[:, 16:48] = np.linspace(0, 255, 32).round().astype(np.uint8)[None, :]
    a[:, 48:] = 255
    save_png(
        np.concatenate([rgb, a[..., None]], axis=-1), "init-64x64-rgba.png", "RGBA",
        "RGBA PNG 64x64 (alpha 0 in columns 0-15, ramp 16-47, 255 in 48-63); convert('RGB') drops alpha",
    )
    # JPEG, 4:4:4 (no chroma subsampling), baseline, quality 90. The decoded pixels (Pillow /
    # libjpeg-turbo, ISLOW IDCT) are in init-64x64-jpeg.decoded.png.
    Image.fromarray(_pattern(64, 64, INPUT_SEED + 5), mode="RGB").save(
        inp / "init-64x64.jpg", format="JPEG", quality=90, subsampling=0, optimize=False, progressive=False
    )
    desc["init-64x64.jpg"] = "baseline JPEG 64x64, quality 90, 4:4:4; decoded by Pillow -> init-64x64-jpeg.decoded.png"
    dec = np.array(Image.open(inp / "init-64x64.jpg").convert("RGB"))
    save_png(dec, "init-64x64-jpeg.decoded.png", "RGB", "Pillow's decoding of init-64x64.jpg (lossless PNG)")

    # masks (white = repaint, black = keep), 8-bit grayscale
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 20:52] = 255
    save_png(m, "mask-64x64-hard.png", "L", "hard mask 0/255 64x64: rows 16-47, cols 20-51 are 255")
    grad = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8)[None, :], (64, 1))
    save_png(grad, "mask-64x64-soft.png", "L", "soft mask 64x64: horizontal ramp 0..255 (binarised at 0.5 by diffusers)")
    m = np.zeros((64, 96), np.uint8)
    m[8:56, 40:88] = 255
    m[40:64, 0:24] = 255
    save_png(m, "mask-96x64-hard.png", "L", "hard mask 0/255 96x64: two rectangles")
    ys, xs = np.mgrid[0:64, 0:96]
    soft = (255 * np.clip(1.2 - np.hypot(xs - 60, ys - 30) / 28.0, 0, 1)).round().astype(np.uint8)
    save_png(soft, "mask-96x64-soft.png", "L", "soft mask 96x64: radial falloff (binarised at 0.5 by diffusers)")
    return desc


def preprocess_reference(path: Path, width: int | None = None, height: int | None = None) -> np.ndarray:
    """Independent re-implementation of VaeImageProcessor.preprocess for our PIL inputs -> float32 NCHW [-1,1]."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w = width if width is not None else img.width
    h = height if height is not None else img.height
    w, h = w - w % 8, h - h % 8
    img = img.resize((w, h), resample=Image.LANCZOS, reducing_gap=None)
    x = np.array(img).astype(np.float32) / 255.0
    x = x.transpose(2, 0, 1)[None]
    return 2.0 * x - 1.0


def mask_reference(path: Path, width: int, height: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("L")
    img = img.resize((width, height), resample=Image.LANCZOS, reducing_gap=None).convert("L")
    x = np.array(img).astype(np.float32) / 255.0
    x = x[None, None]
    x[x < 0.5] = 0
    x[x >= 0.5] = 1
    return x


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def case_plan() -> list[dict]:
    cases = []
    seed = 2000

    def add(**kw):
        nonlocal seed
        base = dict(
            mode="img2img",
            model="onnx/tiny-sd15",
            strip_tokenizer_json=False,
            negative_prompt=None,
            scheduler=None,
            strength=None,
            width=None,
            height=None,
            num_images=1,
            init_image=None,
            mask_image=None,
        )
        base.update(kw)
        seed += 1
        base["seed"] = seed
        cases.append(base)
        return base

    I64, I96, I100 = "inputs/init-64x64.png", "inputs/init-96x64.png", "inputs/init-100x70.png"
    IRGBA, IJPG = "inputs/init-64x64-rgba.png", "inputs/init-64x64.jpg"
    MH, MS = "inputs/mask-64x64-hard.png", "inputs/mask-64x64-soft.png"
    MH96, MS96 = "inputs/mask-96x64-hard.png", "inputs/mask-96x64-soft.png"

    # --- img2img, tiny-sd15 (SD1.x, PNDM default) ---
    p = PROMPTS
    add(scheduler="pndm", prompt=p[0], steps=8, guidance_scale=7.5, strength=0.6, init_image=I64)
    add(scheduler="ddim", prompt=p[1], steps=8, guidance_scale=7.5, strength=0.3, init_image=I64)
    add(scheduler="euler", prompt=p[2], steps=6, guidance_scale=1.0, strength=0.8, init_image=I96)
    add(scheduler="euler-a", prompt=p[0], steps=6, guidance_scale=7.5, strength=0.6, init_image=I64)
    add(scheduler="lms", prompt=p[1], steps=5, guidance_scale=7.5, strength=1.0, init_image=I64)
    add(scheduler="dpm++2m", prompt=p[3], steps=8, guidance_scale=7.5, strength=0.6, init_image=I64,
        negative_prompt=NEGATIVES[0])
    add(scheduler="dpm++2m-karras", prompt=p[0], steps=6, guidance_scale=7.5, strength=0.8, init_image=I96)
    add(scheduler="unipc", prompt=p[2], steps=6, guidance_scale=7.5, strength=0.8, init_image=I64)
    add(scheduler="heun", prompt=p[1], steps=4, guidance_scale=7.5, strength=0.6, init_image=I64)
    add(scheduler="ddpm", prompt=p[0], steps=5, guidance_scale=7.5, strength=0.6, init_image=I64)
    add(scheduler="pndm", prompt=p[1], steps=4, guidance_scale=7.5, strength=0.8, init_image=I64, num_images=2,
        negative_prompt=NEGATIVES[1])
    add(scheduler="euler-a", prompt=p[2], steps=4, guidance_scale=1.0, strength=1.0, init_image=I96, num_images=2)
    add(scheduler="ddim", prompt=p[0], steps=6, guidance_scale=7.5, strength=0.6, init_image=I100)
    add(scheduler="euler", prompt=p[1], steps=4, guidance_scale=7.5, strength=0.3, init_image=I100)
    add(scheduler="ddim", prompt=p[2], steps=4, guidance_scale=7.5, strength=0.6, init_image=IRGBA)
    add(scheduler="pndm", prompt=p[0], steps=4, guidance_scale=7.5, strength=0.6, init_image=IJPG)
    add(scheduler="euler", prompt=p[1], steps=8, guidance_scale=1.0, strength=1.0, init_image=I64)
    add(prompt=p[3], steps=8, guidance_scale=7.5, strength=0.6, init_image=I64)  # the folder's own scheduler
    # strength 0.2 with 4 steps: int(0.8) = 0 denoising steps -> diffusers fails (expected failure)
    add(scheduler="ddim", prompt=p[0], steps=4, guidance_scale=7.5, strength=0.2, init_image=I64)

    # --- img2img, tiny-sdxl ---
    x = "onnx/tiny-sdxl"
    add(model=x, prompt=p[0], steps=6, guidance_scale=5.0, strength=0.6, init_image=I64)
    add(model=x, scheduler="euler-a", prompt=p[1], steps=4, guidance_scale=1.0, strength=0.8, init_image=I96,
        negative_prompt=NEGATIVES[0])
    add(model=x, scheduler="ddim", prompt=p[2], steps=8, guidance_scale=5.0, strength=0.3, init_image=I64,
        num_images=2)

    # --- inpaint, 4-channel tiny-sd15 ---
    add(mode="inpaint", prompt=p[0], steps=6, guidance_scale=7.5, strength=1.0, init_image=I64, mask_image=MH)
    add(mode="inpaint", scheduler="ddim", prompt=p[1], steps=8, guidance_scale=7.5, strength=0.75, init_image=I64,
        mask_image=MS)
    add(mode="inpaint", scheduler="euler-a", prompt=p[2], steps=6, guidance_scale=1.0, strength=0.75,
        init_image=I96, mask_image=MH96)
    add(mode="inpaint", scheduler="euler", prompt=p[0], steps=4, guidance_scale=7.5, strength=1.0, init_image=I96,
        mask_image=MS96, num_images=2, negative_prompt=NEGATIVES[1])
    # --- inpaint, 9-channel tiny-sd15-inpaint ---
    ip = "onnx/tiny-sd15-inpaint"
    add(mode="inpaint", model=ip, prompt=p[0], steps=6, guidance_scale=7.5, strength=1.0, init_image=I64,
        mask_image=MH)
    add(mode="inpaint", model=ip, scheduler="ddim", prompt=p[1], steps=8, guidance_scale=7.5, strength=0.75,
        init_image=I64, mask_image=MS)
    add(mode="inpaint", model=ip, scheduler="euler-a", prompt=p[2], steps=6, guidance_scale=1.0, strength=1.0,
        init_image=I96, mask_image=MH96)
    add(mode="inpaint", model=ip, scheduler="euler", prompt=p[3], steps=4, guidance_scale=7.5, strength=0.75,
        init_image=I96, mask_image=MS96, num_images=2, negative_prompt=NEGATIVES[0])
    add(mode="inpaint", model=ip, scheduler="dpm++2m", prompt=p[0], steps=6, guidance_scale=7.5, strength=1.0,
        init_image=IRGBA, mask_image=MS)
    add(mode="inpaint", model=ip, scheduler="pndm", prompt=p[1], steps=4, guidance_scale=7.5, strength=0.75,
        init_image=IJPG, mask_image=MH)

    # --- LCM (tiny-lcm: LCMScheduler from the folder) ---
    lcm = "onnx/tiny-lcm"
    add(mode="txt2img", model=lcm, prompt=p[0], steps=4, guidance_scale=8.0, width=64, height=64)
    add(mode="txt2img", model=lcm, prompt=p[1], steps=1, guidance_scale=8.0, width=64, height=64)
    add(mode="txt2img", model=lcm, prompt=p[2], steps=4, guidance_scale=1.5, width=96, height=64, num_images=2)
    add(model=lcm, prompt=p[0], steps=4, guidance_scale=8.0, strength=0.6, init_image=I64)
    add(model=lcm, prompt=p[3], steps=2, guidance_scale=8.0, strength=0.8, init_image=I96, num_images=2)

    # --- Turbo (tiny-turbo: EulerAncestral trailing from the folder), guidance 0 ---
    tb = "onnx/tiny-turbo"
    add(mode="txt2img", model=tb, prompt=p[0], steps=1, guidance_scale=0.0, width=64, height=64)
    add(mode="txt2img", model=tb, prompt=p[1], steps=4, guidance_scale=0.0, width=64, height=64)
    add(mode="txt2img", model=tb, prompt=p[2], steps=1, guidance_scale=0.0, width=96, height=64, num_images=2)
    add(model=tb, prompt=p[3], steps=2, guidance_scale=0.0, strength=0.5, init_image=I64)

    # --- '!' prompts, txt2img, with and without tokenizer.json (own scheduler of the folder) ---
    for model, g in (("onnx/tiny-sd2-v", 7.5), ("onnx/tiny-sdxl", 5.0)):
        for strip in (False, True):
            add(mode="txt2img", model=model, prompt=BANG_PROMPT, steps=4, guidance_scale=g, width=64, height=64,
                strip_tokenizer_json=strip)
            if strip:  # same seed as the twin so that the outputs must be identical
                cases[-1]["seed"] = cases[-2]["seed"]

    for c in cases:
        short = c["model"].split("/")[-1].replace("tiny-", "")
        size = f"{c['width']}x{c['height']}" if c["mode"] == "txt2img" else Path(c["init_image"]).stem.replace("init-", "")
        c["id"] = (
            f"{c['mode']}-{short}-{c['scheduler'] or 'default'}-s{c['steps']}"
            + (f"-st{c['strength']:g}" if c["strength"] is not None else "")
            + f"-g{c['guidance_scale']:g}-{size}"
            + (f"-{Path(c['mask_image']).stem.replace('mask-', 'm')}" if c["mask_image"] else "")
            + f"-n{c['num_images']}"
            + ("-notokjson" if c["strip_tokenizer_json"] else "")
            + f"-{c['seed']}"
        )
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def pipeline_class(mode: str, model_dir: Path):
    from optimum.onnxruntime import (
        ORTDiffusionPipeline,
        ORTLatentConsistencyModelImg2ImgPipeline,
        ORTStableDiffusionImg2ImgPipeline,
        ORTStableDiffusionInpaintPipeline,
        ORTStableDiffusionXLImg2ImgPipeline,
    )

    cls_name = json.loads((model_dir / "model_index.json").read_text())["_class_name"]
    if mode == "txt2img":
        return ORTDiffusionPipeline  # picks the class from model_index.json
    table = {
        ("img2img", "StableDiffusionPipeline"): ORTStableDiffusionImg2ImgPipeline,
        ("img2img", "StableDiffusionXLPipeline"): ORTStableDiffusionXLImg2ImgPipeline,
        ("img2img", "LatentConsistencyModelPipeline"): ORTLatentConsistencyModelImg2ImgPipeline,
        ("inpaint", "StableDiffusionPipeline"): ORTStableDiffusionInpaintPipeline,
        ("inpaint", "StableDiffusionInpaintPipeline"): ORTStableDiffusionInpaintPipeline,
    }
    return table[(mode, cls_name)]


def load_pipeline(cls, model_dir: Path):
    return load_ort_pipeline(cls, model_dir)


def guidance_embedding(g: float, n: int, dim: int):
    """LCM's get_guidance_scale_embedding, re-typed from the diffusers source (torch float32)."""
    import torch

    w = torch.tensor(g - 1).repeat(n)
    w = w * 1000.0
    half = dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half - 1)
    emb = torch.exp(torch.arange(half, dtype=torch.float32) * -emb)
    emb = w.to(torch.float32)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return emb.numpy()


def vae_sample(params: np.ndarray, gen, scaling_factor: float):
    """The documented VAE-encoder sampling rule (ORT latent_parameters -> scaled latents)."""
    import torch

    p = torch.from_numpy(params)
    mean, logvar = torch.chunk(p, 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn(mean.shape, generator=gen, dtype=torch.float32)
    return scaling_factor * (mean + std * eps)


def fresh_timesteps(pipe, case):
    """A fresh copy of the case's scheduler with the pipeline's timestep truncation applied."""
    import torch

    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    steps, strength = case["steps"], case["strength"]
    if type(sched).__name__ == "LCMScheduler":
        sched.set_timesteps(steps, strength=strength if strength is not None else 1.0)
        return sched, sched.timesteps
    sched.set_timesteps(steps)
    if strength is None:
        return sched, sched.timesteps
    init_t = min(int(steps * strength), steps)
    t_start = max(steps - init_t, 0)
    ts = sched.timesteps[t_start * sched.order :]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    del torch
    return sched, ts


def check_initial_latents(pipe, case, captured, vae_rec, ref_images) -> list[dict]:
    """Re-derive the initial latents from the recorded VAE-encoder outputs and a fresh generator with
    the documented draw order; assert bit equality. Returns the list of generator draws."""
    import torch

    n = case["num_images"]
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    sf = float(pipe.vae.config.scaling_factor)
    lat = captured["latents"]
    shape = (n, 4) + tuple(lat.shape[2:])
    draws = []
    sched, ts = fresh_timesteps(pipe, case)
    sigma = torch.as_tensor(pipe.scheduler.init_noise_sigma, dtype=torch.float32)
    mode = case["mode"]
    n_vae = len(vae_rec.calls) if vae_rec else 0

    def encode(k, what):
        params = vae_rec.outputs[k][0]
        z = vae_sample(params, gen, sf)
        draws.append({"draw": what, "shape": list(z.shape)})
        return z

    if mode == "txt2img":
        expect = torch.randn(shape, generator=gen, dtype=torch.float32) * sigma
        draws.append({"draw": "initial noise (latents = noise * init_noise_sigma)", "shape": list(shape)})
        assert n_vae == 0
    elif mode == "img2img":
        assert n_vae == 1, n_vae
        np.testing.assert_array_equal(vae_rec.calls[0]["sample"], ref_images["init"])
        z = encode(0, "VAE encoder eps of the init image")
        z = torch.cat([z] * n, dim=0) if n > 1 else z
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        draws.append({"draw": "noise (latents = scheduler.add_noise(init_latents, noise, timesteps[0]))",
                      "shape": list(shape)})
        expect = sched.add_noise(z, noise, ts[:1].repeat(n))
        captured["image_latents"] = z[:1].numpy()
    else:  # inpaint
        nine = pipe.unet.config.in_channels == 9
        strength_max = case["strength"] == 1.0
        k = 0
        z = None
        if not nine or not strength_max:
            np.testing.assert_array_equal(vae_rec.calls[k]["sample"], ref_images["init"])
            z = encode(k, "VAE encoder eps of the init image")
            k += 1
            z = z.repeat(n, 1, 1, 1)
            captured["image_latents"] = z[:1].numpy()
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if strength_max:
            expect = noise * sigma
            draws.append({"draw": "noise (latents = noise * init_noise_sigma)", "shape": list(shape)})
        else:
            expect = sched.add_noise(z, noise, ts[:1].repeat(n))
            draws.append({"draw": "noise (latents = scheduler.add_noise(image_latents, noise, timesteps[0]))",
                          "shape": list(shape)})
        masked = ref_images["init"] * (ref_images["mask"] < 0.5)
        np.testing.assert_array_equal(vae_rec.calls[k]["sample"], masked)
        zm = encode(k, "VAE encoder eps of the masked image" + ("" if nine else " (result unused by a 4-channel UNet)"))
        k += 1
        assert n_vae == k, (n_vae, k)
        np.testing.assert_array_equal(captured["masked_image_latents"][:1], zm.numpy())
        m8 = ref_images["mask"][:, :, ::8, ::8]
        np.testing.assert_array_equal(captured["mask_latents"][:1], m8)
    np.testing.assert_array_equal(expect.numpy(), lat)
    return draws


def run_case(pipe, base_cfg: dict, case: dict, edit_root: Path, out_dir: Path) -> dict:
    import diffusers
    import torch

    if case["scheduler"] is None:
        cls_name, extra = base_cfg["_class_name"], {}
    else:
        cls_name, extra = SCHEDULERS[case["scheduler"]]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(base_cfg, **extra)

    recs = {"unet": Recorder(pipe.unet.session), "text_encoder": Recorder(pipe.text_encoder.session)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        recs["text_encoder_2"] = Recorder(pipe.text_encoder_2.session)
    vae_rec = Recorder(pipe.vae_encoder.session) if getattr(pipe, "vae_encoder", None) is not None else None
    captured = {}
    orig_prepare = pipe.prepare_latents

    def prepare_latents(*a, **kw):
        out = orig_prepare(*a, **kw)
        lat = out[0] if isinstance(out, tuple) else out
        captured["latents"] = lat.detach().clone().numpy()
        return out

    pipe.prepare_latents = prepare_latents
    orig_mask = getattr(pipe, "prepare_mask_latents", None)
    if case["mode"] == "inpaint":
        def prepare_mask_latents(*a, **kw):
            mask, mil = orig_mask(*a, **kw)
            captured["mask_latents"] = mask.detach().clone().numpy()
            captured["masked_image_latents"] = mil.detach().clone().numpy()
            return mask, mil

        pipe.prepare_mask_latents = prepare_mask_latents

    from PIL import Image

    n = case["num_images"]
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    kwargs = dict(
        prompt=case["prompt"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance_scale"],
        num_images_per_prompt=n,
        generator=gen,
        output_type="np",
    )
    is_lcm = "LatentConsistency" in type(pipe).__name__
    if not is_lcm:
        kwargs["negative_prompt"] = case["negative_prompt"]
    else:
        assert case["negative_prompt"] is None
    ref_images = {}
    if case["mode"] == "txt2img":
        kwargs.update(width=case["width"], height=case["height"])
    else:
        init = Image.open(edit_root / case["init_image"]).convert("RGB")
        kwargs.update(image=init, strength=case["strength"])
        ref_images["init"] = preprocess_reference(edit_root / case["init_image"])
        if case["mode"] == "inpaint":
            h, w = ref_images["init"].shape[2:]
            kwargs.update(mask_image=Image.open(edit_root / case["mask_image"]).convert("L"), width=w, height=h)
            ref_images["mask"] = mask_reference(edit_root / case["mask_image"], w, h)
    try:
        images = pipe(**kwargs).images
    finally:
        pipe.prepare_latents = orig_prepare
        if case["mode"] == "inpaint":
            pipe.prepare_mask_latents = orig_mask
        for r in recs.values():
            r.restore()
        if vae_rec:
            vae_rec.restore()
    if not np.isfinite(images).all():
        raise FloatingPointError("non-finite image")

    draws = check_initial_latents(pipe, case, captured, vae_rec, ref_images)
    unet_calls = recs["unet"].calls
    if is_lcm:
        emb = guidance_embedding(case["guidance_scale"], n, pipe.unet.config.time_cond_proj_dim)
        for c in unet_calls:
            np.testing.assert_array_equal(c["timestep_cond"], emb)

    out_dir.mkdir(parents=True, exist_ok=True)
    rel = out_dir.name
    extra_files = {}
    np.save(out_dir / "latents.npy", captured["latents"].astype(np.float32))
    for key in ("image_latents", "mask_latents", "masked_image_latents"):
        if key in captured:
            np.save(out_dir / f"{key}.npy", captured[key].astype(np.float32))
            extra_files[key] = f"{rel}/{key}.npy"
    if is_lcm:
        np.save(out_dir / "timestep_cond.npy", unet_calls[0]["timestep_cond"])
        extra_files["timestep_cond"] = f"{rel}/timestep_cond.npy"
    img_files, png_files = save_images(out_dir, images, pipe.numpy_to_pil(images))

    rec = {
        k: case[k]
        for k in (
            "id", "mode", "model", "strip_tokenizer_json", "prompt", "negative_prompt", "scheduler", "steps",
            "guidance_scale", "strength", "width", "height", "num_images", "seed",
        )
    }
    rec["rng"] = "torch"
    rec["init_image"] = case["init_image"]
    rec["mask_image"] = case["mask_image"]
    rec.update(
        images=img_files,
        pngs=png_files,
        image_shape=list(images.shape[1:]),
        latents=f"{rel}/latents.npy",
        latents_shape=list(captured["latents"].shape),
        extra_arrays=extra_files,
        unet_timesteps=[float(c["timestep"]) for c in unet_calls],
        unet_calls=len(unet_calls),
        unet_batch=int(unet_calls[0]["sample"].shape[0]),
        unet_sample_channels=int(unet_calls[0]["sample"].shape[1]),
        vae_encoder_calls=len(vae_rec.calls) if vae_rec else 0,
        generator_draws=draws + [{"draw": "then the scheduler's step noise, if any, in step order"}],
        init_noise_sigma=float(torch.as_tensor(pipe.scheduler.init_noise_sigma, dtype=torch.float32)),
        scheduler_timesteps=[float(t) for t in pipe.scheduler.timesteps],
        pipeline_class=type(pipe).__name__,
        scheduler_class=cls_name,
        scheduler_extra=extra,
    )
    if "time_ids" in unet_calls[0]:
        rec["unet_time_ids"] = unet_calls[0]["time_ids"].tolist()
    if case["prompt"] == BANG_PROMPT:
        rec["text_encoder_input_ids"] = {
            name: r.calls[0]["input_ids"][-1].tolist() for name, r in recs.items() if name != "unet"
        }
    return rec


# ---------------------------------------------------------------------------------------------


def make_edit_goldens(out: Path, repo_root: Path, only: list[str] | None = None) -> None:
    import onnxruntime
    import optimum.onnxruntime  # noqa: F401
    import torch
    from importlib.metadata import version

    torch.set_num_threads(1)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    inputs_desc = make_inputs(out / "inputs")
    inputs_info = {}
    for name, what in inputs_desc.items():
        p = out / "inputs" / name
        info = {"what": what, "sha256": sha256(p)}
        if name.startswith("init-") and "decoded" not in name:
            arr = preprocess_reference(p)
            stem = name.rsplit(".", 1)[0] + ("-jpg" if name.endswith(".jpg") else "")
            np.save(out / "inputs" / f"{stem}.preprocessed.npy", arr)
            info["preprocessed"] = f"inputs/{stem}.preprocessed.npy"
            info["preprocessed_shape"] = list(arr.shape)
        inputs_info[name] = info

    plan = case_plan()
    if only:
        plan = [c for c in plan if c["id"] in only]
    records, failures = [], []
    cache = {}
    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-edit-"))
    outputs_by_id = {}
    try:
        for case in plan:
            model_dir = repo_root / case["model"]
            key = (case["model"], case["mode"], case["strip_tokenizer_json"])
            if key not in cache:
                cache.clear()
                if case["strip_tokenizer_json"]:
                    d = tmp / (Path(case["model"]).name + "-notokjson")
                    if not d.exists():
                        shutil.copytree(model_dir, d)
                        for t in sorted(d.glob("tokenizer*/tokenizer.json")):
                            t.unlink()
                    model_dir = d
                pipe = load_pipeline(pipeline_class(case["mode"], repo_root / case["model"]), model_dir)
                cache[key] = (pipe, dict(pipe.scheduler.config))
            pipe, base_cfg = cache[key]
            try:
                rec = run_case(pipe, base_cfg, case, out, out / case["id"])
            except Exception as e:  # diffusers refused this combination
                fail = {k: case[k] for k in ("id", "mode", "model", "scheduler", "steps", "strength", "guidance_scale")}
                fail["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                if case["strength"] is not None and int(case["steps"] * case["strength"]) == 0:
                    fail["why"] = (
                        "int(steps * strength) = 0: no denoising step. diffusers' img2img does not check this: the "
                        "empty timestep list makes add_noise return a batch-0 latent, the UNet never runs and the "
                        "VAE decoder fails on the empty batch (inpaint raises ValueError up front instead)"
                    )
                failures.append(fail)
                print(f"FAIL {case['id']}: {type(e).__name__}: {e}", flush=True)
                if (out / case["id"]).exists():
                    shutil.rmtree(out / case["id"])
                if isinstance(e, AssertionError):
                    raise
                continue
            records.append(rec)
            outputs_by_id[case["id"]] = [np.load(out / f) for f in rec["images"]]
            print(f"ok   {case['id']}  unet calls={rec['unet_calls']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # with / without tokenizer.json must agree exactly on the Python side
    for r in records:
        if r["strip_tokenizer_json"]:
            twin = [
                t for t in records
                if not t["strip_tokenizer_json"] and t["model"] == r["model"] and t["prompt"] == r["prompt"]
                and t["seed"] == r["seed"]
            ]
            if twin:
                for a, b in zip(outputs_by_id[r["id"]], outputs_by_id[twin[0]["id"]]):
                    assert np.array_equal(a, b), r["id"]
                assert r["text_encoder_input_ids"] == twin[0]["text_encoder_input_ids"]
                r["same_output_as"] = twin[0]["id"]

    manifest = {
        "description": "Reference outputs of Optimum's ORT img2img / inpaint / LCM / Turbo pipelines (diffusers) for "
        "the tiny fixtures in onnx/. Generated by onnx/make_edit_references.py (its docstring has the full rules). "
        "File paths are relative to this folder, model paths to the repository root.",
        "versions": {
            p: version(p)
            for p in ["torch", "diffusers", "transformers", "optimum-onnx", "onnx", "onnxruntime", "numpy", "pillow"]
        },
        "session_options": SESSION_OPTIONS,
        "fields": {
            "mode": "txt2img | img2img | inpaint",
            "model": "fixture folder, relative to the repository root",
            "strip_tokenizer_json": "true: the case ran on a copy of the model folder with tokenizer*/tokenizer.json "
            "deleted (everything else identical)",
            "scheduler": "diffusiond scheduler name (onnx/scheduler_names.py) or null = the folder's "
            "scheduler_config.json unchanged",
            "strength": "null for txt2img",
            "width/height": "txt2img only (null otherwise: img2img uses the init image size rounded down to a "
            "multiple of 8; inpaint passes height/width = that same size explicitly)",
            "init_image/mask_image": "paths relative to this folder, or null",
            "images": "float32 HxWx3 in [0,1] (output_type='np'); pngs: (x*255).round() uint8",
            "latents": "float32 NCHW, the output of pipeline.prepare_latents (for img2img: add_noise(init_latents, "
            "noise, t0); inpaint: the same or noise*init_noise_sigma at strength 1; txt2img: noise*init_noise_sigma)",
            "extra_arrays": "image_latents: scaling_factor * VAE sample of the init image (batch 1); mask_latents / "
            "masked_image_latents: as returned by prepare_mask_latents (repeated to num_images, doubled when CFG); "
            "timestep_cond: LCM guidance embedding fed to the UNet",
            "unet_timesteps": "value of the UNet 'timestep' input (float32 scalar) at every UNet call",
            "scheduler_timesteps": "pipeline.scheduler.timesteps after the run (full schedule, before the "
            "strength truncation)",
            "generator_draws": "the order of torch.randn draws from the single generator before the denoising loop",
            "unet_time_ids": "SDXL: time_ids input [orig_h, orig_w, crop_top, crop_left, target_h, target_w] "
            "(uncond row first when CFG)",
            "text_encoder_input_ids": "'!' cases: ids fed to each text encoder for the prompt (last row = prompt)",
        },
        "rules": {
            "rng": "generator=torch.Generator('cpu').manual_seed(seed) passed to the pipeline; no latents passed.",
            "init_image": "PIL.Image.open(path).convert('RGB') (RGBA: alpha dropped, no compositing)",
            "mask_image": "PIL.Image.open(path).convert('L')",
            "image_preprocess": "w,h = image size rounded down to a multiple of 8; PIL resize((w,h), LANCZOS, "
            "reducing_gap=None) (a no-op copy when the size already matches); float32 /255; NCHW; 2x-1",
            "mask_preprocess": "same resize; convert('L'); /255 float32; v<0.5 -> 0, v>=0.5 -> 1 (binary); "
            "masked_image = image * (mask < 0.5); mask latents = nearest interpolate to (h/8,w/8) = mask[8i, 8j]",
            "vae_encode": "ORT vae_encoder latent_parameters (N,8,h,w): mean=[:, :4], logvar=clamp([:, 4:], -30, 20), "
            "std=exp(0.5*logvar), eps=torch.randn(mean.shape, generator, float32), latents = scaling_factor * "
            "(mean + std*eps); encoded with batch 1, repeated to num_images afterwards",
            "get_timesteps": "set_timesteps(steps); init=min(int(steps*strength), steps); t_start=max(steps-init,0); "
            "timesteps = timesteps[t_start*order:]; set_begin_index(t_start*order); latent_timestep = timesteps[0] "
            "(LCM img2img: set_timesteps(steps, strength=strength) instead, no truncation)",
            "draw_order": {
                "img2img (SD, SDXL, LCM, Turbo)": "VAE eps (1,4,h,w); noise (n,4,h,w); step noise",
                "inpaint 9ch strength 1": "noise (latents = noise*init_noise_sigma); masked-image VAE eps; step noise",
                "inpaint 9ch strength < 1": "init-image VAE eps; noise (add_noise); masked-image VAE eps; step noise",
                "inpaint 4ch": "init-image VAE eps; noise (noise*init_noise_sigma at strength 1, else add_noise); "
                "masked-image VAE eps (unused); step noise",
                "txt2img": "noise (latents = noise*init_noise_sigma); step noise",
            },
            "inpaint_4ch_blend": "after each scheduler step i: proper = image_latents if i == last else "
            "scheduler.add_noise(image_latents, noise, tensor([timesteps[i+1]])); latents = (1 - mask_latent) * "
            "proper + mask_latent * latents (mask_latent: the first n rows of the mask latents)",
            "inpaint_9ch_unet_input": "cat([scale_model_input(latents x2 if CFG), mask_latents, "
            "masked_image_latents], dim=1)",
            "lcm": "no CFG batch; negative prompt unsupported; timestep_cond = [sin(w*f), cos(w*f)] with "
            "w=(guidance_scale-1)*1000, f=exp(arange(d/2)*-(ln(10000)/(d/2-1))) in float32; the last step's "
            "denoised x0 is decoded",
            "turbo": "guidance_scale 0 -> no CFG; EulerAncestral trailing (1 step -> t=999); init_noise_sigma = "
            "sigma_max for trailing/linspace spacing (sqrt(sigma_max^2+1) otherwise)",
            "cfg": "classifier-free guidance iff guidance_scale > 1 (UNet batch 2n, [uncond; cond])",
            "sdxl_img2img": "requires_aesthetics_score false: time_ids = (h, w, 0, 0, h, w) of the preprocessed image "
            "for both rows; force_zeros_for_empty_prompt: negative_prompt null -> zero negative embeddings",
        },
        "inputs": inputs_info,
        "cases": records,
        "expected_failures": failures,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    counts = {}
    for r in records:
        counts[r["mode"]] = counts.get(r["mode"], 0) + 1
    print(f"{len(records)} cases {counts}, {len(failures)} expected failures")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", type=Path, default=REPO / "tests" / "golden", help="writes <out-root>/edit")
    ap.add_argument("--repo-root", type=Path, default=REPO, help="where to find onnx/<fixture>")
    ap.add_argument("--only", default=None, help="comma list of case ids (debugging; the manifest then has only those)")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s] if args.only else None
    make_edit_goldens(args.out_root / "edit", args.repo_root.resolve(), only)


if __name__ == "__main__":
    sys.exit(main())
