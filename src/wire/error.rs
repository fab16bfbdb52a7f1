//! The daemon's D-Bus errors (`io.github.Diffusiond1.Error.<Name>`), and the one place
//! where the typed failures of the request resolver and the job engine become them.

use std::borrow::Cow;

use crate::batch::BatchError;
use crate::jobs::{EngineError, Failure};
use crate::request::RequestError;

/// The most characters of caller text (a name, a key, a value) an error message repeats;
/// see [`echo`].
pub const MAX_ECHO_CHARS: usize = 80;

/// Caller text as an error message repeats it: unchanged when it has at most
/// [`MAX_ECHO_CHARS`] characters, else its first ones, an ellipsis and how long it was, so
/// that a 100,000-character name costs an 80-character echo.
pub fn echo(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(MAX_ECHO_CHARS) {
        None => Cow::Borrowed(text),
        Some((cut, _)) => Cow::Owned(format!(
            "{}… ({} characters)",
            &text[..cut],
            text.chars().count()
        )),
    }
}

/// Typed errors on the wire: `io.github.Diffusiond1.Error.<Name>`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.github.Diffusiond1.Error")]
pub enum Error {
    /// A zbus failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// Unknown key, wrong type or bad value.
    InvalidArgument(String),
    /// The model is not configured.
    UnknownModel(String),
    /// The queue or the caller's share of it is full.
    QueueFull(String),
    /// The request would need more memory than the daemon's budget; the message says what
    /// size fits.
    TooLarge(String),
    /// The job was cancelled.
    Cancelled(String),
    /// The model could not be loaded.
    ModelLoadFailed(String),
    /// ONNX Runtime failed.
    InferenceFailed(String),
    /// The caller does not own the job.
    AccessDenied(String),
    /// The daemon is stopping.
    ShuttingDown(String),
    /// A batch manifest has bad lines; the message lists each (line number and key).
    InvalidManifest(String),
    /// No such batch (it was removed, or never existed).
    UnknownBatch(String),
    /// The batch state or its files could not be read or written (names the file).
    StorageFailed(String),
}

impl Error {
    /// Counts this error as a refused request (metrics: `reason` is its name, e.g.
    /// `QueueFull`) and returns it. Job outcomes (`Wait()`'s errors) are not refusals.
    pub fn refused(self) -> Self {
        if !matches!(self, Error::ZBus(_)) {
            use zbus::DBusError as _;
            let name = self.name();
            crate::metrics::refused(name.as_str().rsplit('.').next().unwrap_or_default());
        }
        self
    }
}

impl From<BatchError> for Error {
    fn from(e: BatchError) -> Self {
        let refusal = matches!(
            e,
            BatchError::Manifest(_)
                | BatchError::Denied(_)
                | BatchError::Limit(_)
                | BatchError::NoResult(_)
                | BatchError::Changed(_)
        );
        let e = match e {
            BatchError::Manifest(_) => Error::InvalidManifest(e.to_string()),
            BatchError::Unknown(_) => Error::UnknownBatch(e.to_string()),
            BatchError::Denied(m) => Error::AccessDenied(m),
            BatchError::Limit(m) => Error::QueueFull(m),
            BatchError::NoResult(m) | BatchError::Changed(m) => Error::InvalidArgument(m),
            BatchError::Model(m) => Error::ModelLoadFailed(m),
            BatchError::Store(_) | BatchError::Io(_) => Error::StorageFailed(e.to_string()),
        };
        if refusal { e.refused() } else { e }
    }
}

impl From<RequestError> for Error {
    /// A request the resolver refused (counted in the metrics).
    fn from(e: RequestError) -> Self {
        let e = match e {
            RequestError::UnknownModel { .. } | RequestError::NoDefaultModel => {
                Error::UnknownModel(e.to_string())
            }
            RequestError::ModelUnavailable { .. } => Error::ModelLoadFailed(e.to_string()),
            RequestError::TooLarge { .. } => Error::TooLarge(e.to_string()),
            _ => Error::InvalidArgument(e.to_string()),
        };
        e.refused()
    }
}

impl From<EngineError> for Error {
    /// A job or command the engine refused (counted in the metrics), or a load failure.
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Queue(q) => Error::QueueFull(q.to_string()).refused(),
            EngineError::ShuttingDown => Error::ShuttingDown(e.to_string()).refused(),
            // The name is caller text (LoadModel, UnloadModel): repeated cut short.
            EngineError::UnknownModel(name) => {
                Error::UnknownModel(format!("unknown model '{}'", echo(&name))).refused()
            }
            EngineError::Failed(f) => f.into(),
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        match f {
            Failure::ModelLoad(m) => Error::ModelLoadFailed(m),
            Failure::Inference(m) | Failure::Output(m) => Error::InferenceFailed(m),
            Failure::InvalidArgument(m) => Error::InvalidArgument(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    #[test]
    fn echoes_of_caller_text_are_bounded() {
        assert_eq!(echo("fox.png"), "fox.png");
        let exact = "x".repeat(MAX_ECHO_CHARS);
        assert_eq!(echo(&exact), exact.as_str());
        let long = "é".repeat(100_000);
        let e = echo(&long);
        assert!(e.starts_with(&"é".repeat(MAX_ECHO_CHARS)), "{e}");
        assert!(e.ends_with("… (100000 characters)"), "{e}");
        assert!(e.chars().count() < MAX_ECHO_CHARS + 30, "{e}");
    }

    #[test]
    fn an_unknown_model_name_from_the_engine_is_cut_short() {
        let e = Error::from(EngineError::UnknownModel("n".repeat(100_000)));
        let d = e.description().unwrap();
        assert!(d.starts_with("unknown model 'nnn"), "{d}");
        assert!(d.len() < 200, "{} bytes", d.len());
        let e = Error::from(EngineError::UnknownModel("tiny2".into()));
        assert_eq!(e.description(), Some("unknown model 'tiny2'"));
    }

    #[test]
    fn names_carry_the_prefix() {
        let e = Error::from(RequestError::NoDefaultModel);
        assert_eq!(
            e.name().as_str(),
            format!("{}UnknownModel", super::super::ERROR_PREFIX)
        );
        let e = Error::from(Failure::ModelLoad("x".into()));
        assert_eq!(
            e.name().as_str(),
            "io.github.Diffusiond1.Error.ModelLoadFailed"
        );
        let e = Error::from(RequestError::invalid("width", "bad"));
        assert_eq!(e.description(), Some("'width': bad"));
    }
}
