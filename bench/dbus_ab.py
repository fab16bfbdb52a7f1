#!/usr/bin/env python3
"""Before/after comparison of two diffusiond daemon builds over D-Bus, alternated round by
round on one private bus, with the same client (examples/bench_pipeline.rs dbus).

Per job it reports the client's Generate()->Wait() round trip and the part of it outside
the job's own work (round trip - the job's `timings.total`): the D-Bus calls, the hand-off
to the worker, the Progress/PropertiesChanged traffic and the transfer of the PNGs.

    cp target/release/diffusiond bench/out/diffusiond-before   # then change, rebuild
    /work/venv/ref/bin/python bench/dbus_ab.py --a bench/out/diffusiond-before \\
        --b target/release/diffusiond --model onnx/tiny-sd15 --sizes 64,512 --name dbus-ab
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Bus, last_json, write_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "target/release/examples/bench_pipeline"


def session(daemon_bin: str, bus: Bus, cfg: Path, req: list[str], repeats: int) -> list[dict]:
    daemon = subprocess.Popen([daemon_bin, "--address", bus.address, "--config", str(cfg)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while subprocess.run(["busctl", "--address", bus.address, "status", "io.github.Diffusiond1"],
                             capture_output=True).returncode != 0:
            if daemon.poll() is not None:
                raise SystemExit(f"{daemon_bin} exited: {daemon.stderr.read()[-2000:]}")
            time.sleep(0.02)
        out = subprocess.run([str(CLIENT), "dbus", "--address", bus.address, "--model", "bench", *req,
                              "--repeats", str(repeats)], capture_output=True, text=True, check=True)
        return [r for r in last_json(out.stdout)["runs"] if not r["first"]]
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="daemon binary A (before)")
    ap.add_argument("--b", required=True, help="daemon binary B (after)")
    ap.add_argument("--model", default="onnx/tiny-sd15")
    ap.add_argument("--sizes", default="64,512")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-dbus-ab-"))
    cfg = tmp / "ab.toml"
    write_config(cfg, (ROOT / args.model).resolve(), 1, 1, ["cpu"], "")
    bus = Bus(tmp)
    results: dict = {"args": vars(args), "sizes": {}}
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            req = ["--steps", str(args.steps), "--width", str(size), "--height", str(size),
                   "--num-images", str(args.num_images)]
            runs: dict = {"a": [], "b": []}
            for rnd in range(args.rounds):
                for side in (["a", "b"] if rnd % 2 == 0 else ["b", "a"]):
                    runs[side] += session(getattr(args, side), bus, cfg, req, args.repeats)
            results["sizes"][str(size)] = runs
            for side, rs in runs.items():
                rt = [r["total_s"] * 1e3 for r in rs]
                outside = [(r["total_s"] - r["job_total_s"]) * 1e3 for r in rs]
                print(f"{size:4}px {side}: round trip median {statistics.median(rt):8.1f} ms, outside the job "
                      f"median {statistics.median(outside):6.1f} ms (min {min(outside):.1f}, max {max(outside):.1f}), "
                      f"n {len(rs)}")
    finally:
        bus.close()
    out = ROOT / "bench/results" / f"{args.name}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
