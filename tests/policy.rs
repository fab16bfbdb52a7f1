//! The D-Bus policy (systemd/io.github.Diffusiond1.conf) on a private system-type
//! dbus-daemon, with a real diffusiond running as the service user and clients running
//! as other uids (setpriv): nobody outside the group is denied, group members and root
//! may call, nobody but the service user may own the name, one caller cannot cancel or
//! wait on another caller's job, a group member runs `diffusionctl batch` through the
//! policy (following it to its end however many other connections come and go), and one
//! user's work stays private from another (`privacy`).
//!
//! The policy names the user and group `diffusiond`, which a test machine lacks, so the
//! test installs a copy naming existing accounts instead, the substitution the install
//! script's group option makes: the service user becomes `daemon`, the caller group
//! `users`; callers are `bin` and `sys` with `users` as a supplementary group, and
//! `nobody` without it. dbus-daemon reads supplementary groups from the socket
//! (SO_PEERGROUPS), so no account is changed. Needs root (to switch uids); skips
//! otherwise, unless `CI` is set.

mod common;
#[path = "policy/harness.rs"]
mod harness;
#[path = "policy/privacy.rs"]
mod privacy;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use harness::{
    Account, BUS_DENIED, DAEMON_DENIED, NAME, OWNER_ONLY, PATH, SystemBus, as_user, cast,
    make_readable,
};

const AGENT_ENV: &str = "DIFFUSIOND_POLICY_TEST_AGENT";

#[test]
fn only_the_service_user_may_own_the_name() {
    let Some(cast) = cast() else { return };
    let bus = SystemBus::start();
    let root_account = Account { uid: 0, gid: 0 };
    for (who, group) in [
        (cast.nobody, None),
        (cast.alice, Some(cast.group)),
        (root_account, None),
    ] {
        let err = bus.request_name(who, group).unwrap_err();
        assert!(
            err.contains(BUS_DENIED) && err.contains("not allowed to own"),
            "uid {} could own the name: {err}",
            who.uid
        );
    }
    // The service user can: diffusiond starts as `daemon` and takes the name.
    let _d = bus.start_daemon(cast.service);
    let err = bus.request_name(cast.alice, Some(cast.group)).unwrap_err();
    assert!(err.contains(BUS_DENIED), "{err}");
}

#[test]
fn group_members_and_root_may_call_others_are_denied() {
    let Some(cast) = cast() else { return };
    let bus = SystemBus::start();
    let _d = bus.start_daemon(cast.service);
    let root_account = Account { uid: 0, gid: 0 };
    let calls: [(&str, &str, &[&str]); 4] = [
        (PATH, "io.github.Diffusiond1.Manager.ListModels", &[]),
        (
            PATH,
            "org.freedesktop.DBus.Properties.Get",
            &["io.github.Diffusiond1.Manager", "Version"],
        ),
        (
            PATH,
            "org.freedesktop.DBus.Properties.GetAll",
            &["io.github.Diffusiond1.Manager"],
        ),
        (PATH, "org.freedesktop.DBus.Introspectable.Introspect", &[]),
    ];
    for (path, method, args) in calls {
        let ok = bus
            .call(cast.alice, Some(cast.group), path, method, args)
            .unwrap_or_else(|e| panic!("group member: {method}: {e}"));
        assert!(!ok.is_empty());
        bus.call(root_account, None, path, method, args)
            .unwrap_or_else(|e| panic!("root: {method}: {e}"));
        let err = bus.call(cast.nobody, None, path, method, args).unwrap_err();
        assert!(err.contains(BUS_DENIED), "nobody: {method}: {err}");
        // A uid outside the group is denied whoever it is.
        let err = bus.call(cast.bob, None, path, method, args).unwrap_err();
        assert!(
            err.contains(BUS_DENIED),
            "bob outside the group: {method}: {err}"
        );
    }
    // Nobody may call Properties.Set or other interfaces, even in the group.
    let err = bus
        .call(
            cast.alice,
            Some(cast.group),
            PATH,
            "org.freedesktop.DBus.Properties.Set",
            &["io.github.Diffusiond1.Manager", "Version", "<'x'>"],
        )
        .unwrap_err();
    assert!(err.contains(BUS_DENIED), "{err}");
    let err = bus
        .call(
            cast.alice,
            Some(cast.group),
            PATH,
            "org.freedesktop.DBus.Peer.GetMachineId",
            &[],
        )
        .unwrap_err();
    assert!(err.contains(BUS_DENIED), "{err}");
    // Generate as nobody is denied by the bus before the daemon sees it.
    let err = bus
        .call(
            cast.nobody,
            None,
            PATH,
            "io.github.Diffusiond1.Manager.Generate",
            &["{'prompt': <'x'>}"],
        )
        .unwrap_err();
    assert!(err.contains(BUS_DENIED), "{err}");
}

/// Run as another uid by `one_caller_cannot_cancel_another_callers_job`: submits a job on
/// one connection, prints its path, and keeps the connection (so the job lives) until a
/// line arrives on stdin; then waits for the job and prints how it ended.
#[test]
fn agent_for_other_uids() {
    let Ok(address) = std::env::var(AGENT_ENV) else {
        return; // Only does something when the policy test starts it.
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let conn = zbus::connection::Builder::address(address.as_str())
                .unwrap()
                .build()
                .await
                .unwrap();
            let req: std::collections::HashMap<String, zbus::zvariant::OwnedValue> = [
                ("prompt", zbus::zvariant::Value::from("a slow job")),
                ("steps", zbus::zvariant::Value::U32(1000)),
                ("width", zbus::zvariant::Value::U32(256)),
                ("scheduler", zbus::zvariant::Value::from("euler")),
                ("height", zbus::zvariant::Value::U32(256)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
            .collect();
            let reply = conn
                .call_method(
                    Some(NAME),
                    PATH,
                    Some("io.github.Diffusiond1.Manager"),
                    "Generate",
                    &(req,),
                )
                .await
                .unwrap();
            let path: zbus::zvariant::OwnedObjectPath = reply.body().deserialize().unwrap();
            println!("AGENT-JOB {}", path.as_str());
            std::io::stdout().flush().unwrap();
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            let waited = conn
                .call_method(
                    Some(NAME),
                    path.as_str(),
                    Some("io.github.Diffusiond1.Job"),
                    "Wait",
                    &(),
                )
                .await;
            match waited {
                Ok(_) => println!("AGENT-END ok"),
                Err(zbus::Error::MethodError(name, _, _)) => println!("AGENT-END {name}"),
                Err(e) => println!("AGENT-END {e}"),
            }
            std::io::stdout().flush().unwrap();
        });
}

#[test]
fn one_caller_cannot_cancel_another_callers_job() {
    let Some(cast) = cast() else { return };
    let bus = SystemBus::start();
    let _d = bus.start_daemon(cast.service);
    let exe = std::env::current_exe().unwrap();
    make_readable(&exe);
    let mut agent = as_user(cast.alice, Some(cast.group))
        .arg(&exe)
        .args([
            "--exact",
            "agent_for_other_uids",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(AGENT_ENV, &bus.address)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(agent.stdout.take().unwrap());
    let mut line = String::new();
    let job = loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "the agent ended early"
        );
        // libtest may have started the line ("test agent_for_other_uids ... ").
        if let Some((_, p)) = line.trim().split_once("AGENT-JOB ") {
            break p.to_string();
        }
    };
    // Who owns a job is its owner's business (and root's).
    let owner = bus
        .call(
            cast.alice,
            Some(cast.group),
            &job,
            "org.freedesktop.DBus.Properties.Get",
            &["io.github.Diffusiond1.Job", "Owner"],
        )
        .unwrap();
    assert_eq!(owner, format!("(<uint32 {}>,)", cast.alice.uid));
    let err = bus
        .call(
            cast.bob,
            Some(cast.group),
            &job,
            "org.freedesktop.DBus.Properties.Get",
            &["io.github.Diffusiond1.Job", "Owner"],
        )
        .unwrap_err();
    assert!(err.contains(OWNER_ONLY), "bob reads Owner: {err}");
    // Bob, in the group but not the owner, may neither cancel nor wait.
    for method in ["Cancel", "Wait"] {
        let err = bus
            .call(
                cast.bob,
                Some(cast.group),
                &job,
                &format!("io.github.Diffusiond1.Job.{method}"),
                &[],
            )
            .unwrap_err();
        assert!(err.contains(DAEMON_DENIED), "bob {method}: {err}");
    }
    // The request holds alice's prompt: bob may not read it, nor load or unload models.
    let err = bus
        .call(
            cast.bob,
            Some(cast.group),
            &job,
            "org.freedesktop.DBus.Properties.Get",
            &["io.github.Diffusiond1.Job", "Request"],
        )
        .unwrap_err();
    assert!(err.contains("AccessDenied"), "bob reads Request: {err}");
    for method in ["LoadModel", "UnloadModel"] {
        let err = bus
            .call(
                cast.bob,
                Some(cast.group),
                "/io/github/Diffusiond1",
                &format!("io.github.Diffusiond1.Manager.{method}"),
                &["tiny"],
            )
            .unwrap_err();
        assert!(err.contains(DAEMON_DENIED), "bob {method}: {err}");
    }
    let state = |bus: &SystemBus| {
        bus.call(
            cast.bob,
            Some(cast.group),
            &job,
            "org.freedesktop.DBus.Properties.Get",
            &["io.github.Diffusiond1.Job", "State"],
        )
        .unwrap()
    };
    assert!(
        !state(&bus).contains("cancelled"),
        "bob's Cancel must not act"
    );
    // Alice, from another connection of the same uid, may.
    bus.call(
        cast.alice,
        Some(cast.group),
        &job,
        "io.github.Diffusiond1.Job.Cancel",
        &[],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !state(&bus).contains("cancelled") {
        assert!(Instant::now() < deadline, "the job was not cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stdin = agent.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    let end = loop {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "no AGENT-END");
        if let Some((_, e)) = line.trim().split_once("AGENT-END ") {
            break e.to_string();
        }
    };
    assert_eq!(end, "io.github.Diffusiond1.Error.Cancelled");
    assert!(agent.wait().unwrap().success());
}

/// The output of a command, stdout then stderr.
fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A `.jsonl` manifest of `n` items at 64×64 with `steps` steps, named `prefix-K`.
fn manifest(dir: &std::path::Path, file: &str, n: usize, steps: u32, prefix: &str) -> String {
    let text: String = (0..n)
        .map(|i| {
            format!(
                "{{\"name\":\"{prefix}-{i}\",\"prompt\":\"a red fox {i}\",\"seed\":{i},\"steps\":{steps},\"width\":64,\"height\":64}}\n"
            )
        })
        .collect();
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn a_group_member_runs_batches_through_the_policy() {
    let Some(cast) = cast() else { return };
    let bus = SystemBus::start();
    let _d = bus.start_daemon(cast.service);
    let alice = |args: &[&str]| bus.ctl(cast.alice, Some(cast.group), args);
    let work = bus.folder_for(cast.alice, "alice");
    let small = manifest(&work, "small.jsonl", 3, 4, "fox");
    let out = work.join("out").display().to_string();
    // The whole client: submit, follow ItemFinished and State, copy each image out.
    let o = alice(&["batch", &small, "--output-dir", &out]);
    assert!(o.status.success(), "diffusionctl batch: {}", text(&o));
    for i in 0..3 {
        let png = work.join(format!("out/fox-{i}.png"));
        assert!(
            png.is_file(),
            "{} was not copied: {}",
            png.display(),
            text(&o)
        );
    }
    let o = alice(&["batch", "status"]);
    assert!(o.status.success(), "batch status: {}", text(&o));
    assert!(
        text(&o).contains("succeeded; 3/3 items done"),
        "{}",
        text(&o)
    );
    let o = alice(&["batch", "list"]);
    assert!(o.status.success(), "batch list: {}", text(&o));
    assert!(text(&o).contains("1 batches"), "{}", text(&o));

    // A long batch, detached, then cancelled by its owner.
    let long = manifest(&work, "long.jsonl", 40, 900, "slow");
    let out = work.join("out-long").display().to_string();
    let o = alice(&["batch", &long, "--output-dir", &out, "--detach"]);
    assert!(o.status.success(), "batch --detach: {}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let batch = format!("{PATH}/batch/{id}");
    let o = alice(&["batch", "cancel", &id]);
    assert!(o.status.success(), "batch cancel: {}", text(&o));
    let o = alice(&["batch", "status", &id]);
    assert!(text(&o).contains(": cancelled;"), "{}", text(&o));

    // Outside the group nothing goes through: no Batch method, no property, no listing;
    // in it, the methods of another uid's batch are the daemon's to refuse.
    let iface = "io.github.Diffusiond1.Batch";
    let batch_calls: [(&str, &[&str]); 6] = [
        ("ListResults", &[]),
        ("ListFailures", &[]),
        ("OpenResult", &["slow-0.png"]),
        ("Cancel", &[]),
        ("Resume", &[]),
        ("Remove", &[]),
    ];
    for (method, args) in batch_calls {
        let method = format!("{iface}.{method}");
        let err = bus
            .call(cast.nobody, None, &batch, &method, args)
            .unwrap_err();
        assert!(err.contains(BUS_DENIED), "nobody {method}: {err}");
        let err = bus
            .call(cast.bob, Some(cast.group), &batch, &method, args)
            .unwrap_err();
        assert!(err.contains(DAEMON_DENIED), "bob {method}: {err}");
    }
    let others: [(&str, &str, &[&str]); 5] = [
        (
            &batch,
            "org.freedesktop.DBus.Properties.Get",
            &[iface, "State"],
        ),
        (&batch, "org.freedesktop.DBus.Properties.GetAll", &[iface]),
        (
            &batch,
            "org.freedesktop.DBus.Introspectable.Introspect",
            &[],
        ),
        (PATH, "io.github.Diffusiond1.Manager.ListBatches", &[]),
        (
            PATH,
            "io.github.Diffusiond1.Manager.SubmitBatch",
            &["b'{\"prompt\":\"x\"}'", "@a{sv} {}"],
        ),
    ];
    for (path, method, args) in others {
        let err = bus.call(cast.nobody, None, path, method, args).unwrap_err();
        assert!(err.contains(BUS_DENIED), "nobody {method}: {err}");
    }
    let o = bus.ctl(cast.nobody, None, &["batch", "status", &id]);
    assert!(!o.status.success(), "nobody's batch status: {}", text(&o));
    assert!(text(&o).contains("AccessDenied"), "{}", text(&o));
    // The cancelled batch is still alice's to remove.
    bus.call(
        cast.alice,
        Some(cast.group),
        &batch,
        &format!("{iface}.Remove"),
        &[],
    )
    .unwrap();
}

/// A batch keeps [`Followers::MAX`](16) connections to send its signals to; connections
/// that left make room, so a client that follows a batch to its end keeps its signals
/// however many short-lived ones (`batch status`) come and go meanwhile.
#[test]
fn a_following_client_keeps_its_signals_while_other_connections_come_and_go() {
    let Some(cast) = cast() else { return };
    let bus = SystemBus::start();
    let _d = bus.start_daemon(cast.service);
    let alice = |args: &[&str]| bus.ctl(cast.alice, Some(cast.group), args);
    let work = bus.folder_for(cast.alice, "alice");
    let items = manifest(&work, "slow.jsonl", 3, 900, "slow");
    let out = work.join("out").display().to_string();
    let run = ["batch", items.as_str(), "--output-dir", out.as_str()];
    let o = alice(&[&run[..], &["--detach"]].concat());
    assert!(o.status.success(), "batch --detach: {}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    // The same command again reattaches (a new connection) and copies images as
    // ItemFinished says they are ready, until the batch's State says it ended.
    let follower = bus.ctl_spawn(cast.alice, Some(cast.group), &run);
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    for _ in 0..40 {
        let o = alice(&["batch", "status", &id]);
        assert!(o.status.success(), "batch status: {}", text(&o));
    }
    eprintln!("40 status calls in {:.1} s", t0.elapsed().as_secs_f64());
    let o = harness::finish(follower, cast.alice, &run);
    assert!(o.status.success(), "the follower: {}", text(&o));
    for i in 0..3 {
        let png = work.join(format!("out/slow-{i}.png"));
        assert!(
            png.is_file(),
            "{} was not copied: {}",
            png.display(),
            text(&o)
        );
    }
}
