//! What a hostile or careless local caller sends, against a real daemon on a private bus:
//! duplicate keys, absurd guidance, sizes the UNet cannot take, stale job paths after a
//! restart, a pipe nobody reads, a priority it may not have; and non-finite latents in
//! process. Each is refused with a typed error, or ends cleanly, and the daemon serves on.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Daemon, PairsDict, PrivateBus, error_name, generate, request_dict as request, root, rss_kb,
    wait,
};
use zbus::Connection;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};

const NAME: &str = "io.github.Diffusiond1";
const PATH: &str = "/io/github/Diffusiond1";
const MANAGER: &str = "io.github.Diffusiond1.Manager";
const JOB: &str = "io.github.Diffusiond1.Job";

type Dict = HashMap<String, OwnedValue>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn proxy(conn: &Connection, path: &str, iface: &'static str) -> zbus::Proxy<'static> {
    zbus::Proxy::new(conn, NAME, path.to_string(), iface)
        .await
        .unwrap()
}

#[test]
fn duplicate_keys_and_absurd_guidance_are_refused_naming_the_key() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    runtime().block_on(async {
        let conn = bus.connect().await;
        let twice = PairsDict(vec![
            ("prompt".into(), Value::from("x")),
            ("steps".into(), Value::U32(201)),
            ("steps".into(), Value::U32(4)),
        ]);
        let err = proxy(&conn, PATH, MANAGER)
            .await
            .call::<_, _, OwnedObjectPath>("Generate", &(twice,))
            .await
            .unwrap_err();
        assert_eq!(
            error_name(&err),
            "io.github.Diffusiond1.Error.InvalidArgument"
        );
        assert!(
            format!("{err:?}").contains("'steps' is given more than once"),
            "{err:?}"
        );
        for g in [1e20, 1e30, 3e38, -1e20] {
            let err = generate(
                &conn,
                request(&[
                    ("prompt", Value::from("x")),
                    ("guidance_scale", Value::F64(g)),
                ]),
            )
            .await
            .unwrap_err();
            assert_eq!(
                error_name(&err),
                "io.github.Diffusiond1.Error.InvalidArgument"
            );
            let text = format!("{err:?}");
            assert!(
                text.contains("'guidance_scale'") && text.contains("beyond the limit of 100"),
                "{text}"
            );
        }
        // The largest allowed scale still gives a finite image or a typed failure.
        let path = generate(
            &conn,
            request(&[
                ("prompt", Value::from("x")),
                ("steps", Value::U32(2)),
                ("guidance_scale", Value::F64(100.0)),
            ]),
        )
        .await
        .unwrap();
        match wait(&conn, &path).await {
            Ok(result) => assert!(result.contains_key("images")),
            Err(e) => assert_eq!(
                error_name(&e),
                "io.github.Diffusiond1.Error.InferenceFailed"
            ),
        }
    });
}

#[test]
fn a_job_path_from_before_a_restart_names_no_job() {
    let bus = PrivateBus::start();
    let old = {
        let _d = Daemon::start(&bus, "");
        runtime().block_on(async {
            let conn = bus.connect().await;
            let path = generate(
                &conn,
                request(&[("prompt", Value::from("before")), ("steps", Value::U32(1))]),
            )
            .await
            .unwrap();
            wait(&conn, &path).await.unwrap();
            path
        })
    };
    let _d = Daemon::start(&bus, "");
    runtime().block_on(async {
        let conn = bus.connect().await;
        let new = generate(
            &conn,
            request(&[("prompt", Value::from("after")), ("steps", Value::U32(1))]),
        )
        .await
        .unwrap();
        assert_ne!(
            new, old,
            "a restarted daemon gave out an earlier job's path"
        );
        let err = wait(&conn, &old).await.unwrap_err();
        assert!(
            format!("{err:?}").contains("UnknownObject"),
            "a stale path must name no job: {err:?}"
        );
        wait(&conn, &new).await.unwrap();
    });
}

#[test]
fn a_pipe_nobody_reads_keeps_counting_and_cancel_ends_it_within_a_second() {
    use std::os::fd::OwnedFd;
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "[jobs]\njobs_per_caller = 2\n");
    runtime().block_on(async {
        let conn = bus.connect().await;
        let mut stuck = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..2 {
            let (reader, writer) = std::io::pipe().unwrap();
            readers.push(reader);
            let fds: Vec<zbus::zvariant::Fd<'static>> = vec![OwnedFd::from(writer).into()];
            let mut req = request(&[
                ("prompt", Value::from("into a full pipe")),
                ("width", Value::U32(256)),
                ("height", Value::U32(256)),
                ("steps", Value::U32(1)),
            ]);
            req.insert(
                "output_fds".into(),
                Value::from(fds).try_to_owned().unwrap(),
            );
            stuck.push(generate(&conn, req).await.unwrap());
        }
        // Both jobs are generated, and stuck on their pipes: they still count.
        let manager = proxy(&conn, PATH, MANAGER).await;
        let t0 = Instant::now();
        loop {
            let step: u32 = proxy(&conn, stuck[1].as_str(), JOB)
                .await
                .get_property("Step")
                .await
                .unwrap();
            if step == 1 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(60));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(manager.get_property::<u32>("QueueLength").await.unwrap(), 2);
        let err = generate(
            &conn,
            request(&[("prompt", Value::from("third")), ("steps", Value::U32(1))]),
        )
        .await
        .unwrap_err();
        assert_eq!(error_name(&err), "io.github.Diffusiond1.Error.QueueFull");
        // Cancel ends a stuck job within a second.
        for path in &stuck {
            let t0 = Instant::now();
            let job = proxy(&conn, path.as_str(), JOB).await;
            job.call::<_, _, ()>("Cancel", &()).await.unwrap();
            let err = wait(&conn, path).await.unwrap_err();
            assert_eq!(error_name(&err), "io.github.Diffusiond1.Error.Cancelled");
            assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        }
        assert_eq!(manager.get_property::<u32>("QueueLength").await.unwrap(), 0);
        drop(readers);
        let path = generate(
            &conn,
            request(&[
                ("prompt", Value::from("still serving")),
                ("steps", Value::U32(1)),
            ]),
        )
        .await
        .unwrap();
        wait(&conn, &path).await.unwrap();
    });
}

#[test]
fn only_privileged_callers_may_raise_their_priority() {
    if !common::other_uids_or_skip() {
        return;
    }
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    bus.open_to_everyone();
    let call = |uid: Option<u32>, priority: i32| {
        let mut c = match uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "--",
                    "gdbus",
                ]);
                c
            }
            None => Command::new("gdbus"),
        };
        c.args(["call", "-a", bus.address(), "-d", NAME, "-o", PATH, "-m"])
            .arg(format!("{MANAGER}.Generate"))
            .arg(format!(
                "{{'prompt': <'p'>, 'steps': <uint32 1>, 'priority': <int32 {priority}>}}"
            ))
            .env("HOME", "/nonexistent")
            .output()
            .unwrap()
    };
    let nobody = 65534;
    let o = call(Some(nobody), 5);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "uid {nobody} raised its priority");
    assert!(
        err.contains("io.github.Diffusiond1.Error.AccessDenied") && err.contains("'priority'"),
        "{err}"
    );
    for priority in [0, -3] {
        let o = call(Some(nobody), priority);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let o = call(None, 5);
    assert!(
        o.status.success(),
        "root: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn non_finite_latents_fail_instead_of_giving_a_black_image() {
    let dir = tempfile::tempdir().unwrap();
    let latents = dir.path().join("nan.npy");
    let mut a = ndarray::Array4::<f32>::zeros((1, 4, 8, 8));
    a[[0, 1, 2, 3]] = f32::NAN;
    ndarray_npy::write_npy(&latents, &a).unwrap();
    let out = dir.path().join("x.png");
    let model = root().join("onnx/tiny-sd15");
    let o = Command::new(env!("CARGO_BIN_EXE_diffusionctl"))
        .args(["generate", "--local", "--model-dir"])
        .arg(&model)
        .args([
            "--prompt",
            "p",
            "--steps",
            "3",
            "--scheduler",
            "ddim",
            "--latents",
        ])
        .arg(&latents)
        .arg("--output")
        .arg(&out)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "NaN latents gave an image");
    assert!(
        err.contains("denoise step 1 of 3: produced non-finite values"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Calls whose arguments do not match the method are refused, and the daemon serves on.
/// zbus decodes the arguments before our method runs, so these errors carry zbus's name
/// (org.freedesktop.zbus.Error), one of the few documented in docs/dbus-api.md.
#[test]
fn calls_with_extra_or_wrong_arguments_are_refused() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "");
    runtime().block_on(async {
        let conn = bus.connect().await;
        let manager = proxy(&conn, PATH, MANAGER).await;
        let err = manager
            .call::<_, _, Vec<Dict>>("ListModels", &("x",))
            .await
            .unwrap_err();
        assert_eq!(error_name(&err), "org.freedesktop.zbus.Error", "{err:?}");
        let err = manager
            .call::<_, _, ()>("UnloadModel", &("tiny", "extra"))
            .await
            .unwrap_err();
        assert!(matches!(err, zbus::Error::MethodError(..)), "{err:?}");
        let err = manager
            .call::<_, _, OwnedObjectPath>("Generate", &("a prompt as a string",))
            .await
            .unwrap_err();
        assert!(matches!(err, zbus::Error::MethodError(..)), "{err:?}");
        let list: Vec<Dict> = manager.call("ListModels", &()).await.unwrap();
        assert_eq!(list.len(), 1);
    });
}

/// Asks for `side`² in one step, returns the error (if any).
async fn square(conn: &Connection, side: u32) -> Option<zbus::Error> {
    square_steps(conn, side, 1).await
}

/// A `side`² request of `steps` steps.
fn square_request(side: u32, steps: u32) -> HashMap<String, OwnedValue> {
    request(&[
        ("prompt", Value::from("a big one")),
        ("width", Value::U32(side)),
        ("height", Value::U32(side)),
        ("steps", Value::U32(steps)),
    ])
}

/// Asks for `side`² in `steps` steps, returns the error (if any).
async fn square_steps(conn: &Connection, side: u32, steps: u32) -> Option<zbus::Error> {
    match generate(conn, square_request(side, steps)).await {
        Ok(path) => wait(conn, &path).await.err(),
        Err(e) => Some(e),
    }
}

/// The side a TooLarge message says fits (`at most SxS fits`).
fn suggested_side(err: &zbus::Error) -> u32 {
    let text = format!("{err:?}");
    let at = text.find("at most ").expect("names what fits") + "at most ".len();
    text[at..].split('x').next().unwrap().parse().unwrap()
}

#[test]
fn a_request_over_the_memory_budget_is_refused_and_memory_comes_back_after_a_large_one() {
    let bus = PrivateBus::start();
    let d = Daemon::start_with_config(
        &bus,
        &common::config_with_model_keys(
            "max_width = 4096\nmax_height = 4096",
            "[limits]\nmax_width = 4096\nmax_height = 4096\nmax_pixels = 16777216\nmemory_budget = 1073741824\n",
        ),
    );
    runtime().block_on(async {
        let conn = bus.connect().await;
        assert!(square(&conn, 64).await.is_none());
        let baseline = rss_kb(d.pid());
        let err = square(&conn, 1024)
            .await
            .expect("1024² is over a 1 GiB budget");
        assert_eq!(error_name(&err), "io.github.Diffusiond1.Error.TooLarge");
        let text = format!("{err:?}");
        assert!(
            text.contains("1024x1024 with 1 image(s) needs about"),
            "{text}"
        );
        let side = suggested_side(&err);
        assert!((256..1024).contains(&side), "{text}");
        // What it names as fitting runs, and the memory it took is handed back.
        assert!(square(&conn, side).await.is_none(), "{side}² failed");
        let after = rss_kb(d.pid());
        assert!(
            after < baseline + 150 * 1024,
            "RSS {baseline} kB before, {after} kB after a {side}² job"
        );
    });
}

/// In a memory cgroup (cgroup v1 here), the daemon derives its budget from the limit and
/// refuses what would get it killed, instead of dying with the jobs of every caller.
#[test]
fn in_a_memory_cgroup_the_daemon_refuses_what_would_kill_it() {
    let Some(cgroup) = common::cgroup::cgroup_or_skip(3 << 29) else {
        return;
    };
    let bus = PrivateBus::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("d.toml");
    std::fs::write(
        &config,
        common::config_with_model_keys(
            "max_width = 4096\nmax_height = 4096",
            "[limits]\nmax_width = 4096\nmax_height = 4096\nmax_pixels = 16777216\n",
        ),
    )
    .unwrap();
    let mut daemon = common::cgroup::CgroupDaemon::start(&cgroup, &bus, &config);
    runtime().block_on(async {
        let conn = bus.connect().await;
        // 768² needs about 6 GiB: it fits this machine, not the cgroup, which would kill
        // the daemon (and every caller's jobs) if it ran.
        let err = square(&conn, 768)
            .await
            .expect("768² needs more than 1.5 GiB");
        assert_eq!(
            error_name(&err),
            "io.github.Diffusiond1.Error.TooLarge",
            "{err:?}"
        );
        assert!(
            format!("{err:?}").contains("the memory budget of 1.3 GiB"),
            "the budget comes from the cgroup: 1.5 GiB less a tenth: {err:?}"
        );
        let side = suggested_side(&err);
        assert!(square(&conn, side).await.is_none(), "{side}² failed");
    });
    assert!(daemon.alive(), "the daemon was killed");
}

/// The config of a daemon that allows large sizes (4096² at most), with `extra` appended.
fn large_sizes_config(extra: &str) -> String {
    common::config_with_model_keys(
        "max_width = 4096\nmax_height = 4096",
        &format!("[limits]\nmax_width = 4096\nmax_height = 4096\nmax_pixels = 16777216\n{extra}"),
    )
}

/// The model's `state` in `ListModels` (`loaded`, `unloaded`, ...).
async fn model_state(conn: &Connection) -> String {
    let list: Vec<Dict> = proxy(conn, PATH, MANAGER)
        .await
        .call("ListModels", &())
        .await
        .unwrap();
    String::try_from(list[0]["state"].try_clone().unwrap()).unwrap()
}

/// ONNX Runtime's first run of a session at a shape has no memory pattern yet: left alone,
/// its buffers and the pattern's block of the next step together doubled the peak of the
/// first large job after a load (4.52 GB against 2.36 GB at 512² on tiny-demo). In a 3 GiB
/// cgroup the largest size the budget admits must run as the first job after start, and
/// again as the first after an idle unload, without the daemon being killed.
#[test]
fn the_first_large_job_after_a_load_stays_within_the_budget_that_admitted_it() {
    let Some(cgroup) = common::cgroup::cgroup_or_skip(3 << 30) else {
        return;
    };
    let bus = PrivateBus::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("d.toml");
    std::fs::write(
        &config,
        large_sizes_config("[jobs]\nidle_unload_secs = 2\n"),
    )
    .unwrap();
    let mut daemon = common::cgroup::CgroupDaemon::start(&cgroup, &bus, &config);
    runtime().block_on(async {
        let conn = bus.connect().await;
        let err = square(&conn, 2048)
            .await
            .expect("2048² needs more than 3 GiB");
        assert_eq!(error_name(&err), "io.github.Diffusiond1.Error.TooLarge");
        assert!(
            format!("{err:?}").contains("the memory budget of 2.7 GiB"),
            "the budget comes from the cgroup: 3 GiB less a tenth: {err:?}"
        );
        let side = suggested_side(&err);
        assert!(side >= 512, "{err:?}");
        // Two steps: the second is the first with a memory pattern.
        assert_eq!(model_state(&conn).await, "unloaded");
        let first = square_steps(&conn, side, 3).await;
        assert!(first.is_none(), "{side}² as the first job: {first:?}");
        assert!(daemon.alive(), "the first {side}² job killed the daemon");
        let t0 = Instant::now();
        while model_state(&conn).await != "unloaded" {
            assert!(t0.elapsed() < Duration::from_secs(30), "no idle unload");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let again = square_steps(&conn, side, 3).await;
        assert!(again.is_none(), "{side}² after an idle unload: {again:?}");
    });
    assert!(daemon.alive(), "the daemon was killed");
}

/// Polls the daemon's RSS until it is under `limit_kb` (or 30 s pass); returns the last.
async fn rss_comes_under(pid: u32, limit_kb: u64) -> u64 {
    let t0 = Instant::now();
    loop {
        let rss = rss_kb(pid);
        if rss < limit_kb || t0.elapsed() > Duration::from_secs(30) {
            return rss;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the job at `path` has run `step` steps.
async fn wait_for_step(conn: &Connection, path: &OwnedObjectPath, step: u32) {
    let job = proxy(conn, path.as_str(), JOB).await;
    let t0 = Instant::now();
    while job.get_property::<u32>("Step").await.unwrap() < step {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step {step}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A completed large job hands its memory back (the test above); a cancelled one, and one
/// whose caller left the bus, must too, and keep it back after a later small job. They
/// stop before the last step, whose run used to be the only one that shrank ONNX Runtime's
/// arena: a cancelled 512² job left 2.29 GB held.
#[test]
fn memory_comes_back_after_a_cancelled_large_job_and_one_whose_caller_left() {
    let bus = PrivateBus::start();
    let d = Daemon::start_with_config(&bus, &large_sizes_config("memory_budget = 1073741824\n"));
    runtime().block_on(async {
        let conn = bus.connect().await;
        assert!(square(&conn, 64).await.is_none());
        let baseline = rss_kb(d.pid());
        let limit = baseline + 150 * 1024;
        let side = suggested_side(&square(&conn, 1024).await.expect("over 1 GiB"));
        assert!((256..1024).contains(&side), "{side}");

        // Cancelled while its third step runs.
        let path = generate(&conn, square_request(side, 40)).await.unwrap();
        wait_for_step(&conn, &path, 2).await;
        let during = rss_kb(d.pid());
        assert!(during > limit, "a {side}² job took only {during} kB");
        let job = proxy(&conn, path.as_str(), JOB).await;
        job.call::<_, _, ()>("Cancel", &()).await.unwrap();
        let err = wait(&conn, &path).await.unwrap_err();
        assert_eq!(error_name(&err), "io.github.Diffusiond1.Error.Cancelled");
        let after = rss_comes_under(d.pid(), limit).await;
        assert!(
            after < limit,
            "RSS {baseline} kB before, {during} kB during, {after} kB after a cancelled {side}² job"
        );
        assert!(square(&conn, 64).await.is_none());
        let later = rss_kb(d.pid());
        assert!(later < limit, "{later} kB after a small job");

        // Its caller leaves the bus during the third step: the job is cancelled.
        let leaving = bus.connect().await;
        let path = generate(&leaving, square_request(side, 40)).await.unwrap();
        wait_for_step(&conn, &path, 2).await;
        let during = rss_kb(d.pid());
        assert!(during > limit, "a {side}² job took only {during} kB");
        leaving.close().await.unwrap();
        let after = rss_comes_under(d.pid(), limit).await;
        let state: String = proxy(&conn, path.as_str(), JOB)
            .await
            .get_property("State")
            .await
            .unwrap();
        assert_eq!(state, "cancelled");
        assert!(
            after < limit,
            "RSS {baseline} kB before, {during} kB during, {after} kB after a {side}² job whose caller left"
        );
    });
}
