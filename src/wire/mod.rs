//! The D-Bus contract (docs/dbus-api.md), written once for the daemon and the client:
//! the bus name, object paths, interface and error names ([`error`]), the request keys
//! with their D-Bus types and conversions both ways ([`keys`]; the ControlNets of
//! `controls` in [`controls`]), and the reply dicts ([`reply`]).
//!
//! The `#[interface]` and `#[proxy]` attributes need literal names; unit tests check that
//! those literals equal the constants here.

pub mod batch;
pub mod controls;
pub mod error;
pub mod images;
pub mod keys;
pub mod raw;
pub mod reply;

use zbus::zvariant::{ObjectPath, OwnedObjectPath};

pub use error::Error;

/// The well-known bus name.
pub const BUS_NAME: &str = "io.github.Diffusiond1";
/// The Manager's object path.
pub const MANAGER_PATH: &str = "/io/github/Diffusiond1";
/// The Manager interface.
pub const MANAGER_INTERFACE: &str = "io.github.Diffusiond1.Manager";
/// The Job interface.
pub const JOB_INTERFACE: &str = "io.github.Diffusiond1.Job";
/// Job object paths are `JOB_PATH_PREFIX<n>`.
pub const JOB_PATH_PREFIX: &str = "/io/github/Diffusiond1/job/";
/// The prefix of the daemon's own error names (`io.github.Diffusiond1.Error.<Name>`).
pub const ERROR_PREFIX: &str = "io.github.Diffusiond1.Error.";

/// The path of job `id`.
pub fn job_path(id: u64) -> OwnedObjectPath {
    ObjectPath::try_from(format!("{JOB_PATH_PREFIX}{id}"))
        .map(OwnedObjectPath::from)
        .unwrap_or_else(|_| {
            OwnedObjectPath::from(ObjectPath::from_static_str_unchecked(MANAGER_PATH))
        })
}

/// Which bus: the daemon serves on it, the client looks for the daemon on it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Bus {
    /// The user's session bus (`DBUS_SESSION_BUS_ADDRESS`).
    #[default]
    Session,
    /// The system bus.
    System,
    /// A bus at this D-Bus address.
    Address(String),
}

impl Bus {
    /// A connection builder for this bus.
    pub fn builder(&self) -> zbus::Result<zbus::connection::Builder<'static>> {
        match self {
            Bus::Session => zbus::connection::Builder::session(),
            Bus::System => zbus::connection::Builder::system(),
            Bus::Address(a) => zbus::connection::Builder::address(a.as_str()),
        }
    }
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bus::Session => f.write_str("the session bus"),
            Bus::System => f.write_str("the system bus"),
            Bus::Address(a) => write!(f, "the bus at {a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_names_agree() {
        assert_eq!(job_path(7).as_str(), "/io/github/Diffusiond1/job/7");
        assert!(JOB_PATH_PREFIX.starts_with(MANAGER_PATH));
        assert!(MANAGER_INTERFACE.starts_with(BUS_NAME));
        assert!(JOB_INTERFACE.starts_with(BUS_NAME));
        assert!(ERROR_PREFIX.starts_with(BUS_NAME));
        assert_eq!(
            Bus::Address("unix:path=/x".into()).to_string(),
            "the bus at unix:path=/x"
        );
    }
}
