//! The systemd files in systemd/: `systemd-analyze verify` accepts the unit (alone, with
//! the GPU drop-in, with a MemoryMax drop-in), `systemd-analyze security --offline=yes`
//! scores it below the threshold, and systemd-sysusers/systemd-tmpfiles accept their
//! files in a scratch root. Skips only when systemd-analyze is missing and `CI` is unset.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::root;

/// Highest exposure `systemd-analyze security` may give the unit (docs/systemd.md records
/// the measured score: 0.3 for the CPU unit, 0.5 with gpu.conf).
const MAX_EXPOSURE: f64 = 1.0;

/// Whether `tool` is on PATH; when it is not, the test skips, or fails under CI.
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing under CI (apt-get install systemd)"
        );
        eprintln!("SKIPPED: {tool} is not installed (apt-get install systemd)");
    }
    found
}

/// The unit in a scratch folder, with ExecStart pointing at the built diffusiond, and
/// the given drop-ins (name, text) in diffusiond.service.d/.
fn staged_unit(dropins: &[(&str, String)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("systemd/diffusiond.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/diffusiond --system"));
    let text = text.replace("/usr/bin/diffusiond", env!("CARGO_BIN_EXE_diffusiond"));
    let unit = dir.path().join("diffusiond.service");
    std::fs::write(&unit, text).unwrap();
    if !dropins.is_empty() {
        let d = dir.path().join("diffusiond.service.d");
        std::fs::create_dir(&d).unwrap();
        for (name, text) in dropins {
            std::fs::write(d.join(name), text).unwrap();
        }
    }
    (dir, unit)
}

fn gpu_dropin() -> (&'static str, String) {
    (
        "gpu.conf",
        std::fs::read_to_string(root().join("systemd/gpu.conf")).unwrap(),
    )
}

fn memory_dropin() -> (&'static str, String) {
    ("memory.conf", "[Service]\nMemoryMax=75%\n".to_string())
}

fn verify(unit: &Path) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about our unit or its drop-ins are errors; others are about the host.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("diffusiond"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {}: {}\n{stderr}",
        unit.display(),
        out.status
    );
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return;
    }
    for dropins in [
        vec![],
        vec![gpu_dropin()],
        vec![gpu_dropin(), memory_dropin()],
    ] {
        let (_dir, unit) = staged_unit(&dropins);
        verify(&unit);
    }
}

/// `systemd-analyze security --offline=yes` on the unit: the overall exposure.
fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    line.split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in: {line}"))
}

#[test]
fn exposure_score_is_below_the_threshold() {
    if !have("systemd-analyze") {
        return;
    }
    let (_a, cpu) = staged_unit(&[memory_dropin()]);
    let (_b, gpu) = staged_unit(&[gpu_dropin(), memory_dropin()]);
    let (cpu, gpu) = (exposure(&cpu), exposure(&gpu));
    println!("exposure: cpu {cpu}, gpu {gpu}");
    assert!(cpu < MAX_EXPOSURE, "CPU unit exposure {cpu}");
    assert!(gpu < MAX_EXPOSURE, "GPU unit exposure {gpu}");
    assert!(cpu < 2.0 && gpu < 2.0);
}

#[test]
fn the_unit_keeps_its_key_settings() {
    let text = std::fs::read_to_string(root().join("systemd/diffusiond.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "BusName=io.github.Diffusiond1",
        "User=diffusiond",
        "StateDirectory=diffusiond",
        "CacheDirectory=diffusiond",
        "ConfigurationDirectory=diffusiond",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "PrivateNetwork=yes",
        "SystemCallFilter=@system-service",
        "DevicePolicy=closed",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "diffusiond.service lacks {line}"
        );
    }
    assert!(
        !text.contains("DynamicUser=yes"),
        "a dynamic user cannot own a bus name"
    );
    let activation =
        std::fs::read_to_string(root().join("systemd/io.github.Diffusiond1.service")).unwrap();
    for line in [
        "[D-BUS Service]",
        "Name=io.github.Diffusiond1",
        "SystemdService=diffusiond.service",
        "User=diffusiond",
        "Exec=/usr/bin/diffusiond --system",
    ] {
        assert!(
            activation.lines().any(|l| l == line),
            "activation file lacks {line}"
        );
    }
}

#[test]
fn sysusers_and_tmpfiles_apply_in_a_scratch_root() {
    if !have("systemd-sysusers") || !have("systemd-tmpfiles") {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let r = scratch.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", r.display()))
        .arg(root().join("systemd/sysusers.conf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(r.join("etc/group")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("diffusiond:"))
        .unwrap_or_else(|| panic!("no diffusiond user in {passwd}"));
    assert!(user.contains(":/var/lib/diffusiond:"), "{user}");
    assert!(
        group.lines().any(|l| l.starts_with("diffusiond:")),
        "{group}"
    );
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system uid: {uid}");

    let out = Command::new("systemd-tmpfiles")
        .args(["--create", &format!("--root={}", r.display())])
        .arg(root().join("systemd/tmpfiles.conf"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    use std::os::unix::fs::MetadataExt;
    for (path, mode, owner) in [
        ("etc/diffusiond", 0o755, 0),
        ("var/lib/diffusiond", 0o750, uid),
        ("var/cache/diffusiond/trt", 0o750, uid),
    ] {
        let m = std::fs::metadata(r.join(path)).unwrap();
        assert!(m.is_dir(), "{path}");
        assert_eq!(m.mode() & 0o7777, mode, "{path}");
        assert_eq!(m.uid(), owner, "{path}");
    }
}

/// Every file below `dir`, relative to it.
fn files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// `readelf ARGS FILE`'s output.
fn readelf(args: &[&str], file: &Path) -> String {
    let o = Command::new("readelf")
        .args(args)
        .arg(file)
        .output()
        .expect("readelf (binutils)");
    assert!(
        o.status.success(),
        "readelf {args:?} {}: {o:?}",
        file.display()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The installed binaries carry no debug info but a `.gnu_debuglink` to their debug file,
/// installed as `usr/lib/debug/.build-id/xx/yyyy.debug` after their build ID, with the
/// line tables in it.
fn assert_split_debug_info(dest: &Path, files: &[String]) {
    for bin in ["usr/bin/diffusiond", "usr/bin/diffusionctl"] {
        let path = dest.join(bin);
        let sections = readelf(&["-S", "-W"], &path);
        assert!(sections.contains(" .gnu_debuglink "), "{bin}: {sections}");
        for dwarf in [" .debug_line ", " .debug_info "] {
            assert!(!sections.contains(dwarf), "{bin} still has {dwarf}");
        }
        let id = readelf(&["-n"], &path)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_string))
            .unwrap_or_else(|| panic!("{bin} has no build ID"));
        let debug = format!("usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]);
        assert!(files.contains(&debug), "{debug} not installed: {files:#?}");
        let link = readelf(&["--string-dump=.gnu_debuglink"], &path);
        assert!(link.contains(&format!("{}.debug", &id[2..])), "{link}");
        assert!(
            readelf(&["-S", "-W"], &dest.join(&debug)).contains(" .debug_line "),
            "{debug} has no line tables"
        );
    }
}

#[test]
fn install_and_uninstall_into_a_destdir() {
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_diffusiond"))
        .parent()
        .unwrap();
    let run = |script: &str, args: &[&str]| {
        let out = Command::new(root().join("scripts").join(script))
            .args(args)
            .env("DESTDIR", d)
            .env("PREFIX", "/usr")
            .env("MEMORY_MAX", "6G")
            .output()
            .unwrap();
        assert!(out.status.success(), "{script} {args:?}: {out:?}");
    };
    run(
        "install",
        &[
            "--no-build",
            "--bin-dir",
            bin_dir.to_str().unwrap(),
            "--gpu",
        ],
    );
    let files = files_below(d);
    for f in [
        "usr/bin/diffusiond",
        "usr/bin/diffusionctl",
        "usr/lib/systemd/system/diffusiond.service",
        "usr/lib/systemd/system/diffusiond.service.d/memory.conf",
        "usr/lib/systemd/system/diffusiond.service.d/gpu.conf",
        "usr/lib/sysusers.d/diffusiond.conf",
        "usr/lib/tmpfiles.d/diffusiond.conf",
        "usr/share/dbus-1/system.d/io.github.Diffusiond1.conf",
        "usr/share/dbus-1/system-services/io.github.Diffusiond1.service",
        "usr/share/dbus-1/services/io.github.Diffusiond1.service",
        "usr/share/diffusiond/models/demo/model_index.json",
        "usr/share/diffusiond/models/demo/unet/model.onnx",
        "etc/diffusiond/diffusiond.toml",
    ] {
        assert!(
            files.iter().any(|x| x == f),
            "{f} not installed: {files:#?}"
        );
    }
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("usr/lib/diffusiond/libonnxruntime.so")),
        "ONNX Runtime not installed: {files:#?}"
    );
    assert_split_debug_info(d, &files);
    let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert!(
        read("usr/lib/systemd/system/diffusiond.service.d/memory.conf").contains("MemoryMax=6G")
    );
    // The installed config is valid, and names the installed model as default.
    let config = d.join("etc/diffusiond/diffusiond.toml");
    let settings = diffusiond::config::Settings::load(Some(&config)).unwrap();
    assert_eq!(settings.default_model_name(), Some("demo"));
    let demo = &settings.models["demo"];
    assert_eq!(demo.path, Path::new("/usr/share/diffusiond/models/demo"));
    // The bundled model's measured defaults, as the zero-config daemon uses them.
    assert_eq!((demo.steps, demo.guidance_scale), (Some(20), Some(5.0)));
    // Session activation starts the installed binary.
    let session = read("usr/share/dbus-1/services/io.github.Diffusiond1.service");
    assert!(
        session.contains("Exec=/usr/bin/diffusiond --session"),
        "{session}"
    );
    assert_eq!(settings.runtime.execution_providers.len(), 3);
    // The installed unit, drop-ins included, keeps its score.
    if have("systemd-analyze") {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--root={}", d.display()))
            .arg("diffusiond.service")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let score: f64 = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{stdout}"));
        assert!(score < MAX_EXPOSURE, "installed unit exposure {score}");
    }
    // A reinstall keeps an edited config.
    std::fs::write(&config, "# mine\n").unwrap();
    run(
        "install",
        &["--no-build", "--bin-dir", bin_dir.to_str().unwrap()],
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "# mine\n");
    // Uninstall removes everything but the config; --purge removes that too.
    run("uninstall", &[]);
    assert_eq!(files_below(d), vec!["etc/diffusiond/diffusiond.toml"]);
    run("uninstall", &["--purge"]);
    assert!(files_below(d).is_empty(), "{:#?}", files_below(d));
}
