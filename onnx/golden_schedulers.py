"""Golden vectors for diffusiond's Rust schedulers, produced with diffusers 0.39.0.

Run with the reference interpreter from the repository root:

    /work/venv/ref/bin/python onnx/golden_schedulers.py

Writes tests/golden/schedulers/:

* ``x0.npy``        float32 (1,4,8,8): the initial sample (numpy RandomState(0)).
* ``c.npy``         float32 (64,1,4,8,8): per-UNet-call offsets c_i (RandomState(1), * 0.5).
  The fake model is ``model_output = 0.1 * scaled_input + c_i`` (float32, no FMA).
* ``refusals.json`` for the base config: which step counts set_timesteps refuses.
* ``common.json``   betas / alphas_cumprod for each beta schedule (float32 values).
* ``<config>/scheduler_config.json``: the config every scheduler is built from with
  ``Class.from_config(config, **extra)``.
* ``<config>/<name>_<steps>.json``: timesteps (as passed to the UNet, with dtype),
  sigmas (where the scheduler has them), init_noise_sigma, number of UNet calls, the
  UNet-call index of every noise draw, or ``error`` when diffusers refuses.
* ``<config>/<name>_<steps>_scaled.npy`` (calls,1,4,8,8): scale_model_input output per call
  (absent when ``scaled_is_input``: scale_model_input returned its input unchanged).
* ``<config>/<name>_<steps>_prev.npy``   (calls,1,4,8,8): prev_sample after every step call.
* ``<config>/<name>_<steps>_noise.npy``  (draws,1,4,8,8): every randn_tensor the scheduler
  drew from ``torch.Generator("cpu").manual_seed(7)``, in order (stochastic schedulers only).

Everything is deterministic: fixed seeds, sorted JSON, no timestamps, no absolute paths.
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "schedulers"
SHAPE = (1, 4, 8, 8)
MAX_CALLS = 64

# diffusiond name -> (class, extra from_config kwargs)
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}

# The SD1.5 scheduler config as published (runwayml/stable-diffusion-v1-5).
SD15_MINIMAL = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def base_config() -> dict:
    """SD1.5's config as PNDMScheduler.save_pretrained writes it (all PNDM keys)."""
    import tempfile

    sched = PNDMScheduler.from_config(SD15_MINIMAL)
    with tempfile.TemporaryDirectory() as d:
        sched.save_pretrained(d)
        cfg = json.loads((Path(d) / "scheduler_config.json").read_text())
    # clip_sample is not a PNDM key but SD1.5 ships it; keep it so DDIM/DDPM read it.
    cfg["clip_sample"] = False
    return cfg


def configs() -> dict[str, tuple[dict, list[int]]]:
    base = base_config()
    return {
        # name -> (config, step counts[, only these schedulers])
        "base": (base, [1, 4, 13, 20]),
        "vpred": ({**base, "prediction_type": "v_prediction"}, [4, 13]),
        "trailing": ({**base, "timestep_spacing": "trailing"}, [1, 4, 13]),
        "linspace": ({**base, "timestep_spacing": "linspace"}, [4, 13]),
        # Only what old model repos ship: every class falls back to its own defaults
        # (DDIM/DDPM clip_sample=True, Euler linspace, ...).
        "minimal": (
            {
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "beta_start": 0.00085,
                "num_train_timesteps": 1000,
                "steps_offset": 1,
            },
            [4, 13],
        ),
        # PNDM with its Runge-Kutta warm-up (diffusers' PNDM default).
        "prk": ({**base, "skip_prk_steps": False}, [1, 4, 13], ["pndm"]),
        # Karras / exponential sigma spacing for the Euler family.
        "karras": ({**base, "use_karras_sigmas": True}, [4, 13], ["euler", "heun", "lms"]),
        "exponential": ({**base, "use_exponential_sigmas": True}, [4], ["euler", "heun", "lms"]),
        # Dynamic thresholding of x0 (Imagen); sample_max_value > 1 so it differs from clipping.
        "threshold": (
            {**base, "thresholding": True, "sample_max_value": 1.5},
            [4, 13],
            ["ddim", "ddpm", "lcm"],
        ),
        # SD 2.x-style zero terminal SNR with v-prediction and trailing spacing.
        "zero_snr": (
            {
                **base,
                "rescale_betas_zero_snr": True,
                "prediction_type": "v_prediction",
                "timestep_spacing": "trailing",
            },
            [4, 13],
            ["ddim", "ddpm", "lcm"],
        ),
    }


class NoiseRecorder:
    """Wraps every scheduler module's randn_tensor and records what it returns."""

    def __init__(self) -> None:
        self.draws: list[np.ndarray] = []
        self.draw_calls: list[int] = []
        self.call = -1
        self._patched: list[tuple[object, object]] = []

    def __enter__(self) -> "NoiseRecorder":
        for mod in list(sys.modules.values()):
            name = getattr(mod, "__name__", "")
            if name.startswith("diffusers.schedulers.") and hasattr(mod, "randn_tensor"):
                orig = mod.randn_tensor

                def wrapped(*args, __orig=orig, **kwargs):
                    t = __orig(*args, **kwargs)
                    self.draws.append(t.detach().cpu().numpy().astype(np.float32).copy())
                    self.draw_calls.append(self.call)
                    return t

                self._patched.append((mod, orig))
                mod.randn_tensor = wrapped
        return self

    def __exit__(self, *exc) -> None:
        for mod, orig in self._patched:
            mod.randn_tensor = orig


def to_float(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.item())
    return float(x)


def run_case(cls: type, extra: dict, cfg: dict, steps: int, x0: np.ndarray, c: np.ndarray):
    """Runs the full fixed trajectory; returns (meta, scaled, prev, noise)."""
    sched = cls.from_config(cfg, **extra)
    meta: dict = {"class": cls.__name__, "extra": extra, "steps": steps}
    try:
        sched.set_timesteps(steps)
    except Exception as e:  # diffusers refuses this step count
        meta["error"] = {"stage": "set_timesteps", "type": type(e).__name__, "message": str(e)}
        return meta, None, None, None
    ts = sched.timesteps
    meta["timesteps"] = [float(t) for t in ts.tolist()]
    meta["timesteps_dtype"] = str(ts.dtype).replace("torch.", "")
    sigmas = getattr(sched, "sigmas", None)
    if sigmas is not None:
        meta["sigmas"] = [float(s) for s in torch.as_tensor(sigmas).tolist()]
        meta["sigmas_dtype"] = str(torch.as_tensor(sigmas).dtype).replace("torch.", "")
    meta["init_noise_sigma"] = to_float(sched.init_noise_sigma)
    meta["calls"] = len(ts)

    gen = torch.Generator("cpu").manual_seed(7)
    # As StableDiffusionPipeline.prepare_extra_step_kwargs: only pass what step() accepts.
    step_params = set(inspect.signature(sched.step).parameters)
    step_kwargs = {"generator": gen} if "generator" in step_params else {}
    if "eta" in step_params:
        step_kwargs["eta"] = 0.0
    meta["stochastic"] = "generator" in step_params
    sample = torch.from_numpy(x0.copy()) * sched.init_noise_sigma
    meta["initial_sample_scaled"] = True
    scaled_out, prev_out = [], []
    identity = True
    with NoiseRecorder() as rec:
        try:
            for i, t in enumerate(ts):
                rec.call = i
                scaled = sched.scale_model_input(sample, t)
                identity = identity and torch.equal(scaled, sample)
                scaled_out.append(scaled.numpy().astype(np.float32).copy())
                model_output = 0.1 * scaled + torch.from_numpy(c[i])
                sample = sched.step(model_output, t, sample, return_dict=False, **step_kwargs)[0]
                prev_out.append(sample.numpy().astype(np.float32).copy())
        except Exception as e:
            meta["error"] = {"stage": f"step {rec.call}", "type": type(e).__name__, "message": str(e)}
            return meta, None, None, None
    meta["noise_calls"] = rec.draw_calls
    # scale_model_input is the identity for this scheduler: the scaled inputs are the
    # previous samples, so they are not stored again.
    meta["scaled_is_input"] = identity
    noise = np.stack(rec.draws) if rec.draws else None
    scaled = None if identity else np.stack(scaled_out)
    return meta, scaled, np.stack(prev_out), noise


def f32_list(values) -> list[float]:
    """float32 values as the shortest decimals that round-trip through float32."""
    return [float(str(np.float32(v))) for v in values]


def common_json() -> dict:
    out = {}
    for sched_name in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
        s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=sched_name)
        out[sched_name] = {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "num_train_timesteps": 1000,
            "betas": f32_list(s.betas.tolist()),
            "alphas_cumprod": f32_list(s.alphas_cumprod.tolist()),
        }
    # np.log of the float32 training sigmas (numpy's own SIMD float32 log).
    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sig = np.array(((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5)
    out["numpy_log_f32"] = {
        "x": f32_list(sig.tolist()),
        "log": f32_list(np.log(sig).tolist()),
    }
    # rescale_betas_zero_snr on scaled_linear (as DDIM/Euler compute it)
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    out["scaled_linear_zero_snr"] = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "betas": f32_list(s.betas.tolist()),
        "alphas_cumprod": f32_list(s.alphas_cumprod.tolist()),
    }
    return out


def refusals(cfg: dict) -> dict:
    """Which step counts each scheduler's set_timesteps refuses (no trajectories)."""
    out = {}
    for name, (cls, extra) in SCHEDULERS.items():
        rows = {}
        for steps in [0, 2, 50, 51, 999, 1000, 1001]:
            sched = cls.from_config(cfg, **extra)
            try:
                sched.set_timesteps(steps)
                rows[str(steps)] = {"ok": True, "calls": len(sched.timesteps)}
            except Exception as e:
                rows[str(steps)] = {"ok": False, "type": type(e).__name__, "message": str(e)}
        out[name] = rows
    return out


def dump_json(obj, path: Path, indent: int | None = 1) -> None:
    path.write_text(json.dumps(obj, indent=indent, sort_keys=True) + "\n", encoding="utf-8")


def main() -> None:
    assert diffusers.__version__ == "0.39.0", diffusers.__version__
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    x0 = np.random.RandomState(0).randn(*SHAPE).astype(np.float32)
    c = (np.random.RandomState(1).randn(MAX_CALLS, *SHAPE) * 0.5).astype(np.float32)
    np.save(OUT / "x0.npy", x0)
    np.save(OUT / "c.npy", c)
    dump_json(common_json(), OUT / "common.json", indent=None)

    dump_json(refusals(configs()["base"][0]), OUT / "refusals.json")

    index = {"diffusers": diffusers.__version__, "torch": torch.__version__, "configs": {}}
    for cfg_name, (cfg, step_counts, *only) in configs().items():
        d = OUT / cfg_name
        d.mkdir()
        dump_json(cfg, d / "scheduler_config.json")
        cases = []
        for name, (cls, extra) in SCHEDULERS.items():
            if only and name not in only[0]:
                continue
            for steps in step_counts:
                meta, scaled, prev, noise = run_case(cls, extra, cfg, steps, x0, c)
                meta["name"] = name
                stem = f"{name}_{steps}"
                dump_json(meta, d / f"{stem}.json")
                if scaled is not None:
                    np.save(d / f"{stem}_scaled.npy", scaled)
                if prev is not None:
                    np.save(d / f"{stem}_prev.npy", prev)
                if noise is not None:
                    np.save(d / f"{stem}_noise.npy", noise)
                cases.append({"name": name, "steps": steps, "error": "error" in meta})
        index["configs"][cfg_name] = cases
    dump_json(index, OUT / "index.json")


if __name__ == "__main__":
    main()
