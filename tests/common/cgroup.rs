//! Memory cgroups for tests that hold the daemon to a limit as `MemoryMax=` would: a child
//! of this process's memory cgroup (v1 or v2), and a daemon started inside one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::PrivateBus;

/// A child of this process's memory cgroup limited to `bytes`, or `None` where cgroups
/// cannot be written (not root, or no memory controller). Removed when dropped.
pub fn child_memory_cgroup(bytes: u64) -> Option<Cgroup> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let base = own.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, controllers, path) = (p.next()?, p.next()?, p.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            Some(format!("/sys/fs/cgroup/memory{path}"))
        } else if controllers.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        {
            Some(format!("/sys/fs/cgroup{path}"))
        } else {
            None
        }
    })?;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = Path::new(&base).join(format!("diffusiond-test-{}-{n}", std::process::id()));
    std::fs::create_dir(&dir).ok()?;
    let v1 = dir.join("memory.limit_in_bytes");
    let file = if v1.exists() {
        v1
    } else {
        dir.join("memory.max")
    };
    if std::fs::write(&file, bytes.to_string()).is_err() {
        let _ = std::fs::remove_dir(&dir);
        return None;
    }
    Some(Cgroup(dir))
}

/// A memory cgroup made for a test.
pub struct Cgroup(PathBuf);

impl Cgroup {
    /// Its folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A memory cgroup, or `None` where there is none: under CI the test fails instead.
pub fn cgroup_or_skip(bytes: u64) -> Option<Cgroup> {
    let cgroup = child_memory_cgroup(bytes);
    if cgroup.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs a writable memory cgroup under CI"
        );
        eprintln!("SKIPPED: no writable memory cgroup");
    }
    cgroup
}

/// diffusiond started inside a cgroup; killed when dropped.
pub struct CgroupDaemon(pub Child);

impl CgroupDaemon {
    /// Starts `diffusiond --address ADDR --config CONFIG` inside `cgroup` and waits until
    /// it owns its bus name.
    pub fn start(cgroup: &Cgroup, bus: &PrivateBus, config: &Path) -> CgroupDaemon {
        let mut daemon = CgroupDaemon(
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo $$ > {}/cgroup.procs && exec \"$0\" --address \"$1\" --config \"$2\"",
                    cgroup.path().display()
                ))
                .arg(super::daemon_bin())
                .arg(bus.address())
                .arg(config)
                .env("RUST_LOG", "warn")
                .env(
                    "XDG_STATE_HOME",
                    config.parent().expect("a config folder").join("state"),
                )
                .spawn()
                .expect("start diffusiond"),
        );
        let t0 = Instant::now();
        while !Command::new("busctl")
            .args([
                "--address",
                bus.address(),
                "status",
                "io.github.Diffusiond1",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(daemon.alive(), "diffusiond exited");
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no bus name in 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        self.0.try_wait().is_ok_and(|s| s.is_none())
    }
}

impl Drop for CgroupDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
