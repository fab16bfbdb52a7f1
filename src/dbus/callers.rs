//! Who is calling: a connection's credentials (uid, groups) from the bus, asked once per
//! connection with a bounded wait, then kept.
//!
//! A unique bus name (`:1.42`) names one connection for its whole life and is never given
//! to another, so its credentials never change: asking the bus again on every call only
//! adds round trips, and a bus that is slow to answer (its queues full of another caller's
//! large messages) would hold every method call for as long. A wait that passes
//! [`BUS_CALL_TIMEOUT`] fails the call instead; the cache is bounded (oldest first out).

use std::collections::{HashMap, VecDeque};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use zbus::Connection;
use zbus::message::Header;

use super::Error;

/// The longest the daemon waits for the bus to answer one of its own calls.
pub const BUS_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections whose credentials are kept.
const CACHED_CONNECTIONS: usize = 4096;

/// A connection's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Its Unix uid.
    pub uid: u32,
    /// Its Unix groups, when the bus says.
    pub groups: Option<Vec<u32>>,
}

/// Credentials by (bus GUID, unique name), oldest first.
#[derive(Default)]
struct Cache {
    map: HashMap<(String, String), Credentials>,
    order: VecDeque<(String, String)>,
}

impl Cache {
    fn get(&self, key: &(String, String)) -> Option<Credentials> {
        self.map.get(key).cloned()
    }

    fn insert(&mut self, key: (String, String), creds: Credentials, cap: usize) {
        if self.map.insert(key.clone(), creds).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Mutex::default);

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The credentials of the connection that sent `header`'s message, from the bus (never
/// from the message body).
pub async fn credentials(conn: &Connection, header: &Header<'_>) -> Result<Credentials, Error> {
    let sender = header
        .sender()
        .ok_or_else(|| Error::AccessDenied("the message has no sender".into()))?;
    let key = (conn.server_guid().to_string(), sender.to_string());
    if let Some(creds) = cache().get(&key) {
        return Ok(creds);
    }
    let ask = async {
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        let c = dbus
            .get_connection_credentials(sender.clone().into())
            .await?;
        let uid = match c.unix_user_id() {
            Some(uid) => uid,
            None => dbus.get_connection_unix_user(sender.clone().into()).await?,
        };
        Ok::<_, zbus::fdo::Error>(Credentials {
            uid,
            groups: c.unix_group_ids().cloned(),
        })
    };
    let creds = match tokio::time::timeout(BUS_CALL_TIMEOUT, ask).await {
        Ok(Ok(creds)) => creds,
        Ok(Err(e)) => return Err(Error::ZBus(e.into())),
        Err(_) => {
            return Err(Error::AccessDenied(format!(
                "the bus did not say who the caller is within {} s; retry",
                BUS_CALL_TIMEOUT.as_secs()
            )));
        }
    };
    cache().insert(key, creds.clone(), CACHED_CONNECTIONS);
    Ok(creds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_the_newest_connections() {
        let mut c = Cache::default();
        let key = |n: u32| ("guid".to_string(), format!(":1.{n}"));
        let creds = |uid| Credentials { uid, groups: None };
        for n in 0..5 {
            c.insert(key(n), creds(n), 3);
        }
        assert_eq!(c.get(&key(0)), None);
        assert_eq!(c.get(&key(1)), None);
        assert_eq!(c.get(&key(4)), Some(creds(4)));
        // Asking again for a known connection does not grow the cache.
        c.insert(key(4), creds(4), 3);
        assert_eq!(c.order.len(), 3);
        assert_eq!(c.map.len(), 3);
    }
}
