#!/usr/bin/env python3
"""Build benchmark-scale SD3 and FLUX pipelines with random weights (NOT committed; output in onnx/build/).

Usage (from the repository root):
    /work/venv/ref/bin/python onnx/build_bench_transformers.py                  # small-sd3 + small-flux
    /work/venv/ref/bin/python onnx/build_bench_transformers.py --only small-sd3
    /work/venv/ref/bin/python onnx/build_bench_transformers.py --dry-run        # only count parameters

    small-sd3   StableDiffusion3Pipeline layout: SD3Transformer2DModel with 8 joint blocks, 6 heads x 64,
                joint_attention_dim 512; two CLIPTextModelWithProjection (CLIP-L role 192 wide, CLIP-G role
                256 wide, 4 layers each), a 4-layer T5 v1.1 encoder (d_model 512), a 16-channel VAE with
                `small`'s widths (32/64/128/128), FlowMatchEulerDiscreteScheduler(shift=3.0).
    small-flux  FluxPipeline, FLUX.1-schnell style: FluxTransformer2DModel with 4 double and 8 single
                blocks, 6 heads x 64, no guidance embedding; CLIPTextModel (256 wide, 4 layers), the same
                T5 encoder and VAE layout (FLUX's scaling/shift factors), the schnell scheduler config.

The scale follows onnx/build_bench_models.py's `small` UNet pipeline (tens of millions of parameters
in the denoiser). Images from these models are noise; they exist to measure speed.

The recipe is onnx/build_transformer_fixtures.py's (seeded construction in a fresh interpreter,
`optimum-cli export onnx --task text-to-image`, the tokenizer files copied from the fixtures'
sources, `_name_or_path` keys removed); only the configs differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import build_transformer_fixtures as btf
import fixture_lib as fl

T5_WIDTH = 512  # T5 d_model == transformer joint_attention_dim


def t5_config(vocab_size: int) -> dict:
    """T5 v1.1 layout (gated-gelu feed-forward, untied embeddings), 4 encoder layers."""
    return dict(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=64,
        d_ff=1024,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=8,
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


def clip_config(hidden: int, projection: int, hidden_act: str) -> dict:
    """A 4-layer CLIP text model, as `small`'s text encoder (4 layers, 4 heads)."""
    return dict(btf.clip_config(hidden, projection, hidden_act), intermediate_size=4 * hidden,
                num_hidden_layers=4, num_attention_heads=4)


def vae16_config(scaling_factor: float, shift_factor: float) -> dict:
    """16 latent channels, `small`'s VAE widths, no quant convs (SD3 / FLUX VAE layout)."""
    return dict(btf.vae16_config(scaling_factor, shift_factor), block_out_channels=[32, 64, 128, 128],
                norm_num_groups=32, sample_size=256)


SD3_CLIP_L = clip_config(192, 192, "quick_gelu")
SD3_CLIP_G = clip_config(256, 256, "gelu")  # 192 + 256 <= T5_WIDTH (SD3 pads CLIP to T5's width)
FLUX_CLIP_L = clip_config(256, 256, "quick_gelu")

PIPELINES = {
    "small-sd3": dict(
        btf.PIPELINES["tiny-sd3"],
        seed_base=8100,
        text_encoder=SD3_CLIP_L,
        text_encoder_2=SD3_CLIP_G,
        transformer=dict(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            num_layers=8,
            attention_head_dim=64,
            num_attention_heads=6,
            joint_attention_dim=T5_WIDTH,
            caption_projection_dim=384,  # == num_attention_heads * attention_head_dim
            pooled_projection_dim=SD3_CLIP_L["projection_dim"] + SD3_CLIP_G["projection_dim"],
            out_channels=16,
            pos_embed_max_size=64,
        ),
        vae=vae16_config(1.5305, 0.0609),
    ),
    "small-flux": dict(
        btf.PIPELINES["tiny-flux"],
        seed_base=8200,
        text_encoder=FLUX_CLIP_L,
        transformer=dict(
            patch_size=1,
            in_channels=64,  # 16 latent channels x 2x2 packing
            num_layers=4,
            num_single_layers=8,
            attention_head_dim=64,
            num_attention_heads=6,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=FLUX_CLIP_L["hidden_size"],
            guidance_embeds=False,
            axes_dims_rope=[16, 24, 24],  # sums to attention_head_dim
        ),
        vae=vae16_config(0.3611, 0.1159),
    ),
}


def _use_bench_configs() -> None:
    """Point the fixture builder's module-level configs at this file's."""
    btf.PIPELINES.update(PIPELINES)
    btf.t5_config = t5_config


def count_params(name: str) -> dict:
    import torch
    import diffusers
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast

    spec = PIPELINES[name]
    vocab = len(T5TokenizerFast.from_pretrained(str(btf.T5_TOKENIZER)))
    with torch.device("meta"):
        parts = {}
        if spec["pipeline_class"] == "StableDiffusion3Pipeline":
            parts["transformer"] = diffusers.SD3Transformer2DModel(**spec["transformer"])
            parts["text_encoder"] = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder"]))
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"]))
            parts["text_encoder_3 (T5)"] = T5EncoderModel(T5Config(**t5_config(vocab)))
        else:
            parts["transformer"] = diffusers.FluxTransformer2DModel(**spec["transformer"])
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
            parts["text_encoder_2 (T5)"] = T5EncoderModel(T5Config(**t5_config(vocab)))
        parts["vae"] = AutoencoderKL(**spec["vae"])
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}


def build_pipeline(name: str, out_root: Path, tok_cache: Path, work: Path) -> None:
    spec = PIPELINES[name]
    stage = work / "stage" / name
    export = work / "export" / name
    for d in (stage, export):
        if d.exists():
            shutil.rmtree(d)
    fl.run(
        [sys.executable, __file__, "--_save-torch", name, "--_stage", stage, "--_tok-cache", tok_cache],
        env=fl.deterministic_env(),
        cwd=fl.HERE,
    )
    fl.run(
        [fl.VENV_BIN / "optimum-cli", "export", "onnx", "--model", stage, "--task", "text-to-image", export],
        env=fl.deterministic_env(),
    )
    btf._copy_tokenizers(spec, export, tok_cache)
    btf._strip_paths(export)
    final = out_root / name
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(export, final)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PIPELINES), help=f"comma list from {list(PIPELINES)}")
    ap.add_argument("--out", type=Path, default=fl.HERE / "build", help="output root (default onnx/build, git-ignored)")
    ap.add_argument("--dry-run", action="store_true", help="count parameters only")
    ap.add_argument("--_save-torch", dest="save_torch", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_stage", dest="stage", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_tok-cache", dest="tok_cache", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    _use_bench_configs()
    if args.save_torch:
        btf.save_torch_pipeline(args.save_torch, args.stage, args.tok_cache)
        return

    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in PIPELINES:
            ap.error(f"unknown pipeline {n!r}")
    for n in names:
        counts = count_params(n)
        total = sum(counts.values())
        print(f"{n}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()) + f", total {total / 1e6:.1f}M",
              flush=True)
    if args.dry_run:
        return
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffusiond-bench-") as td:
        work = Path(td)
        for n in names:
            build_pipeline(n, out, work / "tokenizers", work)
            print(f"built {out / n}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
