#!/usr/bin/env python3
"""Before/after comparison of two builds of examples/bench_pipeline (in-process, warm),
alternated round by round, with the same config. Checks the images are bit-identical.

    cargo build --release --example bench_pipeline   # for each version; copy target/release/examples/bench_pipeline
    /work/venv/ref/bin/python bench/ab.py --a bench/out/bin-before --b bench/out/bin-after \\
        --model onnx/tiny-sd15 --size 64 --steps 20 --batches 1,4 --rounds 4 --repeats 5 --name ab-tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--intra", type=int, default=1)
    ap.add_argument("--inter", type=int, default=1)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-ab-"))
    cfg = tmp / "ab.toml"
    cfg.write_text(f"[runtime.session]\nintra_threads = {args.intra}\ninter_threads = {args.inter}\n"
                   'optimization_level = "all"\ncpu_arena = true\nmemory_pattern = true\n')
    result = dict(args=vars(args), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), batches={})
    for batch in [int(b) for b in args.batches.split(",")]:
        raw = {"a": [], "b": []}
        for rnd in range(args.rounds):
            for side in (("a", "b") if rnd % 2 == 0 else ("b", "a")):
                png = tmp / f"{side}-b{batch}-r{rnd}.png"
                out = subprocess.run(
                    [Path(getattr(args, side)) / "bench_pipeline", "local", "--model-dir", ROOT / args.model,
                     "--config", cfg, "--steps", str(args.steps), "--width", str(args.size), "--height",
                     str(args.size), "--num-images", str(batch), "--repeats", str(args.repeats), "--png-out", png],
                    check=True, capture_output=True, text=True).stdout
                raw[side].append(json.loads(out.strip().splitlines()[-1]))
        a0 = tmp / ("a-b1-r0.png" if batch == 1 else f"a-b{batch}-r0-0.png")
        b0 = tmp / ("b-b1-r0.png" if batch == 1 else f"b-b{batch}-r0-0.png")
        identical = a0.read_bytes() == b0.read_bytes()
        summ = {}
        for side, runs in raw.items():
            warm = [r for res in runs for r in res["runs"] if not r["first"]]
            calls = warm[0]["unet_calls"]

            def m(f):
                vals = [f(r) for r in warm]
                return dict(median=statistics.median(vals), min=min(vals), max=max(vals), n=len(vals))

            summ[side] = dict(
                total_s=m(lambda r: r["total_s"]),
                unet_per_step_ms=m(lambda r: 1000 * r["unet_s"] / calls),
                glue_per_step_ms=m(lambda r: 1000 * r["scheduler_s"] / calls),
                outside_ort_pct=m(lambda r: 100 * (r["total_s"] - r["unet_s"] - r["vae_s"] - r["text_encoder_s"])
                                  / r["total_s"]),
                vm_hwm_mib=statistics.median(res["vm_hwm_kib"] / 1024 for res in runs),
            )
        result["batches"][str(batch)] = dict(summary=summ, png_identical=identical, raw=raw)
        s = summ
        print(f"batch {batch}: total {s['a']['total_s']['median']:.4f} -> {s['b']['total_s']['median']:.4f} s; "
              f"glue/step {s['a']['glue_per_step_ms']['median']:.4f} -> {s['b']['glue_per_step_ms']['median']:.4f} ms; "
              f"unet/step {s['a']['unet_per_step_ms']['median']:.3f} -> {s['b']['unet_per_step_ms']['median']:.3f} ms; "
              f"outside ORT {s['a']['outside_ort_pct']['median']:.3f} -> {s['b']['outside_ort_pct']['median']:.3f} %; "
              f"RSS {s['a']['vm_hwm_mib']:.0f} -> {s['b']['vm_hwm_mib']:.0f} MiB; identical PNG: {identical}", flush=True)
    out = ROOT / "bench/results" / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
