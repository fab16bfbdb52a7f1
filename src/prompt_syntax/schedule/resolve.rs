//! Which parse of webui's `start` rule (`(prompt | /[][():]/+)*`) Lark's Earley parser
//! keeps (`ForestToParseTree` with ambiguity "resolve", lark 1.1.2), for
//! `get_learned_conditioning_prompt_schedules`.
//!
//! The text is a graph over char positions: from a position the parse can reach, an item
//! of a prompt (a greedy plain or whitespace run, or the one structure opening there) or
//! one literal `[ ] ( ) :` leads on. Lark builds `start` as a left-recursive
//! `__start_star` whose derivations of a span `[0, k)` it tries in rule order: the whole
//! span as one prompt; the whole span as literal characters; a shorter span `[0, j)` and
//! one prompt `[j, k)` (every such `j` one derivation of the same rank); a shorter span
//! and a run of literal characters `[j, k)` (likewise). Among derivations of the same rank
//! Lark takes the first that a Python set of SPPF nodes yields, an order that follows
//! string hashing and changes between processes; so where they disagree on the edits and
//! alternations in force, webui has no one answer and the prompt is refused.
//!
//! One pass over the positions, in order: what the spans `[0, k)` resolve to, and, flowing
//! along the prompt items, what every derivation "`[0, j)` then a prompt up to here" keeps
//! in force, as hash-consed lists compared by id.

use std::collections::HashMap;

use super::{Item, Parser};

/// Why a text is not given a schedule.
pub(super) enum Refusal {
    /// Tied derivations disagree: webui's result depends on the process.
    Ambiguous,
    /// Nesting past the depth followed.
    TooDeep,
}

/// Derivations seen so far, by what they keep in force.
#[derive(Clone, Copy, PartialEq)]
enum Found {
    None,
    /// All the one list of edits and alternations in force (an id of [`Lists`]).
    One(usize),
    /// Lists that differ (or one that is itself ambiguous).
    Many,
}

impl Found {
    fn add(&mut self, other: Found) {
        *self = match (*self, other) {
            (Found::None, x) | (x, Found::None) => x,
            (Found::One(a), Found::One(b)) if a == b => Found::One(a),
            _ => Found::Many,
        }
    }
}

/// Lists of positions (where the edits and alternations in force open), hash-consed: two
/// lists are equal exactly when their ids are. Id 0 is the empty list.
struct Lists {
    /// `nodes[id - 1]`: the list `id` is the list `.0` and then position `.1`.
    nodes: Vec<(usize, usize)>,
    ids: HashMap<(usize, usize), usize>,
}

impl Lists {
    fn append(&mut self, mut id: usize, marks: &[usize]) -> usize {
        for &m in marks {
            let next = self.nodes.len() + 1;
            let found = *self.ids.entry((id, m)).or_insert(next);
            if found == next {
                self.nodes.push((id, m));
            }
            id = found;
        }
        id
    }

    fn extend(&mut self, found: Found, marks: &[usize]) -> Found {
        match found {
            Found::One(id) => Found::One(self.append(id, marks)),
            other => other,
        }
    }

    fn positions(&self, mut id: usize) -> Vec<usize> {
        let mut out = Vec::new();
        while id != 0 {
            let (prev, m) = self.nodes[id - 1];
            out.push(m);
            id = prev;
        }
        out.reverse();
        out
    }
}

fn is_literal(c: char) -> bool {
    matches!(c, '[' | ']' | '(' | ')' | ':')
}

/// The items of the parse webui keeps; `None` where there is no parse (webui keeps the
/// text as it is).
pub(super) fn resolve(parser: &mut Parser) -> Result<Option<Vec<Item>>, Refusal> {
    let n = parser.chars.len();
    let whole = parser.prompt(0, 0).map_err(|_| Refusal::TooDeep)?;
    if whole.end == n {
        return Ok(Some(whole.items));
    }

    let mut lists = Lists {
        nodes: Vec::new(),
        ids: HashMap::new(),
    };
    // `resolved[k]`: what `[0, k)` resolves to (None: no derivation).
    let mut resolved = vec![Found::None; n + 1];
    // `from_zero[k]`: `[0, k)` as one prompt.
    let mut from_zero = vec![Found::None; n + 1];
    // `prompts[k]`: the derivations `[0, j)` then a prompt `[j, k)`, 0 < j < k.
    let mut prompts = vec![Found::None; n + 1];
    // The derivations `[0, j)` then literal characters `[j, k)`, for the current run.
    let mut literals = Found::None;
    let mut all_literal = true;
    from_zero[0] = Found::One(0);
    for k in 0..=n {
        // 1. the whole span one prompt; 2. the whole span literal characters; 3. a shorter
        // span and a prompt; 4. a shorter span and literal characters.
        resolved[k] = if k == 0 || from_zero[k] != Found::None {
            from_zero[k]
        } else if all_literal {
            Found::One(0)
        } else if prompts[k] != Found::None {
            prompts[k]
        } else {
            literals
        };
        if k == n {
            break;
        }
        let c = parser.chars[k];
        all_literal &= is_literal(c);
        if is_literal(c) {
            literals.add(resolved[k]);
        } else {
            literals = Found::None;
        }
        if resolved[k] == Found::None {
            continue;
        }
        // The prompt items from k, each carrying on the derivations that end in a prompt.
        let mut carry = prompts[k];
        if k > 0 {
            carry.add(resolved[k]);
        }
        let plain = parser.plain_end(k);
        let space = parser.space_end(k);
        let mut items: Vec<(usize, Vec<usize>)> = Vec::new();
        if plain > k {
            items.push((plain, Vec::new()));
        }
        if space > k && space != plain {
            items.push((space, Vec::new()));
        }
        if matches!(c, '[' | '(')
            && let Some(s) = parser.structure(k, 0).map_err(|_| Refusal::TooDeep)?
        {
            items.push((s.end, s.marks.clone()));
        }
        for (end, marks) in items {
            let zero = lists.extend(from_zero[k], &marks);
            from_zero[end].add(zero);
            let more = lists.extend(carry, &marks);
            prompts[end].add(more);
        }
    }

    let id = match resolved[n] {
        Found::One(id) => id,
        Found::Many => return Err(Refusal::Ambiguous),
        Found::None => return Ok(None),
    };
    // The text as it is, but for the edits and alternations in force.
    let mut items = Vec::new();
    let mut p = 0;
    for m in lists.positions(id) {
        if m > p {
            items.push(Item::Text(p, m));
        }
        let s = parser
            .structure(m, 0)
            .map_err(|_| Refusal::TooDeep)?
            .expect("a marked structure parses");
        items.extend(s.items.iter().map(Item::share));
        p = s.end;
    }
    if n > p {
        items.push(Item::Text(p, n));
    }
    Ok(Some(items))
}
