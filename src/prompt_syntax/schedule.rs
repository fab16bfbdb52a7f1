//! AUTOMATIC1111's prompt editing (`[from:to:when]`), alternation (`[a|b]`) and composable
//! prompts (`a AND b :1.2`), as stable-diffusion-webui 1.10 computes them in
//! `modules/prompt_parser.py`: [`split_and`] is `get_multicond_prompt_list` for one
//! prompt, [`schedule`] is `get_learned_conditioning_prompt_schedules` for one text (no
//! hires steps, new scheduling) and [`entry_at`] is the entry choice of
//! `reconstruct_cond_batch`. `tests/a1111_schedule.rs` checks them against webui's own
//! results (`tests/golden/a1111/schedules.json`, written by
//! `onnx/golden_a1111_schedules.py`).
//!
//! webui parses with a Lark Earley grammar (`schedule_parser`):
//!
//! ```text
//! start: (prompt | /[][():]/+)*
//! prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
//! emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
//! scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
//! alternate: "[" prompt ("|" [prompt])+ "]"
//! ```
//!
//! The parser here is hand-written: Rust has no Earley/Lark equivalent, and what matters is
//! not only which texts parse but which of several parses Lark picks. Inside a `prompt`
//! there is no choice to make: brackets must nest, every `[` or `(` opens at most one
//! structure, and plain text and whitespace runs are taken greedily (Lark's dynamic lexer
//! matches each terminal's regex once, greedily), so a recursive descent reproduces it.
//! The choice lies in `start`, where any of `[ ] ( ) :` may also be a literal character.
//! Lark orders the derivations of each node by (empty, priority, rule order) and breaks
//! ties by the iteration order of a Python set, which follows string hashing and changes
//! from one process to the next. For `start` this means: the whole text as one prompt if
//! it is one; else all literal characters if it is only those; else it ends with a prompt
//! (any of its possible starts, a tie) if it can; else with a run of literal characters
//! (any of its starts, a tie); and the same again for what comes before. [`schedule`]
//! follows that order and, where tied derivations would give different schedules (an
//! unbalanced bracket next to an edit: `[a:b:3]]`), refuses rather than guess
//! ([`PromptSyntaxError::AmbiguousSchedule`]): webui itself has no single answer there.

use std::collections::BTreeSet;
use std::rc::Rc;

use super::PromptSyntaxError;
use crate::wire::error::echo;

/// One part of a prompt split at `AND`, with its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Composable {
    /// The part's text, its `:weight` and trailing whitespace removed.
    pub text: String,
    /// The number after the part's last `:`, or 1.0 without one.
    pub weight: f64,
}

/// One entry of a prompt's schedule: its text is in force up to and including 0-based step
/// `end_at_step`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    /// The last step (webui's `end_at_step`) this entry is used at.
    pub end_at_step: usize,
    /// The prompt text at those steps, editing and alternation resolved.
    pub text: String,
}

/// Deepest bracket nesting [`schedule`] follows (a deeper prompt is refused rather than
/// risking the stack; webui 1.10.1 still answers at 200).
const MAX_DEPTH: usize = 200;

/// Python's `str.isspace()` (the `\s` of a `str` regex): Unicode White_Space plus the
/// information separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A character of Python's `\w` as `\b` sees it, where Rust can tell for certain: `None`
/// for a non-ASCII alphanumeric (Python's and Rust's Unicode classes differ in places).
fn is_py_word(c: char) -> Option<bool> {
    if c.is_ascii() {
        Some(c.is_ascii_alphanumeric() || c == '_')
    } else if c.is_alphanumeric() {
        None
    } else {
        Some(false)
    }
}

/// webui's `get_multicond_prompt_list` for one prompt: the prompt split at `\bAND\b`, each
/// part through `re_weight` (`text :weight`). Every part is kept, in order.
pub fn split_and(prompt: &str) -> Result<Vec<Composable>, PromptSyntaxError> {
    let refuse = || PromptSyntaxError::AndBoundary {
        text: echo(prompt).into_owned(),
    };
    let mut parts = Vec::new();
    let mut start = 0;
    let mut search = 0;
    while let Some(found) = prompt[search..].find("AND") {
        let at = search + found;
        let end = at + 3;
        let before = prompt[..at].chars().next_back().map(is_py_word);
        let after = prompt[end..].chars().next().map(is_py_word);
        if before == Some(Some(true)) || after == Some(Some(true)) {
            search = at + 1;
        } else if before == Some(None) || after == Some(None) {
            return Err(refuse());
        } else {
            parts.push(&prompt[start..at]);
            start = end;
            search = end;
        }
    }
    parts.push(&prompt[start..]);
    parts.into_iter().map(weighted).collect()
}

/// webui's `re_weight` on one part: the shortest text such that the rest is whitespace, or
/// `:` and a number between whitespace.
fn weighted(part: &str) -> Result<Composable, PromptSyntaxError> {
    if let Some(colon) = part.rfind(':') {
        let tail = &part[colon + 1..];
        if tail.chars().any(|c| !c.is_ascii() && c.is_numeric()) {
            // `\d` takes every Unicode decimal digit and float() reads them; not followed.
            return Err(PromptSyntaxError::CompositeWeight {
                text: echo(part).into_owned(),
            });
        }
        let number = tail.trim_matches(is_py_space);
        if is_weight_number(number) {
            let digits = number.trim_start_matches(['+', '-']);
            let mut normal = String::with_capacity(number.len() + 2);
            if number.starts_with('-') {
                normal.push('-');
            }
            if digits.starts_with('.') {
                normal.push('0');
            }
            normal.push_str(digits);
            if digits.ends_with('.') {
                normal.push('0');
            }
            let weight = normal
                .parse::<f64>()
                .expect("a checked decimal number parses");
            return Ok(Composable {
                text: part[..colon].trim_end_matches(is_py_space).to_string(),
                weight,
            });
        }
    }
    Ok(Composable {
        text: part.trim_end_matches(is_py_space).to_string(),
        weight: 1.0,
    })
}

/// `[-+]?(?:\d+\.?|\d*\.\d+)` over the whole string (ASCII digits).
fn is_weight_number(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits = body.bytes().filter(u8::is_ascii_digit).count();
    let dots = body.bytes().filter(|&b| b == b'.').count();
    digits > 0 && dots <= 1 && digits + dots == body.len()
}

/// A piece of a parsed prompt.
#[derive(Debug)]
enum Item {
    /// Characters copied as they are (plain text, whitespace, emphasis brackets, literal
    /// brackets), as a char range.
    Text(usize, usize),
    /// `[before:after:when]` or `[after:when]`.
    Edit(Rc<Edit>),
    /// `[a|b|...]`.
    Alternate(Rc<Vec<Vec<Item>>>),
}

#[derive(Debug)]
struct Edit {
    before: Option<Vec<Item>>,
    after: Vec<Item>,
    /// The NUMBER as written (char range).
    number: (usize, usize),
}

/// A structure opened at some position: its end and its items (emphasis flattened into
/// text and the items inside it).
#[derive(Debug)]
struct Structure {
    end: usize,
    items: Vec<Item>,
    /// Where the edits and alternations among `items` open (emphasis looked into).
    marks: Vec<usize>,
}

struct Parser<'a> {
    chars: &'a [char],
    /// `structures[p]`: `None` not yet tried, `Some(None)` no structure opens at `p`.
    structures: Vec<Option<Option<Rc<Structure>>>>,
}

/// The parse failed in a way that is not webui's: refuse (nesting too deep).
struct TooDeep;

impl<'a> Parser<'a> {
    fn new(chars: &'a [char]) -> Parser<'a> {
        Parser {
            chars,
            structures: vec![None; chars.len() + 1],
        }
    }

    fn at(&self, p: usize) -> Option<char> {
        self.chars.get(p).copied()
    }

    /// Lark's `plain` (`([^\\\[\]():|]|\\.)+`) from `p`, greedy: its end, `p` if none.
    fn plain_end(&self, mut p: usize) -> usize {
        while let Some(c) = self.at(p) {
            match c {
                '[' | ']' | '(' | ')' | ':' | '|' => break,
                '\\' => match self.at(p + 1) {
                    Some(next) if next != '\n' => p += 2,
                    _ => break,
                },
                _ => p += 1,
            }
        }
        p
    }

    /// `WHITESPACE` (`\s+`) from `p`, greedy: its end, `p` if none.
    fn space_end(&self, mut p: usize) -> usize {
        while self.at(p).is_some_and(is_py_space) {
            p += 1;
        }
        p
    }

    /// A `prompt` from `p`: its items and where it stops (at `: ] ) |`, the end, or what no
    /// item can start with).
    fn prompt(&mut self, mut p: usize, depth: usize) -> Result<Prompt, TooDeep> {
        let mut items = Vec::new();
        let mut marks = Vec::new();
        loop {
            match self.at(p) {
                Some('[' | '(') => match self.structure(p, depth + 1)? {
                    Some(s) => {
                        items.extend(s.items.iter().map(Item::share));
                        marks.extend_from_slice(&s.marks);
                        p = s.end;
                    }
                    None => break,
                },
                Some(_) => {
                    let end = self.plain_end(p);
                    if end == p {
                        break;
                    }
                    items.push(Item::Text(p, end));
                    p = end;
                }
                None => break,
            }
        }
        Ok(Prompt {
            items,
            marks,
            end: p,
        })
    }

    /// The structure (`emphasized`, `scheduled` or `alternate`) that opens at `p`, if any;
    /// there is at most one.
    fn structure(&mut self, p: usize, depth: usize) -> Result<Option<Rc<Structure>>, TooDeep> {
        if let Some(known) = &self.structures[p] {
            return Ok(known.clone());
        }
        if depth > MAX_DEPTH {
            return Err(TooDeep);
        }
        let found = self.parse_structure(p, depth)?.map(Rc::new);
        self.structures[p] = Some(found.clone());
        Ok(found)
    }

    fn parse_structure(&mut self, p: usize, depth: usize) -> Result<Option<Structure>, TooDeep> {
        let open = self.at(p);
        let first = self.prompt(p + 1, depth)?;
        let q = first.end;
        // Emphasis: its brackets (and `:`) are text, what is inside stays as it is.
        let emphasis = |parts: Vec<Prompt>, end: usize| {
            let mut items = vec![Item::Text(p, p + 1)];
            let mut marks = Vec::new();
            let count = parts.len();
            for (i, part) in parts.into_iter().enumerate() {
                items.extend(part.items);
                marks.extend(part.marks);
                if i + 1 < count {
                    items.push(Item::Text(part.end, part.end + 1));
                }
            }
            items.push(Item::Text(end - 1, end));
            Structure { end, items, marks }
        };
        let mark = |end: usize, item: Item| Structure {
            end,
            items: vec![item],
            marks: vec![p],
        };
        Ok(match (open, self.at(q)) {
            (Some('('), Some(')')) | (Some('['), Some(']')) => Some(emphasis(vec![first], q + 1)),
            (Some('('), Some(':')) => {
                let second = self.prompt(q + 1, depth)?;
                let r = second.end;
                (self.at(r) == Some(')')).then(|| emphasis(vec![first, second], r + 1))
            }
            (Some('['), Some('|')) => {
                let mut options = vec![first.items];
                let mut q = q;
                loop {
                    let option = self.prompt(q + 1, depth)?;
                    let r = option.end;
                    options.push(option.items);
                    match self.at(r) {
                        Some('|') => q = r,
                        Some(']') => break Some(mark(r + 1, Item::Alternate(Rc::new(options)))),
                        _ => break None,
                    }
                }
            }
            (Some('['), Some(':')) => {
                if let Some((number, end)) = self.when(q + 1) {
                    let edit = Edit {
                        before: None,
                        after: first.items,
                        number,
                    };
                    Some(mark(end, Item::Edit(Rc::new(edit))))
                } else {
                    let second = self.prompt(q + 1, depth)?;
                    let r = second.end;
                    match (self.at(r), self.when(r + 1)) {
                        (Some(':'), Some((number, end))) => {
                            let edit = Edit {
                                before: Some(first.items),
                                after: second.items,
                                number,
                            };
                            Some(mark(end, Item::Edit(Rc::new(edit))))
                        }
                        _ => None,
                    }
                }
            }
            _ => None,
        })
    }

    /// `[WHITESPACE] NUMBER [WHITESPACE] "]"` from `p`: the NUMBER's range and the end.
    fn when(&self, p: usize) -> Option<((usize, usize), usize)> {
        let start = self.space_end(p);
        let end = self.number_end(start)?;
        let after = self.space_end(end);
        (self.at(after) == Some(']')).then_some(((start, end), after + 1))
    }

    /// Lark's `SIGNED_NUMBER` at `p` as its regex matches it (alternatives in order:
    /// `INT exponent`, `DECIMAL exponent?`, `INT`): its end.
    fn number_end(&self, p: usize) -> Option<usize> {
        let digits = |mut q: usize| {
            while self.at(q).is_some_and(|c| c.is_ascii_digit()) {
                q += 1;
            }
            q
        };
        let exponent = |q: usize| -> Option<usize> {
            if !matches!(self.at(q), Some('e' | 'E')) {
                return None;
            }
            let mut r = q + 1;
            if matches!(self.at(r), Some('+' | '-')) {
                r += 1;
            }
            let end = digits(r);
            (end > r).then_some(end)
        };
        let mut q = p;
        if matches!(self.at(q), Some('+' | '-')) {
            q += 1;
        }
        let int_end = digits(q);
        if int_end > q {
            if let Some(end) = exponent(int_end) {
                return Some(end);
            }
            if self.at(int_end) == Some('.') {
                let frac_end = digits(int_end + 1);
                return Some(exponent(frac_end).unwrap_or(frac_end));
            }
            return Some(int_end);
        }
        if self.at(q) == Some('.') {
            let frac_end = digits(q + 1);
            if frac_end > q + 1 {
                return Some(exponent(frac_end).unwrap_or(frac_end));
            }
        }
        None
    }
}

/// A `prompt`: its items, where its edits and alternations open, where it stops.
struct Prompt {
    items: Vec<Item>,
    marks: Vec<usize>,
    end: usize,
}

impl Item {
    fn share(&self) -> Item {
        match self {
            Item::Text(a, b) => Item::Text(*a, *b),
            Item::Edit(e) => Item::Edit(e.clone()),
            Item::Alternate(a) => Item::Alternate(a.clone()),
        }
    }
}

mod resolve;

/// webui's `get_learned_conditioning_prompt_schedules` for one text and a step count
/// (>= 1; 0 is taken as 1): the steps at which the text changes, each with the text in
/// force up to it, the last at `steps`. A text webui cannot parse is its own one entry.
pub fn schedule(text: &str, steps: usize) -> Result<Vec<Scheduled>, PromptSyntaxError> {
    let steps = steps.max(1);
    let chars: Vec<char> = text.chars().collect();
    let mut parser = Parser::new(&chars);
    let items = match resolve::resolve(&mut parser) {
        Ok(Some(items)) => items,
        Ok(None) => {
            return Ok(vec![Scheduled {
                end_at_step: steps,
                text: text.to_string(),
            }]);
        }
        Err(resolve::Refusal::Ambiguous) => {
            return Err(PromptSyntaxError::AmbiguousSchedule {
                text: echo(text).into_owned(),
            });
        }
        Err(resolve::Refusal::TooDeep) => {
            return Err(PromptSyntaxError::ScheduleTooDeep {
                text: echo(text).into_owned(),
            });
        }
    };
    let ctx = Render {
        chars: &chars,
        text,
        steps,
    };
    let mut boundaries = BTreeSet::from([steps]);
    ctx.collect(&items, &mut boundaries)?;
    boundaries
        .into_iter()
        .map(|step| {
            let mut out = String::new();
            ctx.render(&items, step, &mut out)?;
            Ok(Scheduled {
                end_at_step: step,
                text: out,
            })
        })
        .collect()
}

struct Render<'a> {
    chars: &'a [char],
    text: &'a str,
    steps: usize,
}

impl Render<'_> {
    /// webui's `collect_steps`: every edit's step (at least 1), every step with an
    /// alternation.
    fn collect(&self, items: &[Item], out: &mut BTreeSet<usize>) -> Result<(), PromptSyntaxError> {
        for item in items {
            match item {
                Item::Text(..) => {}
                Item::Edit(edit) => {
                    if let Ok(when) = usize::try_from(self.when(edit)?)
                        && when >= 1
                    {
                        out.insert(when);
                    }
                    if let Some(before) = &edit.before {
                        self.collect(before, out)?;
                    }
                    self.collect(&edit.after, out)?;
                }
                Item::Alternate(options) => {
                    out.extend(1..=self.steps);
                    for option in options.iter() {
                        self.collect(option, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// An edit's step: `min(steps, int(v))`, `v` the number, times `steps` when it has a
    /// `.`. webui raises OverflowError where `v` is infinite.
    fn when(&self, edit: &Edit) -> Result<i64, PromptSyntaxError> {
        let written: String = self.chars[edit.number.0..edit.number.1].iter().collect();
        let mut normal = written.replace(['e', 'E'], "e");
        // Rust's parser wants a digit on each side of the point.
        normal = normal.replace(".e", ".0e");
        if normal.ends_with('.') {
            normal.push('0');
        }
        if let Some(rest) = normal.strip_prefix('.') {
            normal = format!("0.{rest}");
        } else if let Some(rest) = normal.strip_prefix("+.") {
            normal = format!("0.{rest}");
        } else if let Some(rest) = normal.strip_prefix("-.") {
            normal = format!("-0.{rest}");
        }
        let mut v: f64 = normal.parse().expect("a SIGNED_NUMBER parses");
        if written.contains('.') {
            v *= self.steps as f64;
        }
        if !v.is_finite() {
            return Err(PromptSyntaxError::ScheduleStepOverflow {
                number: written,
                text: echo(self.text).into_owned(),
            });
        }
        Ok(if v >= self.steps as f64 {
            self.steps as i64
        } else {
            v.trunc() as i64
        })
    }

    /// webui's `at_step`: the text at 1-based `step`.
    fn render(
        &self,
        items: &[Item],
        step: usize,
        out: &mut String,
    ) -> Result<(), PromptSyntaxError> {
        for item in items {
            match item {
                Item::Text(a, b) => out.extend(&self.chars[*a..*b]),
                Item::Edit(edit) => {
                    let when = self.when(edit)?;
                    if (step as i64) <= when {
                        if let Some(before) = &edit.before {
                            self.render(before, step, out)?;
                        }
                    } else {
                        self.render(&edit.after, step, out)?;
                    }
                }
                Item::Alternate(options) => {
                    self.render(&options[(step - 1) % options.len()], step, out)?;
                }
            }
        }
        Ok(())
    }
}

/// The index of the entry in force at 0-based step `step` (webui's
/// `reconstruct_cond_batch`): the first whose `end_at_step` is at least `step`, else the
/// first.
pub fn entry_at(schedule: &[Scheduled], step: usize) -> usize {
    schedule
        .iter()
        .position(|entry| step <= entry.end_at_step)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
