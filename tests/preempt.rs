//! Work that goes first between two steps of a running batch, with the real pipeline
//! (tiny-sd15 through ONNX Runtime, the engine as the daemon runs it): interactive jobs run
//! while batch items are suspended, and two callers' long jobs take turns by the time
//! slice. Every image is byte-identical to the one its job makes uninterrupted.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use diffusiond::config::JobSettings;
use diffusiond::jobs::backend::OrtBackend;
use diffusiond::jobs::{Engine, Event, JobId, Outcome, QueuedJob, Workers};
use diffusiond::model::{Catalog, CatalogEntry, ModelBundle};
use diffusiond::request::{
    GenerateRequest, Limits, ModelDefaults, ModelRef, ResolvedRequest, resolve,
};
use tokio::sync::mpsc::UnboundedReceiver;

struct Rig {
    engine: Engine,
    workers: Option<Workers>,
    events: UnboundedReceiver<Event>,
    bundle: Arc<ModelBundle>,
}

impl Rig {
    fn new(time_slice_secs: u64) -> Rig {
        let dir = common::root().join("onnx/tiny-sd15");
        let bundle = Arc::new(ModelBundle::open(&dir).expect("fixture"));
        let entry = CatalogEntry {
            path: dir,
            bundle: Ok(bundle.clone()),
            defaults: ModelDefaults::default(),
            loras: Default::default(),
        };
        let catalog = Arc::new(Catalog::from_entries(
            BTreeMap::from([("tiny".to_string(), entry)]),
            None,
        ));
        let backend = Arc::new(OrtBackend::new(common::parity::ort_runtime()));
        let settings = JobSettings {
            time_slice_secs,
            ..JobSettings::default()
        };
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let (engine, workers) = Engine::start(backend, catalog, settings, None, tx).unwrap();
        Rig {
            engine,
            workers: Some(workers),
            events,
            bundle,
        }
    }

    fn request(&self, prompt: &str, steps: u32) -> ResolvedRequest {
        self.sized(prompt, steps, 64)
    }

    /// A `side`×`side` request.
    fn sized(&self, prompt: &str, steps: u32, side: u32) -> ResolvedRequest {
        let req = GenerateRequest {
            prompt: prompt.into(),
            steps: Some(steps),
            width: Some(side),
            height: Some(side),
            ..GenerateRequest::default()
        };
        let model = ModelRef {
            name: "tiny",
            bundle: &self.bundle,
            defaults: &ModelDefaults::NONE,
            loras: diffusiond::lora::LoraCatalog::none(),
        };
        resolve(&req, model, &Limits::unbounded(), || 0).unwrap()
    }

    /// Job `id` of uid `owner`, seed `id`: interactive, or a batch item replying to `reply`.
    fn submit(
        &self,
        id: JobId,
        owner: u32,
        request: ResolvedRequest,
        reply: Option<&std::sync::mpsc::Sender<(JobId, Outcome)>>,
    ) {
        let mut request = request;
        request.seed = id;
        let job = QueuedJob {
            id,
            owner,
            sender: None,
            request,
            output_fds: Vec::new(),
            queued_at: Instant::now(),
            background: reply.is_some(),
            reply: reply.cloned(),
        };
        self.engine.submit(job).unwrap();
    }

    /// Reads events until `done` says stop; returns the finished jobs' PNGs so far.
    fn until(
        &mut self,
        finished: &mut HashMap<JobId, Vec<Vec<u8>>>,
        mut done: impl FnMut(&Event, &HashMap<JobId, Vec<Vec<u8>>>) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(Instant::now() < deadline, "timed out");
            let event = self.events.blocking_recv().expect("engine events");
            if let Event::Finished(id, outcome) = &event {
                finished.insert(*id, pngs(outcome));
            }
            if done(&event, finished) {
                return;
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.engine.shutdown(Duration::from_secs(1));
        if let Some(w) = self.workers.take() {
            w.join();
        }
    }
}

fn pngs(outcome: &Outcome) -> Vec<Vec<u8>> {
    match outcome {
        Outcome::Succeeded(out) => out.pngs.clone(),
        other => panic!("job did not succeed: {other:?}"),
    }
}

fn items(rx: &Receiver<(JobId, Outcome)>, n: usize) -> HashMap<JobId, Vec<Vec<u8>>> {
    (0..n)
        .map(|_| {
            let (id, outcome) = rx.recv_timeout(Duration::from_secs(120)).unwrap();
            (id, pngs(&outcome))
        })
        .collect()
}

#[test]
fn interactive_jobs_run_while_batch_items_are_suspended_and_change_no_pixel() {
    const STEPS: u32 = 24;
    // Uninterrupted: the two batch items alone.
    let mut alone = Rig::new(0);
    let (tx, rx) = std::sync::mpsc::channel();
    for id in [10, 11] {
        alone.submit(
            id,
            7,
            alone.request("a lighthouse at dusk", STEPS),
            Some(&tx),
        );
    }
    let want = items(&rx, 2);
    // The interactive jobs alone, for their images.
    let mut finished = HashMap::new();
    alone.submit(1, 1000, alone.request("a red cube", 4), None);
    alone.submit(2, 1001, alone.request("a blue sphere", 5), None);
    alone.until(&mut finished, |_, f| f.len() == 2);
    let want_interactive = finished.clone();
    drop(alone);

    // Interrupted: the interactive jobs arrive once the items have run 3 steps.
    let mut rig = Rig::new(0);
    let (tx, rx) = std::sync::mpsc::channel();
    for id in [10, 11] {
        rig.submit(id, 7, rig.request("a lighthouse at dusk", STEPS), Some(&tx));
    }
    let mut finished = HashMap::new();
    rig.until(&mut finished, |e, _| matches!(e, Event::Progress(10, 3, _)));
    rig.submit(1, 1000, rig.request("a red cube", 4), None);
    rig.submit(2, 1001, rig.request("a blue sphere", 5), None);
    let mut progress_of_items = Vec::new();
    rig.until(&mut finished, |e, f| {
        if let Event::Progress(10, step, _) = e {
            progress_of_items.push(*step);
        }
        f.len() == 2
    });
    // The items were suspended while the interactive jobs ran, and have steps left.
    assert!(
        rx.try_recv().is_err(),
        "batch items finished before the interactive jobs"
    );
    assert!(
        progress_of_items.len() < (STEPS - 3) as usize,
        "the items ran on: {progress_of_items:?}"
    );
    let got = items(&rx, 2);
    for id in [10, 11] {
        assert!(got[&id] == want[&id], "batch item {id} changed");
    }
    for id in [1, 2] {
        assert!(
            finished[&id] == want_interactive[&id],
            "interactive job {id} changed"
        );
    }
}

#[test]
fn two_callers_long_jobs_take_turns_by_the_time_slice() {
    let mut alone = Rig::new(0);
    let mut finished = HashMap::new();
    // A job long enough to hold a 1 s slice about four times over (at most 1000 steps
    // of 128x128): its length is found by running it, longer each time (the machine may be
    // busy with other work, so a short probe would mislead).
    const LONG_MAX: u32 = 1000;
    alone.submit(8, 1000, alone.sized("a lighthouse at dusk", 5, 128), None);
    alone.until(&mut finished, |_, f| f.contains_key(&8));
    let mut long = 100;
    let mut id = 100;
    let long_alone = loop {
        id += 1;
        let started = Instant::now();
        alone.submit(
            id,
            1000,
            alone.sized("a lighthouse at dusk", long, 128),
            None,
        );
        alone.until(&mut finished, |_, f| f.contains_key(&id));
        let took = started.elapsed();
        if took > Duration::from_millis(3500) || long == LONG_MAX {
            break took;
        }
        let scale = 4.0 / took.as_secs_f64().max(0.01);
        long = ((f64::from(long) * scale).ceil() as u32).clamp(long + 1, LONG_MAX);
    };
    // The long job runs again under its number (the seed is the job's number).
    let long_id = id;
    let mut want = HashMap::new();
    want.insert(long_id, finished[&long_id].clone());
    alone.submit(2, 1001, alone.request("a red cube", 12), None);
    alone.until(&mut finished, |_, f| f.contains_key(&2));
    want.insert(2, finished[&2].clone());
    drop(alone);
    assert!(
        long_alone > Duration::from_secs(2),
        "the long job ({long} steps) takes {long_alone:?}: too short to hold a 1 s slice"
    );

    let mut rig = Rig::new(1);
    let mut finished = HashMap::new();
    rig.submit(
        long_id,
        1000,
        rig.sized("a lighthouse at dusk", long, 128),
        None,
    );
    rig.until(
        &mut finished,
        |e, _| matches!(e, Event::Started(id, _) if *id == long_id),
    );
    let t0 = Instant::now();
    rig.submit(2, 1001, rig.request("a red cube", 12), None);
    rig.until(&mut finished, |_, f| f.contains_key(&2));
    let waited = t0.elapsed();
    assert!(
        !finished.contains_key(&long_id),
        "caller 1000's job held the worker to its end"
    );
    // At most the slice (1 s) plus its own steps, far less than the long job.
    assert!(
        waited < long_alone / 2,
        "waited {waited:?} of {long_alone:?}"
    );
    rig.until(&mut finished, |_, f| f.contains_key(&long_id));
    for id in [long_id, 2] {
        assert!(finished[&id] == want[&id], "job {id} changed");
    }
    eprintln!(
        "long job ({long} steps) alone {long_alone:?}; the other caller's job waited {waited:?}"
    );
}
