//! Job numbers: the clock in microseconds, rising within a run and past every number an
//! earlier run gave out.

use super::JobId;

/// Microseconds since the Unix epoch.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The next job number: the clock in microseconds, or one more than the last number when
/// the clock has not moved past it. Numbers rise within a run and a restarted daemon starts
/// past every number an earlier run gave out (a call takes longer than a microsecond, so
/// numbers never run ahead of the clock for long), so a path from before a restart names no
/// job (UnknownObject) instead of another caller's. They stay below 2^53, exact in a
/// double for clients in languages without 64-bit integers.
pub fn next_job_id(last: &std::sync::atomic::AtomicU64, now_micros: u64) -> JobId {
    use std::sync::atomic::Ordering;
    let mut prev = last.load(Ordering::Relaxed);
    loop {
        let next = now_micros.max(prev + 1);
        match last.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => prev = seen,
        }
    }
}
