#!/usr/bin/env python3
"""ControlNet fixtures (onnx/tiny-controlnet/) and reference outputs (tests/golden/controlnet/).

Usage (from the repository root):
    onnx/.venv/bin/python onnx/make_controlnet_references.py                    # both, into the repo
    onnx/.venv/bin/python onnx/make_controlnet_references.py --out-root /tmp/a  # -> /tmp/a/{onnx,tests/golden}
    onnx/.venv/bin/python onnx/make_controlnet_references.py --only sd15-canny  # a manifest with only those

Everything is deterministic: re-running writes identical files.

Base pipelines: the torch pipelines of the committed fixtures tiny-sd15, tiny-sd2-v and tiny-sdxl are
rebuilt with build_fixtures.save_torch_pipeline (seeded) into diffusers folders; their tokenizer folders
get the fixture's exact tokenizer files (fixture_lib.write_clip_tokenizer) and their scheduler config
build_fixtures.write_scheduler_config's extra keys, so that `scripts/export-model` (which copies both from
its source byte for byte) reproduces the committed folders.

ControlNets (diffusers ControlNetModel folders, rebuilt here, not committed): ControlNetModel.from_unet(unet,
conditioning_embedding_out_channels=(8, 16, 16, 32)) of the fixture's UNet (smaller than diffusers' default
(16, 32, 96, 256) to keep the committed graphs small; still three stride-2 convs, image -> latent size), then EVERY parameter re-drawn, in named_parameters() order, from
torch.Generator("cpu").manual_seed(seed):
    weights with 2+ dims (conv, linear, embedding): N(0, 1) * gain / sqrt(fan_in), fan_in = numel / shape[0]
        (gain 1, and CONTROL_GAIN for the "zero convs" controlnet_down_blocks.*, controlnet_mid_block and
        controlnet_cond_embedding.conv_out, which diffusers initialises to zero: so every residual is of the
        size of the UNet's own activations and each ControlNet visibly changes the image)
    norm weights (GroupNorm/LayerNorm, 1-dim "*norm*.weight"): 1 + 0.1 * N(0, 1); every other 1-dim
    parameter (biases): 0.1 * N(0, 1)
    ControlNets: tiny-sd15: canny (seed 9101), depth (seed 9102); tiny-sd2-v: canny (9201);
    tiny-sdxl: canny (9301).

Fixtures: `scripts/export-model STAGE OUT --controlnet CN=NAME...` (EXPORT_MODEL_PYTHON = this
interpreter, EXPORT_MODEL_VERIFY=0) per base; every file it writes except unet/model.onnx and
controlnet/** must be byte-identical to the committed onnx/<fixture> (and a plain export without
--controlnet must reproduce every committed file it writes, unet/model.onnx included). Only the differing
parts are written: onnx/tiny-controlnet/<fixture>/unet/{model.onnx,config.json} and
onnx/tiny-controlnet/<fixture>/controlnet/<NAME>/{model.onnx,config.json}. A ControlNet-ready folder is
onnx/<fixture> with onnx/tiny-controlnet/<fixture> copied over it.

Control images (tests/golden/controlnet/controls/, RGB 8-bit PNG, drawn with numpy):
    canny.png 64x64 (white lines and circles on black), depth.png 64x64 (a grey radial + linear gradient),
    canny-80x72.png 80 wide x 72 high (the edge pattern at another size: resized to 64x64),
    init.png 64x64 (a colour gradient with a square; img2img's init image).

References: diffusers' torch pipelines on CPU in float32 on the same weights (the rebuilt base components,
the torch ControlNets): StableDiffusionControlNetPipeline, StableDiffusionControlNetImg2ImgPipeline,
StableDiffusionXLControlNetPipeline; two ControlNets as MultiControlNetModel (a list). The folder's own
scheduler, generator = torch.Generator("cpu").manual_seed(seed), no latents passed, output_type="np".
Rules (what diffusers 0.39 does; the ones recorded per call are asserted below):
  * control image: VaeImageProcessor(do_convert_rgb=True, do_normalize=False).preprocess(image, height,
    width): PIL resize to (width, height) with Lanczos when the size differs, then x / 255 as float32
    [1, 3, H, W] in [0, 1]; with classifier-free guidance the same image is fed for both batch halves.
  * per step i of the scheduler's timesteps list T (PNDM: steps + 1 entries; img2img: after strength):
        keep_i = 1 - float(i / len(T) < start or (i + 1) / len(T) > end)
    the ControlNet runs every step (also with keep 0) with conditioning_scale = scale * keep_i: every
    down residual and the mid residual are multiplied by it (exactly what the exported graphs' outputs
    need: they are the residuals at scale 1.0).
  * several ControlNets: each one's scaled residuals are summed elementwise, then passed to the UNet
    (down_block_additional_residuals, mid_block_additional_residual are added to the UNet's skip
    connections / mid block output).
  * guess mode (case sd15-canny-guess): the ControlNet runs on the conditional half of the batch only, with
    the prompt embeddings; its residual k of N+1 (N down, then mid) is multiplied by
    torch.logspace(-1, 0, N + 1)[k] * scale * keep_i, and the unconditional half gets zero residuals.
no_control_mean_abs_diff = mean |image - the same call of the plain pipeline (StableDiffusionPipeline,
StableDiffusionImg2ImgPipeline, StableDiffusionXLPipeline from the same components) without ControlNet|;
it must exceed 0.01 (asserted). onnx_max_abs_diff = max |image - the same call with the UNet and the
ControlNets replaced by the committed graphs in onnxruntime (CPU, one thread), the ControlNet outputs scaled
by conditioning_scale (and guess mode's logspace) as the rules say| (asserted <= 1e-3): the graphs and the
rules together reproduce diffusers.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _env import REPO  # first: one CPU thread, offline Hub, no CUDA (see _env.py)

import numpy as np

import build_fixtures as bf
import fixture_lib as fl

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
CONTROL_GAIN = 1.0
# controlnet_cond_embedding widths (diffusers' default (16, 32, 96, 256) would add ~1.1 MB per tiny ControlNet);
# 4 entries = 3 stride-2 convs = the VAE's factor 8, as in every SD ControlNet.
COND_EMBED_CHANNELS = (8, 16, 16, 32)
FIXTURES = ["tiny-sd15", "tiny-sd2-v", "tiny-sdxl"]
CONTROLNETS = {
    "tiny-sd15": [("canny", 9101), ("depth", 9102)],
    "tiny-sd2-v": [("canny", 9201)],
    "tiny-sdxl": [("canny", 9301)],
}
ZERO_CONVS = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")


def case_plan() -> list[dict]:
    def case(cid, fx, controls, seed, steps=6, **extra):
        c = dict(
            id=cid,
            model=f"onnx/{fx}",
            controlnet=f"onnx/tiny-controlnet/{fx}",
            controls=[dict(controlnet=n, image=f"controls/{img}", scale=s, start=st, end=en)
                      for n, img, s, st, en in controls],
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            steps=steps,
            guidance_scale=7.5,
            scheduler=None,
            seed=seed,
            rng="torch",
            width=64,
            height=64,
            num_images=1,
            guess_mode=False,
        )
        c.update(extra)
        return c

    canny = ("canny", "canny.png", 1.0, 0.0, 1.0)
    return [
        case("sd15-canny", "tiny-sd15", [canny], 9001),
        case("sd15-canny-depth", "tiny-sd15", [canny, ("depth", "depth.png", 0.7, 0.0, 1.0)], 9002),
        case("sd15-canny-s0.5", "tiny-sd15", [("canny", "canny.png", 0.5, 0.0, 1.0)], 9001),
        case("sd15-canny-start0.2-end0.8", "tiny-sd15", [("canny", "canny.png", 1.0, 0.2, 0.8)], 9003, steps=10),
        case("sd15-canny-resize", "tiny-sd15", [("canny", "canny-80x72.png", 1.0, 0.0, 1.0)], 9004),
        case("sd15-img2img-canny", "tiny-sd15", [canny], 9005, init_image="controls/init.png", strength=0.6),
        case("sd15-canny-guess", "tiny-sd15", [canny], 9006, guess_mode=True),
        case("sd2v-canny", "tiny-sd2-v", [canny], 9007),
        case("sdxl-canny", "tiny-sdxl", [canny], 9008),
    ]


# ---------------------------------------------------------------------------------------------
# Control images
# ---------------------------------------------------------------------------------------------


def _edges(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w), np.uint8)
    sx, sy = w / 64.0, h / 64.0
    for cx, cy, r in ((22, 24, 12), (44, 40, 9), (32, 32, 26)):
        d = np.hypot((x - cx * sx) / sx, (y - cy * sy) / sy)
        img[np.abs(d - r) < 0.8] = 255
    img[np.abs((x / sx) - (y / sy) * 0.5 - 10) < 0.7] = 255  # a slanted line
    img[(np.abs(y / sy - 54) < 0.6) & (x / sx > 8) & (x / sx < 56)] = 255  # a horizontal line
    img[(np.abs(x / sx - 56) < 0.6) & (y / sy > 6) & (y / sy < 30)] = 255  # a vertical line
    return np.stack([img] * 3, axis=-1)


def write_controls(d: Path) -> None:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_edges(64, 64), "RGB").save(d / "canny.png")
    Image.fromarray(_edges(80, 72), "RGB").save(d / "canny-80x72.png")
    y, x = np.mgrid[0:64, 0:64].astype(np.float64)
    depth = np.clip(255 * (0.6 * (1 - np.hypot(x - 40, y - 28) / 48) + 0.4 * y / 63), 0, 255).round().astype(np.uint8)
    Image.fromarray(np.stack([depth] * 3, axis=-1), "RGB").save(d / "depth.png")
    init = np.stack([x / 63 * 255, y / 63 * 255, (1 - x / 63) * 200 + 30], axis=-1)
    init[20:44, 16:40] = (230, 200, 40)
    Image.fromarray(init.round().astype(np.uint8), "RGB").save(d / "init.png")


# ---------------------------------------------------------------------------------------------
# Torch models
# ---------------------------------------------------------------------------------------------


def build_stage(fx: str, stage: Path, tok_cache: Path) -> None:
    spec = bf.PIPELINES[fx]
    bf.save_torch_pipeline(fx, spec, stage, tok_cache)
    tok_dirs = ["tokenizer"] + (["tokenizer_2"] if spec["pipeline_class"] == "StableDiffusionXLPipeline" else [])
    for t in tok_dirs:
        pad = spec["tokenizer_pad"] if t == "tokenizer" else spec["tokenizer_2_pad"]
        shutil.rmtree(stage / t)
        fl.copy_tree_files(tok_cache / ("pad-eos" if pad == fl.EOS else "pad-bang"), stage / t)
    bf.write_scheduler_config(spec, stage)


def make_controlnet(stage: Path, seed: int, out: Path) -> dict:
    import diffusers
    import torch

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(stage / "unet"), torch_dtype=torch.float32)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_EMBED_CHANNELS)
    gen = torch.Generator("cpu").manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if p.dim() >= 2:
                gain = CONTROL_GAIN if name.startswith(ZERO_CONVS) else 1.0
                fan_in = p.numel() // p.shape[0]
                p.copy_(torch.randn(p.shape, generator=gen) * (gain / float(np.sqrt(fan_in))))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            n += p.numel()
    for name, p in cn.named_parameters():
        if name.startswith(ZERO_CONVS) and not bool((p != 0).any()):
            raise RuntimeError(f"{name} is still zero")
    cn.save_pretrained(str(out), safe_serialization=True)
    return dict(seed=seed, parameters=n, control_gain=CONTROL_GAIN,
                conditioning_embedding_out_channels=list(COND_EMBED_CHANNELS))


# ---------------------------------------------------------------------------------------------
# Export + fixture
# ---------------------------------------------------------------------------------------------


def export_model(stage: Path, out: Path, cns: list[tuple[str, Path]]) -> tuple[float, dict, str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [REPO / "scripts" / "export-model", stage, out]
    for name, d in cns:
        cmd += ["--controlnet", f"{d}={name}"]
    env = dict(fl.deterministic_env(), EXPORT_MODEL_PYTHON=sys.executable, EXPORT_MODEL_VERIFY="0")
    print("+", " ".join(str(c) for c in cmd), flush=True)
    t0 = time.monotonic()
    r = subprocess.run([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        print(r.stdout[-6000:])
        raise RuntimeError(f"export-model failed for {stage}")
    diffs = {}
    for m in re.finditer(r"export-model: (.+?): onnxruntime vs torch max abs diff (\S+)", r.stdout):
        diffs[m.group(1)] = float(m.group(2))
    timings = [l for l in r.stdout.splitlines() if l.startswith("export-model: timings:")]
    return dt, diffs, timings[-1] if timings else ""


def compare_export(export_dir: Path, committed: Path, skip) -> list[str]:
    checked = []
    for p in sorted(export_dir.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(export_dir)
        if skip(rel):
            continue
        q = committed / rel
        if not q.is_file():
            raise RuntimeError(f"the export has {rel}, the committed fixture {committed} does not")
        if fl.sha256(p) != fl.sha256(q):
            raise RuntimeError(f"the export differs from the committed fixture: {committed / rel}")
        checked.append(str(rel))
    return checked


def io_shapes(path: Path) -> dict:
    """Input/output names and dims of a graph (dim names for the dynamic axes, in order)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return dict(inputs=[dict(name=v.name, dims=dims(v)) for v in m.graph.input],
                outputs=[dict(name=v.name, dims=dims(v)) for v in m.graph.output])


def residuals_at_64(exp: Path, cn_name: str) -> dict:
    """Run the exported ControlNet graph at 64x64 (latents 8x8), batch 1, and record its output shapes; they
    must equal export_model.residual_shapes and be accepted by the residual UNet graph."""
    import onnxruntime as ort

    import export_model as em

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    cn = ort.InferenceSession(str(exp / "controlnet" / cn_name / "model.onnx"), so, providers=["CPUExecutionProvider"])
    unet = ort.InferenceSession(str(exp / "unet" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in cn.get_inputs():
        dims = {"batch_size": 1, "height": 8, "width": 8, "sequence_length": 77, "image_height": 64,
                "image_width": 64}
        shape = [dims[d] if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32) if shape else np.array(500.0, np.float32)
        if i.name == "controlnet_cond":
            feeds[i.name] = rng.random(shape).astype(np.float32)
    outs = cn.run(None, feeds)
    names = [o.name for o in cn.get_outputs()]
    ucfg = json.loads((exp / "unet" / "config.json").read_text(encoding="utf-8"))
    downs, mid = em.residual_shapes(ucfg, 8, 8)
    want = [[1, *s] for s in downs + [mid]]
    got = [list(o.shape) for o in outs]
    assert got == want, (got, want)
    ufeeds = {k: v for k, v in feeds.items() if k != "controlnet_cond"}
    for n, o in zip(names, outs):
        ufeeds[n.replace("down_block_res_sample_", "down_block_additional_residual_").replace(
            "mid_block_res_sample", "mid_block_additional_residual")] = o
    assert list(unet.run(None, ufeeds)[0].shape) == [1, 4, 8, 8]
    return dict(controlnet_outputs={n: g for n, g in zip(names, got)},
                unet_inputs={n.replace("down_block_res_sample_", "down_block_additional_residual_").replace(
                    "mid_block_res_sample", "mid_block_additional_residual"): g for n, g in zip(names, got)})


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


class CallRecorder:
    """Records the UNet timesteps and each ControlNet's conditioning_scale per call."""

    def __init__(self, pipe, cn_models: list):
        self.unet_calls, self.cn_scales = [], [[] for _ in cn_models]
        self.restore = []
        unet = pipe.unet
        orig = unet.forward

        def unet_fwd(sample, timestep, *a, **k):
            self.unet_calls.append((float(timestep), int(sample.shape[0])))
            return orig(sample, timestep, *a, **k)

        unet.forward = unet_fwd
        self.restore.append((unet, orig))
        for j, cn in enumerate(cn_models):
            o = cn.forward

            def cn_fwd(*a, _o=o, _j=j, **k):
                self.cn_scales[_j].append(float(k["conditioning_scale"]))
                return _o(*a, **k)

            cn.forward = cn_fwd
            self.restore.append((cn, o))

    def close(self):
        for m, o in self.restore:
            m.forward = o


class OnnxBackend:
    """Runs the pipeline's UNet and ControlNets through the exported graphs (onnxruntime CPU, one thread):
    the ControlNet graph's outputs are multiplied by conditioning_scale (and by the guess-mode logspace)
    as the rules say, so the result checks both the graphs and the rules against the torch pipeline."""

    def __init__(self, pipe, cn_models: list, overlay: Path, names: list[str], threads: int = 1):
        import onnxruntime as ort
        import torch

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3

        def sess(p):
            return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

        self.restore = []
        unet_sess = sess(overlay / "unet" / "model.onnx")
        unet_inputs = [i.name for i in unet_sess.get_inputs()]

        def np32(t):
            return t.detach().to(torch.float32).cpu().numpy()

        def unet_fwd(sample, timestep, encoder_hidden_states=None, down_block_additional_residuals=None,
                     mid_block_additional_residual=None, added_cond_kwargs=None, return_dict=False, **_k):
            feeds = {"sample": np32(sample), "timestep": np.array(float(timestep), np.float32),
                     "encoder_hidden_states": np32(encoder_hidden_states)}
            if "text_embeds" in unet_inputs:
                feeds["text_embeds"] = np32(added_cond_kwargs["text_embeds"])
                feeds["time_ids"] = np32(added_cond_kwargs["time_ids"])
            for k, r in enumerate(down_block_additional_residuals):
                feeds[f"down_block_additional_residual_{k}"] = np32(r)
            feeds["mid_block_additional_residual"] = np32(mid_block_additional_residual)
            return (torch.from_numpy(unet_sess.run(None, feeds)[0]),)

        self.restore.append((pipe.unet, pipe.unet.forward))
        pipe.unet.forward = unet_fwd
        for cn, name in zip(cn_models, names):
            cs = sess(overlay / "controlnet" / name / "model.onnx")
            xl = "text_embeds" in [i.name for i in cs.get_inputs()]

            def cn_fwd(sample, timestep, encoder_hidden_states=None, controlnet_cond=None, conditioning_scale=1.0,
                       guess_mode=False, added_cond_kwargs=None, return_dict=False, _cs=cs, _xl=xl, **_k):
                feeds = {"sample": np32(sample), "timestep": np.array(float(timestep), np.float32),
                         "encoder_hidden_states": np32(encoder_hidden_states),
                         "controlnet_cond": np32(controlnet_cond)}
                if _xl:
                    feeds["text_embeds"] = np32(added_cond_kwargs["text_embeds"])
                    feeds["time_ids"] = np32(added_cond_kwargs["time_ids"])
                outs = [torch.from_numpy(o) for o in _cs.run(None, feeds)]
                if guess_mode:
                    scales = torch.logspace(-1, 0, len(outs), device=outs[0].device)
                    outs = [o * (s * conditioning_scale) for o, s in zip(outs, scales)]
                else:
                    outs = [o * conditioning_scale for o in outs]
                return outs[:-1], outs[-1]

            self.restore.append((cn, cn.forward))
            cn.forward = cn_fwd

    def close(self):
        for m, o in self.restore:
            m.forward = o


def run_pipe(pipe, case: dict, controls: dict, cn_models: list, with_control: bool = True):
    import torch
    from PIL import Image

    kw = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"], num_inference_steps=case["steps"],
              guidance_scale=case["guidance_scale"], num_images_per_prompt=case["num_images"],
              generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np")
    if "init_image" in case:
        kw.update(image=controls["init"], strength=case["strength"])
    else:
        kw.update(width=case["width"], height=case["height"])
    if with_control:
        imgs = [controls[c["image"]] for c in case["controls"]]
        scales = [c["scale"] for c in case["controls"]]
        starts = [c["start"] for c in case["controls"]]
        ends = [c["end"] for c in case["controls"]]
        one = len(imgs) == 1
        key = "control_image" if "init_image" in case else "image"
        kw[key] = imgs[0] if one else imgs
        kw.update(controlnet_conditioning_scale=scales[0] if one else scales,
                  control_guidance_start=starts[0] if one else starts,
                  control_guidance_end=ends[0] if one else ends)
        if case["guess_mode"]:
            kw["guess_mode"] = True
    rec = CallRecorder(pipe, cn_models)
    try:
        images = pipe(**kw).images
    finally:
        rec.close()
    if not np.isfinite(images).all():
        raise FloatingPointError(f"{case['id']}: non-finite image")
    return images.astype(np.float32), rec


def make_goldens(out_golden: Path, out_fixtures: Path, repo_root: Path, only: list[str] | None) -> None:
    import diffusers
    import torch
    from importlib.metadata import version
    from PIL import Image

    torch.set_num_threads(1)
    diffusers.utils.logging.disable_progress_bar()
    plan = fl.select_cases(case_plan(), only)
    if out_golden.exists():
        shutil.rmtree(out_golden)
    out_golden.mkdir(parents=True)
    write_controls(out_golden / "controls")
    controls = {f"controls/{p.name}": Image.open(p).convert("RGB") for p in sorted((out_golden / "controls").iterdir())}
    controls["init"] = controls["controls/init.png"]

    fixtures = [fx for fx in FIXTURES if any(c["model"] == f"onnx/{fx}" for c in plan)] if only else FIXTURES
    export_info, cn_info, shapes = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="diffusiond-controlnet-") as td:
        work = Path(td)
        tok_cache = work / "tokenizers"
        stages, cn_dirs = {}, {}
        for fx in fixtures:
            stage = work / "stage" / fx
            build_stage(fx, stage, tok_cache)
            stages[fx] = stage
            cns = []
            for name, seed in CONTROLNETS[fx]:
                d = work / "controlnets" / fx / name
                cn_info[f"{fx}/{name}"] = make_controlnet(stage, seed, d)
                cns.append((name, d))
                cn_dirs[(fx, name)] = d
            committed = repo_root / "onnx" / fx
            plain = work / "export-plain" / fx
            t_plain, _, timing_plain = export_model(stage, plain, [])
            plain_checked = compare_export(plain, committed, lambda rel: False)
            assert "unet/model.onnx" in plain_checked and "scheduler/scheduler_config.json" in plain_checked
            shutil.rmtree(plain)
            exp = work / "export-cn" / fx
            t_cn, diffs, timing_cn = export_model(stage, exp, cns)
            cn_checked = compare_export(
                exp, committed, lambda rel: rel.parts[0] == "controlnet" or str(rel) == "unet/model.onnx")
            dst = out_fixtures / fx
            if dst.exists():
                shutil.rmtree(dst)
            written = []
            for rel in ["unet/model.onnx", "unet/config.json"] + sorted(
                    str(p.relative_to(exp)) for p in (exp / "controlnet").rglob("*") if p.is_file()):
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(exp / rel, dst / rel)
                written.append(f"onnx/tiny-controlnet/{fx}/{rel}")
            shapes[fx] = dict(unet=io_shapes(exp / "unet/model.onnx"),
                              controlnet=io_shapes(exp / "controlnet" / cns[0][0] / "model.onnx"),
                              at_64x64_batch_1=residuals_at_64(exp, cns[0][0]))
            export_info[fx] = dict(
                plain_export=f"{len(plain_checked)} files byte-identical to onnx/{fx}: " + ", ".join(plain_checked),
                controlnet_export=f"{len(cn_checked)} files byte-identical to onnx/{fx} (all but unet/model.onnx "
                "and controlnet/**): " + ", ".join(cn_checked),
                written=written,
                onnx_vs_torch_max_abs_diff=diffs,
            )
            print(f"export-model {fx}: plain {t_plain:.1f} s, with ControlNets {t_cn:.1f} s ({timing_cn})", flush=True)
            shutil.rmtree(exp)
            print(f"fixture {fx}: {', '.join(written)}; diffs {diffs}", flush=True)

        records = []
        for case in plan:
            fx = case["model"].split("/")[-1]
            stage = stages[fx]
            xl = fx == "tiny-sdxl"
            names = [c["controlnet"] for c in case["controls"]]
            cn_models = [diffusers.ControlNetModel.from_pretrained(str(cn_dirs[(fx, n)]), torch_dtype=torch.float32)
                         for n in names]
            cn = cn_models[0] if len(cn_models) == 1 else diffusers.MultiControlNetModel(cn_models)
            if "init_image" in case:
                cls, plain_cls = diffusers.StableDiffusionControlNetImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline
            elif xl:
                cls, plain_cls = diffusers.StableDiffusionXLControlNetPipeline, diffusers.StableDiffusionXLPipeline
            else:
                cls, plain_cls = diffusers.StableDiffusionControlNetPipeline, diffusers.StableDiffusionPipeline
            extra = {} if xl else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pipe = cls.from_pretrained(str(stage), controlnet=cn, torch_dtype=torch.float32, **extra)
            pipe.set_progress_bar_config(disable=True)
            images, rec = run_pipe(pipe, case, controls, cn_models)
            steps_t = [float(t) for t in pipe.scheduler.timesteps]
            n_t = len(rec.unet_calls)
            keep_rule = [[1.0 - float(i / n_t < c["start"] or (i + 1) / n_t > c["end"]) for c in case["controls"]]
                         for i in range(n_t)]
            keep = []
            for i in range(n_t):
                row = []
                for j, c in enumerate(case["controls"]):
                    s = rec.cn_scales[j][i]
                    row.append(0.0 if s == 0 else round(s / c["scale"], 12))
                keep.append(row)
                for j in range(len(names)):
                    assert len(rec.cn_scales[j]) == n_t
            if keep != keep_rule:
                raise RuntimeError(f"{case['id']}: recorded keep {keep} != rule {keep_rule}")
            onnx_be = OnnxBackend(pipe, cn_models, out_fixtures / fx, names)
            try:
                onnx_images, onnx_rec = run_pipe(pipe, case, controls, cn_models)
            finally:
                onnx_be.close()
            assert onnx_rec.unet_calls == rec.unet_calls and onnx_rec.cn_scales == rec.cn_scales
            onnx_diff = float(np.abs(onnx_images.astype(np.float64) - images.astype(np.float64)).max())
            if onnx_diff > 1e-3:
                raise RuntimeError(f"{case['id']}: the exported graphs give another image (max abs diff {onnx_diff:.3g})")
            plain = plain_cls.from_pretrained(str(stage), torch_dtype=torch.float32, **extra)
            plain.set_progress_bar_config(disable=True)
            base_images, base_rec = run_pipe(plain, case, controls, [], with_control=False)
            assert [t for t, _ in base_rec.unet_calls] == [t for t, _ in rec.unet_calls]
            diff = float(np.abs(images.astype(np.float64) - base_images.astype(np.float64)).mean())
            if diff <= 0.01:
                raise RuntimeError(f"{case['id']}: the ControlNet changes the image too little ({diff:.4f})")
            d = out_golden / case["id"]
            d.mkdir(parents=True)
            imgs, pngs = [], []
            for k in range(images.shape[0]):
                np.save(d / f"image{k}.npy", images[k])
                Image.fromarray((images[k] * 255).round().astype(np.uint8)).save(d / f"image{k}.png")
                imgs.append(f"{case['id']}/image{k}.npy")
                pngs.append(f"{case['id']}/image{k}.png")
            rec_case = dict(case)
            rec_case.update(
                pipeline_class=cls.__name__,
                scheduler_class=type(pipe.scheduler).__name__,
                scheduler_timesteps=steps_t,
                unet_timesteps=[t for t, _ in rec.unet_calls],
                unet_calls=n_t,
                unet_batch=rec.unet_calls[0][1],
                controlnet_keep=keep,
                images=imgs,
                pngs=pngs,
                image_shape=list(images.shape[1:]),
                no_control_mean_abs_diff=round(diff, 6),
                onnx_max_abs_diff=float(f"{onnx_diff:.1g}"),
            )
            records.append(rec_case)
            print(f"ok   {case['id']}  no_control_mean_abs_diff={diff:.4f}  onnx_max_abs_diff={onnx_diff:.2g}", flush=True)
            del pipe, plain

    manifest = {
        "description": "ControlNet references for the tiny fixtures. Generated by onnx/make_controlnet_references.py "
        "(its docstring has the full rules): seeded random ControlNets (ControlNetModel.from_unet, every parameter "
        "re-drawn), exported with scripts/export-model; the images come from diffusers' torch ControlNet pipelines "
        "(CPU, float32) on the same weights. A case's model folder is `model` with `controlnet` copied over it "
        "(onnx/tiny-controlnet/<fixture>: unet/ with residual inputs and controlnet/<NAME>/). File paths are relative "
        "to this folder, model paths to the repository root.",
        "versions": {p: version(p) for p in ["torch", "diffusers", "transformers", "optimum-onnx", "onnx",
                                             "onnxruntime", "numpy", "pillow"]},
        "rules": {
            "control_image": "RGB; PIL resize to (width, height) with Lanczos when the size differs (diffusers "
            "VaeImageProcessor(do_convert_rgb=True, do_normalize=False).preprocess), then x / 255 as float32 "
            "[batch, 3, height, width] in [0, 1] (the ControlNet's controlnet_cond input); the same image for both "
            "halves of the classifier-free-guidance batch",
            "keep": "per step i of the scheduler's timesteps list T (len(T) = number of UNet calls; PNDM: steps + 1; "
            "img2img: the timesteps left after strength): keep_i = 1 - float(i / len(T) < start or (i + 1) / len(T) > "
            "end); the ControlNet still runs when keep_i is 0 (residuals scaled by 0)",
            "residual_scaling": "every residual the ControlNet graph outputs (at conditioning scale 1.0) is multiplied "
            "by scale * keep_i",
            "multi_controlnet": "the scaled residuals of several ControlNets are summed elementwise (down_k = sum_j "
            "down_k^j, mid = sum_j mid^j) and fed to the UNet's down_block_additional_residual_k / "
            "mid_block_additional_residual",
            "controlnet_inputs": "sample = the scaled UNet input latents (the same tensor as the UNet's sample), "
            "timestep = the UNet's timestep, encoder_hidden_states = the UNet's (SDXL: text_embeds and time_ids too)",
            "guess_mode": "guess_mode true: the ControlNet runs on the conditional half only (its latents and prompt "
            "embeddings); residual k of the N+1 outputs (N down, then mid) is multiplied by torch.logspace(-1, 0, N+1)[k] "
            "* scale * keep_i; the unconditional half's residuals are zeros",
            "rng": "generator=torch.Generator('cpu').manual_seed(seed), no latents passed (as tests/golden/pipelines)",
        },
        "fields": {
            "model": "base fixture folder (repository root relative)",
            "controlnet": "folder to copy over `model` (unet/ with residual inputs, controlnet/<NAME>/)",
            "controls": "per ControlNet, in the order they are summed: controlnet (NAME under controlnet/), image "
            "(relative to this folder), scale, start, end (control_guidance_start / _end)",
            "scheduler": "null = the folder's scheduler_config.json unchanged",
            "init_image, strength": "img2img cases only (StableDiffusionControlNetImg2ImgPipeline)",
            "unet_timesteps": "value of the UNet 'timestep' input at every UNet call",
            "controlnet_keep": "per UNet call, per ControlNet: the keep factor (recorded conditioning_scale / scale)",
            "images": "float32 HxWx3 in [0,1] (output_type='np'); pngs: (x*255).round() uint8",
            "residuals": "per fixture: the residual UNet's and the ControlNet's graph inputs/outputs (names, dims in "
            "order; strings are dynamic axes) and the residual shapes at 64x64, batch 1 (run in onnxruntime)",
            "onnx_max_abs_diff": "max |image - the same call with the UNet and ControlNets replaced by the committed "
            "graphs (onnxruntime CPU, 1 thread), their outputs scaled by the rules above| (1 significant digit; "
            "asserted <= 1e-3)",
            "no_control_mean_abs_diff": "mean |image - the same call of the plain pipeline without ControlNet| (float64)",
        },
        "residuals": shapes,
        "controlnets": cn_info,
        "export_check": export_info,
        "cases": records,
    }
    (out_golden / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    print(f"{len(records)} cases")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", type=Path, default=REPO,
                    help="writes <out-root>/tests/golden/controlnet and <out-root>/onnx/tiny-controlnet/<fixture>")
    ap.add_argument("--repo-root", type=Path, default=REPO, help="where to find onnx/<fixture>")
    ap.add_argument("--only", default=None, help="comma list of case ids (the manifest then has only those)")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s] if args.only else None
    root = args.out_root.resolve()
    make_goldens(root / "tests" / "golden" / "controlnet", root / "onnx" / "tiny-controlnet",
                 args.repo_root.resolve(), only)


if __name__ == "__main__":
    sys.exit(main())
