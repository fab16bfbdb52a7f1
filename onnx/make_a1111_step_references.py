#!/usr/bin/env python3
"""Image-level references for AUTOMATIC1111 prompts as webui 1.10.1 runs them by default:
tests/golden/a1111/steps/.

Usage (from the repository root):
    onnx/.venv/bin/python onnx/make_a1111_step_references.py --webui /path/to/stable-diffusion-webui
    onnx/.venv/bin/python onnx/make_a1111_step_references.py --webui DIR --out-root /tmp/g

--webui is a checkout (or any folder) of AUTOMATIC1111/stable-diffusion-webui at v1.10.1
(commit 82a973c) that holds modules/prompt_parser.py. That file is imported as webui runs
it (it needs lark==1.1.2, webui's pin, and torch); it is AGPL and is not part of this
repository. Nothing else of webui is imported: its CFG denoiser lives in modules that need
the whole webui, so the few lines this script takes from `sd_samplers_cfg_denoiser.py`
(CFGDenoiser.forward with default settings, `pad_cond_uncond`, `combine_denoised`) are
written out below, each step named after webui's.

What is webui's here:
 - get_multicond_learned_conditioning(model, prompts, steps) for the prompt (AND parts,
   weights, prompt editing and alternation schedules) and get_learned_conditioning(model,
   SdConditioning(negatives, is_negative_prompt=True), steps) for the negative prompt,
   called with `model.get_learned_conditioning(texts)` = the encoding below;
 - reconstruct_multicond_batch / reconstruct_cond_batch at each step (stack_conds pads
   AND parts of different lengths by repeating their last vector);
 - parse_prompt_attention for every text.

The encoding (webui's sd_hijack_clip with default settings, as onnx/golden_a1111.py pins it):
each text of the batch is chunked per encoder (75 tokens, comma back-off 20, BREAK), all
texts and, on SDXL, both encoders are padded with empty chunks to the largest count, each
chunk is encoded on its own and weighted with its mean restored; SDXL concatenates the two
encoders on the feature axis and takes text_encoder_2's text_embeds of the first chunk as
`vector`. On SDXL a negative batch whose texts are all '' is zeros (sd_models_xl's
force_zero_negative_prompt).

The denoiser, per UNet call of Optimum's pipeline (its ORT session's run() is replaced):
 - conds_list, tensor = reconstruct_multicond_batch(c, step); uncond =
   reconstruct_cond_batch(uc, step); step = the 0-based index of the pipeline's step
   (callback_on_step_end), so an image-to-image run starts at the start of the schedule of
   the full step count, as webui's img2img does;
 - `pad` (webui's "Pad prompt/negative prompt", off by default): the shorter of tensor and
   uncond is padded with the empty prompt's encoding repeated (pad_cond_uncond);
 - equal lengths: one UNet run on cat([tensor, uncond]); else the parts (in runs of 2n rows,
   batch_cond_uncond) and the negative in separate runs, each at its own length;
 - denoised = uncond + sum((x_out[part] - uncond) * (weight * guidance_scale))
   (combine_denoised), on the UNet's noise predictions;
 - the session returns cat([denoised, denoised]), so the pipeline's own guidance
   `u + g * (t - u)` leaves it unchanged (t - u is exactly 0).
Everything else (scheduler, latents from torch.Generator('cpu').manual_seed(seed), VAE,
image conversion) is Optimum's pipeline, as in make_a1111_references.py (session options,
output conventions). webui's k-diffusion samplers are not used: the scheduler is the model
folder's, and its steps are the steps of the schedule.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

from _env import REPO  # first: one CPU thread, offline Hub, no CUDA (see _env.py)

import numpy as np

from fixture_lib import SESSION_OPTIONS, save_images
from make_a1111_references import DEMO_REP, LONG_100, make_encoders
from make_edit_references import load_pipeline, pipeline_class

INIT_64 = "tests/golden/edit/inputs/init-64x64.png"


def case_plan() -> list[dict]:
    cases = []

    def add(tag, model, prompt, negative, seed, steps=6, g=7.5, n=1, pad=False, mode="txt2img",
            init=None, strength=None, w=64, h=64):
        short = {"onnx/tiny-sd15": "sd15", "onnx/tiny-sdxl": "sdxl", "onnx/tiny-demo": "demo"}[model]
        cases.append(dict(
            id=f"{short}-{tag}-s{steps}-g{g:g}-n{n}-{seed}", model=model, prompt=prompt,
            negative_prompt=negative, steps=steps, guidance_scale=g, width=w, height=h, num_images=n,
            seed=seed, pad=pad, mode=mode, init_image=init, strength=strength,
        ))

    demo, sd15, sdxl = "onnx/tiny-demo", "onnx/tiny-sd15", "onnx/tiny-sdxl"
    long_demo = DEMO_REP * 9 + "a (green:1.3) square on a [black] background"
    # 1. prompt and negative of different lengths: separate UNet runs (default) / padded
    add("long-short-neg", demo, long_demo, "blurry, (red:1.2)", 5001)
    add("long-short-neg-pad", demo, long_demo, "blurry, (red:1.2)", 5001, pad=True)
    add("short-long-neg", demo, "a red circle on a blue background", long_demo, 5002, n=2)
    add("long-no-neg", sd15, LONG_100, None, 5003)
    add("long-short-neg", sdxl, LONG_100, "blurry, low quality", 5101)
    add("long-short-neg-pad", sdxl, LONG_100, "blurry, low quality", 5101, pad=True)
    # 2. SDXL: an empty negative is zeros
    add("empty-neg", sdxl, "a castle on a hill, dramatic sky", "", 5102)
    add("empty-neg-long-pad", sdxl, LONG_100, "", 5103, pad=True)
    # 3. prompt editing, alternation, AND
    add("edit", demo, "a [red:green:0.5] circle on a [black:blue:2] background", None, 5004)
    add("edit-remove-add", demo, "a red circle [on a blue background::0.4] [:on a white background:4]", None, 5005)
    add("alternate", demo, "a [red|green] circle on a [blue|black|white] background", None, 5006, n=2)
    add("and", demo, "a red circle on a blue background AND a green square :0.7", "blurry", 5007)
    add("and-three", demo, "a red circle AND a green square :1.2 AND a blue background : -0.4", None, 5008)
    add("trailing-weight", demo, "a red circle on a blue background :1.3", None, 5009)
    add("and-lengths", demo, long_demo + " AND a [red|yellow] circle", "blurry", 5010)
    add("neg-edit", demo, "a red circle on a blue background", "[green:white:0.5] (square:1.2)", 5011)
    add("edit-img2img", demo, "a [red:green:0.5] circle on a blue background", "blurry", 5012, steps=8,
        mode="img2img", init=INIT_64, strength=0.6)
    add("edit-alternate", sdxl, "a [castle:tower:0.5] on a [hill|lake], (dramatic sky:1.2)", "blurry", 5104)
    add("and", sdxl, "a castle on a hill AND a (red dragon:1.2) :0.8", None, 5105)
    return cases


def load_webui(webui: Path):
    path = webui / "modules" / "prompt_parser.py"
    spec = importlib.util.spec_from_file_location("webui_prompt_parser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WebuiModel:
    """`model.get_learned_conditioning(texts)` of webui for this fixture (module docstring)."""

    def __init__(self, pp, encoders, sdxl: bool):
        self.pp, self.encoders, self.sdxl = pp, encoders, sdxl

    def get_learned_conditioning(self, texts):
        import torch

        pieces = [[(t, w) for t, w in self.pp.parse_prompt_attention(text)] for text in texts]
        per_encoder = [[e.chunks(p) for p in pieces] for e in self.encoders]
        k = max(len(c) for chunks in per_encoder for c in chunks)
        hidden = [[] for _ in texts]
        pooled = [None] * len(texts)
        for e, chunks in zip(self.encoders, per_encoder):
            for i, c in enumerate(chunks):
                c = c + [e.empty_chunk()] * (k - len(c))
                h, p = e.encode(c)
                hidden[i].append(h)
                pooled[i] = p if p is not None else pooled[i]
        crossattn = torch.from_numpy(np.concatenate([np.concatenate(h, axis=2) for h in hidden], axis=0))
        if not self.sdxl:
            return crossattn
        vector = torch.from_numpy(np.concatenate(pooled, axis=0))
        if getattr(texts, "is_negative_prompt", False) and all(t == "" for t in texts):
            crossattn, vector = torch.zeros_like(crossattn), torch.zeros_like(vector)
        return {"crossattn": crossattn, "vector": vector}


def catenate_conds(conds):
    import torch

    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([x[key] for x in conds]) for key in conds[0].keys()}


def subscript_cond(cond, a, b):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


def pad_cond(tensor, repeats, empty):
    import torch

    if not isinstance(tensor, dict):
        return torch.cat([tensor, empty.repeat((tensor.shape[0], repeats, 1))], axis=1)
    tensor = dict(tensor)
    tensor["crossattn"] = pad_cond(tensor["crossattn"], repeats, empty)
    return tensor


def seq_len(cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]


class WebuiDenoiser:
    """Replaces the UNet session's run(): webui's CFGDenoiser.forward (default settings)."""

    def __init__(self, session, pp, c, uc, n, g, pad, empty):
        self.session, self.pp, self.c, self.uc = session, pp, c, uc
        self.n, self.g, self.pad, self.empty = n, g, pad, empty
        self.orig = session.run
        self.step = 0
        self.steps_seen = []
        session.run = self.run

    def restore(self):
        self.session.run = self.orig

    def inner(self, feeds, x, cond):
        rows = x.shape[0]
        f = dict(feeds)
        f["sample"] = x.numpy().astype(feeds["sample"].dtype)
        t = feeds["timestep"]
        if t.ndim == 1 and t.shape[0] == feeds["sample"].shape[0] and t.shape[0] != 1:
            f["timestep"] = np.full((rows,), t[0], dtype=t.dtype)
        crossattn = cond["crossattn"] if isinstance(cond, dict) else cond
        f["encoder_hidden_states"] = crossattn.numpy().astype(feeds["encoder_hidden_states"].dtype)
        if isinstance(cond, dict):
            f["text_embeds"] = cond["vector"].numpy().astype(feeds["text_embeds"].dtype)
            f["time_ids"] = np.repeat(feeds["time_ids"][:1], rows, axis=0)
        self.runs.append({"rows": rows, "sequence_length": int(crossattn.shape[1])})
        import torch

        return torch.from_numpy(np.array(self.orig(None, f)[0], dtype=np.float32))

    def run(self, output_names, feeds, *a, **kw):
        import torch

        pp, n = self.pp, self.n
        sample = feeds["sample"]
        assert sample.shape[0] == 2 * n, sample.shape  # the pipeline's CFG batch
        x = torch.from_numpy(np.array(sample[:n], dtype=np.float32))
        assert np.array_equal(sample[:n], sample[n:])
        self.runs = []
        conds_list, tensor = pp.reconstruct_multicond_batch(self.c, self.step)
        uncond = pp.reconstruct_cond_batch(self.uc, self.step)
        if self.pad and seq_len(tensor) != seq_len(uncond):  # pad_cond_uncond
            repeats = (seq_len(tensor) - seq_len(uncond)) // self.empty.shape[1]
            if repeats < 0:
                tensor = pad_cond(tensor, -repeats, self.empty)
            else:
                uncond = pad_cond(uncond, repeats, self.empty)
        batch_size = n
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        x_in = torch.cat([torch.stack([x[i] for _ in range(r)]) for i, r in enumerate(repeats)] + [x])
        if seq_len(tensor) == seq_len(uncond):
            x_out = self.inner(feeds, x_in, catenate_conds([tensor, uncond]))
        else:
            x_out = torch.zeros_like(x_in)
            rows = (tensor["crossattn"] if isinstance(tensor, dict) else tensor).shape[0]
            step = batch_size * 2  # batch_cond_uncond
            for a_ in range(0, rows, step):
                b_ = min(a_ + step, rows)
                x_out[a_:b_] = self.inner(feeds, x_in[a_:b_], subscript_cond(tensor, a_, b_))
            u_rows = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
            x_out[-u_rows:] = self.inner(feeds, x_in[-u_rows:], uncond)
        # combine_denoised
        u_rows = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
        denoised_uncond = x_out[-u_rows:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * self.g)
        self.steps_seen.append({"step": self.step, "runs": self.runs,
                                "timestep": float(np.asarray(feeds["timestep"]).reshape(-1)[0])})
        out = torch.cat([denoised, denoised]).numpy().astype(np.float32)
        return [out]


def run_case(pp, pipe, encoders, sdxl, case, out: Path) -> dict:
    import torch
    from PIL import Image

    n, steps = case["num_images"], case["steps"]
    model = WebuiModel(pp, encoders, sdxl)
    prompts = pp.SdConditioning([case["prompt"]] * n, width=case["width"], height=case["height"])
    negative = case["negative_prompt"] if case["negative_prompt"] is not None else ""
    negatives = pp.SdConditioning([negative] * n, is_negative_prompt=True, width=case["width"],
                                  height=case["height"])
    c = pp.get_multicond_learned_conditioning(model, prompts, steps)
    uc = pp.get_learned_conditioning(model, negatives, steps)
    empty = model.get_learned_conditioning([""])
    empty = empty["crossattn"] if isinstance(empty, dict) else empty
    unet = pipe.unet.session
    den = WebuiDenoiser(unet, pp, c, uc, n, case["guidance_scale"], case["pad"], empty)

    def on_step_end(_pipe, i, _t, kwargs):
        den.step = i + 1
        return kwargs

    dim = empty.shape[2]
    kw = dict(
        prompt_embeds=torch.zeros((1, 77, dim)), negative_prompt_embeds=torch.zeros((1, 77, dim)),
        num_inference_steps=steps, guidance_scale=case["guidance_scale"], num_images_per_prompt=n,
        generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np",
        callback_on_step_end=on_step_end,
    )
    if sdxl:
        p = model.get_learned_conditioning([""])["vector"].shape[1]
        kw.update(pooled_prompt_embeds=torch.zeros((1, p)), negative_pooled_prompt_embeds=torch.zeros((1, p)))
    if case["mode"] == "img2img":
        kw.update(image=Image.open(REPO / case["init_image"]).convert("RGB"), strength=case["strength"])
    else:
        kw.update(width=case["width"], height=case["height"])
    try:
        images = pipe(**kw).images
    finally:
        den.restore()
    assert images.shape[0] == n and np.isfinite(images).all()

    d = out / case["id"]
    d.mkdir(parents=True)
    imgs, pngs = save_images(d, images, pipe.numpy_to_pil(images), rel=case["id"])
    multicond = pp.get_multicond_prompt_list([case["prompt"]])
    rec = dict(case)
    rec.update(
        scheduler=type(pipe.scheduler).__name__,
        images=imgs, pngs=pngs,
        parts=[{"text": multicond[1][i], "weight": w} for i, w in multicond[0][0]],
        schedules=[[[e, t] for e, t in s] for s in pp.get_learned_conditioning_prompt_schedules(
            [multicond[1][i] for i, _ in multicond[0][0]], steps)],
        negative_schedule=[[e, t] for e, t in pp.get_learned_conditioning_prompt_schedules([negative], steps)[0]],
        steps_run=den.steps_seen,
        unet_timesteps=[s["timestep"] for s in den.steps_seen],
    )
    return rec


def main(argv=None) -> None:
    import torch
    from importlib.metadata import version
    from transformers.utils import logging as hf_logging

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--webui", type=Path, required=True, help="folder with modules/prompt_parser.py of webui 1.10.1")
    ap.add_argument("--out-root", type=Path, default=REPO / "tests" / "golden", help="writes <out-root>/a1111/steps")
    ap.add_argument("--only", default=None, help="comma list of case ids (debugging)")
    args = ap.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    pp = load_webui(args.webui)
    out = args.out_root / "a1111" / "steps"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plan = case_plan()
    if args.only:
        plan = [c for c in plan if c["id"] in args.only.split(",")]
    records = []
    for key in dict.fromkeys((c["model"], c["mode"]) for c in plan):
        model_dir = REPO / key[0]
        pipe = load_pipeline(pipeline_class(key[1], model_dir), model_dir)
        sdxl = hasattr(pipe, "text_encoder_2") and pipe.text_encoder_2 is not None
        encoders = make_encoders(pipe, model_dir, sdxl)
        for case in (c for c in plan if (c["model"], c["mode"]) == key):
            rec = run_case(pp, pipe, encoders, sdxl, case, out)
            records.append(rec)
            runs = sorted({len(s["runs"]) for s in rec["steps_run"]})
            print(f"ok   {rec['id']}  UNet runs per step {runs}", flush=True)
        del pipe
    manifest = {
        "description": "Reference outputs of Optimum's ORT pipelines with webui 1.10.1's prompt schedules, AND, "
        "and CFG denoiser (default settings; `pad` = its 'Pad prompt/negative prompt' option), for the tiny "
        "fixtures. Generated by onnx/make_a1111_step_references.py (its docstring has the rules). Paths are "
        "relative to this folder, model and init-image paths to the repository root.",
        "webui": "1.10.1 (82a973c): modules/prompt_parser.py imported",
        "versions": {p: version(p) for p in ["torch", "diffusers", "transformers", "optimum-onnx", "onnx",
                                             "onnxruntime", "numpy", "pillow", "lark"]},
        "session_options": SESSION_OPTIONS,
        "cases": records,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(records)} cases, {size / 1e6:.2f} MB in {out}")


if __name__ == "__main__":
    sys.exit(main())
