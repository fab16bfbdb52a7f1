//! `Generate`'s `a{sv}` request → a validated [`GenerateParams`], in one step.
//! Unknown keys, wrong types and out-of-range values are errors that name the key.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use zbus::zvariant::{OwnedValue, Value};

use crate::pipeline::{GenerateParams, Limits};
use crate::rng::RngKind;

/// A request after validation, before the model's defaults are known.
#[derive(Debug)]
pub struct Request {
    /// Generation parameters (width/height 0 = the model's native size).
    pub params: GenerateParams,
    /// Model name, if given.
    pub model: Option<String>,
    /// Queue priority.
    pub priority: i32,
    /// Caller-owned fds for the PNGs.
    pub output_fds: Vec<OwnedFd>,
    /// Whether the caller chose the seed.
    pub seed_given: bool,
    /// Cancel the job when the caller leaves the bus (default true).
    pub cancel_on_disconnect: bool,
}

/// Every key `Generate` accepts, with its D-Bus type.
pub const KEYS: &[(&str, &str)] = &[
    ("prompt", "s"),
    ("negative_prompt", "s"),
    ("model", "s"),
    ("width", "u"),
    ("height", "u"),
    ("steps", "u"),
    ("guidance_scale", "d"),
    ("guidance_rescale", "d"),
    ("seed", "t"),
    ("rng", "s"),
    ("scheduler", "s"),
    ("num_images", "u"),
    ("priority", "i"),
    ("output_fds", "ah"),
    ("cancel_on_disconnect", "b"),
];

fn type_error(key: &str, want: &str, got: &Value<'_>) -> String {
    format!(
        "'{key}' must have D-Bus type '{want}', got '{}'",
        got.value_signature()
    )
}

fn string(key: &str, v: &Value<'_>) -> Result<String, String> {
    match v {
        Value::Str(s) => Ok(s.to_string()),
        other => Err(type_error(key, "s", other)),
    }
}

fn uint(key: &str, v: &Value<'_>) -> Result<usize, String> {
    match v {
        Value::U32(n) => Ok(*n as usize),
        other => Err(type_error(key, "u", other)),
    }
}

fn double(key: &str, v: &Value<'_>) -> Result<f64, String> {
    match v {
        Value::F64(x) if x.is_finite() => Ok(*x),
        Value::F64(x) => Err(format!("'{key}' must be finite, got {x}")),
        other => Err(type_error(key, "d", other)),
    }
}

fn fds(key: &str, v: &Value<'_>) -> Result<Vec<OwnedFd>, String> {
    let Value::Array(items) = v else {
        return Err(type_error(key, "ah", v));
    };
    items
        .iter()
        .map(|item| match item {
            Value::Fd(fd) => fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("'{key}': cannot use the file descriptor: {e}")),
            other => Err(type_error(key, "ah", other)),
        })
        .collect()
}

/// Parses and checks a request against the limits. Sizes are checked for being
/// multiples of 8 here; the model's own factor is checked when it runs.
pub fn parse(raw: &HashMap<String, OwnedValue>, limits: &Limits) -> Result<Request, String> {
    let mut req = Request {
        params: GenerateParams {
            width: 0,
            height: 0,
            ..GenerateParams::default()
        },
        model: None,
        priority: 0,
        output_fds: Vec::new(),
        seed_given: false,
        cancel_on_disconnect: true,
    };
    let mut prompt = None;
    for (key, value) in raw {
        let v: &Value<'_> = value;
        apply(&mut req, &mut prompt, key, v)?;
    }
    req.params.prompt = prompt.ok_or("'prompt' is required")?;
    check(&req, limits)?;
    Ok(req)
}

fn apply(
    req: &mut Request,
    prompt: &mut Option<String>,
    key: &str,
    v: &Value<'_>,
) -> Result<(), String> {
    let p = &mut req.params;
    match key {
        "prompt" => *prompt = Some(string(key, v)?),
        "negative_prompt" => p.negative_prompt = Some(string(key, v)?),
        "model" => req.model = Some(string(key, v)?),
        "width" => p.width = positive(key, uint(key, v)?)?,
        "height" => p.height = positive(key, uint(key, v)?)?,
        "steps" => p.steps = positive(key, uint(key, v)?)?,
        "num_images" => p.num_images = positive(key, uint(key, v)?)?,
        "guidance_scale" => p.guidance_scale = double(key, v)?,
        "guidance_rescale" => p.guidance_rescale = double(key, v)?,
        "seed" => match v {
            Value::U64(s) => {
                p.seed = *s;
                req.seed_given = true;
            }
            other => return Err(type_error(key, "t", other)),
        },
        "rng" => {
            p.rng = string(key, v)?
                .parse::<RngKind>()
                .map_err(|e| format!("'rng': {e}"))?
        }
        "scheduler" => {
            let name = string(key, v)?;
            if !crate::scheduler::NAMES.contains(&name.as_str()) {
                return Err(format!(
                    "'scheduler': unknown scheduler '{name}' (known: {})",
                    crate::scheduler::NAMES.join(", ")
                ));
            }
            p.scheduler = Some(name);
        }
        "priority" => match v {
            Value::I32(n) => req.priority = *n,
            other => return Err(type_error(key, "i", other)),
        },
        "output_fds" => req.output_fds = fds(key, v)?,
        "cancel_on_disconnect" => match v {
            Value::Bool(b) => req.cancel_on_disconnect = *b,
            other => return Err(type_error(key, "b", other)),
        },
        other => {
            let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
            return Err(format!(
                "unknown key '{other}' (known: {})",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

fn positive(key: &str, v: usize) -> Result<usize, String> {
    if v == 0 {
        return Err(format!("'{key}' must be at least 1"));
    }
    Ok(v)
}

fn check(req: &Request, limits: &Limits) -> Result<(), String> {
    let p = &req.params;
    for (key, v) in [("width", p.width), ("height", p.height)] {
        if v % 8 != 0 {
            return Err(format!("'{key}': {v} is not a multiple of 8"));
        }
    }
    if !(0.0..=1.0).contains(&p.guidance_rescale) {
        return Err(format!(
            "'guidance_rescale': {} is not between 0 and 1",
            p.guidance_rescale
        ));
    }
    if p.rng == RngKind::Numpy && p.seed > u64::from(u32::MAX) {
        return Err(format!(
            "'seed': {} is above 2^32-1, the most numpy's RandomState takes",
            p.seed
        ));
    }
    if !req.output_fds.is_empty() && req.output_fds.len() != p.num_images {
        return Err(format!(
            "'output_fds': {} descriptors for {} images; give one per image",
            req.output_fds.len(),
            p.num_images
        ));
    }
    p.check_limits(limits).map_err(|e| e.to_string())
}

/// The request as the Job's `Request` property shows it: every parameter, defaults filled in.
pub fn to_dict(model: &str, priority: i32, p: &GenerateParams) -> HashMap<String, OwnedValue> {
    let mut d: HashMap<String, OwnedValue> = HashMap::new();
    let mut put = |k: &str, v: Value<'_>| {
        if let Ok(owned) = v.try_to_owned() {
            d.insert(k.to_string(), owned);
        }
    };
    put("prompt", Value::from(p.prompt.as_str()));
    if let Some(n) = &p.negative_prompt {
        put("negative_prompt", Value::from(n.as_str()));
    }
    put("model", Value::from(model));
    put("width", Value::U32(p.width as u32));
    put("height", Value::U32(p.height as u32));
    put("steps", Value::U32(p.steps as u32));
    put("guidance_scale", Value::F64(p.guidance_scale));
    put("guidance_rescale", Value::F64(p.guidance_rescale));
    put("seed", Value::U64(p.seed));
    put("rng", Value::from(p.rng.as_str()));
    if let Some(s) = &p.scheduler {
        put("scheduler", Value::from(s.as_str()));
    }
    put("num_images", Value::U32(p.num_images as u32));
    put("priority", Value::I32(priority));
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: Vec<(&str, Value<'static>)>) -> HashMap<String, OwnedValue> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
            .collect()
    }

    #[test]
    fn minimal_request_takes_defaults() {
        let r = parse(
            &req(vec![("prompt", Value::from("a cat"))]),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(r.params.prompt, "a cat");
        assert_eq!(r.params.steps, 20);
        assert_eq!((r.params.width, r.params.height), (0, 0));
        assert!(!r.seed_given);
    }

    #[test]
    fn every_key_parses() {
        let r = parse(
            &req(vec![
                ("prompt", Value::from("p")),
                ("negative_prompt", Value::from("n")),
                ("model", Value::from("tiny")),
                ("width", Value::U32(64)),
                ("height", Value::U32(96)),
                ("steps", Value::U32(4)),
                ("guidance_scale", Value::F64(5.0)),
                ("guidance_rescale", Value::F64(0.5)),
                ("seed", Value::U64(7)),
                ("rng", Value::from("numpy")),
                ("scheduler", Value::from("ddim")),
                ("num_images", Value::U32(2)),
                ("priority", Value::I32(-3)),
            ]),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("tiny"));
        assert_eq!(
            (r.params.width, r.params.height, r.params.steps),
            (64, 96, 4)
        );
        assert_eq!(r.params.rng, RngKind::Numpy);
        assert_eq!(r.priority, -3);
        assert!(r.seed_given);
    }

    #[test]
    fn bad_requests_name_the_key() {
        let limits = Limits::default();
        let cases: Vec<(Vec<(&str, Value<'static>)>, &str)> = vec![
            (vec![], "'prompt' is required"),
            (
                vec![("prompt", Value::U32(1))],
                "'prompt' must have D-Bus type 's'",
            ),
            (
                vec![("prompt", Value::from("p")), ("width", Value::from("64"))],
                "'width' must have D-Bus type 'u'",
            ),
            (
                vec![("prompt", Value::from("p")), ("width", Value::U32(65))],
                "'width': 65 is not a multiple of 8",
            ),
            (
                vec![("prompt", Value::from("p")), ("steps", Value::U32(0))],
                "'steps' must be at least 1",
            ),
            (
                vec![("prompt", Value::from("p")), ("steps", Value::U32(100000))],
                "steps",
            ),
            (
                vec![
                    ("prompt", Value::from("p")),
                    ("guidance_scale", Value::F64(f64::NAN)),
                ],
                "must be finite",
            ),
            (
                vec![("prompt", Value::from("p")), ("colour", Value::from("red"))],
                "unknown key 'colour'",
            ),
            (
                vec![
                    ("prompt", Value::from("p")),
                    ("scheduler", Value::from("warp")),
                ],
                "unknown scheduler",
            ),
            (
                vec![("prompt", Value::from("p")), ("rng", Value::from("dice"))],
                "'rng'",
            ),
            (
                vec![("prompt", Value::from("p")), ("seed", Value::U32(3))],
                "'seed' must have D-Bus type 't'",
            ),
            (
                vec![
                    ("prompt", Value::from("p")),
                    ("rng", Value::from("numpy")),
                    ("seed", Value::U64(1 << 40)),
                ],
                "2^32-1",
            ),
            (
                vec![
                    ("prompt", Value::from("p")),
                    ("guidance_rescale", Value::F64(2.0)),
                ],
                "between 0 and 1",
            ),
        ];
        for (pairs, needle) in cases {
            let err = parse(&req(pairs), &limits).unwrap_err();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }
}
