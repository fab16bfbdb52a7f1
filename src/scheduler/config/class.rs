//! The diffusers scheduler classes diffusiond implements and the `__init__` keys each
//! one takes.

/// The diffusers scheduler classes diffusiond implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerClass {
    /// `PNDMScheduler`.
    Pndm,
    /// `DDIMScheduler`.
    Ddim,
    /// `DDPMScheduler`.
    Ddpm,
    /// `EulerDiscreteScheduler`.
    EulerDiscrete,
    /// `EulerAncestralDiscreteScheduler`.
    EulerAncestralDiscrete,
    /// `HeunDiscreteScheduler`.
    HeunDiscrete,
    /// `LMSDiscreteScheduler`.
    LmsDiscrete,
    /// `DPMSolverMultistepScheduler`.
    DpmSolverMultistep,
    /// `UniPCMultistepScheduler`.
    UniPcMultistep,
    /// `LCMScheduler`.
    Lcm,
}

/// Keys every class takes.
const COMMON_KEYS: &[&str] = &[
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
];

const PNDM_KEYS: &[&str] = &["skip_prk_steps", "set_alpha_to_one"];
const DDIM_KEYS: &[&str] = &[
    "clip_sample",
    "set_alpha_to_one",
    "thresholding",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "sample_max_value",
    "rescale_betas_zero_snr",
];
const DDPM_KEYS: &[&str] = &[
    "variance_type",
    "clip_sample",
    "thresholding",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "sample_max_value",
    "rescale_betas_zero_snr",
];
const EULER_KEYS: &[&str] = &[
    "interpolation_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "sigma_min",
    "sigma_max",
    "timestep_type",
    "rescale_betas_zero_snr",
    "final_sigmas_type",
];
const EULER_A_KEYS: &[&str] = &["rescale_betas_zero_snr"];
const HEUN_KEYS: &[&str] = &[
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "clip_sample",
    "clip_sample_range",
];
const LMS_KEYS: &[&str] = &[
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
];
const DPM_KEYS: &[&str] = &[
    "solver_order",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "algorithm_type",
    "solver_type",
    "lower_order_final",
    "euler_at_final",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "flow_shift",
    "final_sigmas_type",
    "lambda_min_clipped",
    "variance_type",
    "rescale_betas_zero_snr",
    "use_dynamic_shifting",
    "time_shift_type",
];
const UNIPC_KEYS: &[&str] = &[
    "solver_order",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "predict_x0",
    "solver_type",
    "lower_order_final",
    "disable_corrector",
    "solver_p",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_flow_sigmas",
    "flow_shift",
    "final_sigmas_type",
    "rescale_betas_zero_snr",
    "use_dynamic_shifting",
    "time_shift_type",
    "sigma_min",
    "sigma_max",
    "shift_terminal",
];
const LCM_KEYS: &[&str] = &[
    "original_inference_steps",
    "clip_sample",
    "clip_sample_range",
    "set_alpha_to_one",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "timestep_scaling",
    "rescale_betas_zero_snr",
];

impl SchedulerClass {
    /// Every class, in diffusiond's order.
    pub const ALL: [SchedulerClass; 10] = [
        Self::Pndm,
        Self::Ddim,
        Self::Ddpm,
        Self::EulerDiscrete,
        Self::EulerAncestralDiscrete,
        Self::HeunDiscrete,
        Self::LmsDiscrete,
        Self::DpmSolverMultistep,
        Self::UniPcMultistep,
        Self::Lcm,
    ];

    /// The diffusers class name (as in `model_index.json` / `_class_name`).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Pndm => "PNDMScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::Ddpm => "DDPMScheduler",
            Self::EulerDiscrete => "EulerDiscreteScheduler",
            Self::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            Self::HeunDiscrete => "HeunDiscreteScheduler",
            Self::LmsDiscrete => "LMSDiscreteScheduler",
            Self::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            Self::UniPcMultistep => "UniPCMultistepScheduler",
            Self::Lcm => "LCMScheduler",
        }
    }

    /// The class with diffusers class name `name`, if diffusiond implements it.
    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.class_name() == name)
    }

    /// Whether this class's `__init__` takes config key `key`.
    pub fn takes(self, key: &str) -> bool {
        let own: &[&str] = match self {
            Self::Pndm => PNDM_KEYS,
            Self::Ddim => DDIM_KEYS,
            Self::Ddpm => DDPM_KEYS,
            Self::EulerDiscrete => EULER_KEYS,
            Self::EulerAncestralDiscrete => EULER_A_KEYS,
            Self::HeunDiscrete => HEUN_KEYS,
            Self::LmsDiscrete => LMS_KEYS,
            Self::DpmSolverMultistep => DPM_KEYS,
            Self::UniPcMultistep => UNIPC_KEYS,
            Self::Lcm => LCM_KEYS,
        };
        COMMON_KEYS.contains(&key) || own.contains(&key)
    }
}
