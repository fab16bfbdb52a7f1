//! Reading a `scheduler_config.json` into a [`SchedulerConfig`]: Python's bare
//! `Infinity`/`NaN` tokens and the keys named in `_use_default_values`.

use std::path::Path;

use serde_json::{Map, Value};

use super::{ConfigError, SchedulerConfig};

/// Replaces Python's bare `NaN`, `Infinity` and `-Infinity` JSON tokens (outside
/// strings) with the strings `"NaN"`, `"Infinity"`, `"-Infinity"`, which the float
/// fields accept. diffusers writes `lambda_min_clipped: -Infinity` this way.
fn quote_python_specials(text: &str) -> String {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(ch) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else if ch == '"' {
            in_string = true;
        } else if let Some(tok) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

impl SchedulerConfig {
    /// Parses the text of a `scheduler_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(&quote_python_specials(text))?;
        let Value::Object(mut map) = value else {
            return Err(ConfigError::NotAnObject);
        };
        drop_used_defaults(&mut map);
        Ok(serde_json::from_value(Value::Object(map))?)
    }

    /// Reads and parses a `scheduler_config.json`: a regular file of at most
    /// [`MAX_CONFIG_BYTES`](crate::model::small_file::MAX_CONFIG_BYTES)
    /// ([`read_text_capped`](crate::model::small_file::read_text_capped)).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use crate::model::small_file::{MAX_CONFIG_BYTES, read_text_capped};
        let text = read_text_capped(path, MAX_CONFIG_BYTES).map_err(|e| ConfigError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        Self::from_json_str(&text)
    }
}

/// Removes the keys listed in `_use_default_values` (and that list itself), as
/// diffusers' `extract_init_dict` does.
fn drop_used_defaults(map: &mut Map<String, Value>) {
    let Some(Value::Array(names)) = map.remove("_use_default_values") else {
        return;
    };
    for name in names.iter().filter_map(Value::as_str) {
        map.remove(name);
    }
}
