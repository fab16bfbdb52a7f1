//! The GPU side of ONNX Runtime: preloading the CUDA, cuDNN and TensorRT libraries that
//! `scripts/setup --gpu` installs in pip's layout, and probing, before any session is
//! built, whether the CUDA and TensorRT providers can run here, with the exact reason when
//! they cannot (a library missing, and which; no NVIDIA driver; no CUDA device).
//!
//! The preload follows what onnxruntime's Python package does in `preload_dlls()` for a
//! CUDA 13 build: the libraries are opened by full path from `site-packages/nvidia/...`
//! (here: the folder two levels above the loaded `libonnxruntime.so`, which is
//! `onnxruntime/capi/` in a wheel), in dependency order, so that the provider libraries'
//! `DT_NEEDED` entries resolve to them without `LD_LIBRARY_PATH`. Libraries that are not
//! there are left to the system loader (a system-wide CUDA install, Jetson's JetPack).
//! The plans are pure functions of the folder's contents; opening is the only effect.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::settings::ProviderKind;

/// The CUDA 13 and cuDNN 9 libraries of the pip wheels, in load order, by their folder
/// below `nvidia/` (onnxruntime 1.31's `_get_nvidia_dll_paths` for Linux, CUDA 13).
pub const CUDA_LIBRARIES: &[(&str, &str)] = &[
    ("cu13", "libcublasLt.so.13"),
    ("cu13", "libcublas.so.13"),
    ("cu13", "libnvrtc.so.13"),
    ("cu13", "libcurand.so.10"),
    ("cu13", "libcufft.so.12"),
    ("cu13", "libcudart.so.13"),
    ("cudnn", "libcudnn.so.9"),
];

/// The TensorRT 10 libraries of the `tensorrt-cu13-libs` wheel (folder `tensorrt_libs/`).
pub const TENSORRT_LIBRARIES: &[&str] = &["libnvinfer.so.10", "libnvonnxparser.so.10"];

/// The file name of a provider's shared library inside ONNX Runtime's folder.
pub fn provider_library_name(kind: ProviderKind) -> Option<&'static str> {
    match kind {
        ProviderKind::Cuda => Some("libonnxruntime_providers_cuda.so"),
        ProviderKind::Tensorrt => Some("libonnxruntime_providers_tensorrt.so"),
        ProviderKind::Cpu => None,
    }
}

/// The files to preload for the ONNX Runtime library at `ort_library` (its real path),
/// in order: each CUDA, cuDNN and TensorRT library found in pip's layout two levels up
/// (`<site>/nvidia/<dir>/lib/<name>`, `<site>/tensorrt_libs/<name>`) or beside the
/// library itself (an offline bundle may flatten them). `exists` says whether a file is
/// there. Empty when the library's folder holds no GPU provider.
pub fn preload_plan(ort_library: &Path, exists: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let Some(dir) = ort_library.parent() else {
        return Vec::new();
    };
    let has_gpu_provider = [ProviderKind::Cuda, ProviderKind::Tensorrt]
        .iter()
        .filter_map(|&k| provider_library_name(k))
        .any(|name| exists(&dir.join(name)));
    if !has_gpu_provider {
        return Vec::new();
    }
    let site = dir.parent().and_then(Path::parent);
    let pick = |in_site: Option<PathBuf>, name: &str| -> Option<PathBuf> {
        in_site
            .filter(|p| exists(p))
            .or_else(|| Some(dir.join(name)).filter(|p| exists(p)))
    };
    let cuda = CUDA_LIBRARIES.iter().filter_map(|(sub, name)| {
        pick(
            site.map(|s| s.join("nvidia").join(sub).join("lib").join(name)),
            name,
        )
    });
    let tensorrt = TENSORRT_LIBRARIES
        .iter()
        .filter_map(|name| pick(site.map(|s| s.join("tensorrt_libs").join(name)), name));
    cuda.chain(tensorrt).collect()
}

/// Libraries opened by this process and kept open for its lifetime (ONNX Runtime's
/// provider libraries resolve against them).
static KEPT: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());

/// Opens a library by path and keeps it loaded; the loader's message on failure.
fn open_and_keep(path: &Path) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: these are the CUDA/cuDNN/TensorRT/ONNX Runtime provider libraries, whose
    // initialisers only register their own state; they are never unloaded (kept below),
    // so no symbol outlives its library.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| loader_message(&e))?;
    KEPT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(lib.into());
    Ok(())
}

/// The loader's own message (`dlerror()`), not libloading's "dlopen failed".
fn loader_message(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(source) => source.to_string(),
        None => e.to_string(),
    }
}

/// Preloads what [`preload_plan`] lists for `ort_library`; each failure is logged (the
/// provider probe then names the library its provider misses).
pub fn preload(ort_library: &Path) {
    let real = std::fs::canonicalize(ort_library).unwrap_or_else(|_| ort_library.to_path_buf());
    for path in preload_plan(&real, Path::exists) {
        match open_and_keep(&path) {
            Ok(()) => tracing::debug!(path = %path.display(), "preloaded"),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not preload"),
        }
    }
}

/// Whether a provider can run here: its library loads (with everything it links) and,
/// for the NVIDIA providers, the driver reports a CUDA device. `Err` says why not.
pub fn probe(kind: ProviderKind, ort_library: &Path) -> Result<(), String> {
    let Some(name) = provider_library_name(kind) else {
        return Ok(());
    };
    let real = std::fs::canonicalize(ort_library).unwrap_or_else(|_| ort_library.to_path_buf());
    let file = real.parent().unwrap_or(Path::new(".")).join(name);
    if !file.exists() {
        return Err(format!("{name} is not beside {}", real.display()));
    }
    open_and_keep(&file).map_err(|e| format!("{name} cannot be loaded: {e}"))?;
    match cuda_devices()? {
        0 => Err("no CUDA device (the NVIDIA driver reports none)".into()),
        _ => Ok(()),
    }
}

/// The number of CUDA devices the driver sees (`cuInit`, `cuDeviceGetCount` from
/// `libcuda.so.1`); `Err` when there is no driver or it fails.
pub fn cuda_devices() -> Result<usize, String> {
    // SAFETY: libcuda.so.1 is NVIDIA's driver library; opening it runs no user code
    // beyond its initialisers, and it stays loaded while `lib` lives (to the end).
    let lib = unsafe { libloading::Library::new("libcuda.so.1") }.map_err(|e| {
        format!(
            "no NVIDIA driver (libcuda.so.1 cannot be loaded: {})",
            loader_message(&e)
        )
    })?;
    // SAFETY: the CUDA driver API declares `CUresult cuInit(unsigned int)` and
    // `CUresult cuDeviceGetCount(int *)` with the C ABI; CUresult is an int.
    let count = unsafe {
        let init: libloading::Symbol<unsafe extern "C" fn(u32) -> i32> =
            lib.get(b"cuInit").map_err(|e| e.to_string())?;
        let get_count: libloading::Symbol<unsafe extern "C" fn(*mut i32) -> i32> =
            lib.get(b"cuDeviceGetCount").map_err(|e| e.to_string())?;
        let status = init(0);
        if status != 0 {
            return Err(cuda_error(status));
        }
        let mut n = 0i32;
        let status = get_count(&mut n);
        if status != 0 {
            return Err(cuda_error(status));
        }
        n
    };
    Ok(count.max(0) as usize)
}

/// A CUDA driver error code in words (the codes a probe meets; others by number).
pub fn cuda_error(code: i32) -> String {
    let what = match code {
        100 => "no CUDA device",
        3 => "the driver failed to initialise",
        35 | 803 => "the NVIDIA driver is too old for this CUDA",
        999 => "unknown CUDA error",
        _ => "CUDA driver error",
    };
    format!("{what} (CUresult {code})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn files(list: &[&str]) -> HashSet<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn a_cpu_build_preloads_nothing() {
        let fs = files(&[
            "/r/python/onnxruntime/capi/libonnxruntime.so.1.32.0",
            "/r/python/nvidia/cu13/lib/libcudart.so.13",
        ]);
        let plan = preload_plan(
            Path::new("/r/python/onnxruntime/capi/libonnxruntime.so.1.32.0"),
            |p| fs.contains(p),
        );
        assert!(plan.is_empty());
    }

    #[test]
    fn pip_layout_libraries_load_in_dependency_order_and_missing_ones_are_skipped() {
        let fs = files(&[
            "/r/python/onnxruntime/capi/libonnxruntime_providers_cuda.so",
            "/r/python/nvidia/cu13/lib/libcudart.so.13",
            "/r/python/nvidia/cu13/lib/libcublas.so.13",
            "/r/python/nvidia/cu13/lib/libcublasLt.so.13",
            "/r/python/nvidia/cudnn/lib/libcudnn.so.9",
            "/r/python/tensorrt_libs/libnvinfer.so.10",
        ]);
        let plan = preload_plan(
            Path::new("/r/python/onnxruntime/capi/libonnxruntime.so.1.31.1"),
            |p| fs.contains(p),
        );
        let names: Vec<_> = plan
            .iter()
            .map(|p| p.strip_prefix("/r/python").unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "nvidia/cu13/lib/libcublasLt.so.13",
                "nvidia/cu13/lib/libcublas.so.13",
                "nvidia/cu13/lib/libcudart.so.13",
                "nvidia/cudnn/lib/libcudnn.so.9",
                "tensorrt_libs/libnvinfer.so.10",
            ]
        );
    }

    #[test]
    fn libraries_beside_onnx_runtime_count_when_the_pip_layout_is_absent() {
        let fs = files(&[
            "/opt/d/lib/libonnxruntime_providers_tensorrt.so",
            "/opt/d/lib/libcudart.so.13",
            "/opt/d/lib/libnvinfer.so.10",
        ]);
        let plan = preload_plan(Path::new("/opt/d/lib/libonnxruntime.so.1.31.1"), |p| {
            fs.contains(p)
        });
        assert_eq!(
            plan,
            [
                PathBuf::from("/opt/d/lib/libcudart.so.13"),
                PathBuf::from("/opt/d/lib/libnvinfer.so.10"),
            ]
        );
    }

    #[test]
    fn cuda_errors_read_as_words() {
        assert_eq!(cuda_error(100), "no CUDA device (CUresult 100)");
        assert!(cuda_error(35).contains("too old"));
        assert!(cuda_error(7).contains("CUresult 7"));
    }

    #[test]
    fn a_missing_provider_library_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libonnxruntime.so.1.31.1");
        std::fs::write(&lib, b"").unwrap();
        let err = probe(ProviderKind::Cuda, &lib).unwrap_err();
        assert!(
            err.contains("libonnxruntime_providers_cuda.so is not beside"),
            "{err}"
        );
        assert_eq!(probe(ProviderKind::Cpu, &lib), Ok(()));
    }

    #[test]
    fn a_provider_library_that_cannot_load_gives_the_loaders_reason() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libonnxruntime.so.1.31.1");
        std::fs::write(&lib, b"").unwrap();
        std::fs::write(
            dir.path().join("libonnxruntime_providers_tensorrt.so"),
            b"junk",
        )
        .unwrap();
        let err = probe(ProviderKind::Tensorrt, &lib).unwrap_err();
        assert!(
            err.starts_with("libonnxruntime_providers_tensorrt.so cannot be loaded: "),
            "{err}"
        );
        assert!(
            err.contains("too short") || err.contains("invalid ELF"),
            "{err}"
        );
    }
}
