#!/usr/bin/env python3
"""Write a deterministic batch manifest (.jsonl) for `diffusionctl batch` and bench/batch_python.py.

Item i (zero-based) is named `item-000`, `item-001`, ... (3 digits, more when there are
more than 1000 items), has seed 1000 + i and the same width, height, steps and guidance
scale as every other item. The prompts vary: they are built from a fixed list of
subjects and styles, every fourth item repeats the prompt of the item before it (prompt
reuse), and every fifth item has a negative prompt. No randomness: the same flags always
give the same file.

    python3 bench/make_manifest.py --items 64 --width 256 --height 256 --steps 10 --out /tmp/m.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUBJECTS = [
    "a lighthouse on a rocky coast",
    "a red fox in fresh snow",
    "an astronaut riding a horse",
    "a bowl of ramen on a wooden table",
    "a steam locomotive crossing a bridge",
    "a cat sleeping on a windowsill",
    "a mountain lake at sunrise",
    "a street market in the rain",
    "a vintage bicycle against a brick wall",
    "a hot air balloon over a valley",
    "a robot watering plants in a greenhouse",
]
STYLES = [
    "oil painting",
    "watercolor",
    "35mm photograph",
    "pencil sketch",
    "digital art, highly detailed",
    "isometric illustration",
    "ukiyo-e woodblock print",
]
NEGATIVE = "blurry, low quality, watermark"


def prompt_for(i: int) -> str:
    # 11 subjects x 7 styles: the pairs repeat only after 77 distinct prompts
    return f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[(i // len(SUBJECTS) + i) % len(STYLES)]}"


def items(n: int, width: int, height: int, steps: int, guidance: float) -> list[dict]:
    digits = max(3, len(str(n - 1)))
    out = []
    prompt = ""
    for i in range(n):
        if i % 4 != 3:  # every fourth item reuses the previous prompt
            prompt = prompt_for(i)
        item = {"name": f"item-{i:0{digits}d}", "prompt": prompt}
        if i % 5 == 4:
            item["negative_prompt"] = NEGATIVE
        item.update(width=width, height=height, steps=steps, guidance_scale=guidance, seed=1000 + i)
        out.append(item)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=64, help="number of lines (default 64)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--out", type=Path, default=None, help="output .jsonl (default: stdout)")
    args = ap.parse_args()
    if args.items < 1:
        ap.error("--items must be at least 1")
    text = "".join(json.dumps(it, ensure_ascii=False) + "\n"
                   for it in items(args.items, args.width, args.height, args.steps, args.guidance))
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
