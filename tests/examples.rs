//! The client examples in examples/ (Rust with zbus, Python with jeepney, shell with busctl)
//! against a real diffusiond on a private bus: each writes a PNG of the requested size.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Daemon, PrivateBus};

/// The size every example asks for (not the tiny model's native 64×64).
const WIDTH: u32 = 48;
const HEIGHT: u32 = 32;

/// Runs an example command on `bus` (as the session bus) and checks the PNG it reports.
fn check_example(mut command: Command, bus: &PrivateBus, out: &Path) {
    let o: Output = command
        .arg("a lighthouse at dusk")
        .arg(out)
        .arg(WIDTH.to_string())
        .arg(HEIGHT.to_string())
        .env("DBUS_SESSION_BUS_ADDRESS", bus.address())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        o.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{}\n", out.display()),
        "it prints where it wrote the PNG"
    );
    let bytes = std::fs::read(out).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let img =
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).expect("a valid PNG");
    assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
}

/// The built `generate` example (cargo builds examples for `cargo test`); built here if not.
fn rust_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/examples-HASH -> target/<profile>/examples/generate
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let path = profile_dir.join("examples/generate");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", "generate"])
            .current_dir(common::root())
            .status()
            .unwrap();
        assert!(status.success(), "cargo build --example generate");
    }
    path
}

/// A `PYTHONPATH` where `jeepney` imports: the interpreter's own, or a folder that pip
/// fills from examples/requirements.txt.
fn python_path() -> Option<PathBuf> {
    let has_jeepney = Command::new("python3")
        .args(["-c", "import jeepney"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if has_jeepney {
        return None;
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("example-pydeps");
    let requirements = common::root().join("examples/requirements.txt");
    let o = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--upgrade", "--target"])
        .arg(&target)
        .arg("-r")
        .arg(&requirements)
        .output()
        .expect("python3 -m pip");
    assert!(
        o.status.success(),
        "pip install -r examples/requirements.txt: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(target)
}

#[test]
fn rust_example_writes_a_png() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, "");
    let dir = tempfile::tempdir().unwrap();
    let mut c = Command::new(rust_example());
    c.env("RUST_LOG", "off");
    check_example(c, &bus, &dir.path().join("rust.png"));
}

#[test]
fn python_example_writes_a_png() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, "");
    let dir = tempfile::tempdir().unwrap();
    let mut c = Command::new("python3");
    c.arg(common::root().join("examples/generate.py"));
    if let Some(path) = python_path() {
        c.env("PYTHONPATH", path);
    }
    check_example(c, &bus, &dir.path().join("python.png"));
}

// Each busctl call is its own bus connection: the script sets cancel_on_disconnect=false
// so that its Wait() call, from a second connection, finds the job.
#[test]
fn shell_example_writes_a_png() {
    let bus = PrivateBus::start();
    let _daemon = Daemon::start(&bus, "");
    let dir = tempfile::tempdir().unwrap();
    let mut c = Command::new("bash");
    c.arg(common::root().join("examples/generate.sh"));
    check_example(c, &bus, &dir.path().join("shell.png"));
}
