#!/usr/bin/env python3
"""Train the tiny demo text-to-image model (64x64 "a red circle on a blue background").

Two stages in one process, both resumable from the checkpoint folder:
  1. VAE (AutoencoderKL, 16/32/64/64 channels, GroupNorm with 4 groups, no mid-block attention,
     8x8x4 latents) as a deterministic autoencoder on the posterior mean (+5% latent noise),
     MSE + 0.5 L1, following --vae-phases (full 64x64 images at batch 16, or 32x32 random crops
     at batch 32). Then a bank of --bank latents (posterior means of random renders, times
     scaling_factor = 1/std of the bank) is encoded once; the encoder is frozen from here on.
  2. CLIP text encoder (hidden 64, 2 layers, real 49408 tokenizer) + UNet (32/64 channels,
     cross-attention in both levels) at batch 64: epsilon loss with min-SNR-5 weighting on the
     SD1.5 scaled-linear schedule, 10% empty captions (CFG), AdamW 1e-3 (200 warm-up steps),
     EMA of the weights (decay min(0.999, (1+s)/(10+s))). Only the embedding rows of the ~20
     tokens the captions use are trained (a delta table that export.py folds into the table);
     the rest of the 49408-row table keeps its random init. Every --dec-every UNet steps the
     VAE decoder takes one step on the bank (full images, batch 8): the latent space is fixed,
     so the UNet's target does not move.

Every --eval-every-s seconds of training the EMA model is sampled with the diffusers
StableDiffusionPipeline (DDIM trailing, 20 steps, guidance 5, seed = caption index) on the
60 captions of captions.json and scored with checker.py; one row per eval goes to
curve.csv, and the EMA weights of that point (+ the current VAE) are kept as
ckpt-dir/ema-stepN.pt. Training wall time (train_s) counts training steps and the bank
encoding, not evals or checkpoint writes. latest.pt is written every --ckpt-every-s seconds.
All randomness comes from seeded generators (numpy 11 for data, torch 12 for noise, model
init seeds 1/2/3, bank 14); evals use their own generators, so they do not change the run.

Usage (repository root):
    mkdir -p onnx/demo/checkpoints
    OMP_NUM_THREADS=1 nohup /work/venv/ref/bin/python onnx/demo/train.py --unet-steps 4170 \
        > onnx/demo/checkpoints/train.log 2>&1 &
    ... --resume                     # continue from onnx/demo/checkpoints/latest.pt
    ... --resume --unet-steps 5000   # continue and train longer
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import checker as C  # noqa: E402
import shapes as S  # noqa: E402

TOKENIZER_DIR = HERE.parent / "clip-tokenizer"

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# The default inference scheduler (also written by export.py into scheduler_config.json).
DDIM_CONFIG = dict(
    **SD_BETAS,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="trailing",
    trained_betas=None,
)
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 64, 64],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    # 4 groups: with 16 groups on 16 channels GroupNorm is a per-channel instance norm, which wipes
    # the colour of flat regions; the first VAE (16 groups) could not learn red vs green vs purple.
    norm_num_groups=4,
    sample_size=64,
    mid_block_add_attention=False,
    force_upcast=False,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=128,
    projection_dim=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)

EVAL_SEED = 2024  # picks the 60 evaluation captions


# ---------------------------------------------------------------------------------------------
# Evaluation captions (captions.json)
# ---------------------------------------------------------------------------------------------


def eval_set() -> list[dict]:
    """60 distinct (shape, fg, bg) drawn from the 66 trained combos; image i uses seed i."""
    cs = S.combos()
    idx = np.random.default_rng(EVAL_SEED).choice(len(cs), size=60, replace=False)
    out = []
    for i, k in enumerate(idx):
        s, f, b = cs[int(k)]
        out.append(dict(index=i, seed=i, prompt=S.caption(s, f, b), shape=s, fg=f, bg=b))
    return out


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class DeltaEmbedding(nn.Module):
    """Token embedding = frozen random table + trainable rows for the tokens in use."""

    def __init__(self, base: torch.Tensor, used_ids: list[int]):
        super().__init__()
        self.register_buffer("base", base.detach().clone())
        remap = torch.zeros(base.shape[0], dtype=torch.long)
        for r, i in enumerate(used_ids):
            remap[i] = r + 1
        self.register_buffer("remap", remap)
        self.used_ids = list(used_ids)
        self.delta = nn.Parameter(torch.zeros(len(used_ids), base.shape[1]))

    @property
    def weight(self) -> torch.Tensor:  # folded table (for export / get_input_embeddings users)
        w = self.base.clone()
        w[self.used_ids] += self.delta.detach()
        return w

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.delta.new_zeros(1, self.delta.shape[1]), self.delta])
        return F.embedding(ids, self.base) + F.embedding(self.remap[ids], table)


def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def all_captions() -> list[str]:
    return [""] + [S.caption(*c) for c in S.combos()]


def used_token_ids(tok) -> list[int]:
    ids = set()
    for c in all_captions():
        ids.update(tok(c, padding="max_length", max_length=77, truncation=True).input_ids)
    return sorted(ids)


def build_models(tok):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(2)
    te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    emb = te.text_model.embeddings
    emb.token_embedding = DeltaEmbedding(emb.token_embedding.weight, used_token_ids(tok))
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return vae, te, unet


def fold_text_encoder(te):
    """A plain CLIPTextModel copy with the delta rows folded into the embedding table."""
    te = copy.deepcopy(te)
    emb = te.text_model.embeddings
    if isinstance(emb.token_embedding, DeltaEmbedding):
        w = emb.token_embedding.weight
        e = nn.Embedding(w.shape[0], w.shape[1])
        e.weight.data.copy_(w)
        emb.token_embedding = e
    return te


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**DDIM_CONFIG)


def make_pipeline(vae, te, unet, tok, scheduler=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler or ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def evaluate_pipeline(pipe, cases, guidance=DEFAULT_GUIDANCE, steps=DEFAULT_STEPS, chunk=30):
    """Sample every case (seed = case['seed'], torch CPU generator), score with the checker."""
    results, images = [], []
    for a in range(0, len(cases), chunk):
        part = cases[a : a + chunk]
        out = pipe(
            [c["prompt"] for c in part], height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(c["seed"]) for c in part], output_type="np",
        ).images
        for im in out:
            u8 = (np.asarray(im) * 255).round().clip(0, 255).astype(np.uint8)  # as numpy_to_pil
            images.append(u8)
            results.append(C.analyse(u8))
    return C.score(results, cases), results, images


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, start: float = 0.0):
        self.total = start
        self._t = None

    def __enter__(self):
        self._t = time.perf_counter()

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._t


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def append_curve(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def vae_recon_accuracy(vae, n=132, seed=7) -> dict:
    rng = np.random.default_rng(seed)
    cs = S.combos()
    res, exp = [], []
    with torch.no_grad():
        for k in range(n):
            s, f, b = cs[k % len(cs)]
            img = S.render(s, f, b, rng if k >= len(cs) else None)
            x = torch.from_numpy(img.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1)
            r = vae.decode(vae.encode(x).latent_dist.mean).sample[0]
            u8 = ((r.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            res.append(C.analyse(u8))
            exp.append(dict(shape=s, fg=f, bg=b))
    return C.score(res, exp)


def bank_images(n: int) -> np.ndarray:
    """uint8 NCHW renders of the latent bank, replaying its random stream (seed 14)."""
    bank_rng = np.random.default_rng(14)
    cs = S.combos()
    out = []
    for _ in range(n // 256):
        idx = bank_rng.integers(0, len(cs), size=256)
        out.append(np.stack([S.render(*cs[k], bank_rng).transpose(2, 0, 1) for k in idx]))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", type=Path, default=HERE / "checkpoints")
    ap.add_argument("--curve", type=Path, default=HERE / "curve.csv")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--vae-phases", default="267:full:1e-3,900:crop:2e-3,1000:full:2e-3",
                    help="end_step:full|crop:lr,... (the schedule the committed model was trained with: the "
                    "first run went slowly on full images at 1e-3 and was continued from its step-267 checkpoint "
                    "on 32x32 crops at 2e-3, then 100 steps on full images)")
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-crop", type=int, default=32)
    ap.add_argument("--vae-crop-batch", type=int, default=32)
    ap.add_argument("--vae-noise", type=float, default=0.05, help="latent noise, relative to the latent std")
    ap.add_argument("--bank", type=int, default=8192)
    ap.add_argument("--unet-steps", type=int, default=4170)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema-max", type=float, default=0.999)
    ap.add_argument("--p-empty", type=float, default=0.1)
    ap.add_argument("--snr-gamma", type=float, default=5.0)
    ap.add_argument("--eval-every-s", type=float, default=300)
    ap.add_argument("--ckpt-every-s", type=float, default=180)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-train-s", type=float, default=float("inf"), help="stop stage 2 at this train_s")
    ap.add_argument("--dec-every", type=int, default=2, help="one decoder step every N UNet steps (0: never)")
    ap.add_argument("--dec-lr", type=float, default=1e-3)
    ap.add_argument("--dec-batch", type=int, default=8)
    ap.add_argument("--dec-crop", type=int, default=64, help="decoder training crop (64: full images)")
    args = ap.parse_args()

    phases = [(int(e), m, float(r)) for e, m, r in (p.split(":") for p in args.vae_phases.split(","))]
    assert all(m in ("full", "crop") for _, m, _ in phases)
    args.vae_steps = phases[-1][0]
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    latest = args.ckpt_dir / "latest.pt"

    from diffusers import DDPMScheduler

    tok = tokenizer()
    vae, te, unet = build_models(tok)
    cases = eval_set()

    state = dict(stage="vae", vae_step=0, unet_step=0, train_s=0.0)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=phases[0][2], weight_decay=0.0)
    np_rng = np.random.default_rng(11)
    gen = torch.Generator().manual_seed(12)
    ema_te = ema_unet = opt = None
    bank = None
    ck = None
    if args.resume and latest.exists():
        ck = torch.load(latest, weights_only=False)
        state = ck["state"]
        vae.load_state_dict(ck["vae"])
        if "vae_opt" in ck:
            vae_opt.load_state_dict(ck["vae_opt"])
        np_rng.bit_generator.state = ck["np_rng"]
        gen.set_state(ck["gen"])
        if "scaling_factor" in ck:
            vae.register_to_config(scaling_factor=ck["scaling_factor"])
        print(f"resumed: {state}", flush=True)
        if state["stage"] == "unet" and state["unet_step"] == 0 and args.vae_steps > state["vae_step"]:
            # more VAE training before the UNet starts: back to stage 1, new bank
            state["stage"] = "vae"
            (args.ckpt_dir / "bank.pt").unlink(missing_ok=True)
            print(f"continuing the VAE to {args.vae_steps} steps", flush=True)
    elif args.curve.exists():
        args.curve.unlink()
    clock = Clock(state["train_s"])

    def checkpoint(extra: dict) -> None:
        state["train_s"] = clock.total
        d = dict(state=state, vae=vae.state_dict(), np_rng=np_rng.bit_generator.state, gen=gen.get_state(), **extra)
        d["vae_opt"] = vae_opt.state_dict()
        if state["stage"] != "vae":
            d["scaling_factor"] = vae.config.scaling_factor
        save_atomic(d, latest)

    # ---- stage 1: VAE ----
    if state["stage"] == "vae":
        vae.train()
        last_ck = time.perf_counter()
        t_log, losses = time.perf_counter(), []
        while state["vae_step"] < args.vae_steps:
            with clock:
                mode, lr = next((m, r) for e, m, r in phases if state["vae_step"] < e)
                for g in vae_opt.param_groups:
                    g["lr"] = lr
                if mode == "full":
                    imgs, _ = S.batch(np_rng, args.vae_batch)
                else:
                    # random crops: the VAE is fully convolutional (no mid-block attention), and a
                    # 32x32 crop costs a quarter of a 64x64 image; colours are learned the same
                    k = args.vae_crop
                    imgs, _ = S.batch(np_rng, args.vae_crop_batch)
                    o = np_rng.integers(0, S.SIZE - k + 1, size=(len(imgs), 2))
                    imgs = np.stack([im[:, a : a + k, b : b + k] for im, (a, b) in zip(imgs, o)])
                x = torch.from_numpy(imgs)
                # Deterministic autoencoder on the posterior mean (+ a little noise so that the decoder
                # tolerates imperfect latents); sampling with the initial unit variance drowned the
                # signal and the first 450-step run learned too slowly. Only the mean is ever used.
                z = vae.encode(x).latent_dist.mean
                z_noisy = z + args.vae_noise * z.detach().std() * torch.randn(z.shape, generator=gen)
                r = vae.decode(z_noisy).sample
                loss = F.mse_loss(r, x) + 0.5 * F.l1_loss(r, x) + 1e-4 * (z**2).mean()
                vae_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
                vae_opt.step()
                state["vae_step"] += 1
            losses.append(loss.item())
            if state["vae_step"] % 25 == 0:
                dt = (time.perf_counter() - t_log) / 25
                print(f"vae step {state['vae_step']} loss {np.mean(losses):.5f} {dt:.2f}s/step train_s {clock.total:.0f}", flush=True)
                t_log, losses = time.perf_counter(), []
            if state["vae_step"] % 100 == 0:
                vae.eval()
                acc = vae_recon_accuracy(vae)
                vae.train()
                print(f"vae step {state['vae_step']} reconstruction accuracy (checker): {acc}", flush=True)
            if time.perf_counter() - last_ck > args.ckpt_every_s:
                checkpoint({})
                last_ck = time.perf_counter()
        vae.eval()
        acc = vae_recon_accuracy(vae)
        print("vae reconstruction accuracy (checker):", acc, flush=True)
        # latent bank (posterior means of random renders); scaling_factor = 1 / std of the bank
        with clock, torch.no_grad():
            bank_rng = np.random.default_rng(14)
            lats, keys = [], []
            cs = S.combos()
            for _ in range(args.bank // 256):
                idx = bank_rng.integers(0, len(cs), size=256)
                imgs = np.stack([S.render(*cs[k], bank_rng).transpose(2, 0, 1) for k in idx]).astype(np.float32) / 127.5 - 1
                lats.append(vae.encode(torch.from_numpy(imgs)).latent_dist.mean)
                keys.append(torch.from_numpy(idx))
            lat = torch.cat(lats)
            sf = float(1.0 / lat.std())
            bank = dict(lat=lat * sf, combo=torch.cat(keys))
        vae.register_to_config(scaling_factor=sf)
        print(f"scaling_factor {sf:.5f} (latent mean {lat.mean():.4f})", flush=True)
        append_curve(args.curve, dict(stage="vae", step=state["vae_step"], train_s=round(clock.total, 1),
                                      guidance="", steps="", shape=round(acc["shape"], 4), fg=round(acc["fg"], 4),
                                      bg=round(acc["bg"], 4), all=round(acc["all"], 4), loss=""))
        state["stage"] = "unet"
        torch.save(bank, args.ckpt_dir / "bank.pt")
        torch.save(dict(vae=vae.state_dict(), scaling_factor=sf), args.ckpt_dir / "vae.pt")
        checkpoint({})
        ck = None

    # ---- stage 2: text encoder + UNet ----
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    bank = torch.load(args.ckpt_dir / "bank.pt")
    # The decoder keeps training during stage 2 (every --dec-every UNet steps, on the bank): the
    # encoder, hence the latent space the UNet learns, is frozen, so this cannot move the target.
    dec_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in dec_params:
        p.requires_grad_(True)
    dec_opt = torch.optim.AdamW(dec_params, lr=args.dec_lr, weight_decay=0.0)
    if ck is not None and "dec_opt" in ck:
        dec_opt.load_state_dict(ck["dec_opt"])
    bank_imgs = bank_images(bank["combo"].shape[0])
    assert bank_imgs.shape[0] == bank["lat"].shape[0]
    print(f"bank {tuple(bank['lat'].shape)} std {bank['lat'].std():.3f} mean {bank['lat'].mean():.3f}", flush=True)

    caps = all_captions()  # index 0 = "", 1 + k = combo k
    cap_ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    te.train()
    unet.train()
    params = [p for p in list(te.parameters()) + list(unet.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema_te, ema_unet = copy.deepcopy(te).eval(), copy.deepcopy(unet).eval()
    for p in list(ema_te.parameters()) + list(ema_unet.parameters()):
        p.requires_grad_(False)
    if ck is not None and "unet" in ck:
        te.load_state_dict(ck["te"])
        unet.load_state_dict(ck["unet"])
        ema_te.load_state_dict(ck["ema_te"])
        ema_unet.load_state_dict(ck["ema_unet"])
        opt.load_state_dict(ck["opt"])
    ema_params = [p for p in list(ema_te.parameters()) + list(ema_unet.parameters())]
    live_params = [p for p in list(te.parameters()) + list(unet.parameters())]
    assert len(ema_params) == len(live_params)

    sched = DDPMScheduler(**SD_BETAS, prediction_type="epsilon", clip_sample=False)
    alphas_cumprod = sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight_t = torch.clamp(snr, max=args.snr_gamma) / snr  # min-SNR-gamma for epsilon prediction

    def save_unet_ckpt():
        checkpoint(dict(te=te.state_dict(), unet=unet.state_dict(), ema_te=ema_te.state_dict(),
                        ema_unet=ema_unet.state_dict(), opt=opt.state_dict(), dec_opt=dec_opt.state_dict()))

    def run_eval():
        pipe = make_pipeline(vae, fold_text_encoder(ema_te), ema_unet, tok)
        t0 = time.perf_counter()
        acc, _, _ = evaluate_pipeline(pipe, cases)
        row = dict(stage="unet", step=state["unet_step"], train_s=round(clock.total, 1), guidance=DEFAULT_GUIDANCE,
                   steps=DEFAULT_STEPS, shape=round(acc["shape"], 4), fg=round(acc["fg"], 4), bg=round(acc["bg"], 4),
                   all=round(acc["all"], 4), loss=round(float(np.mean(recent)) if recent else float("nan"), 5))
        append_curve(args.curve, row)
        te_sd = {k: v for k, v in ema_te.state_dict().items() if not k.endswith("token_embedding.base")}
        torch.save(dict(step=state["unet_step"], train_s=clock.total, acc=acc, ema_te=te_sd,
                        ema_unet=ema_unet.state_dict(), vae=vae.state_dict(), scaling_factor=vae.config.scaling_factor),
                   args.ckpt_dir / f"ema-step{state['unet_step']:06d}.pt")
        print(f"EVAL step {state['unet_step']} train_s {clock.total:.0f}: {acc} ({time.perf_counter() - t0:.0f}s)", flush=True)
        print(f"  vae reconstruction (checker): {vae_recon_accuracy(vae)}", flush=True)

    def decoder_step():
        # full images: crop training (as in stage 1) reads back worse at 64x64 until fine-tuned on
        # full images (VAE step 900: 64% -> step 1000: 94% after 100 full-image steps)
        k = args.dec_crop // 8  # aligned crops: latent k x k <-> image 8k x 8k
        i = torch.from_numpy(np_rng.integers(0, bank["lat"].shape[0], size=args.dec_batch))
        o = np_rng.integers(0, 8 - k + 1, size=(len(i), 2))
        z = torch.stack([bank["lat"][j, :, a : a + k, b : b + k] for j, (a, b) in zip(i.tolist(), o)])
        x = np.stack([bank_imgs[j, :, 8 * a : 8 * (a + k), 8 * b : 8 * (b + k)] for j, (a, b) in zip(i.tolist(), o)])
        x = torch.from_numpy(x.astype(np.float32) / 127.5 - 1)
        z = z + args.vae_noise * torch.randn(z.shape, generator=gen)  # bank latents have unit std
        vae.decoder.train()
        r = vae.decode(z / vae.config.scaling_factor).sample
        vae.decoder.eval()
        dl = F.mse_loss(r, x) + 0.5 * F.l1_loss(r, x)
        dec_opt.zero_grad(set_to_none=True)
        dl.backward()
        torch.nn.utils.clip_grad_norm_(dec_params, 1.0)
        dec_opt.step()
        dec_losses.append(dl.item())

    dec_losses = []
    last_ck = last_eval = time.perf_counter()
    last_eval_train = clock.total
    recent, t_log = [], time.perf_counter()
    ntr = len(caps) - 1
    while state["unet_step"] < args.unet_steps and clock.total < args.max_train_s:
        with clock:
            step = state["unet_step"]
            lr = args.lr * min(1.0, (step + 1) / args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.from_numpy(np_rng.integers(0, bank["lat"].shape[0], size=args.batch))
            x0 = bank["lat"][idx]
            cap = bank["combo"][idx] + 1
            drop = torch.from_numpy(np_rng.uniform(size=args.batch) < args.p_empty)
            cap = torch.where(drop, torch.zeros_like(cap), cap)
            uniq, inv = torch.unique(cap, return_inverse=True)
            h = te(cap_ids[uniq]).last_hidden_state[inv]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, 1000, (args.batch,), generator=gen)
            xt = sched.add_noise(x0, noise, t)
            pred = unet(xt, t, h).sample
            loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
            loss = (loss * weight_t[t]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(args.ema_max, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, live_params, 1 - decay)
            state["unet_step"] += 1
            if args.dec_every and state["unet_step"] % args.dec_every == 0:
                decoder_step()
        recent.append(loss.item())
        if state["unet_step"] % 50 == 0:
            dt = (time.perf_counter() - t_log) / 50
            print(f"unet step {state['unet_step']} loss {np.mean(recent[-50:]):.5f} dec {np.mean(dec_losses[-25:] or [0]):.4f} "
                  f"lr {lr:.2e} {dt:.2f}s/step train_s {clock.total:.0f}", flush=True)
            t_log = time.perf_counter()
        if clock.total - last_eval_train >= args.eval_every_s:
            run_eval()
            recent = []
            last_eval_train = clock.total
        if time.perf_counter() - last_ck > args.ckpt_every_s:
            save_unet_ckpt()
            last_ck = time.perf_counter()
    save_unet_ckpt()
    run_eval()
    print("done", state, flush=True)


if __name__ == "__main__":
    main()
