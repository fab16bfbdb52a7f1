//! Reading batch submissions: a manifest can be tens of megabytes, and checking every line
//! of one keeps a core busy for a second or more. With no bound, eight parallel
//! submissions from one caller took both cores from the daemon's bus reader, the bus's
//! queue to the daemon filled and other callers' calls were refused (`LimitsExceeded`).
//!
//! So: each uid may have [`PER_UID`] submissions being read at once (more are refused at
//! once with `QueueFull`, before their bytes are copied), and [`AT_ONCE`] manifests are
//! checked at a time across all callers; the others wait their turn without holding a
//! thread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Error;

/// Submissions one uid may have being read at once.
pub const PER_UID: usize = 2;
/// Manifests checked at once, across all callers.
pub const AT_ONCE: usize = 1;

/// A manifest at least this large gives its memory back to the system once it was read
/// ([`crate::heap::give_back`]).
pub const TRIM_AFTER_BYTES: usize = 1 << 20;

/// The gate submissions pass through.
#[derive(Clone)]
pub struct Intake {
    reading: Arc<Mutex<HashMap<u32, usize>>>,
    checking: Arc<Semaphore>,
}

impl Default for Intake {
    fn default() -> Self {
        Intake {
            reading: Arc::default(),
            checking: Arc::new(Semaphore::new(AT_ONCE)),
        }
    }
}

/// A submission being read; counts against its uid until dropped.
pub struct Ticket {
    uid: u32,
    reading: Arc<Mutex<HashMap<u32, usize>>>,
    checking: Arc<Semaphore>,
}

impl Intake {
    /// Admits a submission of `uid`, or says why not.
    pub fn enter(&self, uid: u32) -> Result<Ticket, Error> {
        let mut reading = self.reading.lock().unwrap_or_else(|e| e.into_inner());
        let n = reading.entry(uid).or_default();
        if *n >= PER_UID {
            return Err(Error::QueueFull(format!(
                "{PER_UID} batch submissions of yours are being read; submit again when one has its answer"
            )));
        }
        *n += 1;
        Ok(Ticket {
            uid,
            reading: self.reading.clone(),
            checking: self.checking.clone(),
        })
    }
}

impl Ticket {
    /// Waits for this submission's turn to be checked.
    pub async fn turn(&self) -> OwnedSemaphorePermit {
        self.checking
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut reading = self.reading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = reading.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                reading.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_uid_has_its_share_and_one_manifest_is_checked_at_a_time() {
        let intake = Intake::default();
        let a = intake.enter(1000).unwrap();
        let b = intake.enter(1000).unwrap();
        assert!(matches!(intake.enter(1000), Err(Error::QueueFull(_))));
        let other = intake.enter(1001).unwrap();
        let first = a.turn().await;
        // The next waits for the first to be done.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), other.turn());
        assert!(waiting.await.is_err());
        drop(first);
        let _second = other.turn().await;
        drop(b);
        drop(a);
        let _again = intake.enter(1000).unwrap();
        assert_eq!(intake.reading.lock().unwrap().get(&1000), Some(&1));
    }
}
