//! Finding the ONNX Runtime shared library.
//!
//! diffusiond links ONNX Runtime at run time (`ort`'s `load-dynamic`), so the library has
//! to be found. The places are tried in a fixed order, and when none works the error
//! lists every place tried together with the one command that fixes it.
//!
//! Order:
//! 1. the config key `runtime.library_path`;
//! 2. the `ORT_DYLIB_PATH` environment variable;
//! 3. beside the executable (and `../lib/diffusiond/` relative to it, the installed layout);
//! 4. the project-local runtime folder that `scripts/setup` fills: `runtime/` in the source
//!    tree the binary was built from, or the config key `runtime.project_dir` instead;
//! 5. the `capi` folder of an installed `onnxruntime` / `onnxruntime-gpu` Python package;
//! 6. the system library path (`libonnxruntime.so` through the dynamic loader).
//!
//! The first two are explicit choices: if one is set and fails, discovery stops there
//! rather than silently loading some other library.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The command printed when no runtime can be found.
pub const FIX_COMMAND: &str = "scripts/setup";

/// Where a candidate library path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `runtime.library_path` config key.
    ConfigKey,
    /// The `ORT_DYLIB_PATH` environment variable.
    EnvVar,
    /// A folder next to the running executable.
    BesideExecutable,
    /// The project-local runtime folder filled by `scripts/setup`.
    ProjectRuntime,
    /// An installed `onnxruntime` Python package.
    PythonPackage,
    /// The dynamic loader's own search path.
    SystemPath,
}

impl Source {
    /// Whether the user named this place explicitly (then a failure is final).
    pub fn is_explicit(self) -> bool {
        matches!(self, Source::ConfigKey | Source::EnvVar)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::ConfigKey => "config key runtime.library_path",
            Source::EnvVar => "ORT_DYLIB_PATH",
            Source::BesideExecutable => "beside the executable",
            Source::ProjectRuntime => "project runtime folder",
            Source::PythonPackage => "Python onnxruntime package",
            Source::SystemPath => "system library path",
        })
    }
}

/// A place to look: either a file or a folder that should hold `libonnxruntime.so*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Where it came from.
    pub source: Source,
    /// The file or folder.
    pub path: PathBuf,
}

/// Everything discovery reads from the outside world, gathered up front so the
/// ordering logic stays a pure function that tests can drive.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// `runtime.library_path` from the config.
    pub config_path: Option<PathBuf>,
    /// `ORT_DYLIB_PATH`.
    pub env_path: Option<PathBuf>,
    /// The folder of the running executable.
    pub exe_dir: Option<PathBuf>,
    /// Project-local runtime folders, most specific first.
    pub project_dirs: Vec<PathBuf>,
    /// `capi` folders of installed Python packages.
    pub python_capi_dirs: Vec<PathBuf>,
}

impl Inputs {
    /// Reads the environment, the executable's location and Python's package path.
    /// `project_dir` replaces the source tree's `runtime/` folder when given.
    pub fn from_environment(config_path: Option<PathBuf>, project_dir: Option<PathBuf>) -> Self {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        let project_dir =
            project_dir.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime"));
        Inputs {
            config_path,
            env_path: std::env::var_os("ORT_DYLIB_PATH")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            exe_dir,
            project_dirs: vec![project_dir],
            python_capi_dirs: python_capi_dirs(),
        }
    }
}

/// The ordered list of places to try.
pub fn candidates(inputs: &Inputs) -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut push = |source, path: &Path| {
        out.push(Candidate {
            source,
            path: path.to_path_buf(),
        })
    };
    if let Some(p) = &inputs.config_path {
        push(Source::ConfigKey, p);
    }
    if let Some(p) = &inputs.env_path {
        push(Source::EnvVar, p);
    }
    if let Some(dir) = &inputs.exe_dir {
        push(Source::BesideExecutable, dir);
        push(Source::BesideExecutable, &dir.join("../lib/diffusiond"));
    }
    for dir in &inputs.project_dirs {
        push(Source::ProjectRuntime, &dir.join("lib"));
    }
    for dir in &inputs.python_capi_dirs {
        push(Source::PythonPackage, dir);
    }
    push(Source::SystemPath, Path::new(LIBRARY_NAME));
    out
}

/// The unversioned library file name on this platform.
#[cfg(target_os = "macos")]
pub const LIBRARY_NAME: &str = "libonnxruntime.dylib";
/// The unversioned library file name on this platform.
#[cfg(not(target_os = "macos"))]
pub const LIBRARY_NAME: &str = "libonnxruntime.so";

/// Turns a candidate into the library file to load, or says why there is none.
///
/// A folder is searched for `libonnxruntime.so` or its versioned names
/// (`libonnxruntime.so.1.32.0`); the highest version wins.
pub fn resolve(candidate: &Candidate) -> Result<PathBuf, String> {
    if candidate.source == Source::SystemPath {
        return Ok(candidate.path.clone());
    }
    let path = &candidate.path;
    if path.is_file() {
        return Ok(path.clone());
    }
    if path.is_dir() {
        return library_in_dir(path).ok_or_else(|| format!("no {LIBRARY_NAME}* in this folder"));
    }
    Err("no such file or folder".to_string())
}

/// Finds the library in a folder, preferring the highest versioned name.
fn library_in_dir(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_library_name(p))
        .max_by_key(|p| version_key(p))
}

fn is_library_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == LIBRARY_NAME || n.starts_with(&format!("{LIBRARY_NAME}.")))
}

/// `libonnxruntime.so.1.32.0` → `[1, 32, 0]`; the bare name sorts first.
fn version_key(path: &Path) -> Vec<u32> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.strip_prefix(LIBRARY_NAME)
        .unwrap_or("")
        .split('.')
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Asks Python (without importing ONNX Runtime) where an installed `onnxruntime`
/// package lives. Empty when Python or the package is absent.
fn python_capi_dirs() -> Vec<PathBuf> {
    const SCRIPT: &str = "import importlib.util as u\n\
s = u.find_spec('onnxruntime')\n\
print('\\n'.join(s.submodule_search_locations or []) if s else '')";
    let Ok(out) = Command::new("python3").args(["-c", SCRIPT]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Path::new(l.trim()).join("capi"))
        .collect()
}

/// One failed attempt, for the final error message.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The place tried.
    pub candidate: Candidate,
    /// Why it did not work.
    pub reason: String,
}

/// Formats the list of attempts and the fix, for [`crate::runtime::RuntimeError::NotFound`].
pub fn describe_attempts(attempts: &[Attempt]) -> String {
    let mut s = String::new();
    for (i, a) in attempts.iter().enumerate() {
        s.push_str(&format!(
            "\n  {}. {} ({}): {}",
            i + 1,
            a.candidate.path.display(),
            a.candidate.source,
            a.reason
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            config_path: Some("/cfg/libonnxruntime.so".into()),
            env_path: Some("/env/libonnxruntime.so".into()),
            exe_dir: Some("/opt/bin".into()),
            project_dirs: vec!["/src/runtime".into()],
            python_capi_dirs: vec!["/py/onnxruntime/capi".into()],
        }
    }

    #[test]
    fn order_is_config_env_exe_project_python_system() {
        let sources: Vec<_> = candidates(&inputs()).iter().map(|c| c.source).collect();
        assert_eq!(
            sources,
            vec![
                Source::ConfigKey,
                Source::EnvVar,
                Source::BesideExecutable,
                Source::BesideExecutable,
                Source::ProjectRuntime,
                Source::PythonPackage,
                Source::SystemPath
            ]
        );
        let c = candidates(&inputs());
        assert_eq!(c[3].path, Path::new("/opt/bin/../lib/diffusiond"));
        assert_eq!(c[4].path, Path::new("/src/runtime/lib"));
        assert_eq!(c[6].path, Path::new(LIBRARY_NAME));
    }

    #[test]
    fn unset_sources_are_skipped() {
        let mut i = inputs();
        i.config_path = None;
        i.env_path = None;
        i.python_capi_dirs.clear();
        let sources: Vec<_> = candidates(&i).iter().map(|c| c.source).collect();
        assert_eq!(sources[0], Source::BesideExecutable);
        assert!(!sources.contains(&Source::PythonPackage));
        assert!(!sources.iter().any(|s| s.is_explicit()));
    }

    #[test]
    fn folder_resolves_to_highest_version() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "libonnxruntime.so.1.9.0",
            "libonnxruntime.so.1.32.0",
            "libonnxruntime_providers_shared.so",
            "other.so",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let c = Candidate {
            source: Source::PythonPackage,
            path: dir.path().to_path_buf(),
        };
        assert_eq!(
            resolve(&c).unwrap(),
            dir.path().join("libonnxruntime.so.1.32.0")
        );
    }

    #[test]
    fn missing_places_explain_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let empty = Candidate {
            source: Source::ProjectRuntime,
            path: dir.path().to_path_buf(),
        };
        assert!(resolve(&empty).unwrap_err().contains("no libonnxruntime"));
        let missing = Candidate {
            source: Source::EnvVar,
            path: dir.path().join("nope.so"),
        };
        assert_eq!(resolve(&missing).unwrap_err(), "no such file or folder");
    }
}
