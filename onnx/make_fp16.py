#!/usr/bin/env python3
"""fp16 fixture (onnx/tiny-sd15-fp16/) and its Optimum references (tests/golden/fp16/).

Usage (from the repository root):
    onnx/.venv/bin/python onnx/make_fp16.py                        # fixture + references
    onnx/.venv/bin/python onnx/make_fp16.py --only fixture         # onnx/tiny-sd15-fp16 only
    onnx/.venv/bin/python onnx/make_fp16.py --only references      # tests/golden/fp16 only
    onnx/.venv/bin/python onnx/make_fp16.py --check                # rebuild both into a temp dir and
                                                                   # compare sha256 with the committed files

1. Fixture. onnx/tiny-sd15 (fp32, Optimum export layout) is converted into onnx/tiny-sd15-fp16 laid
   out as `optimum-cli export onnx --dtype fp16` lays out an SD1.x export. What that export produces
   was read in the installed sources (optimum 2.1.0 + optimum-onnx 0.1.0, site-packages/optimum/):
     * exporters/onnx/__main__.py:240-241: `--dtype fp16` -> torch_dtype = torch.float16, and the whole
       diffusers pipeline is loaded with it (line 336), so EVERY component (text encoder included) has
       fp16 weights; no component is kept in fp32 (there is no force_upcast / keep-fp32 rule for SD1.x).
     * exporters/onnx/convert.py:933-940: float_dtype = "fp16" from the model's parameter dtype, passed
       to _get_submodels_and_onnx_configs (line 990) and export_models(dtype=float_dtype) (line 1087).
     * exporters/utils.py:261-362 (get_diffusion_models_for_export): text_encoder, unet, vae_encoder and
       vae_decoder export configs are all built with float_dtype=fp16 and int_dtype="int64" (default,
       line 263).
     * The graph io types are those of the dummy inputs the export traces with:
       utils/input_generators.py DummyTextInputGenerator: `input_ids` int64 (int_dtype);
       DummyVisionInputGenerator: `sample` / `latent_sample` float16; DummyTimestepInputGenerator.generate
       (input_generators.py:957-960): `timestep` is a rank-0 random_float_tensor with dtype=float_dtype,
       i.e. a float16 scalar; DummySeq2SeqDecoderTextInputGenerator: `encoder_hidden_states` float16.
       Outputs are whatever the fp16 torch modules return: float16.
   So the fp16 interface is:
     text_encoder  input_ids int64 [batch, seq]          -> last_hidden_state, pooler_output  float16
     unet          sample, timestep (rank 0), encoder_hidden_states  float16 -> out_sample  float16
     vae_encoder   sample float16                        -> latent_parameters float16
     vae_decoder   latent_sample float16                 -> sample float16
   i.e. the text encoder is NOT kept fp32: it gets fp16 weights and fp16 outputs; input_ids stay int64.
   This script follows that exactly: onnxruntime.transformers.float16.convert_float_to_float16 on all
   four graphs with keep_io_types=False (every float graph input/output becomes float16, int64 stays)
   and op_block_list = float16.DEFAULT_OP_BLOCK_LIST (the library default, spelled out). Of its ops only
   Range occurs (text encoder, int64 operands only), so in practice nothing is kept in fp32 except the
   `scales` input of Resize, which ONNX requires to be float32 (the converter inserts a Cast). No extra
   op needs blocking: ONNX Runtime 1.32's CPU provider loads and runs all four graphs (for fp16 nodes
   without a CPU fp16 kernel its InsertCastTransformer computes them in fp32 between Casts, the same in
   Python and in Rust). All float initializers and Constant tensors end up float16 (asserted).
   The non-graph files (configs, tokenizer, scheduler, model_index.json) are copied byte for byte,
   except text_encoder/config.json, whose `"dtype": "float32"` becomes `"dtype": "float16"` as
   transformers writes it for a model loaded in fp16 (the diffusers configs of unet/vae carry no dtype).
   Caveat: a real fp16 torch export keeps a few internal computations in fp32 (e.g. diffusers'
   sinusoidal timestep embedding is computed in float32 and cast with `.to(sample.dtype)`); the
   converter makes every internal tensor fp16. The interface, which is what the pipelines see, is
   Optimum's.

2. References. Optimum's ORT pipelines loaded from onnx/tiny-sd15-fp16 with the session options of
   make_references.py (CPUExecutionProvider, one intra-op thread, no IO binding; load_pipeline and
   Recorder come from make_edit_references.py), generator = torch.Generator("cpu").manual_seed(seed),
   output_type="np", image{k}.npy (float32 HxWx3) and image{k}.png (numpy_to_pil). txt2img runs
   ORTDiffusionPipeline (-> ORTStableDiffusionPipeline from model_index.json), img2img
   ORTStableDiffusionImg2ImgPipeline. Schedulers by diffusiond name (onnx/scheduler_names.py); null =
   the folder's own PNDM config unchanged. Field names follow tests/golden/edit/manifest.json.

   What an fp16 graph changes on the Python side (diffusers 0.39.0 + optimum-onnx 0.1.0, read in the
   sources): ORTModelMixin takes its `dtype` from the session io types (onnxruntime/base.py:76,
   utils.get_dtype_from_session) -> float16 for all four parts; _prepare_onnx_inputs (base.py:249-265)
   casts every input to the declared type with numpy .astype, and _prepare_onnx_outputs (base.py:
   281-289) returns the outputs as they come, float16 torch tensors. The diffusers pipeline then keeps
   the HOST arithmetic in float16 too:
     * pipeline_stable_diffusion.py:439-446 encode_prompt: prompt_embeds.to(self.text_encoder.dtype)
       = float16; line 1004: prepare_latents(..., prompt_embeds.dtype) -> randn_tensor(..., dtype=float16)
       (torch CPU's float16 randn gives exactly the float32 draw rounded to float16; asserted below)
       and `latents * init_noise_sigma` in float16.
     * the denoising loop (lines 1034-1061): torch.cat, scheduler.scale_model_input, the CFG combination
       `uncond + guidance_scale * (text - uncond)` and scheduler.step all operate on float16 tensors
       (each torch op rounds its result to float16; PNDM's 4-term ets combination, DDIM's
       alpha/beta formulas and add_noise (alphas_cumprod cast to the sample dtype) run in float16;
       Euler-ancestral upcasts the sample to float32 inside step() but returns prev_sample in float16
       and draws its step noise in float16), so the latents are rounded to float16 after every op.
     * decode: vae_decoder(latents / scaling_factor) with the division in float16; VaeImageProcessor.
       postprocess: (x / 2 + 0.5).clamp(0, 1) in float16, then .float() -> the float32 image holds
       float16 values.
     * img2img (pipeline_stable_diffusion_img2img.py prepare_latents): the preprocessed float32 image is
       cast to float16 (`image.to(dtype=dtype)`), DiagonalGaussianDistribution works on the float16
       latent_parameters (clamp, exp, eps drawn in float16), scaling_factor * z in float16, noise drawn
       in float16, add_noise in float16.
   Each case also records `unet_input_dtypes` etc. (what the graphs were fed), and `f32_host_diff`: the
   same case rerun with the same fp16 graphs but float32 host arithmetic (every part's dtype set to
   float32 and its float16 outputs cast to float32 right after session.run, so only the graph io is
   float16), compared with the reference by the parity measure of tests/common/parity.rs; its images
   are kept as f32_host_image{k}.npy/.png (a diagnostic reference, not Optimum's output). That is
   where a pipeline that keeps its latents in float32 and converts only at the graph boundary (as
   diffusiond does) lands: with ONNX Runtime 1.32 on x86-64 diffusiond reproduces them bit for bit,
   and they miss Optimum's fp16-host images by up to ~3e-3 (see tests/fp16_parity.rs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _env import REPO  # first: one CPU thread, offline Hub, no CUDA (see _env.py)

import numpy as np

from fixture_lib import SESSION_OPTIONS, Recorder, save_images, sha256
from make_edit_references import NEGATIVES, PROMPTS, load_pipeline
from scheduler_names import SCHEDULERS

SRC = "onnx/tiny-sd15"
DST = "onnx/tiny-sd15-fp16"
PARTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
INIT_64 = "../edit/inputs/init-64x64.png"  # relative to tests/golden/fp16

# ---------------------------------------------------------------------------------------------
# 1. Fixture
# ---------------------------------------------------------------------------------------------


def _float_tensors(model):
    """(name, data_type) of every initializer and Constant-node tensor of the main graph."""
    out = [(t.name, t.data_type) for t in model.graph.initializer]
    for n in model.graph.node:
        if n.op_type == "Constant":
            out += [(n.name, a.t.data_type) for a in n.attribute if a.name == "value"]
    return out


def topological_sort(graph) -> None:
    """Stable topological order of the main graph's nodes (the converter appends its Casts at the end;
    ONNX requires producers before consumers). Among ready nodes the earlier original position wins,
    so the order is deterministic and otherwise the exporter's."""
    import heapq

    nodes = list(graph.node)
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
    waiting = {}
    missing = []
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in n.input if x not in available and x in producer}
        missing.append(len(deps))
        for d in deps:
            waiting.setdefault(d, []).append(i)
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in waiting.get(i, []):
            missing[j] -= 1
            if missing[j] == 0:
                heapq.heappush(ready, j)
    assert len(order) == len(nodes), "cycle in graph"
    sorted_nodes = [nodes[i] for i in order]
    del graph.node[:]
    graph.node.extend(sorted_nodes)


def convert_graph(src: Path, dst: Path) -> dict:
    import onnx
    from onnx import TensorProto
    from onnxruntime.transformers import float16

    model = onnx.load(str(src))
    m16 = float16.convert_float_to_float16(
        model,
        keep_io_types=False,
        op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST),
    )
    topological_sort(m16.graph)
    onnx.checker.check_model(m16, full_check=True)
    left = [name for name, dt in _float_tensors(m16) if dt == TensorProto.FLOAT]
    assert not left, f"{src}: float32 tensors left: {left}"
    for v in list(m16.graph.input) + list(m16.graph.output):
        assert v.type.tensor_type.elem_type in (TensorProto.FLOAT16, TensorProto.INT64), (src, v.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m16, str(dst))
    io = lambda vs: {v.name: TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in vs}  # noqa: E731
    return {"inputs": io(m16.graph.input), "outputs": io(m16.graph.output)}


def build_fixture(repo_root: Path, out: Path) -> None:
    src = repo_root / SRC
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for p in sorted(src.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(src)
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if p.name == "model.onnx":
            assert rel.parent.name in PARTS, rel
            io = convert_graph(p, target)
            print(f"  {rel}: {io}", flush=True)
        elif rel.as_posix() == "text_encoder/config.json":
            text = p.read_text(encoding="utf-8")
            assert text.count('"dtype": "float32"') == 1, "text_encoder/config.json: no dtype field"
            target.write_text(text.replace('"dtype": "float32"', '"dtype": "float16"'), encoding="utf-8")
        else:
            shutil.copyfile(p, target)
    assert sorted(d.name for d in out.iterdir() if (d / "model.onnx").exists()) == sorted(PARTS)
    check_sessions(out)


def check_sessions(folder: Path) -> None:
    """Every graph loads on the CPU provider with float16 float io and runs on a small input."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    rs = np.random.RandomState(0)
    feeds = {
        "text_encoder": {"input_ids": rs.randint(0, 49407, size=(2, 77)).astype(np.int64)},
        "unet": {
            "sample": rs.randn(2, 4, 8, 8).astype(np.float16),
            "timestep": np.array(981, np.float16),
            "encoder_hidden_states": rs.randn(2, 77, 32).astype(np.float16),
        },
        "vae_decoder": {"latent_sample": rs.randn(1, 4, 8, 8).astype(np.float16)},
        "vae_encoder": {"sample": rs.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float16)},
    }
    for part in PARTS:
        s = ort.InferenceSession(str(folder / part / "model.onnx"), so, providers=["CPUExecutionProvider"])
        for o in s.get_outputs():
            assert o.type == "tensor(float16)", (part, o.name, o.type)
        for out in s.run(None, feeds[part]):
            assert out.dtype == np.float16 and np.isfinite(out).all(), part


# ---------------------------------------------------------------------------------------------
# 2. References
# ---------------------------------------------------------------------------------------------


def case_plan() -> list[dict]:
    cases = []
    seed = 3000

    def add(**kw):
        nonlocal seed
        base = dict(
            mode="txt2img",
            model=DST,
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

    p = PROMPTS
    add(prompt=p[0], steps=4, guidance_scale=7.5, width=64, height=64)
    add(prompt=p[1], steps=4, guidance_scale=1.0, width=96, height=64)
    add(prompt=p[2], steps=4, guidance_scale=7.5, width=64, height=64, num_images=2, negative_prompt=NEGATIVES[0])
    add(scheduler="euler-a", prompt=p[3], steps=4, guidance_scale=7.5, width=64, height=64)
    add(scheduler="euler-a", prompt=p[0], steps=6, guidance_scale=1.0, width=96, height=64)
    add(scheduler="ddim", prompt=p[1], steps=4, guidance_scale=7.5, width=96, height=64,
        negative_prompt=NEGATIVES[1])
    add(scheduler="ddim", prompt=p[2], steps=6, guidance_scale=1.0, width=64, height=64)
    add(mode="img2img", prompt=p[0], steps=8, guidance_scale=7.5, strength=0.6, init_image=INIT_64)

    for c in cases:
        short = c["model"].split("/")[-1].replace("tiny-", "")
        size = f"{c['width']}x{c['height']}" if c["mode"] == "txt2img" else Path(c["init_image"]).stem.replace("init-", "")
        c["id"] = (
            f"{c['mode']}-{short}-{c['scheduler'] or 'default'}-s{c['steps']}"
            + (f"-st{c['strength']:g}" if c["strength"] is not None else "")
            + f"-g{c['guidance_scale']:g}-{size}-n{c['num_images']}-{c['seed']}"
        )
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


def pipeline_class(mode: str):
    from optimum.onnxruntime import ORTDiffusionPipeline, ORTStableDiffusionImg2ImgPipeline

    return ORTDiffusionPipeline if mode == "txt2img" else ORTStableDiffusionImg2ImgPipeline


def ort_parts(pipe) -> dict:
    parts = {"text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae_decoder": pipe.vae_decoder}
    if getattr(pipe, "vae_encoder", None) is not None:
        parts["vae_encoder"] = pipe.vae_encoder
    return parts


@contextlib.contextmanager
def f32_host(pipe):
    """Float32 host arithmetic around the same fp16 graphs: every part reports dtype float32 (so the
    pipeline draws and keeps its latents/embeddings in float32) and its float16 outputs are cast to
    float32 right after session.run; Optimum still casts the inputs to float16 (its .astype)."""
    import torch

    saved = []
    for part in ort_parts(pipe).values():
        sess = part.session
        orig = sess.run

        def run(names, feeds, *a, _orig=orig, **kw):
            return [o.astype(np.float32) if o.dtype == np.float16 else o for o in _orig(names, feeds, *a, **kw)]

        saved.append((part, part._dtype, sess, orig))
        part._dtype = torch.float32
        sess.run = run
    try:
        yield
    finally:
        for part, dtype, sess, orig in saved:
            part._dtype = dtype
            sess.run = orig


def call_pipeline(pipe, base_cfg: dict, case: dict, golden: Path, capture: dict | None = None):
    import diffusers
    import torch
    from PIL import Image

    if case["scheduler"] is None:
        cls_name, extra = base_cfg["_class_name"], {}
    else:
        cls_name, extra = SCHEDULERS[case["scheduler"]]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(base_cfg, **extra)
    n = case["num_images"]
    kwargs = dict(
        prompt=case["prompt"],
        negative_prompt=case["negative_prompt"],
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance_scale"],
        num_images_per_prompt=n,
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        output_type="np",
    )
    if case["mode"] == "txt2img":
        kwargs.update(width=case["width"], height=case["height"])
    else:
        kwargs.update(image=Image.open(golden / case["init_image"]).convert("RGB"), strength=case["strength"])

    recs = {name: Recorder(part.session) for name, part in ort_parts(pipe).items()} if capture is not None else {}
    orig_prepare = pipe.prepare_latents

    def prepare_latents(*a, **kw):
        out = orig_prepare(*a, **kw)
        lat = out[0] if isinstance(out, tuple) else out
        capture["latents"] = lat.detach().clone()
        return out

    if capture is not None:
        pipe.prepare_latents = prepare_latents
    try:
        images = pipe(**kwargs).images
    finally:
        pipe.prepare_latents = orig_prepare
        for r in recs.values():
            r.restore()
    if capture is not None:
        capture.update(recs=recs, cls_name=cls_name, extra=extra)
    if not np.isfinite(images).all():
        raise FloatingPointError("non-finite image")
    return images


def parity_diff(got: np.ndarray, want: np.ndarray) -> dict:
    """tests/common/parity.rs's Diff: float max, PNG byte max, bytes > 1 level apart."""
    a = (got * 255).round().astype(np.uint8).astype(np.int16)
    b = (want * 255).round().astype(np.uint8).astype(np.int16)
    d = np.abs(a - b)
    return {
        "float_max": float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max()),
        "pixel_max": int(d.max()),
        "pixel_over_1": int((d > 1).sum()),
        "pixels": int(d.size),
    }


def run_case(pipe, base_cfg: dict, case: dict, golden: Path) -> dict:
    import torch

    cap = {}
    images = call_pipeline(pipe, base_cfg, case, golden, cap)
    recs = cap["recs"]
    n = case["num_images"]
    lat = cap["latents"]
    assert lat.dtype == torch.float16, lat.dtype
    if case["mode"] == "txt2img":
        # the documented draw: randn in float16 = the float32 draw rounded, times init_noise_sigma in float16
        shape = (n, 4, case["height"] // 8, case["width"] // 8)
        d16 = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(case["seed"]), dtype=torch.float16)
        d32 = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(case["seed"]), dtype=torch.float32)
        assert torch.equal(d16, d32.half())
        assert torch.equal(d16 * pipe.scheduler.init_noise_sigma, lat)

    with f32_host(pipe):
        host32 = call_pipeline(pipe, base_cfg, case, golden)
    f32_diff = parity_diff(host32, images)

    out_dir = golden / case["id"]
    out_dir.mkdir(parents=True, exist_ok=True)
    rel = out_dir.name
    np.save(out_dir / "latents.npy", lat.float().numpy())
    img_files, png_files = save_images(out_dir, images, pipe.numpy_to_pil(images))
    host_files, host_pngs = save_images(out_dir, host32, pipe.numpy_to_pil(host32), stem="f32_host_image")

    unet_calls = recs["unet"].calls
    rec = {
        k: case[k]
        for k in (
            "id", "mode", "model", "prompt", "negative_prompt", "scheduler", "steps", "guidance_scale",
            "strength", "width", "height", "num_images", "seed",
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
        latents_shape=list(lat.shape),
        latents_dtype=str(lat.dtype).replace("torch.", ""),
        unet_timesteps=[float(c["timestep"]) for c in unet_calls],
        unet_calls=len(unet_calls),
        unet_batch=int(unet_calls[0]["sample"].shape[0]),
        unet_input_dtypes={k: str(v.dtype) for k, v in unet_calls[0].items()},
        unet_output_dtype=str(recs["unet"].outputs[0][0].dtype),
        text_encoder_output_dtypes=[str(o.dtype) for o in recs["text_encoder"].outputs[0]],
        vae_decoder_input_dtype=str(recs["vae_decoder"].calls[0]["latent_sample"].dtype),
        vae_encoder_calls=len(recs["vae_encoder"].calls) if "vae_encoder" in recs else 0,
        init_noise_sigma=float(torch.as_tensor(pipe.scheduler.init_noise_sigma, dtype=torch.float32)),
        scheduler_timesteps=[float(t) for t in pipe.scheduler.timesteps],
        pipeline_class=type(pipe).__name__,
        scheduler_class=cap["cls_name"],
        scheduler_extra=cap["extra"],
        f32_host_images=host_files,
        f32_host_pngs=host_pngs,
        f32_host_diff=f32_diff,
    )
    return rec


def make_references(golden: Path, repo_root: Path) -> None:
    import torch
    from importlib.metadata import version

    torch.set_num_threads(1)
    if golden.exists():
        shutil.rmtree(golden)
    golden.mkdir(parents=True)
    # the init image lives with the edit goldens; resolve it against the committed tree
    init_src = REPO / "tests" / "golden" / "fp16" / INIT_64
    plan = case_plan()
    records = []
    cache = {}
    for case in plan:
        if case["init_image"] and not (golden / case["init_image"]).exists():
            (golden / case["init_image"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(init_src, golden / case["init_image"])
        if case["mode"] not in cache:
            cache.clear()
            pipe = load_pipeline(pipeline_class(case["mode"]), repo_root / case["model"])
            cache[case["mode"]] = (pipe, dict(pipe.scheduler.config))
        pipe, base_cfg = cache[case["mode"]]
        rec = run_case(pipe, base_cfg, case, golden)
        records.append(rec)
        print(f"ok   {case['id']}  unet calls={rec['unet_calls']}  f32 host: {rec['f32_host_diff']}", flush=True)

    manifest = {
        "description": "Reference outputs of Optimum's ORT pipelines (diffusers) for the fp16 fixture "
        "onnx/tiny-sd15-fp16 (onnx/tiny-sd15 converted by onnx/make_fp16.py, float16 weights and float16 "
        "graph io as Optimum's --dtype fp16 export). Generated by onnx/make_fp16.py (its docstring has the "
        "rules). File paths are relative to this folder, model paths to the repository root.",
        "versions": {
            p: version(p)
            for p in ["torch", "diffusers", "transformers", "optimum-onnx", "onnx", "onnxruntime", "numpy", "pillow"]
        },
        "session_options": SESSION_OPTIONS,
        "fields": {
            "mode": "txt2img | img2img",
            "scheduler": "diffusiond scheduler name (onnx/scheduler_names.py) or null = the folder's "
            "scheduler_config.json (PNDM) unchanged",
            "strength": "null for txt2img",
            "width/height": "txt2img only (img2img uses the init image size)",
            "init_image": "path relative to this folder (the edit goldens' input), or null",
            "images": "float32 HxWx3 in [0,1] (output_type='np'; the values are float16 values, the "
            "postprocess runs in float16); pngs: (x*255).round() uint8",
            "latents": "the output of pipeline.prepare_latents (float16 in the pipeline), saved as float32",
            "unet_timesteps": "value of the UNet 'timestep' input (a float16 scalar here) at every UNet call",
            "unet_input_dtypes": "numpy dtypes of what the UNet was fed on its first call",
            "f32_host_images/f32_host_pngs": "diagnostic, not Optimum's output: the same case rerun with float32 "
            "host arithmetic around the same fp16 graphs (see the script's docstring), i.e. what a pipeline that "
            "converts only at the graph inputs/outputs produces",
            "f32_host_diff": "f32_host_images compared with images: float max, PNG byte max, bytes > 1 apart",
        },
        "rules": {
            "rng": "generator=torch.Generator('cpu').manual_seed(seed) passed to the pipeline; no latents passed. "
            "Draws are float16 (randn_tensor(dtype=prompt_embeds.dtype)); torch CPU's float16 randn equals the "
            "float32 draw rounded to float16.",
            "host_dtype": "float16: prompt embeddings, latents, CFG combination, scheduler.step, add_noise, "
            "latents / scaling_factor and the postprocess all operate on float16 torch tensors",
            "graph_io": "text_encoder input_ids int64 -> float16; unet sample/timestep/encoder_hidden_states "
            "float16 -> float16; vae_encoder float16 -> float16; vae_decoder float16 -> float16",
        },
        "inputs": {INIT_64: {"sha256": sha256(init_src)}},
        "cases": records,
    }
    (golden / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(records)} cases")


# ---------------------------------------------------------------------------------------------


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def check(only: str | None) -> int:
    """Rebuild into a temp dir and compare every file's sha256 with the committed tree."""
    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-fp16-"))
    bad = 0
    try:
        pairs = []
        if only in (None, "fixture"):
            build_fixture(REPO, tmp / DST)
            pairs.append((REPO / DST, tmp / DST))
        if only in (None, "references"):
            root = tmp if only is None else REPO  # references of the rebuilt fixture when both are rebuilt
            make_references(tmp / "tests/golden/fp16", root)
            pairs.append((REPO / "tests/golden/fp16", tmp / "tests/golden/fp16"))
        for committed, rebuilt in pairs:
            a, b = tree_hashes(committed), tree_hashes(rebuilt)
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    bad += 1
                    print(f"DIFFERS {committed.relative_to(REPO)}/{name}")
            print(f"{committed.relative_to(REPO)}: {len(b)} files compared")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("identical" if not bad else f"{bad} files differ")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["fixture", "references"], default=None)
    ap.add_argument("--check", action="store_true", help="rebuild into a temp dir, compare sha256, write nothing")
    args = ap.parse_args(argv)
    if args.check:
        return check(args.only)
    if args.only in (None, "fixture"):
        build_fixture(REPO, REPO / DST)
    if args.only in (None, "references"):
        make_references(REPO / "tests" / "golden" / "fp16", REPO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
