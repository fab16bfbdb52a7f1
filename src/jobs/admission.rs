//! Admission: which jobs are active (queued, running or being delivered), and the limits
//! that refuse new ones: the queue depth and each caller's share. Pure data, tested alone.

use std::collections::HashMap;

use super::JobId;
use super::queue::QueueError;

/// The active jobs, with their owners, the bus names that sent them and the bytes of the
/// images they hold.
#[derive(Debug, Default)]
pub struct Admission {
    owners: HashMap<JobId, u32>,
    senders: HashMap<JobId, String>,
    image_bytes: HashMap<JobId, usize>,
}

/// The bounds [`Admission::admit`] holds new jobs to.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Most active jobs (`jobs.queue_depth`).
    pub queue_depth: usize,
    /// Most active jobs of one owner (`jobs.jobs_per_caller`).
    pub per_caller: usize,
    /// Most bytes of images (init images and masks as sent) the active jobs of one owner
    /// may hold (`jobs.image_bytes_per_caller`).
    pub image_bytes_per_caller: usize,
}

impl Admission {
    /// Admits job `id` of `owner`, holding `image_bytes` of images, if the queue and the
    /// owner's share (jobs and image bytes) have room.
    pub fn admit(
        &mut self,
        id: JobId,
        owner: u32,
        sender: Option<String>,
        image_bytes: usize,
        bounds: Bounds,
    ) -> Result<(), QueueError> {
        if self.owners.len() >= bounds.queue_depth {
            return Err(QueueError::Full(bounds.queue_depth));
        }
        let mine: Vec<JobId> = self
            .owners
            .iter()
            .filter(|&(_, &o)| o == owner)
            .map(|(id, _)| *id)
            .collect();
        if mine.len() >= bounds.per_caller {
            return Err(QueueError::CallerFull(mine.len()));
        }
        let held: usize = mine.iter().filter_map(|id| self.image_bytes.get(id)).sum();
        if image_bytes > 0 && held.saturating_add(image_bytes) > bounds.image_bytes_per_caller {
            return Err(QueueError::CallerImageBytes {
                held,
                asked: image_bytes,
                limit: bounds.image_bytes_per_caller,
            });
        }
        self.owners.insert(id, owner);
        if let Some(sender) = sender {
            self.senders.insert(id, sender);
        }
        if image_bytes > 0 {
            self.image_bytes.insert(id, image_bytes);
        }
        Ok(())
    }

    /// The job no longer counts.
    pub fn retire(&mut self, id: JobId) {
        self.owners.remove(&id);
        self.senders.remove(&id);
        self.image_bytes.remove(&id);
    }

    /// Active jobs.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether no job is active.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// The active jobs sent from bus name `sender`.
    pub fn jobs_of_sender(&self, sender: &str) -> Vec<JobId> {
        let mut ids: Vec<JobId> = self
            .senders
            .iter()
            .filter(|(_, s)| *s == sender)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        queue_depth: 3,
        per_caller: 2,
        image_bytes_per_caller: 100,
    };

    #[test]
    fn depth_and_share_limits() {
        let mut a = Admission::default();
        assert!(a.admit(1, 1000, None, 0, B).is_ok());
        assert!(a.admit(2, 1000, Some(":1.5".into()), 0, B).is_ok());
        assert_eq!(a.admit(3, 1000, None, 0, B), Err(QueueError::CallerFull(2)));
        assert!(a.admit(3, 1001, Some(":1.5".into()), 0, B).is_ok());
        assert_eq!(a.admit(4, 1002, None, 0, B), Err(QueueError::Full(3)));
        assert_eq!(a.jobs_of_sender(":1.5"), vec![2, 3]);
        a.retire(2);
        assert_eq!(a.len(), 2);
        assert_eq!(a.jobs_of_sender(":1.5"), vec![3]);
        assert!(a.admit(4, 1000, None, 0, B).is_ok());
    }

    #[test]
    fn images_count_against_their_owner_until_the_job_ends() {
        let mut a = Admission::default();
        let bounds = Bounds {
            queue_depth: 10,
            per_caller: 10,
            ..B
        };
        assert!(a.admit(1, 1000, None, 60, bounds).is_ok());
        assert_eq!(
            a.admit(2, 1000, None, 41, bounds),
            Err(QueueError::CallerImageBytes {
                held: 60,
                asked: 41,
                limit: 100
            })
        );
        // Another owner has a share of its own; text-only jobs hold none.
        assert!(a.admit(2, 1001, None, 100, bounds).is_ok());
        assert!(a.admit(3, 1000, None, 0, bounds).is_ok());
        assert!(a.admit(4, 1000, None, 40, bounds).is_ok());
        a.retire(1);
        assert!(a.admit(5, 1000, None, 60, bounds).is_ok());
    }
}
