//! Workers and their devices (`runtime.devices`): which worker runs on which GPU, with
//! which settings. Pure functions over the settings, the providers in use and the counts
//! the machine reports, so every rule is tested without a GPU.

use std::fmt;

use super::settings::{ProviderKind, RuntimeSettings};

/// The most workers one daemon runs.
pub const MAX_WORKERS: usize = 16;

/// Where one worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerDevice {
    /// The worker's number, 0 for the first.
    pub worker: usize,
    /// The GPU index its CUDA/TensorRT sessions use; `None` on the CPU provider.
    pub gpu: Option<u32>,
}

impl fmt::Display for WorkerDevice {
    /// `cuda:1` on a GPU; `cpu` for a lone CPU worker's first, `cpu#1` for the others.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.gpu {
            Some(id) => write!(f, "cuda:{id}"),
            None if self.worker == 0 => f.write_str("cpu"),
            None => write!(f, "cpu#{}", self.worker),
        }
    }
}

/// Checks `runtime.devices` on its own: at most [`MAX_WORKERS`] entries, none twice.
pub fn validate(devices: &[u32]) -> Result<(), String> {
    if devices.len() > MAX_WORKERS {
        return Err(format!(
            "runtime.devices: {} entries, more than the {MAX_WORKERS} workers diffusiond runs",
            devices.len()
        ));
    }
    for (i, d) in devices.iter().enumerate() {
        if devices[..i].contains(d) {
            return Err(format!(
                "runtime.devices: device {d} is listed twice (one worker per device)"
            ));
        }
    }
    Ok(())
}

/// Whether sessions run on an NVIDIA GPU with these providers.
pub fn on_gpu(providers: &[ProviderKind]) -> bool {
    providers
        .iter()
        .any(|p| matches!(p, ProviderKind::Cuda | ProviderKind::Tensorrt))
}

/// Checks that every GPU the workers use is one the driver reports (`count`).
pub fn check_present(devices: &[u32], count: usize) -> Result<(), String> {
    match devices.iter().find(|&&d| d as usize >= count) {
        Some(d) => Err(format!(
            "runtime.devices: there is no CUDA device {d} (the driver reports {count}: {})",
            match count {
                0 => "none".to_string(),
                1 => "device 0".to_string(),
                n => format!("devices 0 to {}", n - 1),
            }
        )),
        None => Ok(()),
    }
}

/// Each worker's device and session settings. On a GPU, each entry of `runtime.devices`
/// replaces the CUDA and TensorRT device ids; with no entries one worker keeps them. On
/// the CPU, the entries count workers, and when `session.intra_threads` is 0 (ONNX
/// Runtime's choice: every core) each worker gets its share of `cores`, so the workers
/// do not fight over the same cores.
pub fn plan(
    settings: &RuntimeSettings,
    providers: &[ProviderKind],
    cores: usize,
) -> Vec<(WorkerDevice, RuntimeSettings)> {
    let gpu = on_gpu(providers);
    let ids: Vec<Option<u32>> = if settings.devices.is_empty() {
        vec![None]
    } else {
        settings.devices.iter().map(|&d| Some(d)).collect()
    };
    let workers = ids.len();
    ids.into_iter()
        .enumerate()
        .map(|(worker, id)| {
            let mut s = settings.clone();
            let gpu_id = match (gpu, id) {
                (false, _) => None,
                (true, Some(d)) => {
                    let d_i32 = i32::try_from(d).unwrap_or(i32::MAX);
                    s.cuda.device_id = d_i32;
                    s.tensorrt.device_id = d_i32;
                    Some(d)
                }
                (true, None) => {
                    let first = if providers.first() == Some(&ProviderKind::Tensorrt) {
                        s.tensorrt.device_id
                    } else {
                        s.cuda.device_id
                    };
                    Some(u32::try_from(first).unwrap_or(0))
                }
            };
            if !gpu && workers > 1 && s.session.intra_threads == 0 {
                s.session.intra_threads = (cores / workers).max(1);
            }
            (
                WorkerDevice {
                    worker,
                    gpu: gpu_id,
                },
                s,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProviderKind::*;

    fn with_devices(devices: &[u32]) -> RuntimeSettings {
        RuntimeSettings {
            devices: devices.to_vec(),
            ..RuntimeSettings::default()
        }
    }

    #[test]
    fn no_entries_is_one_worker_on_the_configured_device() {
        let mut s = with_devices(&[]);
        s.cuda.device_id = 2;
        let plan = plan(&s, &[Cuda, Cpu], 8);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].0.gpu, Some(2));
        assert_eq!(plan[0].0.to_string(), "cuda:2");
        assert_eq!(plan[0].1, s);
        let plan = super::plan(&s, &[Cpu], 8);
        assert_eq!(plan[0].0.to_string(), "cpu");
        assert_eq!(
            plan[0].1.session.intra_threads, 0,
            "one worker keeps ORT's choice"
        );
    }

    #[test]
    fn each_gpu_entry_replaces_both_device_ids() {
        let plan = plan(&with_devices(&[1, 3]), &[Tensorrt, Cuda, Cpu], 8);
        let ids: Vec<_> = plan
            .iter()
            .map(|(d, s)| (d.worker, d.gpu, s.cuda.device_id, s.tensorrt.device_id))
            .collect();
        assert_eq!(ids, vec![(0, Some(1), 1, 1), (1, Some(3), 3, 3)]);
        assert_eq!(plan[1].0.to_string(), "cuda:3");
        assert_eq!(
            plan[0].1.session.intra_threads, 0,
            "GPU workers keep the thread setting"
        );
    }

    #[test]
    fn cpu_workers_share_the_cores_unless_threads_are_set() {
        let plan = plan(&with_devices(&[0, 1]), &[Cpu], 8);
        let shown: Vec<_> = plan
            .iter()
            .map(|(d, s)| (d.to_string(), s.session.intra_threads))
            .collect();
        assert_eq!(shown, vec![("cpu".into(), 4), ("cpu#1".into(), 4)]);
        let three = super::plan(&with_devices(&[0, 1, 2]), &[Cpu], 2);
        assert!(three.iter().all(|(_, s)| s.session.intra_threads == 1));
        let mut fixed = with_devices(&[0, 1]);
        fixed.session.intra_threads = 3;
        let kept = super::plan(&fixed, &[Cpu], 8);
        assert!(kept.iter().all(|(_, s)| s.session.intra_threads == 3));
    }

    #[test]
    fn a_gpu_fallback_to_cpu_keeps_the_worker_count() {
        // `devices = [0, 1]` with CUDA asked for but skipped (no device): two CPU workers.
        let plan = plan(&with_devices(&[0, 1]), &[Cpu], 2);
        assert_eq!(plan.len(), 2);
        assert!(plan.iter().all(|(d, _)| d.gpu.is_none()));
    }

    #[test]
    fn duplicates_and_too_many_entries_are_refused() {
        assert!(validate(&[0, 1]).is_ok());
        assert!(validate(&[]).is_ok());
        assert_eq!(
            validate(&[0, 1, 0]).unwrap_err(),
            "runtime.devices: device 0 is listed twice (one worker per device)"
        );
        let many: Vec<u32> = (0..17).collect();
        assert!(validate(&many).unwrap_err().contains("17 entries"));
    }

    #[test]
    fn absent_gpus_are_named() {
        assert!(check_present(&[0, 1], 2).is_ok());
        assert_eq!(
            check_present(&[0, 1], 1).unwrap_err(),
            "runtime.devices: there is no CUDA device 1 (the driver reports 1: device 0)"
        );
        assert!(
            check_present(&[4], 4)
                .unwrap_err()
                .contains("devices 0 to 3")
        );
    }
}
