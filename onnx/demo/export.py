#!/usr/bin/env python3
"""Export the trained demo model to onnx/tiny-demo/ (Optimum layout) and measure it.

Steps:
  1. rebuild the models exactly as train.py does (same configs and seeds), load the VAE of
     checkpoints/vae.pt and the EMA text encoder + UNet of one snapshot (--snapshot, default:
     the newest checkpoints/ema-step*.pt), fold the trained token-embedding rows into the table;
  2. save a diffusers StableDiffusionPipeline (DDIM scheduler, see train.DDIM_CONFIG) and export
     it with `optimum-cli export onnx --task text-to-image`; add tokenizer.json and the CLIP
     tokenizer files from onnx/clip-tokenizer/, write the full scheduler config
     (`clip_sample: false`), drop `_name_or_path` keys; copy to onnx/tiny-demo/;
  3. run Optimum's ORTDiffusionPipeline (CPU EP, 1 thread) on the 60 evaluation captions
     (one call per caption, generator = torch.Generator("cpu").manual_seed(index)), score the
     images with checker.py, write onnx/demo/captions.json (vocabulary, cases, thresholds,
     accuracy) and onnx/demo/samples.png (the 60 images, 10 per row, in caption order).

Usage (repository root):
    /work/venv/ref/bin/python onnx/demo/export.py [--snapshot onnx/demo/checkpoints/ema-step007000.pt]
    /work/venv/ref/bin/python onnx/demo/export.py --verify-only          # step 3 on onnx/tiny-demo
    /work/venv/ref/bin/python onnx/demo/export.py --verify-only --guidance 3,5,7.5 --steps 10,20
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ONNX_DIR = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ONNX_DIR))
import checker as C  # noqa: E402
import shapes as S  # noqa: E402
import train as T  # noqa: E402

OUT = ONNX_DIR / "tiny-demo"


def latest_snapshot(ckpt_dir: Path) -> Path:
    snaps = sorted(ckpt_dir.glob("ema-step*.pt"))
    if not snaps:
        sys.exit(f"no ema-step*.pt in {ckpt_dir}")
    return snaps[-1]


def save_torch_pipeline(snapshot: Path, ckpt_dir: Path, stage: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    tok = T.tokenizer()
    vae, te, unet = T.build_models(tok)
    v = torch.load(ckpt_dir / "vae.pt", weights_only=False)
    vae.load_state_dict(v["vae"])
    vae.register_to_config(scaling_factor=v["scaling_factor"])
    s = torch.load(snapshot, weights_only=False)
    if "vae" in s:  # the decoder keeps training in stage 2: use the snapshot's
        vae.load_state_dict(s["vae"])
        assert abs(s["scaling_factor"] - v["scaling_factor"]) < 1e-12
    missing, unexpected = te.load_state_dict(s["ema_te"], strict=False)
    assert not unexpected and all(k.endswith("token_embedding.base") for k in missing), (missing, unexpected)
    unet.load_state_dict(s["ema_unet"])
    pipe = T.make_pipeline(vae.eval(), T.fold_text_encoder(te).eval(), unet.eval(), tok)
    pipe.save_pretrained(str(stage), safe_serialization=True)
    return dict(step=s["step"], train_s=s["train_s"], torch_acc=s["acc"], snapshot=snapshot.name)


def export(snapshot: Path, ckpt_dir: Path, out: Path) -> dict:
    import fixture_lib as fl

    with tempfile.TemporaryDirectory(prefix="tiny-demo-") as td:
        stage, exp = Path(td) / "stage", Path(td) / "export"
        info = save_torch_pipeline(snapshot, ckpt_dir, stage)
        fl.run(
            [fl.VENV_BIN / "optimum-cli", "export", "onnx", "--model", stage, "--task", "text-to-image", exp],
            env=fl.deterministic_env(),
        )
        fl.copy_tree_files(ONNX_DIR / "clip-tokenizer", exp / "tokenizer")
        p = exp / "scheduler" / "scheduler_config.json"
        d = json.loads(p.read_text(encoding="utf-8"))
        for k, v in T.DDIM_CONFIG.items():
            d.setdefault(k, v)
        assert d["clip_sample"] is False and d["_class_name"] == "DDIMScheduler", d
        p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for q in sorted(exp.rglob("*.json")):
            if q.name in ("tokenizer.json", "vocab.json"):
                continue
            j = json.loads(q.read_text(encoding="utf-8"))
            if isinstance(j, dict) and "_name_or_path" in j:
                del j["_name_or_path"]
                q.write_text(json.dumps(j, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(exp, out)
    return info


def load_ort(model_dir: Path):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTDiffusionPipeline

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    pipe = ORTDiffusionPipeline.from_pretrained(
        str(model_dir), provider="CPUExecutionProvider", session_options=so, use_io_binding=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def verify(pipe, cases, guidance: float, steps: int):
    import torch

    results, images = [], []
    for c in cases:
        im = pipe(
            c["prompt"], height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(c["seed"]), output_type="np",
        ).images[0]
        u8 = (np.asarray(im) * 255).round().clip(0, 255).astype(np.uint8)
        images.append(u8)
        results.append(C.analyse(u8))
    return C.score(results, cases), results, images


def grid(images, per_row=10) -> np.ndarray:
    rows = []
    for a in range(0, len(images), per_row):
        r = list(images[a : a + per_row])
        r += [np.zeros_like(images[0])] * (per_row - len(r))
        rows.append(np.concatenate(r, axis=1))
    return np.concatenate(rows, axis=0)


def dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", type=Path, default=HERE / "checkpoints")
    ap.add_argument("--snapshot", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--verify-only", action="store_true")
    ap.add_argument("--report-dir", type=Path, default=HERE, help="where captions.json and samples.png go")
    ap.add_argument("--guidance", default=str(T.DEFAULT_GUIDANCE), help="comma list; the first is the default")
    ap.add_argument("--steps", default=str(T.DEFAULT_STEPS), help="comma list; the first is the default")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    info = {}
    if not args.verify_only:
        snap = args.snapshot or latest_snapshot(args.ckpt_dir)
        info = export(snap, args.ckpt_dir, args.out)
        print("exported", info, "size", dir_size(args.out), flush=True)

    cases = T.eval_set()
    pipe = load_ort(args.out)
    guidances = [float(g) for g in args.guidance.split(",")]
    steps_list = [int(s) for s in args.steps.split(",")]
    sweep = []
    default = None
    for st in steps_list:
        for g in guidances:
            t0 = time.perf_counter()
            acc, results, images = verify(pipe, cases, g, st)
            print(f"ONNX steps {st} guidance {g}: {acc} ({time.perf_counter() - t0:.0f}s)", flush=True)
            sweep.append(dict(steps=st, guidance=g, **{k: round(v, 4) for k, v in acc.items()}))
            if default is None:
                default = (st, g, acc, results, images)
    st, g, acc, results, images = default
    # wider check: every trained combo (66), two other seeds each (1000 + 2k, 1001 + 2k)
    wide = [dict(index=2 * k + j, seed=1000 + 2 * k + j, prompt=S.caption(*c), shape=c[0], fg=c[1], bg=c[2])
            for k, c in enumerate(S.combos()) for j in range(2)]
    wide_acc, _, wide_images = verify(pipe, wide, g, st)
    print(f"ONNX all combos x 2 seeds: {wide_acc}", flush=True)
    from PIL import Image

    args.report_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(images)).save(args.report_dir / "samples.png", optimize=True)

    cj = args.report_dir / "captions.json"
    old = json.loads(cj.read_text()) if cj.exists() else {}
    doc = dict(
        description=(
            "Tiny demo model onnx/tiny-demo: vocabulary, the 60 fixed evaluation captions, the checker's "
            "rules and thresholds (onnx/demo/checker.py) and the accuracy of the ONNX export measured with "
            "Optimum's ORTDiffusionPipeline (CPU EP, 1 thread)."
        ),
        template=S.TEMPLATE,
        shapes=S.SHAPES,
        fg_colors=S.FG_COLORS,
        bg_colors=S.BG_COLORS,
        excluded="fg == bg (white on white, blue on blue) is never trained",
        colors_rgb={k: list(v) for k, v in S.COLORS.items()},
        image_size=[S.SIZE, S.SIZE],
        checker=dict(
            image="RGB uint8 64x64, as numpy_to_pil: round(clip(x, 0, 1) * 255) of the pipeline's [0,1] output",
            background=f"per-channel median over the pooled pixels of the four {C.THRESHOLDS['corner_patch']}x"
            f"{C.THRESHOLDS['corner_patch']} corner patches, nearest colour (Euclidean RGB) among all of colors_rgb",
            foreground=f"per-channel median over the centre {C.THRESHOLDS['centre_patch']}x{C.THRESHOLDS['centre_patch']} "
            "patch (rows and columns 28..35), nearest colour among all of colors_rgb",
            shape="mask = pixels with squared RGB distance to the fg median < distance to the bg median; fill = "
            "mask count / area of the mask's bounding box (no connected components); triangle if fill < "
            "fill_triangle_below, square if fill >= fill_square_from, else circle",
            thresholds=C.THRESHOLDS,
            median="numpy median (mean of the two middle values for an even count)",
            clean_render_accuracy=old.get("checker", {}).get("clean_render_accuracy") or C.clean_accuracy(),
        ),
        evaluation=dict(
            pipeline="optimum ORTDiffusionPipeline, one call per caption, negative prompt none (empty)",
            scheduler="DDIMScheduler from onnx/tiny-demo/scheduler/scheduler_config.json (trailing, eta 0)",
            steps=st,
            guidance=g,
            seed_rule="image i: generator=torch.Generator('cpu').manual_seed(i) (seed = caption index), no latents",
            height=S.SIZE,
            width=S.SIZE,
        ),
        accuracy_onnx={k: round(v, 4) for k, v in acc.items()},
        accuracy_sweep_onnx=sweep,
        accuracy_all_combos_onnx=dict(
            what="all 66 trained (shape, fg, bg) combos x 2 seeds (image 2k+j: combo k in shapes.combos() order, "
            "seed 1000+2k+j), default steps and guidance",
            **{k: round(v, 4) for k, v in wide_acc.items()},
        ),
        model=info or old.get("model", {}),
        cases=[dict(**c, got=dict(shape=r["shape"], fg=r["fg"], bg=r["bg"]),
                    ok=all(r[k] == c[k] for k in ("shape", "fg", "bg"))) for c, r in zip(cases, results)],
    )
    if info:
        doc["model"]["size_bytes"] = dir_size(args.out)
    cj.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print("accuracy (ONNX, default):", doc["accuracy_onnx"])
    wrong = [(c["index"], c["prompt"], c["got"]) for c in doc["cases"] if not c["ok"]]
    print(f"wrong ({len(wrong)}):", wrong[:20])


if __name__ == "__main__":
    main()
