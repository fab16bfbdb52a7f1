#!/usr/bin/env python3
"""Build the committed tiny transformer-based (SD3 / FLUX) ONNX fixtures.

Usage (from the repository root):
    /work/venv/ref/bin/python onnx/build_transformer_fixtures.py                  # rebuild into onnx/
    /work/venv/ref/bin/python onnx/build_transformer_fixtures.py --out /tmp/x     # rebuild elsewhere
    /work/venv/ref/bin/python onnx/build_transformer_fixtures.py --only tiny-sd3

Outputs (relative to --out, default: this folder):
    tiny-sd3/        StableDiffusion3Pipeline layout: SD3Transformer2DModel (patch 2, 16 latent channels),
                     two CLIPTextModelWithProjection (CLIP-L / CLIP-G roles, different widths so that a wrong
                     concatenation order cannot pass), T5EncoderModel (text_encoder_3), AutoencoderKL with
                     16 latent channels (SD3's scaling_factor 1.5305 / shift_factor 0.0609),
                     FlowMatchEulerDiscreteScheduler(shift=3.0)
    tiny-sd3-no-t5/  tiny-sd3 without text_encoder_3/ and tokenizer_3/ (model_index.json entries set to
                     [null, null]); diffusers then uses zeros in place of the T5 embeddings
    tiny-flux/       FluxPipeline, FLUX.1-schnell style: FluxTransformer2DModel without guidance embedding,
                     CLIPTextModel (pooled output), T5EncoderModel (text_encoder_2), AutoencoderKL with
                     16 latent channels (FLUX's scaling_factor 0.3611 / shift_factor 0.1159), the schnell
                     scheduler config (shift 1.0, no dynamic shifting)
    tiny-flux-dev/   as tiny-flux with guidance_embeds=True and the FLUX.1-dev scheduler config
                     (dynamic shifting, base_shift 0.5, max_shift 1.15, image seq len 256..4096)

Tokenizers: the CLIP ones are written by fixture_lib.write_clip_tokenizer (the same files as
onnx/clip-tokenizer), the T5 one is copied from onnx/t5-tokenizer (built by make_t5_tokenizer.py).
The text encoders, T5 encoder and VAE of tiny-flux and tiny-flux-dev are built from the same seeds
(identical files); the T5 encoder and VAE weights are also shared with tiny-sd3.

Every model part is created from a config with `torch.manual_seed(k)` right before it, saved with
diffusers `save_pretrained`, and exported with `optimum-cli export onnx --task text-to-image`.
Machine-specific keys (`_name_or_path`) are removed from the JSON files afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import fixture_lib as fl

ALL = ["tiny-sd3", "tiny-sd3-no-t5", "tiny-flux", "tiny-flux-dev"]
T5_TOKENIZER = fl.HERE / "t5-tokenizer"

# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

T5_WIDTH = 32  # T5 d_model == transformer joint_attention_dim


def clip_config(hidden: int, projection: int, hidden_act: str) -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def t5_config(vocab_size: int) -> dict:
    # T5 v1.1 layout (gated-gelu feed-forward, untied embeddings), as google/t5-v1_1-xxl.
    return dict(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def vae16_config(scaling_factor: float, shift_factor: float) -> dict:
    # 4 blocks -> latent scale factor 8; 16 latent channels, no quant convs (SD3 / FLUX VAE layout).
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


SD3_CLIP_L = clip_config(8, 12, "quick_gelu")
SD3_CLIP_G = clip_config(16, 20, "gelu")
FLUX_CLIP_L = clip_config(8, 8, "quick_gelu")

FLUX_SCHEDULER_COMMON = dict(
    num_train_timesteps=1000,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    base_shift=0.5,
    max_shift=1.15,
)

SEED_T5 = 7001
SEED_VAE = 7002

PIPELINES = {
    "tiny-sd3": dict(
        pipeline_class="StableDiffusion3Pipeline",
        seed_base=7100,
        text_encoder=SD3_CLIP_L,
        text_encoder_2=SD3_CLIP_G,
        tokenizer_pad=fl.EOS,
        tokenizer_2_pad="!",
        transformer=dict(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_WIDTH,
            caption_projection_dim=32,  # == num_attention_heads * attention_head_dim
            pooled_projection_dim=SD3_CLIP_L["projection_dim"] + SD3_CLIP_G["projection_dim"],
            out_channels=16,
            pos_embed_max_size=16,
        ),
        vae=vae16_config(1.5305, 0.0609),
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
    ),
    "tiny-flux": dict(
        pipeline_class="FluxPipeline",
        seed_base=7200,
        text_encoder=FLUX_CLIP_L,
        tokenizer_pad=fl.EOS,
        transformer=dict(
            patch_size=1,
            in_channels=64,  # 16 latent channels x 2x2 packing
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=FLUX_CLIP_L["hidden_size"],
            guidance_embeds=False,
            axes_dims_rope=[4, 6, 6],  # sums to attention_head_dim
        ),
        vae=vae16_config(0.3611, 0.1159),
        # black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json
        scheduler=dict(**FLUX_SCHEDULER_COMMON, shift=1.0, use_dynamic_shifting=False),
    ),
}
PIPELINES["tiny-flux-dev"] = dict(
    PIPELINES["tiny-flux"],
    seed_base=7300,
    transformer=dict(PIPELINES["tiny-flux"]["transformer"], guidance_embeds=True),
    # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
    scheduler=dict(**FLUX_SCHEDULER_COMMON, shift=3.0, use_dynamic_shifting=True),
    # text encoders from tiny-flux's seeds (identical files)
    text_seed_base=7200,
)


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def _strip_paths(folder: Path) -> None:
    """Remove machine-specific keys (`_name_or_path`) from every JSON config in the export."""
    for p in sorted(folder.rglob("*.json")):
        if p.name in ("tokenizer.json", "vocab.json") or p.parent.name.startswith("tokenizer"):
            continue
        d = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(d, dict) and "_name_or_path" in d:
            del d["_name_or_path"]
            p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_torch_pipeline(name: str, stage: Path, tok_cache: Path) -> None:
    import torch
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    torch.set_num_threads(1)
    spec = PIPELINES[name]
    seed = spec["seed_base"]
    text_seed = spec.get("text_seed_base", seed)

    def clip_tokenizer(pad: str):
        d = tok_cache / ("pad-eos" if pad == fl.EOS else "pad-bang")
        if not d.exists():
            fl.write_clip_tokenizer(d, pad_token=pad)
        return CLIPTokenizer.from_pretrained(str(d))

    t5_tok = T5TokenizerFast.from_pretrained(str(T5_TOKENIZER))
    torch.manual_seed(SEED_T5)
    t5 = T5EncoderModel(T5Config(**t5_config(len(t5_tok)))).eval()
    torch.manual_seed(SEED_VAE)
    vae = AutoencoderKL(**spec["vae"]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**spec["scheduler"])

    if spec["pipeline_class"] == "StableDiffusion3Pipeline":
        torch.manual_seed(text_seed + 1)
        te1 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder"])).eval()
        torch.manual_seed(text_seed + 2)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"])).eval()
        torch.manual_seed(seed + 3)
        transformer = diffusers.SD3Transformer2DModel(**spec["transformer"]).eval()
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=te1,
            tokenizer=clip_tokenizer(spec["tokenizer_pad"]),
            text_encoder_2=te2,
            tokenizer_2=clip_tokenizer(spec["tokenizer_2_pad"]),
            text_encoder_3=t5,
            tokenizer_3=t5_tok,
        )
    else:
        torch.manual_seed(text_seed + 1)
        te1 = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])).eval()
        torch.manual_seed(seed + 3)
        transformer = diffusers.FluxTransformer2DModel(**spec["transformer"]).eval()
        pipe = diffusers.FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=te1,
            tokenizer=clip_tokenizer(spec["tokenizer_pad"]),
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
            transformer=transformer,
        )
    pipe.save_pretrained(str(stage), safe_serialization=True)


def _copy_tokenizers(spec: dict, export: Path, tok_cache: Path) -> None:
    """Optimum's export writes the tokenizers with save_pretrained; replace them by the exact
    source files (identical to onnx/clip-tokenizer and onnx/t5-tokenizer)."""
    if spec["pipeline_class"] == "StableDiffusion3Pipeline":
        clip = {"tokenizer": spec["tokenizer_pad"], "tokenizer_2": spec["tokenizer_2_pad"]}
        t5_dir = "tokenizer_3"
    else:
        clip = {"tokenizer": spec["tokenizer_pad"]}
        t5_dir = "tokenizer_2"
    for sub, pad in clip.items():
        src = tok_cache / ("pad-eos" if pad == fl.EOS else "pad-bang")
        shutil.rmtree(export / sub, ignore_errors=True)
        fl.copy_tree_files(src, export / sub)
    shutil.rmtree(export / t5_dir, ignore_errors=True)
    fl.copy_tree_files(T5_TOKENIZER, export / t5_dir)


def build_pipeline(name: str, out_root: Path, tok_cache: Path, work: Path) -> None:
    spec = PIPELINES[name]
    stage = work / "stage" / name
    export = work / "export" / name
    for d in (stage, export):
        if d.exists():
            shutil.rmtree(d)
    # Build the torch pipeline in a fresh interpreter so that nothing (seeds, thread pools)
    # leaks between pipelines.
    fl.run(
        [sys.executable, __file__, "--_save-torch", name, "--_stage", stage, "--_tok-cache", tok_cache],
        env=fl.deterministic_env(),
        cwd=fl.HERE,
    )
    fl.run(
        [fl.VENV_BIN / "optimum-cli", "export", "onnx", "--model", stage, "--task", "text-to-image", export],
        env=fl.deterministic_env(),
    )
    _copy_tokenizers(spec, export, tok_cache)
    _strip_paths(export)
    final = out_root / name
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(export, final)


def build_sd3_no_t5(out_root: Path) -> None:
    """tiny-sd3 without the T5 encoder: text_encoder_3/ and tokenizer_3/ removed and their
    model_index.json entries set to [null, null] (as diffusers writes a pipeline loaded with
    text_encoder_3=None, tokenizer_3=None)."""
    src = out_root / "tiny-sd3"
    dst = out_root / "tiny-sd3-no-t5"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    p = dst / "model_index.json"
    d = json.loads(p.read_text(encoding="utf-8"))
    d["text_encoder_3"] = [None, None]
    d["tokenizer_3"] = [None, None]
    p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=fl.HERE, help="output root (default: the onnx/ folder)")
    ap.add_argument("--only", default=",".join(ALL), help=f"comma list from {ALL}")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--_save-torch", dest="save_torch", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_stage", dest="stage", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_tok-cache", dest="tok_cache", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.save_torch:
        save_torch_pipeline(args.save_torch, args.stage, args.tok_cache)
        return

    only = [s for s in args.only.split(",") if s]
    for s in only:
        if s not in ALL:
            ap.error(f"unknown part {s!r}")
    out_root = args.out.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffusiond-fixtures-") as td:
        work = (args.work or Path(td)).resolve()
        tok_cache = work / "tokenizers"
        for name in only:
            if name in PIPELINES:
                build_pipeline(name, out_root, tok_cache, work)
        if "tiny-sd3-no-t5" in only:
            build_sd3_no_t5(out_root)
    print("done:", ", ".join(only))


if __name__ == "__main__":
    main()
