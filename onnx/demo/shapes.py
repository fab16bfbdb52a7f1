"""Synthetic "coloured shape on a coloured background" data for the tiny demo model.

Everything the data, the captions and the checker agree on lives here:
the vocabulary (shapes, foreground and background colours with their RGB values),
the caption template, and the renderer.

Images are 64x64 RGB, antialiased by 4x4 supersampling. The shape is centred
(+-3 px jitter) and large enough to cover the centre 8x8 patch and leave the
four 6x6 corner patches as background; the checker relies on that.
"""

from __future__ import annotations

import numpy as np

SIZE = 64
SS = 4  # supersampling factor for antialiasing

SHAPES = ["circle", "square", "triangle"]

# Well-separated colours (no orange / teal: the first prototype confused red/orange/yellow and
# green/teal). "blue" and "white" are both foreground and background colours, with one RGB each.
COLORS = {
    "red": (220, 30, 30),
    "yellow": (245, 215, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
FG_COLORS = ["red", "yellow", "green", "blue", "purple", "white"]
BG_COLORS = ["white", "black", "gray", "blue"]

TEMPLATE = "a {fg} {shape} on a {bg} background"


def combos() -> list[tuple[str, str, str]]:
    """All (shape, fg, bg) the model is trained on: fg != bg (no white-on-white, blue-on-blue)."""
    return [(s, f, b) for s in SHAPES for f in FG_COLORS for b in BG_COLORS if f != b]


def caption(shape: str, fg: str, bg: str) -> str:
    return TEMPLATE.format(fg=fg, shape=shape, bg=bg)


def shape_mask(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    """Antialiased coverage in [0,1], float32 [SIZE, SIZE]. `size` in [0,1] picks the scale."""
    n = SIZE * SS
    c = (np.arange(n, dtype=np.float32) + 0.5) / SS  # pixel-space coordinates of subsamples
    x = c[None, :]
    y = c[:, None]
    if shape == "circle":
        r = 17.0 + 5.0 * size
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        h = 15.0 + 5.0 * size
        m = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":
        # equilateral, pointing up, centroid at (cx, cy), circumradius R
        R = 21.0 + 5.0 * size
        top = cy - R
        base = cy + R / 2
        half = R * np.sqrt(3) / 2
        # inside if below the two slanted edges and above the base
        t = (y - top) / (base - top)  # 0 at apex, 1 at base
        m = (y <= base) & (t >= 0) & (np.abs(x - cx) <= t * half)
    else:
        raise ValueError(shape)
    m = m.astype(np.float32).reshape(SIZE, SS, SIZE, SS).mean(axis=(1, 3))
    return m


def render(shape: str, fg: str, bg: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 HWC image. With rng=None: centred, middle size (the "clean" canonical render)."""
    if rng is None:
        cx = cy = SIZE / 2
        size = 0.5
    else:
        cx = SIZE / 2 + rng.uniform(-3, 3)
        cy = SIZE / 2 + rng.uniform(-3, 3)
        size = rng.uniform(0, 1)
    m = shape_mask(shape, cx, cy, size)[..., None]
    f = np.array(COLORS[fg], np.float32)
    b = np.array(COLORS[bg], np.float32)
    img = m * f + (1 - m) * b
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def batch(rng: np.random.Generator, n: int, p_empty: float = 0.0):
    """n random training examples: float32 NCHW in [-1,1] and their captions ("" with p_empty)."""
    cs = combos()
    idx = rng.integers(0, len(cs), size=n)
    imgs = np.empty((n, 3, SIZE, SIZE), np.float32)
    caps = []
    for i, k in enumerate(idx):
        s, f, b = cs[k]
        imgs[i] = render(s, f, b, rng).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
        caps.append("" if rng.uniform() < p_empty else caption(s, f, b))
    return imgs, caps
