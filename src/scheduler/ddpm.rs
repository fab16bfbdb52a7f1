//! Placeholder: not implemented yet.

use super::{ResolvedConfig, Scheduler, SchedulerError};

/// Builds the scheduler (not implemented yet).
pub fn create(
    config: &ResolvedConfig,
    _num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Err(SchedulerError::Unknown(
        config.class.class_name().to_owned(),
    ))
}
