//! Execution-provider choice: the configured order, minus what this build or this
//! ONNX Runtime library cannot do, with every fallback logged.

use ort::ep::ExecutionProviderDispatch;

use super::settings::{ProviderKind, RuntimeSettings};
use super::tensorrt::SessionPlan;

/// A provider that was asked for but will not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// The provider skipped.
    pub provider: ProviderKind,
    /// Why, for the log.
    pub reason: String,
}

/// Decides which of the requested providers to use, in order.
///
/// `library_has` says whether the loaded ONNX Runtime lists a provider. The CPU provider
/// is always last, whether or not it was asked for, because ONNX Runtime runs any node
/// the other providers reject on it anyway.
pub fn plan(
    requested: &[ProviderKind],
    library_has: impl Fn(ProviderKind) -> bool,
) -> (Vec<ProviderKind>, Vec<Fallback>) {
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    for &p in requested {
        if chosen.contains(&p) {
            continue;
        }
        let reason = if !p.compiled_in() {
            Some(format!(
                "this diffusiond was built without the '{p}' cargo feature"
            ))
        } else if !library_has(p) {
            Some(format!(
                "the loaded ONNX Runtime has no {} (install onnxruntime-gpu: scripts/setup --gpu)",
                p.ort_name()
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => skipped.push(Fallback {
                provider: p,
                reason,
            }),
            None => chosen.push(p),
        }
    }
    if !chosen.contains(&ProviderKind::Cpu) {
        chosen.push(ProviderKind::Cpu);
    }
    (chosen, skipped)
}

/// Drops the chosen providers that `probe` says cannot run on this machine (a library
/// missing, no NVIDIA driver, no CUDA device), keeping the order and the reason. The CPU
/// provider is never probed.
pub fn confirm(
    chosen: Vec<ProviderKind>,
    probe: impl Fn(ProviderKind) -> Result<(), String>,
) -> (Vec<ProviderKind>, Vec<Fallback>) {
    let mut kept = Vec::new();
    let mut skipped = Vec::new();
    for p in chosen {
        let usable = if p == ProviderKind::Cpu {
            Ok(())
        } else {
            probe(p)
        };
        match usable {
            Ok(()) => kept.push(p),
            Err(reason) => skipped.push(Fallback {
                provider: p,
                reason,
            }),
        }
    }
    (kept, skipped)
}

/// Builds the `ort` dispatch for one provider from the settings, for a session with no
/// [`SessionPlan`] (TensorRT then gets no profile and no caches: see [`dispatch_for`]).
pub fn dispatch(kind: ProviderKind, settings: &RuntimeSettings) -> ExecutionProviderDispatch {
    dispatch_for(kind, settings, None)
}

/// Builds the `ort` dispatch for one provider of one session; `plan` is that session's
/// TensorRT profile and keyed cache folders ([`super::tensorrt::plan`]).
pub fn dispatch_for(
    kind: ProviderKind,
    settings: &RuntimeSettings,
    plan: Option<&SessionPlan>,
) -> ExecutionProviderDispatch {
    #[cfg(not(feature = "tensorrt"))]
    let _ = plan;
    match kind {
        ProviderKind::Cpu => ort::ep::CPU::default()
            .with_arena_allocator(settings.session.cpu_arena)
            .build(),
        #[cfg(feature = "cuda")]
        ProviderKind::Cuda => cuda(settings),
        #[cfg(feature = "tensorrt")]
        ProviderKind::Tensorrt => tensorrt(settings, plan),
        // `plan` never chooses a provider that is not compiled in.
        #[allow(unreachable_patterns)]
        _ => ort::ep::CPU::default().build(),
    }
    .error_on_failure()
}

/// The CUDA provider with the `[runtime.cuda]` options (already typed and checked when
/// the config was loaded, so nothing here can fall back).
#[cfg(feature = "cuda")]
fn cuda(settings: &RuntimeSettings) -> ExecutionProviderDispatch {
    let c = &settings.cuda;
    let mut ep = ort::ep::CUDA::default()
        .with_device_id(c.device_id)
        .with_arena_extend_strategy(c.arena_extend_strategy.to_ort())
        .with_conv_algorithm_search(c.conv_algorithm_search.to_ort())
        .with_cuda_graph(c.cuda_graph);
    if c.memory_limit > 0 {
        ep = ep.with_memory_limit(c.memory_limit);
    }
    ep.build()
}

/// The TensorRT provider with the `[runtime.tensorrt]` options and one session's plan: its
/// optimization profile and its keyed engine and timing cache folders. Without a plan
/// there are no caches, since only a plan's folders are keyed to the graph.
#[cfg(feature = "tensorrt")]
fn tensorrt(settings: &RuntimeSettings, plan: Option<&SessionPlan>) -> ExecutionProviderDispatch {
    let t = &settings.tensorrt;
    let mut ep = ort::ep::TensorRT::default()
        .with_device_id(t.device_id)
        .with_fp16(t.fp16)
        .with_builder_optimization_level(t.builder_optimization_level.get())
        .with_cuda_graph(t.cuda_graph);
    let Some(plan) = plan else {
        return ep.build();
    };
    if let Some(p) = &plan.profile {
        ep = ep
            .with_profile_min_shapes(p.min_shapes())
            .with_profile_opt_shapes(p.opt_shapes())
            .with_profile_max_shapes(p.max_shapes());
    }
    if let Some(dir) = &plan.engine_cache_dir {
        ep = ep
            .with_engine_cache(true)
            .with_engine_cache_path(dir.display());
    }
    if let Some(dir) = &plan.timing_cache_dir {
        ep = ep
            .with_timing_cache(true)
            .with_timing_cache_path(dir.display());
    }
    ep.build()
}

/// The settings one session's providers get: CUDA graphs (`cuda.cuda_graph`,
/// `tensorrt.cuda_graph`) only for the UNet, whose steps run through IoBinding with a
/// graph id per shape; the text encoders and VAEs run plain, once per generation, and a
/// captured graph would be replayed for their next, differently shaped run.
pub fn for_component(
    settings: &RuntimeSettings,
    component: Option<super::tensorrt::Component>,
) -> std::borrow::Cow<'_, RuntimeSettings> {
    let graphs = settings.cuda.cuda_graph || settings.tensorrt.cuda_graph;
    if !graphs || component == Some(super::tensorrt::Component::Unet) {
        return std::borrow::Cow::Borrowed(settings);
    }
    let mut plain = settings.clone();
    plain.cuda.cuda_graph = false;
    plain.tensorrt.cuda_graph = false;
    std::borrow::Cow::Owned(plain)
}

/// Checks what the types of [`RuntimeSettings`] cannot: that the provider list is not
/// empty, and that the TensorRT profile sizes are in order. Provider options (`runtime.cuda.*`, `runtime.tensorrt.*`) are typed and are
/// refused, naming their key, when the config is deserialized.
pub fn validate(settings: &RuntimeSettings) -> Result<(), String> {
    if settings.execution_providers.is_empty() {
        return Err("runtime.execution_providers: the list is empty (use [\"cpu\"])".into());
    }
    settings.tensorrt.validate()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProviderKind::*;

    #[test]
    fn cpu_only_is_kept() {
        let (chosen, skipped) = plan(&[Cpu], |_| true);
        assert_eq!(chosen, vec![Cpu]);
        assert!(skipped.is_empty());
    }

    #[test]
    fn unavailable_gpu_providers_fall_back_to_cpu_in_order() {
        let (chosen, skipped) = plan(&[Tensorrt, Cuda, Cpu], |p| p == Cpu);
        assert_eq!(chosen, vec![Cpu]);
        assert_eq!(
            skipped.iter().map(|f| f.provider).collect::<Vec<_>>(),
            vec![Tensorrt, Cuda]
        );
    }

    #[test]
    fn cpu_is_appended_when_not_requested() {
        let (chosen, _) = plan(&[Cuda], |_| true);
        assert_eq!(*chosen.last().unwrap(), Cpu);
    }

    #[test]
    fn providers_that_cannot_run_here_are_dropped_with_their_reason() {
        let (kept, skipped) = confirm(vec![Tensorrt, Cuda, Cpu], |p| match p {
            Tensorrt => Err("libnvinfer.so.10: cannot open shared object file".into()),
            Cuda => Err("no CUDA device (CUresult 100)".into()),
            Cpu => panic!("the CPU provider is not probed"),
        });
        assert_eq!(kept, vec![Cpu]);
        assert_eq!(
            skipped,
            vec![
                Fallback {
                    provider: Tensorrt,
                    reason: "libnvinfer.so.10: cannot open shared object file".into()
                },
                Fallback {
                    provider: Cuda,
                    reason: "no CUDA device (CUresult 100)".into()
                },
            ]
        );
        let (kept, skipped) = confirm(vec![Cuda, Cpu], |_| Ok(()));
        assert_eq!((kept, skipped.len()), (vec![Cuda, Cpu], 0));
    }

    #[test]
    fn cuda_graphs_are_for_the_unet_only() {
        use crate::runtime::tensorrt::Component;
        let mut s = RuntimeSettings::default();
        s.cuda.cuda_graph = true;
        s.tensorrt.cuda_graph = true;
        assert!(for_component(&s, Some(Component::Unet)).cuda.cuda_graph);
        for other in [
            None,
            Some(Component::TextEncoder),
            Some(Component::VaeDecoder),
            Some(Component::VaeEncoder),
        ] {
            let plain = for_component(&s, other);
            assert!(
                !plain.cuda.cuda_graph && !plain.tensorrt.cuda_graph,
                "{other:?}"
            );
        }
        let off = RuntimeSettings::default();
        assert!(matches!(
            for_component(&off, None),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn duplicates_are_ignored() {
        let (chosen, skipped) = plan(&[Cpu, Cpu], |_| true);
        assert_eq!(chosen, vec![Cpu]);
        assert!(skipped.is_empty());
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn compiled_and_listed_provider_is_chosen_first() {
        let (chosen, skipped) = plan(&[Tensorrt, Cuda, Cpu], |p| p != Tensorrt);
        assert_eq!(chosen, vec![Cuda, Cpu]);
        assert_eq!(skipped[0].provider, Tensorrt);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn provider_missing_from_build_names_the_feature() {
        let (_, skipped) = plan(&[Cuda], |_| true);
        assert!(skipped[0].reason.contains("'cuda' cargo feature"));
    }

    /// Bad provider option values (`runtime.cuda.*`, `runtime.tensorrt.*`) no longer reach
    /// `validate`: they are refused at load, naming the key (see the tests in `settings`).
    #[test]
    fn bad_options_name_the_key() {
        let mut s = RuntimeSettings::default();
        s.execution_providers.clear();
        assert!(
            validate(&s)
                .unwrap_err()
                .starts_with("runtime.execution_providers:")
        );
        assert!(validate(&RuntimeSettings::default()).is_ok());
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn typed_cuda_options_build_a_dispatch() {
        use crate::runtime::settings::{ArenaExtendStrategy, ConvAlgorithmSearch};
        let mut s = RuntimeSettings::default();
        s.cuda.arena_extend_strategy = ArenaExtendStrategy::SameAsRequested;
        s.cuda.conv_algorithm_search = ConvAlgorithmSearch::Heuristic;
        assert_eq!(dispatch(Cuda, &s).name(), "CUDAExecutionProvider");
    }

    #[cfg(feature = "tensorrt")]
    #[test]
    fn typed_tensorrt_options_build_a_dispatch() {
        let mut s = RuntimeSettings::default();
        s.tensorrt.builder_optimization_level = 5.try_into().unwrap();
        assert_eq!(dispatch(Tensorrt, &s).name(), "TensorrtExecutionProvider");
        let plan = SessionPlan {
            profile: Some(crate::runtime::tensorrt::Profile {
                ranges: vec![crate::runtime::tensorrt::ShapeRange {
                    input: "sample".into(),
                    min: vec![1, 4, 8, 8],
                    opt: vec![2, 4, 64, 64],
                    max: vec![8, 4, 128, 128],
                }],
            }),
            engine_cache_dir: Some("/var/cache/diffusiond/trt/0123456789abcdef".into()),
            timing_cache_dir: Some("/var/cache/diffusiond/timing/fedcba9876543210".into()),
        };
        assert_eq!(
            dispatch_for(Tensorrt, &s, Some(&plan)).name(),
            "TensorrtExecutionProvider"
        );
    }
}
