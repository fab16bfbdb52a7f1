//! Engine tests of work that goes first between two steps of a running batch
//! ([`crate::jobs::preempt`]): interactive jobs over batch items, a higher priority, the
//! time slice between callers, and batch items put back when memory holds only one.

use super::*;

/// Batch items `ids` of `steps` steps, owned by uid 7, reporting to `tx`.
fn submit_items(h: &Harness, ids: std::ops::Range<JobId>, steps: usize, tx: &super::Reply) {
    for id in ids {
        let job = QueuedJob {
            id,
            owner: 7,
            sender: None,
            request: ResolvedRequest {
                seed: id,
                ..resolved("a", steps)
            },
            output_fds: Vec::new(),
            queued_at: Instant::now(),
            background: true,
            reply: Some(tx.clone()),
        };
        h.engine.submit(job).unwrap();
    }
}

/// The position of the batch holding `seed` in the fake's log of ended batches.
fn ended_at(h: &Harness, seed: u64) -> usize {
    h.fake
        .ended
        .lock()
        .unwrap()
        .iter()
        .position(|b| b.contains(&seed))
        .unwrap_or_else(|| panic!("batch of {seed} never ended"))
}

fn items_done(
    rx: &std::sync::mpsc::Receiver<(JobId, Outcome)>,
    n: usize,
) -> Vec<(JobId, JobState)> {
    (0..n)
        .map(|_| {
            let (id, outcome) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            (id, outcome.state())
        })
        .collect()
}

#[test]
fn an_interactive_job_runs_between_two_steps_of_batch_items() {
    let mut h = Harness::new(4);
    h.fake.gate.open();
    let (tx, rx) = std::sync::mpsc::channel();
    submit_items(&h, 10..12, 400, &tx);
    h.wait_started(10);
    let t0 = Instant::now();
    h.submit(1, "a", 0);
    h.wait_finished(&[1]);
    let waited = t0.elapsed();
    assert_eq!(h.state(1), JobState::Succeeded);
    // It started after the items and ended before them: it ran while they were suspended.
    // (The items usually share one batch; a worker may take the first before the second
    // is queued.)
    let batches = h.batches();
    assert!(batches[0].contains(&10), "{batches:?}");
    assert!(
        batches.iter().position(|b| b.contains(&1)) > Some(0),
        "{batches:?}"
    );
    let mut done = items_done(&rx, 2);
    assert!(ended_at(&h, 1) < ended_at(&h, 10));
    done.sort_by_key(|(id, _)| *id);
    assert_eq!(
        done,
        [(10, JobState::Succeeded), (11, JobState::Succeeded)],
        "the suspended items finish, once"
    );
    // The 400-step items alone take about 0.4 s; the interactive job did not wait for them.
    assert!(waited < Duration::from_millis(300), "{waited:?}");
}

#[test]
fn a_higher_priority_goes_first_and_an_equal_one_waits_within_the_slice() {
    let mut h = Harness::new(4);
    h.fake.gate.open();
    let mut long = resolved("a", 300);
    long.priority = 0;
    h.submit_with(1, long, None);
    h.wait_started(1);
    // Another caller, same priority, inside the 10 s slice: waits (5 steps: it cannot join
    // the next job's batch, as a compatible one would).
    h.submit_with(2, resolved("a", 5), None);
    h.submit(3, "a", 5); // higher priority: goes first
    h.wait_finished(&[1, 2, 3]);
    assert!(
        ended_at(&h, 3) < ended_at(&h, 1),
        "{:?}",
        h.fake.ended.lock().unwrap()
    );
    assert!(
        ended_at(&h, 1) < ended_at(&h, 2),
        "{:?}",
        h.fake.ended.lock().unwrap()
    );
}

#[test]
fn another_callers_job_runs_once_the_time_slice_is_used() {
    let settings = JobSettings {
        max_batch_images: 4,
        time_slice_secs: 1,
        ..JobSettings::default()
    };
    let mut h = Harness::with_settings(settings, 1, None);
    h.fake.gate.open();
    // About 1.6 s of steps for caller 1001, then caller 1002's short job arrives.
    h.submit_with(1, resolved("a", 1500), None);
    h.wait_started(1);
    let t0 = Instant::now();
    h.submit(2, "a", 0);
    h.wait_finished(&[2]);
    let waited = t0.elapsed();
    assert!(
        !h.finished.contains_key(&1),
        "the long job finished first (waited {waited:?})"
    );
    // It waited for the rest of the slice, not for the long job.
    assert!(waited < Duration::from_millis(1200), "{waited:?}");
    h.wait_finished(&[1]);
    assert_eq!(h.state(1), JobState::Succeeded);
    assert!(ended_at(&h, 2) < ended_at(&h, 1));
}

#[test]
fn batch_items_go_back_to_the_queue_when_memory_holds_one_batch() {
    let m = &bundle().memory;
    // Room for the items' batch, not for a second working set beside it.
    let budget = m.peak(64, 64, 2, true) + m.working_set(64, 64, 1, true) / 2;
    let mut h = Harness::with_workers(4, 1, Some(budget));
    // The one worker is held at the gate by job 2 while both items queue, so they share one
    // batch (a batch of item 10 alone would leave job 1 room beside it: the working set
    // grows linearly with the images).
    h.submit(2, "a", 0);
    h.wait_started(2);
    let (tx, rx) = std::sync::mpsc::channel();
    submit_items(&h, 10..12, 400, &tx);
    h.fake.gate.open();
    h.wait_started(10);
    h.submit(1, "a", 0);
    h.wait_finished(&[1]);
    let mut done = items_done(&rx, 2);
    done.sort_by_key(|(id, _)| *id);
    assert_eq!(done, [(10, JobState::Succeeded), (11, JobState::Succeeded)]);
    // The items' first run stopped for the job, then they ran again from the start.
    let batches = h.batches();
    let items = batches.iter().position(|b| b.contains(&10)).unwrap();
    let job = batches.iter().position(|b| b.contains(&1)).unwrap();
    assert_eq!(batches[items], [10, 11], "{batches:?}");
    assert!(job > items, "{batches:?}");
    assert!(
        batches[job + 1..].iter().any(|b| b.contains(&10)),
        "item 10 did not run again: {batches:?}"
    );
    assert!(rx.try_recv().is_err(), "an item reported twice");
}

#[test]
fn a_suspended_batch_item_cancels_at_once_and_the_rest_resumes() {
    let mut h = Harness::new(4);
    h.fake.gate.open();
    let (tx, rx) = std::sync::mpsc::channel();
    submit_items(&h, 10..12, 400, &tx);
    h.wait_started(10);
    h.submit_with(1, resolved("a", 300), None);
    h.wait_started(1);
    // Item 10 is suspended under job 1: its cancel is reported now, not when it resumes.
    assert!(h.engine.cancel(10));
    let (id, outcome) = rx.recv_timeout(Duration::from_secs(1)).unwrap();
    assert_eq!((id, outcome.state()), (10, JobState::Cancelled));
    assert!(
        !h.finished.contains_key(&1),
        "job 1 ended before the cancel was seen"
    );
    h.wait_finished(&[1]);
    assert_eq!(h.state(1), JobState::Succeeded);
    let (id, outcome) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!((id, outcome.state()), (11, JobState::Succeeded));
    assert!(rx.try_recv().is_err(), "an item reported twice");
}
