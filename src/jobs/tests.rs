//! Engine unit tests with a fake pipeline: run order, batching, cancel, callers leaving,
//! load failures and shutdown, each in well under a second, without ONNX Runtime.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ndarray::Array3;
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::model::{CatalogEntry, ModelBundle};
use crate::pipeline::{GeneratedImage, Generation, PipelineError, ProgressFn};
use crate::request::ResolvedRequest;
use crate::rng::RngKind;

/// A resolved request on `model` (64×64, pndm, guidance 7.5).
pub(crate) fn resolved(model: &str, steps: usize) -> ResolvedRequest {
    ResolvedRequest {
        model: model.into(),
        prompt: "p".into(),
        negative_prompt: None,
        width: 64,
        height: 64,
        steps,
        guidance_scale: 7.5,
        guidance_rescale: 0.0,
        scheduler: "pndm",
        seed: 0,
        rng: RngKind::Torch,
        num_images: 1,
        priority: 0,
        latents: None,
        edit: None,
        guidance_embedding: false,
        prompt_syntax: Default::default(),
        max_prompt_chunks: usize::MAX,
        a1111_pad_cond_uncond: false,
        a1111_parts: 1,
        preview_every: 0,
        preview_method: Default::default(),
        keep_alive: None,
        loras: Vec::new(),
        lora_key: Vec::new(),
        max_sequence_length: None,
        controls: Vec::new(),
        control_guess_mode: false,
    }
}

/// Closed: batches wait before their first step until it opens (or they are terminated).
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_all();
    }

    fn wait(&self, control: &RunControl) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut open = self.open.lock().unwrap();
        while !*open && !control.is_terminated() && Instant::now() < deadline {
            open = self
                .changed
                .wait_timeout(open, Duration::from_millis(2))
                .unwrap()
                .0;
        }
    }
}

/// What the fake saw: each batch as the seeds of its requests, the worker each ran on,
/// and how many ran at once.
#[derive(Default)]
struct Fake {
    batches: Mutex<Vec<Vec<u64>>>,
    /// Each batch's worker and seeds.
    by_worker: Mutex<Vec<(usize, Vec<u64>)>>,
    /// Batches in `generate` now, and the most at once.
    concurrent: Mutex<(usize, usize)>,
    /// Each batch's seeds when its `generate` returned (successful or not).
    ended: Mutex<Vec<Vec<u64>>>,
    /// Each successful load: the model and its LoRAs' names.
    loads: Mutex<Vec<(String, Vec<String>)>>,
    gate: Gate,
}

/// The fake backend with `.1` workers (`fake0`, `fake1`, ...). Model `broken` fails to
/// load everywhere, `flaky` on every worker but the first; a LoRA named `misfit` does
/// not fit any model.
struct FakeBackend(Arc<Fake>, usize);
struct FakeModel(Arc<Fake>, usize, Option<Box<backend::ModelInterlude>>);

impl Backend for FakeBackend {
    fn workers(&self) -> Vec<String> {
        (0..self.1).map(|w| format!("fake{w}")).collect()
    }

    fn load(
        &self,
        name: &str,
        _: &Arc<ModelBundle>,
        loras: &[crate::lora::LoraSpec],
        worker: usize,
    ) -> Result<Box<dyn Model>, Failure> {
        if name == "broken" {
            return Err(Failure::ModelLoad(
                "broken/unet/model.onnx: no weights".into(),
            ));
        }
        if name == "flaky" && worker > 0 {
            return Err(Failure::ModelLoad("out of device memory".into()));
        }
        if let Some(l) = loras.iter().find(|l| l.name == "misfit") {
            return Err(Failure::InvalidArgument(format!(
                "'loras': {}: layers for another model",
                l.path.display()
            )));
        }
        self.0.loads.lock().unwrap().push((
            name.to_string(),
            loras.iter().map(|l| l.name.clone()).collect(),
        ));
        Ok(Box::new(FakeModel(self.0.clone(), worker, None)))
    }

    fn run_control(&self) -> Result<RunControl, String> {
        Ok(RunControl::default())
    }

    fn runtime_version(&self) -> &str {
        "fake"
    }
}

impl Model for FakeModel {
    fn generate(
        &mut self,
        batch: &[&ResolvedRequest],
        control: &RunControl,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<Generation>, PipelineError> {
        let seeds: Vec<u64> = batch.iter().map(|r| r.seed).collect();
        self.0.batches.lock().unwrap().push(seeds.clone());
        self.0.by_worker.lock().unwrap().push((self.1, seeds));
        {
            let mut c = self.0.concurrent.lock().unwrap();
            c.0 += 1;
            c.1 = c.1.max(c.0);
        }
        let result = self.run(batch, control, progress);
        self.0.concurrent.lock().unwrap().0 -= 1;
        let seeds = batch.iter().map(|r| r.seed).collect();
        self.0.ended.lock().unwrap().push(seeds);
        result
    }

    fn set_interlude(&mut self, interlude: Option<Box<backend::ModelInterlude>>) {
        self.2 = interlude;
    }
}

impl FakeModel {
    fn run(
        &mut self,
        batch: &[&ResolvedRequest],
        control: &RunControl,
        progress: &mut ProgressFn<'_>,
    ) -> Result<Vec<Generation>, PipelineError> {
        self.0.gate.wait(control);
        let steps = batch[0].steps;
        for step in 1..=steps {
            if control.is_terminated() {
                return Err(PipelineError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(1));
            if !progress(step, steps) {
                return Err(PipelineError::Cancelled);
            }
            if step < steps
                && let Some(mut interlude) = self.2.take()
            {
                let result = interlude(self);
                self.2 = Some(interlude);
                result?;
            }
        }
        Ok(batch
            .iter()
            .map(|r| Generation {
                images: (0..r.num_images)
                    .map(|_| GeneratedImage {
                        float: Array3::zeros((1, 1, 3)),
                        // Noise, so its PNG is as large as the image (PNG cannot shrink it).
                        rgb: Array3::from_shape_fn((r.height, r.width, 3), |(y, x, c)| {
                            // splitmix64 of the position.
                            let mut z = ((y * r.width + x) * 3 + c) as u64;
                            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
                            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                            (z ^ (z >> 31)) as u8
                        }),
                    })
                    .collect(),
                scheduler: r.scheduler,
                timesteps: Vec::new(),
                timings: Default::default(),
                loras: Vec::new(),
            })
            .collect())
    }
}

fn bundle() -> Arc<ModelBundle> {
    Arc::new(crate::model::test_bundle())
}

struct Harness {
    engine: Engine,
    events: UnboundedReceiver<Event>,
    fake: Arc<Fake>,
    worker: Option<Workers>,
    rt: tokio::runtime::Runtime,
    finished: HashMap<JobId, Outcome>,
    started: Vec<JobId>,
}

impl Harness {
    fn new(max_batch_images: usize) -> Harness {
        Harness::with_workers(max_batch_images, 1, None)
    }

    /// An engine on `workers` fake workers, batches kept under `memory_budget` together.
    fn with_workers(
        max_batch_images: usize,
        workers: usize,
        memory_budget: Option<u64>,
    ) -> Harness {
        let settings = JobSettings {
            max_batch_images,
            ..JobSettings::default()
        };
        Harness::with_settings(settings, workers, memory_budget)
    }

    /// [`Harness::with_workers`] with these job settings.
    fn with_settings(settings: JobSettings, workers: usize, memory_budget: Option<u64>) -> Harness {
        let mut entries = BTreeMap::new();
        for name in ["a", "b", "broken", "flaky"] {
            let entry = CatalogEntry {
                path: PathBuf::from("/fake").join(name),
                bundle: Ok(bundle()),
                defaults: Default::default(),
                loras: Default::default(),
            };
            entries.insert(name.to_string(), entry);
        }
        let unreadable = CatalogEntry {
            path: PathBuf::from("/fake/unreadable"),
            bundle: Err("/fake/unreadable/model_index.json: file is missing".into()),
            defaults: Default::default(),
            loras: Default::default(),
        };
        entries.insert("unreadable".to_string(), unreadable);
        let catalog = Arc::new(Catalog::from_entries(entries, Some("a".into())));
        let fake = Arc::new(Fake::default());
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let backend = Arc::new(FakeBackend(fake.clone(), workers));
        let (engine, worker) =
            Engine::start(backend, catalog, settings, memory_budget, tx).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        Harness {
            engine,
            events,
            fake,
            worker: Some(worker),
            rt,
            finished: HashMap::new(),
            started: Vec::new(),
        }
    }

    /// Submits job `id` (its seed is its id, so the fake's log names it).
    fn submit_with(&self, id: JobId, request: ResolvedRequest, sender: Option<&str>) {
        self.submit_to(id, request, sender, Vec::new());
    }

    /// [`Harness::submit_with`], the images going to `output_fds`.
    fn submit_to(
        &self,
        id: JobId,
        request: ResolvedRequest,
        sender: Option<&str>,
        output_fds: Vec<std::os::fd::OwnedFd>,
    ) {
        let job = QueuedJob {
            id,
            owner: 1000 + id as u32,
            sender: sender.map(str::to_string),
            request: ResolvedRequest {
                seed: id,
                ..request
            },
            output_fds,
            queued_at: Instant::now(),
            background: false,
            reply: None,
        };
        self.engine.submit(job).unwrap();
    }

    fn submit(&self, id: JobId, model: &str, priority: i32) {
        let mut r = resolved(model, 4);
        r.priority = priority;
        self.submit_with(id, r, None);
    }

    /// Reads events until `done` holds, at most 5 s.
    fn until(&mut self, what: &str, mut done: impl FnMut(&Harness) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            let events = &mut self.events;
            let event = self
                .rt
                .block_on(async { tokio::time::timeout(left, events.recv()).await })
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("the engine's event channel closed");
            match event {
                Event::Started(id, _) => self.started.push(id),
                Event::Finished(id, outcome) => {
                    assert!(
                        self.finished.insert(id, outcome).is_none(),
                        "job {id} finished twice"
                    );
                }
                Event::Progress(..) | Event::Barrier(_) => {}
            }
        }
    }

    fn wait_started(&mut self, id: JobId) {
        self.until("a start", |h| h.started.contains(&id));
    }

    fn wait_finished(&mut self, ids: &[JobId]) {
        self.until("jobs to finish", |h| {
            ids.iter().all(|id| h.finished.contains_key(id))
        });
    }

    fn state(&self, id: JobId) -> JobState {
        self.finished[&id].state()
    }

    fn batches(&self) -> Vec<Vec<u64>> {
        self.fake.batches.lock().unwrap().clone()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.fake.gate.open();
        self.engine.shutdown(Duration::from_secs(1));
        if let Some(w) = self.worker.take() {
            w.join();
        }
    }
}

#[test]
fn priority_first_then_arrival_order() {
    let t0 = Instant::now();
    let mut h = Harness::new(1);
    h.submit(1, "a", 0);
    h.wait_started(1);
    h.submit(2, "a", 0);
    h.submit(3, "a", 5);
    h.submit(4, "a", 0);
    h.submit(5, "a", 5);
    h.submit(6, "a", -1);
    h.fake.gate.open();
    h.wait_finished(&[1, 2, 3, 4, 5, 6]);
    assert_eq!(
        h.batches(),
        vec![vec![1], vec![3], vec![5], vec![2], vec![4], vec![6]]
    );
    assert!((1..=6).all(|id| h.state(id) == JobState::Succeeded));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn batch_items_run_after_interactive_jobs_and_report_to_their_channel() {
    let mut h = Harness::new(2);
    h.submit(1, "a", 0);
    h.wait_started(1);
    let (tx, rx) = std::sync::mpsc::channel();
    // Batch items, owned by one caller: not counted against the queue or its share.
    for id in 10..14 {
        let job = QueuedJob {
            id,
            owner: 7,
            sender: None,
            request: ResolvedRequest {
                seed: id,
                ..resolved("a", 4)
            },
            output_fds: Vec::new(),
            queued_at: Instant::now(),
            background: true,
            reply: Some(tx.clone()),
        };
        h.engine.submit(job).unwrap();
    }
    assert_eq!(
        h.engine.queue_length(),
        1,
        "batch items are not queue entries"
    );
    // An interactive job queued after them, even with a lower priority, runs first, and
    // alone: batch items do not join its UNet batch.
    h.submit(2, "a", -5);
    h.fake.gate.open();
    h.wait_finished(&[1, 2]);
    let mut replies: Vec<(JobId, bool)> = (0..4)
        .map(|_| {
            let (id, outcome) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            (
                id,
                matches!(outcome, Outcome::Succeeded(ref o) if o.pngs.len() == 1),
            )
        })
        .collect();
    replies.sort_unstable();
    assert_eq!(replies, [(10, true), (11, true), (12, true), (13, true)]);
    assert_eq!(
        h.batches(),
        vec![vec![1], vec![2], vec![10, 11], vec![12, 13]],
        "interactive first; batch items share UNet batches"
    );
    assert!(
        !h.finished.keys().any(|id| *id >= 10),
        "batch outcomes go to their channel only"
    );
}

#[test]
fn batches_hold_compatible_jobs_up_to_the_image_limit() {
    let t0 = Instant::now();
    let mut h = Harness::new(3);
    h.submit(1, "a", 0);
    h.wait_started(1);
    for id in 2..=5 {
        h.submit(id, "a", 0);
    }
    h.submit_with(6, resolved("a", 8), None); // other steps: another batch key
    let mut two = resolved("a", 4);
    two.num_images = 2;
    h.submit_with(7, two, None);
    h.submit(8, "b", 0); // another model
    h.fake.gate.open();
    h.wait_finished(&[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(
        h.batches(),
        vec![vec![1], vec![2, 3, 4], vec![5, 7], vec![6], vec![8]]
    );
    let images = |id| match &h.finished[&id] {
        Outcome::Succeeded(out) => (out.pngs.len(), out.batch_images),
        other => panic!("job {id}: {other:?}"),
    };
    assert_eq!(images(2), (1, 3));
    assert_eq!(images(7), (2, 3));
    assert_eq!(images(6), (1, 1));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn cancelling_a_queued_job_and_a_running_job() {
    let t0 = Instant::now();
    let mut h = Harness::new(4);
    h.submit(1, "a", 0);
    h.wait_started(1);
    h.submit_with(2, resolved("a", 8), None);
    assert_eq!(h.engine.queue_length(), 2);
    assert!(h.engine.cancel(2));
    h.wait_finished(&[2]);
    assert_eq!(h.state(2), JobState::Cancelled);
    // The running job: its run control is terminated, the gated batch stops.
    let t1 = Instant::now();
    assert!(h.engine.cancel(1));
    assert!(!h.engine.cancel(1), "a job is cancelled once");
    h.wait_finished(&[1]);
    assert_eq!(h.state(1), JobState::Cancelled);
    assert!(
        t1.elapsed() < Duration::from_millis(500),
        "{:?}",
        t1.elapsed()
    );
    // The engine goes on serving; the cancelled queued job never ran.
    h.fake.gate.open();
    h.submit(3, "a", 0);
    h.wait_finished(&[3]);
    assert_eq!(h.state(3), JobState::Succeeded);
    assert_eq!(h.batches(), vec![vec![1], vec![3]]);
    assert_eq!(h.engine.queue_length(), 0);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn a_caller_that_leaves_has_its_jobs_cancelled() {
    let t0 = Instant::now();
    let mut h = Harness::new(1);
    h.submit_with(1, resolved("a", 4), Some(":1.7"));
    h.wait_started(1);
    h.submit_with(2, resolved("a", 4), Some(":1.7"));
    h.submit_with(3, resolved("a", 4), Some(":1.8"));
    assert_eq!(h.engine.cancel_sender(":1.7"), 2);
    assert_eq!(h.engine.cancel_sender(":1.7"), 0);
    h.fake.gate.open();
    h.wait_finished(&[1, 2, 3]);
    assert_eq!(h.state(1), JobState::Cancelled);
    assert_eq!(h.state(2), JobState::Cancelled);
    assert_eq!(h.state(3), JobState::Succeeded);
    assert_eq!(h.batches(), vec![vec![1], vec![3]]);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn a_model_that_fails_to_load_fails_its_jobs_only() {
    let t0 = Instant::now();
    let mut h = Harness::new(4);
    h.fake.gate.open();
    h.submit(1, "a", 0);
    h.submit(2, "broken", 0);
    h.submit(3, "unreadable", 0);
    h.submit(4, "a", 0);
    h.submit(5, "b", 0);
    h.wait_finished(&[1, 2, 3, 4, 5]);
    for id in [1, 4, 5] {
        assert_eq!(h.state(id), JobState::Succeeded, "job {id}");
    }
    match &h.finished[&2] {
        Outcome::Failed(Failure::ModelLoad(m)) => {
            assert_eq!(
                m,
                "model 'broken' failed to load: broken/unet/model.onnx: no weights"
            )
        }
        other => panic!("{other:?}"),
    }
    match &h.finished[&3] {
        Outcome::Failed(Failure::ModelLoad(m)) => assert!(m.contains("file is missing"), "{m}"),
        other => panic!("{other:?}"),
    }
    let load = h.engine.load_model("broken").unwrap();
    let answer = h.rt.block_on(load).unwrap();
    assert!(matches!(answer, Err(Failure::ModelLoad(_))), "{answer:?}");
    assert!(h.engine.is_loaded("a") && !h.engine.is_loaded("broken"));
    assert!(matches!(
        h.engine.load_model("nope"),
        Err(EngineError::UnknownModel(_))
    ));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn shutdown_cancels_what_outlives_the_grace_period() {
    let t0 = Instant::now();
    let mut h = Harness::new(1);
    h.submit(1, "a", 0);
    h.wait_started(1);
    h.submit(2, "a", 0);
    // The running job never gets through its gate: shutdown must cancel it.
    let t1 = Instant::now();
    h.engine.shutdown(Duration::from_millis(100));
    let took = t1.elapsed();
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(600),
        "{took:?}"
    );
    h.wait_finished(&[1, 2]);
    assert_eq!(h.state(1), JobState::Cancelled);
    assert_eq!(h.state(2), JobState::Cancelled);
    h.worker.take().unwrap().join();
    let late = QueuedJob {
        id: 3,
        owner: 1,
        sender: None,
        request: resolved("a", 1),
        output_fds: Vec::new(),
        queued_at: Instant::now(),
        background: false,
        reply: None,
    };
    assert!(matches!(
        h.engine.submit(late),
        Err(EngineError::ShuttingDown)
    ));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn shutdown_lets_a_job_finish_within_the_grace_period() {
    let t0 = Instant::now();
    let mut h = Harness::new(1);
    h.submit(1, "a", 0);
    h.wait_started(1);
    let gate = h.fake.clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        gate.gate.open();
    });
    h.engine.shutdown(Duration::from_secs(5));
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    h.wait_finished(&[1]);
    assert_eq!(h.state(1), JobState::Succeeded);
    opener.join().unwrap();
    h.worker.take().unwrap().join();
}

#[test]
fn a_job_whose_reader_never_reads_still_counts_and_cancel_ends_it() {
    let t0 = Instant::now();
    let mut h = Harness::new(1);
    h.fake.gate.open();
    let (reader, writer) = std::io::pipe().unwrap();
    let mut big = resolved("a", 2);
    (big.width, big.height) = (256, 256); // a PNG larger than a pipe holds
    h.submit_to(1, big, None, vec![writer.into()]);
    h.wait_started(1);
    // Generated, now stuck writing: not finished, and still counted against its caller.
    while h.batches().is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(150));
    h.until("nothing", |_| true);
    assert!(!h.finished.contains_key(&1), "{:?}", h.finished.get(&1));
    assert_eq!(h.engine.queue_length(), 1);
    assert!(!h.finished.contains_key(&1));
    let t1 = Instant::now();
    assert!(h.engine.cancel(1));
    h.wait_finished(&[1]);
    assert_eq!(h.state(1), JobState::Cancelled);
    assert!(t1.elapsed() < Duration::from_secs(1), "{:?}", t1.elapsed());
    assert_eq!(h.engine.queue_length(), 0);
    drop(reader);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn job_numbers_follow_the_clock_and_never_repeat() {
    let last = std::sync::atomic::AtomicU64::new(0);
    assert_eq!(super::next_job_id(&last, 1_000), 1_000);
    assert_eq!(super::next_job_id(&last, 1_000), 1_001);
    assert_eq!(
        super::next_job_id(&last, 900),
        1_002,
        "a clock read behind the last number"
    );
    assert_eq!(super::next_job_id(&last, 5_000), 5_000);
    // A restart: a fresh counter starts from the clock, past the earlier run's numbers.
    let restarted = std::sync::atomic::AtomicU64::new(0);
    assert!(super::next_job_id(&restarted, super::unix_micros()) > 5_000);
    assert!(super::unix_micros() < 1 << 53);
}

mod admission;
mod lora_sets;
mod preempt;
mod workers;
