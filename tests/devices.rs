//! Several workers (`runtime.devices`) on the CPU, end to end: a real diffusiond with two
//! CPU workers on a private bus spreads jobs over both, each result says which worker ran
//! it, and every image equals the one-worker daemon's for the same request. A config
//! asking for CUDA first falls back to two CPU workers on a machine without it; a device
//! listed twice stops the daemon at start with a message naming the key.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::{
    Daemon, PrivateBus, config_text, generate, png_rgb, request_dict, result_pngs, tokio_runtime,
    wait,
};
use zbus::zvariant::Value;

const SEEDS: [u64; 6] = [11, 12, 13, 14, 15, 16];

/// Submits one job per seed at once and waits for all: seed -> (device, RGB).
fn run_all(bus: &PrivateBus) -> BTreeMap<u64, (String, Vec<u8>)> {
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let mut paths = Vec::new();
        for seed in SEEDS {
            let request = request_dict(&[
                ("prompt", Value::from("a red circle on a blue square")),
                ("steps", Value::U32(4)),
                ("seed", Value::U64(seed)),
                ("scheduler", Value::from("euler")),
            ]);
            paths.push((seed, generate(&conn, request).await.unwrap()));
        }
        let mut out = BTreeMap::new();
        for (seed, path) in paths {
            let result = wait(&conn, &path).await.unwrap();
            let device = String::try_from(result["device"].try_clone().unwrap()).unwrap();
            let pngs = result_pngs(&result);
            assert_eq!(pngs.len(), 1);
            assert_eq!(u32::try_from(&result["batch_size"]).unwrap(), 1);
            out.insert(seed, (device, png_rgb(&pngs[0])));
        }
        out
    })
}

#[test]
fn two_cpu_workers_share_the_jobs_and_make_the_same_images() {
    // One image per batch, so both daemons run the same UNet shapes.
    let one_image = "[jobs]\nmax_batch_images = 1\njobs_per_caller = 16\n";
    let reference = {
        let bus = PrivateBus::start();
        let _d = Daemon::start(&bus, one_image);
        run_all(&bus)
    };
    assert!(reference.values().all(|(device, _)| device == "cpu"));

    let bus = PrivateBus::start();
    let _d = Daemon::start(
        &bus,
        &format!(
            "{one_image}\n[runtime]\nexecution_providers = [\"cuda\", \"cpu\"]\ndevices = [0, 1]\n"
        ),
    );
    let two = run_all(&bus);
    let devices: BTreeSet<&str> = two.values().map(|(d, _)| d.as_str()).collect();
    assert_eq!(
        devices,
        BTreeSet::from(["cpu", "cpu#1"]),
        "both workers ran jobs: {:?}",
        two.iter().map(|(s, (d, _))| (s, d)).collect::<Vec<_>>()
    );
    for seed in SEEDS {
        assert!(
            two[&seed].1 == reference[&seed].1,
            "seed {seed} on {} differs from the one-worker daemon",
            two[&seed].0
        );
    }
    // Distinct seeds give distinct images (the comparison above is not vacuous).
    assert_ne!(reference[&11].1, reference[&12].1);
}

#[test]
fn version_lists_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("diffusiond.toml");
    std::fs::write(&config, config_text("[runtime]\ndevices = [0, 1]\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .arg("--version")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("workers: cpu, cpu#1\n"), "{text}");
}

#[test]
fn a_device_listed_twice_stops_the_daemon_naming_the_key() {
    let bus = PrivateBus::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("diffusiond.toml");
    std::fs::write(&config, config_text("[runtime]\ndevices = [0, 0]\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .arg("--address")
        .arg(bus.address())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("runtime.devices: device 0 is listed twice (one worker per device)"),
        "{stderr}"
    );
}
