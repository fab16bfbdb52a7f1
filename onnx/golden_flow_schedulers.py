"""Golden vectors for diffusiond's flow-matching schedulers, produced with diffusers 0.39.0.

Run with the reference interpreter from the repository root:

    /work/venv/ref/bin/python onnx/golden_flow_schedulers.py

The model configs below are written from the public Hugging Face hub
``scheduler/scheduler_config.json`` files of each model (from memory, not downloaded):
SD3 medium and SD3.5 large use ``shift = 3.0``; FLUX.1-schnell turns dynamic shifting
off with ``shift = 1.0``; FLUX.1-dev turns it on (``base_shift 0.5``, ``max_shift 1.15``,
``base_image_seq_len 256``, ``max_image_seq_len 4096``). Further configs exercise the
options those models do not use (linear time shift, ``shift_terminal``,
``invert_sigmas``, Karras and exponential sigmas).

Every config is driven the way one pipeline drives it:

* ``sd3``: ``StableDiffusion3Pipeline`` / ``StableDiffusion3Img2ImgPipeline``: no
  explicit sigmas; ``mu = calculate_shift(image_seq_len, ...)`` only when the config has
  ``use_dynamic_shifting``, with ``image_seq_len = (h / 8 / 2) * (w / 8 / 2)``.
* ``flux``: ``FluxPipeline`` / ``FluxImg2ImgPipeline``: ``sigmas = np.linspace(1.0, 1 / n, n)``
  and ``mu = calculate_shift(image_seq_len, ...)`` always (the scheduler ignores it
  without dynamic shifting), ``image_seq_len = (h // 16) * (w // 16)``.

Writes tests/golden/schedulers/flow/:

* ``inputs.json``: ``x0`` (64 float32, the initial sample), ``noise`` (64 float32, the
  img2img noise) and ``c`` (64 x 64 float32: the fake model output of UNet call ``i`` is
  ``c[i]``), all from ``numpy.random.RandomState``.
* ``<config>.json``: ``class``, ``pipeline``, ``config`` (the scheduler_config.json) and
  ``cases``: per step count and image size the ``mu``, ``sigmas`` and ``timesteps`` after
  ``set_timesteps`` (float32 values), per img2img strength ``t_start``, ``begin_index``,
  the truncated ``timesteps`` and ``scale_noise(x0, timesteps[0], noise)``, and for a few
  step counts a trajectory: ``prev`` maps a step number to the sample after that step.
  A schedule diffusers computes as NaN (``shift_terminal`` with one step) is recorded as
  ``error``.
* ``heun-<config>.json``: the same for ``FlowMatchHeunDiscreteScheduler`` (which takes
  neither sigmas nor mu; driven as the ``sd3`` pipeline).

Everything is deterministic: fixed seeds, sorted JSON, no timestamps, no absolute paths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "schedulers" / "flow"
SHAPE = (1, 4, 4, 4)
MAX_CALLS = 64
STEPS = [1, 2, 4, 20, 28, 50]
SIZES = [256, 512, 1024]
STRENGTHS = [0.3, 0.6, 1.0]
TRAJECTORY_STEPS = [1, 4, 28]
SCALE_NOISE_STEPS = [4, 28]

FLUX_SHIFTING = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
}

# name -> (pipeline, scheduler_config.json)
CONFIGS: dict[str, tuple[str, dict]] = {
    "sd3-medium": ("sd3", {"num_train_timesteps": 1000, "shift": 3.0}),
    "sd35-large": ("sd3", {"num_train_timesteps": 1000, "shift": 3.0}),
    "flux-schnell": (
        "flux",
        {**FLUX_SHIFTING, "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
    ),
    "flux-dev": (
        "flux",
        {**FLUX_SHIFTING, "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    ),
    # Options the four models do not use.
    "sd3-dynamic": ("sd3", {**FLUX_SHIFTING, "shift": 3.0, "use_dynamic_shifting": True}),
    "flux-linear": (
        "flux",
        {**FLUX_SHIFTING, "use_dynamic_shifting": True, "time_shift_type": "linear"},
    ),
    "sd3-dynamic-linear": (
        "sd3",
        {**FLUX_SHIFTING, "use_dynamic_shifting": True, "time_shift_type": "linear"},
    ),
    "sd3-terminal": ("sd3", {"shift": 3.0, "shift_terminal": 0.02}),
    "flux-terminal": (
        "flux",
        {**FLUX_SHIFTING, "use_dynamic_shifting": True, "shift_terminal": 0.1},
    ),
    "sd3-invert": ("sd3", {"shift": 3.0, "invert_sigmas": True}),
    "sd3-karras": ("sd3", {"shift": 3.0, "use_karras_sigmas": True}),
    "flux-karras": ("flux", {**FLUX_SHIFTING, "use_dynamic_shifting": True, "use_karras_sigmas": True}),
    "sd3-exponential": ("sd3", {"shift": 3.0, "use_exponential_sigmas": True}),
    "flux-exponential": ("flux", {**FLUX_SHIFTING, "shift": 2.5, "use_exponential_sigmas": True}),
    "sd3-shift-odd": ("sd3", {"num_train_timesteps": 1000, "shift": 2.7}),
}

HEUN_CONFIGS: dict[str, dict] = {
    "sd3-medium": {"num_train_timesteps": 1000, "shift": 3.0},
    "shift-odd": {"num_train_timesteps": 1000, "shift": 1.7},
}


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """diffusers' ``pipeline_flux.calculate_shift`` (identical in the SD3 pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    mu = image_seq_len * m + b
    return mu


def floats(t) -> list[float]:
    return [float(v) for v in np.asarray(t, dtype=np.float32).reshape(-1)]


def get_timesteps(scheduler, num_inference_steps, strength):
    """``StableDiffusion3Img2ImgPipeline.get_timesteps`` (FLUX's is the same)."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    t_start = int(max(num_inference_steps - init_timestep, 0))
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, num_inference_steps - t_start, t_start


def configure(cls, pipeline: str, config: dict, steps: int, size: int | None):
    """A fresh scheduler with the pipeline's ``set_timesteps`` call applied; returns it and mu."""
    scheduler = cls.from_config(config)
    if cls is FlowMatchHeunDiscreteScheduler:
        scheduler.set_timesteps(steps)
        return scheduler, None
    cfg = scheduler.config
    mu = None
    if size is not None:
        seq = (size // 16) * (size // 16)
        mu = calculate_shift(
            seq,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
    if pipeline == "flux":
        sigmas = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    else:
        kwargs = {"mu": mu} if cfg.get("use_dynamic_shifting", None) else {}
        scheduler.set_timesteps(steps, **kwargs)
    return scheduler, mu


def trajectory(scheduler, timesteps, latents, c) -> dict[str, list[float]]:
    prev = {}
    for i, t in enumerate(timesteps):
        latents = scheduler.step(c[i], t, latents, return_dict=False)[0]
        prev[str(i)] = floats(latents)
    keep = set(prev) if len(prev) <= 4 else {"0", "1", str(len(prev) - 1)}
    return {k: v for k, v in prev.items() if k in keep}


def cases_for(cls, pipeline: str, config: dict, inputs) -> list[dict]:
    x0, noise, c = inputs
    dynamic = bool(config.get("use_dynamic_shifting", False))
    sizes = SIZES if (pipeline == "flux" or dynamic) and cls is not FlowMatchHeunDiscreteScheduler else [None]
    cases = []
    for steps in STEPS:
        for size in sizes:
            scheduler, mu = configure(cls, pipeline, config, steps, size)
            if torch.isnan(scheduler.sigmas).any():
                # shift_terminal stretches by 1 - sigma[-1], which is 0 for a one-step schedule.
                cases.append({"steps": steps, "size": size, "mu": mu, "error": "nan sigmas"})
                continue
            case = {
                "steps": steps,
                "size": size,
                "image_seq_len": None if size is None else (size // 16) ** 2,
                "mu": mu,
                "sigmas": floats(scheduler.sigmas),
                "timesteps": floats(scheduler.timesteps),
                "order": scheduler.order,
            }
            if steps in TRAJECTORY_STEPS:
                case["prev"] = trajectory(scheduler, scheduler.timesteps, x0.clone(), c)
            img2img = []
            for strength in STRENGTHS:
                scheduler, _ = configure(cls, pipeline, config, steps, size)
                timesteps, remaining, t_start = get_timesteps(scheduler, steps, strength)
                entry = {
                    "strength": strength,
                    "t_start": t_start,
                    "begin_index": t_start * scheduler.order,
                    "remaining_steps": remaining,
                    "timesteps": floats(timesteps),
                }
                if remaining >= 1 and steps in SCALE_NOISE_STEPS:
                    latent_timestep = timesteps[:1].repeat(1)
                    latents = scheduler.scale_noise(x0, latent_timestep, noise)
                    entry["scale_noise"] = floats(latents)
                    if strength == 0.6:
                        entry["prev"] = trajectory(scheduler, timesteps, latents, c)
                img2img.append(entry)
            case["img2img"] = img2img
            cases.append(case)
    return cases


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n")


def main() -> None:
    assert diffusers.__version__ == "0.39.0", diffusers.__version__
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    rs = np.random.RandomState(0)
    x0 = rs.standard_normal(SHAPE).astype(np.float32)
    noise = rs.standard_normal(SHAPE).astype(np.float32)
    c = (rs.standard_normal((MAX_CALLS, *SHAPE)) * 0.5).astype(np.float32)
    write_json(
        OUT / "inputs.json",
        {"x0": floats(x0), "noise": floats(noise), "c": [floats(ci) for ci in c]},
    )
    inputs = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(c))
    for name, (pipeline, config) in CONFIGS.items():
        full = {"_class_name": "FlowMatchEulerDiscreteScheduler", **config}
        write_json(
            OUT / f"{name}.json",
            {
                "class": "FlowMatchEulerDiscreteScheduler",
                "pipeline": pipeline,
                "config": full,
                "cases": cases_for(FlowMatchEulerDiscreteScheduler, pipeline, full, inputs),
            },
        )
    for name, config in HEUN_CONFIGS.items():
        full = {"_class_name": "FlowMatchHeunDiscreteScheduler", **config}
        write_json(
            OUT / f"heun-{name}.json",
            {
                "class": "FlowMatchHeunDiscreteScheduler",
                "pipeline": "sd3",
                "config": full,
                "cases": cases_for(FlowMatchHeunDiscreteScheduler, "sd3", full, inputs),
            },
        )
    print(f"wrote {len(list(OUT.iterdir()))} files to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
