//! The `keep_alive` request key (as ollama's): how long the model stays loaded after the
//! job. `-1` keeps it until it is unloaded, `0` unloads it after the job, `n` keeps it `n`
//! seconds unused; without the key, `jobs.idle_unload_secs` applies. Callers other than
//! root and the service user are held to `jobs.max_keep_alive_secs` ([`KeepAlive::capped`],
//! applied by the engine, which knows the job's owner).

use std::time::Duration;

use super::RequestError;

/// The longest `keep_alive` in seconds (about 136 years; `-1` says "for good").
pub const MAX_SECS: f64 = u32::MAX as f64;

/// How long a model stays loaded after a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeepAlive {
    /// This long unused, then unloaded (zero: right after the job).
    For(Duration),
    /// Until it is unloaded (`UnloadModel`, shutdown).
    Forever,
}

impl KeepAlive {
    /// Reads the key's value: `-1`, or seconds from 0 to [`MAX_SECS`].
    pub fn parse(secs: f64) -> Result<KeepAlive, RequestError> {
        if secs == -1.0 {
            Ok(KeepAlive::Forever)
        } else if secs.is_finite() && (0.0..=MAX_SECS).contains(&secs) {
            Ok(KeepAlive::For(Duration::from_secs_f64(secs)))
        } else {
            Err(RequestError::invalid(
                "keep_alive",
                format!("{secs} is neither -1 (until unloaded) nor seconds from 0 to {MAX_SECS}"),
            ))
        }
    }

    /// At most `max` (a caller other than root and the service user).
    pub fn capped(self, max: Duration) -> KeepAlive {
        match self {
            KeepAlive::For(d) if d <= max => self,
            _ => KeepAlive::For(max),
        }
    }

    /// The key's value: seconds, or -1.
    pub fn as_secs(self) -> f64 {
        match self {
            KeepAlive::For(d) => d.as_secs_f64(),
            KeepAlive::Forever => -1.0,
        }
    }

    /// The default lifetime: `jobs.idle_unload_secs` (`None`: 0, never unloaded).
    pub fn default_for(idle: Option<Duration>) -> KeepAlive {
        idle.map_or(KeepAlive::Forever, KeepAlive::For)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_caps() {
        assert_eq!(KeepAlive::parse(-1.0).unwrap(), KeepAlive::Forever);
        assert_eq!(
            KeepAlive::parse(0.0).unwrap(),
            KeepAlive::For(Duration::ZERO)
        );
        assert_eq!(
            KeepAlive::parse(2.5).unwrap(),
            KeepAlive::For(Duration::from_millis(2500))
        );
        for bad in [-0.5, -2.0, f64::NAN, f64::INFINITY, 1e12] {
            let e = KeepAlive::parse(bad).unwrap_err().to_string();
            assert!(e.contains("'keep_alive'"), "{e}");
        }
        let hour = Duration::from_secs(3600);
        assert_eq!(KeepAlive::Forever.capped(hour), KeepAlive::For(hour));
        let day = KeepAlive::For(Duration::from_secs(86400));
        assert_eq!(day.capped(hour), KeepAlive::For(hour));
        let short = KeepAlive::For(Duration::from_secs(5));
        assert_eq!(short.capped(hour), short);
        assert!(
            KeepAlive::Forever > day && day > short,
            "longest wins in a batch"
        );
        assert_eq!(KeepAlive::Forever.as_secs(), -1.0);
        assert_eq!(KeepAlive::default_for(None), KeepAlive::Forever);
    }
}
