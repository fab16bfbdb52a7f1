//! `diffusionctl` against a real diffusiond on a private bus: generate (the same pixels as
//! `--local`), status, models, jobs, cancel, wait, Ctrl-C, and one-line errors.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, PrivateBus, ctl_command};
use diffusiond::client::{Bus, Client, GenerateRequest};
use zbus::zvariant::OwnedObjectPath;

fn ctl(args: &[&str]) -> Output {
    ctl_command(args).output().expect("run diffusionctl")
}

/// Runs a daemon subcommand on `bus`.
fn ctl_on(bus: &PrivateBus, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend(["--address", bus.address()]);
    ctl(&all)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "failed: {}", stderr(o));
}

/// A failure with exactly one line on stderr, which starts `diffusionctl: ` + `prefix`.
fn assert_one_line_error(o: &Output, prefix: &str) {
    assert!(!o.status.success(), "succeeded: {}", stdout(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    let want = format!("diffusionctl: {prefix}");
    assert!(
        err.starts_with(&want),
        "{err:?} does not start with {want:?}"
    );
}

/// A usage error: clap's whole message, its first line `diffusionctl: ` + `prefix`, then
/// the usage line.
fn assert_usage_error(o: &Output, prefix: &str) {
    assert_eq!(o.status.code(), Some(2), "{}", stderr(o));
    let err = stderr(o);
    let want = format!("diffusionctl: {prefix}");
    assert!(
        err.starts_with(&want),
        "{err:?} does not start with {want:?}"
    );
    assert!(
        err.contains("\nUsage: diffusionctl "),
        "no usage line: {err:?}"
    );
}

fn rgb(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn assert_within_one_level(a: &Path, b: &Path) {
    let (x, y) = (rgb(a), rgb(b));
    assert_eq!(x.dimensions(), y.dimensions());
    let max = x
        .as_raw()
        .iter()
        .zip(y.as_raw())
        .map(|(p, q)| p.abs_diff(*q))
        .max()
        .unwrap_or(0);
    assert!(
        max <= 1,
        "{} vs {}: max difference {max}",
        a.display(),
        b.display()
    );
}

/// A client connection the test keeps open (jobs of callers that leave are cancelled).
struct Holder {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Holder {
    fn connect(bus: &PrivateBus) -> Holder {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = rt
            .block_on(Client::connect(&Bus::Address(bus.address().into())))
            .unwrap();
        Holder { rt, client }
    }

    fn generate(&self, request: GenerateRequest) -> OwnedObjectPath {
        self.rt.block_on(self.client.generate(&request)).unwrap()
    }

    fn state(&self, path: &OwnedObjectPath) -> String {
        self.rt
            .block_on(async {
                let jobs = self.client.jobs().await?;
                Ok::<_, diffusiond::client::ClientError>(
                    jobs.into_iter()
                        .find(|j| j.path == path.as_str())
                        .map(|j| j.state)
                        .unwrap_or_default(),
                )
            })
            .unwrap()
    }

    fn wait_for_state(&self, path: &OwnedObjectPath, want: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = self.state(path);
            if want.contains(&state.as_str()) || Instant::now() > deadline {
                return state;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn prompt(p: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: p.into(),
        ..Default::default()
    }
}

/// Config for jobs long enough to interrupt.
const LONG_JOBS: &str = "[limits]\nmax_steps = 1000\n";

#[test]
fn generate_writes_the_same_pixels_as_local_mode() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, "");
    let dir = tempfile::tempdir().unwrap();
    let model_dir = common::root().join("onnx/tiny-sd15");
    let flags = [
        "--prompt",
        "a red bicycle",
        "--negative-prompt",
        "blurry",
        "--steps",
        "5",
        "--guidance",
        "6.5",
        "--guidance-rescale",
        "0.3",
        "--scheduler",
        "euler-a",
        "--seed",
        "1234",
        "--rng",
        "numpy",
        "--width",
        "64",
        "--height",
        "48",
        "--num-images",
        "2",
    ];
    let daemon_out = dir.path().join("daemon.png");
    let local_out = dir.path().join("local.png");
    let mut args = vec!["generate"];
    args.extend(flags);
    args.extend(["--output", daemon_out.to_str().unwrap()]);
    let o = ctl_on(&bus, &args);
    assert_ok(&o);
    let d0 = dir.path().join("daemon-0.png");
    let d1 = dir.path().join("daemon-1.png");
    assert_eq!(stdout(&o), format!("{}\n{}\n", d0.display(), d1.display()));
    assert!(!daemon_out.exists());

    let mut args = vec![
        "generate",
        "--local",
        "--model-dir",
        model_dir.to_str().unwrap(),
    ];
    args.extend(flags);
    args.extend(["--output", local_out.to_str().unwrap()]);
    let o = ctl(&args);
    assert_ok(&o);
    for i in 0..2 {
        let d = dir.path().join(format!("daemon-{i}.png"));
        let l = dir.path().join(format!("local-{i}.png"));
        assert_eq!(rgb(&d).dimensions(), (64, 48));
        assert_within_one_level(&d, &l);
    }
}

#[test]
fn generate_with_defaults_writes_one_png() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, "");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let o = ctl_on(
        &bus,
        &[
            "generate", "--prompt", "a cat", "--steps", "3", "--model", "tiny", "--output",
        ]
        .into_iter()
        .chain([out.to_str().unwrap()])
        .collect::<Vec<_>>(),
    );
    assert_ok(&o);
    assert_eq!(stdout(&o), format!("{}\n", out.display()));
    // The model's native size (the tiny UNet's sample size × 8).
    assert_eq!(rgb(&out).dimensions(), (64, 64));
}

#[test]
fn status_models_and_jobs() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, "");

    let o = ctl_on(&bus, &["status"]);
    assert_ok(&o);
    let text = stdout(&o);
    assert!(
        text.starts_with(&format!("diffusiond {}\n", diffusiond::VERSION)),
        "{text}"
    );
    assert!(text.contains("ONNX Runtime 1.32.0\n"), "{text}");
    assert!(text.contains("execution providers: "), "{text}");
    assert!(text.contains("queue length: 0\n"), "{text}");
    assert!(text.contains("models: tiny (default"), "{text}");

    let o = ctl_on(&bus, &["models"]);
    assert_ok(&o);
    let text = stdout(&o);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "KIND", "SCHEDULER", "LOADED", "DEFAULT", "PATH"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], ["tiny", "sd", "pndm", "no", "yes"]);
    assert!(row[5].ends_with("onnx/tiny-sd15"), "{text}");

    let o = ctl_on(&bus, &["jobs"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "JOB  STATE  STEP  PATH\n");

    let holder = Holder::connect(&bus);
    let job = holder.generate(GenerateRequest {
        steps: Some(3),
        scheduler: Some("ddim".into()),
        ..prompt("a lighthouse")
    });
    assert_eq!(holder.wait_for_state(&job, &["succeeded"]), "succeeded");
    let o = ctl_on(&bus, &["jobs"]);
    assert_ok(&o);
    let text = stdout(&o);
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    let number = job.as_str().rsplit('/').next().unwrap();
    assert_eq!(row, [number, "succeeded", "3/3", job.as_str()], "{text}");
}

#[test]
fn wait_writes_the_images_of_a_job() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, "");
    let dir = tempfile::tempdir().unwrap();
    let holder = Holder::connect(&bus);
    let job = holder.generate(GenerateRequest {
        steps: Some(4),
        seed: Some(7),
        width: Some(48),
        height: Some(32),
        ..prompt("a boat")
    });
    let number = job.as_str().rsplit('/').next().unwrap().to_string();

    // By number, while it may still run, with --output.
    let out = dir.path().join("boat.png");
    let o = ctl_on(&bus, &["wait", &number, "--output", out.to_str().unwrap()]);
    assert_ok(&o);
    assert_eq!(stdout(&o), format!("{}\n", out.display()));
    assert_eq!(rgb(&out).dimensions(), (48, 32));

    // By path, after the end, without --output: a summary.
    let o = ctl_on(&bus, &["wait", job.as_str()]);
    assert_ok(&o);
    let text = stdout(&o);
    assert!(text.starts_with("succeeded: model tiny, seed 7,"), "{text}");
    assert!(text.contains("48x32, 4 steps"), "{text}");
}

#[test]
fn cancel_stops_a_running_job_and_wait_reports_it() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, LONG_JOBS);
    let holder = Holder::connect(&bus);
    let job = holder.generate(GenerateRequest {
        steps: Some(900),
        scheduler: Some("ddim".into()),
        width: Some(128),
        height: Some(128),
        ..prompt("a very long job")
    });
    assert_eq!(holder.wait_for_state(&job, &["running"]), "running");
    let number = job.as_str().rsplit('/').next().unwrap().to_string();

    let o = ctl_on(&bus, &["cancel", &number]);
    assert_ok(&o);
    assert_eq!(stdout(&o), format!("cancelled {}\n", job.as_str()));
    assert_eq!(holder.wait_for_state(&job, &["cancelled"]), "cancelled");

    let o = ctl_on(&bus, &["wait", job.as_str()]);
    assert_one_line_error(&o, "Cancelled: ");

    let o = ctl_on(&bus, &["jobs"]);
    assert_ok(&o);
    assert!(stdout(&o).contains(" cancelled "), "{}", stdout(&o));
}

#[test]
fn ctrl_c_cancels_the_job_and_exits_non_zero() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, LONG_JOBS);
    let holder = Holder::connect(&bus);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.png");
    let child = ctl_command(&[
        "generate",
        "--prompt",
        "interrupted",
        "--steps",
        "900",
        "--scheduler",
        "ddim",
        "--width",
        "128",
        "--height",
        "128",
        "--output",
        out.to_str().unwrap(),
        "--address",
        bus.address(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();

    // Wait until its job runs (and diffusionctl is inside Wait()), then press Ctrl-C.
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let jobs = holder.rt.block_on(holder.client.jobs()).unwrap();
        if let Some(j) = jobs
            .into_iter()
            .find(|j| j.state == "running" && j.step > 0)
        {
            break j;
        }
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert_eq!(stderr(&o), "diffusionctl: interrupted; job cancelled\n");
    assert!(!out.exists());
    let path = OwnedObjectPath::try_from(job.path.as_str()).unwrap();
    assert_eq!(holder.wait_for_state(&path, &["cancelled"]), "cancelled");
}

#[test]
fn daemon_errors_are_one_readable_line() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, "");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let out = out.to_str().unwrap();

    let o = ctl_on(
        &bus,
        &[
            "generate", "--prompt", "p", "--model", "nope", "--output", out,
        ],
    );
    assert_one_line_error(&o, "UnknownModel: ");
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));

    let o = ctl_on(
        &bus,
        &[
            "generate",
            "--prompt",
            "p",
            "--scheduler",
            "warp",
            "--output",
            out,
        ],
    );
    assert_one_line_error(&o, "InvalidArgument: ");
    assert!(stderr(&o).contains("warp"), "{}", stderr(&o));

    let o = ctl_on(
        &bus,
        &[
            "generate", "--prompt", "p", "--width", "63", "--output", out,
        ],
    );
    assert_one_line_error(&o, "InvalidArgument: ");

    let o = ctl_on(&bus, &["wait", "999"]);
    assert_one_line_error(&o, "no such job: /io/github/Diffusiond1/job/999");
    let o = ctl_on(&bus, &["cancel", "999"]);
    assert_one_line_error(&o, "no such job: /io/github/Diffusiond1/job/999");
    let o = ctl_on(&bus, &["cancel", "first"]);
    assert_one_line_error(&o, "'first' is not a job");
    assert!(!Path::new(out).exists());
}

#[test]
fn no_daemon_on_the_bus_is_a_clear_error() {
    let bus = PrivateBus::start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let want = format!("diffusiond is not running on the bus at {}", bus.address());
    for args in [
        vec!["status"],
        vec!["models"],
        vec!["jobs"],
        vec!["wait", "1"],
        vec!["cancel", "1"],
        vec![
            "generate",
            "--prompt",
            "p",
            "--output",
            out.to_str().unwrap(),
        ],
    ] {
        let o = ctl_on(&bus, &args);
        assert_one_line_error(&o, &want);
    }

    let o = ctl(&[
        "status",
        "--address",
        "unix:path=/nonexistent/diffusiond-bus",
    ]);
    assert_one_line_error(&o, "cannot connect to the bus at unix:path=/nonexistent/");

    let o = ctl_command(&["models", "--session"])
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env("XDG_RUNTIME_DIR", dir.path())
        .output()
        .unwrap();
    assert_one_line_error(&o, "cannot connect to the session bus");
}

#[test]
fn local_only_flags_are_refused_with_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let out = out.to_str().unwrap();
    // Checked before connecting: no bus needed.
    let o = ctl(&[
        "generate",
        "--prompt",
        "p",
        "--latents",
        "l.npy",
        "--output",
        out,
    ]);
    assert_one_line_error(&o, "--latents needs --local");
    let o = ctl(&[
        "generate",
        "--prompt",
        "p",
        "--model-dir",
        "m",
        "--output",
        out,
    ]);
    assert_one_line_error(&o, "--model-dir needs --local");
    let o = ctl(&[
        "generate",
        "--local",
        "--model-dir",
        "m",
        "--model",
        "tiny",
        "--prompt",
        "p",
        "--output",
        out,
    ]);
    assert_usage_error(&o, "the argument '--local' cannot be used with '--model");
    let o = ctl(&[
        "generate",
        "--local",
        "--model-dir",
        "m",
        "--prompt",
        "p",
        "--system",
        "--output",
        out,
    ]);
    assert_one_line_error(
        &o,
        "--session, --system and --address choose the daemon's bus",
    );
    let o = ctl(&["status", "--system", "--address", "unix:path=/x"]);
    assert_usage_error(&o, "the argument '--system' cannot be used with '--address");
}
