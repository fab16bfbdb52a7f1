#!/usr/bin/env python3
"""Latency of an interactive `diffusionctl generate` while a batch runs in the daemon, against
the same request on an idle daemon, side by side in one run (see docs/benchmarks.md).

One diffusiond on a private bus (bench/batch_throughput.py's Bus and Daemon: the model
preloaded, default session options). Rounds alternate: the generate alone on the idle daemon,
then --per-round generates while a batch of --items items (same size and steps) runs,
submitted with `diffusionctl batch --detach`; they start after the batch's first image, at
random moments (0 to --jitter seconds apart), since the wait depends on where in the running
UNet batch a job arrives. Each latency is the client process's wall time (start to PNG
written). Also recorded: how many batch images the daemon had finished when each interactive
job returned, so the results show the job did not wait for the batch. With --complete, the
batch runs to its end, and each round also runs the same batch alone: the batch's time with
the interactive jobs, against alone, shows what they cost it (at best their own time).

    cargo build --release --bins
    /work/venv/ref/bin/python bench/interactive_latency.py --model-dir onnx/build/small \\
        --width 256 --height 256 --steps 10 --items 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import batch_throughput as bt  # noqa: E402
import make_manifest  # noqa: E402


def ctl(args, bus: bt.Bus, *rest: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    cmd = [str(args.bin_dir / "diffusionctl"), *rest, "--address", bus.address]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def generate(args, bus: bt.Bus, out: Path) -> float:
    t0 = time.monotonic()
    r = ctl(args, bus, "generate", "--prompt", "a lighthouse at dusk", "--seed", "7",
            "--steps", str(args.steps), "--width", str(args.width), "--height", str(args.height),
            "--output", str(out))
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"generate failed: {r.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=bt.ROOT / "onnx/tiny-sd15")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-round", type=int, default=3, help="interactive jobs during each batch")
    ap.add_argument("--jitter", type=float, default=4.0, help="most seconds between them")
    ap.add_argument("--bin-dir", type=Path, default=bt.ROOT / "target/release")
    ap.add_argument("--label", default=None)
    ap.add_argument("--out-dir", type=Path, default=bt.ROOT / "bench/results")
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--complete", action="store_true",
                    help="let each batch finish, and time the same batch alone each round")
    args = ap.parse_args()
    args.model_dir = args.model_dir.resolve()
    args.intra = args.inter = 0
    args.python = Path(sys.executable)
    label = args.label or f"latency-{args.model_dir.name}-{args.width}x{args.height}-s{args.steps}"

    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-latency-"))
    env = dict(os.environ, XDG_STATE_HOME=str(tmp / "state"), RUST_LOG="warn")
    bus = bt.Bus(tmp / "bus")
    daemon = bt.Daemon(args, bus, tmp, env)
    manifest = tmp / "manifest.jsonl"
    subprocess.run([sys.executable, str(HERE / "make_manifest.py"), "--items", str(args.items),
                    "--width", str(args.width), "--height", str(args.height), "--steps", str(args.steps),
                    "--out", str(manifest)], check=True)
    images = sum(len(bt.files_of(i)) for i in bt.read_items(manifest, 0))
    rounds = []
    seen: set[str] = set()
    try:
        generate(args, bus, tmp / "warm-up.png")
        for r in range(args.rounds):
            idle = generate(args, bus, tmp / f"idle-{r}.png")
            alone_s = None
            if args.complete:
                t0 = time.monotonic()
                done_alone = ctl(args, bus, "batch", str(manifest), "--output-dir", str(tmp / f"alone-{r}"),
                                 "--restart")
                if done_alone.returncode != 0:
                    raise RuntimeError(f"batch failed: {done_alone.stderr}")
                alone_s = time.monotonic() - t0
            out = tmp / f"batch-{r}"
            t_batch = time.monotonic()
            # --restart: the manifest is the same each round, and the daemon would hand back the
            # previous round's (cancelled) batch instead of running it again.
            sub = ctl(args, bus, "batch", str(manifest), "--output-dir", str(out), "--restart", "--detach")
            if sub.returncode != 0:
                raise RuntimeError(f"batch failed: {sub.stderr}")
            batch_id = sub.stdout.strip()
            if batch_id in seen:
                raise RuntimeError(f"round {r} got batch {batch_id} again")
            seen.add(batch_id)
            batch_dir = tmp / "state" / "diffusiond" / "batches" / batch_id
            # Measure once the batch is under way: its first image is written.
            deadline = time.monotonic() + args.ready_timeout
            while not any(batch_dir.glob("*.png")):
                if time.monotonic() > deadline:
                    raise RuntimeError("the batch wrote no image")
                time.sleep(0.02)
            busy, done = [], []
            rng = random.Random(r)
            for k in range(args.per_round):
                time.sleep(rng.uniform(0, args.jitter))
                busy.append(generate(args, bus, tmp / f"busy-{r}-{k}.png"))
                done.append(len(list(batch_dir.glob("*.png"))))
            busy_batch_s = None
            if args.complete:
                while len(list(batch_dir.glob("*.png"))) < images:
                    if time.monotonic() - t_batch > args.ready_timeout:
                        raise RuntimeError("the batch did not finish")
                    time.sleep(0.05)
                busy_batch_s = time.monotonic() - t_batch
            else:
                ctl(args, bus, "batch", "cancel", batch_id)
            rounds.append({"idle_s": idle, "busy_s": busy, "batch_images_done": done, "batch_images": images,
                           "batch_alone_s": alone_s, "batch_with_jobs_s": busy_batch_s})
            print(f"round {r}: idle {idle:.3f} s, during a batch "
                  + ", ".join(f"{b:.3f} s ({d}/{images} done)" for b, d in zip(busy, done))
                  + (f"; batch alone {alone_s:.2f} s, with the jobs {busy_batch_s:.2f} s" if args.complete else ""),
                  flush=True)
    finally:
        daemon.stop()
        bus.proc.terminate()
    idle_all = [x["idle_s"] for x in rounds]
    busy_all = [b for x in rounds for b in x["busy_s"]]
    summary = {"idle_s": statistics.median(idle_all), "busy_s": statistics.median(busy_all),
               "busy_max_s": max(busy_all), "busy_min_s": min(busy_all), "rounds": len(rounds),
               "busy_jobs": len(busy_all), "idle_max_s": max(idle_all),
               "busy_over_idle_median": statistics.median(busy_all) / statistics.median(idle_all),
               "busy_max_over_idle_median": max(busy_all) / statistics.median(idle_all)}
    if args.complete:
        extra = [x["batch_with_jobs_s"] - x["batch_alone_s"] for x in rounds]
        summary.update(batch_alone_s=statistics.median(x["batch_alone_s"] for x in rounds),
                       batch_with_jobs_s=statistics.median(x["batch_with_jobs_s"] for x in rounds),
                       batch_extra_s=statistics.median(extra),
                       interactive_work_s=args.per_round * summary["idle_s"])
    result = {"label": label, "args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
              "summary": summary, "machine": bt.machine(args, ["daemon"])}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"batch-{label}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\n| | median latency | range |\n|---|---|---|\n"
          f"| idle daemon ({len(idle_all)} jobs) | {summary['idle_s']:.3f} s | "
          f"{min(idle_all):.3f}-{max(idle_all):.3f} s |\n"
          f"| during a batch ({len(busy_all)} jobs) | {summary['busy_s']:.3f} s | "
          f"{summary['busy_min_s']:.3f}-{summary['busy_max_s']:.3f} s |\n\n"
          f"during/idle: median {summary['busy_over_idle_median']:.2f}x, max {summary['busy_max_over_idle_median']:.2f}x"
          + (f"\nbatch alone {summary['batch_alone_s']:.2f} s, with the jobs {summary['batch_with_jobs_s']:.2f} s "
             f"(+{summary['batch_extra_s']:.2f} s; the jobs' own time {summary['interactive_work_s']:.2f} s)"
             if args.complete else "")
          + f"\n\nwrote {path}")


if __name__ == "__main__":
    main()
