"""Writes the tiny VAE decoder fixture for `taesd` previews and its reference outputs.

* onnx/tiny-sd15/taesd_decoder/model.onnx and config.json: the decoder of a small
  diffusers `AutoencoderTiny` (4 latent channels, 16 channels per block, one block per
  level, 8x upsampling like TAESD), seeded random weights, then fitted for a few hundred
  Adam steps to tiny-sd15's own VAE decoder on random latents (so that a preview resembles
  the final image and tests/previews.rs can bound how far apart they are). Exported as
  diffusers' `AutoencoderTiny.decode(latents).sample`: input `latent_sample` [B, 4, h, w]
  (diffusers' latents as they are: AutoencoderTiny's `scaling_factor` is 1.0), output
  `sample` [B, 3, 8h, 8w] in [-1, 1], the names of Optimum's vae_decoder.
* tests/golden/taesd/latents_N.npy and decoded_N.npy: fixed latents and what diffusers'
  `AutoencoderTiny.decode` makes of them (float32), for the parity test in
  src/pipeline/preview.rs.

Run: /work/venv/ref/bin/python onnx/make_taesd.py   (torch, diffusers, onnx, onnxruntime)
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from diffusers import AutoencoderTiny

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "onnx" / "tiny-sd15"
OUT = MODEL / "taesd_decoder"
GOLDEN = ROOT / "tests" / "golden" / "taesd"
SEED = 2026
FIT_STEPS = 400


class Decode(torch.nn.Module):
    """`AutoencoderTiny.decode(latents).sample`, as diffusers' pipelines call it."""

    def __init__(self, vae: AutoencoderTiny):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample).sample


def build() -> AutoencoderTiny:
    torch.manual_seed(SEED)
    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).eval()


def fit(vae: AutoencoderTiny) -> None:
    """A few hundred steps towards tiny-sd15's VAE decoder (`latents / 0.18215` into it)."""
    target = ort.InferenceSession(str(MODEL / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    scaling = json.loads((MODEL / "vae_decoder" / "config.json").read_text())["scaling_factor"]
    gen = torch.Generator().manual_seed(SEED + 1)
    opt = torch.optim.Adam(vae.decoder.parameters(), lr=3e-3)
    vae.train()
    for step in range(FIT_STEPS):
        z = torch.randn((8, 4, 8, 8), generator=gen)
        want = torch.from_numpy(target.run(None, {"latent_sample": (z / scaling).numpy()})[0])
        loss = torch.nn.functional.l1_loss(vae.decode(z).sample, want)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == FIT_STEPS - 1:
            print(f"fit step {step}: L1 {loss.item():.4f}")
    vae.eval()


def main() -> None:
    vae = build()
    fit(vae)
    OUT.mkdir(parents=True, exist_ok=True)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vae.config.items() if not k.startswith("_")}
    config = {"_class_name": "AutoencoderTiny", "_diffusers_version": __import__("diffusers").__version__, **config}
    (OUT / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    example = torch.zeros((1, 4, 8, 8))
    torch.onnx.export(
        Decode(vae),
        (example,),
        str(OUT / "model.onnx"),
        input_names=["latent_sample"],
        output_names=["sample"],
        dynamic_axes={
            "latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
            "sample": {0: "batch_size", 2: "height", 3: "width"},
        },
        opset_version=17,
        dynamo=False,
    )
    GOLDEN.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED + 2)
    shapes = [(1, 4, 8, 8), (1, 4, 6, 10), (2, 4, 4, 4)]
    session = ort.InferenceSession(str(OUT / "model.onnx"), providers=["CPUExecutionProvider"])
    for i, shape in enumerate(shapes):
        latents = torch.randn(shape, generator=gen) * 1.5
        with torch.no_grad():
            decoded = vae.decode(latents).sample
        np.save(GOLDEN / f"latents_{i}.npy", latents.numpy().astype(np.float32))
        np.save(GOLDEN / f"decoded_{i}.npy", decoded.numpy().astype(np.float32))
        ours = session.run(None, {"latent_sample": latents.numpy()})[0]
        print(f"case {i} {shape}: onnxruntime vs diffusers max |diff| {np.abs(ours - decoded.numpy()).max():.2e}")
    size = (OUT / "model.onnx").stat().st_size
    print(f"wrote {OUT / 'model.onnx'} ({size} bytes), {OUT / 'config.json'}, {GOLDEN}")


if __name__ == "__main__":
    main()
