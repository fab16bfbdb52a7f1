//! Admission: which jobs are active (queued, running or being delivered), and the limits
//! that refuse new ones: the queue depth and each caller's share. Pure data, tested alone.

use std::collections::HashMap;

use super::JobId;
use super::queue::QueueError;

/// The active jobs, with their owners and the bus names that sent them.
#[derive(Debug, Default)]
pub struct Admission {
    owners: HashMap<JobId, u32>,
    senders: HashMap<JobId, String>,
}

impl Admission {
    /// Admits job `id` of `owner` if the queue (`queue_depth` jobs) and the owner's share
    /// (`per_caller` jobs) have room.
    pub fn admit(
        &mut self,
        id: JobId,
        owner: u32,
        sender: Option<String>,
        queue_depth: usize,
        per_caller: usize,
    ) -> Result<(), QueueError> {
        if self.owners.len() >= queue_depth {
            return Err(QueueError::Full(queue_depth));
        }
        let mine = self.owners.values().filter(|&&o| o == owner).count();
        if mine >= per_caller {
            return Err(QueueError::CallerFull(mine));
        }
        self.owners.insert(id, owner);
        if let Some(sender) = sender {
            self.senders.insert(id, sender);
        }
        Ok(())
    }

    /// The job no longer counts.
    pub fn retire(&mut self, id: JobId) {
        self.owners.remove(&id);
        self.senders.remove(&id);
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

    #[test]
    fn depth_and_share_limits() {
        let mut a = Admission::default();
        assert!(a.admit(1, 1000, None, 3, 2).is_ok());
        assert!(a.admit(2, 1000, Some(":1.5".into()), 3, 2).is_ok());
        assert_eq!(a.admit(3, 1000, None, 3, 2), Err(QueueError::CallerFull(2)));
        assert!(a.admit(3, 1001, Some(":1.5".into()), 3, 2).is_ok());
        assert_eq!(a.admit(4, 1002, None, 3, 2), Err(QueueError::Full(3)));
        assert_eq!(a.jobs_of_sender(":1.5"), vec![2, 3]);
        a.retire(2);
        assert_eq!(a.len(), 2);
        assert_eq!(a.jobs_of_sender(":1.5"), vec![3]);
        assert!(a.admit(4, 1000, None, 3, 2).is_ok());
    }
}
