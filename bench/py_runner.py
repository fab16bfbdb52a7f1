#!/usr/bin/env python3
"""Python reference runner for bench/run.py: Optimum's ORTDiffusionPipeline on the same
ONNX folder, with ONNX Runtime session options set explicitly.

Loads the pipeline once, runs 1 + N generations (the first is reported separately) and
prints one JSON object: import/load time, per-run stage timings (time inside each ORT
session's run(), the denoise loop, postprocess, PNG encoding) and peak RSS.

    /work/venv/ref/bin/python bench/py_runner.py --model-dir onnx/tiny-sd15 --steps 20 \
        --repeats 5 --intra 1 --inter 1 --png-out /tmp/py.png
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402


def vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def session_options(intra: int, inter: int):
    """The ONNX Runtime session options of the Python runners (this one and bench/transformer_ab.py's):
    intra/inter-op threads as given, sequential, every graph optimization, CPU memory arena and memory
    patterns on (ORT's defaults, set explicitly)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra
    so.inter_op_num_threads = inter
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True
    return so


class Timed:
    """Wraps session.run to accumulate the seconds spent inside ONNX Runtime."""

    def __init__(self, session):
        self.orig = session.run
        self.total = 0.0
        self.calls = 0
        self.first_start = None
        session.run = self.run

    def run(self, *a, **kw):
        t = time.perf_counter()
        if self.first_start is None:
            self.first_start = t
        try:
            return self.orig(*a, **kw)
        finally:
            self.total += time.perf_counter() - t
            self.calls += 1

    def reset(self):
        self.total, self.calls, self.first_start = 0.0, 0, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--height", type=int, default=0)
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--intra", type=int, default=1)
    ap.add_argument("--inter", type=int, default=1)
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--io-binding", action="store_true", help="use_io_binding=True (Optimum's GPU default)")
    ap.add_argument("--trt-cache", default=None, help="TensorRT engine cache folder (TensorRT provider)")
    ap.add_argument("--png-out", default=None)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTDiffusionPipeline

    t_import = time.perf_counter() - T_START
    so = session_options(args.intra, args.inter)
    providers = [args.provider]
    provider_options = [{}]
    if args.provider == "TensorrtExecutionProvider":
        trt = {"trt_fp16_enable": True}
        if args.trt_cache:
            trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=args.trt_cache,
                       trt_timing_cache_enable=True, trt_timing_cache_path=args.trt_cache)
        providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        provider_options = [trt, {}, {}]
    elif args.provider == "CUDAExecutionProvider":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        provider_options = [{"cudnn_conv_algo_search": "EXHAUSTIVE"}, {}]
    t0 = time.perf_counter()
    pipe = ORTDiffusionPipeline.from_pretrained(
        args.model_dir,
        providers=providers,
        provider_options=provider_options,
        session_options=so,
        use_io_binding=args.io_binding,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    native = pipe.unet.config["sample_size"] * pipe.vae_scale_factor
    width = args.width or native
    height = args.height or native

    te = Timed(pipe.text_encoder.session)
    unet = Timed(pipe.unet.session)
    vae = Timed(pipe.vae_decoder.session)
    runs = []
    for i in range(args.repeats + 1):
        for t in (te, unet, vae):
            t.reset()
        marks = {}

        def on_step_end(p, step, timestep, kw):
            marks["last_step_end"] = time.perf_counter()
            return kw

        gen = torch.Generator("cpu").manual_seed(args.seed)
        t_call = time.perf_counter()
        images = pipe(
            prompt=args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            width=width,
            height=height,
            num_images_per_prompt=args.num_images,
            generator=gen,
            output_type="pil",
            callback_on_step_end=on_step_end,
        ).images
        t_ret = time.perf_counter()
        pngs = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        t_png = time.perf_counter()
        if i == 0 and args.png_out:
            outs = [args.png_out] if len(pngs) == 1 else [
                args.png_out[:-4] + f"-{k}.png" for k in range(len(pngs))]
            for b, path in zip(pngs, outs):
                with open(path, "wb") as f:
                    f.write(b)
        loop_s = marks["last_step_end"] - unet.first_start
        runs.append(dict(
            first=i == 0,
            total_s=t_png - t_call,
            generate_s=t_ret - t_call,
            text_encoder_s=te.total,
            unet_s=unet.total,
            unet_calls=unet.calls,
            loop_s=loop_s,
            scheduler_s=loop_s - unet.total,
            vae_s=vae.total,
            # from the end of the loop to the return, less the VAE run: decode glue + numpy_to_pil
            postprocess_s=(t_ret - marks["last_step_end"]) - vae.total,
            png_s=t_png - t_ret,
        ))
    print(json.dumps(dict(
        runner="python-optimum",
        ort_version=ort.__version__,
        providers=pipe.unet.session.get_providers(),
        intra_threads=args.intra,
        inter_threads=args.inter,
        width=width,
        height=height,
        import_s=t_import,
        load_s=load_s,
        runs=runs,
        vm_hwm_kib=vm_hwm_kib(),
        ru_maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
