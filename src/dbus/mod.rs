//! The D-Bus API (docs/dbus-api.md): the Manager and Job objects. The contract itself
//! (names, request keys, reply dicts, error names) is in [`crate::wire`].
//!
//! Interface methods stay thin: read the keys (`wire::keys`), resolve the request once
//! against the opened models (`model::Catalog::resolve`), hand the job to the [`Engine`](crate::jobs::Engine).
//! Engine events come back through [`pump_events`], which updates Job objects, emits
//! their signals, wakes `Wait()` callers and retires finished jobs.
//!
//! * `manager`: the Manager object;
//! * `job`: Job objects and what they show;
//! * `events`: engine events → Job objects, retirement, callers leaving the bus;
//! * `batch`: Batch objects, and batch events → their properties and signals;
//! * `callers`: who is calling (credentials from the bus, asked once per connection);
//! * `intake`: batch submissions read a bounded number at a time.

mod batch;
mod callers;
mod events;
mod intake;
mod job;
mod manager;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zbus::Connection;
use zbus::message::Header;

pub use batch::{Batch, BatchEvent, ChannelEvents, pump_batch_events, schedule_expiry};
pub use events::{pump_events, pump_previews, watch_disconnects};
pub use job::Job;
pub use manager::{Manager, RuntimeInfo};

use crate::jobs::JobId;
pub use crate::wire::Error;
use job::Entry;

/// Jobs that exist on the bus (queued, running, or finished and not yet retired), with
/// their count published for whoever waits for the daemon to be idle.
#[derive(Clone)]
pub struct Registry {
    entries: Arc<Mutex<HashMap<JobId, Entry>>>,
    count: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            entries: Arc::default(),
            count: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, id: JobId, entry: Entry) {
        let mut map = self.lock();
        map.insert(id, entry);
        self.count.send_replace(map.len());
    }

    fn remove(&self, id: JobId) {
        let mut map = self.lock();
        map.remove(&id);
        self.count.send_replace(map.len());
    }

    /// The number of jobs on the bus, as it changes.
    pub fn job_count(&self) -> tokio::sync::watch::Receiver<usize> {
        self.count.subscribe()
    }
}

/// A call must carry exactly the arguments its method declares. zbus's argument decoding
/// refuses most mismatches before a method runs (with its own error name); this catches
/// what it lets through, in our namespace. Methods without arguments take the header for
/// it, which also makes zbus decode (and so check) their empty argument list: without a
/// parameter it would not look at the body at all. `want` is the method's input signature.
fn expect_args(header: &Header<'_>, method: &str, want: &str) -> Result<(), Error> {
    let got = header.signature().to_string_no_parens();
    if got == want {
        return Ok(());
    }
    let takes = if want.is_empty() {
        "no arguments".to_string()
    } else {
        format!("arguments of type '{want}'")
    };
    Err(Error::InvalidArgument(format!("{method} takes {takes}, got '{got}'")).refused())
}

/// Only the owner or root may act on a job or a batch; returns the caller's uid.
async fn check_owner(conn: &Connection, header: &Header<'_>, owner: u32) -> Result<u32, Error> {
    let uid = caller_uid(conn, header).await?;
    if uid == owner || uid == 0 {
        Ok(uid)
    } else {
        Err(Error::AccessDenied(format!(
            "this belongs to uid {owner}; only its owner or root may use it"
        ))
        .refused())
    }
}

/// The caller's Unix uid, from the bus (never from the message body), asked once per
/// connection ([`callers`]).
async fn caller_uid(conn: &Connection, header: &Header<'_>) -> Result<u32, Error> {
    callers::credentials(conn, header).await.map(|c| c.uid)
}

#[cfg(test)]
mod tests {
    use zbus::object_server::Interface;
    use zbus::proxy::Defaults;

    use crate::client::{JobProxy, ManagerProxy};
    use crate::wire;

    /// The literals the zbus attributes need, on both ends, are the contract's constants.
    #[test]
    fn served_and_proxied_names_are_the_contracts() {
        assert_eq!(super::Manager::name().as_str(), wire::MANAGER_INTERFACE);
        assert_eq!(super::Job::name().as_str(), wire::JOB_INTERFACE);
        let name =
            |n: &Option<zbus::names::InterfaceName<'static>>| n.as_ref().map(|n| n.to_string());
        assert_eq!(
            name(<ManagerProxy<'_> as Defaults>::INTERFACE).as_deref(),
            Some(wire::MANAGER_INTERFACE)
        );
        assert_eq!(
            name(<JobProxy<'_> as Defaults>::INTERFACE).as_deref(),
            Some(wire::JOB_INTERFACE)
        );
        let dest = <ManagerProxy<'_> as Defaults>::DESTINATION.as_ref();
        assert_eq!(dest.map(|d| d.to_string()).as_deref(), Some(wire::BUS_NAME));
        let path = <ManagerProxy<'_> as Defaults>::PATH.as_ref();
        assert_eq!(
            path.map(|p| p.to_string()).as_deref(),
            Some(wire::MANAGER_PATH)
        );
    }
}
