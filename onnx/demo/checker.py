#!/usr/bin/env python3
"""Automatic checker for the tiny demo model: reads shape, foreground and background colour
back from a 64x64 RGB image.

Rules (thresholds in THRESHOLDS, also written to captions.json for the Rust side):
* background: per-channel median of the four CORNER x CORNER corner patches (all pixels of
  the four patches pooled), classified as the nearest colour (Euclidean RGB) among ALL
  named colours (so a purple background is wrong, not "nearest background colour").
* foreground: per-channel median of the CENTRE x CENTRE centre patch, nearest named colour.
* shape: foreground mask = pixels closer (RGB) to the measured foreground median than to the
  measured background median; fill ratio = mask pixels inside the mask's bounding box /
  bounding-box area. triangle < 0.64 <= circle < 0.89 <= square (ideal: 0.5, 0.785, 1.0).
  The bounding box is the mask's, without connected components (a speckle far away makes
  the box larger and the ratio smaller, so a noisy image tends to fail).

Usage:
    python onnx/demo/checker.py --clean       # accuracy on clean (training-distribution) renders
    python onnx/demo/checker.py img.png ...   # print what it sees
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes as S  # noqa: E402

THRESHOLDS = {
    "corner_patch": 6,  # px, each of the four corners
    "centre_patch": 8,  # px, centred (rows/cols 28..35 of 64)
    "fill_triangle_below": 0.64,
    "fill_square_from": 0.89,
}


def nearest(rgb: np.ndarray) -> str:
    names = list(S.COLORS)
    d = [float(np.sum((rgb - np.array(S.COLORS[n], np.float32)) ** 2)) for n in names]
    return names[int(np.argmin(d))]


def analyse(img: np.ndarray) -> dict:
    """img: uint8 or float HWC RGB in 0..255, 64x64."""
    a = np.asarray(img, np.float32)
    assert a.shape == (S.SIZE, S.SIZE, 3), a.shape
    k = THRESHOLDS["corner_patch"]
    corners = np.concatenate(
        [a[:k, :k].reshape(-1, 3), a[:k, -k:].reshape(-1, 3), a[-k:, :k].reshape(-1, 3), a[-k:, -k:].reshape(-1, 3)]
    )
    bg_rgb = np.median(corners, axis=0)
    c = THRESHOLDS["centre_patch"]
    o = (S.SIZE - c) // 2
    fg_rgb = np.median(a[o : o + c, o : o + c].reshape(-1, 3), axis=0)
    df = np.sum((a - fg_rgb) ** 2, axis=-1)
    db = np.sum((a - bg_rgb) ** 2, axis=-1)
    mask = df < db
    fill = 0.0
    if mask.any():
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill = float(mask.sum()) / float(box)
    if fill < THRESHOLDS["fill_triangle_below"]:
        shape = "triangle"
    elif fill < THRESHOLDS["fill_square_from"]:
        shape = "circle"
    else:
        shape = "square"
    return dict(
        shape=shape, fg=nearest(fg_rgb), bg=nearest(bg_rgb), fill=round(fill, 4),
        fg_rgb=[round(float(v), 1) for v in fg_rgb], bg_rgb=[round(float(v), 1) for v in bg_rgb],
    )


def score(results: list[dict], expected: list[dict]) -> dict:
    """Fractions right per attribute and on all three."""
    n = len(expected)
    ok = {k: 0 for k in ("shape", "fg", "bg", "all")}
    for r, e in zip(results, expected):
        good = [r[k] == e[k] for k in ("shape", "fg", "bg")]
        for k, g in zip(("shape", "fg", "bg"), good):
            ok[k] += g
        ok["all"] += all(good)
    return {k: v / n for k, v in ok.items()}


def clean_accuracy(n: int = 2000, seed: int = 0) -> dict:
    """Accuracy on n random training-distribution renders (random size and position)."""
    rng = np.random.default_rng(seed)
    cs = S.combos()
    res, exp = [], []
    for _ in range(n):
        s, f, b = cs[rng.integers(len(cs))]
        res.append(analyse(S.render(s, f, b, rng)))
        exp.append(dict(shape=s, fg=f, bg=b))
    return score(res, exp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", action="store_true", help="measure accuracy on clean renders")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("images", nargs="*")
    args = ap.parse_args()
    if args.clean:
        print("clean renders:", clean_accuracy(args.n))
    from PIL import Image

    for p in args.images:
        print(p, analyse(np.asarray(Image.open(p).convert("RGB"))))


if __name__ == "__main__":
    main()
