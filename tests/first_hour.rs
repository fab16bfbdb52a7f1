//! A new user's first hour, end to end on private buses: a daemon with no config serves the
//! bundled model at its measured defaults; a session bus starts diffusiond on the first
//! call (D-Bus activation), the daemon exits when idle, and the next call starts it again;
//! `[models.NAME]` defaults apply and a request's own values win; usage errors name what
//! is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, PrivateBus, ctl_command, root};

const NAME: &str = "io.github.Diffusiond1";
const PROMPT: &str = "a red circle on a blue background";

fn ctl(args: &[&str]) -> Output {
    ctl_command(args).output().expect("run diffusionctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "failed: {}", text(&o.stderr));
}

fn pixels(path: &Path) -> image::RgbImage {
    image::open(path).expect("a PNG").to_rgb8()
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// The bundled model drawn in-process at its measured settings (20 steps, guidance 5).
fn local_reference(dir: &Path, seed: &str) -> image::RgbImage {
    let out = dir.join(format!("local-{seed}.png"));
    let model = root().join("onnx/tiny-demo");
    let o = ctl(&[
        "generate",
        "--local",
        "--model-dir",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--seed",
        seed,
        "--steps",
        "20",
        "--guidance",
        "5",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_ok(&o);
    pixels(&out)
}

/// The owner of the bus name and its pid, if any.
fn owner_pid(address: &str) -> Option<u32> {
    let out = Command::new("busctl")
        .args(["--address", address, "status", NAME])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("PID="))
        .and_then(|p| p.trim().parse().ok())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An empty home: no user config file can be found.
fn empty_home() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn a_daemon_without_config_serves_the_bundled_model_at_its_defaults() {
    let bus = PrivateBus::start();
    let home = empty_home();
    let log = home.path().join("daemon.log");
    let child = Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["--address", bus.address()])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join(".config"))
        .env("RUST_LOG", "warn")
        .env("DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS", "1")
        .env("DIFFUSIOND_RUNTIME__SESSION__INTER_THREADS", "1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while owner_pid(bus.address()).is_none() {
        if let Ok(Some(status)) = daemon.0.try_wait() {
            panic!(
                "diffusiond exited: {status}: {}",
                text(&std::fs::read(&log).unwrap())
            );
        }
        assert!(
            Instant::now() < deadline,
            "diffusiond did not take its name"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let model = std::fs::canonicalize(root().join("onnx/tiny-demo")).unwrap();

    // ListModels: the bundled model as `demo`, default, with its resolved path.
    let o = ctl(&["models", "--address", bus.address()]);
    assert_ok(&o);
    let table = text(&o.stdout);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(table.lines().count(), 2, "{table}");
    assert_eq!(row[0], "demo", "{table}");
    assert_eq!(row[1], "sd", "{table}");
    assert_eq!(row[4], "yes", "default: {table}");
    assert_eq!(Path::new(row[5]), model, "{table}");

    // A request with only a prompt and a seed: the measured defaults, the right image.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.png");
    let o = ctl(&[
        "generate",
        "--address",
        bus.address(),
        "--prompt",
        PROMPT,
        "--seed",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_ok(&o);
    let served = pixels(&out);
    assert_eq!(served.dimensions(), (64, 64));
    let diff = max_diff(&served, &local_reference(dir.path(), "1"));
    assert!(diff <= 1, "daemon and --local differ by {diff}");
    let jobs = ctl(&["jobs", "--address", bus.address()]);
    let listed = text(&jobs.stdout);
    let job = listed
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let o = ctl(&["wait", job, "--address", bus.address()]);
    assert_ok(&o);
    let summary = text(&o.stdout);
    assert!(
        summary.contains("model demo, seed 1, scheduler ddim, 64x64, 20 steps"),
        "{summary}"
    );

    drop(daemon);
    let logged = text(&std::fs::read(&log).unwrap());
    assert!(
        logged.contains("serving the bundled model") && logged.contains(model.to_str().unwrap()),
        "{logged}"
    );
}

#[test]
fn a_given_config_is_authoritative_and_a_missing_one_is_named() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    let o = ctl(&["models", "--address", bus.address()]);
    assert_ok(&o);
    let names: Vec<String> = text(&o.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(names, ["tiny"], "no bundled model is added to a config");

    let missing = empty_home().path().join("nope.toml");
    let o = Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["--address", bus.address(), "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains(missing.to_str().unwrap()), "{err}");

    let dir = empty_home();
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "[limits]\nmax_steps = 10\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["--address", bus.address(), "--config"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("empty.toml has no [models] table"), "{err}");
}

#[test]
fn model_defaults_apply_and_a_request_overrides_them() {
    let bus = PrivateBus::start();
    let config = format!(
        r#"default_model = "tiny"

[models.tiny]
path = "{}"
steps = 3
guidance_scale = 1.0
scheduler = "ddim"
width = 48
height = 32

[runtime.session]
intra_threads = 1
inter_threads = 1
"#,
        root().join("onnx/tiny-sd15").display()
    );
    let _d = Daemon::start_with_config(&bus, &config);
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = dir.path().join("x.png");
        let mut args = vec![
            "generate",
            "--address",
            bus.address(),
            "--prompt",
            "a lighthouse",
            "--seed",
            "3",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = ctl(&args);
        assert_ok(&o);
        let job = {
            let o = ctl(&["jobs", "--address", bus.address()]);
            text(&o.stdout)
                .lines()
                .last()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        let o = ctl(&["wait", &job, "--address", bus.address()]);
        assert_ok(&o);
        (pixels(&out).dimensions(), text(&o.stdout))
    };
    let (size, summary) = run(&[]);
    assert_eq!(size, (48, 32));
    assert!(
        summary.contains("scheduler ddim, 48x32, 3 steps"),
        "{summary}"
    );
    let (size, summary) = run(&["--steps", "2", "--width", "64", "--scheduler", "euler"]);
    assert_eq!(size, (64, 32));
    assert!(
        summary.contains("scheduler euler, 64x32, 2 steps"),
        "{summary}"
    );
}

#[test]
fn usage_errors_name_what_is_missing_and_a_bare_call_lists_the_commands() {
    let cases: [(&[&str], &str); 3] = [
        (&["generate", "--prompt", "x"], "--output <OUT.png>"),
        (
            &["generate", "--local", "--prompt", "x", "--output", "o.png"],
            "--model-dir <DIR>",
        ),
        (&["cancel"], "<JOB>"),
    ];
    for (args, missing) in cases {
        let o = ctl(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = text(&o.stderr);
        assert!(
            err.starts_with("diffusionctl: the following required arguments were not provided:"),
            "{err}"
        );
        assert!(err.contains(missing), "{args:?}: {err}");
        assert!(err.contains("\nUsage: diffusionctl "), "{args:?}: {err}");
    }
    let o = ctl(&[]);
    assert_eq!(o.status.code(), Some(2));
    let help = text(&o.stderr);
    for command in ["generate", "status", "models", "jobs", "cancel", "wait"] {
        assert!(help.contains(&format!("  {command} ")), "{help}");
    }
}

/// A private bus that starts diffusiond on demand from the shipped session activation
/// file (pointing at this build), with `env` for the activated daemon. Dropping it stops
/// the daemon it started, if one runs.
struct ActivatingBus {
    bus: PrivateBus,
    address: String,
    _services: tempfile::TempDir,
}

impl ActivatingBus {
    fn start(env: &[(&str, &std::ffi::OsStr)]) -> ActivatingBus {
        let services = tempfile::tempdir().unwrap();
        let unit =
            std::fs::read_to_string(root().join("systemd/io.github.Diffusiond1.session.service"))
                .unwrap()
                .replace("/usr/bin/diffusiond", env!("CARGO_BIN_EXE_diffusiond"));
        std::fs::write(services.path().join("io.github.Diffusiond1.service"), unit).unwrap();
        let bus = PrivateBus::start_with(Some(services.path()), env);
        let address = bus.address().to_string();
        ActivatingBus {
            bus,
            address,
            _services: services,
        }
    }
}

impl Drop for ActivatingBus {
    fn drop(&mut self) {
        if let Some(pid) = owner_pid(self.bus.address()) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

#[test]
fn the_bus_starts_the_daemon_it_exits_when_idle_and_the_next_call_starts_it_again() {
    let home = empty_home();
    let config_home: PathBuf = home.path().join(".config");
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let bus = ActivatingBus::start(&[
        ("HOME", home.path().as_os_str()),
        ("XDG_CONFIG_HOME", config_home.as_os_str()),
        ("DIFFUSIOND_JOBS__IDLE_EXIT_SECS", os("2")),
        ("DIFFUSIOND_JOBS__RETENTION_SECS", os("1")),
        ("DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS", os("1")),
        ("DIFFUSIOND_RUNTIME__SESSION__INTER_THREADS", os("1")),
        ("RUST_LOG", os("warn")),
    ]);
    assert_eq!(
        owner_pid(&bus.address),
        None,
        "nothing runs before the first call"
    );
    let dir = tempfile::tempdir().unwrap();
    let generate = |seed: &str| {
        let out = dir.path().join(format!("act-{seed}.png"));
        let o = ctl(&[
            "generate",
            "--address",
            &bus.address,
            "--prompt",
            PROMPT,
            "--seed",
            seed,
            "--output",
            out.to_str().unwrap(),
        ]);
        assert_ok(&o);
        pixels(&out)
    };

    // The first call starts the daemon, with no config: the bundled model.
    let first = generate("1");
    let diff = max_diff(&first, &local_reference(dir.path(), "1"));
    assert!(diff <= 1, "activated daemon and --local differ by {diff}");
    let pid = owner_pid(&bus.address).expect("the activated daemon owns the name");

    // No jobs (retention 1 s) for idle_exit_secs (2 s): it exits by itself.
    let t0 = Instant::now();
    while owner_pid(&bus.address).is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the daemon did not exit when idle"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "it left before being idle: {:?}",
        t0.elapsed()
    );
    // It released the name on its way out; the process ends right after.
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.contains(") Z ") || s.contains(") X "))
    };
    let t1 = Instant::now();
    while !gone() {
        assert!(
            t1.elapsed() < Duration::from_secs(10),
            "process {pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The next call starts it again.
    let second = generate("2");
    assert_eq!(second.dimensions(), (64, 64));
    let again = owner_pid(&bus.address).expect("reactivated");
    assert_ne!(again, pid);
}
