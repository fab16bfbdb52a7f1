#!/usr/bin/env python3
"""Export a Stable Diffusion model (SD 1.x/2.x, SDXL, inpainting, LCM) and its ControlNets to the
ONNX folder layout diffusiond opens (Optimum's layout plus what Optimum leaves out).

Run through scripts/export-model, which provides the pinned Python environment:
    scripts/export-model SRC OUT [--fp16] [--controlnet CN_SRC[=NAME]]...
    scripts/export-model --add-controlnet CN_SRC[=NAME] [--base SRC] OUT

SRC: a diffusers folder (with model_index.json) or a single-file checkpoint `.safetensors`
(loaded with diffusers' from_single_file: StableDiffusionXLPipeline when the header has keys under
`conditioner.embedders.1.`, else StableDiffusionPipeline; from_single_file reads the matching
diffusers config from the Hugging Face Hub or its cache). CN_SRC: a diffusers ControlNet folder
(config.json `_class_name` ControlNetModel). NAME defaults to CN_SRC's folder name and must match
[A-Za-z0-9_.-]+.

Rules, step by step (every failure is reported as "export-model: step '<step>' failed: ..."):
  * OUT must not exist or be an empty folder. Everything is written into a temp folder beside OUT
    (`.OUT.export-XXXX`) that is renamed to OUT only at the end, so a failure leaves no OUT.
  * Base export: `optimum-cli export onnx --model SRC --task text-to-image` (`--task inpainting`
    when model_index.json's `_class_name` contains "Inpaint"); --fp16 adds `--dtype fp16 --device
    cuda` (Optimum exports fp16 only on a CUDA device; without one the step fails and says so).
  * Tokenizers: Optimum re-saves tokenizer/ (and tokenizer_2/) with its own formatting; the source
    folder's files are copied over them byte for byte, and tokenizer.json (which the daemon reads) is
    made with transformers' CLIPTokenizerFast when the source has none (truncation and padding set to
    null, compact JSON, as onnx/fixture_lib.write_clip_tokenizer writes it).
  * scheduler/scheduler_config.json is the source's file byte for byte (Optimum drops keys the
    scheduler class does not know). `_name_or_path` is removed from every other JSON config.
  * Each ControlNet: OUT/controlnet/NAME/model.onnx and OUT/controlnet/NAME/config.json (the diffusers
    config without `_name_or_path`, indent 2, sorted keys). Refused when its config has
    global_pool_conditions true, or its cross_attention_dim, block_out_channels or
    addition_embed_type differ from the UNet's. Graph inputs, in order:
        sample [batch_size, 4, height, width], timestep [] (rank 0, the UNet's dtype),
        encoder_hidden_states [batch_size, sequence_length, D],
        controlnet_cond [batch_size, 3, image_height, image_width] (RGB in [0, 1]),
        text_embeds [batch_size, P], time_ids [batch_size, 6]      (SDXL only)
    outputs down_block_res_sample_0 .. down_block_res_sample_{N-1} [batch_size, C_i, H_i, W_i] and
    mid_block_res_sample [batch_size, C_mid, H_mid, W_mid]; exported with conditioning_scale=1.0 and
    guess_mode=False (the runtime scales the residuals by the request's scale itself).
  * With ControlNets, OUT/unet/model.onnx is replaced by the UNet with residual inputs (unet/config.json
    unchanged): Optimum's UNet inputs in Optimum's order and dtypes (sample, timestep,
    encoder_hidden_states, then text_embeds and time_ids for SDXL, timestep_cond when
    time_cond_proj_dim is set), then down_block_additional_residual_0 .. _{N-1} and
    mid_block_additional_residual (same shapes as the ControlNet outputs); output out_sample. The
    residuals are added as diffusers' UNet2DConditionModel adds them (down_block_additional_residuals,
    mid_block_additional_residual); all-zero residuals give the plain UNet's output.
  * Both graphs are exported as Optimum's export_pytorch does: torch.onnx.export with dynamo=False,
    do_constant_folding=True, the opset of Optimum's own UNet graph, dynamic axes named as above;
    weights over 2 GB go into one external file `model.onnx_data` beside model.onnx.
  * Check: every exported ControlNet / residual UNet graph runs once in onnxruntime (CPU) on seeded
    random inputs and is compared with the torch module: the max abs diff is printed, and the step
    fails above 1e-3 (fp32) or 5e-2 (fp16; skipped with a warning where onnxruntime's CPU build
    cannot run the fp16 graph).
  * Verify: the finished folder is opened by the Rust CLI (`$DIFFUSIONCTL`, else the newer of target/release/
    and target/debug/diffusionctl, else diffusionctl on PATH) with a 1-step 64x64 (or the model's native
    size) `generate --local`; skipped with a warning when there is no binary or when
    EXPORT_MODEL_VERIFY=0.
  * --add-controlnet CN_SRC[=NAME] OUT: OUT is an exported folder; the new ControlNet is exported into
    a temp copy of OUT (unchanged files hard-linked), and, when OUT's UNet has no residual inputs yet,
    the residual UNet too, which needs the torch weights: `--base SRC` (the folder or checkpoint OUT was
    exported from; its UNet must reproduce OUT's unet/model.onnx within the tolerance above, checked).
    The temp copy then replaces OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
TOL = {"fp32": 1e-3, "fp16": 5e-2}
TIMINGS: list[tuple[str, float]] = []


class StepError(Exception):
    pass


@contextlib.contextmanager
def step(name: str):
    t0 = time.monotonic()
    print(f"export-model: {name} ...", flush=True)
    try:
        yield
    except StepError as e:
        raise SystemExit(f"export-model: step '{name}' failed: {e}")
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"export-model: step '{name}' failed: command exited with {e.returncode}: "
                         f"{' '.join(str(c) for c in e.cmd)}")
    except Exception as e:  # noqa: BLE001 - every failure names its step
        traceback.print_exc()
        raise SystemExit(f"export-model: step '{name}' failed: {type(e).__name__}: {e}")
    dt = time.monotonic() - t0
    TIMINGS.append((name, dt))
    print(f"export-model: {name}: {dt:.1f} s", flush=True)


# ---------------------------------------------------------------------------------------------
# Arguments and sources
# ---------------------------------------------------------------------------------------------


def parse_cn(spec: str) -> tuple[Path, str]:
    if "=" in spec:
        src, name = spec.rsplit("=", 1)
    else:
        src, name = spec, ""
    path = Path(src).expanduser().resolve()
    name = name or path.name
    if not NAME_RE.match(name):
        raise StepError(f"ControlNet name {name!r} (from {spec!r}) must match [A-Za-z0-9_.-]+")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise StepError(f"{path} is not a diffusers ControlNet folder (no config.json)")
    cls = json.loads(cfg.read_text(encoding="utf-8")).get("_class_name")
    if cls != "ControlNetModel":
        raise StepError(f"{cfg}: _class_name is {cls!r}, not 'ControlNetModel'")
    return path, name


def safetensors_keys(path: Path) -> list[str]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > 200_000_000:
            raise StepError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def check_out_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StepError(f"{out} exists and is not an empty folder; give a new OUT folder")
    if not out.parent.is_dir():
        raise StepError(f"the parent folder of OUT ({out.parent}) does not exist")


def stage_source(src: Path, work: Path) -> Path:
    """A diffusers folder for SRC: SRC itself, or a checkpoint loaded with from_single_file and saved."""
    if src.is_dir():
        if not (src / "model_index.json").is_file():
            raise StepError(f"{src} has no model_index.json (not a diffusers pipeline folder)")
        return src
    if src.is_file() and src.suffix == ".safetensors":
        import diffusers
        import torch

        keys = safetensors_keys(src)
        xl = any(k.startswith("conditioner.embedders.1.") for k in keys)
        cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
        print(f"export-model: {src.name}: {cls.__name__}.from_single_file", flush=True)
        kw = {} if xl else dict(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_single_file(str(src), torch_dtype=torch.float32, **kw)
        stage = work / "source"
        pipe.save_pretrained(str(stage), safe_serialization=True)
        return stage
    raise StepError(f"{src}: expected a diffusers folder (model_index.json) or a .safetensors checkpoint")


# ---------------------------------------------------------------------------------------------
# ONNX helpers
# ---------------------------------------------------------------------------------------------

ONNX_TO_TORCH = {1: "float32", 10: "float16", 7: "int64", 11: "float64"}


def graph_io(path: Path) -> tuple[list[dict], list[dict], int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def io(vals):
        out = []
        for v in vals:
            t = v.type.tensor_type
            out.append(dict(name=v.name, elem_type=t.elem_type,
                            dims=[d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]))
        return out

    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return io(m.graph.input), io(m.graph.output), opset


def torch_export(module, args: tuple, path: Path, input_names, output_names, dynamic_axes, opset: int) -> None:
    """torch.onnx.export with optimum.exporters.onnx.convert.export_pytorch's arguments and its
    external-data handling (one `<name>_data` file when the graph needs external data)."""
    import onnx
    import torch
    from optimum.onnx.utils import (
        _get_onnx_external_constants,
        _get_onnx_external_data_tensors,
        check_model_uses_external_data,
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, args, f=path.as_posix(), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, do_constant_folding=True, opset_version=opset, dynamo=False)
    m = onnx.load(str(path), load_external_data=False)
    if check_model_uses_external_data(m):
        tensors, constants = _get_onnx_external_data_tensors(m), _get_onnx_external_constants(m)
        del m
        m = onnx.load(str(path), load_external_data=True)
        onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + "_data", convert_attribute=True, size_threshold=100)
        for t in tensors + constants:
            p = path.parent / t
            if p.is_file() and p.name != path.name + "_data":
                p.unlink()


def ort_run(path: Path, feeds: dict) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def compare(label: str, path: Path, feeds: dict, want: list, dtype: str) -> float:
    import numpy as np

    try:
        got = ort_run(path, feeds)
    except Exception as e:  # noqa: BLE001
        if dtype == "fp16":
            print(f"export-model: warning: {label}: onnxruntime (CPU) cannot run the fp16 graph ({e}); check skipped",
                  flush=True)
            return float("nan")
        raise
    if len(got) != len(want):
        raise StepError(f"{label}: onnxruntime gives {len(got)} outputs, torch {len(want)}")
    diff = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            raise StepError(f"{label}: output shape {g.shape} != torch {w.shape}")
        diff = max(diff, float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()))
    print(f"export-model: {label}: onnxruntime vs torch max abs diff {diff:.3g}", flush=True)
    if not diff <= TOL[dtype]:
        raise StepError(f"{label}: onnxruntime output differs from torch by {diff:.3g} (> {TOL[dtype]})")
    return diff


# ---------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------


def _wrappers():
    import torch

    class UNetWithResiduals(torch.nn.Module):
        def __init__(self, unet, base_inputs: list[str], n_down: int):
            super().__init__()
            self.unet, self.base_inputs, self.n_down = unet, base_inputs, n_down

        def forward(self, *args):
            named = dict(zip(self.base_inputs, args[: len(self.base_inputs)]))
            res = args[len(self.base_inputs):]
            kw = {}
            if "text_embeds" in named:
                kw["added_cond_kwargs"] = {"text_embeds": named["text_embeds"], "time_ids": named["time_ids"]}
            if "timestep_cond" in named:
                kw["timestep_cond"] = named["timestep_cond"]
            return self.unet(named["sample"], named["timestep"], named["encoder_hidden_states"],
                             down_block_additional_residuals=tuple(res[: self.n_down]),
                             mid_block_additional_residual=res[self.n_down], return_dict=False, **kw)[0]

    class ControlNetWrapper(torch.nn.Module):
        def __init__(self, controlnet, xl: bool):
            super().__init__()
            self.controlnet, self.xl = controlnet, xl

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *added):
            kw = {}
            if self.xl:
                kw["added_cond_kwargs"] = {"text_embeds": added[0], "time_ids": added[1]}
            down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                        controlnet_cond=controlnet_cond, conditioning_scale=1.0, guess_mode=False,
                                        return_dict=False, **kw)
            return (*down, mid)

    return UNetWithResiduals, ControlNetWrapper


def check_cn_config(cn_src: Path, unet_cfg: dict) -> dict:
    cfg = json.loads((cn_src / "config.json").read_text(encoding="utf-8"))
    if cfg.get("global_pool_conditions"):
        raise StepError(f"{cn_src}/config.json: global_pool_conditions is true (shuffle-style ControlNets "
                        "pool their residuals; not supported)")
    for key in ("cross_attention_dim", "block_out_channels", "addition_embed_type"):
        a, b = cfg.get(key), unet_cfg.get(key)
        a, b = (list(a) if isinstance(a, (list, tuple)) else a), (list(b) if isinstance(b, (list, tuple)) else b)
        if a != b:
            raise StepError(f"{cn_src}/config.json: {key} is {a!r}, the base UNet's is {b!r} "
                            "(the ControlNet was made for another base model)")
    return cfg


def residual_shapes(unet_cfg: dict, latent_h: int, latent_w: int) -> tuple[list[tuple], tuple]:
    """(channels, h, w) of every down-block residual and of the mid-block residual (UNet2DConditionModel)."""
    boc = unet_cfg["block_out_channels"]
    lpb = unet_cfg.get("layers_per_block", 2)
    lpb = [lpb] * len(boc) if isinstance(lpb, int) else lpb
    h, w = latent_h, latent_w
    shapes = [(boc[0], h, w)]
    for i, c in enumerate(boc):
        shapes += [(c, h, w)] * lpb[i]
        if i < len(boc) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((c, h, w))
    return shapes, (boc[-1], h, w)


class Exporter:
    def __init__(self, unet_cfg: dict, unet_io: tuple, dtype: str):
        import torch

        self.torch = torch
        self.unet_cfg = unet_cfg
        self.base_in, self.base_out, self.opset = unet_io
        self.dtype = dtype
        self.tdtype = torch.float16 if dtype == "fp16" else torch.float32
        self.device = torch.device("cuda" if dtype == "fp16" else "cpu")
        self.xl = unet_cfg.get("addition_embed_type") == "text_time"
        n_up = len(unet_cfg["block_out_channels"]) - 1
        # dummy latent size: a multiple of every downsampling, at least the model's own sample size
        m = 2 ** n_up
        s = max(unet_cfg.get("sample_size", 8) or 8, 2 * m)
        self.lat = (s + m - 1) // m * m
        self.batch, self.seq = 2, 16

    def _rand(self, gen, shape, scale=1.0):
        t = self.torch.randn(shape, generator=gen, dtype=self.torch.float32) * scale
        return t.to(self.tdtype).to(self.device)

    def base_dummy(self, gen, lat_h, lat_w) -> dict:
        torch = self.torch
        d = {}
        for inp in self.base_in:
            n = inp["name"]
            if n == "sample":
                d[n] = self._rand(gen, (self.batch, inp["dims"][1], lat_h, lat_w))
            elif n == "timestep":
                d[n] = torch.tensor(float(torch.randint(1, 999, (), generator=gen)), dtype=self.tdtype,
                                    device=self.device)
            elif n == "encoder_hidden_states":
                d[n] = self._rand(gen, (self.batch, self.seq, inp["dims"][2]))
            elif n == "time_ids":
                d[n] = torch.tensor([[lat_h * 8, lat_w * 8, 0, 0, lat_h * 8, lat_w * 8]] * self.batch,
                                    dtype=self.tdtype, device=self.device)
            else:  # text_embeds, timestep_cond
                d[n] = self._rand(gen, (self.batch, inp["dims"][1]))
        return d

    def numpy_feeds(self, d: dict) -> dict:
        return {k: v.detach().cpu().numpy() for k, v in d.items()}

    def export_controlnet(self, cn_src: Path, name: str, out_dir: Path) -> dict:
        import diffusers

        torch = self.torch
        cfg = check_cn_config(cn_src, self.unet_cfg)
        cn = diffusers.ControlNetModel.from_pretrained(str(cn_src), torch_dtype=torch.float32).eval()
        if self.dtype == "fp16":
            cn = cn.to(self.tdtype).to(self.device)
        _, ControlNetWrapper = _wrappers()
        wrapper = ControlNetWrapper(cn, self.xl).eval()
        n_down = len(residual_shapes(self.unet_cfg, 8, 8)[0])
        in_names = ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"] + (
            ["text_embeds", "time_ids"] if self.xl else [])
        out_names = [f"down_block_res_sample_{i}" for i in range(n_down)] + ["mid_block_res_sample"]
        axes = {"sample": {0: "batch_size", 2: "height", 3: "width"},
                "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                "controlnet_cond": {0: "batch_size", 2: "image_height", 3: "image_width"}}
        if self.xl:
            axes.update(text_embeds={0: "batch_size"}, time_ids={0: "batch_size"})
        for i in range(n_down):
            axes[f"down_block_res_sample_{i}"] = {0: "batch_size", 2: f"down_{i}_height", 3: f"down_{i}_width"}
        axes["mid_block_res_sample"] = {0: "batch_size", 2: "mid_height", 3: "mid_width"}

        def inputs(seed, lat_h, lat_w):
            gen = torch.Generator("cpu").manual_seed(seed)
            base = self.base_dummy(gen, lat_h, lat_w)
            cond = torch.rand((self.batch, 3, lat_h * 8, lat_w * 8), generator=gen).to(self.tdtype).to(self.device)
            sample = base["sample"][:, : cfg.get("in_channels", 4)]
            args = [sample, base["timestep"], base["encoder_hidden_states"], cond]
            if self.xl:
                args += [base["text_embeds"], base["time_ids"]]
            return tuple(args)

        path = out_dir / "model.onnx"
        torch_export(wrapper, inputs(0, self.lat, self.lat), path, in_names, out_names, axes, self.opset)
        # check on another size than the export's dummy inputs
        args = inputs(1, self.lat + 2 ** (len(self.unet_cfg["block_out_channels"]) - 1), self.lat)
        with torch.no_grad():
            want = [t.detach().float().cpu().numpy() for t in wrapper(*args)]
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(in_names, args)}
        diff = compare(f"controlnet {name}", path, feeds, want, self.dtype)
        cfg.pop("_name_or_path", None)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        del wrapper, cn
        return dict(max_abs_diff=diff, inputs=in_names, outputs=out_names)

    def export_unet(self, unet, path: Path, check_against: Path | None = None) -> dict:
        torch = self.torch
        if self.dtype == "fp16":
            unet = unet.to(self.tdtype).to(self.device)
        unet = unet.eval()
        UNetWithResiduals, _ = _wrappers()
        names = [i["name"] for i in self.base_in]
        shapes, _mid = residual_shapes(self.unet_cfg, 8, 8)
        n_down = len(shapes)
        wrapper = UNetWithResiduals(unet, names, n_down).eval()
        res_names = [f"down_block_additional_residual_{i}" for i in range(n_down)] + ["mid_block_additional_residual"]
        axes = {}
        for inp in self.base_in:  # Optimum's dynamic axes, exactly
            axes[inp["name"]] = {k: d for k, d in enumerate(inp["dims"]) if isinstance(d, str)}
        for i in range(n_down):
            axes[res_names[i]] = {0: "batch_size", 2: f"down_{i}_height", 3: f"down_{i}_width"}
        axes[res_names[-1]] = {0: "batch_size", 2: "mid_height", 3: "mid_width"}
        for o in self.base_out:
            axes[o["name"]] = {k: d for k, d in enumerate(o["dims"]) if isinstance(d, str)}

        def inputs(seed, lat_h, lat_w, zero_res=False):
            gen = torch.Generator("cpu").manual_seed(seed)
            base = self.base_dummy(gen, lat_h, lat_w)
            downs, mid = residual_shapes(self.unet_cfg, lat_h, lat_w)
            res = [self._rand(gen, (self.batch, *s)) * (0 if zero_res else 1) for s in downs + [mid]]
            return tuple([base[n] for n in names] + res)

        torch_export(wrapper, inputs(0, self.lat, self.lat), path, names + res_names,
                     [o["name"] for o in self.base_out], axes, self.opset)
        args = inputs(1, self.lat + 2 ** (len(self.unet_cfg["block_out_channels"]) - 1), self.lat)
        with torch.no_grad():
            want = [wrapper(*args).detach().float().cpu().numpy()]
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names + res_names, args)}
        diff = compare("unet with residuals", path, feeds, want, self.dtype)
        info = dict(max_abs_diff=diff, inputs=names + res_names)
        if check_against is not None:
            # zero residuals: the residual UNet must reproduce the existing plain UNet graph
            args = inputs(2, self.lat, self.lat, zero_res=True)
            old = ort_run(check_against, {n: a.detach().cpu().numpy() for n, a in zip(names, args)})
            info["zero_residual_vs_existing_unet"] = compare(
                "unet with zero residuals vs OUT's unet", path,
                {n: a.detach().cpu().numpy() for n, a in zip(names + res_names, args)}, old, self.dtype)
        del wrapper
        return info


# ---------------------------------------------------------------------------------------------
# Folder steps
# ---------------------------------------------------------------------------------------------


def strip_paths(folder: Path) -> None:
    """Remove `_name_or_path` from every JSON config (as build_fixtures._strip_paths)."""
    for p in sorted(folder.rglob("*.json")):
        if p.name in ("tokenizer.json", "vocab.json"):
            continue
        d = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(d, dict) and "_name_or_path" in d:
            del d["_name_or_path"]
            p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_tokenizer(src: Path, dst: Path) -> None:
    from transformers import CLIPTokenizerFast

    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_file():
            shutil.copyfile(p, dst / p.name)
    if not (dst / "tokenizer.json").is_file():
        fast = CLIPTokenizerFast.from_pretrained(str(src))
        with tempfile.TemporaryDirectory() as td:
            fast.save_pretrained(td)
            tj = json.loads(Path(td, "tokenizer.json").read_text(encoding="utf-8"))
        tj["truncation"] = None
        tj["padding"] = None
        (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, separators=(",", ":")),
                                            encoding="utf-8")
    a = CLIPTokenizerFast.from_pretrained(str(dst))("a photo of a cat").input_ids
    if not a or len(a) < 3:
        raise StepError(f"{dst}: tokenizer gives {a}")


def optimum_cli() -> list[str]:
    exe = Path(sys.executable).parent / "optimum-cli"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "optimum.commands.optimum_cli"]


def find_diffusionctl() -> str | None:
    env = os.environ.get("DIFFUSIONCTL")
    if env:
        return env
    built = [p for p in (REPO / "target/release/diffusionctl", REPO / "target/debug/diffusionctl")
             if p.is_file() and os.access(p, os.X_OK)]
    if built:  # the newer build of the two
        return str(max(built, key=lambda p: p.stat().st_mtime))
    return shutil.which("diffusionctl")


def verify(folder: Path, work: Path) -> None:
    if os.environ.get("EXPORT_MODEL_VERIFY", "1") == "0":
        print("export-model: warning: EXPORT_MODEL_VERIFY=0: the folder is not opened with diffusionctl",
              flush=True)
        return
    ctl = find_diffusionctl()
    if ctl is None:
        print("export-model: warning: no diffusionctl binary (target/release, target/debug, PATH or $DIFFUSIONCTL); "
              "the folder was not opened with it", flush=True)
        return
    ucfg = json.loads((folder / "unet/config.json").read_text(encoding="utf-8"))
    vcfg = json.loads((folder / "vae_decoder/config.json").read_text(encoding="utf-8"))
    vae_f = 2 ** (len(vcfg.get("block_out_channels", [0] * 4)) - 1)
    multiple = vae_f * 2 ** (len(ucfg.get("down_block_types", [0])) - 1)
    size = 64 if 64 % multiple == 0 else (ucfg.get("sample_size") or 64) * vae_f
    png = work / "verify.png"
    cmd = [ctl, "generate", "--local", "--model-dir", str(folder), "--prompt", "export check", "--steps", "1",
           "--width", str(size), "--height", str(size), "--seed", "1", "--output", str(png)]
    print("+", " ".join(cmd), flush=True)
    # This script's own variables are named EXPORT_MODEL_*: diffusiond reads every DIFFUSIOND_*
    # variable as a configuration key.
    r = subprocess.run(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0 or not png.is_file():
        raise StepError(f"{ctl} could not generate from the folder (exit {r.returncode}):\n{r.stdout[-4000:]}")


def read_unet_cfg(folder: Path) -> dict:
    return json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))


def base_io(unet_onnx: Path) -> tuple:
    ins, outs, opset = graph_io(unet_onnx)
    base = [i for i in ins if not i["name"].startswith(("down_block_additional_residual_",
                                                          "mid_block_additional_residual"))]
    return base, outs, opset, len(base) != len(ins)


def load_unet(src_stage: Path):
    import diffusers
    import torch

    return diffusers.UNet2DConditionModel.from_pretrained(str(src_stage / "unet"), torch_dtype=torch.float32)


def cmd_export(args) -> None:
    out = Path(args.out).expanduser().resolve()
    src = Path(args.src).expanduser().resolve()
    with step("check arguments"):
        check_out_free(out)
        cns = [parse_cn(s) for s in args.controlnet]
        names = [n for _, n in cns]
        if len(set(names)) != len(names):
            raise StepError(f"two ControlNets are named the same: {names}")
        if not src.exists():
            raise StepError(f"{src} does not exist")
        if src.is_dir() and (src / "unet" / "config.json").is_file():  # early check; again after loading
            ucfg = json.loads((src / "unet" / "config.json").read_text(encoding="utf-8"))
            for cn_src, _ in cns:
                check_cn_config(cn_src, ucfg)
        if args.fp16:
            import torch

            if not torch.cuda.is_available():
                raise StepError("--fp16: fp16 export needs a CUDA device (Optimum exports fp16 only with "
                                "--device cuda) and torch sees none")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=str(out.parent)))
    work = Path(tempfile.mkdtemp(prefix="diffusiond-export-"))
    ok = False
    try:
        folder = tmp / "model"
        with step("load source"):
            stage = stage_source(src, work)
            index = json.loads((stage / "model_index.json").read_text(encoding="utf-8"))
            cls = index.get("_class_name", "")
            task = "inpainting" if "Inpaint" in cls else "text-to-image"
        with step(f"optimum export ({task})"):
            cmd = optimum_cli() + ["export", "onnx", "--model", str(stage), "--task", task]
            if args.fp16:
                cmd += ["--dtype", "fp16", "--device", "cuda"]
            env = dict(os.environ, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
            print("+", " ".join(cmd + [str(folder)]), flush=True)
            r = subprocess.run(cmd + [str(folder)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
            if r.returncode != 0:
                raise StepError(f"optimum-cli exited with {r.returncode}:\n{r.stdout[-4000:]}")
            if not (folder / "unet" / "model.onnx").is_file():
                raise StepError(f"optimum-cli wrote no unet/model.onnx:\n{r.stdout[-4000:]}")
        with step("add tokenizer and scheduler files"):
            for t in ("tokenizer", "tokenizer_2"):
                if (stage / t).is_dir():
                    copy_tokenizer(stage / t, folder / t)
            sched = stage / "scheduler" / "scheduler_config.json"
            if sched.is_file():
                shutil.copyfile(sched, folder / "scheduler" / "scheduler_config.json")
            # the scheduler file is the source's, byte for byte; strip the others
            keep = (folder / "scheduler" / "scheduler_config.json").read_bytes()
            strip_paths(folder)
            (folder / "scheduler" / "scheduler_config.json").write_bytes(keep)
        if cns:
            add_controlnets(folder, cns, stage, dtype="fp16" if args.fp16 else "fp32", need_unet=True)
        with step("verify with diffusionctl"):
            verify(folder, work)
        with step("move into place"):
            if out.exists():
                out.rmdir()
            folder.rename(out)
        ok = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            print(f"export-model: nothing written to {out}", file=sys.stderr)
    report(out)


def add_controlnets(folder: Path, cns, stage: Path | None, dtype: str, need_unet: bool,
                    check_against: Path | None = None) -> dict:
    results = {}
    unet_cfg = read_unet_cfg(folder)
    unet_onnx = folder / "unet" / "model.onnx"
    base, outs, opset, _has = base_io(unet_onnx)
    ex = Exporter(unet_cfg, (base, outs, opset), dtype)
    for cn_src, name in cns:
        with step(f"export controlnet {name}"):
            d = folder / "controlnet" / name
            if d.exists():
                raise StepError(f"{d.relative_to(folder)} exists already")
            results[name] = ex.export_controlnet(cn_src, name, d)
    if need_unet:
        with step("export unet with residual inputs"):
            unet = load_unet(stage)
            new = folder / "unet" / ".residual" / "model.onnx"
            results["unet"] = ex.export_unet(unet, new, check_against=check_against)
            for p in (folder / "unet").glob("model.onnx*"):
                p.unlink()
            for p in new.parent.iterdir():
                p.rename(folder / "unet" / p.name)
            new.parent.rmdir()
    return results


def cmd_add(args) -> None:
    out = Path(args.out).expanduser().resolve()
    with step("check arguments"):
        if not (out / "model_index.json").is_file() or not (out / "unet" / "model.onnx").is_file():
            raise StepError(f"{out} is not an exported model folder (model_index.json, unet/model.onnx)")
        cns = [parse_cn(s) for s in args.add_controlnet]
        for _, n in cns:
            if (out / "controlnet" / n).exists():
                raise StepError(f"{out}/controlnet/{n} exists already; pick another NAME (CN_SRC=NAME)")
        ucfg = read_unet_cfg(out)
        for cn_src, _ in cns:
            check_cn_config(cn_src, ucfg)
        base, _outs, _opset, has_res = base_io(out / "unet" / "model.onnx")
        dtype = "fp16" if base[0]["elem_type"] == 10 else "fp32"
        if not has_res and args.base is None:
            raise StepError(f"{out}/unet/model.onnx has no ControlNet residual inputs yet, so the UNet must be "
                            "re-exported from its torch weights: add --base SRC (the diffusers folder or "
                            ".safetensors checkpoint OUT was exported from)")
        if dtype == "fp16":
            import torch

            if not torch.cuda.is_available():
                raise StepError(f"{out} is fp16: fp16 export needs a CUDA device and torch sees none")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=str(out.parent)))
    work = Path(tempfile.mkdtemp(prefix="diffusiond-export-"))
    ok = False
    try:
        folder = tmp / "model"
        with step("copy OUT (hard links)"):
            shutil.copytree(out, folder, copy_function=os.link)
        stage = None
        if not has_res:
            with step("load base"):
                stage = stage_source(Path(args.base).expanduser().resolve(), work)
        add_controlnets(folder, cns, stage, dtype, need_unet=not has_res,
                        check_against=None if has_res else out / "unet" / "model.onnx")
        with step("verify with diffusionctl"):
            verify(folder, work)
        with step("move into place"):
            old = tmp / "old"
            out.rename(old)
            folder.rename(out)
        ok = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            print(f"export-model: {out} unchanged", file=sys.stderr)
    report(out)


def report(out: Path) -> None:
    total = sum(t for _, t in TIMINGS)
    print("export-model: timings: " + ", ".join(f"{n} {t:.1f} s" for n, t in TIMINGS) + f"; total {total:.1f} s")
    print(f"export-model: done: {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="export-model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", help="SRC OUT (export) or OUT (--add-controlnet)")
    ap.add_argument("--fp16", action="store_true", help="export in float16 (needs a CUDA device)")
    ap.add_argument("--controlnet", action="append", default=[], metavar="CN_SRC[=NAME]")
    ap.add_argument("--add-controlnet", action="append", default=[], metavar="CN_SRC[=NAME]")
    ap.add_argument("--base", default=None, metavar="SRC", help="with --add-controlnet: the source OUT was exported from")
    args = ap.parse_args(argv)
    if args.add_controlnet:
        if len(args.paths) != 1 or args.controlnet or args.fp16:
            ap.error("usage: export-model --add-controlnet CN_SRC[=NAME] [--base SRC] OUT")
        args.out = args.paths[0]
        cmd_add(args)
    else:
        if len(args.paths) != 2 or args.base:
            ap.error("usage: export-model SRC OUT [--fp16] [--controlnet CN_SRC[=NAME]]...")
        args.src, args.out = args.paths
        cmd_export(args)


if __name__ == "__main__":
    main()
