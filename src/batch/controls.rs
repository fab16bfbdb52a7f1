//! The `controls` of a manifest line: `[{"controlnet": "canny", "image": "edges/001.png",
//! "scale": 0.8, "start": 0.0, "end": 1.0}, …]`, one object per ControlNet, as the
//! `controls` key of `Generate` takes them, with each control image given as a path
//! relative to the manifest's folder (read by `diffusionctl batch --local`; a daemon batch
//! takes no image paths, as for `init_image`).
//!
//! Types and names are checked here, each error naming `controls[i].FIELD`; missing
//! fields and values are the resolve step's, as for a request. A stored item keeps each
//! control image as its absolute path and SHA-256 ([`canonical`]), checked again when the
//! item runs ([`read_stored`]).

use std::path::{Path, PathBuf};

use serde_json::Value as J;

use super::images::{ImageCache, read_image};
use crate::request::{ControlInput, GenerateRequest, ImageInput};
use crate::wire::error::echo;
use crate::wire::images::Slot;

/// The manifest key.
pub const KEY: &str = "controls";

/// The fields of one ControlNet's object.
const FIELDS: &[&str] = &["controlnet", "image", "scale", "start", "end"];

/// A JSON value as a message shows it (bounded).
fn shown(v: &J) -> String {
    echo(&v.to_string()).into_owned()
}

/// A line's ControlNets, and the control images' files by slot.
pub type Read = (Vec<ControlInput>, Vec<(Slot, PathBuf)>);

/// Reads a line's `controls`, or one `(key, message)` per bad field, the key
/// `controls[i].FIELD`.
pub fn read(
    value: &J,
    base: Option<&Path>,
    cache: &mut ImageCache,
) -> Result<Read, Vec<(String, String)>> {
    let J::Array(items) = value else {
        return Err(vec![(
            KEY.into(),
            format!(
                "expected a list of ControlNets ([{{\"controlnet\": NAME, \"image\": PATH, ...}}]), got {}",
                shown(value)
            ),
        )]);
    };
    let mut controls = Vec::new();
    let mut paths = Vec::new();
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let key = |field: &str| format!("{KEY}[{i}].{field}");
        let J::Object(object) = item else {
            errors.push((
                format!("{KEY}[{i}]"),
                format!(
                    "expected an object with {}, got {}",
                    FIELDS.join(", "),
                    shown(item)
                ),
            ));
            continue;
        };
        let mut control = ControlInput::default();
        for (field, v) in object {
            let number = |v: &J| {
                v.as_f64()
                    .ok_or_else(|| format!("expected a number, got {}", shown(v)))
            };
            let read = match field.as_str() {
                "controlnet" => match v {
                    J::String(s) => {
                        control.controlnet = Some(s.clone());
                        Ok(())
                    }
                    other => Err(format!("expected a string, got {}", shown(other))),
                },
                "image" => read_image(v, base, cache).map(|(path, image)| {
                    control.image = Some(image);
                    paths.push((Slot::Control(i), path));
                }),
                "scale" => number(v).map(|x| control.scale = Some(x)),
                "start" => number(v).map(|x| control.start = Some(x)),
                "end" => number(v).map(|x| control.end = Some(x)),
                _ => Err(format!("unknown field (known: {})", FIELDS.join(", "))),
            };
            if let Err(message) = read {
                errors.push((key(&echo(field)), message));
            }
        }
        controls.push(control);
    }
    if errors.is_empty() {
        Ok((controls, paths))
    } else {
        Err(errors)
    }
}

/// The `controls` of an item's canonical line: each ControlNet's fields, its image as the
/// file's absolute path and its SHA-256 (`image_sha256`). `None` without ControlNets.
pub fn canonical(request: &GenerateRequest, paths: &[(Slot, PathBuf)]) -> Option<J> {
    let controls = request.controls.as_ref()?;
    let list = controls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut o = serde_json::Map::new();
            if let Some(n) = &c.controlnet {
                o.insert("controlnet".into(), n.as_str().into());
            }
            let path = paths.iter().find(|(s, _)| *s == Slot::Control(i));
            if let (Some((_, path)), Some(image)) = (path, &c.image) {
                o.insert("image".into(), path.display().to_string().into());
                o.insert("image_sha256".into(), image.sha256_hex().into());
            }
            for (field, v) in [("scale", c.scale), ("start", c.start), ("end", c.end)] {
                if let Some(v) = v {
                    o.insert(field.into(), v.into());
                }
            }
            J::Object(o)
        })
        .collect();
    Some(J::Array(list))
}

/// Reads a stored item's `controls` (its [`canonical`] form) back into `request`,
/// checking that each control image still has the hash it had when the batch was
/// submitted.
pub fn read_stored(
    object: &serde_json::Map<String, J>,
    request: &mut GenerateRequest,
) -> Result<(), String> {
    let Some(value) = object.get(KEY) else {
        return Ok(());
    };
    let items = value
        .as_array()
        .ok_or("stored item: 'controls' is not a list")?;
    let mut controls = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let get = |field: &str| item.get(field);
        let number = |field: &str| get(field).and_then(J::as_f64);
        let image = match get("image").and_then(J::as_str) {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
                let image = ImageInput::new(bytes);
                if get("image_sha256").and_then(J::as_str) != Some(image.sha256_hex().as_str()) {
                    return Err(format!(
                        "{path} ({KEY}[{i}].image) changed since the batch was submitted"
                    ));
                }
                Some(image)
            }
            None => None,
        };
        controls.push(ControlInput {
            controlnet: get("controlnet").and_then(J::as_str).map(str::to_string),
            image,
            scale: number("scale"),
            start: number("start"),
            end: number("end"),
        });
    }
    request.controls = Some(controls);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::manifest::{Format, Options, Shard, parse};
    use super::*;

    fn options(base_dir: Option<&Path>) -> Options {
        Options {
            format: Format::Jsonl,
            defaults: GenerateRequest::default(),
            base_seed: 1,
            shard: Shard::ALL,
            max_items: 100,
            base_dir: base_dir.map(Path::to_path_buf),
        }
    }

    /// A folder with `edges/001.png` and `depth.png`.
    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("edges")).unwrap();
        std::fs::write(dir.path().join("edges/001.png"), b"edges").unwrap();
        std::fs::write(dir.path().join("depth.png"), b"depth").unwrap();
        dir
    }

    #[test]
    fn lines_read_their_controlnets_with_images_relative_to_the_manifest() {
        let dir = folder();
        let text = concat!(
            r#"{"prompt":"a","controls":[{"controlnet":"canny","image":"edges/001.png","scale":0.8,"start":0.0,"end":1.0}]}"#,
            "\n",
            r#"{"prompt":"b","controls":[{"controlnet":"canny","image":"edges/001.png"},{"controlnet":"depth","image":"depth.png","end":0.5}]}"#,
            "\n",
            r#"{"prompt":"c"}"#,
        );
        let m = parse(text.as_bytes(), &options(Some(dir.path()))).unwrap();
        let c = m.items[0].request.controls.as_ref().unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].controlnet.as_deref(), Some("canny"));
        assert_eq!(c[0].image, Some(ImageInput::new(b"edges".to_vec())));
        assert_eq!(
            (c[0].scale, c[0].start, c[0].end),
            (Some(0.8), Some(0.0), Some(1.0))
        );
        let c = m.items[1].request.controls.as_ref().unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].image, Some(ImageInput::new(b"depth".to_vec())));
        assert_eq!((c[1].scale, c[1].end), (None, Some(0.5)));
        assert_eq!(m.items[2].request.controls, None);

        // The canonical line holds each image's path and hash, and reads back.
        let line = m.items[1].canonical();
        let object: serde_json::Map<String, J> = serde_json::from_str(&line).unwrap();
        let stored = &object[KEY][1];
        let depth = std::fs::canonicalize(dir.path().join("depth.png")).unwrap();
        assert_eq!(stored["image"], depth.display().to_string());
        assert_eq!(
            stored["image_sha256"],
            ImageInput::new(b"depth".to_vec()).sha256_hex()
        );
        let mut back = GenerateRequest::default();
        read_stored(&object, &mut back).unwrap();
        assert_eq!(back.controls, m.items[1].request.controls);
        // Another control image, or another scale, is another batch.
        let other = text.replace("\"scale\":0.8", "\"scale\":0.7");
        let m2 = parse(other.as_bytes(), &options(Some(dir.path()))).unwrap();
        assert_ne!(m.identity, m2.identity);
        // A file changed since: named.
        std::fs::write(&depth, b"changed").unwrap();
        let e = read_stored(&object, &mut back).unwrap_err();
        assert!(e.contains("(controls[1].image) changed"), "{e}");
    }

    #[test]
    fn bad_fields_are_named_with_their_line() {
        let dir = folder();
        let text = [
            r#"{"prompt":"a","controls":{"controlnet":"canny"}}"#,
            r#"{"prompt":"b","controls":["canny"]}"#,
            r#"{"prompt":"c","controls":[{"controlnet":1,"image":"edges/001.png"}]}"#,
            r#"{"prompt":"d","controls":[{"controlnet":"canny","image":"nope.png"}]}"#,
            r#"{"prompt":"e","controls":[{"controlnet":"canny","image":"edges/001.png","scale":"high"}]}"#,
            r#"{"prompt":"f","controls":[{"controlnet":"canny","image":"edges/001.png"},{"controlnet":"canny","image":"edges/001.png","weight":1}]}"#,
            r#"{"prompt":"g","controls":[{"controlnet":"canny","image":7,"start":"0","end":[]}]}"#,
        ]
        .join("\n");
        let e = parse(text.as_bytes(), &options(Some(dir.path()))).unwrap_err();
        let shown: Vec<String> = e.errors.iter().map(|e| e.to_string()).collect();
        let want = [
            "line 1: 'controls': expected a list of ControlNets",
            "line 2: 'controls[0]': expected an object with controlnet, image, scale, start, end, got \"canny\"",
            "line 3: 'controls[0].controlnet': expected a string, got 1",
            "line 4: 'controls[0].image': cannot read ",
            "line 5: 'controls[0].scale': expected a number, got \"high\"",
            "line 6: 'controls[1].weight': unknown field (known: controlnet, image, scale, start, end)",
        ];
        for (got, want) in shown.iter().zip(want) {
            assert!(
                got.starts_with(want),
                "{got:?} does not start with {want:?}"
            );
        }
        let line7: Vec<&String> = shown.iter().filter(|s| s.starts_with("line 7")).collect();
        assert_eq!(line7.len(), 3, "{shown:#?}");
        for field in ["image", "start", "end"] {
            let needle = format!("line 7: 'controls[0].{field}': expected a");
            assert!(line7.iter().any(|s| s.starts_with(&needle)), "{line7:?}");
        }
        assert_eq!(shown.len(), 9, "{shown:#?}");
    }

    #[test]
    fn a_daemon_batch_takes_no_control_image_paths() {
        let text = r#"{"prompt":"a","controls":[{"controlnet":"canny","image":"edges/001.png"}]}"#;
        let e = parse(text.as_bytes(), &options(None)).unwrap_err();
        let shown = e.errors[0].to_string();
        assert!(
            shown.starts_with(
                "line 1: 'controls[0].image': image paths are read by `diffusionctl batch --local` only"
            ),
            "{shown}"
        );
    }
}
