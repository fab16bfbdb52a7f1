#!/usr/bin/env bash
# GPU benchmark check: diffusiond with the CUDA and TensorRT execution providers against
# Optimum's ORTDiffusionPipeline (CUDA, IO binding) on the same fp16 ONNX export, with the
# harness of bench/run.py. Sized for one H200 machine with 16 cores: about 8-10 minutes.
#
#   bench/gpu-check.sh              # everything; results in bench/results/gpu-*.json and $OUT
#   PHASES=setup,build bench/gpu-check.sh     # a subset (setup build models cuda graphs trt)
#
# What it needs on the machine (checked first; it stops with a message when missing):
#   * an NVIDIA driver (CUDA 13 capable), and TensorRT 10 for the trt phase;
#   * ONNX Runtime GPU 1.31.1 with the CUDA 13 / cuDNN 9 libraries: `scripts/setup --gpu [--tensorrt]`
#     (PyPI), or ORT_GPU_WHEEL=path/to/onnxruntime_gpu-1.31.1-*.whl to install the wheel offline (the
#     CUDA libraries then come from the loader path, or from an offline bundle's lib folder:
#     ORT_DYLIB_PATH=PREFIX/lib/diffusiond/libonnxruntime.so.1.31.1, see docs/bundle.md); the same
#     runtime/python serves diffusiond (runtime/lib) and Python (PYTHONPATH);
#   * the Python side of onnx/requirements.txt (torch with CUDA, diffusers, optimum-onnx) for the fp16
#     export and the Optimum runner: PYTHON=... selects the interpreter (default: python3);
#   * cargo (or prebuilt binaries: BIN_DIR=folder holding diffusiond, diffusionctl, examples/bench_pipeline,
#     built with `cargo build --release --bins --example bench_pipeline`; cuda and tensorrt are default features).
#
# Phases and their time budget (timeouts, seconds):
#   setup   60  ONNX Runtime GPU into runtime/ (scripts/setup --gpu or the wheel)
#   build  180  cargo build --release --bins --example bench_pipeline
#   models 150  fp16 export of `small` and `sd15-scale` (bench/export_fp16.py, on CUDA)
#   cuda   120  bench/run.py: diffusiond CUDA EP (in-process + daemon) vs Optimum CUDA EP + IO binding
#   graphs  90  bench/run.py: diffusiond CUDA EP with runtime.cuda.cuda_graph (the UNet replayed from
#               CUDA graphs; buffers in device memory, docs/gpu.md) vs Optimum, in-process, batch 1
#   trt    180  bench/run.py: diffusiond TensorRT EP (fp16, engine + timing cache) in-process;
#               the first round builds engines (reported as cold start), later rounds reuse the cache
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PHASES=${PHASES:-setup,build,models,cuda,graphs,trt}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$root/bench/out/gpu}
mkdir -p "$OUT" bench/results
log="$OUT/gpu-check.log"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1
stamp=$(date +%Y%m%d-%H%M%S)
t_start=$(date +%s)

say() { printf '\n== [%ss] %s\n' "$(( $(date +%s) - t_start ))" "$*"; }
has() { [[ ",$PHASES," == *",$1,"* ]]; }
die() { echo "gpu-check: $*" >&2; exit 1; }

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || die "no NVIDIA driver (nvidia-smi failed)"
nproc; grep -m1 'model name' /proc/cpuinfo || true
"$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' \
  || die "$PYTHON has no torch; set PYTHON to the interpreter of onnx/requirements.txt"

if has setup; then
  say "setup: ONNX Runtime GPU"
  if [ -n "${ORT_GPU_WHEEL:-}" ]; then
    rm -rf runtime && mkdir -p runtime
    timeout 60 "$PYTHON" -m pip install -q --no-deps --no-index --target runtime/python "$ORT_GPU_WHEEL" || die "cannot install $ORT_GPU_WHEEL"
    ln -sfn python/onnxruntime/capi runtime/lib
  else
    PYTHON=$PYTHON timeout 60 scripts/setup --gpu || die "scripts/setup --gpu failed (no PyPI here? pass ORT_GPU_WHEEL=...)"
  fi
fi
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$root/runtime/lib/libonnxruntime.so.1.31.1}
[ -e "$ORT_DYLIB_PATH" ] || die "no $ORT_DYLIB_PATH: run the setup phase"
# the Python runner uses the very same ONNX Runtime build
export PYTHONPATH="$root/runtime/python${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - <<'EOF' || die "onnxruntime-gpu does not load in Python, or lacks the CUDA provider"
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
assert "CUDAExecutionProvider" in ort.get_available_providers()
EOF

BIN_DIR=${BIN_DIR:-}
if has build && [ -z "$BIN_DIR" ]; then
  say "build: cargo build --release"
  timeout 180 cargo build --release --bins --example bench_pipeline || die "cargo build failed"
fi
if [ -n "$BIN_DIR" ]; then
  mkdir -p target/release/examples
  cp "$BIN_DIR"/diffusiond "$BIN_DIR"/diffusionctl target/release/
  cp "$BIN_DIR"/examples/bench_pipeline target/release/examples/
fi
target/release/diffusiond --version || die "diffusiond does not start"

if has models; then
  say "models: fp16 export on CUDA"
  for m in small sd15-scale; do
    [ -e "onnx/build/$m-fp16/unet/model.onnx" ] && continue
    timeout 150 "$PYTHON" bench/export_fp16.py "$m" "onnx/build/$m-fp16" || die "fp16 export of $m failed"
  done
fi

# bench/run.py knows the scales by name; the GPU runs point them at the fp16 folders.
run_bench() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PYTHON" bench/run.py --name "$name" --intra 4 --inter 1 "$@"
  local rc=$?
  cp "bench/results/$name.json" "$OUT/" 2>/dev/null || true
  [ $rc -eq 0 ] || echo "gpu-check: $name exited $rc (partial results are in bench/results/$name.json)"
}

if has cuda; then
  say "cuda: diffusiond CUDA EP vs Optimum CUDA EP"
  BENCH_MODEL_SUFFIX=-fp16 run_bench "gpu-cuda-$stamp" 120 \
    --scales small,sd15-scale --batches 1,4 --rounds 2 --steps 20 --size 512 --repeats 3 \
    --providers cuda,cpu --py-provider CUDAExecutionProvider --py-io-binding
fi

if has graphs; then
  say "graphs: diffusiond CUDA EP with CUDA graphs vs Optimum CUDA EP"
  BENCH_MODEL_SUFFIX=-fp16 run_bench "gpu-cuda-graphs-$stamp" 90 \
    --scales sd15-scale --batches 1 --rounds 2 --steps 20 --size 512 --repeats 3 --runners inproc,python \
    --providers cuda,cpu --py-provider CUDAExecutionProvider --py-io-binding \
    --extra-config "$(printf '[runtime.cuda]\ncuda_graph = true\n')"
fi

if has trt; then
  say "trt: diffusiond TensorRT EP (fp16, engine cache)"
  cache="$root/bench/out/trt-cache"; mkdir -p "$cache"
  BENCH_MODEL_SUFFIX=-fp16 run_bench "gpu-trt-$stamp" 180 \
    --scales sd15-scale --batches 1,4 --rounds 2 --steps 20 --size 512 --repeats 3 --runners inproc \
    --providers tensorrt,cuda,cpu \
    --extra-config "$(printf '[runtime.tensorrt]\nfp16 = true\nengine_cache_dir = "%s"\ntiming_cache_dir = "%s"\n' "$cache" "$cache")"
fi

say "done in $(( $(date +%s) - t_start ))s; results: bench/results/gpu-*-$stamp.json (copies in $OUT)"
