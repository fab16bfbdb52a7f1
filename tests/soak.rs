//! A bounded soak and fuzz run against a real daemon on a private bus: many jobs from many
//! connections, then seeded random requests (wrong types, ranges, sizes, duplicate keys,
//! NaN and huge guidance, long prompts, fds that are read-only, /dev/full, a closed pipe,
//! a pipe nobody reads), then calls as another uid. It checks that every job succeeds or
//! fails with one of our typed errors, nothing hangs, the daemon stays up, and its memory
//! comes back; and prints the figures docs/soak.md records.
//!
//! The short run is part of `cargo test`; `SOAK_SCALE=long` runs the long one
//! (200 jobs from 20 connections, 400 random requests).

mod common;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use common::{Daemon, PairsDict, PrivateBus, error_name, generate, rss_kb, wait};
use zbus::zvariant::{Fd, OwnedObjectPath, OwnedValue, Value};

const NAME: &str = "io.github.Diffusiond1";
const PATH: &str = "/io/github/Diffusiond1";
const MANAGER: &str = "io.github.Diffusiond1.Manager";

type Dict = std::collections::HashMap<String, OwnedValue>;

struct Scale {
    jobs: usize,
    connections: usize,
    random: usize,
}

fn scale() -> Scale {
    if std::env::var("SOAK_SCALE").as_deref() == Ok("long") {
        Scale {
            jobs: 200,
            connections: 20,
            random: 400,
        }
    } else {
        Scale {
            jobs: 40,
            connections: 8,
            random: 120,
        }
    }
}

/// One seeded random request; fds it needs are kept alive in `keep`.
fn random_request(
    rng: &mut rand_mt::Mt64,
    keep: &mut Vec<OwnedFd>,
) -> Vec<(String, Value<'static>)> {
    let mut pick = |n: u64| (rng.next_u64() % n) as usize;
    let mut pairs: Vec<(String, Value<'static>)> = vec![("prompt".into(), Value::from("soak"))];
    let sides: [u32; 9] = [0, 8, 16, 63, 64, 72, 96, 4096, u32::MAX];
    let guidance = [
        f64::NAN,
        f64::INFINITY,
        -1e30,
        1e20,
        0.0,
        1.0,
        7.5,
        100.0,
        101.0,
    ];
    for _ in 0..1 + pick(3) {
        let entry: (String, Value<'static>) = match pick(14) {
            0 => ("width".into(), Value::U32(sides[pick(9)])),
            1 => ("height".into(), Value::U32(sides[pick(9)])),
            2 => (
                "steps".into(),
                Value::U32([0, 1, 2, 201, u32::MAX][pick(5)]),
            ),
            3 => ("guidance_scale".into(), Value::F64(guidance[pick(9)])),
            4 => (
                "guidance_rescale".into(),
                Value::F64([-1.0, 0.5, 2.0, f64::NAN][pick(4)]),
            ),
            5 => ("num_images".into(), Value::U32([0, 1, 2, 17][pick(4)])),
            6 => (
                "seed".into(),
                [Value::U64(7), Value::I64(-1), Value::from("7")][pick(3)].clone(),
            ),
            7 => (
                "rng".into(),
                Value::from(["torch", "numpy", "dice"][pick(3)]),
            ),
            8 => (
                "scheduler".into(),
                Value::from(["ddim", "euler-a", "warp", ""][pick(4)]),
            ),
            9 => (
                "prompt".into(),
                Value::from("x".repeat([10, 5000, 100_000][pick(3)])),
            ),
            10 => ("colour".into(), Value::from("red")),
            11 => ("steps".into(), Value::from("four")),
            12 => ("priority".into(), Value::I32([-5, 0][pick(2)])),
            _ => {
                let fd: OwnedFd = match pick(4) {
                    0 => std::fs::File::open("/dev/null").unwrap().into(),
                    1 => std::fs::OpenOptions::new()
                        .write(true)
                        .open("/dev/full")
                        .unwrap()
                        .into(),
                    2 => {
                        let (r, w) = std::io::pipe().unwrap();
                        drop(r);
                        w.into()
                    }
                    _ => {
                        let (r, w) = std::io::pipe().unwrap();
                        keep.push(r.into());
                        w.into()
                    }
                };
                let fd_value: Fd<'static> = fd.into();
                ("output_fds".into(), Value::from(vec![fd_value]))
            }
        };
        pairs.push(entry);
    }
    pairs.push(("steps".into(), Value::U32(2)));
    if pick(2) == 0 {
        // A key sent twice must be refused; otherwise keep the last one only.
        pairs.dedup_by(|a, b| a.0 == b.0);
    }
    pairs
}

#[test]
fn soak_and_fuzz() {
    let s = scale();
    let bus = PrivateBus::start();
    let d = Daemon::start(
        &bus,
        "[limits]\nmax_width = 512\nmax_height = 512\nmemory_budget = 2147483648\n\
         [jobs]\nqueue_depth = 256\njobs_per_caller = 256\noutput_timeout_secs = 2\nretention_secs = 5\n",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let t0 = Instant::now();
    let rss_before = rt.block_on(async {
        let conn = bus.connect().await;
        let req: Dict = [("prompt", Value::from("warm up")), ("steps", Value::U32(2))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
            .collect();
        wait(&conn, &generate(&conn, req).await.unwrap())
            .await
            .unwrap();
        rss_kb(d.pid())
    });

    // Many jobs from many connections: every one succeeds.
    let ok = rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..s.connections {
            let address = bus.address().to_string();
            let per = s.jobs / s.connections;
            tasks.push(tokio::spawn(async move {
                let conn = zbus::connection::Builder::address(address.as_str())
                    .unwrap()
                    .build()
                    .await
                    .unwrap();
                let mut ok = 0;
                for i in 0..per {
                    let req: Dict = [
                        ("prompt", Value::from(format!("client {c} job {i}"))),
                        ("steps", Value::U32(2)),
                        ("seed", Value::U64((c * 1000 + i) as u64)),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
                    .collect();
                    let path = generate(&conn, req).await.unwrap();
                    let result = wait(&conn, &path).await.unwrap();
                    assert!(result.contains_key("images"));
                    ok += 1;
                }
                ok
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await.unwrap();
        }
        ok
    });
    assert_eq!(ok, s.jobs / s.connections * s.connections);

    // Seeded random requests: each ends in a success or one of the documented errors.
    let mut rng = rand_mt::Mt64::new(20261204);
    rt.block_on(async {
        let conn = bus.connect().await;
        let manager = zbus::Proxy::new(&conn, NAME, PATH, MANAGER).await.unwrap();
        for _ in 0..s.random {
            let mut keep = Vec::new();
            let pairs = random_request(&mut rng, &mut keep);
            let body = (PairsDict(pairs.clone()),);
            let call = manager.call::<_, _, OwnedObjectPath>("Generate", &body);
            let outcome = match tokio::time::timeout(Duration::from_secs(10), call).await {
                Err(_) => panic!("Generate hung: {pairs:?}"),
                Ok(Err(e)) => error_name(&e),
                Ok(Ok(path)) => {
                    match tokio::time::timeout(Duration::from_secs(30), wait(&conn, &path)).await {
                        Err(_) => panic!("Wait hung: {pairs:?}"),
                        Ok(Ok(_)) => "succeeded".to_string(),
                        Ok(Err(e)) => error_name(&e),
                    }
                }
            };
            assert!(
                outcome == "succeeded"
                    || outcome.starts_with("io.github.Diffusiond1.Error.")
                    || outcome == "org.freedesktop.zbus.Error",
                "{outcome} for {pairs:?}"
            );
            *outcomes.entry(outcome).or_default() += 1;
            drop(keep);
        }
    });

    // As another uid (root only): no priority above 0, no acting on another's job.
    let as_nobody = common::can_run_as_other_uids();
    if as_nobody {
        bus.open_to_everyone();
        let out = common::gdbus_as_nobody(
            bus.address(),
            PATH,
            "io.github.Diffusiond1.Manager.Generate",
        )
        .arg("{'prompt': <'p'>, 'steps': <uint32 1>, 'priority': <int32 9>}")
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("io.github.Diffusiond1.Error.AccessDenied"),
            "{err}"
        );
        *outcomes
            .entry("AccessDenied as uid 65534 (priority 9)".into())
            .or_default() += 1;
    }

    let alive = d.pid() != 0 && std::path::Path::new(&format!("/proc/{}", d.pid())).exists();
    assert!(alive, "the daemon died");
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss_kb(d.pid());
    assert!(
        rss_after < rss_before + 300 * 1024,
        "RSS {rss_before} kB before, {rss_after} kB after"
    );
    println!(
        "soak: {} jobs from {} connections all succeeded; {} random requests; as another uid: {}; daemon alive; RSS {} MiB before, {} MiB after; {:.0} s",
        s.jobs / s.connections * s.connections,
        s.connections,
        s.random,
        if as_nobody {
            "checked"
        } else {
            "skipped (not root)"
        },
        rss_before / 1024,
        rss_after / 1024,
        t0.elapsed().as_secs_f64()
    );
    for (outcome, n) in &outcomes {
        println!("soak outcome: {n:>4}  {outcome}");
    }
}
