#!/bin/bash
# Peak memory of the daemon's first job after a model loads and of the same job again:
# the first-run and warm columns of docs/memory.md's table.
#
#   bench/memory_daemon.sh MODEL_DIR "64 128 256 384 512 640" > bench/results/memory-daemon.txt
#
# Per size: a fresh daemon on a private bus (one ONNX Runtime thread, no memory budget);
# its first job is the size itself (3 steps, guidance 7.5), then the same job again. The
# peaks are the daemon's VmHWM, reset between the jobs through /proc/PID/clear_refs (5);
# RSS after each job is VmRSS. Numbers in kB. BIN (default target/debug) picks the binaries;
# STEPS the steps.
set -eu
MODEL=$(realpath "$1"); SIZES=$2; STEPS=${STEPS:-3}
BIN=${BIN:-$(dirname "$0")/../target/debug}
ROOT=$(realpath "$(dirname "$0")/..")
W=$(mktemp -d)
trap 'kill $BUS 2>/dev/null; rm -rf "$W"' EXIT
dbus-daemon --session --nofork --address="unix:path=$W/bus" 2>/dev/null &
BUS=$!
ADDR="unix:path=$W/bus"
status() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
job() { "$BIN/diffusionctl" generate --address "$ADDR" --prompt "a red circle" --seed 1 \
    --steps "$STEPS" --width "$1" --height "$1" --output "$W/out.png" > /dev/null; }
for side in $SIZES; do
    cat > "$W/d.toml" <<TOML
default_model = "m"
[models.m]
path = "$MODEL"
max_width = 4096
max_height = 4096
[runtime.session]
intra_threads = 1
inter_threads = 1
[limits]
max_width = 4096
max_height = 4096
max_pixels = 16777216
memory_budget = 0
TOML
    ORT_DYLIB_PATH="$ROOT/runtime/lib/libonnxruntime.so.1.32.0" RUST_LOG=warn \
        "$BIN/diffusiond" --address "$ADDR" --config "$W/d.toml" 2> "$W/log" &
    D=$!
    for _ in $(seq 600); do
        busctl --address "$ADDR" status io.github.Diffusiond1 > /dev/null 2>&1 && break
        sleep 0.1
    done
    idle=$(status $D VmRSS)
    job "$side"
    first=$(status $D VmHWM); after_first=$(status $D VmRSS)
    echo 5 > "/proc/$D/clear_refs"
    job "$side"
    warm=$(status $D VmHWM); after_warm=$(status $D VmRSS)
    echo "$(basename "$MODEL") $side idle=$idle first=$first warm=$warm after_first=$after_first after_warm=$after_warm"
    kill $D; wait $D 2> /dev/null || true
done
