"""Writes tests/data/overflow_vae_decoder/model.onnx: a stand-in fp16 VAE decoder that
overflows, as real fp16 VAE decoders (SDXL's above all) do on some latents.

It has the interface of an Optimum fp16 export's vae_decoder (input `latent_sample`
float16 [batch, 4, h, w], output `sample` float16 [batch, 3, 8h, 8w]): the first three
latent channels times 65504 (fp16's largest value), upsampled 8x by nearest neighbour. Any
latent value above 1 in magnitude becomes +-inf, so a generation's decode turns non-finite
and diffusiond's fp32 fallback (`vae_decoder_fp32/`) or its typed error must take over
(tests/fp16_vae.rs).

Run: python onnx/make_overflow_vae.py   (needs only the `onnx` package)
The output is byte-for-byte reproducible.
"""
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT16, ["batch_size", 4, "latent_height", "latent_width"])
    y = helper.make_tensor_value_info("sample", TensorProto.FLOAT16, ["batch_size", 3, "height", "width"])
    inits = [
        numpy_helper.from_array(np.array([0], dtype=np.int64), "starts"),
        numpy_helper.from_array(np.array([3], dtype=np.int64), "ends"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array(65504.0, dtype=np.float16), "big"),
        numpy_helper.from_array(np.array([1.0, 1.0, 8.0, 8.0], dtype=np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Slice", ["latent_sample", "starts", "ends", "axes"], ["rgb"]),
        helper.make_node("Mul", ["rgb", "big"], ["loud"]),
        helper.make_node("Resize", ["loud", "", "scales"], ["sample"], mode="nearest"),
    ]
    graph = helper.make_graph(nodes, "overflow_vae_decoder", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="diffusiond-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "tests" / "data" / "overflow_vae_decoder" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build(), out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
