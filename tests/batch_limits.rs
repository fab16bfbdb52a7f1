//! What one uid may keep in a real diffusiond's batch state, on a private bus: parallel
//! `SubmitBatch` calls cannot pass `limits.max_batches_per_caller` together (the service
//! alone, without the D-Bus intake, is tested in src/batch/service_tests.rs); stored
//! batches are bounded by `limits.max_stored_batches_per_caller`; a cancelled batch's
//! unrun items leave the database and the file shrinks; ended batches expire after
//! `jobs.unfetched_batch_retention_secs`; labels are bounded, and `diffusionctl` shows the
//! control characters of a label escaped.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, PrivateBus, config_text, ctl_command};
use diffusiond::batch::Format;
use diffusiond::batch::service::Submission;
use diffusiond::client::{Bus, Client, ClientError};
use diffusiond::request::GenerateRequest;
use zbus::zvariant::OwnedObjectPath;

fn submission(label: &str) -> Submission {
    Submission {
        format: Format::Jsonl,
        defaults: GenerateRequest::default(),
        base_seed: Some(1),
        shard: "0/1".parse().unwrap(),
        label: label.to_string(),
    }
}

/// A manifest of `n` slow 64×64 items, distinct per `tag` (a different batch each).
fn manifest(tag: &str, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"prompt":"{tag} number {i}","seed":{i},"steps":50,"width":64,"height":64}}"#
            ) + "\n"
        })
        .collect::<String>()
        .into_bytes()
}

/// Dropped in field order: the daemon first, then its bus, then the folder.
struct Setup {
    _daemon: Daemon,
    bus: PrivateBus,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

fn start(limits: &str, jobs: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bus = PrivateBus::start();
    let config = config_text(&format!(
        "[limits]\n{limits}\n[jobs]\nstate_dir = \"{}\"\n{jobs}\n",
        state.display()
    ));
    let daemon = Daemon::start_with_config(&bus, &config);
    Setup {
        _daemon: daemon,
        bus,
        state,
        _dir: dir,
    }
}

async fn client(bus: &PrivateBus) -> Client {
    Client::connect(&Bus::Address(bus.address().to_string()))
        .await
        .unwrap()
}

fn daemon_error(e: &ClientError) -> (&str, &str) {
    match e {
        ClientError::Daemon { name, message } => (name, message),
        other => panic!("not a daemon error: {other}"),
    }
}

async fn states(client: &Client) -> Vec<String> {
    client
        .batches()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.state)
        .collect()
}

#[test]
fn parallel_submissions_cannot_pass_max_batches_per_caller() {
    let s = start("max_batches_per_caller = 2", "");
    common::tokio_runtime().block_on(async {
        let client = client(&s.bus).await;
        // Ten callers of one uid, each on its own connection, all at once.
        let mut callers = Vec::new();
        for k in 0..10 {
            let c = self::client(&s.bus).await;
            let m = manifest(&format!("m{k}"), 6000);
            callers.push(tokio::spawn(async move {
                c.submit_batch(&m, &submission("/out")).await
            }));
        }
        let mut results = Vec::new();
        for c in callers {
            results.push(c.await.unwrap());
        }
        let accepted: Vec<&OwnedObjectPath> =
            results.iter().filter_map(|r| r.as_ref().ok()).collect();
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            // The bound, or the daemon's intake (a uid's submissions being read at once).
            let (name, message) = daemon_error(e);
            assert_eq!(name, "QueueFull", "{message}");
            assert!(
                message.contains("limits.max_batches_per_caller = 2")
                    || message.contains("being read"),
                "{message}"
            );
        }
        let unfinished = states(&client)
            .await
            .iter()
            .filter(|s| matches!(s.as_str(), "running" | "paused"))
            .count();
        assert!(
            (1..=2).contains(&accepted.len()) && unfinished <= 2,
            "{} of 10 parallel submissions accepted, {unfinished} unfinished, against a limit of 2",
            accepted.len()
        );
        for path in accepted {
            client.cancel_batch(path).await.unwrap();
        }
    });
}

fn file_bytes(path: &Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .map(|suffix| {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            std::fs::metadata(PathBuf::from(p)).map_or(0, |m| m.len())
        })
        .sum()
}

async fn wait_state(client: &Client, path: &OwnedObjectPath, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = client.batch_info(path).await.unwrap();
        if info.state == want {
            return;
        }
        assert!(Instant::now() < deadline, "{path}: {}", info.state);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn cancelled_batches_give_their_space_back_count_against_the_uid_and_expire() {
    let s = start(
        "max_batches_per_caller = 10\nmax_stored_batches_per_caller = 3",
        "unfetched_batch_retention_secs = 15",
    );
    let db = s.state.join("batches.sqlite");
    common::tokio_runtime().block_on(async {
        let client = client(&s.bus).await;
        let sub = submission("/out");
        let mut paths = Vec::new();
        let mut largest = 0;
        for k in 0..3 {
            let path = client
                .submit_batch(&manifest(&format!("c{k}"), 20_000), &sub)
                .await
                .unwrap();
            largest = largest.max(file_bytes(&db));
            client.cancel_batch(&path).await.unwrap();
            wait_state(&client, &path, "cancelled").await;
            paths.push(path);
        }
        let after = file_bytes(&db);
        assert!(
            largest > 2 << 20 && after < largest / 4,
            "the database took {largest} bytes with a batch stored, {after} after three were cancelled"
        );
        let info = client.batch_info(&paths[2]).await.unwrap();
        assert_eq!(info.total, 20_000, "the counts stay");
        assert!(
            info.disk_bytes > 0,
            "DiskBytes counts the batch's rows in the database"
        );

        let e = client
            .submit_batch(&manifest("c3", 10), &sub)
            .await
            .unwrap_err();
        let (name, message) = daemon_error(&e);
        assert_eq!(name, "QueueFull");
        assert!(
            message.contains("limits.max_stored_batches_per_caller = 3"),
            "{message}"
        );

        // Never fetched: they go after jobs.unfetched_batch_retention_secs.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client.batches().await.unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the cancelled batches never expired");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let left: Vec<_> = std::fs::read_dir(s.state.join("batches"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "their folders go too: {left:?}");
        let path = client.submit_batch(&manifest("c4", 10), &sub).await.unwrap();
        client.remove_batch(&path).await.unwrap();
    });
}

#[test]
fn labels_are_bounded_and_diffusionctl_escapes_what_the_daemon_sends() {
    let s = start("", "");
    let forged = "/home/a\u{1b}[2J\u{1b}[1;1H\nbatch 1: succeeded\u{202e}";
    let path = common::tokio_runtime().block_on(async {
        let client = client(&s.bus).await;
        let e = client
            .submit_batch(&manifest("l", 2), &submission(&"x".repeat(1 << 20)))
            .await
            .unwrap_err();
        let (name, message) = daemon_error(&e);
        assert_eq!(name, "InvalidArgument");
        assert!(
            message.contains("'label' is 1048576 bytes long; the most is 4096"),
            "{message}"
        );
        let path = client
            .submit_batch(&manifest("l", 2), &submission(forged))
            .await
            .unwrap();
        client.cancel_batch(&path).await.unwrap();
        path
    });
    let id = path.as_str().rsplit('/').next().unwrap().to_string();
    for args in [vec!["batch", "list"], vec!["batch", "status", &id]] {
        let mut argv = args.clone();
        argv.extend(["--address", s.bus.address()]);
        let o = ctl_command(&argv).output().unwrap();
        assert!(o.status.success(), "{args:?}: {o:?}");
        let out = String::from_utf8(o.stdout).unwrap();
        assert!(
            !out.contains('\u{1b}') && !out.contains('\u{202e}'),
            "{args:?} printed a control character: {out:?}"
        );
        assert!(
            out.contains(r"/home/a\x1b[2J\x1b[1;1H\nbatch 1: succeeded\u{202e}"),
            "{args:?}: {out}"
        );
        let lines = out.lines().filter(|l| l.contains("/home/a")).count();
        assert_eq!(lines, 1, "{args:?}: one line for the batch: {out}");
    }
}

#[test]
fn a_running_batch_pauses_once_its_owner_is_past_max_stored_bytes_per_caller() {
    let s = start("max_stored_bytes_per_caller = 40000", "");
    common::tokio_runtime().block_on(async {
        let client = client(&s.bus).await;
        let lines: String = (0..40)
            .map(|i| {
                format!(r#"{{"prompt":"bytes {i}","seed":{i},"steps":2,"width":64,"height":64}}"#)
                    + "\n"
            })
            .collect();
        let path = client
            .submit_batch(lines.as_bytes(), &submission("/out"))
            .await
            .unwrap();
        wait_state(&client, &path, "paused").await;
        let info = client.batch_info(&path).await.unwrap();
        assert!(
            info.error
                .contains("past limits.max_stored_bytes_per_caller = 40000"),
            "{}",
            info.error
        );
        assert!(
            info.done > 0 && info.done < 40,
            "{} items done before the pause",
            info.done
        );
        assert!(info.disk_bytes > 40_000, "{}", info.disk_bytes);
        let e = client
            .submit_batch(&manifest("more", 2), &submission("/out"))
            .await
            .unwrap_err();
        let (name, message) = daemon_error(&e);
        assert_eq!(name, "QueueFull");
        assert!(
            message.contains("limits.max_stored_bytes_per_caller = 40000"),
            "{message}"
        );
    });
}
