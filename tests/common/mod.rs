//! Shared harness for end-to-end tests: a private dbus-daemon and a real diffusiond
//! process on it. Both are killed when dropped. No mocks.
#![allow(dead_code)]

pub mod batch;
pub mod cgroup;
pub mod checker;
pub mod controlnet;
pub mod lora;
pub mod parity;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A private session-type dbus-daemon listening on a socket in a temp folder.
pub struct PrivateBus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl PrivateBus {
    /// Starts `dbus-daemon` with a permissive session policy and reads its address.
    pub fn start() -> PrivateBus {
        PrivateBus::start_with(None, &[])
    }

    /// [`PrivateBus::start`], starting services from `services` (D-Bus activation) and
    /// passing `env` to `dbus-daemon`, whose environment activated services inherit.
    pub fn start_with(services: Option<&Path>, env: &[(&str, &std::ffi::OsStr)]) -> PrivateBus {
        PrivateBus::start_configured(services, env, "")
    }

    /// [`PrivateBus::start`] with `<limit>` elements (or other configuration) `extra`.
    pub fn start_with_limits(extra: &str) -> PrivateBus {
        PrivateBus::start_configured(None, &[], extra)
    }

    fn start_configured(
        services: Option<&Path>,
        env: &[(&str, &std::ffi::OsStr)],
        extra: &str,
    ) -> PrivateBus {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("bus.conf");
        let servicedir = services
            .map(|d| format!("  <servicedir>{}</servicedir>\n", d.display()))
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={}</listen>
  <auth>EXTERNAL</auth>
{servicedir}{extra}  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                dir.path().display()
            ),
        )
        .expect("bus config");
        let mut cmd = Command::new("dbus-daemon");
        cmd.arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("dbus-daemon (apt-get install dbus)");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("bus address");
        PrivateBus {
            child,
            address: line.trim().to_string(),
            _dir: dir,
        }
    }

    /// Lets every uid reach the bus (for clients run as other users through setpriv).
    pub fn open_to_everyone(&self) {
        use std::os::unix::fs::PermissionsExt;
        let dir = self._dir.path();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if !path.ends_with("bus.conf") {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
            }
        }
    }

    /// The bus address, for `--address` and zbus.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A new zbus connection to this bus.
    pub async fn connect(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.address())
            .expect("address")
            .build()
            .await
            .expect("connect to the private bus")
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A diffusiond process on a private bus, serving the tiny model as `tiny` (default).
pub struct Daemon {
    child: Option<Child>,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `diffusiond --address ADDR --config FILE`; `extra` is appended to the TOML.
    /// Waits until the bus name is owned.
    pub fn start(bus: &PrivateBus, extra: &str) -> Daemon {
        Daemon::start_with_config(bus, &config_text(extra))
    }

    /// Starts `diffusiond --address ADDR --config FILE` with `text` as the whole TOML.
    pub fn start_with_config(bus: &PrivateBus, text: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("diffusiond.toml");
        std::fs::write(&config, text).expect("config");
        let child = Command::new(daemon_bin())
            .arg("--address")
            .arg(bus.address())
            .arg("--config")
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // Batch state in the test's folder (a config's jobs.state_dir wins).
            .env("XDG_STATE_HOME", dir.path().join("state"))
            .spawn()
            .expect("start diffusiond");
        let mut daemon = Daemon {
            child: Some(child),
            config,
            _dir: dir,
        };
        daemon.wait_for_name(bus.address());
        daemon
    }

    /// The config file the daemon was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal and waits for the exit status (up to `timeout`).
    pub fn signal_and_wait(
        &mut self,
        signal: &str,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let pid = self.pid().to_string();
        let _ = Command::new("kill").args([signal, &pid]).status();
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The diffusiond binary the tests start: this build's, or `TEST_DIFFUSIOND_BIN` (to
/// measure another build, e.g. before a fix, under the same tests).
pub fn daemon_bin() -> std::ffi::OsString {
    std::env::var_os("TEST_DIFFUSIOND_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_diffusiond").into())
}

/// The daemon config used in tests: the tiny model, one ORT thread, short retention.
pub fn config_text(extra: &str) -> String {
    config_with_model_keys("", extra)
}

/// [`config_text`] with `model_keys` added to the `[models.tiny]` table.
pub fn config_with_model_keys(model_keys: &str, extra: &str) -> String {
    format!(
        r#"default_model = "tiny"

[models.tiny]
path = "{}"
{model_keys}

[runtime.session]
intra_threads = 1
inter_threads = 1

{extra}
"#,
        root().join("onnx/tiny-sd15").display()
    )
}

impl Daemon {
    fn wait_for_name(&mut self, address: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("diffusiond exited during startup: {status}");
            }
            let out = Command::new("busctl")
                .args(["--address", address, "status", "io.github.Diffusiond1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if out.map(|s| s.success()).unwrap_or(false) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("diffusiond did not take its bus name within 60 s");
    }
}

/// An `a{sv}` written exactly as given, a key twice included (as a hostile client can send
/// it; a map would keep one).
pub struct PairsDict(pub Vec<(String, zbus::zvariant::Value<'static>)>);

impl zbus::zvariant::Type for PairsDict {
    const SIGNATURE: &'static zbus::zvariant::Signature = <std::collections::HashMap<
        String,
        zbus::zvariant::OwnedValue,
    > as zbus::zvariant::Type>::SIGNATURE;
}

impl serde::Serialize for PairsDict {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// Whether this process may run clients as other uids: root, with `setpriv` and `gdbus`.
pub fn can_run_as_other_uids() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tools = ["setpriv", "gdbus"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    root && tools
}

/// Whether a test that runs clients as other uids can run here. Under CI it must (the
/// test fails); elsewhere the test says it is skipped.
pub fn other_uids_or_skip() -> bool {
    if can_run_as_other_uids() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "needs root, setpriv and gdbus under CI"
    );
    eprintln!("SKIPPED: needs root, setpriv and gdbus");
    false
}

/// `gdbus call -a ADDRESS -d io.github.Diffusiond1 -o PATH -m METHOD` run as uid 65534
/// (nobody) through setpriv; add the method's arguments, then run it.
pub fn gdbus_as_nobody(address: &str, path: &str, method: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
        "gdbus",
        "call",
        "-a",
        address,
        "-d",
        "io.github.Diffusiond1",
        "-o",
        path,
        "-m",
        method,
    ])
    .env("HOME", "/nonexistent");
    c
}

/// A `Generate` request or result dict.
pub type Dict = std::collections::HashMap<String, zbus::zvariant::OwnedValue>;

/// The PNGs of a finished job's `images`.
pub fn result_pngs(result: &Dict) -> Vec<Vec<u8>> {
    let v: &zbus::zvariant::Value<'_> = &result["images"];
    Vec::<Vec<u8>>::try_from(v.try_clone().unwrap()).unwrap()
}

/// A PNG's `parameters` text chunk, if it has one.
pub fn png_parameters(png: &[u8]) -> Option<String> {
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .ok()?;
    reader
        .info()
        .utf8_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .and_then(|c| c.get_text().ok())
}

/// A PNG's pixels as RGB bytes.
pub fn png_rgb(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().to_rgb8().into_raw()
}

/// A multi-threaded tokio runtime for a test's async part.
pub fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Copies a folder tree (a model folder a test changes).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A request dict from pairs.
pub fn request_dict(
    pairs: &[(&str, zbus::zvariant::Value<'_>)],
) -> std::collections::HashMap<String, zbus::zvariant::OwnedValue> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
        .collect()
}

/// `Manager.Generate(request)`.
pub async fn generate(
    conn: &zbus::Connection,
    request: std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
) -> zbus::Result<zbus::zvariant::OwnedObjectPath> {
    zbus::Proxy::new(
        conn,
        "io.github.Diffusiond1",
        "/io/github/Diffusiond1",
        "io.github.Diffusiond1.Manager",
    )
    .await?
    .call("Generate", &(request,))
    .await
}

/// `Job.Wait()` on `path`.
pub async fn wait(
    conn: &zbus::Connection,
    path: &zbus::zvariant::OwnedObjectPath,
) -> zbus::Result<std::collections::HashMap<String, zbus::zvariant::OwnedValue>> {
    zbus::Proxy::new(
        conn,
        "io.github.Diffusiond1",
        path.as_str(),
        "io.github.Diffusiond1.Job",
    )
    .await?
    .call("Wait", &())
    .await
}

/// The D-Bus error name of a failed call (or the client-side error, described).
pub fn error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        other => format!("client: {other}"),
    }
}

/// A process's resident set size, in kB.
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `diffusionctl ARGS` as a user runs it: no RUST_LOG, one ONNX Runtime thread.
pub fn ctl_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_diffusionctl"));
    c.args(args)
        // What a user sees: no RUST_LOG, so warnings would show (and break "one line").
        .env_remove("RUST_LOG")
        .env("DIFFUSIOND_RUNTIME__SESSION__INTRA_THREADS", "1")
        .env("DIFFUSIOND_RUNTIME__SESSION__INTER_THREADS", "1");
    c
}
