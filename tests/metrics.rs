//! Metrics end to end: a daemon on a private bus runs jobs and refuses requests;
//! `diffusionctl metrics` and the `[metrics] textfile` both pass `promtool check metrics`
//! (Debian's `prometheus` package, installed by `.ci/run`), and the counters move by what
//! happened between two readings. `Metrics()` is refused to other users.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, PrivateBus, ctl_command, error_name, generate, request_dict, wait};
use zbus::zvariant::Value;

/// Runs `promtool check metrics` on `text`; panics on a parse or lint problem. Without
/// promtool (outside CI) the check is skipped, saying so.
fn promtool_check(text: &str, what: &str) {
    use std::io::Write as _;
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is needed under CI (Debian's prometheus package): {e}"
            );
            eprintln!("SKIPPED promtool check of {what}: {e}");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics of {what}: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of one series (`name{labels}` exactly as written), or 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

fn ctl_metrics(bus: &PrivateBus) -> String {
    let out = ctl_command(&["metrics", "--address", bus.address()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "diffusionctl metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The textfile once it has been written again after `since` (interval 1 s).
fn textfile_after(path: &Path, since: std::time::SystemTime) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(m) = std::fs::metadata(path)
            && m.modified().unwrap() > since
        {
            return std::fs::read_to_string(path).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "{} not rewritten",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn slow() -> HashMap<String, zbus::zvariant::OwnedValue> {
    request_dict(&[
        ("prompt", Value::from("slow")),
        ("width", Value::U32(256)),
        ("height", Value::U32(256)),
        ("steps", Value::U32(150)),
    ])
}

#[test]
fn metrics_parse_and_move_as_jobs_run_and_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let textfile = dir.path().join("diffusiond.prom");
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start_with_config(
        &bus,
        &common::config_with_model_keys(
            "max_width = 4096\nmax_height = 4096",
            &format!(
                "[limits]\nmax_width = 4096\nmax_height = 4096\nmax_pixels = 16777216\n\
                 memory_budget = 1073741824\n\n[jobs]\njobs_per_caller = 1\n\n\
                 [metrics]\ntextfile = \"{}\"\ninterval_secs = 1\n",
                textfile.display()
            ),
        ),
    );
    let before = ctl_metrics(&bus);
    promtool_check(&before, "diffusionctl metrics");
    let first_file = textfile_after(&textfile, std::time::UNIX_EPOCH);
    promtool_check(&first_file, "the textfile");
    for family in [
        "diffusiond_jobs_total",
        "diffusiond_queue_wait_seconds",
        "diffusiond_generation_seconds",
        "diffusiond_model_load_seconds",
        "diffusiond_requests_refused_total",
        "diffusiond_worker_info",
    ] {
        assert!(
            first_file.contains(&format!("# TYPE {family} ")),
            "{family}"
        );
    }
    assert_eq!(
        value(
            &before,
            "diffusiond_worker_info{worker=\"cpu\",execution_provider=\"cpu\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&before, "diffusiond_memory_budget_bytes"),
        1073741824.0
    );

    let started = std::time::SystemTime::now();
    common::tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        // Two jobs of two images each.
        for seed in [1u64, 2] {
            let req = request_dict(&[
                ("prompt", Value::from("a red circle")),
                ("steps", Value::U32(3)),
                ("num_images", Value::U32(2)),
                ("seed", Value::U64(seed)),
            ]);
            let job = generate(&conn, req).await.unwrap();
            wait(&conn, &job).await.unwrap();
        }
        // Refusals: an unknown key, a size over the budget, a second job of one caller.
        let err = generate(
            &conn,
            request_dict(&[("prompt", Value::from("x")), ("colour", Value::from("red"))]),
        )
        .await
        .unwrap_err();
        assert_eq!(
            error_name(&err),
            "io.github.Diffusiond1.Error.InvalidArgument"
        );
        let err = generate(
            &conn,
            request_dict(&[
                ("prompt", Value::from("x")),
                ("width", Value::U32(1024)),
                ("height", Value::U32(1024)),
            ]),
        )
        .await
        .unwrap_err();
        assert_eq!(error_name(&err), "io.github.Diffusiond1.Error.TooLarge");
        let held = generate(&conn, slow()).await.unwrap();
        let err = generate(&conn, slow()).await.unwrap_err();
        assert_eq!(error_name(&err), "io.github.Diffusiond1.Error.QueueFull");
        // The held job is counted as running (or queued) while it runs.
        let during = ctl_metrics(&bus);
        assert_eq!(
            value(&during, "diffusiond_queued_jobs") + value(&during, "diffusiond_running_jobs"),
            1.0,
            "{during}"
        );
        let cancel = zbus::Proxy::new(
            &conn,
            "io.github.Diffusiond1",
            held.as_str(),
            "io.github.Diffusiond1.Job",
        )
        .await
        .unwrap();
        let _: () = cancel.call("Cancel", &()).await.unwrap();
        let _ = wait(&conn, &held).await;
    });
    // Another user may not read the metrics (and that is a refusal too).
    let denied = common::can_run_as_other_uids();
    if denied {
        bus.open_to_everyone();
        let out = common::gdbus_as_nobody(
            bus.address(),
            "/io/github/Diffusiond1",
            "io.github.Diffusiond1.Manager.Metrics",
        )
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("io.github.Diffusiond1.Error.AccessDenied"),
            "{err}"
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs root, setpriv and gdbus under CI"
        );
        eprintln!("SKIPPED: Metrics() as another user (needs root, setpriv and gdbus)");
    }

    let after = ctl_metrics(&bus);
    promtool_check(&after, "diffusionctl metrics after jobs");
    let moved = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        moved("diffusiond_jobs_total{model=\"tiny\",state=\"succeeded\"}"),
        2.0,
        "{after}"
    );
    assert_eq!(
        moved("diffusiond_jobs_total{model=\"tiny\",state=\"cancelled\"}"),
        1.0
    );
    assert_eq!(moved("diffusiond_images_total{model=\"tiny\"}"), 4.0);
    // The held job's wait counts once it started (it may be cancelled before).
    let waits = moved("diffusiond_queue_wait_seconds_count");
    assert!((2.0..=3.0).contains(&waits), "{waits}");
    assert_eq!(moved("diffusiond_generation_seconds_count"), 2.0);
    assert!(moved("diffusiond_generation_seconds_sum") > 0.0);
    assert!(moved("diffusiond_unet_steps_total") >= 6.0, "{after}");
    assert!(
        moved("diffusiond_unet_step_images_total") >= 12.0,
        "{after}"
    );
    assert_eq!(moved("diffusiond_model_loads_total{model=\"tiny\"}"), 1.0);
    assert_eq!(
        value(&after, "diffusiond_model_loaded_workers{model=\"tiny\"}"),
        1.0
    );
    assert!(value(&after, "diffusiond_model_memory_bytes{model=\"tiny\"}") > 0.0);
    for (reason, n) in [
        ("InvalidArgument", 1.0),
        ("TooLarge", 1.0),
        ("QueueFull", 1.0),
    ] {
        let series = format!("diffusiond_requests_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(moved(&series), n, "{series}\n{after}");
    }
    if denied {
        assert_eq!(
            moved("diffusiond_requests_refused_total{reason=\"AccessDenied\"}"),
            1.0
        );
    }
    assert_eq!(value(&after, "diffusiond_queued_jobs"), 0.0);
    assert_eq!(value(&after, "diffusiond_running_jobs"), 0.0);

    // The textfile follows, and is written once more at exit; no temporary is left.
    let file = textfile_after(&textfile, started);
    promtool_check(&file, "the textfile after jobs");
    assert!(value(&file, "diffusiond_images_total{model=\"tiny\"}") >= 4.0);
    let status = daemon
        .signal_and_wait("-TERM", Duration::from_secs(30))
        .expect("diffusiond stops on SIGTERM");
    assert!(status.success(), "{status}");
    let last = std::fs::read_to_string(&textfile).unwrap();
    promtool_check(&last, "the textfile written at exit");
    assert_eq!(
        value(
            &last,
            "diffusiond_jobs_total{model=\"tiny\",state=\"succeeded\"}"
        ),
        2.0
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["diffusiond.prom"]);
}
