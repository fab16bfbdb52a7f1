//! Engine tests with several workers (`runtime.devices`): batches spread over idle
//! workers and run at once, each worker's own model copy, a load that fails on one
//! worker only, cancel on one worker, and the memory budget shared by running batches.

use super::*;
use std::collections::HashSet;

/// Waits until `n` jobs have started and the fake holds `n` batches at its gate (a batch
/// reports its start just before it enters the fake, so the last step polls briefly).
fn until_batches(h: &mut Harness, n: usize) {
    h.until("batches to start", |h| h.started.len() >= n);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.fake.by_worker.lock().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "{n} batches never reached the fake"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn load(h: &Harness, model: &str) -> Result<(), Failure> {
    let rx = h.engine.load_model(model).unwrap();
    h.rt.block_on(rx).expect("the load answers")
}

fn device(h: &Harness, id: JobId) -> String {
    match &h.finished[&id] {
        Outcome::Succeeded(out) => out.device.clone(),
        other => panic!("job {id} did not succeed: {other:?}"),
    }
}

#[test]
fn idle_workers_share_compatible_jobs_and_run_at_once() {
    let mut h = Harness::with_workers(4, 2, None);
    assert_eq!(h.engine.devices(), ["fake0", "fake1"]);
    load(&h, "a").unwrap();
    assert!(h.engine.is_loaded("a"));
    // Four compatible jobs, both workers idle: each takes a share (how the four split
    // depends on when each worker looks; `queue::fair_share` is tested on its own), and
    // two batches are in flight at once (the gate holds them until both have started).
    for id in 1..=4 {
        h.submit(id, "a", 0);
    }
    until_batches(&mut h, 2);
    h.fake.gate.open();
    h.wait_finished(&[1, 2, 3, 4]);
    let runs = h.fake.by_worker.lock().unwrap().clone();
    let mut seeds: Vec<u64> = runs.iter().flat_map(|(_, s)| s.clone()).collect();
    seeds.sort();
    assert_eq!(seeds, vec![1, 2, 3, 4], "each job ran once: {runs:?}");
    assert!(runs.iter().any(|(w, _)| *w == 0) && runs.iter().any(|(w, _)| *w == 1));
    assert_eq!(
        h.fake.concurrent.lock().unwrap().1,
        2,
        "two batches ran at once"
    );
    let devices: HashSet<String> = (1..=4).map(|id| device(&h, id)).collect();
    assert_eq!(devices.len(), 2);
}

#[test]
fn a_busy_worker_leaves_the_queue_to_the_idle_one() {
    let mut h = Harness::with_workers(1, 2, None);
    load(&h, "a").unwrap();
    h.submit(1, "a", 0);
    h.wait_started(1);
    // Worker 0 or 1 holds job 1 at the gate; the other takes job 2 meanwhile.
    h.submit(2, "a", 0);
    until_batches(&mut h, 2);
    h.fake.gate.open();
    h.wait_finished(&[1, 2]);
    assert_ne!(device(&h, 1), device(&h, 2));
}

#[test]
fn a_model_that_fails_on_one_worker_runs_on_the_other() {
    let mut h = Harness::with_workers(1, 2, None);
    let err = load(&h, "flaky").unwrap_err();
    assert_eq!(
        err,
        Failure::ModelLoad("on fake1: out of device memory".into()),
        "LoadModel names the worker that failed"
    );
    assert_eq!(h.engine.model_state("flaky"), ModelState::Loaded);
    for id in 1..=3 {
        h.submit(id, "flaky", 0);
    }
    h.fake.gate.open();
    h.wait_finished(&[1, 2, 3]);
    assert!((1..=3).all(|id| h.state(id) == JobState::Succeeded));
    assert!((1..=3).all(|id| device(&h, id) == "fake0"));
}

#[test]
fn a_model_that_fails_everywhere_fails_its_jobs_once() {
    let mut h = Harness::with_workers(1, 3, None);
    h.submit(1, "broken", 0);
    h.submit(2, "broken", 0);
    h.wait_finished(&[1, 2]);
    for id in [1, 2] {
        match &h.finished[&id] {
            Outcome::Failed(Failure::ModelLoad(m)) => assert!(
                m.starts_with("model 'broken' failed to load: on fake")
                    && m.ends_with("no weights"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }
    // The daemon keeps serving the other models on every worker.
    h.submit(3, "a", 0);
    h.fake.gate.open();
    h.wait_finished(&[3]);
    assert_eq!(h.state(3), JobState::Succeeded);
}

#[test]
fn cancel_stops_only_the_batch_of_its_worker() {
    let mut h = Harness::with_workers(1, 2, None);
    load(&h, "a").unwrap();
    h.submit(1, "a", 0);
    h.submit(2, "a", 0);
    until_batches(&mut h, 2);
    assert!(h.engine.cancel(2));
    h.wait_finished(&[2]);
    assert_eq!(h.state(2), JobState::Cancelled);
    assert!(!h.finished.contains_key(&1), "job 1 still runs");
    h.fake.gate.open();
    h.wait_finished(&[1]);
    assert_eq!(h.state(1), JobState::Succeeded);
}

#[test]
fn running_batches_share_the_memory_budget() {
    let one = bundle().memory.peak(64, 64, 1, true);
    // Room for one 64x64 image with guidance, not for two batches at once.
    let mut h = Harness::with_workers(1, 2, Some(one + one / 2));
    load(&h, "a").unwrap();
    for id in 1..=3 {
        h.submit(id, "a", 0);
    }
    h.fake.gate.open();
    h.wait_finished(&[1, 2, 3]);
    assert!((1..=3).all(|id| h.state(id) == JobState::Succeeded));
    assert_eq!(
        h.fake.concurrent.lock().unwrap().1,
        1,
        "the second worker waited for memory"
    );
}

#[test]
fn shutdown_stops_every_worker() {
    let mut h = Harness::with_workers(1, 3, None);
    load(&h, "a").unwrap();
    for id in 1..=3 {
        h.submit(id, "a", 0);
    }
    until_batches(&mut h, 3);
    h.engine.shutdown(Duration::ZERO);
    h.worker.take().unwrap().join();
    h.wait_finished(&[1, 2, 3]);
    assert!((1..=3).all(|id| h.state(id) == JobState::Cancelled));
}
