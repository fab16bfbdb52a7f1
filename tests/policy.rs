//! The D-Bus policy (systemd/io.github.Diffusiond1.conf) on a private system-type
//! dbus-daemon, with a real diffusiond running as the service user and clients running
//! as other uids (setpriv): nobody outside the group is denied, group members and root
//! may call, nobody but the service user may own the name, and one caller cannot cancel
//! or wait on another caller's job.
//!
//! The policy names the user and group `diffusiond`, which a test machine lacks, so the
//! test installs a copy naming existing accounts instead, the substitution the install
//! script's group option makes: the service user becomes `daemon`, the caller group
//! `users`; callers are `bin` and `sys` with `users` as a supplementary group, and
//! `nobody` without it. dbus-daemon reads supplementary groups from the socket
//! (SO_PEERGROUPS), so no account is changed. Needs root (to switch uids); skips
//! otherwise, unless `CI` is set.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::root;

const NAME: &str = "io.github.Diffusiond1";
const PATH: &str = "/io/github/Diffusiond1";
const AGENT_ENV: &str = "DIFFUSIOND_POLICY_TEST_AGENT";

/// An account: uid and primary gid.
#[derive(Clone, Copy, Debug)]
struct Account {
    uid: u32,
    gid: u32,
}

fn account(name: &str) -> Option<Account> {
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

fn group_id(name: &str) -> Option<u32> {
    let out = Command::new("getent").args(["group", name]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(':')
        .nth(2)?
        .parse()
        .ok()
}

/// Who runs what: the service user, two group members, one outsider, and the group.
struct Cast {
    service: Account,
    alice: Account,
    bob: Account,
    nobody: Account,
    group: u32,
}

/// The cast, or `None` (skip) when the test cannot switch uids or an account is missing.
fn cast() -> Option<Cast> {
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
fn as_user(who: Account, group: Option<u32>) -> Command {
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
struct SystemBus {
    child: Child,
    address: String,
    dir: tempfile::TempDir,
}

impl SystemBus {
    fn start() -> SystemBus {
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
    fn start_daemon(&self, who: Account) -> KillOnDrop {
        let (bin, model) = stage_for_other_users(self.dir.path());
        let config = self.dir.path().join("diffusiond.toml");
        let text = common::config_text("[limits]\nmax_steps = 5000\n").replace(
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
    fn call(
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

    fn request_name(&self, who: Account, group: Option<u32>) -> Result<String, String> {
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
fn stage_for_other_users(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
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

fn result(out: Output) -> Result<String, String> {
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

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const BUS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";

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
    let owner = bus
        .call(
            cast.bob,
            Some(cast.group),
            &job,
            "org.freedesktop.DBus.Properties.Get",
            &["io.github.Diffusiond1.Job", "Owner"],
        )
        .unwrap();
    assert_eq!(owner, format!("(<uint32 {}>,)", cast.alice.uid));
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
        assert!(
            err.contains("io.github.Diffusiond1.Error.AccessDenied"),
            "bob {method}: {err}"
        );
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
        assert!(
            err.contains("io.github.Diffusiond1.Error.AccessDenied"),
            "bob {method}: {err}"
        );
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

/// The test binary and its folders must be readable by the agent's uid.
fn make_readable(exe: &Path) {
    let mode = std::fs::metadata(exe).unwrap().permissions().mode();
    assert!(
        mode & 0o005 == 0o005,
        "{} is not readable by other uids (mode {mode:o})",
        exe.display()
    );
}
