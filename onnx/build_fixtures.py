#!/usr/bin/env python3
"""Build the committed tiny test fixtures (tokenizer + tiny ONNX pipelines).

Usage (from the repository root):
    onnx/.venv/bin/python onnx/build_fixtures.py                 # rebuild everything into onnx/
    onnx/.venv/bin/python onnx/build_fixtures.py --out /tmp/x    # rebuild elsewhere (for checking)
    onnx/.venv/bin/python onnx/build_fixtures.py --only tokenizer,tiny-sd15

Outputs (relative to --out, default: this folder):
    clip-tokenizer/   CLIP BPE tokenizer files (vocab 49408) rebuilt from open_clip's merges file
    tiny-sd15/        SD1.x architecture, PNDM scheduler, epsilon prediction
    tiny-sd2-v/       SD2.x-style architecture, DDIM scheduler, v_prediction, tokenizer pads with "!"
    tiny-sdxl/        SDXL architecture (two text encoders, text_time embedding), Euler scheduler
    tiny-sd15-inpaint/ SD1.x inpainting: 9-channel UNet (latents 4 + mask 1 + masked-image latents 4),
                      PNDM scheduler, exported with --task inpainting (StableDiffusionInpaintPipeline)
    tiny-lcm/         LCM-distilled SD1.x layout: UNet with time_cond_proj_dim (ONNX input
                      `timestep_cond`), LCMScheduler config (LatentConsistencyModelPipeline)
    tiny-turbo/       SD-Turbo style (SD2.x-like, tokenizer pads with "!"): EulerAncestralDiscreteScheduler
                      with timestep_spacing "trailing"

Every model part is created from a config with `torch.manual_seed(k)` right before it,
saved with diffusers/transformers `save_pretrained`, and exported with
`optimum-cli export onnx --task <export_task>` (text-to-image unless the spec says otherwise).
The result is byte-reproducible.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import fixture_lib as fl

ALL = ["tokenizer", "tiny-sd15", "tiny-sd2-v", "tiny-sdxl", "tiny-sd15-inpaint", "tiny-lcm", "tiny-turbo"]

# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def vae_config(scaling_factor: float, force_upcast: bool = True) -> dict:
    # 4 blocks -> latent scale factor 2**3 = 8, like every SD VAE.
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def text_config(hidden_act: str, hidden: int = 32) -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


PIPELINES = {
    "tiny-sd15": dict(
        pipeline_class="StableDiffusionPipeline",
        seed_base=1500,
        tokenizer_pad="<|endoftext|>",
        text_encoder=text_config("quick_gelu", 32),
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            block_out_channels=[32, 64],
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=32,
        ),
        vae=vae_config(0.18215, force_upcast=True),
        scheduler=(
            "PNDMScheduler",
            dict(
                **SD_BETAS,
                skip_prk_steps=True,
                steps_offset=1,
                set_alpha_to_one=False,
                clip_sample=False,
                prediction_type="epsilon",
                timestep_spacing="leading",
                trained_betas=None,
            ),
        ),
    ),
    "tiny-sd2-v": dict(
        pipeline_class="StableDiffusionPipeline",
        seed_base=2100,
        tokenizer_pad="!",
        text_encoder=text_config("gelu", 16),
        unet=dict(
            sample_size=12,
            in_channels=4,
            out_channels=4,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            block_out_channels=[32, 64],
            layers_per_block=1,
            cross_attention_dim=16,
            attention_head_dim=[2, 4],
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=32,
        ),
        vae=vae_config(0.18215, force_upcast=True),
        scheduler=(
            "DDIMScheduler",
            dict(
                **SD_BETAS,
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
                prediction_type="v_prediction",
                skip_prk_steps=True,
                timestep_spacing="leading",
                trained_betas=None,
            ),
        ),
    ),
    "tiny-sdxl": dict(
        pipeline_class="StableDiffusionXLPipeline",
        seed_base=3000,
        tokenizer_pad="<|endoftext|>",
        tokenizer_2_pad="!",
        # Different widths (like SDXL's 768 + 1280) so that a wrong concatenation order cannot pass.
        text_encoder=text_config("quick_gelu", 16),
        text_encoder_2=text_config("gelu", 32),
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            block_out_channels=[32, 64],
            layers_per_block=1,
            transformer_layers_per_block=[1, 1],
            attention_head_dim=[2, 4],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,  # text_encoder_2 projection + 6 time ids
            cross_attention_dim=48,  # 16 (text_encoder) + 32 (text_encoder_2), concatenated
            norm_num_groups=32,
        ),
        vae=vae_config(0.13025, force_upcast=True),
        scheduler=(
            "EulerDiscreteScheduler",
            dict(
                **SD_BETAS,
                steps_offset=1,
                timestep_spacing="leading",
                interpolation_type="linear",
                prediction_type="epsilon",
                use_karras_sigmas=False,
                clip_sample=False,
                set_alpha_to_one=False,
                skip_prk_steps=True,
                sample_max_value=1.0,
                trained_betas=None,
            ),
        ),
    ),
}


# The three fixtures below use a smaller text encoder (hidden 16) and UNet (channels 16/32) than
# tiny-sd15 so that each folder stays under ~8 MB (3.2 MB of it are the tokenizer files).


def small_unet(**kw) -> dict:
    d = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[16, 32],
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    d.update(kw)
    return d


PIPELINES.update(
    {
        # SD1.5-inpainting layout: conv_in takes 9 channels, everything else as an SD1.x UNet.
        "tiny-sd15-inpaint": dict(
            pipeline_class="StableDiffusionInpaintPipeline",
            export_task="inpainting",
            seed_base=1600,
            tokenizer_pad="<|endoftext|>",
            text_encoder=text_config("quick_gelu", 16),
            unet=small_unet(in_channels=9),
            vae=vae_config(0.18215, force_upcast=True),
            scheduler=PIPELINES["tiny-sd15"]["scheduler"],
        ),
        # As SimianLuo/LCM_Dreamshaper_v7: UNet with time_cond_proj_dim (256 there), LCMScheduler config
        # (original_inference_steps 50, leading spacing, steps_offset 1, set_alpha_to_one true,
        # timestep_scaling 10).
        "tiny-lcm": dict(
            pipeline_class="LatentConsistencyModelPipeline",
            seed_base=4000,
            tokenizer_pad="<|endoftext|>",
            text_encoder=text_config("quick_gelu", 16),
            unet=small_unet(time_cond_proj_dim=32),
            vae=vae_config(0.18215, force_upcast=True),
            scheduler=(
                "LCMScheduler",
                dict(
                    **SD_BETAS,
                    original_inference_steps=50,
                    clip_sample=False,
                    clip_sample_range=1.0,
                    set_alpha_to_one=True,
                    steps_offset=1,
                    prediction_type="epsilon",
                    thresholding=False,
                    dynamic_thresholding_ratio=0.995,
                    sample_max_value=1.0,
                    timestep_spacing="leading",
                    timestep_scaling=10.0,
                    rescale_betas_zero_snr=False,
                    trained_betas=None,
                ),
            ),
        ),
        # SD-Turbo style: SD2.x-like text encoder/UNet (gelu, "!" padding, linear projections),
        # epsilon prediction, EulerAncestralDiscreteScheduler with trailing spacing (the scheduler
        # config shipped with stabilityai/sdxl-turbo).
        "tiny-turbo": dict(
            pipeline_class="StableDiffusionPipeline",
            seed_base=5000,
            tokenizer_pad="!",
            text_encoder=text_config("gelu", 16),
            unet=small_unet(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True),
            vae=vae_config(0.18215, force_upcast=True),
            scheduler=(
                "EulerAncestralDiscreteScheduler",
                dict(
                    **SD_BETAS,
                    steps_offset=1,
                    timestep_spacing="trailing",
                    prediction_type="epsilon",
                    interpolation_type="linear",
                    use_karras_sigmas=False,
                    clip_sample=False,
                    set_alpha_to_one=False,
                    skip_prk_steps=True,
                    sample_max_value=1.0,
                    trained_betas=None,
                ),
            ),
        ),
    }
)


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def _strip_paths(folder: Path) -> None:
    """Remove machine-specific keys (`_name_or_path`) from every JSON config in the export."""
    for p in sorted(folder.rglob("*.json")):
        if p.name in ("tokenizer.json", "vocab.json"):
            continue
        d = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(d, dict) and "_name_or_path" in d:
            del d["_name_or_path"]
            p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_scheduler(spec: dict):
    import inspect

    import diffusers

    sched_cls, sched_kwargs = spec["scheduler"]
    cls = getattr(diffusers, sched_cls)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in sched_kwargs.items() if k in accepted})


def write_scheduler_config(spec: dict, folder: Path) -> None:
    """Add the keys the scheduler class does not know (e.g. `clip_sample: false` for PNDM, as in
    SD1.5's scheduler_config.json) so the file looks like the real checkpoints' files."""
    p = folder / "scheduler" / "scheduler_config.json"
    d = json.loads(p.read_text(encoding="utf-8"))
    for k, v in spec["scheduler"][1].items():
        d.setdefault(k, v)
    p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_torch_pipeline(name: str, spec: dict, stage: Path, tok_cache: Path) -> None:
    import torch
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.set_num_threads(1)
    seed = spec["seed_base"]
    is_xl = spec["pipeline_class"] == "StableDiffusionXLPipeline"

    def tokenizer(pad: str):
        d = tok_cache / ("pad-eos" if pad == fl.EOS else "pad-bang")
        if not d.exists():
            fl.write_clip_tokenizer(d, pad_token=pad)
        return d

    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])).eval()
    text_encoder_2 = None
    if is_xl:
        torch.manual_seed(seed + 2)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"])).eval()
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(**spec["vae"]).eval()
    scheduler = make_scheduler(spec)

    kwargs = dict(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer(spec["tokenizer_pad"]))),
        unet=unet,
        scheduler=scheduler,
    )
    if is_xl:
        kwargs.update(
            text_encoder_2=text_encoder_2,
            tokenizer_2=CLIPTokenizer.from_pretrained(str(tokenizer(spec["tokenizer_2_pad"]))),
            force_zeros_for_empty_prompt=True,
        )
        pipe = diffusers.StableDiffusionXLPipeline(**kwargs)
    else:
        # StableDiffusionPipeline, StableDiffusionInpaintPipeline, LatentConsistencyModelPipeline
        pipe = getattr(diffusers, spec["pipeline_class"])(
            **kwargs, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(str(stage), safe_serialization=True)


def all_specs() -> dict:
    """Committed fixtures plus the benchmark-scale pipelines of build_bench_models.py."""
    from build_bench_models import BENCH

    return {**PIPELINES, **BENCH}


def build_pipeline(name: str, out_root: Path, tok_cache: Path, work: Path) -> None:
    spec = all_specs()[name]
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
        [fl.VENV_BIN / "optimum-cli", "export", "onnx", "--model", stage, "--task",
         spec.get("export_task", "text-to-image"), export],
        env=fl.deterministic_env(),
    )
    # Optimum copies only the slow tokenizer files; add tokenizer.json (and our exact configs).
    tok_dirs = ["tokenizer"] + (["tokenizer_2"] if spec["pipeline_class"] == "StableDiffusionXLPipeline" else [])
    for t in tok_dirs:
        pad = spec["tokenizer_pad"] if t == "tokenizer" else spec["tokenizer_2_pad"]
        src = tok_cache / ("pad-eos" if pad == fl.EOS else "pad-bang")
        fl.copy_tree_files(src, export / t)
    write_scheduler_config(spec, export)
    _strip_paths(export)
    final = out_root / name
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(export, final)


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
        save_torch_pipeline(args.save_torch, all_specs()[args.save_torch], args.stage, args.tok_cache)
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
        if "tokenizer" in only:
            d = out_root / "clip-tokenizer"
            if d.exists():
                shutil.rmtree(d)
            fl.write_clip_tokenizer(d, pad_token=fl.EOS)
        for name in only:
            if name in PIPELINES:
                build_pipeline(name, out_root, tok_cache, work)
    print("done:", ", ".join(only))


if __name__ == "__main__":
    main()
