//! The daemon end to end, on a private dbus-daemon with a real diffusiond process:
//! parity with the local pipeline, 20 concurrent jobs from 4 clients, cancellation,
//! disconnects, QueueFull, typed errors for every bad option, SIGTERM, introspection.

mod common;

use std::time::{Duration, Instant};

use common::{
    Daemon, Dict, PrivateBus, error_name, generate, png_rgb, request_dict, result_pngs, root,
    tokio_runtime, wait,
};
use futures_lite::StreamExt;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, Proxy};

const NAME: &str = "io.github.Diffusiond1";
const PATH: &str = "/io/github/Diffusiond1";
const MANAGER: &str = "io.github.Diffusiond1.Manager";
const JOB: &str = "io.github.Diffusiond1.Job";

/// A bad request, the error name it must get, and a phrase its message must hold.
type BadCase = (
    Vec<(&'static str, Value<'static>)>,
    &'static str,
    &'static str,
);

async fn manager(conn: &Connection) -> Proxy<'static> {
    Proxy::new(conn, NAME, PATH, MANAGER).await.unwrap()
}

async fn job(conn: &Connection, path: &OwnedObjectPath) -> Proxy<'static> {
    Proxy::new(conn, NAME, path.clone(), JOB).await.unwrap()
}

#[test]
fn generate_over_dbus_equals_the_local_pipeline() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_diffusionctl"))
        .args(["generate", "--local", "--model-dir"])
        .arg(root().join("onnx/tiny-sd15"))
        .args([
            "--prompt",
            "a red circle",
            "--negative-prompt",
            "blurry",
            "--steps",
            "6",
        ])
        .args([
            "--guidance",
            "7.5",
            "--scheduler",
            "dpm++2m",
            "--seed",
            "42",
            "--output",
        ])
        .arg(&local)
        .env("DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS", "1")
        .status()
        .unwrap();
    assert!(status.success());
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let path = generate(
            &conn,
            request_dict(&[
                ("prompt", Value::from("a red circle")),
                ("negative_prompt", Value::from("blurry")),
                ("steps", Value::U32(6)),
                ("guidance_scale", Value::F64(7.5)),
                ("scheduler", Value::from("dpm++2m")),
                ("seed", Value::U64(42)),
            ]),
        )
        .await
        .unwrap();
        let result = wait(&conn, &path).await.unwrap();
        let images = result_pngs(&result);
        assert_eq!(images.len(), 1);
        assert_eq!(
            png_rgb(&images[0]),
            png_rgb(&std::fs::read(&local).unwrap())
        );
        assert_eq!(u64::try_from(&result["seed"]).unwrap(), 42);
        let state: String = job(&conn, &path).await.get_property("State").await.unwrap();
        assert_eq!(state, "succeeded");
    });
}

#[test]
fn twenty_concurrent_jobs_from_four_clients_all_complete() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "[jobs]\nmax_batch_images = 4\njobs_per_caller = 32\n");
    tokio_runtime().block_on(async {
        // Every client submits all its jobs first, then all 20 are waited on at once.
        let mut waits = Vec::new();
        for client in 0..4u64 {
            let conn = bus.connect().await;
            for i in 0..5u64 {
                let seed = client * 100 + i;
                let req = request_dict(&[
                    ("prompt", Value::from(format!("job {seed}"))),
                    ("steps", Value::U32(2)),
                    ("seed", Value::U64(seed)),
                ]);
                let path = generate(&conn, req).await.unwrap();
                let conn = conn.clone();
                waits.push(tokio::spawn(async move {
                    let result = wait(&conn, &path).await.unwrap();
                    (path, seed, result)
                }));
            }
        }
        let mut paths = std::collections::HashSet::new();
        let mut batched = 0;
        for w in waits {
            let (path, seed, result) = w.await.unwrap();
            assert!(paths.insert(path.to_string()), "duplicate job path");
            assert_eq!(u64::try_from(&result["seed"]).unwrap(), seed);
            assert_eq!(result_pngs(&result).len(), 1);
            batched = batched.max(u32::try_from(&result["batch_size"]).unwrap());
        }
        assert_eq!(paths.len(), 20);
        assert!(batched > 1, "no batching happened");
        eprintln!("largest UNet batch: {batched} images");
    });
}

/// A job slow enough to interrupt: 256×256, many steps.
fn slow_request() -> Dict {
    request_dict(&[
        ("prompt", Value::from("slow")),
        ("width", Value::U32(256)),
        ("height", Value::U32(256)),
        ("steps", Value::U32(150)),
        ("seed", Value::U64(1)),
    ])
}

/// Waits until the job's Step property reaches `step`.
async fn wait_for_step(conn: &Connection, path: &OwnedObjectPath, step: u32) {
    let j = job(conn, path).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let s: u32 = j.get_property("Step").await.unwrap();
        if s >= step {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job never reached step {step}");
}

async fn state(conn: &Connection, path: &OwnedObjectPath) -> String {
    // Read fresh, not from a property cache.
    let reply = conn
        .call_method(
            Some(NAME),
            path.as_str(),
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(JOB, "State"),
        )
        .await
        .unwrap();
    let value: OwnedValue = reply.body().deserialize().unwrap();
    String::try_from(value).unwrap()
}

#[test]
fn cancel_stops_a_running_job_within_a_step() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let path = generate(&conn, slow_request()).await.unwrap();
        let j = job(&conn, &path).await;
        let mut finished = j.receive_signal("Finished").await.unwrap();
        wait_for_step(&conn, &path, 2).await;
        let step_at_cancel: u32 = j.get_property("Step").await.unwrap();
        let t0 = Instant::now();
        let _: () = j.call("Cancel", &()).await.unwrap();
        let signal = tokio::time::timeout(Duration::from_secs(10), finished.next())
            .await
            .unwrap()
            .unwrap();
        let final_state: String = signal.body().deserialize().unwrap();
        assert_eq!(final_state, "cancelled");
        eprintln!("cancelled at step {step_at_cancel} in {:?}", t0.elapsed());
        let err = wait(&conn, &path).await.unwrap_err();
        assert_eq!(error_name(&err), "io.github.Diffusiond1.Error.Cancelled");
        assert_eq!(state(&conn, &path).await, "cancelled");
        // The daemon keeps serving, and the worker is free again.
        let next = generate(
            &conn,
            request_dict(&[("prompt", Value::from("after")), ("steps", Value::U32(2))]),
        )
        .await
        .unwrap();
        let result = tokio::time::timeout(Duration::from_secs(60), wait(&conn, &next))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(result_pngs(&result).len(), 1);
    });
}

#[test]
fn a_caller_that_leaves_the_bus_has_its_jobs_cancelled() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    tokio_runtime().block_on(async {
        let observer = bus.connect().await;
        let leaver = bus.connect().await;
        let running = generate(&leaver, slow_request()).await.unwrap();
        let queued = generate(&leaver, slow_request()).await.unwrap();
        wait_for_step(&observer, &running, 1).await;
        leaver.close().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (a, b) = (
                state(&observer, &running).await,
                state(&observer, &queued).await,
            );
            if a == "cancelled" && b == "cancelled" {
                break;
            }
            assert!(Instant::now() < deadline, "jobs not cancelled: {a}, {b}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn a_full_queue_answers_queue_full() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "[jobs]\nqueue_depth = 2\n");
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let a = generate(&conn, slow_request()).await.unwrap();
        let b = generate(&conn, slow_request()).await.unwrap();
        let err = generate(&conn, slow_request()).await.unwrap_err();
        assert_eq!(error_name(&err), "io.github.Diffusiond1.Error.QueueFull");
        let queue_length: u32 = manager(&conn)
            .await
            .get_property("QueueLength")
            .await
            .unwrap();
        assert_eq!(queue_length, 2);
        for p in [&a, &b] {
            let _: () = job(&conn, p).await.call("Cancel", &()).await.unwrap();
        }
    });
}

#[test]
fn every_bad_option_gets_its_typed_error_and_the_daemon_keeps_serving() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(
        &bus,
        "[limits]\nmax_steps = 60\nmax_width = 512\nmax_height = 512\nmax_images = 4\nmax_prompt_bytes = 100\n",
    );
    let invalid = "io.github.Diffusiond1.Error.InvalidArgument";
    let p = || ("prompt", Value::from("p"));
    let cases: Vec<BadCase> = vec![
        (vec![], invalid, "'prompt' is required"),
        (
            vec![("prompt", Value::U32(3))],
            invalid,
            "'prompt' must have D-Bus type 's'",
        ),
        (
            vec![p(), ("negative_prompt", Value::U32(3))],
            invalid,
            "'negative_prompt'",
        ),
        (vec![p(), ("model", Value::U32(3))], invalid, "'model'"),
        (
            vec![p(), ("model", Value::from("nope"))],
            "io.github.Diffusiond1.Error.UnknownModel",
            "nope",
        ),
        (
            vec![p(), ("width", Value::from("64"))],
            invalid,
            "'width' must have D-Bus type 'u'",
        ),
        (
            vec![p(), ("width", Value::U32(65))],
            invalid,
            "multiple of 16",
        ),
        // A multiple of 8 that this UNet (two down blocks) cannot take: refused at Generate,
        // naming what it can, instead of failing later inside ONNX Runtime.
        (
            vec![p(), ("width", Value::U32(72))],
            invalid,
            "'width': 72 is not a multiple of 16, which this model's VAE and UNet need (e.g. 64 or 80)",
        ),
        (
            vec![p(), ("width", Value::U32(1024))],
            invalid,
            "above the limit",
        ),
        (vec![p(), ("height", Value::I32(64))], invalid, "'height'"),
        (vec![p(), ("height", Value::U32(0))], invalid, "at least 1"),
        (vec![p(), ("steps", Value::U32(0))], invalid, "'steps'"),
        (
            vec![p(), ("steps", Value::U32(61))],
            invalid,
            "above the limit",
        ),
        (
            vec![
                p(),
                ("scheduler", Value::from("lcm")),
                ("steps", Value::U32(55)),
            ],
            invalid,
            "'steps'",
        ),
        (vec![p(), ("steps", Value::F64(4.0))], invalid, "'steps'"),
        (
            vec![p(), ("guidance_scale", Value::from("7"))],
            invalid,
            "'guidance_scale'",
        ),
        (
            vec![p(), ("guidance_scale", Value::F64(f64::INFINITY))],
            invalid,
            "finite",
        ),
        (
            vec![p(), ("guidance_rescale", Value::F64(1.5))],
            invalid,
            "between 0 and 1",
        ),
        (vec![p(), ("seed", Value::I64(-1))], invalid, "'seed'"),
        (vec![p(), ("rng", Value::from("dice"))], invalid, "'rng'"),
        (vec![p(), ("rng", Value::U32(1))], invalid, "'rng'"),
        (
            vec![
                p(),
                ("rng", Value::from("numpy")),
                ("seed", Value::U64(1 << 33)),
            ],
            invalid,
            "2^32-1",
        ),
        (
            vec![p(), ("scheduler", Value::from("warp"))],
            invalid,
            "unknown scheduler",
        ),
        (
            vec![p(), ("scheduler", Value::U32(1))],
            invalid,
            "'scheduler'",
        ),
        (
            vec![p(), ("num_images", Value::U32(0))],
            invalid,
            "'num_images'",
        ),
        (
            vec![p(), ("num_images", Value::U32(5))],
            invalid,
            "above the limit",
        ),
        (
            vec![p(), ("priority", Value::U32(1))],
            invalid,
            "'priority'",
        ),
        (
            vec![p(), ("output_fds", Value::from("x"))],
            invalid,
            "'output_fds'",
        ),
        (
            vec![("prompt", Value::from("x".repeat(101)))],
            invalid,
            "prompt",
        ),
        (
            vec![p(), ("colour", Value::from("red"))],
            invalid,
            "unknown key 'colour'",
        ),
    ];
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        for (pairs, name, needle) in cases {
            let err = generate(&conn, request_dict(&pairs)).await.unwrap_err();
            assert_eq!(error_name(&err), name, "{pairs:?}");
            assert!(format!("{err:?}").contains(needle), "{pairs:?}: {err:?}");
        }
        let err: zbus::Error = manager(&conn)
            .await
            .call::<_, _, ()>("LoadModel", &("nope",))
            .await
            .unwrap_err();
        assert_eq!(error_name(&err), "io.github.Diffusiond1.Error.UnknownModel");
        let path = generate(
            &conn,
            request_dict(&[
                ("prompt", Value::from("still here")),
                ("steps", Value::U32(2)),
            ]),
        )
        .await
        .unwrap();
        assert_eq!(result_pngs(&wait(&conn, &path).await.unwrap()).len(), 1);
        assert!(
            job(&conn, &path)
                .await
                .get_property::<u32>("Owner")
                .await
                .is_ok()
        );
    });
}

#[test]
fn sigterm_during_a_job_exits_cleanly_after_the_final_signal() {
    let bus = PrivateBus::start();
    let mut daemon = Daemon::start(&bus, "[jobs]\nshutdown_grace_secs = 0\n");
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let path = generate(&conn, slow_request()).await.unwrap();
        let queued = generate(&conn, slow_request()).await.unwrap();
        let mut finished = job(&conn, &path)
            .await
            .receive_signal("Finished")
            .await
            .unwrap();
        let mut queued_finished = job(&conn, &queued)
            .await
            .receive_signal("Finished")
            .await
            .unwrap();
        wait_for_step(&conn, &path, 1).await;
        let status = tokio::task::spawn_blocking(move || {
            let s = daemon.signal_and_wait("-TERM", Duration::from_secs(30));
            (s, daemon)
        })
        .await
        .unwrap();
        assert_eq!(
            status.0.and_then(|s| s.code()),
            Some(0),
            "exit status {:?}",
            status.0
        );
        for stream in [&mut finished, &mut queued_finished] {
            let signal = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .unwrap()
                .unwrap();
            let s: String = signal.body().deserialize().unwrap();
            assert_eq!(s, "cancelled");
        }
    });
}

#[test]
fn served_introspection_equals_the_shipped_xml() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let path = generate(
            &conn,
            request_dict(&[("prompt", Value::from("x")), ("steps", Value::U32(1))]),
        )
        .await
        .unwrap();
        let introspect = |p: String| {
            let conn = conn.clone();
            async move {
                let reply = conn
                    .call_method(
                        Some(NAME),
                        p.as_str(),
                        Some("org.freedesktop.DBus.Introspectable"),
                        "Introspect",
                        &(),
                    )
                    .await
                    .unwrap();
                reply.body().deserialize::<String>().unwrap()
            }
        };
        let batch: zbus::zvariant::OwnedObjectPath =
            zbus::Proxy::new(&conn, NAME, PATH, "io.github.Diffusiond1.Manager")
                .await
                .unwrap()
                .call(
                    "SubmitBatch",
                    &(
                        b"{\"prompt\":\"x\",\"steps\":1}\n".to_vec(),
                        std::collections::HashMap::<String, Value<'_>>::new(),
                    ),
                )
                .await
                .unwrap();
        let served = our_interfaces(&format!(
            "{}{}{}",
            introspect(PATH.to_string()).await,
            introspect(path.to_string()).await,
            introspect(batch.to_string()).await
        ));
        let shipped_path = root().join("docs/io.github.Diffusiond1.xml");
        if std::env::var_os("UPDATE_INTROSPECTION_XML").is_some() {
            std::fs::write(&shipped_path, shipped_document(&served)).unwrap();
        }
        let shipped = std::fs::read_to_string(&shipped_path).unwrap();
        assert_eq!(
            our_interfaces(&shipped),
            served,
            "docs/io.github.Diffusiond1.xml is out of date (UPDATE_INTROSPECTION_XML=1 rewrites it)"
        );
    });
}

/// The `<interface name="io.github.Diffusiond1.*">` elements of introspection documents,
/// each once, sorted by name, every line trimmed: a path's introspection may also hold its
/// child nodes' interfaces, in no fixed order.
fn our_interfaces(xml: &str) -> String {
    let mut found = std::collections::BTreeMap::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<interface name=\"io.github.Diffusiond1.") {
        let end = rest[start..]
            .find("</interface>")
            .map(|e| start + e + "</interface>".len())
            .unwrap();
        let element = &rest[start..end];
        let name = element.split('"').nth(1).unwrap_or_default().to_string();
        found.insert(name, indent(element));
        rest = &rest[end..];
    }
    found.into_values().collect()
}

/// An element's lines re-indented by nesting, two spaces a level.
fn indent(element: &str) -> String {
    let mut depth = 0usize;
    let mut out = String::new();
    for line in element.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("</") {
            depth = depth.saturating_sub(1);
        }
        out.push_str(&"  ".repeat(depth));
        out.push_str(line);
        out.push('\n');
        let opens = line.starts_with('<')
            && !line.starts_with("</")
            && !line.starts_with("<!--")
            && !line.ends_with("/>")
            && !line.contains("</");
        if opens {
            depth += 1;
        }
    }
    out
}

fn shipped_document(interfaces: &str) -> String {
    format!(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<!-- diffusiond D-Bus API v1: the Manager (at /io/github/Diffusiond1), Batch (at /io/github/Diffusiond1/batch/N) and Job (at /io/github/Diffusiond1/job/N) interfaces, as served. See docs/dbus-api.md. -->\n<node>\n{interfaces}</node>\n"
    )
}

#[test]
fn output_fds_receive_the_pngs_and_a_slow_reader_does_not_stall_the_worker() {
    use std::io::Read;
    use std::os::fd::OwnedFd;
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let dir = tempfile::tempdir().unwrap();
        let file_path = dir.path().join("out.png");
        let file = std::fs::File::create(&file_path).unwrap();
        // The PNGs are larger than a pipe buffer and nobody reads the pipe yet.
        let (mut reader, writer) = std::io::pipe().unwrap();
        let fds: Vec<zbus::zvariant::Fd<'static>> =
            vec![OwnedFd::from(file).into(), OwnedFd::from(writer).into()];
        let mut req = request_dict(&[
            ("prompt", Value::from("to fds")),
            ("width", Value::U32(512)),
            ("height", Value::U32(512)),
            ("steps", Value::U32(1)),
            ("num_images", Value::U32(2)),
        ]);
        req.insert(
            "output_fds".into(),
            Value::from(fds).try_to_owned().unwrap(),
        );
        let to_fds = generate(&conn, req).await.unwrap();
        // Another job still runs and finishes while that pipe is full.
        let other = generate(
            &conn,
            request_dict(&[("prompt", Value::from("other")), ("steps", Value::U32(1))]),
        )
        .await
        .unwrap();
        let done = tokio::time::timeout(Duration::from_secs(120), wait(&conn, &other)).await;
        assert_eq!(result_pngs(&done.unwrap().unwrap()).len(), 1);
        // Now read the pipe while waiting for the first job.
        let read = tokio::task::spawn_blocking(move || {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes).map(|_| bytes)
        });
        let result = tokio::time::timeout(Duration::from_secs(120), wait(&conn, &to_fds))
            .await
            .unwrap()
            .unwrap();
        assert!(
            result_pngs(&result).is_empty(),
            "images go to the fds, not the reply"
        );
        let from_pipe = read.await.unwrap().unwrap();
        let from_file = std::fs::read(&file_path).unwrap();
        for png in [&from_file, &from_pipe] {
            let img = image::load_from_memory(png).unwrap();
            assert_eq!((img.width(), img.height()), (512, 512));
        }
        assert!(
            from_pipe.len() > 65536,
            "the test needs a PNG larger than a pipe buffer"
        );
    });
}

/// `ListModels` says where each model stands: `unloaded` before its first job, `loaded`
/// after it (`loading`, or `building` with TensorRT, while a load runs).
#[test]
fn list_models_reports_each_models_state() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let states = |list: Vec<Dict>| -> Vec<String> {
            list.iter()
                .map(|m| String::try_from(m["state"].try_clone().unwrap()).unwrap())
                .collect()
        };
        let list: Vec<Dict> = manager(&conn).await.call("ListModels", &()).await.unwrap();
        assert_eq!(states(list), ["unloaded"]);
        let job = generate(
            &conn,
            request_dict(&[("prompt", Value::from("x")), ("steps", Value::U32(1))]),
        )
        .await
        .unwrap();
        wait(&conn, &job).await.unwrap();
        let list: Vec<Dict> = manager(&conn).await.call("ListModels", &()).await.unwrap();
        assert_eq!(states(list), ["loaded"]);
    });
}
