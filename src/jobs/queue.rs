//! The job queue: priorities, callers taking turns within a priority (round-robin by
//! uid, FIFO for one caller), and the choice of the next batch. Pure data structure, no
//! threads, so it is tested on its own.

use std::collections::BTreeMap;

use super::{JobId, QueuedJob};

/// Why a job was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue holds `queue_depth` jobs already.
    #[error("the queue is full ({0} jobs); retry later")]
    Full(usize),
    /// This caller has `jobs_per_caller` jobs already.
    #[error("you have {0} jobs queued or running, the most allowed; retry later")]
    CallerFull(usize),
    /// This caller's active jobs hold images of `held` bytes; `asked` more would pass
    /// `jobs.image_bytes_per_caller`.
    #[error(
        "your queued and running jobs hold {held} bytes of images and this one {asked} more, over the limit of {limit} (jobs.image_bytes_per_caller); retry when one ends"
    )]
    CallerImageBytes {
        /// Bytes the caller's active jobs hold.
        held: usize,
        /// Bytes this job would add.
        asked: usize,
        /// The limit.
        limit: usize,
    },
}

/// Run order: interactive jobs before batch items, then priority (higher first), then
/// turn, then arrival.
type Key = (bool, std::cmp::Reverse<i32>, usize, JobId);

/// Queued jobs in run order. A job's turn is how many jobs its owner already had queued
/// at its priority when it arrived, so at equal priority callers take turns: one user's
/// 16 queued jobs do not hold back another user's one.
#[derive(Default)]
pub struct Queue {
    jobs: BTreeMap<Key, QueuedJob>,
}

impl Queue {
    /// Number of queued jobs.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Adds a job.
    pub fn push(&mut self, job: QueuedJob) {
        let priority = job.request.priority;
        let turn = self
            .jobs
            .values()
            .filter(|j| {
                j.owner == job.owner
                    && j.request.priority == priority
                    && j.background == job.background
            })
            .count();
        self.jobs.insert(
            (job.background, std::cmp::Reverse(priority), turn, job.id),
            job,
        );
    }

    /// Removes one job by id.
    pub fn remove(&mut self, id: JobId) -> Option<QueuedJob> {
        let key = *self.jobs.keys().find(|(_, _, _, j)| *j == id)?;
        self.jobs.remove(&key)
    }

    /// Removes every job matching `pred`.
    pub fn drain_where(&mut self, mut pred: impl FnMut(&QueuedJob) -> bool) -> Vec<QueuedJob> {
        let keys: Vec<_> = self
            .jobs
            .iter()
            .filter(|(_, j)| pred(j))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.jobs.remove(&k))
            .collect()
    }

    /// Jobs in run order.
    pub fn iter(&self) -> impl Iterator<Item = &QueuedJob> {
        self.jobs.values()
    }

    /// The lead of the next batch for `ready` ([`Queue::take_batch`]) and the images of
    /// every queued job that could join it, without taking anything.
    pub fn peek_batch(&self, ready: impl Fn(&str) -> bool) -> Option<(&QueuedJob, usize)> {
        let lead = self.jobs.values().find(|j| ready(&j.request.model_key()))?;
        let key = lead.request.batch_key();
        let model = lead.request.model_key();
        let images = self
            .jobs
            .values()
            .filter(|j| {
                j.request.model_key() == model
                    && j.background == lead.background
                    && j.request.batch_key() == key
            })
            .map(|j| j.request.num_images)
            .sum();
        Some((lead, images))
    }

    /// The next batch: the first job (in run order) whose model `ready` says is loaded,
    /// plus later jobs with the same model and batch key, up to `max_images(lead)` images
    /// (the engine's batch limit, lowered where the memory budget needs it). Batch items
    /// do not join an interactive job's batch (it would wait for their images too).
    /// Jobs skipped over keep their place.
    pub fn take_batch(
        &mut self,
        ready: impl Fn(&str) -> bool,
        max_images: impl Fn(&QueuedJob) -> usize,
    ) -> Vec<QueuedJob> {
        let Some(lead) = self.jobs.values().find(|j| ready(&j.request.model_key())) else {
            return Vec::new();
        };
        let max_images = max_images(lead);
        let (model, key) = (
            lead.request.model_key().into_owned(),
            lead.request.batch_key(),
        );
        let background = lead.background;
        let mut images = 0;
        let mut keys = Vec::new();
        for (k, j) in &self.jobs {
            if j.request.model_key() == model
                && j.request.batch_key() == key
                && j.background == background
            {
                if !keys.is_empty() && images + j.request.num_images > max_images {
                    break;
                }
                images += j.request.num_images;
                keys.push(*k);
            }
        }
        keys.into_iter()
            .filter_map(|k| self.jobs.remove(&k))
            .collect()
    }
}

/// The images one of `idle` workers takes from `images` compatible ones, so that idle
/// workers with the model loaded share the work instead of one taking it all (the
/// others take what is left when they look next).
pub fn fair_share(images: usize, idle: usize) -> usize {
    images.div_ceil(idle.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::tests::resolved;

    fn job(id: JobId, priority: i32, model: &str, steps: usize) -> QueuedJob {
        owned(id, 1000, priority, model, steps)
    }

    fn owned(id: JobId, owner: u32, priority: i32, model: &str, steps: usize) -> QueuedJob {
        let mut request = resolved(model, steps);
        request.priority = priority;
        QueuedJob {
            id,
            owner,
            sender: None,
            request,
            output_fds: Vec::new(),
            queued_at: std::time::Instant::now(),
            background: false,
            reply: None,
        }
    }

    #[test]
    fn priority_first_then_fifo() {
        let mut q = Queue::default();
        q.push(job(1, 0, "a", 4));
        q.push(job(2, 5, "a", 8));
        q.push(job(3, 0, "a", 8));
        q.push(job(4, 5, "a", 9));
        let order: Vec<_> = q.iter().map(|j| j.id).collect();
        assert_eq!(order, vec![2, 4, 1, 3]);
    }

    #[test]
    fn callers_take_turns_within_a_priority() {
        let mut q = Queue::default();
        for id in 1..=4 {
            q.push(owned(id, 1000, 0, "a", 4)); // one caller's four jobs
        }
        q.push(owned(5, 1001, 0, "a", 8)); // another's one, later
        q.push(owned(6, 1002, 0, "a", 8));
        q.push(owned(7, 1001, 0, "a", 8));
        q.push(owned(8, 0, 3, "a", 8)); // a higher priority still goes first
        let order: Vec<_> = q.iter().map(|j| j.id).collect();
        assert_eq!(order, vec![8, 1, 5, 6, 2, 7, 3, 4]);
        // A job queued once others have run takes its turn from what is queued now.
        q.remove(1);
        q.remove(5);
        q.push(owned(9, 1003, 0, "a", 8));
        let order: Vec<_> = q.iter().map(|j| j.id).collect();
        assert_eq!(order, vec![8, 6, 9, 2, 7, 3, 4]);
    }

    #[test]
    fn batch_takes_compatible_jobs_up_to_the_image_limit() {
        let mut q = Queue::default();
        for id in 1..=5 {
            q.push(job(id, 0, "a", 4));
        }
        q.push(job(6, 0, "a", 8));
        let batch: Vec<_> = q.take_batch(|_| true, |_| 3).iter().map(|j| j.id).collect();
        assert_eq!(batch, vec![1, 2, 3]);
        let batch: Vec<_> = q.take_batch(|_| true, |_| 3).iter().map(|j| j.id).collect();
        assert_eq!(batch, vec![4, 5]);
        let batch: Vec<_> = q.take_batch(|_| true, |_| 3).iter().map(|j| j.id).collect();
        assert_eq!(batch, vec![6]);
        assert!(q.is_empty());
    }

    #[test]
    fn jobs_on_a_loaded_model_pass_jobs_waiting_for_a_load() {
        let mut q = Queue::default();
        q.push(job(1, 9, "cold", 4));
        q.push(job(2, 0, "warm", 4));
        let batch: Vec<_> = q
            .take_batch(|m| m == "warm", |_| 4)
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(batch, vec![2]);
        assert_eq!(q.len(), 1);
        assert!(q.take_batch(|m| m == "warm", |_| 4).is_empty());
    }

    #[test]
    fn idle_workers_share_a_batch() {
        let mut q = Queue::default();
        for id in 1..=5 {
            q.push(job(id, 0, "a", 4));
        }
        q.push(job(6, 0, "a", 8)); // another batch key (steps)
        q.push(job(7, 0, "b", 4));
        let (lead, images) = q.peek_batch(|m| m == "a").unwrap();
        assert_eq!((lead.id, images), (1, 5));
        assert_eq!(q.len(), 7, "peeking takes nothing");
        // Two idle workers: the first takes 3 of the 5, the second (alone idle then) the rest.
        let first = q.take_batch(|m| m == "a", |_| fair_share(5, 2));
        assert_eq!(first.len(), 3);
        let (_, left) = q.peek_batch(|m| m == "a").unwrap();
        assert_eq!(fair_share(left, 1), 2);
        assert_eq!(fair_share(1, 4), 1);
        assert_eq!(fair_share(0, 0), 0);
        assert!(q.peek_batch(|m| m == "c").is_none());
    }

    #[test]
    fn a_large_job_still_runs_alone() {
        let mut q = Queue::default();
        let mut big = job(1, 0, "a", 4);
        big.request.num_images = 8;
        q.push(big);
        assert_eq!(q.take_batch(|_| true, |_| 4).len(), 1);
    }

    #[test]
    fn remove_and_drain() {
        let mut q = Queue::default();
        q.push(job(1, 0, "a", 4));
        q.push(job(2, 0, "b", 4));
        q.push(job(3, 0, "a", 4));
        assert_eq!(q.remove(2).map(|j| j.id), Some(2));
        assert_eq!(q.remove(2).map(|j| j.id), None);
        assert_eq!(q.drain_where(|j| j.request.model == "a").len(), 2);
        assert!(q.is_empty());
    }
}
