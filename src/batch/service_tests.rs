//! Tests of the batch service with a real store and engine, and a backend whose models
//! take seconds to fail loading (so every batch stays unfinished while the test runs):
//! submissions from many threads at once against the per-uid bound.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use super::*;
use crate::config::JobSettings;
use crate::jobs::{Backend, Failure, Model, RunControl};
use crate::model::{ModelBundle, ModelSpec};
use crate::request::ModelDefaults;

/// Loads nothing, slowly: batches wait for the load and stay running meanwhile.
struct SlowBackend;

impl Backend for SlowBackend {
    fn workers(&self) -> Vec<String> {
        vec!["cpu".into()]
    }

    fn load(
        &self,
        _name: &str,
        _bundle: &Arc<ModelBundle>,
        _loras: &[crate::lora::LoraSpec],
        _worker: usize,
    ) -> Result<Box<dyn Model>, Failure> {
        std::thread::sleep(Duration::from_secs(3));
        Err(Failure::ModelLoad("test backend: no model".into()))
    }

    fn run_control(&self) -> Result<RunControl, String> {
        Ok(RunControl::default())
    }

    fn runtime_version(&self) -> &str {
        "test"
    }
}

struct NoEvents;

impl Events for NoEvents {
    fn item_finished(&self, _: BatchId, _: &str, _: Option<&str>, _: &Progress) {}
    fn state_changed(&self, _: BatchId, _: BatchState, _: &str) {}
}

fn manifest(tag: usize, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| format!("{{\"prompt\":\"{tag} {i}\",\"steps\":2,\"width\":64,\"height\":64}}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn parallel_submissions_cannot_pass_max_batches_per_caller() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits::default();
    let spec = ModelSpec {
        name: "tiny".into(),
        path: Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/tiny-sd15"),
        defaults: ModelDefaults::NONE,
    };
    let catalog = Arc::new(Catalog::open([spec], Some("tiny".into()), &limits));
    let (events, _keep) = tokio::sync::mpsc::unbounded_channel();
    let (engine, workers) = Engine::start(
        Arc::new(SlowBackend),
        catalog.clone(),
        JobSettings::default(),
        None,
        events,
    )
    .unwrap();
    let settings = BatchSettings {
        max_items: 100_000,
        quota: Quota {
            unfinished: 1,
            ..Quota::UNBOUNDED
        },
        retention: Retention {
            fetched_secs: 3600,
            unfetched_secs: 3600,
        },
        window: 2,
    };
    let service = Service::open(
        dir.path(),
        engine.clone(),
        catalog,
        limits,
        settings,
        Arc::new(NoEvents),
    )
    .unwrap();
    let submission = Submission {
        format: Format::Jsonl,
        defaults: GenerateRequest::default(),
        base_seed: Some(1),
        shard: Shard::ALL,
        label: "/out".into(),
    };
    // Small manifests: the callers reach the check together; many rounds, each its own uid.
    let callers = 8;
    let mut over = Vec::new();
    for round in 0..20u32 {
        let owner = 1000 + round;
        let manifests: Vec<Vec<u8>> = (0..callers)
            .map(|k| manifest(round as usize * 100 + k, 2))
            .collect();
        let barrier = Barrier::new(callers);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = manifests
                .iter()
                .map(|m| {
                    let (service, submission, barrier) = (&service, &submission, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        service.submit(owner, m, submission)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                e.to_string()
                    .contains("(limits.max_batches_per_caller = 1)"),
                "{e}"
            );
        }
        let accepted = results.iter().filter(|r| r.is_ok()).count();
        let unfinished = service
            .batches()
            .unwrap()
            .iter()
            .filter(|r| r.owner == owner && !r.state.is_final())
            .count();
        if (accepted, unfinished) != (1, 1) {
            over.push((round, accepted, unfinished));
        }
    }
    service.stop_all();
    engine.shutdown(Duration::ZERO);
    workers.join();
    assert!(
        over.is_empty(),
        "(round, accepted, unfinished) of {callers} parallel submissions against a limit of 1: {over:?}"
    );
}
