//! Metrics in the Prometheus text format, without a network listener of our own: the
//! daemon writes them to a file for node_exporter's textfile collector ([`textfile`],
//! `[metrics] textfile`) and returns them from `Manager.Metrics()` (`diffusionctl
//! metrics`). Names follow Prometheus' rules: `diffusiond_` prefix, `_total` counters, base
//! units (`_seconds`, `_bytes`).
//!
//! Two kinds of figures:
//! * counters and histograms, recorded where the events already flow: the engine's
//!   [`Event`]s ([`engine_event`], called from `Engine::send` for interactive jobs and batch
//!   items alike), job admission ([`job_queued`]), UNet steps ([`unet_step`]), model loads
//!   ([`model_load`]) and refusals at the wire error conversion ([`refused`]). They live in
//!   one process-wide registry, so the engine, the event pump and the error conversion
//!   record with one call each and no handle threaded through their constructors;
//! * gauges read when the text is made ([`Gauges`], gathered by [`source::Source`]): queue,
//!   running jobs, loaded models and their memory against the budget, batch items, the
//!   execution provider of each worker.
//!
//! [`render`] writes both; [`text`] is the format.

pub mod source;
pub mod text;
pub mod textfile;

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::jobs::{Event, JobId, Outcome};
use text::{Histogram, Kind, Text};

/// Queue wait buckets, seconds.
static WAIT_BOUNDS: [f64; 11] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];
/// Generation time buckets (a job's batch start to its end), seconds.
static GENERATION_BOUNDS: [f64; 11] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Model load time buckets, seconds (a TensorRT engine build takes minutes).
static LOAD_BOUNDS: [f64; 9] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];

/// The refusal reasons always shown (at 0 until one happens), so a rate over them works
/// from the first scrape.
pub const REFUSALS: [&str; 4] = ["TooLarge", "QueueFull", "InvalidArgument", "AccessDenied"];

/// A job between admission and its end.
#[derive(Debug)]
struct Live {
    model: String,
    images: u32,
    queued_at: Instant,
}

/// Everything counted since the daemon started.
#[derive(Debug)]
pub struct Counters {
    live: HashMap<JobId, Live>,
    /// Ended jobs by (model, final state).
    jobs: BTreeMap<(String, &'static str), u64>,
    /// Images made, by model.
    images: BTreeMap<String, u64>,
    queue_wait: Histogram,
    generation: Histogram,
    unet_steps: u64,
    /// Images denoised summed over UNet steps (`/ unet_steps`: the average batch size).
    unet_step_images: u64,
    loads: BTreeMap<String, u64>,
    load_failures: BTreeMap<String, u64>,
    load_time: Histogram,
    refused: BTreeMap<String, u64>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            live: HashMap::new(),
            jobs: BTreeMap::new(),
            images: BTreeMap::new(),
            queue_wait: Histogram::new(&WAIT_BOUNDS),
            generation: Histogram::new(&GENERATION_BOUNDS),
            unet_steps: 0,
            unet_step_images: 0,
            loads: BTreeMap::new(),
            load_failures: BTreeMap::new(),
            load_time: Histogram::new(&LOAD_BOUNDS),
            refused: REFUSALS.iter().map(|r| (r.to_string(), 0)).collect(),
        }
    }
}

static COUNTERS: LazyLock<Mutex<Counters>> = LazyLock::new(Mutex::default);

fn counters() -> MutexGuard<'static, Counters> {
    COUNTERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A job was admitted to the queue (interactive or batch item).
pub fn job_queued(id: JobId, model: &str, images: u32, queued_at: Instant) {
    counters().job_queued(id, model, images, queued_at);
}

/// An engine event: a job started (its queue wait) or ended (its state, images and
/// generation time).
pub fn engine_event(event: &Event) {
    counters().engine_event(event, Instant::now());
}

/// One UNet step of a batch of `images` images ran.
pub fn unet_step(images: usize) {
    let mut c = counters();
    c.unet_steps += 1;
    c.unet_step_images += images as u64;
}

/// A model load ended on one worker after `took`.
pub fn model_load(model: &str, took: Duration, ok: bool) {
    let mut c = counters();
    let map = if ok {
        &mut c.loads
    } else {
        &mut c.load_failures
    };
    *map.entry(model.to_string()).or_default() += 1;
    if ok {
        c.load_time.observe(took.as_secs_f64());
    }
}

/// A request was refused with the D-Bus error named `reason` (`TooLarge`, `QueueFull`,
/// `InvalidArgument`, `AccessDenied`, ...).
pub fn refused(reason: &str) {
    *counters().refused.entry(reason.to_string()).or_default() += 1;
}

impl Counters {
    fn job_queued(&mut self, id: JobId, model: &str, images: u32, queued_at: Instant) {
        self.live.insert(
            id,
            Live {
                model: model.to_string(),
                images,
                queued_at,
            },
        );
    }

    fn engine_event(&mut self, event: &Event, now: Instant) {
        match event {
            Event::Started(id, _) => {
                if let Some(live) = self.live.get(id) {
                    let waited = now.saturating_duration_since(live.queued_at);
                    self.queue_wait.observe(waited.as_secs_f64());
                }
            }
            Event::Finished(id, outcome) => {
                let Some(live) = self.live.remove(id) else {
                    return;
                };
                let state = outcome.state().as_str();
                *self.jobs.entry((live.model.clone(), state)).or_default() += 1;
                if let Outcome::Succeeded(out) = outcome {
                    *self.images.entry(live.model).or_default() += u64::from(live.images);
                    self.generation.observe(out.total_secs);
                }
            }
            Event::Progress(..) | Event::Barrier(_) => {}
        }
    }

    /// The counters and `gauges` as Prometheus text.
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut t = Text::default();
        let f = "diffusiond_jobs_total";
        t.family(
            f,
            Kind::Counter,
            "Jobs ended (interactive and batch items), by model and final state.",
        );
        for ((model, state), n) in &self.jobs {
            t.sample(f, &[("model", model), ("state", state)], *n as f64);
        }
        let f = "diffusiond_images_total";
        t.family(f, Kind::Counter, "Images made, by model.");
        for (model, n) in &self.images {
            t.sample(f, &[("model", model)], *n as f64);
        }
        t.single(
            "diffusiond_queued_jobs",
            Kind::Gauge,
            "Jobs waiting in the queue.",
            gauges.queued as f64,
        );
        t.single(
            "diffusiond_running_jobs",
            Kind::Gauge,
            "Jobs in a running batch.",
            gauges.running as f64,
        );
        let f = "diffusiond_queue_wait_seconds";
        t.family(f, Kind::Histogram, "Time from admission to a job's start.");
        t.histogram(f, &[], &self.queue_wait);
        let f = "diffusiond_generation_seconds";
        t.family(
            f,
            Kind::Histogram,
            "Time from a succeeded job's batch start to its images.",
        );
        t.histogram(f, &[], &self.generation);
        t.single(
            "diffusiond_unet_steps_total",
            Kind::Counter,
            "UNet steps run (one per denoising step of a batch).",
            self.unet_steps as f64,
        );
        t.single(
            "diffusiond_unet_step_images_total",
            Kind::Counter,
            "Images denoised, summed over UNet steps (divided by diffusiond_unet_steps_total: the average batch size).",
            self.unet_step_images as f64,
        );
        let average = match self.unet_steps {
            0 => 0.0,
            n => self.unet_step_images as f64 / n as f64,
        };
        t.single(
            "diffusiond_unet_batch_size_average",
            Kind::Gauge,
            "Average images per UNet step since the daemon started.",
            average,
        );
        self.render_models(&mut t, gauges);
        let f = "diffusiond_batch_items";
        t.family(f, Kind::Gauge, "Items of stored batches, by state.");
        if let Some(items) = &gauges.batch_items {
            for (state, n) in [
                ("pending", items.pending),
                ("done", items.done),
                ("failed", items.failed),
            ] {
                t.sample(f, &[("state", state)], n as f64);
            }
        }
        let f = "diffusiond_requests_refused_total";
        t.family(
            f,
            Kind::Counter,
            "Requests refused, by the D-Bus error's name.",
        );
        for (reason, n) in &self.refused {
            t.sample(f, &[("reason", reason)], *n as f64);
        }
        let f = "diffusiond_worker_info";
        t.family(
            f,
            Kind::Gauge,
            "One per worker: its device and the execution provider its sessions use.",
        );
        for (worker, provider) in &gauges.workers {
            t.sample(
                f,
                &[("worker", worker), ("execution_provider", provider)],
                1.0,
            );
        }
        t.finish()
    }

    fn render_models(&self, t: &mut Text, gauges: &Gauges) {
        let f = "diffusiond_model_loads_total";
        t.family(
            f,
            Kind::Counter,
            "Model loads that succeeded, per worker load.",
        );
        for (model, n) in &self.loads {
            t.sample(f, &[("model", model)], *n as f64);
        }
        let f = "diffusiond_model_load_failures_total";
        t.family(
            f,
            Kind::Counter,
            "Model loads that failed, per worker load.",
        );
        for (model, n) in &self.load_failures {
            t.sample(f, &[("model", model)], *n as f64);
        }
        let f = "diffusiond_model_load_seconds";
        t.family(f, Kind::Histogram, "Time a successful model load took.");
        t.histogram(f, &[], &self.load_time);
        let f = "diffusiond_model_loaded_workers";
        t.family(f, Kind::Gauge, "Workers that have the model loaded.");
        for m in &gauges.models {
            t.sample(f, &[("model", &m.name)], m.loaded_workers as f64);
        }
        let f = "diffusiond_model_memory_bytes";
        t.family(
            f,
            Kind::Gauge,
            "Estimated memory of the model's loaded copies (its weights, per worker that has it).",
        );
        for m in &gauges.models {
            t.sample(f, &[("model", &m.name)], m.memory_bytes as f64);
        }
        if let Some(budget) = gauges.memory_budget {
            t.single(
                "diffusiond_memory_budget_bytes",
                Kind::Gauge,
                "The memory budget requests and batches are kept under (limits.memory_budget, or derived).",
                budget as f64,
            );
        }
    }
}

/// Figures read when the text is made.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gauges {
    /// Jobs waiting in the queue.
    pub queued: usize,
    /// Jobs in a running batch.
    pub running: usize,
    /// Every configured model.
    pub models: Vec<ModelGauge>,
    /// The memory budget, when there is one.
    pub memory_budget: Option<u64>,
    /// Stored batch items, when batches are available.
    pub batch_items: Option<BatchItems>,
    /// Per worker: its device and its execution provider.
    pub workers: Vec<(String, String)>,
}

/// One model's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelGauge {
    /// Its name.
    pub name: String,
    /// Workers that have it loaded.
    pub loaded_workers: usize,
    /// Its estimated resident bytes over those workers.
    pub memory_bytes: u64,
}

/// Stored batch items by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchItems {
    /// Not run yet (or running).
    pub pending: u64,
    /// Files written.
    pub done: u64,
    /// Failed.
    pub failed: u64,
}

/// The metrics text: every counter since start and `gauges`.
pub fn render(gauges: &Gauges) -> String {
    counters().render(gauges)
}

/// The execution provider a worker on `device` uses: the first GPU provider in use for a
/// `cuda:N` worker, `cpu` for the others.
pub fn worker_provider(device: &str, providers: &[String]) -> String {
    if device.starts_with("cuda") {
        providers
            .iter()
            .find(|p| p.as_str() != "cpu")
            .cloned()
            .unwrap_or_else(|| "cpu".into())
    } else {
        "cpu".into()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::jobs::{Failure, JobOutput};
    use crate::pipeline::StageTimings;

    fn output(total_secs: f64) -> Outcome {
        Outcome::Succeeded(Arc::new(JobOutput {
            pngs: Vec::new(),
            scheduler: "ddim".into(),
            timings: StageTimings::default(),
            queued_secs: 0.0,
            png_secs: 0.0,
            total_secs,
            batch_images: 2,
            device: "cpu".into(),
        }))
    }

    #[test]
    fn events_move_the_counters() {
        let mut c = Counters::default();
        let t0 = Instant::now();
        c.job_queued(1, "tiny", 2, t0);
        c.job_queued(2, "tiny", 1, t0);
        c.engine_event(&Event::Started(1, 2), t0 + Duration::from_millis(300));
        c.engine_event(&Event::Finished(1, output(4.0)), t0);
        c.engine_event(
            &Event::Finished(2, Outcome::Failed(Failure::Inference("x".into()))),
            t0,
        );
        // A second Finished for the same job (or one never queued) counts nothing.
        c.engine_event(&Event::Finished(2, Outcome::Cancelled), t0);
        assert!(c.live.is_empty());
        assert_eq!(c.jobs[&("tiny".to_string(), "succeeded")], 1);
        assert_eq!(c.jobs[&("tiny".to_string(), "failed")], 1);
        assert_eq!(c.images["tiny"], 2);
        assert_eq!(c.queue_wait.count(), 1);
        assert_eq!(c.generation.count(), 1);
        let text = c.render(&Gauges::default());
        assert!(text.contains("diffusiond_jobs_total{model=\"tiny\",state=\"succeeded\"} 1\n"));
        assert!(text.contains("diffusiond_images_total{model=\"tiny\"} 2\n"));
        assert!(text.contains("diffusiond_queue_wait_seconds_bucket{le=\"0.5\"} 1\n"));
        assert!(text.contains("diffusiond_queue_wait_seconds_bucket{le=\"0.1\"} 0\n"));
        assert!(text.contains("diffusiond_generation_seconds_sum 4\n"));
        assert!(text.contains("diffusiond_requests_refused_total{reason=\"TooLarge\"} 0\n"));
    }

    #[test]
    fn gauges_are_written() {
        let c = Counters {
            unet_steps: 4,
            unet_step_images: 6,
            ..Counters::default()
        };
        let g = Gauges {
            queued: 3,
            running: 1,
            models: vec![ModelGauge {
                name: "tiny".into(),
                loaded_workers: 1,
                memory_bytes: 1000,
            }],
            memory_budget: Some(4096),
            batch_items: Some(BatchItems {
                pending: 5,
                done: 2,
                failed: 1,
            }),
            workers: vec![("cuda:0".into(), "tensorrt".into())],
        };
        let text = c.render(&g);
        for line in [
            "diffusiond_queued_jobs 3",
            "diffusiond_running_jobs 1",
            "diffusiond_unet_batch_size_average 1.5",
            "diffusiond_model_loaded_workers{model=\"tiny\"} 1",
            "diffusiond_model_memory_bytes{model=\"tiny\"} 1000",
            "diffusiond_memory_budget_bytes 4096",
            "diffusiond_batch_items{state=\"pending\"} 5",
            "diffusiond_worker_info{worker=\"cuda:0\",execution_provider=\"tensorrt\"} 1",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} in\n{text}");
        }
    }

    #[test]
    fn providers_per_worker() {
        let p = vec!["tensorrt".to_string(), "cuda".into(), "cpu".into()];
        assert_eq!(worker_provider("cuda:1", &p), "tensorrt");
        assert_eq!(worker_provider("cpu#1", &p), "cpu");
        assert_eq!(worker_provider("cuda:0", &["cpu".into()]), "cpu");
    }
}
