//! `diffusionctl batch` through a real diffusiond on a private bus: the client SIGKILLed
//! mid-batch, then the daemon SIGKILLed mid-batch and restarted (it resumes by itself),
//! then the client rerun: every image once, each equal to `generate --local`'s, one
//! batch only, and a third run does nothing. Also: detach, status, cancel; line-numbered
//! errors from the daemon; interactive jobs ahead of batch items; other users kept out.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::batch::{
    TestItem, all_files, assert_matches_references, identities, items, kill9, leftovers, pngs,
    references, wait_for_pngs, write_manifest,
};
use common::{Daemon, PrivateBus, config_text, ctl_command};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn config(state: &Path) -> String {
    config_text(&format!(
        "[jobs]\nstate_dir = \"{}\"\nmax_batch_images = 4\n",
        state.display()
    ))
}

fn batch_cmd(bus: &PrivateBus, manifest: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut args = vec![
        "batch".to_string(),
        manifest.display().to_string(),
        "--output-dir".into(),
        out.display().to_string(),
        "--address".into(),
        bus.address().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    ctl_command(&argv)
}

fn ctl(bus: &PrivateBus, args: &[&str]) -> Output {
    let mut argv = args.to_vec();
    argv.extend(["--address", bus.address()]);
    ctl_command(&argv).output().unwrap()
}

/// A test folder with an `n`-item manifest of `steps` steps in it, a private bus, and a
/// daemon whose batch state is in the folder.
/// Bind `dir`, `bus` and `daemon` when destructuring: a field left to `..` is dropped at
/// once (the folder deleted, the daemon killed).
struct Fixture {
    dir: tempfile::TempDir,
    state: PathBuf,
    items: Vec<TestItem>,
    manifest: PathBuf,
    out: PathBuf,
    bus: PrivateBus,
    daemon: Daemon,
}

fn fixture(n: usize, steps: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let items = items(n, steps);
    let manifest = write_manifest(dir.path(), &items);
    let out = dir.path().join("out");
    let bus = PrivateBus::start();
    let daemon = Daemon::start_with_config(&bus, &config(&state));
    Fixture {
        dir,
        state,
        items,
        manifest,
        out,
        bus,
        daemon,
    }
}

/// The folder of the one batch in the daemon's state directory.
fn batch_dir(state: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(state.join("batches"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(dirs.len(), 1, "one batch: {dirs:?}");
    dirs[0].clone()
}

fn wait_for_batch_dir(state: &Path) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(d) = std::fs::read_dir(state.join("batches"))
            && d.filter_map(|e| e.ok())
                .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
        {
            return batch_dir(state);
        }
        assert!(Instant::now() < deadline, "no batch folder");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn client_and_daemon_killed_mid_batch_lose_nothing_and_make_nothing_twice() {
    let Fixture {
        dir,
        state,
        items,
        manifest,
        out,
        bus,
        mut daemon,
    } = fixture(14, 16);
    let total = all_files(&items).len();

    // The client is killed once it has copied an image; the batch goes on in the daemon.
    let mut client = batch_cmd(&bus, &manifest, &out, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_pngs(&out, 1, Some(&mut client), Duration::from_secs(120));
    kill9(&mut client);
    let in_daemon = wait_for_batch_dir(&state);
    let copied = pngs(&out).len();
    wait_for_pngs(&in_daemon, copied + 2, None, Duration::from_secs(120));

    // The daemon is killed mid-batch.
    daemon
        .signal_and_wait("-9", Duration::from_secs(10))
        .unwrap();
    let made = pngs(&in_daemon);
    assert!(
        made.len() < total,
        "the batch finished before the daemon was killed; make it longer"
    );
    let kept = identities(&in_daemon, &made);

    // Restarted, it resumes the batch by itself, with no client attached.
    let _daemon = Daemon::start_with_config(&bus, &config(&state));
    wait_for_pngs(&in_daemon, made.len() + 1, None, Duration::from_secs(120));

    // The rerun client reattaches and copies what is missing.
    let o = batch_cmd(&bus, &manifest, &out, &[]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(pngs(&out), all_files(&items));
    assert_eq!(pngs(&in_daemon), all_files(&items));
    assert_eq!(
        identities(&in_daemon, &made),
        kept,
        "images the daemon wrote before it died were not made again"
    );
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
    assert!(leftovers(&state).is_empty(), "{:?}", leftovers(&state));
    let refs = references(&dir.path().join("refs"), &items);
    assert_matches_references(&out, &refs);

    // One batch, never a second; listed with its disk use.
    let o = ctl(&bus, &["batch", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("1 batches"), "{}", text(&o));
    assert!(text(&o).contains("succeeded"), "{}", text(&o));

    // A third run does nothing.
    let all = identities(&out, &all_files(&items));
    let o = batch_cmd(&bus, &manifest, &out, &[]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("already complete"), "{}", text(&o));
    assert_eq!(identities(&out, &all_files(&items)), all);
}

#[test]
fn detach_status_and_cancel() {
    let Fixture {
        dir: _dir,
        items,
        manifest,
        out,
        bus,
        daemon: _daemon,
        ..
    } = fixture(12, 16);
    let o = batch_cmd(&bus, &manifest, &out, &["--detach"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(id.parse::<u64>().is_ok(), "{}", text(&o));
    assert!(pngs(&out).is_empty(), "--detach copies nothing");

    let o = ctl(&bus, &["batch", "status", &id]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("batch {id}: running")),
        "{}",
        text(&o)
    );

    let o = ctl(&bus, &["batch", "cancel", &id]);
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = ctl(&bus, &["batch", "status", &id]);
        if text(&o).contains("cancelled") {
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: {}", text(&o));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Rerunning a cancelled batch does not restart it; --restart does, as a new batch.
    let o = batch_cmd(&bus, &manifest, &out, &[]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("cancelled"), "{}", text(&o));
    let o = batch_cmd(&bus, &manifest, &out, &["--restart"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(pngs(&out), all_files(&items));
    let o = ctl(&bus, &["batch", "list"]);
    assert!(
        text(&o).contains("1 batches"),
        "the cancelled one was removed: {}",
        text(&o)
    );

    let o = ctl(&bus, &["batch", "status", "999"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no such batch"), "{}", text(&o));
}

#[test]
fn the_daemon_checks_every_line_against_its_models() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = dir.path().join("m.jsonl");
    std::fs::write(
        &manifest,
        [
            r#"{"prompt":"fine","steps":2,"width":64,"height":64}"#,
            r#"{"prompt":"x","width":65}"#,
            r#"{"prompt":"y","model":"nope"}"#,
            r#"{"prompt":"z","steps":100000}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let bus = PrivateBus::start();
    let _daemon = Daemon::start_with_config(&bus, &config(&state));
    let o = batch_cmd(&bus, &manifest, &dir.path().join("out"), &[])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    for needle in [
        "InvalidManifest: the manifest has 3 error(s); nothing was run",
        "line 2: 'width': 65 is not a multiple of",
        "line 3: 'model': unknown model 'nope'",
        "line 4: 'steps':",
    ] {
        assert!(t.contains(needle), "missing {needle:?} in:\n{t}");
    }
    let o = ctl(&bus, &["batch", "list"]);
    assert!(text(&o).contains("0 batches"), "{}", text(&o));
}

/// Interactive `generate` while a batch runs: it runs ahead of the batch's items (it ends
/// while most of the batch is still to do). Its latency beside an idle daemon's is
/// printed; docs/benchmarks.md reports a measured run.
#[test]
fn interactive_jobs_run_ahead_of_batch_items() {
    let Fixture {
        dir,
        state,
        items,
        manifest,
        bus,
        daemon: _daemon,
        ..
    } = fixture(40, 16);
    let generate = |name: &str| {
        let t0 = Instant::now();
        let o = ctl(
            &bus,
            &[
                "generate",
                "--prompt",
                "a boat",
                "--steps",
                "16",
                "--width",
                "64",
                "--height",
                "64",
                "--seed",
                "5",
                "--output",
                dir.path().join(name).to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
        t0.elapsed()
    };
    generate("warm-up.png");
    let idle = generate("idle.png");
    let o = batch_cmd(&bus, &manifest, &dir.path().join("out"), &["--detach"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let in_daemon = wait_for_batch_dir(&state);
    wait_for_pngs(&in_daemon, 1, None, Duration::from_secs(60));
    let busy = generate("busy.png");
    let done_then = pngs(&in_daemon).len();
    let total = all_files(&items).len();
    eprintln!(
        "interactive latency: idle {:.3} s, during a batch {:.3} s ({done_then}/{total} batch images done when it returned)",
        idle.as_secs_f64(),
        busy.as_secs_f64()
    );
    assert!(
        done_then < total / 2,
        "the interactive job waited for the batch: {done_then}/{total} done"
    );
    assert_eq!(
        common::batch::rgb(&dir.path().join("idle.png")),
        common::batch::rgb(&dir.path().join("busy.png"))
    );
    let o = ctl(&bus, &["batch", "cancel", &id]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn other_users_cannot_use_a_batch() {
    if !common::other_uids_or_skip() {
        return;
    }
    let Fixture {
        dir: _dir,
        manifest,
        out,
        bus,
        daemon: _daemon,
        ..
    } = fixture(2, 2);
    bus.open_to_everyone();
    let o = batch_cmd(&bus, &manifest, &out, &[]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let path = std::fs::read_to_string(out.join(".diffusiond/daemon-0-of-1.json")).unwrap();
    let path: serde_json::Value = serde_json::from_str(&path).unwrap();
    let path = path["batch"].as_str().unwrap().to_string();
    let nobody = |method: &str, args: &[&str]| {
        let method = format!("io.github.Diffusiond1.Batch.{method}");
        common::gdbus_as_nobody(bus.address(), &path, &method)
            .args(args)
            .output()
            .unwrap()
    };
    for (method, args) in [
        ("OpenResult", vec!["00000.png"]),
        ("ListResults", vec![]),
        ("Cancel", vec![]),
        ("Remove", vec![]),
    ] {
        let o = nobody(method, &args);
        assert!(!o.status.success(), "{method} as nobody succeeded");
        assert!(
            text(&o).contains("io.github.Diffusiond1.Error.AccessDenied"),
            "{method}: {}",
            text(&o)
        );
    }
    // The owner may, by file or by item name; a file that is not a result is refused.
    for name in ["00000.png", "named"] {
        let o = Command::new("gdbus")
            .args([
                "call",
                "-a",
                bus.address(),
                "-d",
                "io.github.Diffusiond1",
                "-o",
                &path,
            ])
            .args(["-m", "io.github.Diffusiond1.Batch.OpenResult", name])
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(text(&o).contains("handle"), "{name}: {}", text(&o));
    }
    let o = Command::new("gdbus")
        .args([
            "call",
            "-a",
            bus.address(),
            "-d",
            "io.github.Diffusiond1",
            "-o",
            &path,
        ])
        .args([
            "-m",
            "io.github.Diffusiond1.Batch.OpenResult",
            "../batches.sqlite",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("no finished file"), "{}", text(&o));
}

/// A model that fails to load fails its items with the reason; the other model's items
/// go on, and the batch ends `failed` with the failures listed.
#[test]
fn items_of_a_model_that_fails_to_load_fail_and_the_rest_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // A copy of the tiny model, opened and checked at start, then damaged before it loads.
    let broken = dir.path().join("broken");
    let copied = Command::new("cp")
        .arg("-r")
        .arg(common::batch::tiny())
        .arg(&broken)
        .status()
        .unwrap();
    assert!(copied.success());
    let text_config = config_text(&format!(
        "[models.broken]\npath = \"{}\"\n\n[jobs]\nstate_dir = \"{}\"\n",
        broken.display(),
        state.display()
    ));
    let bus = PrivateBus::start();
    let _daemon = Daemon::start_with_config(&bus, &text_config);
    std::fs::write(broken.join("unet/model.onnx"), b"not a graph").unwrap();
    let manifest = dir.path().join("m.jsonl");
    let line = |name: &str, model: &str| {
        format!(
            r#"{{"prompt":"p","name":"{name}","model":"{model}","steps":2,"width":64,"height":64}}"#
        )
    };
    std::fs::write(
        &manifest,
        [line("a", "tiny"), line("b", "broken"), line("c", "tiny")].join("\n"),
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = batch_cmd(&bus, &manifest, &out, &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("b: failed: model 'broken' failed to load"),
        "{t}"
    );
    assert!(t.contains("1 of 3 items failed"), "{t}");
    assert_eq!(pngs(&out), ["a.png", "c.png"]);
}

/// Ctrl-C on an attached client detaches: the batch goes on in the daemon, and the same
/// command later fetches what is left.
#[test]
fn ctrl_c_detaches_without_cancelling() {
    let Fixture {
        dir: _dir,
        state,
        items,
        manifest,
        out,
        bus,
        daemon: _daemon,
        ..
    } = fixture(12, 16);
    let mut client = batch_cmd(&bus, &manifest, &out, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_pngs(&out, 1, Some(&mut client), Duration::from_secs(120));
    let _ = Command::new("kill")
        .args(["-INT", &client.id().to_string()])
        .status();
    let o = client.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(text(&o).contains("detached"), "{}", text(&o));
    assert!(text(&o).contains("not cancelled"), "{}", text(&o));
    // The daemon finishes the batch with nobody attached; the rerun fetches the rest.
    let in_daemon = wait_for_batch_dir(&state);
    wait_for_pngs(
        &in_daemon,
        all_files(&items).len(),
        None,
        Duration::from_secs(120),
    );
    let o = batch_cmd(&bus, &manifest, &out, &[]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(pngs(&out), all_files(&items));
}

fn gdbus_batch(bus: &PrivateBus, path: &str, method: &str, args: &[&str]) -> Output {
    Command::new("gdbus")
        .args(["call", "-a", bus.address(), "-d", "io.github.Diffusiond1"])
        .args(["-o", path, "-m"])
        .arg(format!("io.github.Diffusiond1.Batch.{method}"))
        .args(args)
        .output()
        .unwrap()
}

/// `OpenResult` never follows a symlink: a finished file replaced by a link to another
/// file is refused, not opened; a 100,000-character name comes back in the error cut
/// short.
#[test]
fn open_result_refuses_symlinks_and_bounds_echoed_names() {
    let Fixture {
        dir,
        state,
        manifest,
        out,
        bus,
        daemon: _daemon,
        ..
    } = fixture(1, 1);
    let o = batch_cmd(&bus, &manifest, &out, &[]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let path = std::fs::read_to_string(out.join(".diffusiond/daemon-0-of-1.json")).unwrap();
    let path: serde_json::Value = serde_json::from_str(&path).unwrap();
    let path = path["batch"].as_str().unwrap().to_string();
    let o = gdbus_batch(&bus, &path, "OpenResult", &["00000.png"]);
    assert!(o.status.success(), "{}", text(&o));

    // The finished file swapped for a link to a file the daemon may read.
    let secret = dir.path().join("secret.png");
    std::fs::write(&secret, b"not a result").unwrap();
    let file = batch_dir(&state).join("00000.png");
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(&secret, &file).unwrap();
    let o = gdbus_batch(&bus, &path, "OpenResult", &["00000.png"]);
    assert!(!o.status.success(), "a symlink was opened: {}", text(&o));
    assert!(
        text(&o).contains("io.github.Diffusiond1.Error.StorageFailed")
            && text(&o).contains("symlink"),
        "{}",
        text(&o)
    );

    let long = "a".repeat(100_000);
    let o = gdbus_batch(&bus, &path, "OpenResult", &[&long]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("no finished file"), "{}", &t[..t.len().min(500)]);
    assert!(t.len() < 1000, "{} bytes echoed", t.len());
}

/// A daemon batch whose shard selects no item (3/4 of a one-line manifest) is refused with
/// an error saying so, by the client and by the daemon asked directly; no batch is stored.
#[test]
fn a_shard_that_selects_no_item_is_refused() {
    let Fixture {
        dir: _dir,
        manifest,
        out,
        bus,
        daemon: _daemon,
        ..
    } = fixture(1, 1);
    let o = batch_cmd(&bus, &manifest, &out, &["--shard", "3/4"])
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("shard 3/4 selects none of the manifest's 1 item(s)"),
        "{}",
        text(&o)
    );
    common::tokio_runtime().block_on(async {
        let conn = bus.connect().await;
        let manager = zbus::Proxy::new(
            &conn,
            "io.github.Diffusiond1",
            "/io/github/Diffusiond1",
            "io.github.Diffusiond1.Manager",
        )
        .await
        .unwrap();
        let options = common::request_dict(&[("shard", zbus::zvariant::Value::from("3/4"))]);
        let bytes = std::fs::read(&manifest).unwrap();
        let err = manager
            .call::<_, _, zbus::zvariant::OwnedObjectPath>("SubmitBatch", &(bytes, options))
            .await
            .unwrap_err();
        assert_eq!(
            common::error_name(&err),
            "io.github.Diffusiond1.Error.InvalidManifest"
        );
        assert!(err.to_string().contains("shard 3/4 selects none"), "{err}");
    });

    let o = ctl(&bus, &["batch", "list"]);
    assert!(text(&o).contains("0 batches"), "{}", text(&o));
}

/// A client following a batch learns that it ended from the state change alone: cancelled
/// from another connection, no item reports after the client's last look. (The client's
/// state stream yielded nothing, so it waited for an item signal that never came.)
#[test]
fn a_following_client_sees_a_cancel_made_elsewhere() {
    let Fixture {
        dir: _dir,
        manifest,
        out,
        bus,
        daemon: _daemon,
        ..
    } = fixture(40, 16);
    let o = batch_cmd(&bus, &manifest, &out, &["--detach"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    // Reattach: this client follows the running batch and copies what it makes.
    let mut follower = batch_cmd(&bus, &manifest, &out, &[])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pngs(&out).is_empty() {
        assert!(Instant::now() < deadline, "the follower copied nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = ctl(&bus, &["batch", "cancel", &id]);
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = follower.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = follower.kill();
            let o = follower.wait_with_output().unwrap();
            panic!(
                "the follower still waits 30 s after the cancel: {}",
                text(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let o = follower.wait_with_output().unwrap();
    assert!(
        !status.success(),
        "a cancelled batch is not a success: {}",
        text(&o)
    );
    assert!(text(&o).contains("cancelled"), "{}", text(&o));
}
