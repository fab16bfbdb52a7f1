#!/usr/bin/env python3
"""Image-level references for AUTOMATIC1111 prompt syntax (`prompt_syntax = a1111`):
tests/golden/a1111/images/.

Usage (from the repository root):
    /work/venv/ref/bin/python onnx/make_a1111_references.py                     # -> tests/golden/a1111/images
    /work/venv/ref/bin/python onnx/make_a1111_references.py --out-root /tmp/a   # -> /tmp/a/a1111/images
    /work/venv/ref/bin/python onnx/make_a1111_references.py --repo-root /tmp/rb # models from a rebuild

Only the images/ folder is (re)written; tests/golden/a1111/cases.json and the token-level
goldens next to it belong to golden_a1111.py.

The prompt embeddings are computed here with the rules of golden_a1111.py (its functions
`parse_attention`, `chunk`, `weight_chunk` are imported, its docstring pins them) and fed to
Optimum's ORT txt2img pipelines (ORTStableDiffusionPipeline / ORTStableDiffusionXLPipeline,
picked by ORTDiffusionPipeline from model_index.json) as prompt_embeds /
negative_prompt_embeds (SDXL: + pooled_prompt_embeds / negative_pooled_prompt_embeds); the
pipeline never tokenizes or runs a text encoder itself. Session options, RNG and output
conventions are those of make_references.py / make_edit_references.py (CPUExecutionProvider,
one intra-op thread, no IO binding, fp32; generator = torch.Generator("cpu").manual_seed(seed),
no latents passed; output_type "np"; image{k}.npy float32 HxWx3 in [0,1], image{k}.png =
numpy_to_pil, i.e. (x*255).round() uint8). Scheduler: the model folder's own
scheduler_config.json, unchanged.

Rules (what diffusiond's A1111 path must reproduce):

 1. Encoders. SD1.x/SD2.x: text_encoder with tokenizer/, output `last_hidden_state`.
    SDXL: text_encoder with tokenizer/ and text_encoder_2 with tokenizer_2/, output
    `hidden_states.{L-1}` of each (L = num_hidden_layers; the second-highest N among the graph's
    `hidden_states.N` outputs, `hidden_states.1` for the 2-layer tiny encoders). That is what
    diffusers' SDXL encode_prompt takes (`hidden_states[-2]`, clip_skip None): Optimum's
    ORTTextEncoder builds hidden_states = [hidden_states.0 .. hidden_states.{L-1},
    last_hidden_state] (the graph's hidden_states.L, before the final LayerNorm, is dropped),
    so [-2] is hidden_states.{L-1}, the residual stream after layer L-1, NOT layer-normed; and
    it is what diffusiond's TextEncoder::load(penultimate=true) picks. Asserted below, and
    numerically against the pipeline's own encode_prompt (rule 8).
    The ids input is fed with the dtype the graph declares (int64 for all fixtures).
 2. Tokenizers: transformers' slow CLIPTokenizer from the model folder's own tokenizer dirs
    (what the diffusers pipelines use; the fast one from tokenizer.json is asserted to give the
    same ids). Each non-BREAK piece of parse_attention(text) is tokenized on its own with
    add_special_tokens=False, no truncation. bos/eos/pad = the tokenizer's bos/eos/pad token
    ids, comma = vocab[",</w>"] (267). On tokenizers whose pad token is "!" (SD2.x,
    SDXL's tokenizer_2) "!" in the text is that special token, id 0 (`!!` -> 0, 0), while
    SDXL's tokenizer/ gives "!</w>" 256 (`!!</w>` 748): the two SDXL encoders can get
    different chunk counts for the same text (case sdxl-bang-*).
 3. Chunks per encoder: golden_a1111.chunk (75 tokens, comma back-off 20, BREAK closes a
    chunk, BOS + 75 + EOS, ids after the first EOS replaced by pad when pad != eos; weights
    float32, 1.0 at BOS/EOS/padding).
 4. Negative prompt: chunked the same way. SD1.x/SD2.x with negative_prompt null: the
    negative is "" (one empty chunk). SDXL with negative_prompt null (model_index
    force_zeros_for_empty_prompt true): the negative hidden states and pooled output are zeros
    of the prompt's shapes (passed explicitly), nothing is encoded for it.
 5. Padding BEFORE encoding: k = the largest chunk count over the prompt and the negative
    and, on SDXL, over both encoders; every chunk list (prompt, negative, each encoder) is
    padded at the end with empty chunks (golden_a1111.chunk of the empty prompt: BOS, EOS,
    pad...; weights all 1.0) to k. (The SDXL null-negative zeros have the prompt's k.)
 6. Encoding: every chunk through the encoder on its own ([1, 77] ids, batch 1). Chunks whose
    77 weights are all exactly 1.0 are left unchanged; otherwise golden_a1111.weight_chunk
    (torch float32: m = z.mean(); z = z * w[:, None]; z = z * (m / z.mean()), means over that
    one chunk's [1, 77, D]). Chunks are concatenated on the sequence axis: [1, 77k, D]. SDXL:
    encoder 1's [1, 77k, D1] and encoder 2's [1, 77k, D2] are concatenated on the feature
    axis, encoder 1 first ([1, 77k, D1+D2]).
 7. SDXL pooled (text_embeds): text_encoder_2's `text_embeds` output for the FIRST chunk of
    the (padded) prompt, unweighted ([1, P]); likewise for the negative (zeros when null).
    For a prompt starting with BREAK that first chunk is the empty one.
 8. Checks made by this script: for every case (and a few extra plain prompts) whose prompt
    and negative are each one unweighted piece with <= 75 tokens per tokenizer, the
    embeddings are bit-identical to the pipeline's own encode_prompt (so rule 1's layer choice
    and the plain padding agree with diffusers); the UNet's encoder_hidden_states input (and
    SDXL's text_embeds) at the first call equals cat([negative] * n + [prompt] * n).

Which model for weighted prompts: the weighting's mean restoration m / mean(z * w) is only
meaningful when the hidden states' mean is clearly non-zero. The random tiny fixtures'
text-encoder outputs go through a final LayerNorm with weight 1 / bias 0: |mean| ~ 1e-9 for
std 1 (tiny-sd15, tiny-sd2-v, tiny-turbo, tiny-lcm, tiny-sd15-inpaint, and tiny-sdxl's
text_encoder_2 last_hidden_state). The trained tiny-demo has a learnt LayerNorm bias: mean
about +0.008..+0.010 for std 0.90-0.92 (1% of the std), so weighted SD1.x cases use tiny-demo
(in its vocabulary, so the images are meaningful). SDXL's penultimate hidden states are not
layer-normed: mean +0.26..+0.35 (std ~0.46) for text_encoder, +0.004..+0.07 (std ~0.43) for
text_encoder_2, so tiny-sdxl gets weighted cases as well. tiny-sd15 gets unweighted ones only.

Outputs: <out-root>/a1111/images/manifest.json and one folder per case with image{k}.npy,
image{k}.png, prompt_embeds.npy, negative_prompt_embeds.npy ([1, 77k, D] float32) and for
SDXL pooled_prompt_embeds.npy / negative_pooled_prompt_embeds.npy ([1, P] float32).
Deterministic: two runs give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _env import REPO  # first: one CPU thread, offline Hub, no CUDA (see _env.py)

import numpy as np

from fixture_lib import SESSION_OPTIONS, Recorder, save_images
from golden_a1111 import BACKTRACK, CHUNK, chunk, is_break, parse_attention, weight_chunk
from make_edit_references import load_pipeline, pipeline_class

LONG_100 = (
    "an extremely detailed matte painting of a vast ancient city built into the side of a mountain, "
    "waterfalls, bridges, lanterns, flying ships, dramatic clouds, golden hour light, volumetric fog, "
    "birds, tiny people walking on stone stairs, intricate architecture, trending on artstation, "
    "octane render, 4k, ultra wide angle, by a famous artist, masterpiece, best quality, sharp focus, "
    "rich colors, soft shadows, cinematic composition, highly detailed textures, a river winding through the valley"
)
LONG_170 = (
    LONG_100 + ", "
    "in the foreground an old stone bridge covered in moss and ivy, a lone traveler with a red cloak and a "
    "wooden staff, autumn leaves drifting in the wind, distant snowy peaks under a pale sky, a flock of "
    "white birds, reflections in calm water, warm lantern light in the windows of small houses, smoke "
    "rising from chimneys, a quiet evening"
)
DEMO_REP = "a red circle on a blue background, "  # 8 tokens in the demo vocabulary


def case_plan() -> list[dict]:
    cases = []

    def add(tag, model, prompt, negative, chunks, seed, n=1, w=64, h=64, steps=4, g=7.5):
        short = {"onnx/tiny-sd15": "sd15", "onnx/tiny-sdxl": "sdxl", "onnx/tiny-demo": "demo"}[model]
        cases.append(dict(
            id=f"{short}-{tag}-s{steps}-g{g:g}-{w}x{h}-n{n}-{seed}", model=model, prompt=prompt,
            negative_prompt=negative, steps=steps, guidance_scale=g, width=w, height=h, num_images=n,
            seed=seed, expect_chunks=chunks,
        ))

    sd15, sdxl, demo = "onnx/tiny-sd15", "onnx/tiny-sdxl", "onnx/tiny-demo"
    # unweighted, tiny-sd15
    add("long2", sd15, LONG_100, None, 2, 4001, n=2)
    add("long3-neg1", sd15, LONG_170, "blurry, low quality, watermark", 3, 4002)
    add("neg-longer", sd15, "a lighthouse at dusk", LONG_100, 2, 4003, w=96)
    add("break", sd15, "a watercolor painting of a lighthouse BREAK stormy sea, dramatic clouds", "blurry", 2, 4004)
    add("break-leading", sd15, "BREAK a red cube on a blue sphere", None, 2, 4005)
    add("empty", sd15, "", None, 1, 4006)
    # unweighted, tiny-sdxl
    add("long2", sdxl, LONG_100, None, 2, 4101)
    add("long3-neg1", sdxl, LONG_170, "blurry, low quality, watermark", 3, 4102)
    add("break", sdxl, "a castle on a hill BREAK dramatic sky, golden hour", "blurry", 2, 4103)
    add("break-leading", sdxl, "BREAK a castle on a hill", None, 2, 4104, n=2)
    add("empty", sdxl, "", None, 1, 4105)
    add("bang", sdxl, "wow!! " * 30 + "a castle", "blurry", 2, 4106)
    # weighted, tiny-sdxl (penultimate hidden states: non-zero mean)
    add("weighted", sdxl, "a (castle:1.3) on a [hill], ((dramatic sky))", "(blurry:1.2), [low quality]", 1, 4107)
    add("weighted-long", sdxl, "(" + LONG_100 + ":1.2), [sharp]", None, 2, 4108)
    # weighted, tiny-demo (trained final LayerNorm: non-zero mean)
    add("plain", demo, "a red circle on a blue background", None, 1, 4201)
    add("round", demo, "a (red) circle on a blue background", None, 1, 4202)
    add("square", demo, "a red [circle] on a blue background", None, 1, 4203)
    add("explicit", demo, "a (red:1.3) circle on a blue background", None, 1, 4204, n=2)
    add("nested", demo, "a ((green square:1.2) [on a]) black background", None, 1, 4205)
    add("escaped", demo, "a yellow \\(triangle\\) on a gray background", None, 1, 4206)
    add("long-comma", demo, DEMO_REP * 9 + "a (green:1.3) square on a [black] background", None, 2, 4207)
    add("weighted-neg", demo, "a yellow triangle on a gray background",
        "(a purple circle:1.4), [white background], (blue:0.5)", 1, 4208)
    add("break-weighted", demo, "a (purple:1.2) square BREAK on a [white] background", "(red:0.8)", 2, 4209)
    return cases


# Extra plain prompts compared with the pipeline's own encode_prompt (rule 8).
SELF_CHECKS = [
    ("a red circle on a blue background", "blurry, low quality"),
    ("wow! a castle on a hill!!", None),
    ("", ""),
]


class Encoder:
    """One tokenizer + ORT text encoder of a pipeline (rules 1-3, 6)."""

    def __init__(self, model_dir: Path, tok_dir: str, te_name: str, session, config, sdxl: bool):
        from transformers import CLIPTokenizer, CLIPTokenizerFast

        self.tok_dir, self.te_name, self.session = tok_dir, te_name, session
        self.slow = CLIPTokenizer.from_pretrained(model_dir / tok_dir)
        self.fast = (CLIPTokenizerFast.from_pretrained(model_dir / tok_dir)
                     if (model_dir / tok_dir / "tokenizer.json").exists() else None)
        self.bos, self.eos, self.pad = self.slow.bos_token_id, self.slow.eos_token_id, self.slow.pad_token_id
        self.comma = self.slow.get_vocab().get(",</w>")
        (inp,) = [i for i in session.get_inputs() if i.name == "input_ids"]
        self.ids_dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}[inp.type]
        outputs = [o.name for o in session.get_outputs()]
        if sdxl:
            layers = sorted(int(n.split(".", 1)[1]) for n in outputs if n.startswith("hidden_states."))
            rust_choice = f"hidden_states.{layers[-2]}"  # diffusiond: second-highest N
            n_layers = config.num_hidden_layers
            # Optimum: [hidden_states.0 .. hidden_states.{L-1}, last_hidden_state][-2]
            optimum_choice = f"hidden_states.{n_layers - 1}"
            assert rust_choice == optimum_choice, (rust_choice, optimum_choice)
            self.hidden = rust_choice
        else:
            self.hidden = "last_hidden_state"
        self.pooled = "text_embeds" if (sdxl and "text_embeds" in outputs) else None

    def tokenize(self, text: str) -> list[int]:
        ids = self.slow(text, truncation=False, add_special_tokens=False)["input_ids"]
        if self.fast is not None:
            fids = self.fast(text, truncation=False, add_special_tokens=False)["input_ids"]
            assert ids == fids, f"slow/fast tokenizers differ on {text!r}"
        return ids

    def chunks(self, pieces) -> list[tuple[list[int], list[float]]]:
        piece_ids = [[] if is_break(p) else self.tokenize(p[0]) for p in pieces]
        return chunk(pieces, piece_ids, self.bos, self.eos, self.pad, self.comma)

    def empty_chunk(self):
        return chunk([("", 1.0)], [[]], self.bos, self.eos, self.pad, self.comma)[0]

    def encode(self, chunks):
        """[1, 77k, D] weighted hidden states and the first chunk's pooled output [1, P]."""
        import torch

        names = [self.hidden] + ([self.pooled] if self.pooled else [])
        parts, pooled = [], None
        for i, (ids, w) in enumerate(chunks):
            out = self.session.run(names, {"input_ids": np.asarray([ids], dtype=self.ids_dtype)})
            z = out[0].astype(np.float32)
            assert z.shape[:2] == (1, CHUNK + 2)
            if any(x != 1.0 for x in w):
                z = weight_chunk(torch.from_numpy(z), w).numpy()
            parts.append(z)
            if i == 0 and self.pooled:
                pooled = out[1].astype(np.float32)
        return np.concatenate(parts, axis=1), pooled


def make_encoders(pipe, model_dir: Path, sdxl: bool) -> list[Encoder]:
    encs = [Encoder(model_dir, "tokenizer", "text_encoder", pipe.text_encoder.session,
                    pipe.text_encoder.config, sdxl)]
    if sdxl:
        encs.append(Encoder(model_dir, "tokenizer_2", "text_encoder_2", pipe.text_encoder_2.session,
                            pipe.text_encoder_2.config, sdxl))
    return encs


def embed(encoders: list[Encoder], sdxl: bool, prompt: str, negative: str | None) -> dict:
    """Rules 4-7: chunks, padding, encoding of the prompt and the negative prompt."""
    pieces = parse_attention(prompt)
    neg_text = negative if negative is not None else (None if sdxl else "")
    neg_pieces = parse_attention(neg_text) if neg_text is not None else None
    laid = []
    for e in encoders:
        pc = e.chunks(pieces)
        nc = e.chunks(neg_pieces) if neg_pieces is not None else None
        laid.append((e, pc, nc))
    k = max(max(len(pc), len(nc) if nc is not None else 0) for _, pc, nc in laid)
    hid, neg_hid, pooled, neg_pooled, info = [], [], None, None, []
    for e, pc, nc in laid:
        rec = {"tokenizer": e.tok_dir, "text_encoder": e.te_name, "hidden_output": e.hidden,
               "pooled_output": e.pooled, "bos": e.bos, "eos": e.eos, "pad": e.pad, "comma": e.comma,
               "prompt_chunks_unpadded": len(pc), "negative_chunks_unpadded": None if nc is None else len(nc)}
        pc = pc + [e.empty_chunk()] * (k - len(pc))
        h, p = e.encode(pc)
        hid.append(h)
        pooled = p if p is not None else pooled
        rec["prompt_chunks"] = [{"ids": i, "weights": w} for i, w in pc]
        if nc is not None:
            nc = nc + [e.empty_chunk()] * (k - len(nc))
            h, p = e.encode(nc)
            neg_hid.append(h)
            neg_pooled = p if p is not None else neg_pooled
            rec["negative_chunks"] = [{"ids": i, "weights": w} for i, w in nc]
        else:
            rec["negative_chunks"] = None
        info.append(rec)
    pe = np.concatenate(hid, axis=2)
    if neg_pieces is None:  # SDXL, negative null: zeros (rule 4)
        ne, neg_pooled = np.zeros_like(pe), np.zeros_like(pooled)
    else:
        ne = np.concatenate(neg_hid, axis=2)
    weighted = any(w != 1.0 for r in info for key in ("prompt_chunks", "negative_chunks")
                   for c in (r[key] or []) for w in c["weights"])
    return dict(prompt_embeds=pe, negative_prompt_embeds=ne, pooled=pooled, negative_pooled=neg_pooled,
                k=k, encoders=info, weighted=weighted, pieces=pieces, neg_pieces=neg_pieces)


def is_plain(encoders, text: str | None) -> bool:
    """The text itself as one unweighted piece that fits one chunk on every tokenizer: diffusers
    encodes it alike."""
    if text is None:
        return True
    pieces = parse_attention(text)
    if len(pieces) != 1 or pieces[0] != (text, 1.0):  # no syntax at all (escapes change the text)
        return False
    return all(len(e.tokenize(pieces[0][0])) <= CHUNK for e in encoders)


def check_against_diffusers(pipe, encoders, sdxl, prompt, negative) -> None:
    """Rule 8: bit-identical to the pipeline's own encode_prompt for plain prompts."""
    got = embed(encoders, sdxl, prompt, negative)
    if sdxl:
        pe, ne, pp, npp = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=True, negative_prompt=negative)
        np.testing.assert_array_equal(pp.numpy(), got["pooled"])
        np.testing.assert_array_equal(npp.numpy(), got["negative_pooled"])
    else:
        pe, ne = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    np.testing.assert_array_equal(pe.numpy(), got["prompt_embeds"])
    np.testing.assert_array_equal(ne.numpy(), got["negative_prompt_embeds"])


def run_case(pipe, encoders, sdxl: bool, case: dict, out: Path) -> dict:
    import torch

    emb = embed(encoders, sdxl, case["prompt"], case["negative_prompt"])
    assert emb["k"] == case["expect_chunks"], (case["id"], emb["k"])
    if is_plain(encoders, case["prompt"]) and is_plain(encoders, case["negative_prompt"]):
        check_against_diffusers(pipe, encoders, sdxl, case["prompt"], case["negative_prompt"])
        case_plain = True
    else:
        case_plain = False
    n = case["num_images"]
    kw = dict(
        prompt_embeds=torch.from_numpy(emb["prompt_embeds"]),
        negative_prompt_embeds=torch.from_numpy(emb["negative_prompt_embeds"]),
        num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"],
        width=case["width"], height=case["height"], num_images_per_prompt=n,
        generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="np",
    )
    if sdxl:
        kw.update(pooled_prompt_embeds=torch.from_numpy(emb["pooled"]),
                  negative_pooled_prompt_embeds=torch.from_numpy(emb["negative_pooled"]))
    unet = Recorder(pipe.unet.session)
    try:
        images = pipe(**kw).images
    finally:
        unet.restore()
    assert images.shape == (n, case["height"], case["width"], 3) and np.isfinite(images).all()
    first = unet.calls[0]
    want = np.concatenate([emb["negative_prompt_embeds"]] * n + [emb["prompt_embeds"]] * n)
    np.testing.assert_array_equal(first["encoder_hidden_states"], want)
    if sdxl:
        np.testing.assert_array_equal(first["text_embeds"],
                                      np.concatenate([emb["negative_pooled"]] * n + [emb["pooled"]] * n))

    d = out / case["id"]
    d.mkdir(parents=True)
    rel = case["id"]
    files = {}
    for key, name in (("prompt_embeds", "prompt_embeds"), ("negative_prompt_embeds", "negative_prompt_embeds"),
                      ("pooled", "pooled_prompt_embeds"), ("negative_pooled", "negative_pooled_prompt_embeds")):
        if emb[key] is not None:
            np.save(d / f"{name}.npy", emb[key].astype(np.float32))
            files[name] = f"{rel}/{name}.npy"
        else:
            files[name] = None
    imgs, pngs = save_images(d, images, pipe.numpy_to_pil(images), rel=rel)
    rec = {key: case[key] for key in ("id", "model", "prompt", "negative_prompt", "steps", "guidance_scale",
                                      "width", "height", "num_images", "seed")}
    rec.update(
        scheduler=type(pipe.scheduler).__name__,
        images=imgs, pngs=pngs,
        chunks={e["text_encoder"]: {"prompt": e["prompt_chunks_unpadded"],
                                    "negative": e["negative_chunks_unpadded"], "padded": emb["k"]}
                for e in emb["encoders"]},
        sequence_length=int(emb["prompt_embeds"].shape[1]),
        embedding_dim=int(emb["prompt_embeds"].shape[2]),
        prompt_embeds=files["prompt_embeds"],
        negative_prompt_embeds=files["negative_prompt_embeds"],
        pooled_prompt_embeds=files["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=files["negative_pooled_prompt_embeds"],
        negative_zeros=bool(sdxl and case["negative_prompt"] is None),
        weighted=emb["weighted"],
        same_as_diffusers_encode_prompt=case_plain,
        pieces=[[t, w] for t, w in emb["pieces"]],
        negative_pieces=None if emb["neg_pieces"] is None else [[t, w] for t, w in emb["neg_pieces"]],
        encoders=emb["encoders"],
        unet_calls=len(unet.calls),
        unet_timesteps=[float(c["timestep"]) for c in unet.calls],
    )
    return rec


def make_a1111_goldens(out: Path, repo_root: Path, only: list[str] | None = None) -> None:
    import torch
    from importlib.metadata import version
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plan = case_plan()
    if only:
        plan = [c for c in plan if c["id"] in only]
    records, checked = [], []
    for model in dict.fromkeys(c["model"] for c in plan):
        model_dir = repo_root / model
        pipe = load_pipeline(pipeline_class("txt2img", model_dir), model_dir)
        sdxl = hasattr(pipe, "text_encoder_2") and pipe.text_encoder_2 is not None
        encoders = make_encoders(pipe, model_dir, sdxl)
        for prompt, negative in SELF_CHECKS:
            check_against_diffusers(pipe, encoders, sdxl, prompt, negative)
            checked.append({"model": model, "prompt": prompt, "negative_prompt": negative})
        for case in (c for c in plan if c["model"] == model):
            rec = run_case(pipe, encoders, sdxl, case, out)
            records.append(rec)
            print(f"ok   {rec['id']}  chunks={rec['chunks']} weighted={rec['weighted']}", flush=True)
        del pipe

    manifest = {
        "description": "Reference txt2img outputs of Optimum's ORT pipelines fed with AUTOMATIC1111-syntax prompt "
        "embeddings (emphasis, BREAK, 75-token chunks) for the tiny fixtures. Generated by "
        "onnx/make_a1111_references.py (its docstring has the full rules; token rules: onnx/golden_a1111.py). "
        "File paths are relative to this folder, model paths to the repository root.",
        "versions": {p: version(p) for p in ["torch", "diffusers", "transformers", "optimum-onnx", "onnx",
                                             "onnxruntime", "numpy", "pillow"]},
        "session_options": SESSION_OPTIONS,
        "chunk_tokens": CHUNK,
        "comma_backtrack": BACKTRACK,
        "fields": {
            "model": "fixture folder, relative to the repository root; scheduler: its own scheduler_config.json "
            "(class name in `scheduler`)",
            "negative_prompt": "null: SD1.x/2.x encode '' instead; SDXL (force_zeros_for_empty_prompt) uses zeros "
            "of the prompt's shapes (negative_zeros true)",
            "images": "float32 HxWx3 in [0,1] (output_type='np'); pngs: (x*255).round() uint8",
            "chunks": "per text encoder: chunk count of the prompt and of the negative before padding (negative "
            "null when nothing was encoded), and `padded` = k, the count both were padded to (max over prompt, "
            "negative and, on SDXL, both encoders)",
            "sequence_length": "77 * k",
            "prompt_embeds / negative_prompt_embeds": "float32 [1, 77k, D] as fed to the pipeline (SDXL: encoder 1 "
            "features first, then encoder 2)",
            "pooled_prompt_embeds / negative_pooled_prompt_embeds": "SDXL: float32 [1, P], text_encoder_2's "
            "text_embeds of the first (padded) chunk, unweighted; null for SD1.x/2.x",
            "weighted": "some chunk of the prompt or negative has a weight != 1.0",
            "same_as_diffusers_encode_prompt": "the prompt and negative are plain (one unweighted piece <= 75 tokens): "
            "the embeddings were asserted bit-identical to the pipeline's own encode_prompt",
            "pieces": "parse_attention result [text, weight (f64)]",
            "encoders": "per text encoder: tokenizer dir, text-encoder dir, output used, special ids, unpadded "
            "counts and the padded chunks (77 ids + 77 float32 weights each) of the prompt and the negative",
            "unet_timesteps": "value of the UNet 'timestep' input at every UNet call",
        },
        "rules": {
            "rng": "generator=torch.Generator('cpu').manual_seed(seed) passed to the pipeline; no latents passed",
            "hidden_output": "SD1.x/2.x: last_hidden_state; SDXL: hidden_states.{L-1} of both encoders (diffusers' "
            "hidden_states[-2]; Optimum drops the graph's hidden_states.L and appends last_hidden_state)",
            "tokenize": "slow CLIPTokenizer of the model folder, per piece, add_special_tokens=False, no truncation; "
            "'!' is the pad token (id 0) on SDXL's tokenizer_2 (and SD2.x)",
            "chunk": "golden_a1111.chunk: 75 tokens, comma back-off 20, BREAK closes a chunk, BOS+75+EOS, ids after "
            "the first EOS := pad",
            "negative": "null -> '' on SD1.x/2.x; null -> zeros (hidden and pooled) on SDXL",
            "padding": "before encoding, prompt and negative (and both SDXL encoders) padded with empty chunks "
            "(BOS, EOS, pad...; weights 1) to the largest count",
            "encode": "each chunk [1,77] separately; all-1.0 weights: unchanged; else m=z.mean(); z*=w[:,None]; "
            "z*=m/z.mean() (torch f32, per chunk); concat on the sequence axis; SDXL: then encoders on the "
            "feature axis",
            "pooled": "SDXL: text_encoder_2 text_embeds of the first chunk, unweighted",
            "cfg": "guidance_scale > 1: UNet batch 2n, [negative x n; prompt x n]",
        },
        "self_checks": checked,
        "cases": records,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{len(records)} cases, {size / 1e6:.2f} MB in {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-root", type=Path, default=REPO / "tests" / "golden", help="writes <out-root>/a1111/images")
    ap.add_argument("--repo-root", type=Path, default=REPO, help="where to find onnx/<fixture>")
    ap.add_argument("--only", default=None, help="comma list of case ids (debugging)")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s] if args.only else None
    make_a1111_goldens(args.out_root / "a1111" / "images", args.repo_root.resolve(), only)


if __name__ == "__main__":
    sys.exit(main())
