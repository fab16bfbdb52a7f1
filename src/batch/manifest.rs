//! Batch manifests: a `.jsonl` file (one `Generate` request per line, plus an optional
//! `name`) or a `.txt` file (one prompt per line), read into [`Item`]s. Pure: bytes in,
//! items or one error per bad line out. The client and the daemon both read manifests
//! with [`parse`], so they agree on names, seeds and shards.

use sha2::{Digest, Sha256};

use crate::request::GenerateRequest;
use crate::wire::error::echo;
use crate::wire::images::Slot;
use crate::wire::keys;

/// How the manifest's lines are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// One prompt per line.
    Text,
}

impl Format {
    /// `.txt` files hold prompts; everything else is JSON lines.
    pub fn from_path(path: &std::path::Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("txt") => Format::Text,
            _ => Format::Jsonl,
        }
    }

    /// The wire name (`jsonl` or `txt`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Text => "txt",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "jsonl" => Ok(Format::Jsonl),
            "txt" => Ok(Format::Text),
            other => Err(format!(
                "unknown manifest format '{}' (jsonl, txt)",
                echo(other)
            )),
        }
    }
}

/// `--shard I/N`: the items whose index modulo N is I.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// I, below `count`.
    pub index: u32,
    /// N, at least 1.
    pub count: u32,
}

impl Shard {
    /// The whole manifest.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether item `index` belongs to this shard.
    pub fn holds(self, index: usize) -> bool {
        index % self.count as usize == self.index as usize
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || {
            format!(
                "'{}' is not a shard: give I/N with 0 <= I < N, e.g. 0/4",
                echo(s)
            )
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u32 = i.trim().parse().map_err(|_| bad())?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// How to read a manifest: its format, the defaults for keys a line leaves out, the base
/// seed and the shard.
#[derive(Debug, Clone)]
pub struct Options {
    /// Line format.
    pub format: Format,
    /// Values for keys a line leaves out (the request flags); its prompt is not used.
    pub defaults: GenerateRequest,
    /// A line without a seed gets this plus its line index.
    pub base_seed: u64,
    /// Which items to keep.
    pub shard: Shard,
    /// Most items (lines) a manifest may hold.
    pub max_items: usize,
    /// The manifest's folder, which `init_image` and `mask_image` paths are relative to;
    /// `None` where the manifest came as bytes (a daemon batch), which takes no paths.
    pub base_dir: Option<std::path::PathBuf>,
}

/// The keys of a manifest line that name image files (read into the request).
pub const IMAGE_KEYS: [Slot; 2] = [Slot::Init, Slot::Mask];

pub use super::images::read_stored_images;
use super::images::{ImageCache, read_image};

/// The extra keys a manifest line may hold beyond the request keys (`controls` with image
/// paths: [`super::controls`]).
const EXTRA_KEYS: &[&str] = &["name", "init_image", "mask_image", "controls"];

/// The extra keys of a stored item's canonical line: the name, and each image's absolute
/// path and SHA-256.
pub const STORED_EXTRA_KEYS: &[&str] = &[
    "name",
    "init_image",
    "mask_image",
    "init_image_sha256",
    "mask_image_sha256",
    "controls",
];

/// One item of a manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Zero-based line index in the whole manifest (line number − 1).
    pub index: usize,
    /// Output name: `name`, or the index zero-padded to 5 digits.
    pub name: String,
    /// The request: the line's keys, then the defaults, then the seed.
    pub request: GenerateRequest,
    /// The image files the line names (absolute), by key (control images by their
    /// ControlNet's index).
    pub image_paths: Vec<(Slot, std::path::PathBuf)>,
}

impl Item {
    /// The item's line number (1-based), for messages.
    pub fn line(&self) -> usize {
        self.index + 1
    }

    /// Images the item makes (`num_images`, 1 when not given).
    pub fn images(&self) -> usize {
        self.request.num_images.map_or(1, |n| n as usize)
    }

    /// Its output files: `NAME.png`, or `NAME-K.png` for K from 0 when it makes several.
    pub fn files(&self) -> Vec<String> {
        file_names(&self.name, self.images())
    }

    /// The item as one canonical JSON line: every key it sets, and its name.
    pub fn canonical(&self) -> String {
        let mut object = keys::to_json(&self.request);
        object.insert("name".into(), self.name.clone().into());
        // An image as its path and its hash: a rerun with a changed file is another batch,
        // and the runner checks the file is still the one submitted.
        for (slot, path) in &self.image_paths {
            if let Slot::Control(_) = slot {
                continue;
            }
            object.insert(slot.key().into(), path.display().to_string().into());
            if let Some(image) = slot.field_ref(&self.request) {
                object.insert(format!("{}_sha256", slot.key()), image.sha256_hex().into());
            }
        }
        if let Some(c) = super::controls::canonical(&self.request, &self.image_paths) {
            object.insert(super::controls::KEY.into(), c);
        }
        serde_json::Value::Object(object).to_string()
    }
}

/// Output file names of an item called `name` with `images` images.
pub fn file_names(name: &str, images: usize) -> Vec<String> {
    if images == 1 {
        vec![format!("{name}.png")]
    } else {
        (0..images).map(|k| format!("{name}-{k}.png")).collect()
    }
}

/// A read manifest: every item, the shard to run, and what identifies it.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Every item of the manifest, in line order (all are checked, whatever the shard).
    pub items: Vec<Item>,
    /// The items this run makes.
    pub shard: Shard,
    /// SHA-256 (hex) of the shard's canonical items and the shard: equal for a rerun with
    /// the same manifest and settings, different when anything that changes an image does.
    pub identity: String,
}

/// One bad line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number (0 for the manifest as a whole).
    pub line: usize,
    /// The key at fault, when one is.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, &self.key) {
            (0, _) => write!(f, "{}", self.message),
            (n, Some(k)) => write!(f, "line {n}: '{k}': {}", self.message),
            (n, None) => write!(f, "line {n}: {}", self.message),
        }
    }
}

/// Every bad line of a manifest; nothing runs when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// The errors, in line order.
    pub errors: Vec<LineError>,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 50;
        let n = self.errors.len();
        write!(f, "the manifest has {n} error(s); nothing was run:")?;
        for e in self.errors.iter().take(SHOWN) {
            write!(f, "\n  {e}")?;
        }
        if n > SHOWN {
            write!(f, "\n  ... and {} more", n - SHOWN)?;
        }
        Ok(())
    }
}

impl ManifestError {
    fn whole(message: String) -> ManifestError {
        ManifestError {
            errors: vec![LineError {
                line: 0,
                key: None,
                message,
            }],
        }
    }
}

/// The longest item name.
pub const MAX_NAME_LEN: usize = 120;

/// A name is one file name: letters, digits, `.`, `_`, `-`; not starting with `.`.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters"));
    }
    if name.starts_with('.') {
        return Err("must not start with '.'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "'{c}' is not allowed (letters, digits, '.', '_' and '-' only)"
        ));
    }
    Ok(())
}

/// Reads a whole manifest: every line is checked (types, keys, names, seeds), all errors
/// are returned together, and only then is the shard's part kept. Values are checked
/// against a model later, by the resolve step.
pub fn parse(bytes: &[u8], options: &Options) -> Result<Manifest, ManifestError> {
    parse_checked(bytes, options, |_| None)
}

/// [`parse`], and `check` on every line that reads well (the values against a model):
/// the errors of both kinds come back together, one per bad line.
pub fn parse_checked(
    bytes: &[u8],
    options: &Options,
    check: impl Fn(&Item) -> Option<LineError>,
) -> Result<Manifest, ManifestError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ManifestError::whole(format!("the manifest is not UTF-8: {e}")))?;
    let mut items = Vec::new();
    let mut errors = Vec::new();
    let mut seen = 0usize;
    let mut defaults = keys::to_json(&options.defaults);
    defaults.remove("prompt");
    let mut images = ImageCache::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        seen += 1;
        if seen > options.max_items {
            return Err(ManifestError::whole(format!(
                "the manifest has more than {} items (limits.max_batch_items); split it",
                options.max_items
            )));
        }
        match read_line(index, line, options, &defaults, &mut images) {
            Ok(item) => items.push(item),
            Err(mut e) => errors.append(&mut e),
        }
    }
    check_unique(&items, &mut errors);
    errors.extend(items.iter().filter_map(check));
    if items.is_empty() && errors.is_empty() {
        return Err(ManifestError::whole("the manifest has no items".into()));
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        return Err(ManifestError { errors });
    }
    check_shard(options.shard, &items).map_err(ManifestError::whole)?;
    let mut hash = Sha256::new();
    hash.update(format!("diffusiond batch 1 shard {}\n", options.shard));
    for item in items.iter().filter(|i| options.shard.holds(i.index)) {
        hash.update(item.canonical());
        hash.update("\n");
    }
    let identity = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Manifest {
        items,
        shard: options.shard,
        identity,
    })
}

/// Refuses a shard that selects no item (shard I/N of a manifest of at most I items): it
/// would run nothing and report success.
fn check_shard(shard: Shard, items: &[Item]) -> Result<(), String> {
    if items.iter().any(|i| shard.holds(i.index)) {
        return Ok(());
    }
    Err(format!(
        "shard {shard} selects none of the manifest's {} item(s): shard I/N runs the items \
         on lines L where (L - 1) mod N = I; use fewer shards",
        items.len()
    ))
}

impl Manifest {
    /// The shard's items, in line order.
    pub fn selected(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| self.shard.holds(i.index))
    }
}

fn read_line(
    index: usize,
    line: &str,
    options: &Options,
    defaults: &serde_json::Map<String, serde_json::Value>,
    images: &mut ImageCache,
) -> Result<Item, Vec<LineError>> {
    let number = index + 1;
    let error = |key: Option<&str>, message: String| LineError {
        line: number,
        key: key.map(str::to_string),
        message,
    };
    // The defaults, then the line's own keys over them, read through the key table.
    let mut merged = defaults.clone();
    match options.format {
        Format::Text => {
            merged.insert("prompt".into(), line.into());
        }
        Format::Jsonl => {
            let value: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| vec![error(None, format!("not valid JSON: {e}"))])?;
            let serde_json::Value::Object(object) = value else {
                return Err(vec![error(None, "not a JSON object".into())]);
            };
            merged.extend(object);
        }
    }
    let (mut request, prompt, bad) = keys::from_json(&merged, EXTRA_KEYS);
    let mut errors: Vec<LineError> = bad.into_iter().map(|(k, m)| error(Some(&k), m)).collect();
    let mut image_paths = Vec::new();
    for slot in IMAGE_KEYS {
        let Some(value) = merged.get(slot.key()) else {
            continue;
        };
        match read_image(value, options.base_dir.as_deref(), images) {
            Ok((path, image)) => {
                *slot.field(&mut request) = Some(image);
                image_paths.push((slot, path));
            }
            Err(m) => errors.push(error(Some(slot.key()), m)),
        }
    }
    if let Some(value) = merged.get(super::controls::KEY) {
        match super::controls::read(value, options.base_dir.as_deref(), images) {
            Ok((controls, paths)) => {
                request.controls = Some(controls);
                image_paths.extend(paths);
            }
            Err(e) => errors.extend(e.into_iter().map(|(k, m)| error(Some(&k), m))),
        }
    }
    if !prompt && !merged.contains_key("prompt") {
        errors.push(error(Some("prompt"), "is required".into()));
    }
    let name = match merged.get("name") {
        None => None,
        Some(serde_json::Value::String(n)) => match check_name(n) {
            Ok(()) => Some(n.clone()),
            Err(m) => {
                errors.push(error(Some("name"), m));
                None
            }
        },
        Some(other) => {
            errors.push(error(
                Some("name"),
                format!("expected a string, got {}", echo(&other.to_string())),
            ));
            None
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    if request.seed.is_none() {
        let seed = options.base_seed.checked_add(index as u64).ok_or_else(|| {
            vec![error(
                Some("seed"),
                format!(
                    "the base seed {} plus the line index overflows",
                    options.base_seed
                ),
            )]
        })?;
        request.seed = Some(seed);
    }
    Ok(Item {
        index,
        name: name.unwrap_or_else(|| format!("{index:05}")),
        request,
        image_paths,
    })
}

/// Names, and the files they make, are unique.
fn check_unique(items: &[Item], errors: &mut Vec<LineError>) {
    let mut files: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for item in items {
        for file in item.files() {
            if let Some(&first) = files.get(&file) {
                errors.push(LineError {
                    line: item.line(),
                    key: Some("name".into()),
                    message: format!("'{}' makes {file}, as line {first} does", item.name),
                });
                break;
            }
            files.insert(file, item.line());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(format: Format) -> Options {
        Options {
            format,
            defaults: GenerateRequest {
                steps: Some(4),
                width: Some(64),
                ..GenerateRequest::default()
            },
            base_seed: 100,
            shard: Shard::ALL,
            max_items: 1000,
            base_dir: None,
        }
    }

    #[test]
    fn lines_take_defaults_names_and_seeds() {
        let text = "{\"prompt\":\"a\"}\n\n{\"prompt\":\"b\",\"steps\":9,\"seed\":5,\"name\":\"bee\"}\n{\"prompt\":\"c\",\"num_images\":2}\n";
        let m = parse(text.as_bytes(), &options(Format::Jsonl)).unwrap();
        assert_eq!(m.selected().count(), 3);
        let names: Vec<&str> = m.items.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["00000", "bee", "00003"]);
        assert_eq!(m.items[0].request.seed, Some(100));
        assert_eq!(m.items[0].request.steps, Some(4));
        assert_eq!(m.items[0].request.width, Some(64));
        assert_eq!(m.items[1].request.seed, Some(5));
        assert_eq!(m.items[1].request.steps, Some(9));
        assert_eq!(m.items[2].request.seed, Some(103), "base + line index");
        assert_eq!(m.items[2].files(), ["00003-0.png", "00003-1.png"]);
        assert_eq!(m.items[1].line(), 3);
    }

    #[test]
    fn text_manifests_hold_prompts() {
        let m = parse(b"a red fox\r\nthe sea\n", &options(Format::Text)).unwrap();
        assert_eq!(m.items.len(), 2);
        assert_eq!(m.items[1].request.prompt, "the sea");
        assert_eq!(m.items[0].request.prompt, "a red fox");
        assert_eq!(m.items[1].request.seed, Some(101));
        assert_eq!(Format::from_path("x/p.TXT".as_ref()), Format::Text);
        assert_eq!(Format::from_path("x/p.jsonl".as_ref()), Format::Jsonl);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number_and_key() {
        let text = [
            r#"{"prompt":"ok","name":"a"}"#,
            r#"{"prompt":"x","steps":"many"}"#,
            r#"not json"#,
            r#"{"prompt":"y","colour":1}"#,
            r#"{"prompt":"z","name":"a"}"#,
            r#"["prompt"]"#,
            r#"{"steps":3}"#,
            r#"{"prompt":"w","name":"../etc"}"#,
            r#"{"prompt":"v","name":"a/b"}"#,
        ]
        .join("\n");
        let e = parse(text.as_bytes(), &options(Format::Jsonl)).unwrap_err();
        let shown: Vec<String> = e.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown.len(), 8, "{shown:#?}");
        assert!(
            shown[0].starts_with("line 2: 'steps': expected an integer"),
            "{}",
            shown[0]
        );
        assert!(
            shown[1].starts_with("line 3: not valid JSON"),
            "{}",
            shown[1]
        );
        assert!(
            shown[2].starts_with("line 4: 'colour': unknown key"),
            "{}",
            shown[2]
        );
        assert_eq!(shown[3], "line 5: 'name': 'a' makes a.png, as line 1 does");
        assert_eq!(shown[4], "line 6: not a JSON object");
        assert_eq!(shown[5], "line 7: 'prompt': is required");
        assert_eq!(shown[6], "line 8: 'name': must not start with '.'");
        assert!(
            shown[7].starts_with("line 9: 'name': '/' is not allowed"),
            "{}",
            shown[7]
        );
        assert!(
            e.to_string()
                .starts_with("the manifest has 8 error(s); nothing was run:")
        );
    }

    #[test]
    fn names_of_several_images_do_not_collide() {
        let text = "{\"prompt\":\"a\",\"name\":\"x\",\"num_images\":2}\n{\"prompt\":\"b\",\"name\":\"x-1\"}";
        let e = parse(text.as_bytes(), &options(Format::Jsonl)).unwrap_err();
        assert_eq!(
            e.errors[0].to_string(),
            "line 2: 'name': 'x-1' makes x-1.png, as line 1 does"
        );
    }

    #[test]
    fn shards_split_by_index_and_change_the_identity() {
        let text = "a\nb\nc\nd\ne\n";
        let mut o = options(Format::Text);
        let all = parse(text.as_bytes(), &o).unwrap();
        o.shard = "1/2".parse().unwrap();
        let one = parse(text.as_bytes(), &o).unwrap();
        o.shard = "0/2".parse().unwrap();
        let zero = parse(text.as_bytes(), &o).unwrap();
        let idx = |m: &Manifest| m.selected().map(|i| i.index).collect::<Vec<_>>();
        assert_eq!(idx(&zero), [0, 2, 4]);
        assert_eq!(idx(&one), [1, 3]);
        assert_eq!(one.items.len(), 5, "every line is read and checked");
        assert_ne!(all.identity, zero.identity);
        assert_eq!(
            all.identity,
            parse(text.as_bytes(), &options(Format::Text))
                .unwrap()
                .identity
        );
        o.base_seed = 7;
        assert_ne!(zero.identity, parse(text.as_bytes(), &o).unwrap().identity);
        assert!("2/2".parse::<Shard>().is_err());
        assert!("1/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }

    #[test]
    fn a_shard_that_selects_no_item_is_refused() {
        let mut o = options(Format::Text);
        o.shard = "5/8".parse().unwrap();
        let e = parse(b"a\nb\nc\n", &o).unwrap_err().to_string();
        assert!(
            e.contains("shard 5/8 selects none of the manifest's 3 item(s)"),
            "{e}"
        );
        // Lines count, blank ones included: items on lines 1 and 3 are both in shard 0/2.
        o.shard = "1/2".parse().unwrap();
        let e = parse(b"a\n\nc\n", &o).unwrap_err().to_string();
        assert!(e.contains("selects none"), "{e}");
        o.shard = "2/8".parse().unwrap();
        assert_eq!(parse(b"a\nb\nc\n", &o).unwrap().selected().count(), 1);
    }

    #[test]
    fn echoed_values_are_bounded() {
        let o = options(Format::Jsonl);
        let huge = format!(r#"{{"prompt":"p","name":[{}1]}}"#, "1,".repeat(50_000));
        let e = parse(huge.as_bytes(), &o).unwrap_err().to_string();
        assert!(e.contains("'name': expected a string"), "{e}");
        assert!(e.len() < 500, "{} bytes: {}", e.len(), &e[..200]);
        let e = format!("x{}", "y".repeat(100_000))
            .parse::<Format>()
            .unwrap_err();
        assert!(e.len() < 500, "{} bytes", e.len());
        let e = format!("1/{}", "9".repeat(100_000))
            .parse::<Shard>()
            .unwrap_err();
        assert!(e.len() < 500, "{} bytes", e.len());
    }

    #[test]
    fn too_many_or_no_items() {
        let mut o = options(Format::Text);
        o.max_items = 2;
        let e = parse(b"a\nb\nc\n", &o).unwrap_err();
        assert!(e.to_string().contains("more than 2 items"), "{e}");
        let e = parse(b"\n\n", &o).unwrap_err();
        assert!(e.to_string().contains("no items"), "{e}");
        let e = parse(&[0xff, 0xfe], &o).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
    }
}
