#!/usr/bin/env python3
"""Write tests/golden/a1111/: AUTOMATIC1111's prompt syntax (emphasis, BREAK, 75-token
chunks) as diffusiond's `prompt_syntax` module must reproduce it.

An independent implementation of the rules of stable-diffusion-webui's
`modules/prompt_parser.py` (`parse_prompt_attention`), `modules/sd_hijack_clip.py`
(`tokenize_line`, `process_tokens`, `forward`), `modules/sd_hijack_open_clip.py` and
`modules/sd_emphasis.py` (emphasis "Original", the default), as of webui 1.10.

Parsing (`parse_attention`): the prompt is cut, left to right, into these lexemes:
  * a backslash and one of `( ) [ ] \\`: that character as literal text;
  * a lone backslash (any other next character): an empty text piece;
  * `(` and `[`: open a group (round / square), remembering the current piece count;
  * `:` + optional whitespace + `[+-]?[.0-9]+` + optional whitespace + `)`: closes the
    innermost open round group, multiplying every piece since it opened by the number
    (the number is parsed like Python's float(); `1.2.3` or `.` is an error, where
    webui raises ValueError). With no round group open, the whole lexeme is text.
    Digits are ASCII here; webui's `\\d` also takes other Unicode decimal digits
    (a divergence we accept);
  * `)`: closes the innermost round group, x1.1; `]`: the innermost square group,
    x(1/1.1) (multiplied by the f64 constant 1/1.1, not divided by 1.1). Unmatched,
    each is literal text;
  * any run of characters other than `\\ ( ) [ ] :`, or a `:` that starts no weight: text.
    Text is split on `\\s*\\bBREAK\\b\\s*` (Python `re` semantics: Unicode `\\s`, `\\b`
    between a word character (alphanumeric or `_`) and a non-word one); between the
    parts a piece ("BREAK", -1.0) is inserted; every part, even an empty one, is a piece
    of weight 1.0.
  Every piece starts at weight 1.0 (BREAK at -1.0) and is multiplied, in f64, by each
  group that closes over it, in closing order. Groups still open at the end are closed
  then: first the round ones (outermost first, x1.1 each), then the square ones
  (outermost first). No pieces at all gives [("", 1.0)]. Finally neighbours of equal
  weight (f64 ==, so 0.0 == -0.0) are merged by concatenating their text, keeping the
  first one's weight. A piece is a BREAK only when its text is exactly "BREAK" and its
  weight exactly -1.0: inside a group it is scaled like any piece and becomes the word
  "break" (`(a BREAK b)`: -1.1; `(BREAK:-1)`: +1.0); `(a BREAK b:0)` merges all three
  pieces into "aBREAKb" at 0.0.

Chunking (`chunk`): each non-BREAK piece is tokenized on its own (transformers'
CLIPTokenizer, `add_special_tokens=False`, no truncation); its tokens carry its weight,
cast to float32. Tokens fill chunks of 75. Before adding a token:
  * if it is the comma token (`,</w>`, 267), remember the current chunk length as the
    last comma;
  * otherwise, if the chunk is full (75) and a comma was seen in this chunk at index c
    with 75 - c <= 20 (`comma_padding_backtrack`, default 20; 0 disables), the tokens
    after the comma move to a new chunk (the current one ends after the comma);
  * then, if the chunk is (still) full, it is closed.
  A comma that lands as the first token of a new chunk does not count (closing a chunk
  forgets the last comma). A BREAK closes the current chunk, even an empty one (so
  "BREAK x" starts with an all-padding chunk). At the end the current chunk is closed if
  it holds tokens or no chunk exists yet (so "" gives one chunk, "a BREAK" one chunk).
  Closing pads the tokens to 75 with the end token (weight 1.0) and wraps them as
  BOS + 75 + EOS, weights 1.0 at BOS and EOS: 77 ids and 77 weights.
  Pad token per model: webui pads with EOS (49407) and then, when the model's pad id
  differs from EOS, overwrites every id after the first EOS of the chunk with the pad
  id. SD1 and SDXL's CLIP-L: pad = EOS (49407), nothing changes. SD2 and SDXL's
  OpenCLIP (text_encoder_2): pad = 0 (the `!` that tokenizer_2's config names as pad).
  Weights are not changed by this.
  Tokenizer for SDXL's encoder 2: webui uses open_clip's tokenizer, where `!` is plain
  text (`!</w>` = 256); transformers' tokenizer_2 splits out `!` as its pad token
  (id 0). The `openclip` entries record what webui gets; `tokenizer_2` entries what
  transformers (and diffusiond's ClipTokenizer) gets.

Encoding: each chunk goes through the text encoder on its own ([1, 77] ids); chunk
outputs are concatenated along the sequence axis ([1, 77k, D]).
Weighting (emphasis "Original"), per chunk and per encoder, on the chunk's z [1, 77, D]:
  original_mean = z.mean(); z = z * w[:, None]; new_mean = z.mean();
  z = z * (original_mean / new_mean)
in float32; the mean is over every element of that one chunk's z (never over the
concatenation, never across encoders). SDXL: both encoders get their own chunks (same
rules, own pad id) and their own weighting; the two outputs are concatenated on the
feature axis per chunk. The pooled output (text_embeds) is text_encoder_2's for the
FIRST chunk only, unweighted. An empty SDXL negative prompt gives zeros for both the
hidden states and the pooled output (webui's force_zero_negative_prompt).
Prompt and negative prompt of different chunk counts: with `pad_cond_uncond` (off by
default; webui then runs cond and uncond separately) the shorter one, either of the two,
is padded with the encoded empty prompt, i.e. with empty chunks (BOS, EOS, pad...;
weights 1.0, for which the weighting is the identity).

Outputs (deterministic, sorted JSON): tests/golden/a1111/cases.json (per prompt: the
parsed pieces with their f64 weight bits, or the error; per tokenizer: each piece's ids
and the chunks) and, for a few prompts, the tiny SD1.5 text encoder's per-chunk hidden
states (`<name>.raw.npy`, [k, 77, 32]) and the weighted, concatenated result
(`<name>.weighted.npy`, [1, 77k, 32]) computed with torch as webui does. The tiny
encoder's final layer norm has no bias, so its outputs average to 0 up to rounding and
the mean restoration would divide rounding noise by rounding noise (as it would in webui);
a fixed bias vector (what a trained final_layer_norm has; mean about 0.25) is added to
the encoder output first, and `raw` holds that.

    /work/venv/ref/bin/python onnx/golden_a1111.py
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/golden/a1111"
CHUNK = 75
BACKTRACK = 20
ROUND = 1.1
SQUARE = 1 / 1.1
BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")
WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.0-9]+)\s*\)")
SPECIAL_RUN = re.compile(r"[^\\()\[\]:]+")


class WeightError(ValueError):
    """A `(text:number)` whose number is not a float."""


def parse_attention(text: str) -> list[tuple[str, float]]:
    """The prompt's pieces and their weights (see the module docstring)."""
    pieces: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    def add_text(s: str) -> None:
        parts = BREAK_SPLIT.split(s)
        pieces.append([parts[0], 1.0])
        for part in parts[1:]:
            pieces.append(["BREAK", -1.0])
            pieces.append([part, 1.0])

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt and nxt in "()[]\\":
                pieces.append([nxt, 1.0])
                i += 2
            else:
                pieces.append(["", 1.0])
                i += 1
        elif c == "(":
            rounds.append(len(pieces))
            i += 1
        elif c == "[":
            squares.append(len(pieces))
            i += 1
        elif c == ":":
            m = WEIGHT_CLOSE.match(text, i)
            if m and rounds:
                try:
                    factor = float(m.group(1))
                except ValueError as e:
                    raise WeightError(m.group(1)) from e
                scale(rounds.pop(), factor)
                i = m.end()
            elif m:
                add_text(m.group(0))
                i = m.end()
            else:
                add_text(":")
                i += 1
        elif c == ")":
            if rounds:
                scale(rounds.pop(), ROUND)
            else:
                add_text(")")
            i += 1
        elif c == "]":
            if squares:
                scale(squares.pop(), SQUARE)
            else:
                add_text("]")
            i += 1
        else:
            m = SPECIAL_RUN.match(text, i)
            add_text(m.group(0))
            i = m.end()
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    if not pieces:
        pieces = [["", 1.0]]
    merged: list[list] = []
    for piece in pieces:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [(t, float(w)) for t, w in merged]


def is_break(piece: tuple[str, float]) -> bool:
    return piece[0] == "BREAK" and piece[1] == -1.0


def chunk(pieces, piece_ids, bos: int, eos: int, pad: int, comma: int | None):
    """The 77-id chunks and float32 weights of the parsed prompt (see the docstring).
    `piece_ids[i]` are the ids of `pieces[i]` (ignored for BREAK pieces)."""
    done: list[tuple[list[int], list[float]]] = []
    cur_ids: list[int] = []
    cur_w: list[float] = []
    comma_at = None

    def close() -> None:
        nonlocal cur_ids, cur_w, comma_at
        ids = [bos] + cur_ids + [eos] * (CHUNK - len(cur_ids)) + [eos]
        w = [1.0] + cur_w + [1.0] * (CHUNK - len(cur_w)) + [1.0]
        if pad != eos:
            first = ids.index(eos)
            ids = ids[: first + 1] + [pad] * (len(ids) - first - 1)
        done.append((ids, [float(np.float32(x)) for x in w]))
        cur_ids, cur_w, comma_at = [], [], None

    for piece, ids in zip(pieces, piece_ids):
        if is_break(piece):
            close()
            continue
        for token in ids:
            if token == comma:
                comma_at = len(cur_ids)
            elif (BACKTRACK and len(cur_ids) == CHUNK and comma_at is not None
                  and CHUNK - comma_at <= BACKTRACK):
                keep = comma_at + 1
                moved_ids, moved_w = cur_ids[keep:], cur_w[keep:]
                cur_ids, cur_w = cur_ids[:keep], cur_w[:keep]
                close()
                cur_ids, cur_w = moved_ids, moved_w
            if len(cur_ids) == CHUNK:
                close()
            cur_ids.append(token)
            cur_w.append(piece[1])
    if cur_ids or not done:
        close()
    return done


def weight_chunk(z, w):
    """webui's emphasis "Original" on one chunk's hidden states z [1, 77, D] (torch f32)."""
    import torch

    original_mean = z.mean()
    z = z * torch.asarray(w, dtype=torch.float32).reshape(1, -1, 1).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def f64_bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def words(word: str, n: int) -> str:
    return " ".join([word] * n)


# Prompts: (name, text). "cat", "dog", "red" are one token each.
PROMPTS = [
    ("plain", "a photo of a cat"),
    ("doctest_normal", "normal text"),
    ("doctest_important", "an (important) word"),
    ("doctest_unbalanced", "(unbalanced"),
    ("doctest_literal", "\\(literal\\]"),
    ("doctest_parens", "(unnecessary)(parens)"),
    ("doctest_nested", "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
    ("round", "a (red) car"),
    ("square", "a [red] car"),
    ("explicit", "a (red:1.3) car"),
    ("explicit_spaces", "a (red : 1.3 ) car, (blue:+.5), (green:2.)"),
    ("negative_weight", "a (ugly:-0.5) face"),
    ("nested_mixed", "((a [b (c:0.7)] d)) [[e]] f"),
    ("escaped", "\\(x\\) and \\[y\\] and a \\\\ slash and a lone \\ here"),
    ("unmatched_close", "a ) b ] c :1.2) d: e"),
    ("unclosed_square", "a [b (c"),
    ("only_weights", "()[](:1.5)(())"),
    ("empty", ""),
    ("spaces", "   "),
    ("break", "a cat BREAK a dog"),
    ("break_only", "BREAK"),
    ("break_trailing", "a cat BREAK"),
    ("break_leading", "BREAK BREAK a dog"),
    ("break_weighted", "(a BREAK b) c"),
    ("break_negated", "a (BREAK:-1) b"),
    ("break_words", "xBREAK BREAKy BREAK_z ,BREAK, break"),
    ("break_zero", "(a BREAK b:0) c"),
    ("bang", "wow! so bright!! hello!world"),
    ("unicode", "café (naïve:1.2) 東京"),
    ("long_80", words("cat", 80)),
    ("long_160", ", ".join(["red cat"] * 53)),
    ("long_weighted", words("cat", 70) + " (" + words("dog", 10) + ":1.2) " + words("red", 5)),
    ("comma_at_72", words("cat", 72) + ", " + words("dog", 10)),
    ("comma_at_55", words("cat", 55) + ", " + words("dog", 30)),
    ("comma_at_54", words("cat", 54) + ", " + words("dog", 30)),
    ("comma_at_74", words("cat", 74) + ", " + words("dog", 5)),
    ("comma_at_75", words("cat", 75) + ", " + words("dog", 5)),
    ("comma_weighted_move", words("cat", 65) + ", (" + words("dog", 15) + ":1.4)"),
    ("comma_two_chunks", ", ".join([words("cat", 9)] * 20)),
    ("break_then_long", "a BREAK " + words("cat", 76)),
    ("bad_weight", "a (b:1.2.3) c"),
    ("bad_weight_dot", "a (b:.) c"),
    ("bad_weight_unopened", "a b:1.2.3) c"),
]

# A final-layer-norm-like bias for the tiny encoder's outputs (see the docstring).
BIAS = (0.25 + 0.1 * np.sin(np.arange(1024))).astype(np.float32)
EMBEDDING_PROMPTS = ["explicit_spaces", "long_weighted", "break"]

TOKENIZERS = {
    "sd15": ("onnx/tiny-sd15/tokenizer", "transformers"),
    "sdxl_2": ("onnx/tiny-sdxl/tokenizer_2", "transformers"),
    "sdxl_2_openclip": ("onnx/tiny-sdxl/tokenizer_2", "openclip"),
}


def main() -> None:
    from transformers import CLIPTokenizer, CLIPTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "longer than 77" notices are expected here
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizers = {}
    for key, (rel, kind) in TOKENIZERS.items():
        slow = CLIPTokenizer.from_pretrained(ROOT / rel)
        fast = CLIPTokenizerFast.from_pretrained(ROOT / rel)
        pad = slow.pad_token_id
        if kind == "openclip":
            import open_clip.tokenizer as oct

            oc = oct._tokenizer
            encode = oc.encode
            bos, eos = oc.encoder["<start_of_text>"], oc.encoder["<end_of_text>"]
            comma = oc.encoder.get(",</w>")
            pad = 0
        else:
            def encode(t, slow=slow, fast=fast):
                ids = slow(t, truncation=False, add_special_tokens=False)["input_ids"]
                fids = fast(t, truncation=False, add_special_tokens=False)["input_ids"]
                assert ids == fids, f"slow/fast differ on {t!r}"
                return ids
            bos, eos = slow.bos_token_id, slow.eos_token_id
            comma = slow.get_vocab().get(",</w>")
        tokenizers[key] = (rel, encode, bos, eos, pad, comma)

    cases = []
    for name, text in PROMPTS:
        case = {"name": name, "text": text}
        try:
            pieces = parse_attention(text)
        except WeightError as e:
            case["error_weight"] = str(e)
            cases.append(case)
            continue
        case["pieces"] = [{"text": t, "weight": w, "weight_bits": f64_bits(w)} for t, w in pieces]
        case["tokenizers"] = {}
        for key, (rel, encode, bos, eos, pad, comma) in tokenizers.items():
            piece_ids = [[] if is_break(p) else encode(p[0]) for p in pieces]
            chunks = chunk(pieces, piece_ids, bos, eos, pad, comma)
            case["tokenizers"][key] = {
                "dir": rel, "bos": bos, "eos": eos, "pad": pad, "comma": comma,
                "piece_ids": piece_ids,
                "chunks": [{"ids": i, "weights": w} for i, w in chunks],
            }
        cases.append(case)

    embeddings = write_embeddings({c["name"]: c for c in cases})
    doc = {"description": __doc__.strip().splitlines()[0], "chunk_tokens": CHUNK,
           "comma_backtrack": BACKTRACK, "cases": cases, "embeddings": embeddings}
    out = OUT / "cases.json"
    out.write_text(json.dumps(doc, indent=None, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({len(cases)} cases, {len(embeddings)} embedding sets)")


def write_embeddings(cases: dict) -> list[dict]:
    """Raw per-chunk hidden states of the tiny SD1.5 encoder (onnxruntime) and the
    webui-weighted, concatenated result (torch), for EMBEDDING_PROMPTS."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(ROOT / "onnx/tiny-sd15/text_encoder/model.onnx"),
                                   providers=["CPUExecutionProvider"])
    out = []
    for name in EMBEDDING_PROMPTS:
        chunks = cases[name]["tokenizers"]["sd15"]["chunks"]
        raw, weighted = [], []
        for c in chunks:
            ids = np.asarray([c["ids"]], dtype=np.int64)
            z = session.run(["last_hidden_state"], {"input_ids": ids})[0].astype(np.float32)
            z = z + BIAS[: z.shape[-1]]
            raw.append(z[0])
            weighted.append(weight_chunk(torch.from_numpy(z), c["weights"]))
        raw_path, w_path = f"{name}.raw.npy", f"{name}.weighted.npy"
        np.save(OUT / raw_path, np.stack(raw))
        np.save(OUT / w_path, torch.hstack(weighted).numpy())
        out.append({"case": name, "tokenizer": "sd15", "raw": raw_path, "weighted": w_path})
    return out


if __name__ == "__main__":
    main()
