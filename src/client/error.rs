//! Client errors: every failure as one readable line; the daemon's own errors
//! (`io.github.Diffusiond1.Error.X`) read as `X: message`. Text the daemon sends (which
//! may hold what another caller chose: labels, names) is shown through [`printable`], so
//! it can neither move the cursor nor forge lines on a terminal.

use std::borrow::Cow;
use std::path::PathBuf;

use super::CALL_TIMEOUT;
use crate::wire::{BUS_NAME, Bus, ERROR_PREFIX};

/// A client failure, displayed as one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No connection to the bus.
    #[error("cannot connect to {bus}: {message}{hint}", hint = connect_hint(bus))]
    Connect {
        /// The bus tried.
        bus: Bus,
        /// Why.
        message: String,
    },
    /// Nobody owns `io.github.Diffusiond1` on the bus, and the bus could not start it.
    #[error("diffusiond is not running on {0} (no owner for {BUS_NAME}){hint}", hint = start_hint(.0))]
    NotRunning(Bus),
    /// The daemon answered with one of its errors (`io.github.Diffusiond1.Error.<name>`).
    #[error("{name}: {}", printable_lines(message))]
    Daemon {
        /// The short error name, e.g. `UnknownModel`.
        name: String,
        /// The daemon's message.
        message: String,
    },
    /// The job reference names no job (anymore).
    #[error("no such job: {0}")]
    NoSuchJob(String),
    /// A call took longer than [`CALL_TIMEOUT`].
    #[error("diffusiond did not answer {0} within {secs} s", secs = CALL_TIMEOUT.as_secs())]
    Timeout(&'static str),
    /// The user interrupted (Ctrl-C); `cancelled` says whether the job was cancelled.
    #[error("interrupted{}", if *.cancelled { "; job cancelled" } else { "" })]
    Interrupted {
        /// Whether `Cancel()` was called and succeeded.
        cancelled: bool,
    },
    /// A bad argument caught before asking the daemon.
    #[error("{0}")]
    InvalidArgument(String),
    /// The daemon's reply lacks something the API promises.
    #[error("unexpected reply from diffusiond: {}", printable(.0))]
    Protocol(String),
    /// Writing an output file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Any other D-Bus failure.
    #[error("D-Bus: {}", printable_lines(.0))]
    DBus(String),
}

/// Whether `c` must not reach a terminal as it is: C0 and C1 controls, DEL, and the
/// bidirectional overrides and isolates (which reorder what follows them on screen).
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape_into(out: &mut String, c: char) {
    use std::fmt::Write as _;
    let _ = match c {
        '\n' => write!(out, "\\n"),
        '\r' => write!(out, "\\r"),
        '\t' => write!(out, "\\t"),
        c if (c as u32) < 0x100 => write!(out, "\\x{:02x}", c as u32),
        c => write!(out, "\\u{{{:x}}}", c as u32),
    };
}

fn escaped(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !text.chars().any(|c| is_unsafe(c) && !keep(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) && !keep(c) {
            escape_into(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` safe to print on one line of a terminal: every control character (newlines
/// too), DEL, and bidirectional override is written as an escape (`ESC` as `\x1b`, a
/// newline as `\n`, U+202E as `\u{202e}`); everything else is unchanged.
pub fn printable(text: &str) -> Cow<'_, str> {
    escaped(text, |_| false)
}

/// [`printable`], but newlines stay (for the daemon's messages of several lines, such as
/// a manifest's line errors).
pub fn printable_lines(text: &str) -> Cow<'_, str> {
    escaped(text, |c| c == '\n')
}

/// What to do when the bus cannot be reached.
fn connect_hint(bus: &Bus) -> &'static str {
    match bus {
        Bus::Session => {
            "; there is no session bus here: run the command inside `dbus-run-session -- ...`, or use --system"
        }
        Bus::System => "; is the system bus (dbus) running?",
        Bus::Address(_) => "",
    }
}

/// How to get a daemon on `bus`.
fn start_hint(bus: &Bus) -> &'static str {
    match bus {
        Bus::Session => {
            "; start it with `diffusiond &`, or install the activation file so the bus starts it (scripts/install-session)"
        }
        Bus::System => {
            "; start it with `systemctl start diffusiond` (installed by scripts/install)"
        }
        Bus::Address(_) => "; start it with `diffusiond --address ADDR &`",
    }
}

/// Result of client operations.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

impl ClientError {
    /// Maps a zbus error from a call on `bus` to a readable error.
    pub fn from_zbus(bus: &Bus, e: zbus::Error) -> ClientError {
        match e {
            zbus::Error::MethodError(name, message, _) => {
                let message = message.unwrap_or_default();
                let name = name.as_str();
                if let Some(short) = name.strip_prefix(ERROR_PREFIX) {
                    return ClientError::Daemon {
                        name: short.to_string(),
                        message,
                    };
                }
                match name {
                    "org.freedesktop.DBus.Error.ServiceUnknown"
                    | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                        ClientError::NotRunning(bus.clone())
                    }
                    "org.freedesktop.DBus.Error.NoReply" => ClientError::DBus(format!(
                        "diffusiond went away without replying ({message})"
                    )),
                    _ => {
                        let short = name.rsplit('.').next().unwrap_or(name);
                        ClientError::DBus(format!("{short}: {message}"))
                    }
                }
            }
            zbus::Error::FDO(fdo) => match *fdo {
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => {
                    ClientError::NotRunning(bus.clone())
                }
                other => ClientError::DBus(other.to_string()),
            },
            other => ClientError::DBus(other.to_string()),
        }
    }
}

/// `true` for the errors a call on a job path gives when the job does not exist.
pub(super) fn is_unknown_object(e: &zbus::Error) -> bool {
    let name = match e {
        zbus::Error::MethodError(name, _, _) => name.as_str().to_string(),
        zbus::Error::FDO(fdo) => match **fdo {
            zbus::fdo::Error::UnknownObject(_) => return true,
            zbus::fdo::Error::UnknownInterface(_) => return true,
            zbus::fdo::Error::UnknownMethod(_) => return true,
            zbus::fdo::Error::UnknownProperty(_) => return true,
            _ => return false,
        },
        _ => return false,
    };
    matches!(
        name.as_str(),
        "org.freedesktop.DBus.Error.UnknownObject"
            | "org.freedesktop.DBus.Error.UnknownInterface"
            | "org.freedesktop.DBus.Error.UnknownMethod"
            | "org.freedesktop.DBus.Error.UnknownProperty"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_overrides_are_escaped() {
        assert!(matches!(printable("/home/a/out"), Cow::Borrowed(_)));
        assert_eq!(
            printable("caf\u{e9} \u{4e2d}"),
            "caf\u{e9} \u{4e2d}",
            "text stays"
        );
        assert_eq!(printable("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(printable("x\ny\r\tz\0"), "x\\ny\\r\\tz\\x00");
        assert_eq!(printable("\x7f\u{9b}"), "\\x7f\\x9b", "DEL and a C1 CSI");
        assert_eq!(printable("a\u{202e}b\u{2066}"), "a\\u{202e}b\\u{2066}");
        assert_eq!(printable_lines("line 1\nline\x1b 2"), "line 1\nline\\x1b 2");
    }

    #[test]
    fn daemon_messages_are_shown_escaped() {
        let e = ClientError::Daemon {
            name: "InvalidArgument".into(),
            message: "bad '\x1b]0;owned\x07'\nline 2".into(),
        };
        assert_eq!(
            e.to_string(),
            "InvalidArgument: bad '\\x1b]0;owned\\x07'\nline 2"
        );
        let e = ClientError::DBus("Failed: \x1b[1A".into());
        assert_eq!(e.to_string(), "D-Bus: Failed: \\x1b[1A");
    }
}
