//! The `keep_alive` request key on a private bus: a model stays loaded as long as its last
//! job said and not longer (ListModels `loaded` and `expires_in`), `0` unloads it after the
//! job, `-1` keeps it, and a caller other than root and the service user is held to
//! `jobs.max_keep_alive_secs`.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Daemon, PrivateBus, error_name, generate, request_dict, wait};
use zbus::zvariant::{OwnedValue, Value};

/// `ListModels`' entry for `tiny`.
async fn tiny(conn: &zbus::Connection) -> HashMap<String, OwnedValue> {
    let models: Vec<HashMap<String, OwnedValue>> = zbus::Proxy::new(
        conn,
        "io.github.Diffusiond1",
        "/io/github/Diffusiond1",
        "io.github.Diffusiond1.Manager",
    )
    .await
    .unwrap()
    .call("ListModels", &())
    .await
    .unwrap();
    models
        .into_iter()
        .find(|m| <&str>::try_from(&m["name"]).unwrap() == "tiny")
        .unwrap()
}

fn loaded(m: &HashMap<String, OwnedValue>) -> bool {
    bool::try_from(&m["loaded"]).unwrap()
}

fn expires_in(m: &HashMap<String, OwnedValue>) -> Option<f64> {
    m.get("expires_in").map(|v| f64::try_from(v).unwrap())
}

/// Runs one 2-step job with `keep_alive` (when given) and waits for it.
async fn job(conn: &zbus::Connection, keep_alive: Option<f64>) {
    let mut pairs = vec![("prompt", Value::from("a cat")), ("steps", Value::U32(2))];
    if let Some(k) = keep_alive {
        pairs.push(("keep_alive", Value::F64(k)));
    }
    let path = generate(conn, request_dict(&pairs)).await.unwrap();
    wait(conn, &path).await.unwrap();
}

#[test]
fn a_model_unloads_when_keep_alive_says_and_not_before() {
    let bus = PrivateBus::start();
    let _d = Daemon::start(
        &bus,
        "[jobs]\nidle_unload_secs = 600\nmax_keep_alive_secs = 5\n",
    );
    common::tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let m = tiny(&conn).await;
        assert!(!loaded(&m) && expires_in(&m).is_none() && !m.contains_key("memory_bytes"));

        // No key: the default idle time.
        job(&conn, None).await;
        let m = tiny(&conn).await;
        assert!(loaded(&m));
        let left = expires_in(&m).unwrap();
        assert!((590.0..=600.0).contains(&left), "{left}");
        assert!(u64::try_from(&m["memory_bytes"]).unwrap() > 0);

        // 3 s: still loaded after 2 s, unloaded within about a second after 3 s.
        job(&conn, Some(3.0)).await;
        let ended = Instant::now();
        let left = expires_in(&tiny(&conn).await).unwrap();
        assert!(left > 2.0 && left <= 3.0, "{left}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(loaded(&tiny(&conn).await), "unloaded before keep_alive");
        loop {
            if !loaded(&tiny(&conn).await) {
                break;
            }
            assert!(ended.elapsed() < Duration::from_secs(5), "still loaded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ended.elapsed() >= Duration::from_millis(2900));
        assert!(expires_in(&tiny(&conn).await).is_none());

        // 0: unloaded right after the job.
        job(&conn, Some(0.0)).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        while loaded(&tiny(&conn).await) {
            assert!(
                Instant::now() < deadline,
                "keep_alive 0 left the model loaded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // -1: kept (root is not held to max_keep_alive_secs).
        job(&conn, Some(-1.0)).await;
        let m = tiny(&conn).await;
        assert!(loaded(&m));
        assert_eq!(expires_in(&m), Some(-1.0));

        // diffusionctl's --keep-alive sends the key: 0 unloads the model after the job.
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("out.png");
        let ctl = common::ctl_command(&[
            "generate",
            "--address",
            bus.address(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--keep-alive",
            "0",
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
        assert!(
            ctl.status.success(),
            "{}",
            String::from_utf8_lossy(&ctl.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        while loaded(&tiny(&conn).await) {
            assert!(
                Instant::now() < deadline,
                "--keep-alive 0 left the model loaded"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Neither -1 nor seconds: refused, naming the key.
        let err = generate(
            &conn,
            request_dict(&[
                ("prompt", Value::from("x")),
                ("keep_alive", Value::F64(-2.0)),
            ]),
        )
        .await
        .unwrap_err();
        assert_eq!(
            error_name(&err),
            "io.github.Diffusiond1.Error.InvalidArgument"
        );
        assert!(format!("{err:?}").contains("'keep_alive'"), "{err:?}");
    });
}

#[test]
fn other_callers_are_held_to_max_keep_alive_secs() {
    if !common::other_uids_or_skip() {
        return;
    }
    let bus = PrivateBus::start();
    let _d = Daemon::start(
        &bus,
        "[jobs]\nidle_unload_secs = 600\nmax_keep_alive_secs = 5\n",
    );
    bus.open_to_everyone();
    let out = common::gdbus_as_nobody(
        bus.address(),
        "/io/github/Diffusiond1",
        "io.github.Diffusiond1.Manager.Generate",
    )
    .arg("{'prompt': <'p'>, 'steps': <uint32 2>, 'keep_alive': <-1.0>, 'cancel_on_disconnect': <false>}")
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let path = text
        .split('\'')
        .find(|s| s.starts_with("/io/github/Diffusiond1/job/"))
        .unwrap_or_else(|| panic!("no job path in {text}"))
        .to_string();
    common::tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let path = zbus::zvariant::OwnedObjectPath::try_from(path).unwrap();
        wait(&conn, &path).await.unwrap();
        let m = tiny(&conn).await;
        assert!(loaded(&m));
        let left = expires_in(&m).unwrap();
        assert!(left > 0.0 && left <= 5.0, "capped at 5 s: {left}");
    });
}
