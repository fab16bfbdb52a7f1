//! AUTOMATIC1111's prompt syntax: emphasis weights (`(word)`, `[word]`, `(word:1.3)`),
//! `BREAK`, and prompts of any length as 75-token chunks, as stable-diffusion-webui
//! computes them (`parse_prompt_attention`; `tokenize_line` and `process_tokens` of
//! `sd_hijack_clip.py`; emphasis "Original").
//!
//! Pure and tokenizer-agnostic. [`parse_attention`] cuts a prompt into weighted
//! [`Segment`]s; [`chunk_segments`] tokenizes them through a callback and lays the ids out
//! in 77-id [`Chunk`]s with per-token weights; [`pad_chunks`] brings the prompt and the
//! negative prompt to one chunk count; once the text encoder has run on each chunk on its
//! own, [`apply_weights`] scales the hidden states and restores their mean. Every rule,
//! pinned against webui's code, is written out in `onnx/golden_a1111.py`, which also
//! writes the goldens (`tests/golden/a1111/`) the tests below compare against.

use std::fmt;
use std::str::FromStr;

use ndarray::{ArrayView2, ArrayViewMut2, Axis};

pub mod extra_networks;
mod schedule;
pub use schedule::{Composable, Scheduled, entry_at, schedule, split_and};

/// Prompt tokens per chunk, start and end tokens not counted.
pub const CHUNK_TOKENS: usize = 75;
/// Ids per chunk: start token, [`CHUNK_TOKENS`], end token.
pub const CHUNK_LEN: usize = CHUNK_TOKENS + 2;
/// webui's `comma_padding_backtrack` default: a chunk that overflows moves the tokens after
/// its last comma to the next chunk when that comma is at most this many tokens back.
pub const COMMA_BACKTRACK: usize = 20;

/// `(text)` multiplies by this.
const ROUND: f64 = 1.1;
/// `[text]` multiplies by this (the f64 value of 1/1.1, as webui computes it).
const SQUARE: f64 = 1.0 / 1.1;

/// How a request's prompt text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptSyntax {
    /// Plain text, as diffusers reads it: one 77-token window, no weights.
    #[default]
    Diffusers,
    /// AUTOMATIC1111's emphasis, `BREAK` and chunked long prompts.
    A1111,
}

impl PromptSyntax {
    /// Every syntax.
    pub const ALL: [PromptSyntax; 2] = [PromptSyntax::Diffusers, PromptSyntax::A1111];

    /// The name a request or setting uses.
    pub fn name(self) -> &'static str {
        match self {
            PromptSyntax::Diffusers => "diffusers",
            PromptSyntax::A1111 => "a1111",
        }
    }
}

impl fmt::Display for PromptSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PromptSyntax {
    type Err = PromptSyntaxError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PromptSyntax::ALL
            .into_iter()
            .find(|syntax| syntax.name() == s)
            .ok_or_else(|| PromptSyntaxError::UnknownSyntax {
                value: crate::wire::error::echo(s).into_owned(),
            })
    }
}

/// Errors of this module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PromptSyntaxError {
    /// A syntax name that is not one of [`PromptSyntax::ALL`].
    #[error("unknown prompt syntax '{value}' (accepted: diffusers, a1111)")]
    UnknownSyntax {
        /// The name given.
        value: String,
    },
    /// `(text:number)` whose number does not parse (`1.2.3`, `.`); webui fails there too.
    #[error("prompt weight '{weight}' in '{lexeme}' is not a number")]
    InvalidWeight {
        /// The number as written.
        weight: String,
        /// The whole `:number)` it closes a group with.
        lexeme: String,
    },
    /// Hidden states and weights of different lengths.
    #[error("{weights} token weights for {rows} rows of hidden states")]
    WeightCount {
        /// Rows (tokens) of the hidden states.
        rows: usize,
        /// Weights given.
        weights: usize,
    },
    /// Prompt editing or alternation next to an unbalanced bracket, where webui's Earley
    /// parser picks between equally ranked parses in an order that changes from one
    /// process to the next (`[a:b:3]]`): there is no one schedule to reproduce.
    #[error(
        "prompt editing or alternation in '{text}' is ambiguous next to an unbalanced \
         bracket (webui's result for it changes from run to run); balance or escape the \
         brackets"
    )]
    AmbiguousSchedule {
        /// The prompt text.
        text: String,
    },
    /// Brackets nested deeper than the 200 levels followed.
    #[error("prompt editing or alternation in '{text}' nests brackets more than 200 deep")]
    ScheduleTooDeep {
        /// The prompt text.
        text: String,
    },
    /// A prompt editing step that is not a finite number of steps (`[a:b:1e400]`); webui
    /// raises OverflowError.
    #[error("prompt editing step '{number}' in '{text}' is not a finite number of steps")]
    ScheduleStepOverflow {
        /// The number as written.
        number: String,
        /// The prompt text.
        text: String,
    },
    /// `AND` beside a non-ASCII letter or digit, where Python's `\b` and Rust's character
    /// classes may disagree on whether it splits the prompt.
    #[error("composable prompt 'AND' beside a non-ASCII letter in '{text}' is not supported")]
    AndBoundary {
        /// The prompt.
        text: String,
    },
    /// A composable prompt weight (`:1.2` after `AND`) with non-ASCII digits, which
    /// webui's `\d` and float() read but are not followed here.
    #[error("composable prompt weight with non-ASCII digits in '{text}' is not supported")]
    CompositeWeight {
        /// The part of the prompt.
        text: String,
    },
}

/// One piece of a parsed prompt: text and its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// The text, escapes resolved.
    pub text: String,
    /// The product of the enclosing groups' factors, in f64 as webui computes it
    /// (cast to f32 per token). A [`Segment::is_break`] segment has -1.0.
    pub weight: f64,
}

impl Segment {
    fn new(text: &str, weight: f64) -> Segment {
        Segment {
            text: text.to_string(),
            weight,
        }
    }

    /// Whether this segment ends the current chunk: text exactly `BREAK` at weight exactly
    /// -1.0 (a `BREAK` inside a group was scaled and is plain text).
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

/// One lexeme of webui's `re_attention`.
enum Lexeme<'a> {
    /// `\(` `\)` `\[` `\]` `\\`: the character; a lone `\`: empty text.
    Literal(&'a str),
    OpenRound,
    OpenSquare,
    CloseRound,
    CloseSquare,
    /// `:` number `)`, optional whitespace around the number: the number, the lexeme.
    Weight(&'a str, &'a str),
    /// A run without `\ ( ) [ ] :`, or a `:` that starts no weight.
    Text(&'a str),
}

/// Python's `\s` (`str.isspace`): Unicode White_Space plus U+001C..U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w` for `\b`: alphanumeric or `_`.
fn py_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Bytes of the leading run of `s` whose characters satisfy `pred`.
fn run_len(s: &str, pred: impl Fn(char) -> bool) -> usize {
    s.chars().take_while(|&c| pred(c)).map(char::len_utf8).sum()
}

/// The first lexeme of non-empty `s` and its length in bytes.
fn lex(s: &str) -> (Lexeme<'_>, usize) {
    let mut chars = s.chars();
    match chars.next() {
        Some('\\') => match chars.next() {
            Some('(' | ')' | '[' | ']' | '\\') => (Lexeme::Literal(&s[1..2]), 2),
            _ => (Lexeme::Literal(""), 1),
        },
        Some('(') => (Lexeme::OpenRound, 1),
        Some('[') => (Lexeme::OpenSquare, 1),
        Some(')') => (Lexeme::CloseRound, 1),
        Some(']') => (Lexeme::CloseSquare, 1),
        Some(':') => match weight_close(s) {
            Some((number, len)) => (Lexeme::Weight(number, &s[..len]), len),
            None => (Lexeme::Text(":"), 1),
        },
        _ => {
            let end = s.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(s.len());
            (Lexeme::Text(&s[..end]), end)
        }
    }
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `s` (ASCII digits): the number and the length.
fn weight_close(s: &str) -> Option<(&str, usize)> {
    let start = 1 + run_len(&s[1..], py_space);
    let sign = usize::from(s[start..].starts_with(['+', '-']));
    let digits = run_len(&s[start + sign..], |c| c.is_ascii_digit() || c == '.');
    if digits == 0 {
        return None;
    }
    let end = start + sign + digits;
    let close = end + run_len(&s[end..], py_space);
    s[close..]
        .starts_with(')')
        .then(|| (&s[start..end], close + 1))
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`.
fn split_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut last = 0;
    for (at, word) in text.match_indices("BREAK") {
        let end = at + word.len();
        let before = text[..at].chars().next_back();
        let after = text[end..].chars().next();
        if at < last || before.is_some_and(py_word) || after.is_some_and(py_word) {
            continue;
        }
        parts.push(text[last..at].trim_end_matches(py_space));
        last = end + run_len(&text[end..], py_space);
    }
    parts.push(&text[last..]);
    parts
}

/// Appends text: its parts between `BREAK`s at 1.0, a BREAK segment (-1.0) between them.
fn push_text(segments: &mut Vec<Segment>, text: &str) {
    for (i, part) in split_break(text).into_iter().enumerate() {
        if i > 0 {
            segments.push(Segment::new("BREAK", -1.0));
        }
        segments.push(Segment::new(part, 1.0));
    }
}

fn scale(segments: &mut [Segment], factor: f64) {
    for segment in segments {
        segment.weight *= factor;
    }
}

/// The number of a `:number)` lexeme, as Python's `float()` reads it.
fn parse_weight(number: &str, lexeme: &str) -> Result<f64, PromptSyntaxError> {
    // Caller text, repeated cut short.
    let invalid = |_| PromptSyntaxError::InvalidWeight {
        weight: crate::wire::error::echo(number).into_owned(),
        lexeme: crate::wire::error::echo(lexeme).into_owned(),
    };
    number.parse::<f64>().map_err(invalid)
}

/// webui's `parse_prompt_attention`: the prompt's segments with their weights, equal
/// neighbours merged. `(x)` ×1.1, `[x]` ×1/1.1, `(x:1.3)` ×1.3, `\(` `\)` `\[` `\]` `\\`
/// literal, groups still open at the end closed there, `BREAK` (outside any group) as a
/// segment of its own at -1.0. An empty result is one empty segment at 1.0.
pub fn parse_attention(text: &str) -> Result<Vec<Segment>, PromptSyntaxError> {
    let mut segments: Vec<Segment> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (lexeme, len) = lex(rest);
        match lexeme {
            Lexeme::Literal(t) => segments.push(Segment::new(t, 1.0)),
            Lexeme::OpenRound => round.push(segments.len()),
            Lexeme::OpenSquare => square.push(segments.len()),
            Lexeme::Weight(number, whole) => match round.pop() {
                Some(start) => scale(&mut segments[start..], parse_weight(number, whole)?),
                None => push_text(&mut segments, whole),
            },
            Lexeme::CloseRound => match round.pop() {
                Some(start) => scale(&mut segments[start..], ROUND),
                None => push_text(&mut segments, ")"),
            },
            Lexeme::CloseSquare => match square.pop() {
                Some(start) => scale(&mut segments[start..], SQUARE),
                None => push_text(&mut segments, "]"),
            },
            Lexeme::Text(t) => push_text(&mut segments, t),
        }
        rest = &rest[len..];
    }
    for start in round {
        scale(&mut segments[start..], ROUND);
    }
    for start in square {
        scale(&mut segments[start..], SQUARE);
    }
    if segments.is_empty() {
        segments.push(Segment::new("", 1.0));
    }
    let mut merged: Vec<Segment> = Vec::with_capacity(segments.len());
    for segment in segments {
        match merged.last_mut() {
            Some(last) if last.weight == segment.weight => last.text.push_str(&segment.text),
            _ => merged.push(segment),
        }
    }
    Ok(merged)
}

/// The special ids chunking needs, from the encoder's tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSpec {
    /// Start token (49406).
    pub bos: i64,
    /// End token (49407); chunks are filled up with it.
    pub eos: i64,
    /// The tokenizer's pad id: every id after a chunk's first end token becomes this
    /// (49407 for SD1 and SDXL's first encoder, so nothing changes; 0 for SD2 and SDXL's
    /// OpenCLIP encoder).
    pub pad: i64,
    /// The id of `,</w>` (267), if the vocabulary has it.
    pub comma: Option<i64>,
    /// webui's `comma_padding_backtrack`; 0 disables moving text after a comma.
    pub comma_backtrack: usize,
}

impl ChunkSpec {
    /// The spec with webui's default [`COMMA_BACKTRACK`].
    pub fn new(bos: i64, eos: i64, pad: i64, comma: Option<i64>) -> ChunkSpec {
        ChunkSpec {
            bos,
            eos,
            pad,
            comma,
            comma_backtrack: COMMA_BACKTRACK,
        }
    }
}

/// One encoder input: [`CHUNK_LEN`] ids and a weight per id (1.0 at start, end, padding).
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Start token, up to 75 prompt tokens, end tokens, padding.
    pub ids: Vec<i64>,
    /// The weight of each id, as f32 (what webui's multiplier tensor holds).
    pub weights: Vec<f32>,
}

impl Chunk {
    /// The chunk of an empty prompt: start, end, padding; all weights 1.0.
    pub fn empty(spec: &ChunkSpec) -> Chunk {
        Chunk::close(spec, Vec::new(), Vec::new())
    }

    /// Wraps up to 75 tokens: fills them up with end tokens (weight 1.0), adds start and
    /// end, then pads after the first end token.
    fn close(spec: &ChunkSpec, tokens: Vec<i64>, token_weights: Vec<f32>) -> Chunk {
        let fill = CHUNK_TOKENS.saturating_sub(tokens.len());
        let mut ids = Vec::with_capacity(CHUNK_LEN);
        ids.push(spec.bos);
        ids.extend(tokens);
        ids.extend(std::iter::repeat_n(spec.eos, fill + 1));
        let mut weights = Vec::with_capacity(CHUNK_LEN);
        weights.push(1.0);
        weights.extend(token_weights);
        weights.extend(std::iter::repeat_n(1.0, fill + 1));
        if spec.pad != spec.eos
            && let Some(first) = ids.iter().position(|&id| id == spec.eos)
        {
            ids[first + 1..].fill(spec.pad);
        }
        Chunk { ids, weights }
    }
}

/// The chunks being filled (webui's `tokenize_line` state).
struct Layout<'a> {
    spec: &'a ChunkSpec,
    done: Vec<Chunk>,
    ids: Vec<i64>,
    weights: Vec<f32>,
    /// Index in `ids` of the last comma of the current chunk.
    comma_at: Option<usize>,
}

impl Layout<'_> {
    fn close(&mut self) {
        let ids = std::mem::take(&mut self.ids);
        let weights = std::mem::take(&mut self.weights);
        self.done.push(Chunk::close(self.spec, ids, weights));
        self.comma_at = None;
    }

    fn push(&mut self, token: i64, weight: f32) {
        let (len, back) = (self.ids.len(), self.spec.comma_backtrack);
        if Some(token) == self.spec.comma {
            self.comma_at = Some(len);
        } else if let Some(at) = (self.comma_at)
            .filter(|&at| len == CHUNK_TOKENS && back != 0 && CHUNK_TOKENS - at <= back)
        {
            let moved_ids = self.ids.split_off(at + 1);
            let moved_weights = self.weights.split_off(at + 1);
            self.close();
            self.ids = moved_ids;
            self.weights = moved_weights;
        }
        if self.ids.len() == CHUNK_TOKENS {
            self.close();
        }
        self.ids.push(token);
        self.weights.push(weight);
    }
}

/// webui's `tokenize_line` + `process_tokens` ids: each non-BREAK segment tokenized on its
/// own by `tokenize` (ids WITHOUT start/end/padding, no truncation), its tokens weighted
/// by the segment's weight, laid out 75 per chunk with the comma back-off; a BREAK closes
/// the current chunk (even an empty one). At least one chunk.
pub fn chunk_segments<E>(
    segments: &[Segment],
    spec: &ChunkSpec,
    mut tokenize: impl FnMut(&str) -> Result<Vec<i64>, E>,
) -> Result<Vec<Chunk>, E> {
    let mut layout = Layout {
        spec,
        done: Vec::new(),
        ids: Vec::new(),
        weights: Vec::new(),
        comma_at: None,
    };
    for segment in segments {
        if segment.is_break() {
            layout.close();
            continue;
        }
        if segment.text.is_empty() {
            continue;
        }
        let weight = segment.weight as f32;
        for token in tokenize(&segment.text)? {
            layout.push(token, weight);
        }
    }
    if !layout.ids.is_empty() || layout.done.is_empty() {
        layout.close();
    }
    Ok(layout.done)
}

/// Appends empty chunks until there are `to`. webui (`pad_cond_uncond`) pads the shorter
/// of prompt and negative prompt, whichever it is, so call it on both with the larger
/// count.
pub fn pad_chunks(chunks: &mut Vec<Chunk>, to: usize, spec: &ChunkSpec) {
    while chunks.len() < to {
        chunks.push(Chunk::empty(spec));
    }
}

/// Mean of all elements: summed in f64, rounded to f32 (torch's f32 pairwise sum can end
/// one ulp away).
fn mean(a: ArrayView2<'_, f32>) -> f32 {
    (a.iter().map(|&x| f64::from(x)).sum::<f64>() / a.len() as f64) as f32
}

/// webui's emphasis "Original" on ONE chunk's hidden states `[77, D]` (one encoder, one
/// prompt): `m = mean(z); z *= w[:, None]; z *= m / mean(z)`, in f32. All-1.0 weights
/// return early, which is exact (m / m = 1) except where webui's 0 / 0 would make NaN.
pub fn apply_weights(
    mut hidden: ArrayViewMut2<'_, f32>,
    weights: &[f32],
) -> Result<(), PromptSyntaxError> {
    if hidden.nrows() != weights.len() {
        return Err(PromptSyntaxError::WeightCount {
            rows: hidden.nrows(),
            weights: weights.len(),
        });
    }
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(());
    }
    let original = mean(hidden.view());
    for (mut row, &w) in hidden.rows_mut().into_iter().zip(weights) {
        row.mapv_inplace(|x| x * w);
    }
    let ratio = original / mean(hidden.view());
    hidden.mapv_inplace(|x| x * ratio);
    Ok(())
}

/// [`apply_weights`] on concatenated chunk outputs `[77 * chunks, D]`, chunk by chunk
/// (the mean is restored per chunk, never over the whole sequence).
pub fn apply_chunk_weights(
    mut hidden: ArrayViewMut2<'_, f32>,
    chunks: &[Chunk],
) -> Result<(), PromptSyntaxError> {
    let weights: usize = chunks.iter().map(|c| c.weights.len()).sum();
    if hidden.nrows() != weights {
        return Err(PromptSyntaxError::WeightCount {
            rows: hidden.nrows(),
            weights,
        });
    }
    let mut start = 0;
    for chunk in chunks {
        let end = start + chunk.weights.len();
        let window = hidden.slice_axis_mut(Axis(0), (start..end).into());
        apply_weights(window, &chunk.weights)?;
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
