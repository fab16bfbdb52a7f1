#!/usr/bin/env python3
"""fp16 ONNX export of a benchmark-scale pipeline for the GPU check (bench/gpu-check.sh).

Builds the same seeded random-weight torch pipeline as onnx/build_bench_models.py, then exports
it with `optimum-cli export onnx --dtype fp16 --device cuda` (fp16 export must run on CUDA).
The VAE decoder is kept fp16 too; random weights may overflow to NaN in fp16, which changes
the pixels but not the timings (the GPU check measures speed; parity is checked in fp32).

    python3 bench/export_fp16.py sd15-scale onnx/build/sd15-scale-fp16
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "onnx"))


def main() -> None:
    name, out = sys.argv[1], Path(sys.argv[2]).resolve()
    import build_fixtures
    import fixture_lib as fl

    with tempfile.TemporaryDirectory(prefix="diffusiond-fp16-") as td:
        work = Path(td)
        stage, export, tok = work / "stage", work / "export", work / "tokenizers"
        subprocess.run([sys.executable, ROOT / "onnx/build_fixtures.py", "--_save-torch", name, "--_stage", stage,
                        "--_tok-cache", tok], check=True, cwd=ROOT / "onnx")
        subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", stage,
                        "--task", "text-to-image", "--dtype", "fp16", "--device", "cuda", export], check=True)
        spec = build_fixtures.all_specs()[name]
        fl.copy_tree_files(tok / "pad-eos", export / "tokenizer")
        build_fixtures.write_scheduler_config(spec, export)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(export, out)
    print(f"built {out}")


if __name__ == "__main__":
    main()
