#!/usr/bin/env python3
"""LoRA reference outputs ("goldens"): seeded random LoRA files and the images of the fused models.

Usage (from the repository root):
    onnx/.venv/bin/python onnx/make_lora_references.py                         # -> tests/golden/lora
    onnx/.venv/bin/python onnx/make_lora_references.py --out-root /tmp/a       # -> /tmp/a/lora
    onnx/.venv/bin/python onnx/make_lora_references.py --only sd15_kohya-s1

Writes <out-root>/lora/loras/<name>.safetensors (the LoRA files), <out-root>/lora/<case>/ (images)
and <out-root>/lora/manifest.json. Everything is deterministic: re-running writes identical files.

LoRA files (all tensors float32, written with safetensors, metadata {"format": "pt"}):
  * kohya / sd-scripts layout (sd15_kohya, sd2v_kohya, sdxl_kohya): per layer
        <prefix><module with "." replaced by "_">.lora_down.weight   [rank, in] or [rank, in, kh, kw]
        <prefix><module ...>.lora_up.weight                          [out, rank] or [out, rank, 1, 1]
        <prefix><module ...>.alpha                                   scalar float32
    prefixes: lora_unet_ (UNet), lora_te_ (text encoder of SD1.x/2.x), lora_te1_ / lora_te2_ (SDXL
    text_encoder / text_encoder_2). SD1.x/2.x UNet module names are diffusers' names
    (lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k); SDXL UNet names use the
    original SGM/LDM layout as sd-scripts writes them (input_blocks_N_1_..., middle_block_1_...,
    output_blocks_N_1_..., resnet convs in_layers_2 / out_layers_3 / skip_connection), mapped from the
    diffusers names with the UNet's own layers_per_block:
        down_blocks.b.{resnets,attentions}.l -> input_blocks_{1 + b*(lpb+1) + l}_{0,1}
        mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block_0 / _1 / _2
        up_blocks.b.{resnets,attentions}.l -> output_blocks_{b*(lpb+1) + l}_{0,1}
    which is the inverse of diffusers' _maybe_map_sgm_blocks_to_diffusers (checked below by loading).
    Conv layers ("LoCon"): down is a conv with the layer's kernel (3x3 or 1x1), up is a 1x1 conv.
  * diffusers / PEFT layout (sd15_peft): unet.<module>.lora_A.weight [rank, in(, kh, kw)],
    unet.<module>.lora_B.weight [out, rank(, 1, 1)], text_encoder.<module>.lora_A/B.weight; no alpha
    (alpha = rank).
  Every text encoder that has LoRA layers also has an out_proj layer: diffusers 0.39 picks the key
  conversion for kohya text-encoder keys by the presence of an out_proj key; without one it drops the
  q/k/v_proj layers with an "unexpected keys" warning (mlp layers still load). Each file uses one alpha
  for all its layers (diffusers turns differing alphas into a peft alpha_pattern).
  Values: lora_down ~ N(0, 1) / sqrt(fan_in), lora_up ~ N(0, 1) * gain / sqrt(rank) / (alpha / rank)
  (torch.Generator("cpu").manual_seed(file seed), drawn in the listed layer order, down then up), so
  each fused delta has entries of about gain / sqrt(fan_in), comparable to the random base weights.

Fusing rule (what diffusers 0.39 + peft 0.21 do, asserted numerically below for every layer):
    W' = W + scale * (alpha / rank) * up @ down           (Linear; float32)
    W' = W + scale * (alpha / rank) * conv(up, down)       (Conv: up[:, :, 0, 0] @ down.reshape(rank, -1),
                                                            reshaped to [out, in, kh, kw])
  Several LoRAs: fused one after the other (load_lora_weights, fuse_lora(lora_scale=s),
  unload_lora_weights), giving W + s1 * d1 + s2 * d2. Biases are never changed. Each load is checked:
  no diffusers/peft warning, and the set of changed parameters equals exactly the set of
  "<module>.weight" of the layers in the file.

References: the base torch pipeline of each fixture is rebuilt with build_fixtures.save_torch_pipeline
(seeded), its export is checked to be byte-identical to the committed onnx/<fixture> files (unet,
text encoders, VAE, scheduler config), then for each case the LoRA file(s) are fused into a reloaded
copy, saved with save_pretrained and exported with `optimum-cli export onnx --task text-to-image`
(tokenizer files and scheduler config added as build_fixtures.build_pipeline does). The fused export
runs in Optimum's ORTDiffusionPipeline with the session options of make_references.py
(CPUExecutionProvider, one intra/inter-op thread, sequential, no IO binding, fp32), the folder's own
scheduler (scheduler_config.json unchanged), generator = torch.Generator("cpu").manual_seed(seed), no
latents passed, output_type="np". base_mean_abs_diff is mean(|image - base image|) where the base image
is the same call on the committed fixture without LoRA.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from _env import REPO  # first: one CPU thread, offline Hub, no CUDA (see _env.py)

import numpy as np

import build_fixtures as bf
import fixture_lib as fl
from fixture_lib import SESSION_OPTIONS, Recorder
from make_references import load_pipeline

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"

# ---------------------------------------------------------------------------------------------
# LoRA file specs. Layers are diffusers module names relative to the component.
# ---------------------------------------------------------------------------------------------

_MID = "mid_block.attentions.0.transformer_blocks.0."
_D0 = "down_blocks.0.attentions.0.transformer_blocks.0."
_U10 = "up_blocks.1.attentions.0.transformer_blocks.0."
_U11 = "up_blocks.1.attentions.1.transformer_blocks.0."
_XD1 = "down_blocks.1.attentions.0.transformer_blocks.0."
_XU00 = "up_blocks.0.attentions.0.transformer_blocks.0."
_XU01 = "up_blocks.0.attentions.1.transformer_blocks.0."
_TE = "text_model.encoder.layers."

LORAS = {
    "sd15_kohya": dict(
        fixture="tiny-sd15",
        format="kohya",
        rank=4,
        alpha=2.0,
        gain=3.0,
        seed=7101,
        layers={
            "unet": [
                _MID + "attn2.to_k",  # 32 -> 64 (cross_attention_dim -> inner width)
                _MID + "attn2.to_v",  # 32 -> 64
                _MID + "attn2.to_q",
                _MID + "attn2.to_out.0",
                _MID + "attn1.to_q",
                _MID + "ff.net.0.proj",  # 64 -> 512
                _MID + "ff.net.2",  # 256 -> 64
                "mid_block.attentions.0.proj_out",  # Conv 1x1
                _D0 + "attn1.to_q",
                _D0 + "attn1.to_out.0",
                _D0 + "ff.net.0.proj",  # 32 -> 256
                "down_blocks.0.attentions.0.proj_in",  # Conv 1x1
                _U11 + "attn2.to_k",
                _U11 + "ff.net.2",  # 128 -> 32
                "down_blocks.1.resnets.0.conv1",  # Conv 3x3, 32 -> 64
                "up_blocks.0.resnets.0.conv_shortcut",  # Conv 1x1, 128 -> 64
            ],
            "text_encoder": [
                _TE + "0.self_attn.q_proj",
                _TE + "0.self_attn.out_proj",
                _TE + "0.mlp.fc1",  # 32 -> 64
                _TE + "0.mlp.fc2",  # 64 -> 32
                _TE + "1.self_attn.v_proj",
            ],
        },
    ),
    "sd15_peft": dict(
        fixture="tiny-sd15",
        format="peft",
        rank=4,
        alpha=None,
        gain=3.0,
        seed=7202,
        layers={
            "unet": [
                _U10 + "attn1.to_k",
                _U10 + "attn1.to_v",
                _U10 + "attn2.to_q",
                _U10 + "attn2.to_out.0",
                _U10 + "ff.net.2",  # 128 -> 32
                _MID + "attn2.to_k",  # 32 -> 64, also in sd15_kohya
                _MID + "attn1.to_v",
                "up_blocks.1.resnets.0.conv1",  # Conv 3x3, 96 -> 32
            ],
            "text_encoder": [
                _TE + "0.self_attn.k_proj",
                _TE + "1.mlp.fc1",  # 32 -> 64
                _TE + "1.self_attn.out_proj",
            ],
        },
    ),
    "sd2v_kohya": dict(
        fixture="tiny-sd2-v",
        format="kohya",
        rank=4,
        alpha=8.0,
        gain=3.0,
        seed=7303,
        layers={
            "unet": [
                "down_blocks.0.attentions.0.proj_in",  # Linear (use_linear_projection)
                "down_blocks.0.attentions.0.proj_out",
                _D0 + "attn2.to_k",  # 16 -> 32
                _D0 + "attn2.to_v",  # 16 -> 32
                _D0 + "attn1.to_q",
                _MID + "attn2.to_k",  # 16 -> 64
                _MID + "ff.net.0.proj",  # 64 -> 512
                _MID + "attn2.to_out.0",
                "mid_block.attentions.0.proj_in",
                _U10 + "attn1.to_out.0",
                _U10 + "ff.net.2",  # 128 -> 32
                "mid_block.resnets.0.conv1",  # Conv 3x3
            ],
            "text_encoder": [
                _TE + "0.mlp.fc1",  # 16 -> 32
                _TE + "1.self_attn.k_proj",
                _TE + "1.self_attn.out_proj",
                _TE + "1.mlp.fc2",  # 32 -> 16
            ],
        },
    ),
    "sdxl_kohya": dict(
        fixture="tiny-sdxl",
        format="kohya-sgm",
        rank=8,
        alpha=4.0,
        gain=4.0,
        seed=7404,
        layers={
            "unet": [
                _XD1 + "attn2.to_k",  # 48 -> 64
                _XD1 + "attn1.to_q",
                "down_blocks.1.attentions.0.proj_in",
                "down_blocks.1.resnets.0.conv1",  # Conv 3x3, 32 -> 64
                _MID + "attn2.to_v",  # 48 -> 64
                _MID + "ff.net.0.proj",  # 64 -> 512
                "mid_block.attentions.0.proj_out",
                _XU00 + "attn1.to_out.0",
                _XU00 + "ff.net.2",  # 256 -> 64
                _XU01 + "attn2.to_k",  # 48 -> 64
                "up_blocks.0.resnets.0.conv_shortcut",  # Conv 1x1, 128 -> 64
            ],
            "text_encoder": [
                _TE + "0.self_attn.q_proj",
                _TE + "0.mlp.fc1",  # 16 -> 32
                _TE + "1.self_attn.out_proj",
            ],
            "text_encoder_2": [
                _TE + "0.self_attn.out_proj",
                _TE + "1.mlp.fc2",  # 64 -> 32
                _TE + "1.self_attn.v_proj",
            ],
        },
    ),
}

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
KOHYA_PREFIX_XL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def case_plan() -> list[dict]:
    def case(cid, loras, seed, model):
        return dict(
            id=cid,
            model=f"onnx/{model}",
            loras=[{"file": f"loras/{n}.safetensors", "name": n, "scale": s} for n, s in loras],
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            steps=4,
            guidance_scale=7.5,
            scheduler=None,
            seed=seed,
            rng="torch",
            width=64,
            height=64,
            num_images=1,
        )

    return [
        case("sd15_kohya-s0.5", [("sd15_kohya", 0.5)], 8001, "tiny-sd15"),
        case("sd15_kohya-s1", [("sd15_kohya", 1.0)], 8001, "tiny-sd15"),
        case("sd15_kohya-s-1", [("sd15_kohya", -1.0)], 8001, "tiny-sd15"),
        case("sd15_peft-s1", [("sd15_peft", 1.0)], 8002, "tiny-sd15"),
        case("sd15_kohya-s0.8__sd15_peft-s0.6", [("sd15_kohya", 0.8), ("sd15_peft", 0.6)], 8003, "tiny-sd15"),
        case("sd2v_kohya-s1", [("sd2v_kohya", 1.0)], 8004, "tiny-sd2-v"),
        case("sdxl_kohya-s1", [("sdxl_kohya", 1.0)], 8005, "tiny-sdxl"),
        case("sdxl_kohya-s0.7", [("sdxl_kohya", 0.7)], 8005, "tiny-sdxl"),
    ]


# ---------------------------------------------------------------------------------------------
# LoRA files
# ---------------------------------------------------------------------------------------------

_SGM_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "conv_shortcut": "skip_connection",
               "time_emb_proj": "emb_layers_1"}


def sgm_name(module: str, layers_per_block: int) -> str:
    """diffusers UNet module name -> sd-scripts SDXL (SGM/LDM) name with "_" separators."""
    p = module.split(".")
    if p[0] == "down_blocks":
        b, kind, idx, rest = int(p[1]), p[2], int(p[3]), p[4:]
        head = f"input_blocks_{1 + b * (layers_per_block + 1) + idx}_{0 if kind == 'resnets' else 1}"
    elif p[0] == "mid_block":
        kind, idx, rest = p[1], int(p[2]), p[3:]
        head = "middle_block_" + {("resnets", 0): "0", ("attentions", 0): "1", ("resnets", 1): "2"}[(kind, idx)]
    elif p[0] == "up_blocks":
        b, kind, idx, rest = int(p[1]), p[2], int(p[3]), p[4:]
        head = f"output_blocks_{b * (layers_per_block + 1) + idx}_{0 if kind == 'resnets' else 1}"
    else:
        raise ValueError(module)
    if kind == "resnets":
        assert len(rest) == 1, module
        rest = [_SGM_RESNET[rest[0]]]
    elif kind != "attentions":
        raise ValueError(module)
    return "_".join([head] + rest)


def lora_tensors(name: str, spec: dict, models: dict) -> tuple[dict, list[dict]]:
    """Build the state dict of one LoRA file. `models` maps component -> torch module (base weights,
    used for the layer shapes). Returns (tensors, layer records)."""
    import torch

    rank, alpha = spec["rank"], spec["alpha"]
    eff_alpha = float(rank) if alpha is None else float(alpha)
    gen = torch.Generator("cpu").manual_seed(spec["seed"])
    tensors, records = {}, []
    for comp, layers in spec["layers"].items():
        mods = dict(models[comp].named_modules())
        for module in layers:
            m = mods[module]
            w = m.weight
            if isinstance(m, torch.nn.Linear):
                out_f, in_f = w.shape
                fan_in = in_f
                down_shape, up_shape = (rank, in_f), (out_f, rank)
                kind = "linear"
            elif isinstance(m, torch.nn.Conv2d):
                out_f, in_f, kh, kw = w.shape
                fan_in = in_f * kh * kw
                down_shape, up_shape = (rank, in_f, kh, kw), (out_f, rank, 1, 1)
                kind = f"conv{kh}x{kw}"
            else:
                raise TypeError(f"{module}: {type(m).__name__}")
            down = torch.randn(down_shape, generator=gen, dtype=torch.float32) / float(np.sqrt(fan_in))
            up = torch.randn(up_shape, generator=gen, dtype=torch.float32) * (
                spec["gain"] / float(np.sqrt(rank)) / (eff_alpha / rank)
            )
            if spec["format"] == "peft":
                base = f"{comp}.{module}"
                keys = {"down": f"{base}.lora_A.weight", "up": f"{base}.lora_B.weight"}
            else:
                prefix = (KOHYA_PREFIX_XL if spec["format"] == "kohya-sgm" else KOHYA_PREFIX)[comp]
                if comp == "unet" and spec["format"] == "kohya-sgm":
                    stem = prefix + sgm_name(module, models["unet"].config.layers_per_block)
                else:
                    stem = prefix + module.replace(".", "_")
                keys = {"down": f"{stem}.lora_down.weight", "up": f"{stem}.lora_up.weight",
                        "alpha": f"{stem}.alpha"}
                tensors[keys["alpha"]] = torch.tensor(float(alpha), dtype=torch.float32)
            tensors[keys["down"]] = down.contiguous()
            tensors[keys["up"]] = up.contiguous()
            records.append(
                dict(component=comp, module=module, kind=kind, weight_shape=list(w.shape),
                     square=(kind == "linear" and out_f == in_f) or (kind != "linear" and out_f == in_f),
                     keys=keys, down=down, up=up)
            )
    return tensors, records


class _WarnCatcher(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def fuse_checked(pipe, lora_path: Path, records: list[dict], spec: dict, scale: float) -> None:
    """load_lora_weights + fuse_lora(lora_scale=scale) + unload_lora_weights, with checks: no warnings,
    changed parameters == the file's layers, and each delta == scale * alpha/rank * up @ down."""
    import torch

    comps = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    before = {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in comps}
    catcher = _WarnCatcher()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(catcher)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="lora")
            pipe.fuse_lora(components=comps, lora_scale=scale, adapter_names=["lora"])
            pipe.unload_lora_weights()
    finally:
        for lg in loggers:
            lg.removeHandler(catcher)
    msgs = catcher.messages + [f"warning: {w.message}" for w in caught
                               if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    if msgs:
        raise RuntimeError(f"{lora_path.name}: warnings while loading/fusing:\n" + "\n".join(msgs))

    expected = {(r["component"], r["module"] + ".weight"): r for r in records}
    changed = set()
    for c in comps:
        after = getattr(pipe, c).state_dict()
        if set(after) != set(before[c]):
            raise RuntimeError(f"{lora_path.name}: {c} parameter names changed after unload: "
                               f"{sorted(set(after) ^ set(before[c]))[:5]}")
        for k, v in after.items():
            if not torch.equal(v, before[c][k]):
                changed.add((c, k))
    if changed != set(expected):
        raise RuntimeError(
            f"{lora_path.name}: changed weights != LoRA layers\n  unexpected: {sorted(changed - set(expected))}"
            f"\n  unchanged: {sorted(set(expected) - changed)}"
        )
    rank = spec["rank"]
    alpha = float(rank) if spec["alpha"] is None else float(spec["alpha"])
    after = {c: getattr(pipe, c).state_dict() for c in comps}
    for (c, k), r in expected.items():
        got = after[c][k].double() - before[c][k].double()
        up, down = r["up"].double(), r["down"].double()
        if up.dim() == 4:
            delta = (up[:, :, 0, 0] @ down.reshape(rank, -1)).reshape(got.shape)
        else:
            delta = up @ down
        want = scale * (alpha / rank) * delta
        err = (got - want).abs().max().item()
        tol = 1e-5 * max(1.0, before[c][k].abs().max().item(), want.abs().max().item())
        if err > tol:
            raise RuntimeError(f"{lora_path.name}: {c}.{k}: fused delta differs from scale*alpha/rank*up@down "
                               f"(max err {err:.3g})")


def write_lora_files(loras_dir: Path, names: list[str], base_stages: dict) -> dict:
    """Create the LoRA files (from the base pipelines' layer shapes) and return per-file info."""
    import diffusers
    import torch
    from safetensors.torch import save_file

    loras_dir.mkdir(parents=True, exist_ok=True)
    info = {}
    for name in names:
        spec = LORAS[name]
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(base_stages[spec["fixture"]]), torch_dtype=torch.float32)
        models = {c: getattr(pipe, c) for c in spec["layers"]}
        tensors, records = lora_tensors(name, spec, models)
        path = loras_dir / f"{name}.safetensors"
        save_file(dict(sorted(tensors.items())), str(path), metadata={"format": "pt"})
        path.chmod(0o644)
        # acceptance check: every key used, exactly the listed layers change, the documented formula
        fuse_checked(pipe, path, records, spec, 1.0)
        info[name] = dict(spec=spec, records=records)
        print(f"lora {name}: {len(records)} layers, {len(tensors)} tensors, {path.stat().st_size} bytes", flush=True)
    return info


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------


def export(stage: Path, out: Path, fixture: str, tok_cache: Path) -> None:
    """optimum-cli export + tokenizer files + scheduler config, as build_fixtures.build_pipeline."""
    spec = bf.PIPELINES[fixture]
    if out.exists():
        shutil.rmtree(out)
    fl.run([fl.VENV_BIN / "optimum-cli", "export", "onnx", "--model", stage, "--task",
            spec.get("export_task", "text-to-image"), out], env=fl.deterministic_env(), stdout=subprocess.DEVNULL)
    tok_dirs = ["tokenizer"] + (["tokenizer_2"] if spec["pipeline_class"] == "StableDiffusionXLPipeline" else [])
    for t in tok_dirs:
        pad = spec["tokenizer_pad"] if t == "tokenizer" else spec["tokenizer_2_pad"]
        fl.copy_tree_files(tok_cache / ("pad-eos" if pad == fl.EOS else "pad-bang"), out / t)
    bf.write_scheduler_config(spec, out)
    bf._strip_paths(out)


def check_base_export(export_dir: Path, committed: Path) -> list[str]:
    """The rebuilt base export must equal the committed fixture (files that both have)."""
    checked = []
    for p in sorted(export_dir.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(export_dir)
        if rel.parts[0] in ("tokenizer", "tokenizer_2"):
            continue
        q = committed / rel
        if not q.exists():
            raise RuntimeError(f"rebuilt export has {rel}, the committed fixture {committed} does not")
        if fl.sha256(p) != fl.sha256(q):
            raise RuntimeError(f"rebuilt base export differs from the committed fixture: {committed / rel}")
        checked.append(str(rel))
    for need in ("unet/model.onnx", "text_encoder/model.onnx"):
        assert need in checked, need
    return checked


def run_case(pipe, case: dict, out_dir: Path | None) -> tuple[np.ndarray, dict]:
    import torch

    rec = Recorder(pipe.unet.session, keep_outputs=False)
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    try:
        images = pipe(
            prompt=case["prompt"],
            negative_prompt=case["negative_prompt"],
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance_scale"],
            width=case["width"],
            height=case["height"],
            num_images_per_prompt=case["num_images"],
            generator=gen,
            output_type="np",
        ).images
    finally:
        pipe.unet.session.run = rec.orig
    if not np.isfinite(images).all():
        raise FloatingPointError(f"{case['id']}: non-finite image")
    meta = dict(
        unet_timesteps=[float(c["timestep"]) for c in rec.calls],
        unet_calls=len(rec.calls),
        unet_batch=int(rec.calls[0]["sample"].shape[0]),
        pipeline_class=type(pipe).__name__,
        scheduler_class=type(pipe.scheduler).__name__,
        scheduler_timesteps=[float(t) for t in pipe.scheduler.timesteps],
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        imgs, pngs = fl.save_images(out_dir, images, pipe.numpy_to_pil(images))
        meta.update(images=imgs, pngs=pngs, image_shape=list(images.shape[1:]))
    return images.astype(np.float32), meta


def make_lora_goldens(out: Path, repo_root: Path, only: list[str] | None) -> None:
    import diffusers
    import torch
    from importlib.metadata import version

    torch.set_num_threads(1)
    diffusers.utils.logging.disable_progress_bar()
    plan = fl.select_cases(case_plan(), only)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    fixtures = sorted({c["model"].split("/")[-1] for c in plan})
    lora_names = [n for n in LORAS if any(l["name"] == n for c in plan for l in c["loras"])]

    records = []
    with tempfile.TemporaryDirectory(prefix="diffusiond-lora-") as td:
        work = Path(td)
        tok_cache = work / "tokenizers"
        base_stages, base_checked = {}, {}
        for fx in fixtures:
            stage = work / "stage" / fx
            bf.save_torch_pipeline(fx, bf.PIPELINES[fx], stage, tok_cache)
            exp = work / "export-base" / fx
            export(stage, exp, fx, tok_cache)
            base_checked[fx] = check_base_export(exp, repo_root / "onnx" / fx)
            shutil.rmtree(exp)
            base_stages[fx] = stage
            print(f"base {fx}: rebuilt export matches the committed fixture ({len(base_checked[fx])} files)", flush=True)

        info = write_lora_files(out / "loras", lora_names, base_stages)

        base_pipes = {}
        for case in plan:
            fx = case["model"].split("/")[-1]
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(base_stages[fx]), torch_dtype=torch.float32)
            for l in case["loras"]:
                fuse_checked(pipe, out / l["file"], info[l["name"]]["records"], LORAS[l["name"]], l["scale"])
            stage = work / "stage-fused"
            if stage.exists():
                shutil.rmtree(stage)
            pipe.save_pretrained(str(stage), safe_serialization=True)
            del pipe
            exp = work / "export-fused"
            export(stage, exp, fx, tok_cache)
            ort_pipe = load_pipeline(exp)
            image, meta = run_case(ort_pipe, case, out / case["id"])
            del ort_pipe
            if case["model"] not in base_pipes:
                base_pipes.clear()
                base_pipes[case["model"]] = load_pipeline(repo_root / case["model"])
            base_image, base_meta = run_case(base_pipes[case["model"]], case, None)
            assert base_meta["unet_timesteps"] == meta["unet_timesteps"]
            diff = float(np.abs(image.astype(np.float64) - base_image.astype(np.float64)).mean())
            if diff < 0.02:
                raise RuntimeError(f"{case['id']}: LoRA changes the image too little (mean abs diff {diff:.4f})")
            rec = dict(case)
            rec.update(meta)
            rec["base_mean_abs_diff"] = round(diff, 6)
            records.append(rec)
            print(f"ok   {case['id']}  base_mean_abs_diff={diff:.4f}", flush=True)

    files = {}
    for name, d in info.items():
        spec = d["spec"]
        files[name] = dict(
            file=f"loras/{name}.safetensors",
            sha256=fl.sha256(out / "loras" / f"{name}.safetensors"),
            model=f"onnx/{spec['fixture']}",
            format=spec["format"],
            rank=spec["rank"],
            alpha=spec["alpha"],
            gain=spec["gain"],
            seed=spec["seed"],
            layers=[
                {k: r[k] for k in ("component", "module", "kind", "weight_shape", "square", "keys")}
                for r in d["records"]
            ],
        )

    manifest = {
        "description": "LoRA references for the tiny fixtures in onnx/. Generated by onnx/make_lora_references.py "
        "(its docstring has the full rules): seeded random LoRA files (loras/), fused into the rebuilt base "
        "pipeline with diffusers (load_lora_weights + fuse_lora(lora_scale=scale) + unload_lora_weights, one "
        "file after the other), exported with optimum-cli and run with Optimum's ORTDiffusionPipeline. File "
        "paths are relative to this folder, model paths to the repository root.",
        "versions": {
            p: version(p)
            for p in ["torch", "diffusers", "transformers", "optimum-onnx", "onnx", "onnxruntime", "peft", "numpy",
                      "safetensors"]
        },
        "session_options": SESSION_OPTIONS,
        "fusing_rule": "W' = W + scale * (alpha / rank) * up @ down for Linear; conv: up[:, :, 0, 0] @ "
        "down.reshape(rank, -1) reshaped to the conv weight's [out, in, kh, kw]; alpha = rank when the file has no "
        "alpha (PEFT layout); several LoRAs add up: W + s1*d1 + s2*d2 (float32). Biases unchanged.",
        "rng_rule": "generator=torch.Generator('cpu').manual_seed(seed) passed to the pipeline, no latents: initial "
        "latents = torch.randn((num_images,4,height/8,width/8), generator, dtype=float32) * init_noise_sigma",
        "fields": {
            "model": "fixture folder, relative to the repository root (the base model the LoRAs are applied to)",
            "loras": "list of {file (relative to this folder), name (file stem), scale}, applied in this order",
            "scheduler": "null = the folder's scheduler_config.json unchanged",
            "images": "float32 HxWx3 in [0,1] (output_type='np'); pngs: (x*255).round() uint8",
            "unet_timesteps": "value of the UNet 'timestep' input at every UNet call",
            "scheduler_timesteps": "pipeline.scheduler.timesteps after the run",
            "base_mean_abs_diff": "mean(|image - image of the same call on the fixture without LoRA|), float64",
            "lora_files": "per file: format (kohya | kohya-sgm | peft), rank, alpha (null = rank), gain, seed and every "
            "layer: component, diffusers module name, kind (linear | conv3x3 | conv1x1), weight_shape of the base "
            "weight, square (out == in), keys in the file",
        },
        "base_export_check": {fx: f"{len(v)} files byte-identical to onnx/{fx}: " + ", ".join(v)
                              for fx, v in base_checked.items()},
        "lora_files": files,
        "cases": records,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(records)} cases")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", type=Path, default=REPO / "tests" / "golden", help="writes <out-root>/lora")
    ap.add_argument("--repo-root", type=Path, default=REPO, help="where to find onnx/<fixture>")
    ap.add_argument("--only", default=None, help="comma list of case ids (the manifest then has only those)")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s] if args.only else None
    make_lora_goldens(args.out_root.resolve() / "lora", args.repo_root.resolve(), only)


if __name__ == "__main__":
    sys.exit(main())
