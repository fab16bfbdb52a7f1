//! The T5 tokenizer (SentencePiece Unigram) of the transformer pipelines' text encoder
//! (`tokenizer_3/` of SD3, `tokenizer_2/` of FLUX), on the `tokenizers` crate.
//!
//! The folder's `tokenizer.json` is loaded as written by transformers'
//! `T5TokenizerFast` (Precompiled normalizer, Metaspace pre-tokenizer, Unigram model,
//! a post-processor that appends `</s>`). `tokenizer_config.json` and
//! `special_tokens_map.json`, when present, name the pad, end and unknown tokens and the
//! sentinels (`<extra_id_N>`); tokens they name that `tokenizer.json` lacks as added
//! tokens are added, as transformers does. Prompts are encoded as the diffusers pipelines
//! call the tokenizer (`padding="max_length", max_length=L, truncation=True,
//! add_special_tokens=True`): the text is cut to `L - 1` tokens, `</s>` is appended, and
//! the rest is padded with the pad token, with an attention mask of 1 for real tokens
//! and 0 for padding. Every file is read only from a regular file and up to a size cap
//! ([`crate::model::small_file`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::{AddedToken, PostProcessor, Tokenizer, TruncationDirection};

use super::TokenizerError;
use crate::model::small_file::{
    MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES, SmallFileError, read_capped,
};

/// The parts of `tokenizer_config.json` and `special_tokens_map.json` this tokenizer
/// reads (transformers reads both; `tokenizer_config.json` wins).
#[derive(Debug, Default, Deserialize)]
struct Config {
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default)]
    eos_token: Option<TokenSpec>,
    #[serde(default)]
    unk_token: Option<TokenSpec>,
    #[serde(default)]
    additional_special_tokens: Vec<TokenSpec>,
    #[serde(default)]
    model_max_length: Option<f64>,
    #[serde(default)]
    clean_up_tokenization_spaces: Option<bool>,
}

/// transformers writes special tokens either as a string or as an object.
#[derive(Debug, Clone, Deserialize)]
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

/// A T5 tokenizer: pads and truncates each prompt to a length chosen per call (256 or
/// 512 for the transformer pipelines' `max_sequence_length`).
#[derive(Clone)]
pub struct T5Tokenizer {
    /// The tokenizer without padding and truncation.
    inner: Tokenizer,
    /// Tokens the post-processor adds to one sequence (1: `</s>`).
    added: usize,
    pad_id: u32,
    eos_id: u32,
    unk_id: Option<u32>,
    model_max_length: Option<usize>,
    clean_up_spaces: bool,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("pad_id", &self.pad_id)
            .field("eos_id", &self.eos_id)
            .field("model_max_length", &self.model_max_length)
            .finish_non_exhaustive()
    }
}

impl T5Tokenizer {
    /// Loads the tokenizer from a tokenizer folder (`tokenizer.json`, and
    /// `tokenizer_config.json` and `special_tokens_map.json` when present).
    pub fn from_dir(dir: &Path) -> Result<T5Tokenizer, TokenizerError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Config = read_json(&config_path)?.unwrap_or_default();
        let map: Config = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or_default();
        let json = dir.join("tokenizer.json");
        let bytes = read_file(&json, MAX_TOKENIZER_BYTES)?.ok_or_else(|| TokenizerError::File {
            path: json.clone(),
            message: "file is missing (a T5 tokenizer folder needs tokenizer.json)".into(),
        })?;
        let mut inner = Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::File {
            path: json.clone(),
            message: e.to_string(),
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;

        let pick = |a: &Option<TokenSpec>, b: &Option<TokenSpec>, default: &str| {
            a.as_ref()
                .or(b.as_ref())
                .map_or_else(|| default.to_string(), |t| t.content().to_string())
        };
        let pad = pick(&config.pad_token, &map.pad_token, "<pad>");
        let eos = pick(&config.eos_token, &map.eos_token, "</s>");
        let unk = pick(&config.unk_token, &map.unk_token, "<unk>");
        // transformers turns the named special tokens into added tokens, split out of the
        // text before normalization; add any the tokenizer.json lacks.
        let mut specials = vec![pad.clone(), eos.clone(), unk.clone()];
        let additional = if config.additional_special_tokens.is_empty() {
            &map.additional_special_tokens
        } else {
            &config.additional_special_tokens
        };
        specials.extend(additional.iter().map(|t| t.content().to_string()));
        let known = inner.get_added_vocabulary().get_vocab().clone();
        let missing: Vec<AddedToken> = specials
            .iter()
            .filter(|s| !known.contains_key(*s) && inner.token_to_id(s).is_some())
            .map(|s| AddedToken::from(s.clone(), true).normalized(false))
            .collect();
        if !missing.is_empty() {
            inner.add_special_tokens(&missing);
        }

        let id_of = |token: &str, what: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::File {
                    path: json.clone(),
                    message: format!("{what} token '{token}' is not in the vocabulary"),
                })
        };
        let pad_id = id_of(&pad, "pad")?;
        let eos_id = id_of(&eos, "eos")?;
        let unk_id = inner.token_to_id(&unk);
        let added = inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        // A huge model_max_length means "no limit" in transformers.
        let model_max_length = config
            .model_max_length
            .filter(|&n| n > 0.0 && n < 1e6)
            .map(|n| n as usize);
        Ok(T5Tokenizer {
            inner,
            added,
            pad_id,
            eos_id,
            unk_id,
            model_max_length,
            clean_up_spaces: config.clean_up_tokenization_spaces.unwrap_or(false),
        })
    }

    /// The pad token's id (`<pad>`, 0 in T5).
    pub fn pad_id(&self) -> i64 {
        i64::from(self.pad_id)
    }

    /// The end token's id (`</s>`, 1 in T5).
    pub fn eos_id(&self) -> i64 {
        i64::from(self.eos_id)
    }

    /// The unknown token's id (`<unk>`, 2 in T5), when the vocabulary has one.
    pub fn unk_id(&self) -> Option<i64> {
        self.unk_id.map(i64::from)
    }

    /// `model_max_length` of `tokenizer_config.json` (512 for SD3 and FLUX), `None` when
    /// absent or "no limit".
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// Token ids and attention mask of one prompt, both `max_len` long: the text cut to
    /// `max_len - 1` tokens, `</s>`, then pad tokens (mask 0).
    ///
    /// Fails when `max_len` is shorter than the tokens the tokenizer adds (1: `</s>`);
    /// at exactly that length the text is dropped, as in transformers.
    pub fn encode(
        &self,
        prompt: &str,
        max_len: usize,
    ) -> Result<(Vec<i64>, Vec<i64>), TokenizerError> {
        let ids = self.encode_truncated(prompt, max_len)?;
        let real = ids.len();
        let mut mask = vec![1i64; real];
        let mut ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        ids.resize(max_len.max(real), i64::from(self.pad_id));
        mask.resize(max_len.max(real), 0);
        Ok((ids, mask))
    }

    /// How many tokens the prompt has before truncation, `</s>` included (a prompt is
    /// cut when this is over the sequence length).
    pub fn count(&self, prompt: &str) -> Result<usize, TokenizerError> {
        Ok(self.untruncated(prompt)?.len())
    }

    /// The text truncation to `max_len` removes, decoded as the diffusers pipelines log
    /// it (`batch_decode(untruncated_ids[max_len - 1:-1])`), `None` when nothing is cut.
    pub fn removed_text(
        &self,
        prompt: &str,
        max_len: usize,
    ) -> Result<Option<String>, TokenizerError> {
        let raw = self.untruncated(prompt)?;
        if raw.len() < max_len.max(1) {
            return Ok(None);
        }
        let kept = self.encode_truncated(prompt, max_len)?;
        if kept == raw {
            return Ok(None);
        }
        let removed = &raw[max_len - 1..raw.len() - 1];
        let text = self
            .inner
            .decode(removed, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(Some(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        }))
    }

    /// Ids of the prompt with `</s>`, without truncation.
    fn untruncated(&self, prompt: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(prompt, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    /// Ids of the prompt cut so that, with the post-processor's tokens, at most
    /// `max_len` remain (as the `tokenizers` library truncates when the length includes
    /// special tokens); no padding.
    fn encode_truncated(&self, prompt: &str, max_len: usize) -> Result<Vec<u32>, TokenizerError> {
        if max_len < self.added {
            return Err(TokenizerError::Tokenizers(format!(
                "sequence length {max_len} is shorter than the {} special token(s) the \
                 tokenizer adds",
                self.added
            )));
        }
        let mut encoding = self
            .inner
            .encode(prompt, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        encoding.truncate(max_len - self.added, 0, TruncationDirection::Right);
        let encoding = self
            .inner
            .post_process(encoding, None, true)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// transformers' `clean_up_tokenization`: drops the space before punctuation and
/// English contractions in decoded text.
fn clean_up_tokenization(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

/// A file of the folder of at most `cap` bytes, `None` when it is not there.
fn read_file(path: &Path, cap: u64) -> Result<Option<Vec<u8>>, TokenizerError> {
    match read_capped(path, cap) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(SmallFileError::Missing) => Ok(None),
        Err(e) => Err(file_error(path, e)),
    }
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::File {
        path: PathBuf::from(path),
        message: e.to_string(),
    }
}

/// A JSON file of the folder, `None` when it is not there.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, TokenizerError> {
    let Some(bytes) = read_file(path, MAX_CONFIG_BYTES)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| file_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> T5Tokenizer {
        T5Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/t5-tokenizer"))
            .unwrap()
    }

    #[test]
    fn special_ids_are_t5s() {
        let t = fixture();
        assert_eq!((t.pad_id(), t.eos_id(), t.unk_id()), (0, 1, Some(2)));
        assert_eq!(t.model_max_length(), Some(512));
    }

    #[test]
    fn short_prompt_is_text_end_then_padding() {
        let t = fixture();
        let (ids, mask) = t.encode("a cat", 8).unwrap();
        assert_eq!(ids.len(), 8);
        let real = mask.iter().filter(|&&m| m == 1).count();
        assert_eq!(real, t.count("a cat").unwrap());
        assert_eq!(ids[real - 1], 1);
        assert!(ids[real..].iter().all(|&i| i == 0));
        assert!(mask[..real].iter().all(|&m| m == 1));
    }

    #[test]
    fn long_prompt_keeps_the_end_token() {
        let t = fixture();
        let prompt = "a ".repeat(20);
        let (ids, mask) = t.encode(&prompt, 5).unwrap();
        assert_eq!(ids.len(), 5);
        assert_eq!(ids[4], 1);
        assert!(mask.iter().all(|&m| m == 1));
        assert_eq!(
            t.removed_text(&prompt, 5).unwrap().as_deref(),
            Some("a a a a a a a a a a a a a a a a")
        );
        assert_eq!(t.removed_text(&prompt, 21).unwrap(), None);
    }

    #[test]
    fn no_room_for_the_end_token_is_an_error() {
        let t = fixture();
        // transformers: `tokenizer("a cat", padding="max_length", max_length=1,
        // truncation=True)` is `[1]`.
        assert_eq!(t.encode("a cat", 1).unwrap(), (vec![1], vec![1]));
        assert!(t.encode("a cat", 0).is_err());
    }

    #[test]
    fn missing_tokenizer_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = T5Tokenizer::from_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
    }

    #[test]
    fn clean_up_drops_space_before_punctuation() {
        assert_eq!(clean_up_tokenization("a , b . c 's"), "a, b. c's");
    }
}
