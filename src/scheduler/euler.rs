//! Placeholder: not implemented yet.

use super::{ResolvedConfig, Scheduler, SchedulerError};

/// Builds `EulerDiscreteScheduler` (not implemented yet).
pub fn create_euler(
    config: &ResolvedConfig,
    _num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Err(SchedulerError::Unknown(
        config.class.class_name().to_owned(),
    ))
}

/// Builds `EulerAncestralDiscreteScheduler` (not implemented yet).
pub fn create_euler_ancestral(
    config: &ResolvedConfig,
    _num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Err(SchedulerError::Unknown(
        config.class.class_name().to_owned(),
    ))
}
