//! The CLIP tokenizer, on the `tokenizers` crate.
//!
//! A model folder's `tokenizer/` holds either `tokenizer.json` (fast tokenizer) or only
//! the slow tokenizer's `vocab.json` + `merges.txt`, as real Stable Diffusion exports do.
//! In the second case the fast tokenizer is assembled from them with the same
//! normalizer, pre-tokenizer and post-processor that transformers' converter writes, so
//! ids equal `CLIPTokenizerFast`'s. Prompts are padded and truncated to
//! `model_max_length` (77) as `tokenizer_config.json` says. Every file is read only from
//! a regular file and up to a size cap ([`crate::model::small_file`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::small_file::{
    MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES, SmallFileError, read_capped, read_text_capped,
};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

pub mod t5;

/// Errors from loading a tokenizer or encoding a prompt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A tokenizer file is missing or unreadable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The tokenizer library rejected the files or the text.
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

/// The parts of `tokenizer_config.json` that decide padding, length and special tokens.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default = "default_max_length")]
    model_max_length: f64,
    #[serde(flatten)]
    specials: SpecialTokens,
    /// Added tokens by id, as transformers writes them.
    #[serde(default)]
    added_tokens_decoder: std::collections::BTreeMap<String, AddedSpec>,
}

/// One entry of `added_tokens_decoder`.
#[derive(Debug, Deserialize)]
struct AddedSpec {
    content: String,
}

/// The named special tokens, in `tokenizer_config.json` and in `special_tokens_map.json`
/// (transformers reads both).
#[derive(Debug, Default, Deserialize)]
struct SpecialTokens {
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default)]
    bos_token: Option<TokenSpec>,
    #[serde(default)]
    eos_token: Option<TokenSpec>,
    #[serde(default)]
    unk_token: Option<TokenSpec>,
}

impl SpecialTokens {
    fn all(&self) -> impl Iterator<Item = &TokenSpec> {
        [
            &self.bos_token,
            &self.eos_token,
            &self.unk_token,
            &self.pad_token,
        ]
        .into_iter()
        .flatten()
    }
}

/// transformers writes special tokens either as a string or as an object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Object { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(s) => s,
            TokenSpec::Object { content } => content,
        }
    }
}

fn default_max_length() -> f64 {
    77.0
}

/// A CLIP tokenizer that pads and truncates every prompt to a fixed length.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    /// The same tokenizer without padding and truncation.
    raw: Tokenizer,
    max_length: usize,
    /// The start, end and padding tokens' ids.
    ids: SpecialIds,
}

/// The ids of a tokenizer's start, end and padding tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// `bos_token` (`<|startoftext|>`).
    pub bos: i64,
    /// `eos_token` (`<|endoftext|>`).
    pub eos: i64,
    /// `pad_token` (`<|endoftext|>` for CLIP-L, `!` for SD2.x and SDXL's second encoder).
    pub pad: i64,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer from a `tokenizer/` folder.
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer, TokenizerError> {
        let config = read_config(dir)?;
        let json = dir.join("tokenizer.json");
        let specials = special_tokens(dir, &config)?;
        let mut inner = if let Some(bytes) = read_file(&json, MAX_TOKENIZER_BYTES)? {
            let mut t = Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::File {
                path: json.clone(),
                message: e.to_string(),
            })?;
            // transformers adds the configured special tokens a tokenizer.json may lack.
            let missing: Vec<tokenizers::AddedToken> = specials
                .iter()
                .filter(|s| t.token_to_id(s).is_some())
                .filter(|s| !t.get_added_vocabulary().get_vocab().contains_key(*s))
                .map(|s| tokenizers::AddedToken::from(s.clone(), true).normalized(false))
                .collect();
            t.add_special_tokens(&missing);
            t
        } else {
            from_vocab_and_merges(dir, &specials)?
        };
        // A huge model_max_length means "no limit" in transformers; CLIP always uses 77.
        let max_length = if config.model_max_length > 0.0 && config.model_max_length < 1e6 {
            config.model_max_length as usize
        } else {
            77
        };
        let pad_token = config
            .specials
            .pad_token
            .as_ref()
            .map(|t| t.content().to_string())
            .unwrap_or_else(|| "<|endoftext|>".to_string());
        let id_of = |token: &str, what: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::File {
                    path: dir.join("tokenizer_config.json"),
                    message: format!("{what} token '{token}' is not in the vocabulary"),
                })
        };
        let pad_id = id_of(&pad_token, "pad")?;
        let named = |t: &Option<TokenSpec>, default: &str| {
            t.as_ref()
                .map_or_else(|| default.to_string(), |t| t.content().to_string())
        };
        let ids = SpecialIds {
            bos: i64::from(id_of(
                &named(&config.specials.bos_token, "<|startoftext|>"),
                "bos",
            )?),
            eos: i64::from(id_of(
                &named(&config.specials.eos_token, "<|endoftext|>"),
                "eos",
            )?),
            pad: i64::from(pad_id),
        };
        let mut raw = inner.clone();
        raw.with_padding(None);
        raw.with_truncation(None)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(ClipTokenizer {
            inner,
            raw,
            max_length,
            ids,
        })
    }

    /// The start, end and padding tokens' ids.
    pub fn special_ids(&self) -> SpecialIds {
        self.ids
    }

    /// Token ids of a text without start and end tokens, padding or truncation (the
    /// pieces AUTOMATIC1111's prompt syntax chunks).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let encoding = self
            .raw
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// The fixed sequence length (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids of one prompt: start token, text, end token, padding; `max_length` long.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// How many tokens the prompt has before truncation (start and end tokens included),
    /// so a caller can warn that a prompt was cut.
    pub fn untruncated_len(&self, text: &str) -> Result<usize, TokenizerError> {
        self.raw
            .encode(text, true)
            .map(|e| e.len())
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }
}

fn read_config(dir: &Path) -> Result<TokenizerConfig, TokenizerError> {
    Ok(
        read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(TokenizerConfig {
            model_max_length: default_max_length(),
            ..TokenizerConfig::default()
        }),
    )
}

/// A file of the folder of at most `cap` bytes, `None` when it is not there; read only
/// from a regular file ([`read_capped`]).
fn read_file(path: &Path, cap: u64) -> Result<Option<Vec<u8>>, TokenizerError> {
    match read_capped(path, cap) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(SmallFileError::Missing) => Ok(None),
        Err(e) => Err(TokenizerError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
    }
}

/// A JSON file of the folder, `None` when it is not there.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, TokenizerError> {
    let Some(bytes) = read_file(path, MAX_CONFIG_BYTES)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| TokenizerError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// The special tokens transformers splits out of a prompt before BPE: bos, eos, unk and
/// pad from `tokenizer_config.json` and `special_tokens_map.json`, and the entries of
/// `added_tokens_decoder`. (SD2.x and SDXL's second tokenizer declare `!` as their pad
/// token, so a `!` in a prompt is its own token there, id 0.)
fn special_tokens(dir: &Path, config: &TokenizerConfig) -> Result<Vec<String>, TokenizerError> {
    let map: SpecialTokens = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or_default();
    let mut tokens: Vec<String> = Vec::new();
    let named = (config.specials.all())
        .chain(map.all())
        .map(|t| t.content().to_string());
    let added = config
        .added_tokens_decoder
        .values()
        .map(|a| a.content.clone());
    for token in named.chain(added) {
        if !tokens.contains(&token) {
            tokens.push(token);
        }
    }
    Ok(tokens)
}

/// Assembles the fast tokenizer from `vocab.json` + `merges.txt`, with the same
/// pipeline transformers' `CLIPConverter` produces, and `specials` (found in the
/// vocabulary) as added special tokens. Written as the tokenizer.json document and parsed
/// by `tokenizers`, so every component is the library's own.
fn from_vocab_and_merges(dir: &Path, specials: &[String]) -> Result<Tokenizer, TokenizerError> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let read = |p: &Path| {
        read_text_capped(p, MAX_TOKENIZER_BYTES).map_err(|e| TokenizerError::File {
            path: p.to_path_buf(),
            message: format!(
                "{e} (a tokenizer folder needs tokenizer.json or vocab.json + merges.txt)"
            ),
        })
    };
    let vocab: serde_json::Value =
        serde_json::from_str(&read(&vocab_path)?).map_err(|e| TokenizerError::File {
            path: vocab_path.clone(),
            message: e.to_string(),
        })?;
    let merges_text = read(&merges_path)?;
    let merges: Vec<&str> = merges_text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .collect();
    let id = |token: &str| vocab.get(token).and_then(serde_json::Value::as_u64);
    let (Some(bos), Some(eos)) = (id("<|startoftext|>"), id("<|endoftext|>")) else {
        return Err(TokenizerError::File {
            path: vocab_path,
            message: "the CLIP start/end tokens are missing".into(),
        });
    };
    let special = |id: u64, content: &str, normalized: bool| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": normalized, "special": true})
    };
    let mut added = vec![
        special(bos, "<|startoftext|>", true),
        special(eos, "<|endoftext|>", true),
    ];
    // Other special tokens (the pad token `!` of SD2.x/SDXL) match the raw text, as
    // transformers' converter writes them (`normalized: false`).
    for token in specials {
        if token == "<|startoftext|>" || token == "<|endoftext|>" {
            continue;
        }
        if let Some(id) = id(token) {
            added.push(special(id, token, false));
        }
    }
    let document = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos],
            "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    document
        .to_string()
        .parse::<Tokenizer>()
        .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
}
