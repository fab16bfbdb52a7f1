//! Daemon benchmark: Generate→Finished round trip against the in-process pipeline, and
//! the throughput of 20 concurrent jobs from 4 clients with and without batching.
//!
//! Starts its own private dbus-daemon and diffusiond processes (release build):
//!
//! ```sh
//! cargo build --release --bins --examples
//! target/release/examples/daemon_throughput [ROUNDS] > bench/results/daemon.json
//! ```
//!
//! Runs alternate between configurations within one run, so machine noise hits both.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diffusiond::pipeline::{GenerateParams, Pipeline};
use diffusiond::runtime::{Runtime, RuntimeSettings};
use zbus::Connection;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

type Dict = HashMap<String, OwnedValue>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_bus(dir: &Path) -> (Proc, String) {
    let conf = dir.join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            "<busconfig><type>session</type><listen>unix:dir={}</listen><auth>EXTERNAL</auth>\
             <policy context=\"default\"><allow send_destination=\"*\"/><allow eavesdrop=\"true\"/>\
             <allow own=\"*\"/></policy></busconfig>",
            dir.display()
        ),
    )
    .expect("bus config");
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dbus-daemon");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address");
    (Proc(child), line.trim().to_string())
}

fn start_daemon(dir: &Path, address: &str, max_batch: usize) -> Proc {
    let conf = dir.join(format!("diffusiond-{max_batch}.toml"));
    std::fs::write(
        &conf,
        format!(
            "default_model = \"tiny\"\n[models.tiny]\npath = \"{}\"\n[runtime.session]\nintra_threads = 1\ninter_threads = 1\n\
             [jobs]\nmax_batch_images = {max_batch}\njobs_per_caller = 64\n",
            root().join("onnx/tiny-sd15").display()
        ),
    )
    .expect("config");
    // Owned by `Proc` at once, so it is killed and reaped on every path.
    let daemon = Proc(
        Command::new(root().join("target/release/diffusiond"))
            .args(["--address", address, "--config"])
            .arg(&conf)
            .spawn()
            .expect("diffusiond (cargo build --release --bins)"),
    );
    for _ in 0..600 {
        let ok = Command::new("busctl")
            .args(["--address", address, "status", "io.github.Diffusiond1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return daemon;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("diffusiond did not start");
}

fn request(seed: u64) -> Dict {
    [
        ("prompt", Value::from(format!("benchmark {seed}"))),
        ("steps", Value::U32(13)),
        ("seed", Value::U64(seed)),
        ("scheduler", Value::from("pndm")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.try_to_owned().expect("value")))
    .collect()
}

async fn run_job(conn: &Connection, seed: u64) -> Dict {
    let reply = conn
        .call_method(
            Some("io.github.Diffusiond1"),
            "/io/github/Diffusiond1",
            Some("io.github.Diffusiond1.Manager"),
            "Generate",
            &(request(seed),),
        )
        .await
        .expect("Generate");
    let path: OwnedObjectPath = reply.body().deserialize().expect("path");
    let reply = conn
        .call_method(
            Some("io.github.Diffusiond1"),
            path.as_str(),
            Some("io.github.Diffusiond1.Job"),
            "Wait",
            &(),
        )
        .await
        .expect("Wait");
    reply.body().deserialize().expect("result")
}

async fn connect(address: &str) -> Connection {
    zbus::connection::Builder::address(address)
        .expect("address")
        .build()
        .await
        .expect("connect")
}

/// 20 jobs from 4 clients submitted at once; returns the wall time and largest batch.
async fn twenty_jobs(address: &str) -> (f64, u32) {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..4u64 {
        let conn = connect(address).await;
        for i in 0..5u64 {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                run_job(&conn, client * 10 + i).await
            }));
        }
    }
    let mut largest = 0;
    for t in tasks {
        let result = t.await.expect("task");
        largest = largest.max(u32::try_from(&result["batch_size"]).unwrap_or(0));
    }
    (t0.elapsed().as_secs_f64(), largest)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().expect("temp dir");
    let (_bus, address) = start_bus(dir.path());
    let rt = tokio::runtime::Runtime::new().expect("tokio");

    // In-process, warm: the same request through the library.
    let mut settings = RuntimeSettings::default();
    settings.session.intra_threads = 1;
    settings.session.inter_threads = 1;
    let runtime = Runtime::init(settings).expect("runtime");
    let mut pipeline = Pipeline::load(&runtime, &root().join("onnx/tiny-sd15")).expect("model");
    let params = |seed| GenerateParams {
        prompt: format!("benchmark {seed}"),
        steps: 13,
        seed,
        scheduler: Some("pndm".into()),
        width: 64,
        height: 64,
        ..GenerateParams::default()
    };

    let mut in_process = Vec::new();
    let mut round_trip = Vec::new();
    let mut cli_cold = Vec::new();
    let mut batched = Vec::new();
    let mut unbatched = Vec::new();
    let mut largest_batch = 0;
    let daemon_b = start_daemon(dir.path(), &address, 4);
    rt.block_on(async {
        let conn = connect(&address).await;
        run_job(&conn, 0).await; // load the model
        for r in 0..rounds as u64 {
            let t0 = Instant::now();
            pipeline
                .generate(&params(r), &mut |_, _| true)
                .expect("generate");
            in_process.push(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            run_job(&conn, r).await;
            round_trip.push(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            let out = dir.path().join("cli.png");
            let ok = Command::new(root().join("target/release/diffusionctl"))
                .args(["generate", "--local", "--model-dir"])
                .arg(root().join("onnx/tiny-sd15"))
                .args([
                    "--prompt",
                    "benchmark",
                    "--steps",
                    "13",
                    "--scheduler",
                    "pndm",
                    "--seed",
                    "1",
                    "--output",
                ])
                .arg(&out)
                .env("DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS", "1")
                .env("DIFFUSIOND_RUNTIME__SESSION__INTER_THREADS", "1")
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "diffusionctl --local failed");
            cli_cold.push(t0.elapsed().as_secs_f64());
        }
    });
    // Throughput: alternate a batching daemon and a non-batching one.
    drop(daemon_b);
    for _ in 0..rounds {
        for max_batch in [4, 1] {
            let daemon = start_daemon(dir.path(), &address, max_batch);
            let (secs, largest) = rt.block_on(async {
                let conn = connect(&address).await;
                run_job(&conn, 0).await; // warm: model loaded before timing
                twenty_jobs(&address).await
            });
            drop(daemon);
            if max_batch == 4 {
                batched.push(secs);
                largest_batch = largest_batch.max(largest);
            } else {
                unbatched.push(secs);
            }
        }
    }
    let report = serde_json::json!({
        "model": "onnx/tiny-sd15", "size": "64x64", "steps": 13, "scheduler": "pndm",
        "guidance": 7.5, "threads": {"intra": 1, "inter": 1}, "rounds": rounds,
        "in_process_warm_s": {"median": median(&mut in_process.clone()), "all": in_process},
        "dbus_round_trip_warm_s": {"median": median(&mut round_trip.clone()), "all": round_trip},
        "cli_local_cold_s": {"median": median(&mut cli_cold.clone()), "all": cli_cold},
        "twenty_jobs_batched_s": {"median": median(&mut batched.clone()), "all": batched, "max_batch_images": 4, "largest_batch": largest_batch},
        "twenty_jobs_unbatched_s": {"median": median(&mut unbatched.clone()), "all": unbatched, "max_batch_images": 1},
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
}
