//! [`SchedulerConfig::resolve`]: the concrete [`ResolvedConfig`] one class sees (the
//! file's value for a key the class takes, else the class default).

use serde_json::Value;

use super::{
    AlgorithmType, BetaSchedule, ConfigError, FinalSigmasType, InterpolationType, JsonFloatField,
    PredictionType, ResolvedConfig, SchedulerClass, SchedulerConfig, SolverType, TimeShiftType,
    TimestepSpacing, TimestepType, VarianceType,
};

/// Parses an enum-valued key from its diffusers spelling.
fn parse_choice<T: Copy>(
    class: SchedulerClass,
    key: &'static str,
    value: &str,
    choices: &[(&str, T)],
) -> Result<T, ConfigError> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| ConfigError::Unsupported {
            class: class.class_name(),
            key,
            value: format!("{value:?}"),
        })
}

impl SchedulerConfig {
    /// The settings `class` gets from `Class.from_config(self)`.
    pub fn resolve(&self, class: SchedulerClass) -> Result<ResolvedConfig, ConfigError> {
        let d = ResolvedConfig::defaults(class);
        let r = Resolver { class };
        Ok(ResolvedConfig {
            class,
            num_train_timesteps: r.pick(
                "num_train_timesteps",
                self.num_train_timesteps,
                d.num_train_timesteps,
            ),
            beta_start: r.float("beta_start", self.beta_start, d.beta_start),
            beta_end: r.float("beta_end", self.beta_end, d.beta_end),
            beta_schedule: r.choice(
                "beta_schedule",
                &self.beta_schedule,
                d.beta_schedule,
                &[
                    ("linear", BetaSchedule::Linear),
                    ("scaled_linear", BetaSchedule::ScaledLinear),
                    ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
                ],
            )?,
            trained_betas: r.pick("trained_betas", self.trained_betas.clone().map(Some), None),
            prediction_type: r.choice(
                "prediction_type",
                &self.prediction_type,
                d.prediction_type,
                &[
                    ("epsilon", PredictionType::Epsilon),
                    ("v_prediction", PredictionType::VPrediction),
                    ("sample", PredictionType::Sample),
                ],
            )?,
            timestep_spacing: r.choice(
                "timestep_spacing",
                &self.timestep_spacing,
                d.timestep_spacing,
                &[
                    ("linspace", TimestepSpacing::Linspace),
                    ("leading", TimestepSpacing::Leading),
                    ("trailing", TimestepSpacing::Trailing),
                ],
            )?,
            steps_offset: r.pick("steps_offset", self.steps_offset, d.steps_offset),
            clip_sample: r.pick("clip_sample", self.clip_sample, d.clip_sample),
            clip_sample_range: r.float(
                "clip_sample_range",
                self.clip_sample_range,
                d.clip_sample_range,
            ),
            thresholding: r.pick("thresholding", self.thresholding, d.thresholding),
            dynamic_thresholding_ratio: r.float(
                "dynamic_thresholding_ratio",
                self.dynamic_thresholding_ratio,
                d.dynamic_thresholding_ratio,
            ),
            sample_max_value: r.float(
                "sample_max_value",
                self.sample_max_value,
                d.sample_max_value,
            ),
            set_alpha_to_one: r.pick(
                "set_alpha_to_one",
                self.set_alpha_to_one,
                d.set_alpha_to_one,
            ),
            skip_prk_steps: r.pick("skip_prk_steps", self.skip_prk_steps, d.skip_prk_steps),
            rescale_betas_zero_snr: r.pick(
                "rescale_betas_zero_snr",
                self.rescale_betas_zero_snr,
                d.rescale_betas_zero_snr,
            ),
            variance_type: r.optional_choice(
                "variance_type",
                &self.variance_type,
                d.variance_type,
                &[
                    ("fixed_small", VarianceType::FixedSmall),
                    ("fixed_small_log", VarianceType::FixedSmallLog),
                    ("fixed_large", VarianceType::FixedLarge),
                    ("fixed_large_log", VarianceType::FixedLargeLog),
                    ("learned", VarianceType::Learned),
                    ("learned_range", VarianceType::LearnedRange),
                ],
            )?,
            interpolation_type: r.choice(
                "interpolation_type",
                &self.interpolation_type,
                d.interpolation_type,
                &[
                    ("linear", InterpolationType::Linear),
                    ("log_linear", InterpolationType::LogLinear),
                ],
            )?,
            use_karras_sigmas: r.pick(
                "use_karras_sigmas",
                self.use_karras_sigmas,
                d.use_karras_sigmas,
            ),
            use_exponential_sigmas: r.pick(
                "use_exponential_sigmas",
                self.use_exponential_sigmas,
                d.use_exponential_sigmas,
            ),
            use_beta_sigmas: r.pick("use_beta_sigmas", self.use_beta_sigmas, d.use_beta_sigmas),
            use_lu_lambdas: r.pick("use_lu_lambdas", self.use_lu_lambdas, d.use_lu_lambdas),
            use_flow_sigmas: r.pick("use_flow_sigmas", self.use_flow_sigmas, d.use_flow_sigmas),
            flow_shift: r.float("flow_shift", self.flow_shift, d.flow_shift),
            // diffusers registers keys a class does not take as hidden config entries,
            // and the Karras/exponential conversions read `self.config.sigma_min` via
            // `hasattr`, so these come from the file whatever the class.
            sigma_min: self.sigma_min.map(JsonFloatField::get),
            sigma_max: self.sigma_max.map(JsonFloatField::get),
            timestep_type: r.choice(
                "timestep_type",
                &self.timestep_type,
                d.timestep_type,
                &[
                    ("discrete", TimestepType::Discrete),
                    ("continuous", TimestepType::Continuous),
                ],
            )?,
            final_sigmas_type: r.choice(
                "final_sigmas_type",
                &self.final_sigmas_type,
                d.final_sigmas_type,
                &[
                    ("zero", FinalSigmasType::Zero),
                    ("sigma_min", FinalSigmasType::SigmaMin),
                ],
            )?,
            solver_order: r.pick("solver_order", self.solver_order, d.solver_order),
            algorithm_type: r.choice(
                "algorithm_type",
                &self.algorithm_type,
                d.algorithm_type,
                &[
                    ("dpmsolver", AlgorithmType::DpmSolver),
                    ("dpmsolver++", AlgorithmType::DpmSolverPlusPlus),
                    ("sde-dpmsolver", AlgorithmType::SdeDpmSolver),
                    ("sde-dpmsolver++", AlgorithmType::SdeDpmSolverPlusPlus),
                    ("deis", AlgorithmType::Deis),
                ],
            )?,
            solver_type: r.choice(
                "solver_type",
                &self.solver_type,
                d.solver_type,
                &[
                    ("midpoint", SolverType::Midpoint),
                    ("heun", SolverType::Heun),
                    ("logrho", SolverType::Logrho),
                    ("bh1", SolverType::Bh1),
                    ("bh2", SolverType::Bh2),
                ],
            )?,
            lower_order_final: r.pick(
                "lower_order_final",
                self.lower_order_final,
                d.lower_order_final,
            ),
            euler_at_final: r.pick("euler_at_final", self.euler_at_final, d.euler_at_final),
            lambda_min_clipped: r.float(
                "lambda_min_clipped",
                self.lambda_min_clipped,
                d.lambda_min_clipped,
            ),
            use_dynamic_shifting: r.pick(
                "use_dynamic_shifting",
                self.use_dynamic_shifting,
                d.use_dynamic_shifting,
            ),
            time_shift_type: r.choice(
                "time_shift_type",
                &self.time_shift_type,
                d.time_shift_type,
                &[
                    ("exponential", TimeShiftType::Exponential),
                    ("linear", TimeShiftType::Linear),
                ],
            )?,
            predict_x0: r.pick("predict_x0", self.predict_x0, d.predict_x0),
            disable_corrector: r.pick(
                "disable_corrector",
                self.disable_corrector.clone(),
                d.disable_corrector,
            ),
            shift_terminal: r.optional_float("shift_terminal", self.shift_terminal),
            original_inference_steps: r.pick(
                "original_inference_steps",
                self.original_inference_steps,
                d.original_inference_steps,
            ),
            timestep_scaling: r.float(
                "timestep_scaling",
                self.timestep_scaling,
                d.timestep_scaling,
            ),
        })
        .and_then(|resolved| r.check_solver_p(&self.solver_p).map(|()| resolved))
    }
}

/// Applies "file value if the class takes the key, else the class default".
struct Resolver {
    class: SchedulerClass,
}

impl Resolver {
    fn pick<T>(&self, key: &str, value: Option<T>, default: T) -> T {
        match value {
            Some(v) if self.class.takes(key) => v,
            _ => default,
        }
    }

    fn float(&self, key: &str, value: Option<JsonFloatField>, default: f64) -> f64 {
        self.pick(key, value.map(JsonFloatField::get), default)
    }

    fn optional_float(&self, key: &str, value: Option<JsonFloatField>) -> Option<f64> {
        self.pick(key, value.map(|v| Some(v.get())), None)
    }

    fn choice<T: Copy>(
        &self,
        key: &'static str,
        value: &Option<String>,
        default: T,
        choices: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        match value {
            Some(v) if self.class.takes(key) => parse_choice(self.class, key, v, choices),
            _ => Ok(default),
        }
    }

    fn optional_choice<T: Copy>(
        &self,
        key: &'static str,
        value: &Option<String>,
        default: Option<T>,
        choices: &[(&str, T)],
    ) -> Result<Option<T>, ConfigError> {
        match value {
            Some(v) if self.class.takes(key) => parse_choice(self.class, key, v, choices).map(Some),
            _ => Ok(default),
        }
    }

    fn check_solver_p(&self, value: &Option<Value>) -> Result<(), ConfigError> {
        match value {
            Some(v) if self.class.takes("solver_p") && !v.is_null() => {
                Err(ConfigError::Unsupported {
                    class: self.class.class_name(),
                    key: "solver_p",
                    value: v.to_string(),
                })
            }
            _ => Ok(()),
        }
    }
}
