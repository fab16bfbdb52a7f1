#!/usr/bin/env python3
"""Build benchmark-scale pipelines with random weights (NOT committed; output in onnx/build/).

Usage (from the repository root):
    onnx/.venv/bin/python onnx/build_bench_models.py                  # small + sd15-scale
    onnx/.venv/bin/python onnx/build_bench_models.py --only small
    onnx/.venv/bin/python onnx/build_bench_models.py --dry-run        # only instantiate and count parameters

    small       SD1.x layout, 50.7M-parameter UNet (channels 64/128/320/320), small VAE and
                text encoder (~70M parameters in all); quick throughput tests.
    sd15-scale  The real SD1.5 UNet / VAE / text-encoder configs (about 1.07B parameters) with random
                weights. The fp32 UNet is >2 GB, so optimum writes it with ONNX external data
                (unet/model.onnx + unet/model.onnx_data). Needs ~16 GB RAM and several minutes per part.

Images from these models are noise; they exist to measure speed and memory, not quality.
Same deterministic recipe as build_fixtures.py (seeded construction, optimum-cli export).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import fixture_lib as fl

SD15_SCHEDULER = (
    "PNDMScheduler",
    dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="leading",
        trained_betas=None,
    ),
)

SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
)

BENCH = {
    "small": dict(
        pipeline_class="StableDiffusionPipeline",
        seed_base=5000,
        tokenizer_pad="<|endoftext|>",
        text_encoder=dict(SD15_TEXT, hidden_size=256, intermediate_size=1024, projection_dim=256,
                          num_hidden_layers=4, num_attention_heads=4),
        unet=dict(
            SD15_UNET,
            block_out_channels=[64, 128, 320, 320],  # ~50.7M parameters
            cross_attention_dim=256,
            attention_head_dim=8,
        ),
        vae=dict(SD15_VAE, block_out_channels=[32, 64, 128, 128], layers_per_block=1),
        scheduler=SD15_SCHEDULER,
    ),
    "sd15-scale": dict(
        pipeline_class="StableDiffusionPipeline",
        seed_base=6000,
        tokenizer_pad="<|endoftext|>",
        text_encoder=SD15_TEXT,
        unet=SD15_UNET,
        vae=SD15_VAE,
        scheduler=SD15_SCHEDULER,
    ),
}


def count_params(spec: dict) -> dict:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # no memory, no init cost
        parts = {
            "unet": UNet2DConditionModel(**spec["unet"]),
            "vae": AutoencoderKL(**spec["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])),
        }
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(BENCH), help=f"comma list from {list(BENCH)}")
    ap.add_argument("--out", type=Path, default=fl.HERE / "build", help="output root (default onnx/build, git-ignored)")
    ap.add_argument("--dry-run", action="store_true", help="instantiate on the meta device and print sizes only")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in BENCH:
            ap.error(f"unknown pipeline {n!r}")
    for n in names:
        counts = count_params(BENCH[n])
        total = sum(counts.values())
        print(f"{n}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()) + f", total {total / 1e6:.1f}M "
              f"(fp32 ~{total * 4 / 2**30:.2f} GiB)", flush=True)
    if args.dry_run:
        return
    import build_fixtures

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="diffusiond-bench-") as td:
        work = Path(td)
        for n in names:
            build_fixtures.build_pipeline(n, out, work / "tokenizers", work)
            print(f"built {out / n}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
