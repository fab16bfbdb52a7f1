//! Engine tests of LoRA sets: each set is its own loaded model (its own load, with its
//! LoRAs), jobs batch only within one set, a LoRA that does not fit fails its jobs with
//! `InvalidArgument` and nothing else, idle sets make room for a new one under the memory
//! budget, and unloading a model unloads its sets.

use super::*;
use crate::lora::LoraSpec;

fn with_loras(model: &str, loras: &[(&str, f64)]) -> ResolvedRequest {
    let mut r = resolved(model, 4);
    r.loras = loras
        .iter()
        .map(|(n, s)| LoraSpec {
            name: n.to_string(),
            path: PathBuf::from(format!("/loras/{n}.safetensors")),
            scale: *s,
        })
        .collect();
    r
}

fn sorted_batches(h: &Harness) -> Vec<Vec<u64>> {
    let mut b: Vec<Vec<u64>> = h
        .batches()
        .into_iter()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    b.sort();
    b
}

#[test]
fn jobs_batch_only_with_jobs_of_the_same_lora_set() {
    let mut h = Harness::new(8);
    // Job 7 on model b holds the one worker at the gate until every job below is queued,
    // so the batches do not depend on how fast the worker picks the first one up.
    h.submit_with(7, resolved("b", 4), None);
    h.wait_started(7);
    h.submit_with(1, resolved("a", 4), None);
    h.submit_with(2, with_loras("a", &[("x", 0.8)]), None);
    h.submit_with(3, resolved("a", 4), None);
    h.submit_with(4, with_loras("a", &[("x", 0.8)]), None);
    h.submit_with(5, with_loras("a", &[("x", 0.5)]), None);
    h.submit_with(6, with_loras("a", &[("x", 0.8), ("y", 1.0)]), None);
    h.fake.gate.open();
    h.wait_finished(&[1, 2, 3, 4, 5, 6, 7]);
    for id in 1..=7 {
        assert_eq!(h.state(id), JobState::Succeeded, "job {id}");
    }
    assert_eq!(
        sorted_batches(&h),
        [vec![1, 3], vec![2, 4], vec![5], vec![6], vec![7]]
    );
    let mut loads = h.fake.loads.lock().unwrap().clone();
    loads.sort();
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        loads,
        [
            ("a".to_string(), names(&[])),
            ("a".to_string(), names(&["x"])),
            ("a".to_string(), names(&["x"])),
            ("a".to_string(), names(&["x", "y"])),
            ("b".to_string(), names(&[])),
        ],
        "one load per set (x at 0.8 and at 0.5 are two sets)"
    );
    let mut sets = h.engine.loaded_lora_sets("a");
    sets.sort();
    assert_eq!(sets, ["x=0.5", "x=0.8", "x=0.8,y=1"]);
    assert!(h.engine.loaded_lora_sets("b").is_empty());
    // Unloading the model unloads its sets too.
    h.engine.unload_model("a").unwrap();
    assert!(h.engine.loaded_lora_sets("a").is_empty());
    assert!(!h.engine.is_loaded("a"));
}

#[test]
fn a_lora_that_does_not_fit_fails_its_jobs_only() {
    let mut h = Harness::new(4);
    h.fake.gate.open();
    h.submit_with(1, with_loras("a", &[("misfit", 1.0)]), None);
    h.submit_with(2, resolved("a", 4), None);
    h.submit_with(3, with_loras("a", &[("x", 1.0)]), None);
    h.wait_finished(&[1, 2, 3]);
    match &h.finished[&1] {
        Outcome::Failed(Failure::InvalidArgument(m)) => {
            assert!(m.starts_with("'loras': /loras/misfit.safetensors"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.state(2), JobState::Succeeded);
    assert_eq!(h.state(3), JobState::Succeeded);
    assert_eq!(h.engine.loaded_lora_sets("a"), ["x=1"]);
    // The failed set is tried again by the next request for it (and fails again).
    h.submit_with(4, with_loras("a", &[("misfit", 1.0)]), None);
    h.wait_finished(&[4]);
    assert!(matches!(
        h.finished[&4],
        Outcome::Failed(Failure::InvalidArgument(_))
    ));
}

#[test]
fn idle_lora_sets_make_room_for_a_new_one_under_the_memory_budget() {
    let weights = bundle().memory.weights_bytes;
    assert!(weights > 0);
    // Room for the model and one set, not two.
    let budget = weights * 5 / 2;
    let mut h = Harness::with_workers(4, 1, Some(budget));
    h.fake.gate.open();
    h.submit_with(1, resolved("a", 4), None);
    h.wait_finished(&[1]);
    h.submit_with(2, with_loras("a", &[("x", 1.0)]), None);
    h.wait_finished(&[2]);
    assert_eq!(h.engine.loaded_lora_sets("a"), ["x=1"]);
    h.submit_with(3, with_loras("a", &[("y", 1.0)]), None);
    h.wait_finished(&[3]);
    assert_eq!(h.state(3), JobState::Succeeded);
    assert_eq!(
        h.engine.loaded_lora_sets("a"),
        ["y=1"],
        "x, idle and least recently used, made room"
    );
    assert!(h.engine.is_loaded("a"), "the model itself stays");
    // Without a budget, sets stay until they are idle too long.
    let mut h = Harness::with_workers(4, 1, None);
    h.fake.gate.open();
    h.submit_with(1, with_loras("a", &[("x", 1.0)]), None);
    h.submit_with(2, with_loras("a", &[("y", 1.0)]), None);
    h.wait_finished(&[1, 2]);
    let mut sets = h.engine.loaded_lora_sets("a");
    sets.sort();
    assert_eq!(sets, ["x=1", "y=1"]);
}
