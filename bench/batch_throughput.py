#!/usr/bin/env python3
"""Throughput of one manifest through four runners, side by side in one run.

  daemon    `diffusionctl batch M --output-dir D --restart --address ADDR` against a diffusiond
            on a private dbus-daemon (model preloaded, one warm-up image before round 0). Timed
            from the client's start (the submit) to the newest PNG in D; the client's wall time
            is recorded too. (--restart: the daemon hands an identical, already finished batch
            back without running it again, so each round removes the previous round's first.)
  daemon2   the same against a second diffusiond with two workers (`runtime.devices = [0, 1]`:
            on the CPU, two sets of sessions that split the cores), on its own bus.
  local     `diffusionctl batch M --output-dir D --local --model-dir MODEL`: one process that
            loads the model and runs the batch. Timed as process wall time, load included; its
            own closing line (`N images in S s (R images/s)`) is recorded as `reported`.
  generate  the same items as N sequential `diffusionctl generate --address ADDR ...
            --output D/NAME.png` processes against the same daemon, as a shell loop would run
            them. Timed from the first process's start to the last one's exit.
  python    bench/batch_python.py: a Python loop over Optimum's ORTDiffusionPipeline. Its own
            generate-only time (model load excluded) is the main figure; the process wall time
            (interpreter start, imports, load) is recorded too.

Every round gives each runner a fresh output folder; the order of the runners rotates from
round to round, so load from other processes falls on all of them alike. Images/s per runner
is the median over the rounds; the ratio column divides it by the Python loop's
(> 1: faster than the Python loop); "img/s by wall" divides the images by each runner's
process wall time (for the Python loop: interpreter start, imports and load included; for
the daemon runners the daemon is already up). The raw file also has, per round,
`first_png_s` (runner start to its first PNG) and `png_span_s` (first PNG to last), from the
files' modification times.

ONNX Runtime session options are left at their defaults on every side (threads: one per
physical core) unless --intra/--inter are given; those go to the daemon's config, to the
local run (DIFFUSIOND_RUNTIME__SESSION__* variables) and to batch_python.py alike.
The CPU memory arena is on by default on both sides. Other DIFFUSIOND_* variables in the harness's environment reach the daemon and
the local run too (e.g. DIFFUSIOND_JOBS__MAX_BATCH_IMAGES=1 turns UNet batching off).

After the rounds, the first --compare items' PNGs of round 0 are compared across runners
(largest per-channel difference, 0-255, against the Python loop's, or the first runner's).

    cargo build --release --bins
    /work/venv/ref/bin/python bench/batch_throughput.py --model-dir onnx/tiny-sd15 --width 64 --height 64 \\
        --steps 20 --items 64 --rounds 3
    /work/venv/ref/bin/python bench/batch_throughput.py --model-dir onnx/build/small --width 256 --height 256 \\
        --steps 10 --items 16 --rounds 2
    /work/venv/ref/bin/python bench/batch_throughput.py --only python --model-dir onnx/tiny-sd15 --width 64 \\
        --height 64 --steps 20 --items 8 --rounds 1

The manifest is bench/make_manifest.py's (seeds 1000 + i, names item-000...), or --manifest.
Raw numbers go to bench/results/batch-LABEL.json; a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import make_manifest  # noqa: E402
from run import vm_hwm  # noqa: E402

RUNNERS = ("daemon", "daemon2", "local", "generate", "python")
NAME = "io.github.Diffusiond1"

# what each runner's main figure times
TIMED = {
    "daemon": "submit to last PNG (model loaded)",
    "daemon2": "submit to last PNG (two workers, model loaded)",
    "local": "process wall, load included",
    "generate": "first start to last exit (model loaded)",
    "python": "generate only (load excluded)",
}

# processes to stop on any exit (Popen objects); see cleanup()
_LIVE: list[subprocess.Popen] = []


def cleanup() -> None:
    """Stops every process this harness still has running, newest first."""
    while _LIVE:
        p = _LIVE.pop()
        if p.poll() is not None:
            continue
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _on_signal(signum, _frame):
    raise SystemExit(f"stopped by signal {signum}")


def spawn(cmd: list, **kw) -> subprocess.Popen:
    """Starts cmd in a process group of its own (so a timeout can stop all of it)."""
    p = subprocess.Popen([str(c) for c in cmd], start_new_session=True, **kw)
    _LIVE.append(p)
    return p


def run_timed(cmd: list, timeout: float, env: dict | None = None) -> dict:
    """Runs cmd to the end: wall seconds, peak RSS (KiB), stdout, stderr. Raises on failure or timeout."""
    out = tempfile.TemporaryFile("w+")
    err = tempfile.TemporaryFile("w+")
    t_wall = time.time()
    t0 = time.monotonic()
    p = spawn(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
    res: dict = {}

    def reap():
        _, status, ru = os.wait4(p.pid, 0)
        res.update(t=time.monotonic(), status=status, maxrss=ru.ru_maxrss)

    th = threading.Thread(target=reap, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        th.join(30)
        raise TimeoutError(f"{Path(str(cmd[0])).name} ran past {timeout:.0f} s: {' '.join(map(str, cmd))[:300]}")
    p.returncode = os.waitstatus_to_exitcode(res["status"])
    if p in _LIVE:
        _LIVE.remove(p)
    out.seek(0)
    err.seek(0)
    so, se = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))[:300]}\nexit {p.returncode}:\n{se[-3000:]}{so[-1000:]}")
    return dict(wall_s=res["t"] - t0, start_epoch=t_wall, peak_rss_kib=res["maxrss"], stdout=so, stderr=se)


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


class Bus:
    """A private dbus-daemon (session policy, open to this user), as tests/common's PrivateBus."""

    def __init__(self, tmp: Path):
        tmp.mkdir(parents=True, exist_ok=True)
        conf = tmp / "bus.conf"
        conf.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={tmp}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
""")
        if not shutil.which("dbus-daemon"):
            raise SystemExit("dbus-daemon not found (apt-get install dbus)")
        self.log = open(tmp / "dbus-daemon.log", "w")
        self.proc = spawn(["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
                          stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            raise RuntimeError("dbus-daemon printed no address")

    def has_name(self) -> bool:
        # --bus (not --address) registers with the bus first, as a bus client must
        r = subprocess.run(["dbus-send", f"--bus={self.address}", "--print-reply", "--dest=org.freedesktop.DBus",
                            "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner", f"string:{NAME}"],
                           capture_output=True, text=True, timeout=10)
        return r.returncode == 0 and "boolean true" in r.stdout


class Daemon:
    """diffusiond on the private bus with one model, `bench`, preloaded. Its batch state goes
    to $XDG_STATE_HOME/diffusiond, and XDG_STATE_HOME points into the harness's temp folder."""

    def __init__(self, args, bus: Bus, tmp: Path, env: dict, workers: int = 1):
        self.config = tmp / "diffusiond.toml"
        devices = f"[runtime]\ndevices = {list(range(workers))}\n" if workers > 1 else ""
        session = ""
        if args.intra or args.inter:
            session = "[runtime.session]\n" + "".join(
                f"{k} = {v}\n" for k, v in (("intra_threads", args.intra), ("inter_threads", args.inter)) if v)
        self.config.write_text(f"""default_model = "bench"
preload = ["bench"]

[models.bench]
path = "{args.model_dir}"

{session}
{devices}
[jobs]
idle_unload_secs = 0
""")
        t0 = time.monotonic()
        self.log = open(tmp / "diffusiond.log", "w")
        self.proc = spawn([args.bin_dir / "diffusiond", "--address", bus.address, "--config", self.config],
                          stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = t0 + args.ready_timeout
        while not bus.has_name():
            if self.proc.poll() is not None:
                raise RuntimeError(f"diffusiond exited ({self.proc.returncode}):\n"
                                 + (tmp / "diffusiond.log").read_text()[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"diffusiond did not own {NAME} within {args.ready_timeout} s")
            time.sleep(0.02)
        self.start_to_ready_s = time.monotonic() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc in _LIVE:
            _LIVE.remove(self.proc)
        self.log.close()


def reported(stdout: str) -> dict | None:
    """diffusionctl batch's closing line: `N images in S s (R images/s); ...` (--local) or
    `N files copied in S s; ...` (daemon), as numbers; None when neither is there."""
    m = re.search(r"(\d+) images in ([\d.]+) s \(([\d.]+) images/s\)", stdout)
    if m:
        return dict(images=int(m[1]), seconds=float(m[2]), images_per_s=float(m[3]), line=m[0])
    m = re.search(r"(\d+) files copied in ([\d.]+) s", stdout)
    if m:
        return dict(files=int(m[1]), seconds=float(m[2]), line=m[0])
    return None


def read_items(path: Path, base_seed: int) -> list[dict]:
    """The manifest's items as the runners see them (index, name, seed, request keys)."""
    items = []
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        obj = json.loads(line) if path.suffix.lower() != ".txt" else {"prompt": line}
        obj.setdefault("seed", base_seed + index)
        obj.setdefault("name", f"{index:05d}")
        obj["index"] = index
        items.append(obj)
    return items


def files_of(item: dict) -> list[str]:
    n = int(item.get("num_images", 1))
    return [f"{item['name']}.png"] if n == 1 else [f"{item['name']}-{k}.png" for k in range(n)]


# manifest key -> diffusionctl generate flag
FLAGS = [("negative_prompt", "--negative-prompt"), ("model", "--model"), ("width", "--width"),
         ("height", "--height"), ("steps", "--steps"), ("guidance_scale", "--guidance"),
         ("guidance_rescale", "--guidance-rescale"), ("seed", "--seed"), ("rng", "--rng"),
         ("scheduler", "--scheduler"), ("num_images", "--num-images")]


def pngs_in(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.png") if p.is_file())


def mtimes(d: Path) -> list[float]:
    return sorted(p.stat().st_mtime for p in pngs_in(d))


def span(times: list[float]) -> float | None:
    """Seconds from the first PNG written to the last (several may land at once: the
    daemon and --local put up to jobs.max_batch_images images in one UNet batch)."""
    return times[-1] - times[0] if times else None


class Bench:
    def __init__(self, args, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"), PYTHONWARNINGS="ignore",
                        XDG_CONFIG_HOME=str(tmp / "xdg-config"), XDG_STATE_HOME=str(tmp / "xdg-state"))
        if args.intra:
            self.env["DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS"] = str(args.intra)
        if args.inter:
            self.env["DIFFUSIOND_RUNTIME__SESSION__INTER_THREADS"] = str(args.inter)
        (tmp / "xdg-config").mkdir(exist_ok=True)
        self.items = read_items(args.manifest, args.seed)
        self.n_images = sum(len(files_of(it)) for it in self.items)
        self.ctl = args.bin_dir / "diffusionctl"
        self.bus: Bus | None = None
        self.daemon: Daemon | None = None
        self.bus2: Bus | None = None
        self.daemon2: Daemon | None = None
        # the flags every batch runner gets: defaults for keys a line leaves out
        self.req = ["--steps", args.steps, "--guidance", args.guidance, "--width", args.width,
                    "--height", args.height, "--seed", args.seed]

    def out(self, runner: str, rnd: int) -> Path:
        d = self.tmp / f"r{rnd}-{runner}"
        if d.exists():
            shutil.rmtree(d)
        return d

    def start_daemon(self) -> dict:
        self.bus = Bus(self.tmp / "bus")
        self.daemon = Daemon(self.args, self.bus, self.tmp, self.env)
        return self.warm_up(self.daemon, self.bus)

    def start_daemon2(self) -> dict:
        """A second daemon with two workers (`runtime.devices = [0, 1]`) on its own bus,
        config, log and state folder."""
        tmp = self.tmp / "daemon2"
        tmp.mkdir(exist_ok=True)
        self.bus2 = Bus(tmp / "bus")
        env = dict(self.env, XDG_STATE_HOME=str(tmp / "xdg-state"))
        self.daemon2 = Daemon(self.args, self.bus2, tmp, env, workers=2)
        return self.warm_up(self.daemon2, self.bus2)

    def warm_up(self, daemon: Daemon, bus: Bus) -> dict:
        info = dict(start_to_ready_s=daemon.start_to_ready_s)
        if self.args.warmup:
            it = self.items[0]
            w = run_timed([self.ctl, "generate", "--address", bus.address, "--prompt", it["prompt"],
                           "--steps", it.get("steps", self.args.steps),
                           "--width", it.get("width", self.args.width), "--height", it.get("height", self.args.height),
                           "--seed", 1, "--output", self.tmp / "warmup.png"], self.args.timeout, self.env)
            info["warmup_s"] = w["wall_s"]
        return info

    def check(self, d: Path) -> list[float]:
        want = {f for it in self.items for f in files_of(it)}
        got = {p.name for p in pngs_in(d)}
        if want - got:
            raise RuntimeError(f"{d}: {len(want - got)} of {len(want)} files missing, e.g. {sorted(want - got)[:3]}")
        return mtimes(d)

    def daemon_run(self, rnd: int, runner: str = "daemon") -> dict:
        d = self.out(runner, rnd)
        bus = self.bus2 if runner == "daemon2" else self.bus
        # --restart: the daemon keeps finished batches and hands the same manifest and
        # settings back without running them again; --restart removes the earlier round's
        # batch first, so every round generates all of its images
        r = run_timed([self.ctl, "batch", self.args.manifest, "--output-dir", d, *self.req, "--restart",
                       "--address", bus.address], self.args.timeout, self.env)
        t = self.check(d)
        seconds = t[-1] - r["start_epoch"]
        return dict(out=str(d), images=self.n_images, seconds=seconds, images_per_s=self.n_images / seconds,
                    wall_s=r["wall_s"], wall_images_per_s=self.n_images / r["wall_s"],
                    first_png_s=t[0] - r["start_epoch"], png_span_s=span(t),
                    client_peak_rss_kib=r["peak_rss_kib"], reported=reported(r["stdout"]),
                    stdout_tail=r["stdout"][-1500:],
                    stderr_tail=r["stderr"][-1500:])

    def daemon2_run(self, rnd: int) -> dict:
        return self.daemon_run(rnd, "daemon2")

    def local_run(self, rnd: int) -> dict:
        d = self.out("local", rnd)
        r = run_timed([self.ctl, "batch", self.args.manifest, "--output-dir", d, "--local", "--model-dir",
                       self.args.model_dir, *self.req], self.args.timeout, self.env)
        t = self.check(d)
        return dict(out=str(d), images=self.n_images, seconds=r["wall_s"], images_per_s=self.n_images / r["wall_s"],
                    wall_s=r["wall_s"], wall_images_per_s=self.n_images / r["wall_s"],
                    first_png_s=t[0] - r["start_epoch"], png_span_s=span(t),
                    peak_rss_kib=r["peak_rss_kib"], reported=reported(r["stdout"]),
                    stdout_tail=r["stdout"][-1500:], stderr_tail=r["stderr"][-1500:])

    def generate_run(self, rnd: int) -> dict:
        d = self.out("generate", rnd)
        d.mkdir(parents=True)
        start_epoch = time.time()
        t0 = time.monotonic()
        per = []
        for it in self.items:
            cmd = [self.ctl, "generate", "--address", self.bus.address, "--prompt", it["prompt"]]
            for key, flag in FLAGS:
                v = it.get(key)
                if v is None and key in ("steps", "width", "height"):
                    v = getattr(self.args, key)
                if v is None and key == "guidance_scale":
                    v = self.args.guidance
                if v is not None:
                    cmd += [flag, v]
            cmd += ["--output", d / f"{it['name']}.png"]
            per.append(run_timed(cmd, self.args.timeout, self.env)["wall_s"])
        wall = time.monotonic() - t0
        t = self.check(d)
        return dict(out=str(d), images=self.n_images, seconds=wall, images_per_s=self.n_images / wall, wall_s=wall,
                    wall_images_per_s=self.n_images / wall, first_png_s=t[0] - start_epoch, png_span_s=span(t),
                    per_call_s=dict(median=statistics.median(per), min=min(per), max=max(per)))

    def python_run(self, rnd: int) -> dict:
        d = self.out("python", rnd)
        cmd = [self.args.python, HERE / "batch_python.py", self.args.manifest, "--output-dir", d,
               "--model-dir", self.args.model_dir, *self.req, "--quiet"]
        if self.args.intra:
            cmd += ["--intra", self.args.intra]
        if self.args.inter:
            cmd += ["--inter", self.args.inter]
        r = run_timed(cmd, self.args.timeout, self.env)
        rep = last_json(r["stdout"])
        if rep is None:
            raise RuntimeError("batch_python.py printed no JSON:\n" + r["stderr"][-2000:])
        t = self.check(d)
        return dict(out=str(d), images=rep["images"], seconds=rep["generate_s"], images_per_s=rep["images_per_s"],
                    wall_s=r["wall_s"], wall_images_per_s=rep["images"] / r["wall_s"],
                    first_png_s=t[0] - r["start_epoch"], png_span_s=span(t),
                    load_s=rep["load_s"], import_s=rep.get("import_s"), total_s=rep["total_s"],
                    peak_rss_kib=r["peak_rss_kib"], report=rep)


def pixel_diff(a: Path, b: Path) -> int | None:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        return None
    return int(np.abs(x - y).max())


def compare(bench: Bench, round0: dict, count: int) -> dict:
    names = [f for it in bench.items[:count] for f in files_of(it)]
    ref = "python" if "python" in round0 else next(iter(round0), None)
    out: dict = {"reference": ref, "files": names, "max_pixel_diff": {}}
    if ref is None:
        return out
    for runner, res in round0.items():
        if runner == ref:
            continue
        diffs = [pixel_diff(Path(round0[ref]["out"]) / f, Path(res["out"]) / f) for f in names]
        out["max_pixel_diff"][runner] = None if None in diffs else max(diffs)
        out.setdefault("per_file", {})[runner] = dict(zip(names, diffs))
    return out


def summarize(rounds: list[dict]) -> dict:
    out = {}
    for runner in RUNNERS:
        res = [r[runner] for r in rounds if runner in r]
        if not res:
            continue
        s = {}
        for key in ("images_per_s", "seconds", "wall_s", "wall_images_per_s", "first_png_s", "png_span_s", "load_s"):
            vals = [r[key] for r in res if r.get(key) is not None]
            if vals:
                s[key] = dict(median=statistics.median(vals), min=min(vals), max=max(vals), n=len(vals))
        s["images"] = res[0]["images"]
        out[runner] = s
    if "python" in out:
        for key in ("images_per_s", "wall_images_per_s"):
            p = out["python"].get(key, {}).get("median")
            for s in out.values():
                if p and key in s:
                    s[key]["over_python"] = s[key]["median"] / p
    return out


def table(summary: dict, parity: dict) -> str:
    def f(x, d=2):
        return "-" if x is None else f"{x:.{d}f}"

    lines = ["| runner | timed | images | img/s (min-max) | ÷ Python loop | wall s | img/s by wall | ÷ Python wall |",
             "|---|---|---|---|---|---|---|---|"]
    for runner, s in summary.items():
        ips = s["images_per_s"]
        w = s["wall_images_per_s"]
        lines.append(
            f"| {runner} | {TIMED[runner]} | {s['images']} | {f(ips['median'])} ({f(ips['min'])}-{f(ips['max'])}) "
            f"| {f(ips.get('over_python'))} | {f(s['wall_s']['median'])} | {f(w['median'])} "
            f"| {f(w.get('over_python'))} |")
    if parity.get("max_pixel_diff"):
        lines += ["", f"Max pixel difference (0-255) against `{parity['reference']}`, "
                      f"{len(parity['files'])} files of round 0:", "",
                  "| runner | max diff |", "|---|---|"]
        lines += [f"| {r} | {'shape differs' if v is None else v} |" for r, v in parity["max_pixel_diff"].items()]
    return "\n".join(lines)


def machine(args, runners: list[str]) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = dict(nproc=os.cpu_count(), cpu=cpu, kernel=platform.release(), loadavg_start=os.getloadavg(),
                mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1))
    vers = {}
    try:
        r = subprocess.run([str(args.python), "-c", "import json, importlib.metadata as m\nv = {}\n"
                            "for p in ('onnxruntime', 'torch', 'diffusers', 'optimum-onnx', 'numpy'):\n"
                            "    try: v[p] = m.version(p)\n    except Exception as e: v[p] = str(e)\n"
                            "print(json.dumps(v))"], capture_output=True, text=True, timeout=60)
        vers.update(last_json(r.stdout) or {})
    except (OSError, subprocess.SubprocessError):
        pass
    if any(r != "python" for r in runners):
        try:
            vers["diffusiond"] = subprocess.run([str(args.bin_dir / "diffusiond"), "--version"], capture_output=True,
                                                text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        vers["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["versions"] = vers
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "onnx/tiny-sd15")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--items", type=int, default=64, help="manifest items (bench/make_manifest.py)")
    ap.add_argument("--manifest", type=Path, default=None, help="use this manifest instead of a generated one")
    ap.add_argument("--seed", type=int, default=1234, help="base seed for lines without one (every runner)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(RUNNERS), help=f"comma list of runners: {', '.join(RUNNERS)}")
    ap.add_argument("--intra", type=int, default=0, help="intra-op threads, every runner (0: ONNX Runtime's default)")
    ap.add_argument("--inter", type=int, default=0, help="inter-op threads, every runner (0: ONNX Runtime's default)")
    ap.add_argument("--compare", type=int, default=4, help="items whose PNGs are compared across runners")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per runner per round (and per process)")
    ap.add_argument("--ready-timeout", type=float, default=600,
                    help="seconds for the daemon to load the model and own its bus name")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="no warm-up image through the daemon before round 0")
    ap.add_argument("--python", type=Path, default=Path(sys.executable), help="interpreter for batch_python.py")
    ap.add_argument("--bin-dir", type=Path, default=ROOT / "target/release")
    ap.add_argument("--label", default=None, help="results file bench/results/batch-LABEL.json")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--keep", type=Path, default=None, help="keep manifests, PNGs and logs here")
    args = ap.parse_args()

    runners = [r for r in args.only.split(",") if r]
    bad = [r for r in runners if r not in RUNNERS]
    if bad or not runners:
        ap.error(f"--only: unknown runner(s) {bad}; choose from {', '.join(RUNNERS)}")
    args.model_dir = args.model_dir.resolve()
    if not (args.model_dir / "model_index.json").is_file():
        ap.error(f"{args.model_dir}: no model_index.json (onnx/build_bench_models.py builds onnx/build/*)")
    args.bin_dir = args.bin_dir.resolve()
    need = ({"diffusionctl"} if set(runners) - {"python"} else set()) | (
        {"diffusiond"} if {"daemon", "generate"} & set(runners) else set())
    missing = [b for b in sorted(need) if not (args.bin_dir / b).is_file()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not in {args.bin_dir}: cargo build --release --bins")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(cleanup)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        tmp = args.keep.resolve()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="diffusiond-batch-bench-"))
    if args.manifest is None:
        args.manifest = tmp / "manifest.jsonl"
        args.manifest.write_text("".join(
            json.dumps(it) + "\n"
            for it in make_manifest.items(args.items, args.width, args.height, args.steps, args.guidance)))
    args.manifest = args.manifest.resolve()
    label = args.label or f"{args.model_dir.name}-{args.width}x{args.height}-s{args.steps}-n{args.items}" + (
        "" if runners == list(RUNNERS) else "-" + "+".join(runners))

    bench = Bench(args, tmp)
    results = dict(label=label, machine=machine(args, runners),
                   args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   items=len(bench.items), images=bench.n_images,
                   started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), rounds=[])
    print(json.dumps(results["machine"]), flush=True)
    try:
        if {"daemon", "generate"} & set(runners):
            results["daemon"] = bench.start_daemon()
            print(f"daemon ready in {results['daemon']['start_to_ready_s']:.2f} s "
                  f"(model preloaded), warm-up {results['daemon'].get('warmup_s', 0):.2f} s", flush=True)
        if "daemon2" in runners:
            results["daemon2"] = bench.start_daemon2()
            print(f"two-worker daemon ready in {results['daemon2']['start_to_ready_s']:.2f} s", flush=True)
        for rnd in range(args.rounds):
            order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
            got = {}
            for name in order:
                got[name] = getattr(bench, f"{name}_run")(rnd)
                g = got[name]
                print(f"[round {rnd}] {name}: {g['images']} images, {g['images_per_s']:.2f} img/s "
                      f"({TIMED[name]}: {g['seconds']:.2f} s; wall {g['wall_s']:.2f} s)", flush=True)
            results["rounds"].append(got)
        if bench.daemon is not None:
            results["daemon"]["vm_hwm_kib"] = vm_hwm(bench.daemon.proc.pid)
        if bench.daemon2 is not None:
            results["daemon2"]["vm_hwm_kib"] = vm_hwm(bench.daemon2.proc.pid)
        try:
            results["parity"] = compare(bench, results["rounds"][0], args.compare) if results["rounds"] else {}
        except ImportError as e:  # numpy/PIL missing: run with the reference venv's python
            results["parity"] = {"error": str(e)}
    except Exception as e:  # keep what was measured; the exit status says it failed
        results["error"] = f"{type(e).__name__}: {e}"
        print(f"error: {results['error']}", file=sys.stderr, flush=True)
    finally:
        if bench.daemon is not None:
            bench.daemon.stop()
        if bench.daemon2 is not None:
            bench.daemon2.stop()
        cleanup()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results["summary"] = summarize(results["rounds"])
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["machine"]["loadavg_end"] = os.getloadavg()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"batch-{label}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(f"{bench.n_images} images, {len(bench.items)} items, {args.model_dir.name} {args.width}x{args.height}, "
          f"{args.steps} steps, {args.rounds} rounds")
    print()
    print(table(results["summary"], results.get("parity", {})))
    own = [r["local"]["reported"]["images_per_s"] for r in results["rounds"]
           if r.get("local", {}).get("reported", {}) and "images_per_s" in r["local"]["reported"]]
    if own:
        print(f"\n`diffusionctl batch --local` reports {statistics.median(own):.2f} images/s itself (median).")
    print(f"\nwrote {path}")
    if "error" in results:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
