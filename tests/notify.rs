//! sd_notify: a real diffusiond, started the way systemd starts a `Type=notify` service
//! with `WatchdogSec=` (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID), sends STATUS=, then
//! EXTEND_TIMEOUT_USEC while it preloads a model, READY=1 once its bus name is owned,
//! WATCHDOG=1 at half the interval, and STOPPING=1 on SIGTERM, in that order.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::PrivateBus;

fn name_owned(address: &str) -> bool {
    Command::new("busctl")
        .args(["--address", address, "status", "io.github.Diffusiond1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn notify_messages_arrive_in_order() {
    let bus = PrivateBus::start();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let config = dir.path().join("diffusiond.toml");
    std::fs::write(
        &config,
        format!("preload = [\"tiny\"]\n{}", common::config_text("")),
    )
    .unwrap();
    // systemd sets WATCHDOG_PID to the service's pid: `exec` keeps the shell's.
    let mut child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["--address", bus.address(), "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();

    let mut messages: Vec<String> = Vec::new();
    let mut owned_at_ready = None;
    let mut sent_term = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            if text.lines().any(|l| l == "READY=1") {
                owned_at_ready = Some(name_owned(bus.address()));
            }
            messages.push(text);
        }
        let watchdogs_after_ready = messages
            .iter()
            .skip_while(|m| !m.contains("READY=1"))
            .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
            .count();
        if !sent_term && watchdogs_after_ready >= 3 {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            sent_term = true;
        }
        if sent_term && child.try_wait().unwrap().is_some() {
            // Drain what is left in the socket.
            while let Ok(n) = socket.recv(&mut buf) {
                messages.push(String::from_utf8_lossy(&buf[..n]).to_string());
            }
            break;
        }
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    println!("{messages:#?}");
    assert!(sent_term, "no READY=1 and three WATCHDOG=1: {messages:#?}");
    assert!(status.success(), "diffusiond exited with {status}");

    let index = |pred: &dyn Fn(&str) -> bool| messages.iter().position(|m| pred(m));
    let first_status = index(&|m| m.starts_with("STATUS=")).expect("a STATUS=");
    let loading =
        index(&|m| m.contains("STATUS=loading model 'tiny'") && m.contains("EXTEND_TIMEOUT_USEC="))
            .expect("STATUS=loading model with EXTEND_TIMEOUT_USEC");
    let ready = index(&|m| m.lines().any(|l| l == "READY=1")).expect("READY=1");
    let first_watchdog = index(&|m| m == "WATCHDOG=1\n").expect("WATCHDOG=1");
    let stopping = index(&|m| m.lines().any(|l| l == "STOPPING=1")).expect("STOPPING=1");
    assert_eq!(first_status, 0, "STATUS= comes first: {messages:#?}");
    assert!(loading < ready, "{messages:#?}");
    assert!(ready < stopping, "{messages:#?}");
    assert!(first_watchdog < stopping, "{messages:#?}");
    assert_eq!(
        owned_at_ready,
        Some(true),
        "the name is owned when READY=1 comes"
    );
    assert!(
        messages[ready].contains("STATUS=ready"),
        "READY=1 carries a status: {}",
        messages[ready]
    );
    assert_eq!(
        messages.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "READY=1 once"
    );
}

/// A diffusiond on a private bus with the tests' config, sending sd_notify messages to a
/// socket of its own (read with a 100 ms timeout); `env` adds variables.
fn started_with_socket(
    env: &[(&str, &str)],
) -> (
    PrivateBus,
    tempfile::TempDir,
    UnixDatagram,
    std::process::Child,
) {
    let bus = PrivateBus::start();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let config = dir.path().join("diffusiond.toml");
    std::fs::write(&config, common::config_text("")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["--address", bus.address(), "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    (bus, dir, socket, child)
}

#[test]
fn no_watchdog_pings_when_the_pid_is_not_ours() {
    let (_bus, _dir, socket, mut child) =
        started_with_socket(&[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")]);
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ready_at = None;
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            if text.contains("READY=1") {
                ready_at = Some(Instant::now());
            }
            messages.push(text);
        }
        if ready_at.is_some_and(|t| t.elapsed() > Duration::from_millis(600)) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready_at.is_some(), "{messages:#?}");
    assert!(
        !messages.iter().any(|m| m.contains("WATCHDOG=1")),
        "{messages:#?}"
    );
}

#[test]
fn a_load_after_ready_shows_in_the_status_until_it_ends() {
    let (bus, _dir, socket, mut child) = started_with_socket(&[]);
    let mut messages: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut asked = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    let loading = "STATUS=ready: serving io.github.Diffusiond1; loading model 'tiny'\n";
    let ready = "STATUS=ready: serving io.github.Diffusiond1\n";
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        if !asked && messages.iter().any(|m| m.contains("READY=1")) {
            // A load the daemon did not start itself: LoadModel after READY=1.
            let out = Command::new("busctl")
                .args(["--address", bus.address(), "call", "io.github.Diffusiond1"])
                .args(["/io/github/Diffusiond1", "io.github.Diffusiond1.Manager"])
                .args(["LoadModel", "s", "tiny"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            asked = true;
        }
        let at = messages.iter().position(|m| m == loading);
        if at.is_some_and(|i| messages[i..].iter().any(|m| m == ready)) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let at = messages
        .iter()
        .position(|m| m == loading)
        .unwrap_or_else(|| panic!("no loading status: {messages:#?}"));
    assert!(
        messages[at..].iter().any(|m| m == ready),
        "the status went back to ready: {messages:#?}"
    );
}
