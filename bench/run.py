#!/usr/bin/env python3
"""Benchmark diffusiond against Optimum's ORTDiffusionPipeline (see docs/benchmarks.md).

Three runners, alternated round by round (the order rotates each round) so that load from
other processes on the machine falls on all of them alike:

  inproc  diffusiond in-process. Cold start: `diffusionctl generate --local` (process start
          to image written and process exited). Warm: `examples/bench_pipeline.rs local`
          (model loaded once, 1 + N generations, per-stage timings, VmHWM).
  dbus    diffusiond daemon on a private dbus-daemon. Cold start: spawning diffusiond to the
          first image returned by Wait() (the model loads lazily on the first request).
          Warm: Generate()+Wait() round trips from `bench_pipeline dbus` (zbus), with the
          job's `timings`; peak RSS of the daemon from /proc/PID/status VmHWM.
  python  bench/py_runner.py: ORTDiffusionPipeline with the same folder, scheduler (the
          folder's own), steps, guidance, size, seed (torch CPU generator -> same initial
          latents), ORT library version and session options. Cold start: interpreter start to
          the first image's PNG.

All runners get the same session options: intra/inter-op threads as given, sequential
execution, graph optimization ALL, CPU arena on, memory pattern on.

    /work/venv/ref/bin/python bench/run.py --scales tiny,small --batches 1,4
    /work/venv/ref/bin/python bench/run.py --scales sd15-scale --batches 1 --rounds 1

Prints a summary table and writes every raw number to bench/results/<name>.json.
Build first: cargo build --release --bins --example bench_pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = Path(sys.executable)

# scale -> model folder, size, steps, warm repeats per round (batch 1 / batch 4)
SCALES = {
    "tiny": dict(model="onnx/tiny-sd15", size=64, steps=20, repeats=(8, 4)),
    "small": dict(model="onnx/build/small", size=256, steps=10, repeats=(3, 2)),
    "sd15-scale": dict(model="onnx/build/sd15-scale", size=512, steps=4, repeats=(1, 1)),
}

PROMPT = "a photograph of an astronaut riding a horse"
SEED = 42
GUIDANCE = 7.5


def sh(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def timed_child(cmd, env=None) -> tuple[float, int, str, str]:
    """Runs cmd; returns (wall seconds, peak RSS KiB of that child, stdout, stderr)."""
    out = tempfile.TemporaryFile("w+")
    err = tempfile.TemporaryFile("w+")
    t0 = time.monotonic()
    p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, env=env, cwd=ROOT)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    so, se = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n{se[-3000:]}")
    return wall, ru.ru_maxrss, so, se


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON in output:\n" + text[-2000:])


def write_config(path: Path, model_dir: Path, intra: int, inter: int, providers: list[str], extra: str) -> None:
    path.write_text(
        f"""default_model = "bench"

[models.bench]
path = "{model_dir}"

[runtime]
execution_providers = {json.dumps(providers)}

[runtime.session]
intra_threads = {intra}
inter_threads = {inter}
optimization_level = "all"
cpu_arena = true
memory_pattern = true

[jobs]
max_batch_images = 4
retention_secs = 30
idle_unload_secs = 0

{extra}
"""
    )


class Bus:
    def __init__(self, tmp: Path):
        conf = tmp / "bus.conf"
        conf.write_text(
            f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={tmp}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""
        )
        self.proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE, text=True)
        self.address = self.proc.stdout.readline().strip()

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Runners:
    def __init__(self, args, scale: str, batch: int, tmp: Path, bus: Bus):
        s = SCALES[scale]
        self.args = args
        self.scale = scale
        self.batch = batch
        self.tmp = tmp
        self.bus = bus
        # BENCH_MODEL_SUFFIX=-fp16 points the built scales at their fp16 exports (bench/gpu-check.sh)
        suffix = os.environ.get("BENCH_MODEL_SUFFIX", "") if s["model"].startswith("onnx/build/") else ""
        self.model = (ROOT / (s["model"] + suffix)).resolve()
        self.size = args.size or s["size"]
        self.steps = args.steps or s["steps"]
        self.repeats = args.repeats or s["repeats"][0 if batch == 1 else 1]
        self.config = tmp / f"{scale}.toml"
        write_config(self.config, self.model, args.intra, args.inter, args.providers.split(","), args.extra_config)
        self.bin = ROOT / "target/release"
        self.req = ["--steps", self.steps, "--guidance", GUIDANCE, "--seed", SEED, "--width", self.size,
                    "--height", self.size, "--num-images", batch]
        self.env = dict(os.environ, RUST_LOG="warn")
        self.cpu: int | None = None  # --pair: the core this runner's processes are pinned to

    def pin(self, cmd: list) -> list:
        return ["taskset", "-c", str(self.cpu), *cmd] if self.cpu is not None else cmd

    def png(self, runner: str, rnd: int) -> Path:
        return self.tmp / f"{self.scale}-b{self.batch}-{runner}-r{rnd}.png"

    def inproc(self, rnd: int) -> dict:
        out = self.png("cold", rnd)
        if self.args.no_cold_cli:
            return self.inproc_warm(rnd, None)
        wall, rss, _, _ = timed_child(self.pin(
            [self.bin / "diffusionctl", "generate", "--local", "--model-dir", self.model, "--config", self.config,
             "--prompt", PROMPT, *self.req, "--output", out]), env=self.env)
        return self.inproc_warm(rnd, dict(cold_s=wall, peak_rss_kib=rss, png=str(out)))

    def inproc_warm(self, rnd: int, cold: dict | None) -> dict:
        warm_png = self.png("inproc", rnd)
        wall, rss, so, _ = timed_child(self.pin(
            [self.bin / "examples/bench_pipeline", "local", "--model-dir", self.model, "--config", self.config,
             "--prompt", PROMPT, *self.req, "--repeats", self.repeats, "--png-out", warm_png]), env=self.env)
        res = last_json(so)
        if cold is None:
            # --no-cold-cli: process start to first image of bench_pipeline (load + first generation)
            cold = dict(cold_s=wall - sum(r["total_s"] for r in res["runs"][1:]), peak_rss_kib=rss, png=str(warm_png),
                        from_example=True)
        res.update(cold=cold, process_wall_s=wall, ru_maxrss_kib=rss, png=str(warm_png))
        return res

    def dbus(self, rnd: int) -> dict:
        t0 = time.monotonic()
        daemon = subprocess.Popen(
            self.pin([self.bin / "diffusiond", "--address", self.bus.address, "--config", self.config]),
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            while True:
                if daemon.poll() is not None:
                    raise RuntimeError("diffusiond exited: " + daemon.stderr.read()[-2000:])
                r = subprocess.run(["busctl", "--address", self.bus.address, "status", "io.github.Diffusiond1"],
                                   capture_output=True)
                if r.returncode == 0:
                    break
                time.sleep(0.02)
            t_name = time.monotonic() - t0
            png = self.png("dbus", rnd)
            _, _, so, _ = timed_child(self.pin(
                [self.bin / "examples/bench_pipeline", "dbus", "--address", self.bus.address, "--model", "bench",
                 "--prompt", PROMPT, *self.req, "--repeats", self.repeats, "--png-out", png]), env=self.env)
            res = last_json(so)
            res["daemon_start_to_name_s"] = t_name
            res["cold_s"] = t_name + res["runs"][0]["total_s"]
            res["vm_hwm_kib"] = vm_hwm(daemon.pid)
            res["png"] = str(png)
            return res
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()

    def python(self, rnd: int) -> dict:
        png = self.png("python", rnd)
        cmd = [PY, ROOT / "bench/py_runner.py", "--model-dir", self.model, "--prompt", PROMPT, *self.req,
               "--repeats", self.repeats, "--intra", self.args.intra, "--inter", self.args.inter,
               "--png-out", png, "--provider", self.args.py_provider]
        if self.args.trt_cache:
            cmd += ["--trt-cache", self.args.trt_cache]
        if self.args.py_io_binding:
            cmd += ["--io-binding"]
        t0 = time.monotonic()
        wall, rss, so, _ = timed_child(self.pin(cmd), env=dict(os.environ, PYTHONWARNINGS="ignore"))
        res = last_json(so)
        # interpreter start to the first image encoded: everything before run 0 plus run 0
        res["cold_s"] = wall - sum(r["total_s"] for r in res["runs"][1:])
        res["process_wall_s"] = wall
        res["ru_maxrss_kib"] = rss
        res["png"] = str(png)
        _ = t0
        return res


def pixel_diff(a: str, b: str) -> int:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        return 10**6
    return int(np.abs(x - y).max())


def first_png(p: str, batch: int) -> str:
    return p if batch == 1 else p[:-4] + "-0.png"


def pngs(p: str, batch: int) -> list[str]:
    return [p] if batch == 1 else [p[:-4] + f"-{k}.png" for k in range(batch)]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    return [min(xs), max(xs)] if xs else None


def summarize(scale: str, batch: int, steps: int, rounds: list[dict]) -> dict:
    """Medians and [min, max] over every warm run of every round, per runner."""
    out = {}
    for name in ("inproc", "dbus", "python"):
        res = [r[name] for r in rounds if name in r]
        if not res:
            continue
        warm = [run for r in res for run in r["runs"] if not run["first"]]
        s = {}

        def stat(key, f):
            vals = [f(run) for run in warm]
            s[key] = dict(median=med(vals), min_max=spread(vals), n=len(vals))

        stat("warm_s", lambda r: r["total_s"])
        stat("warm_per_image_s", lambda r: r["total_s"] / batch)
        stat("text_encoder_s", lambda r: r["text_encoder_s"])
        stat("unet_total_s", lambda r: r["unet_s"])
        calls = warm[0].get("unet_calls") or (steps + (1 if steps > 1 else 0))
        stat("unet_per_step_s", lambda r: r["unet_s"] / calls)
        stat("glue_per_step_s", lambda r: r["scheduler_s"] / calls)
        stat("vae_s", lambda r: r["vae_s"])
        stat("png_s", lambda r: r["png_s"])
        if name != "dbus":
            stat("postprocess_s", lambda r: r["postprocess_s"])
        ort = lambda r: r["text_encoder_s"] + r["unet_s"] + r["vae_s"]  # noqa: E731
        if name == "dbus":
            # wall round trip minus ORT time: includes D-Bus, queueing, PNG, glue
            stat("outside_ort_pct", lambda r: 100 * (r["total_s"] - ort(r)) / r["total_s"])
        else:
            stat("outside_ort_pct", lambda r: 100 * (r["total_s"] - ort(r)) / r["total_s"])
            stat("outside_ort_no_png_pct", lambda r: 100 * (r["total_s"] - r["png_s"] - ort(r)) / r["total_s"])
        colds = [r["cold"]["cold_s"] if name == "inproc" else r["cold_s"] for r in res]
        s["cold_s"] = dict(median=med(colds), min_max=spread(colds), n=len(colds))
        if name == "inproc":
            s["peak_rss_cold_mib"] = med([r["cold"]["peak_rss_kib"] / 1024 for r in res])
            s["peak_rss_warm_mib"] = med([r["vm_hwm_kib"] / 1024 for r in res])
            s["load_s"] = med([r["load_s"] for r in res])
        elif name == "dbus":
            s["peak_rss_mib"] = med([(r["vm_hwm_kib"] or 0) / 1024 for r in res])
            s["queued_s"] = med([run["queued_s"] for run in warm])
        else:
            s["peak_rss_mib"] = med([r["vm_hwm_kib"] / 1024 for r in res])
            s["load_s"] = med([r["load_s"] for r in res])
            s["import_s"] = med([r["import_s"] for r in res])
        out[name] = s
    if "python" in out:
        p = out["python"]["warm_s"]["median"]
        for name in ("inproc", "dbus"):
            if name in out:
                out[name]["python_over_this_warm"] = p / out[name]["warm_s"]["median"]
                out[name]["python_over_this_cold"] = out["python"]["cold_s"]["median"] / out[name]["cold_s"]["median"]
    return out


def fmt(x, unit="s"):
    if x is None:
        return "-"
    if unit == "ms":
        return f"{x * 1000:.2f}"
    return f"{x:.3f}"


def print_table(results: dict) -> None:
    print("\nscale      batch runner  warm s/img (min-max)        cold s   unet/step ms  glue/step ms  "
          "vae ms    png ms  outside-ORT %  RSS MiB   py/this")
    for key, summ in results["summary"].items():
        scale, b = key.rsplit("-b", 1)
        for name, s in summ.items():
            w = s["warm_per_image_s"]
            rss = s.get("peak_rss_warm_mib") or s.get("peak_rss_mib")
            print(f"{scale:10} {b:5} {name:7} {fmt(w['median'])} ({fmt(w['min_max'][0])}-{fmt(w['min_max'][1])})"
                  f"  {fmt(s['cold_s']['median']):>8}  {fmt(s['unet_per_step_s']['median'], 'ms'):>11}"
                  f"  {fmt(s['glue_per_step_s']['median'], 'ms'):>11}  {fmt(s['vae_s']['median'], 'ms'):>8}"
                  f"  {fmt(s['png_s']['median'], 'ms'):>7}  {s['outside_ort_pct']['median']:>12.3f}"
                  f"  {rss:>7.0f}  {s.get('python_over_this_warm', float('nan')):.3f}")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = dict(nproc=os.cpu_count(), cpu=cpu, kernel=platform.release(),
                mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                loadavg_start=os.getloadavg())
    try:
        info["gpu"] = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    # in a child: importing torch here would inflate the forked runners' ru_maxrss
    vers = json.loads(sh([PY, "-c", "import json, importlib.metadata as m\nv = {}\n"
                          "for p in ('onnxruntime', 'torch', 'diffusers', 'transformers', 'numpy', 'optimum-onnx'):\n"
                          "    try: v[p] = m.version(p)\n    except Exception as e: v[p] = str(e)\n"
                          "print(json.dumps(v))"]).stdout)
    vers["python"] = platform.python_version()
    vers["rustc"] = sh(["rustc", "--version"]).stdout.strip()
    vers["diffusiond"] = sh([ROOT / "target/release/diffusiond", "--version"]).stdout.strip()
    vers["git"] = sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).stdout.strip()
    dirty = sh(["git", "status", "--porcelain", "--", "src"], cwd=ROOT).stdout.strip()
    vers["src_dirty"] = bool(dirty)
    info["versions"] = vers
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="tiny,small,sd15-scale")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--runners", default="inproc,dbus,python")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per scale and batch; runner order rotates")
    ap.add_argument("--repeats", type=int, default=0, help="warm generations per runner per round (0: scale default)")
    ap.add_argument("--steps", type=int, default=0, help="0: the scale's default")
    ap.add_argument("--size", type=int, default=0, help="0: the scale's default")
    ap.add_argument("--intra", type=int, default=1)
    ap.add_argument("--inter", type=int, default=1)
    ap.add_argument("--providers", default="cpu", help="diffusiond execution_providers, comma list")
    ap.add_argument("--py-provider", default="CPUExecutionProvider")
    ap.add_argument("--py-io-binding", action="store_true")
    ap.add_argument("--trt-cache", default=None)
    ap.add_argument("--extra-config", default="", help="TOML appended to the diffusiond config")
    ap.add_argument("--name", default=None, help="results file name (bench/results/NAME.json)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--no-cold-cli", action="store_true",
                    help="in-process cold start from bench_pipeline's own first image instead of a separate "
                         "`diffusionctl generate --local` run (saves one generation per round at large scales)")
    ap.add_argument("--pair", action="store_true",
                    help="run two runners at the same time, each pinned to its own core (taskset), cores "
                         "swapped every round: a machine whose speed drifts slows both alike")
    ap.add_argument("--keep", type=Path, default=None, help="keep PNGs and configs here")
    args = ap.parse_args()

    scales = [s for s in args.scales.split(",") if s]
    batches = [int(b) for b in args.batches.split(",")]
    runners = [r for r in args.runners.split(",") if r]
    if args.pair and (len(runners) != 2 or (os.cpu_count() or 1) < 2):
        raise SystemExit("--pair takes exactly two runners and needs two cores")
    tmp = Path(tempfile.mkdtemp(prefix="diffusiond-bench-"))
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        tmp = args.keep.resolve()
    bus = Bus(Path(tempfile.mkdtemp(prefix="diffusiond-bench-bus-")))
    results = dict(machine=machine(), args=vars(args) | {"out_dir": str(args.out_dir),
                                                          "keep": str(args.keep) if args.keep else None},
                   started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), raw={}, summary={}, parity={})
    print(json.dumps(results["machine"], indent=1), flush=True)
    try:
        for scale in scales:
            for batch in batches:
                r = Runners(args, scale, batch, tmp, bus)
                key = f"{scale}-b{batch}"
                rounds = []
                for rnd in range(args.rounds):
                    if args.pair:
                        rounds.append(run_pair(args, scale, batch, tmp, bus, runners, rnd, key))
                        continue
                    order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
                    got = {}
                    for name in order:
                        t = time.monotonic()
                        got[name] = getattr(r, name)(rnd)
                        print(f"[{key} round {rnd}] {name}: {time.monotonic() - t:.1f}s", flush=True)
                    rounds.append(got)
                results["raw"][key] = dict(steps=r.steps, size=r.size, repeats=r.repeats, model=str(r.model),
                                           rounds=rounds)
                results["summary"][key] = summarize(scale, batch, r.steps, rounds)
                # same image: every runner's PNGs against the in-process cold-start PNGs
                ref = rounds[0]["inproc"]["cold"]["png"] if "inproc" in rounds[0] else None
                par = {}
                if ref:
                    for rnd, got in enumerate(rounds):
                        for name, res in got.items():
                            for a, b in zip(pngs(ref, batch), pngs(res["png"], batch)):
                                par[f"{name}-r{rnd}"] = max(par.get(f"{name}-r{rnd}", 0), pixel_diff(a, b))
                results["parity"][key] = dict(max_pixel_diff=par, ok=all(v <= 2 for v in par.values()))
                print(f"[{key}] parity: {results['parity'][key]}", flush=True)
                print_table(results)
                save(args, results)
    finally:
        bus.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["machine"]["loadavg_end"] = os.getloadavg()
    path = save(args, results)
    print_table(results)
    print(f"\nwrote {path}")


def run_pair(args, scale: str, batch: int, tmp: Path, bus: Bus, runners: list[str], rnd: int, key: str) -> dict:
    """One round of --pair: both runners at once on cores 0 and 1 (swapped on odd rounds)."""
    import threading

    got: dict = {}
    errors: list = []

    def one(name: str, r: Runners) -> None:
        cpu = r.cpu
        t = time.monotonic()
        try:
            got[name] = getattr(r, name)(rnd)
        except Exception as e:  # reported after both finish
            errors.append(f"{name}: {e}")
        print(f"[{key} round {rnd}] {name} on cpu {cpu}: {time.monotonic() - t:.1f}s", flush=True)

    pinned = []
    for i, name in enumerate(runners):
        r = Runners(args, scale, batch, tmp, bus)  # writes the (same) config before anything starts
        r.cpu = (i + rnd) % 2
        pinned.append((name, r))
    threads = [threading.Thread(target=one, args=p) for p in pinned]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return got


def save(args, results) -> Path:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{args.scales.replace(',', '+')}"
    path = args.out_dir / f"{name}.json"
    if not args.name:
        args.name = name
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


if __name__ == "__main__":
    main()
