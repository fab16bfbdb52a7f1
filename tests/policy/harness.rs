//! The policy tests' harness: the accounts they run as, a private system-type dbus-daemon
//! with the shipped policy, diffusiond as the service user, and clients (gdbus,
//! diffusionctl, dbus-monitor) as other uids through setpriv.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, root};

/// The service's bus name.
pub const NAME: &str = "io.github.Diffusiond1";
/// The Manager's path.
pub const PATH: &str = "/io/github/Diffusiond1";
/// The bus's refusal.
pub const BUS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
/// The daemon's refusal of a method.
pub const DAEMON_DENIED: &str = "io.github.Diffusiond1.Error.AccessDenied";
/// The daemon's refusal of an owner-only property (a `Properties.Get` error is
/// `org.freedesktop.DBus.Error.AccessDenied`, so its message tells it from the bus's).
pub const OWNER_ONLY: &str = "only its owner or root may use it";

/// An account: uid and primary gid.
#[derive(Clone, Copy, Debug)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

pub fn account(name: &str) -> Option<Account> {
    let out = Command::new("getent")
        .args(["passwd", name])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let f: Vec<&str> = line.trim().split(':').collect();
    Some(Account {
        uid: f.get(2)?.parse().ok()?,
        gid: f.get(3)?.parse().ok()?,
    })
}

pub fn group_id(name: &str) -> Option<u32> {
    let out = Command::new("getent").args(["group", name]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(':')
        .nth(2)?
        .parse()
        .ok()
}

/// Who runs what: the service user, two group members, one outsider, and the group.
pub struct Cast {
    pub service: Account,
    pub alice: Account,
    pub bob: Account,
    pub nobody: Account,
    pub group: u32,
}

/// The cast, or `None` (skip) when the test cannot switch uids or an account is missing.
pub fn cast() -> Option<Cast> {
    let ci = std::env::var_os("CI").is_some();
    let skip = |why: &str| {
        assert!(!ci, "policy test cannot run under CI: {why}");
        eprintln!("SKIPPED: {why}");
        None
    };
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !is_root {
        return skip("needs root to run clients as other uids");
    }
    for tool in ["setpriv", "dbus-daemon", "gdbus", "busctl"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return skip(&format!("{tool} is not installed"));
        }
    }
    match (
        account("daemon"),
        account("bin"),
        account("sys"),
        account("nobody"),
        group_id("users"),
    ) {
        (Some(service), Some(alice), Some(bob), Some(nobody), Some(group)) => Some(Cast {
            service,
            alice,
            bob,
            nobody,
            group,
        }),
        _ => skip("accounts daemon, bin, sys, nobody or group users are missing"),
    }
}

/// `setpriv` as `who`, with `group` as its only supplementary group (or none).
pub fn as_user(who: Account, group: Option<u32>) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", who.uid))
        .arg(format!("--regid={}", who.gid));
    match group {
        Some(g) => c.arg(format!("--groups={g}")),
        None => c.arg("--clear-groups"),
    };
    c.arg("--").env("HOME", "/nonexistent");
    c
}

/// A private system-type dbus-daemon with the installed policy, reachable by every uid.
pub struct SystemBus {
    child: Child,
    pub address: String,
    dir: tempfile::TempDir,
}

impl SystemBus {
    /// Starts the bus with the shipped policy, its names replaced by existing accounts'.
    pub fn start() -> SystemBus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let policy = std::fs::read_to_string(root().join("systemd/io.github.Diffusiond1.conf"))
            .unwrap()
            .replace("user=\"diffusiond\"", "user=\"daemon\"")
            .replace("group=\"diffusiond\"", "group=\"users\"");
        assert!(policy.contains("user=\"daemon\"") && policy.contains("group=\"users\""));
        let policy_file = dir.path().join("io.github.Diffusiond1.conf");
        std::fs::write(&policy_file, policy).unwrap();
        let socket = dir.path().join("system_bus_socket");
        let config = dir.path().join("system.conf");
        // The default policy of a stock system bus (dbus's system.conf), then ours.
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
                socket = socket.display(),
                policy = policy_file.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()) // It logs every denial the tests provoke.
            .spawn()
            .expect("dbus-daemon");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        SystemBus {
            child,
            address: line.trim().to_string(),
            dir,
        }
    }

    /// diffusiond as `who`, waiting until it owns the name. The checkout may be private
    /// (a 0700 home folder), so what the service user needs is staged in the bus's
    /// world-readable folder first.
    pub fn start_daemon(&self, who: Account) -> KillOnDrop {
        let (bin, model) = stage_for_other_users(self.dir.path());
        let config = self.dir.path().join("diffusiond.toml");
        // Batch state where the service user may write (as StateDirectory= gives it).
        let state = self.dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(who.uid), Some(who.gid)).unwrap();
        let extra = format!(
            "[limits]\nmax_steps = 5000\n\n[jobs]\nstate_dir = \"{}\"\n",
            state.display()
        );
        let text = common::config_text(&extra).replace(
            &root().join("onnx/tiny-sd15").display().to_string(),
            &model.display().to_string(),
        );
        assert!(text.contains(&model.display().to_string()));
        std::fs::write(&config, text).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let child = as_user(who, None)
            .arg(&bin)
            .args(["--address", &self.address, "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        let mut guard = KillOnDrop(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = guard.0.try_wait() {
                panic!("diffusiond exited during startup: {status}");
            }
            let owned = Command::new("busctl")
                .args(["--address", &self.address, "status", NAME])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if owned {
                return guard;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("diffusiond did not take its name");
    }

    /// `gdbus call` as `who`: Ok(reply) or Err(stderr, which names the D-Bus error).
    pub fn call(
        &self,
        who: Account,
        group: Option<u32>,
        path: &str,
        method: &str,
        args: &[&str],
    ) -> Result<String, String> {
        let out = as_user(who, group)
            .args(["gdbus", "call", "-a", &self.address, "-d", NAME, "-o", path])
            .args(["-m", method])
            .args(args)
            .output()
            .unwrap();
        result(out)
    }

    /// `diffusionctl ARGS --address BUS` as `who` (the binary staged by
    /// [`SystemBus::start_daemon`]), with a time limit: a client that waits for signals
    /// that never come fails instead of hanging.
    pub fn ctl(&self, who: Account, group: Option<u32>, args: &[&str]) -> Output {
        finish(self.ctl_spawn(who, group, args), who, args)
    }

    /// [`SystemBus::ctl`] started, not waited for ([`finish`] waits).
    pub fn ctl_spawn(&self, who: Account, group: Option<u32>, args: &[&str]) -> Child {
        as_user(who, group)
            .arg(self.dir.path().join("bin/diffusionctl"))
            .args(args)
            .args(["--address", &self.address])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// A folder under the bus's folder that `who` owns (for files it writes).
    pub fn folder_for(&self, who: Account, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(who.uid), Some(who.gid)).unwrap();
        dir
    }

    /// `dbus-monitor` as `who`: a snooper. As a uid other than root and the bus's, its
    /// `BecomeMonitor` is refused and it falls back to eavesdropping match rules, the most
    /// a local user can ask the bus for.
    pub fn monitor(&self, who: Account, group: Option<u32>) -> Monitor {
        let log = self.dir.path().join(format!("monitor-{}.log", who.uid));
        let file = std::fs::File::create(&log).unwrap();
        let child = as_user(who, group)
            .args(["dbus-monitor", "--address", &self.address])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let monitor = Monitor {
            child: KillOnDrop(child),
            log,
        };
        // Its first lines are its own NameAcquired: it is listening then.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !monitor.text().contains("NameAcquired") {
            assert!(Instant::now() < deadline, "dbus-monitor did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        monitor
    }

    /// `RequestName` of the service's name as `who`.
    pub fn request_name(&self, who: Account, group: Option<u32>) -> Result<String, String> {
        let out = as_user(who, group)
            .args(["gdbus", "call", "-a", &self.address])
            .args(["-d", "org.freedesktop.DBus", "-o", "/org/freedesktop/DBus"])
            .args(["-m", "org.freedesktop.DBus.RequestName", NAME, "4"])
            .output()
            .unwrap();
        result(out)
    }
}

/// Puts the daemon binary with the ONNX Runtime library beside it (where discovery looks
/// first) and the tiny model under `dir`, readable by every uid. Hard links where the file
/// system allows (the binary is large), copies otherwise. Returns the binary and model.
pub fn stage_for_other_users(dir: &Path) -> (PathBuf, PathBuf) {
    let place = |from: &Path, to: &Path, mode: u32| {
        use std::os::unix::fs::MetadataExt;
        let from = std::fs::canonicalize(from).unwrap();
        // A link keeps the file's own mode: only for files every uid may read already.
        let readable = std::fs::metadata(&from).unwrap().mode() & 0o004 != 0;
        if !readable || std::fs::hard_link(&from, to).is_err() {
            std::fs::copy(&from, to).unwrap();
            std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    };
    let open_dir = |d: &Path| {
        std::fs::create_dir_all(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let bin_dir = dir.join("bin");
    open_dir(&bin_dir);
    let bin = bin_dir.join("diffusiond");
    place(Path::new(env!("CARGO_BIN_EXE_diffusiond")), &bin, 0o755);
    place(
        Path::new(env!("CARGO_BIN_EXE_diffusionctl")),
        &bin_dir.join("diffusionctl"),
        0o755,
    );
    for entry in std::fs::read_dir(root().join("runtime/lib")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("libonnxruntime") && name.contains(".so") {
            place(&path, &bin_dir.join(&name), 0o644);
        }
    }
    let model = dir.join("model");
    let src = root().join("onnx/tiny-sd15");
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        open_dir(&model.join(d.strip_prefix(&src).unwrap()));
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                place(&path, &model.join(path.strip_prefix(&src).unwrap()), 0o644);
            }
        }
    }
    (bin, model)
}

pub fn result(out: Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

impl Drop for SystemBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a `diffusionctl` started by [`SystemBus::ctl_spawn`], up to 180 s: a client
/// that waits for signals that never come fails the test instead of hanging it.
pub fn finish(mut child: Child, who: Account, args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "diffusionctl {args:?} as uid {} did not end in 180 s: {}",
                who.uid,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A `dbus-monitor` run by [`SystemBus::monitor`], writing what it receives to a file.
pub struct Monitor {
    child: KillOnDrop,
    log: PathBuf,
}

impl Monitor {
    /// What it has received so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it; returns what it received.
    pub fn stop(self) -> String {
        drop(self.child);
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test binary and its folders must be readable by the agent's uid.
pub fn make_readable(exe: &Path) {
    let mode = std::fs::metadata(exe).unwrap().permissions().mode();
    assert!(
        mode & 0o005 == 0o005,
        "{} is not readable by other uids (mode {mode:o})",
        exe.display()
    );
}
