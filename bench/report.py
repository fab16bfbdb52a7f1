#!/usr/bin/env python3
"""Markdown tables from bench/run.py results (the tables in docs/benchmarks.md).

    python3 bench/report.py bench/results/cpu-tiny.json bench/results/cpu-small.json ...
"""

from __future__ import annotations

import json
import sys


def ms(x):
    return "-" if x is None else f"{x * 1000:.2f}"


def s3(x):
    return "-" if x is None else f"{x:.3f}"


def mm(stat, f=s3):
    lo, hi = stat["min_max"]
    return f"{f(stat['median'])} ({f(lo)}–{f(hi)})"


def main() -> None:
    print("| scale | batch | runner | warm s/image, median (min–max) | cold start s | text enc ms | UNet ms/step "
          "| glue ms/step | VAE ms | PNG ms | outside ORT % | peak RSS MiB | Python ÷ this (warm / cold) | n warm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        d = json.load(open(path))
        for key, summ in d["summary"].items():
            scale, b = key.rsplit("-b", 1)
            raw = d["raw"][key]
            for name, s in summ.items():
                rss = s.get("peak_rss_warm_mib") or s.get("peak_rss_mib")
                ratio = "" if name == "python" else (
                    f"{s['python_over_this_warm']:.2f} / {s['python_over_this_cold']:.1f}"
                    if "python_over_this_warm" in s else "")
                label = {"inproc": "diffusiond in-process", "dbus": "diffusiond D-Bus",
                         "python": "Optimum (Python)"}[name]
                print(f"| {scale} {raw['size']}² {raw['steps']} steps | {b} | {label} | {mm(s['warm_per_image_s'])} "
                      f"| {s3(s['cold_s']['median'])} | {ms(s['text_encoder_s']['median'])} "
                      f"| {ms(s['unet_per_step_s']['median'])} | {ms(s['glue_per_step_s']['median'])} "
                      f"| {ms(s['vae_s']['median'])} | {ms(s['png_s']['median'])} "
                      f"| {s['outside_ort_pct']['median']:.3f} | {rss:.0f} | {ratio} | {s['warm_s']['n']} |")
        for key, p in d.get("parity", {}).items():
            print(f"<!-- {path} {key} parity ok={p['ok']} max pixel diff {max(p['max_pixel_diff'].values())} -->")


if __name__ == "__main__":
    main()
