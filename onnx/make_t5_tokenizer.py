#!/usr/bin/env python3
"""Write onnx/t5-tokenizer/: a small T5 tokenizer (SentencePiece Unigram) laid out as the
`tokenizer_3/` of a diffusers SD3 export or the `tokenizer_2/` of a FLUX export.

The SentencePiece model is trained here, offline, on a built-in corpus (seeded
prompt-like lines, a prose paragraph, invented place names, and accented Latin, Greek,
Cyrillic, CJK and fullwidth lines), as a 1000-piece Unigram model with T5's special
pieces: `<pad>` = 0, `</s>` = 1, `<unk>` = 2, no `<s>`, no byte fallback (characters
outside the corpus, such as emoji, become `<unk>`), and the `nmt_nfkc` normalization
rule (the Precompiled normalizer T5's own `spiece.model` carries). It is then wrapped
like the real files:

* `T5Tokenizer` (slow) from `spiece.model` with `extra_ids=100`, so the vocabulary ends
  with the 100 sentinels `<extra_id_99>` ... `<extra_id_0>` (ids 1000..1099), as in T5;
* `legacy=True` and `add_prefix_space=True`, the values of SD3's and FLUX's tokenizer
  configs (`legacy` defaults to None in transformers 4.57.6, which `T5Tokenizer`
  treats as True with a warning; `T5TokenizerFast` has no parameter of its own and
  hands it to the converter). With both, transformers' converter writes a Metaspace
  pre-tokenizer with `prepend_scheme: "always"`;
* `T5TokenizerFast(from_slow=True)` converts it, and `save_pretrained` writes
  tokenizer.json, tokenizer_config.json, special_tokens_map.json and spiece.model
  into a scratch folder (the complete folder, as an SD3/FLUX export has it).

Committed in onnx/t5-tokenizer/: tokenizer.json (padding and truncation cleared,
compact), tokenizer_config.json without `add_prefix_space`, special_tokens_map.json.
spiece.model (~250 KB) is left out to keep the fixture small; without it,
`add_prefix_space` would make transformers convert spiece.model again at load, so that
key is dropped and transformers loads tokenizer.json as is. The goldens in
tests/golden/tokenizer/t5_cases.json come from the complete folder
(`T5TokenizerFast.from_pretrained`, called as diffusers' SD3 and FLUX pipelines call it),
and every case is checked to give the same ids from the committed folder. The slow
sentencepiece tokenizer's ids are recorded where they differ from the fast one's.

The output is deterministic: a seeded corpus, one trainer thread, no input shuffling,
and sorted JSON.

    /work/venv/ref/bin/python onnx/make_t5_tokenizer.py
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "onnx/t5-tokenizer"
GOLDEN = ROOT / "tests/golden/tokenizer/t5_cases.json"
VOCAB_SIZE = 1000
EXTRA_IDS = 100
FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

SUBJECTS = [
    "a castle", "an old lighthouse", "a red fox", "a small robot", "a cat", "a dog",
    "a portrait of a woman", "a city street", "a mountain lake", "a spaceship",
    "a bowl of fruit", "a dragon", "a wizard", "a forest cabin", "a sailing boat",
    "an astronaut", "a vintage car", "a bustling market", "a cup of coffee", "a garden",
]
PLACES = [
    "on a hill", "at sunset", "in the rain", "under the stars", "by the sea",
    "in a snowy forest", "in a neon city", "on the moon", "in a misty valley",
    "inside a library", "at dawn", "in the desert", "near a waterfall",
]
STYLES = [
    "highly detailed", "digital painting", "oil on canvas", "photorealistic",
    "cinematic lighting", "watercolor", "trending on artstation", "8k resolution",
    "sharp focus", "soft shadows", "volumetric fog", "studio photograph", "concept art",
    "wide angle lens", "35mm film", "golden hour", "dramatic composition", "intricate",
]
PROSE = """
Once upon a time there was a painter who lived beside a quiet harbour. Every morning she
walked along the pier, watching fishermen mend their nets while gulls circled above the
boats. Her studio smelled of turpentine, linseed oil and fresh bread from the bakery next
door. She painted landscapes, portraits, still lifes and abstract compositions; sometimes
she sketched strangers in the market square, capturing their gestures with quick charcoal
lines. Critics praised the luminous colours, the bold brushwork and the subtle gradients
of light across her canvases. In winter the northern wind howled through narrow streets,
snow piled against the windows, and she experimented with pigments: ultramarine, cadmium
yellow, burnt sienna, viridian, crimson, ochre, cobalt, emerald and titanium white.
Engineers design bridges, towers, engines, computers and satellites. Scientists measure
temperature, pressure, velocity, frequency and wavelength; they publish papers, review
experiments, calculate probabilities and build telescopes to observe distant galaxies,
nebulae, comets, planets and asteroids. Musicians compose symphonies, rehearse melodies,
tune violins, pianos, guitars, trumpets and drums, then perform concerts for enthusiastic
audiences. Gardeners plant tulips, roses, sunflowers, orchids, lavender, ferns and oak
trees; they water seedlings, prune branches, harvest apples, pears, cherries, plums,
grapes, tomatoes, carrots, potatoes, onions and pumpkins. Children play football, chess,
hide and seek; they read comics, draw dinosaurs, build sandcastles, climb ladders and
swim in lakes. Travellers board trains, ferries, airplanes and buses; they carry maps,
cameras, umbrellas, backpacks, passports, tickets and souvenirs. Architecture ranges from
gothic cathedrals with stained glass and flying buttresses to minimalist concrete houses,
futuristic skyscrapers of steel and glass, wooden temples, stone monasteries, brick
factories, marble palaces and humble thatched cottages. Weather changes quickly: thunder,
lightning, hail, drizzle, fog, breeze, storm, hurricane, rainbow, sunshine and twilight.
Animals include elephants, giraffes, tigers, lions, wolves, bears, owls, eagles, dolphins,
whales, octopuses, butterflies, beetles, horses, rabbits, squirrels, penguins and turtles.
Materials: velvet, silk, leather, wool, copper, bronze, silver, gold, porcelain, crystal,
obsidian, granite, sandstone, bamboo, paper, plastic, rubber, ceramic and chrome.
"""
EXTRA_LINES = [
    "Café au lait, crème brûlée and a piñata: naïve façade, São Paulo, Zürich, Ångström.",
    "Ελληνικά γράμματα: άλφα, βήτα, γάμμα. Русский текст: кошка на крыше.",
    "日本語のテキスト：山の上の城、夕焼け。中文：一只猫坐在窗台上。한국어: 고양이.",
    "Numbers 0 1 2 3 4 5 6 7 8 9, 1024x768, 3.14159, 42%, $19.99, #1, v2.0, 2026-12-07.",
    "Punctuation: (brackets) [square] {curly} <angle> \"quotes\" 'single' - dash -- em; colon: done!",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! the quick brown fox?",
    "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ and ligatures ﬁ ﬂ, superscript x² and ½ fractions.",
]


def corpus() -> list[str]:
    """The training sentences: seeded prompt-like lines and the fixed unicode lines."""
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        styles = ", ".join(rng.sample(STYLES, rng.randint(1, 4)))
        line = f"{rng.choice(SUBJECTS)} {rng.choice(PLACES)}, {styles}"
        if rng.random() < 0.3:
            line = line.capitalize() + "."
        lines.append(line)
    # Invented place names from syllables: more distinct substrings, so the Unigram
    # trainer has enough candidates for the vocabulary size.
    syllables = ["ka", "lo", "mir", "an", "tes", "vu", "ro", "shi", "del", "qua", "bren", "ix",
                 "or", "fen", "tal", "ny", "gor", "el", "zu", "pra", "ste", "wim", "hal", "dor"]
    names = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(1200)]
    for i in range(0, len(names), 6):
        lines.append("the towns of " + ", ".join(names[i:i + 6]) + " lie far to the north")
    sentences = [x.strip().replace("\n", " ") for x in PROSE.split(".") if x.strip()]
    return lines + sentences * 10 + EXTRA_LINES * 20


def train_spiece() -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="unigram",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,
        shuffle_input_sentence=False,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )
    return model.getvalue()


def write_fixture(full: Path) -> None:
    """Train, convert and save the complete folder into `full` (with spiece.model), then
    copy the committed subset into OUT."""
    from transformers import T5Tokenizer, T5TokenizerFast

    full.mkdir(parents=True)
    sp_path = full / "spiece.model"
    sp_path.write_bytes(train_spiece())
    kwargs = dict(extra_ids=EXTRA_IDS, legacy=True, add_prefix_space=True, model_max_length=512,
                  clean_up_tokenization_spaces=True)
    slow = T5Tokenizer(str(sp_path), **kwargs)
    fast = T5TokenizerFast(vocab_file=str(sp_path), from_slow=True, **kwargs)
    fast.save_pretrained(full)
    probe = "a castle on a hill, highly detailed"
    assert slow(probe).input_ids == fast(probe).input_ids, (slow(probe), fast(probe))

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for name in FILES:
        doc = json.loads((full / name).read_text(encoding="utf-8"))
        if name == "tokenizer.json":
            # Fixed-length padding/truncation are call-time options.
            doc["truncation"] = None
            doc["padding"] = None
            # Compact: the Precompiled charsmap and the vocabulary dominate the size.
            text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        else:
            if name == "tokenizer_config.json":
                # Without spiece.model this key would make transformers convert again
                # (and fail); the ids are the same either way (checked in write_goldens).
                del doc["add_prefix_space"]
            text = json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        (OUT / name).write_text(text, encoding="utf-8")


# Prompts for the goldens: (name, text). Long ones are built below.
BASE_PROMPTS = [
    ("ascii", "a castle on a hill at sunset, highly detailed, digital painting"),
    ("capitalized", "A Red Fox In The Rain. CINEMATIC LIGHTING!"),
    ("accents", "Café au lait, crème brûlée, naïve façade in Zürich"),
    ("decomposed_accents", "Cafe\u0301 cre\u0300me"),
    ("greek_cyrillic", "άλφα βήτα, кошка на крыше"),
    ("cjk", "日本語のテキスト：山の上の城、夕焼け。"),
    ("chinese", "一只猫坐在窗台上"),
    ("korean", "고양이"),
    ("emoji", "a cat 🐱 with a hat 🎩✨"),
    ("emoji_only", "🐱"),
    ("unknown_script", "ᚠᚢᚦ ᚨᚱᚲ"),
    ("fullwidth", "Ｆｕｌｌｗｉｄｔｈ ﬁ ﬂ x² ½"),
    ("space_runs", "a    cat     on   a  mat"),
    ("tabs_newlines", "a cat\ton a mat\nwith a hat\r\nand\n\nmore"),
    ("leading_trailing", "   a cat on a mat   "),
    ("single_space", " "),
    ("only_whitespace", " \t\n "),
    ("numbers_punct", "1024x768, 3.14159, 42%, $19.99, #1, v2.0 (2026-12-07)!?"),
    ("brackets", "(masterpiece:1.2), [blurry], {curly} <angle> \"quoted\" 'single'"),
    ("empty", ""),
    ("literal_eos", "a cat</s>a dog"),
    ("literal_pad", "<pad> a cat <pad>"),
    ("literal_unk", "a <unk> here"),
    ("literal_specials_spaced", "a cat </s> </s> a dog"),
    ("sentinel", "a <extra_id_0> on a <extra_id_99> hill"),
    ("zero_width", "a\u200bcat\u00a0on\u2003a mat"),
    ("control_chars", "a\x00cat\x07on a mat"),
]


def long_prompts() -> list[tuple[str, str]]:
    rng = random.Random(1)
    out = []
    for name, n_words in [("long_300_words", 300), ("long_700_words", 700)]:
        words = []
        while len(words) < n_words:
            words += f"{rng.choice(SUBJECTS)} {rng.choice(PLACES)}, {rng.choice(STYLES)},".split()
        out.append((name, " ".join(words[:n_words])))
    # "a" is one token ("▁a"): n words and `</s>` are n + 1 tokens, on each side of L.
    for n in [76, 77, 255, 256, 511, 512]:
        out.append((f"a_times_{n}", " ".join(["a"] * n)))
    # Mixed known/unknown text that crosses 512 tokens with unicode at the cut.
    out.append(("long_unicode", "Café 日本語 🐱 kошка, " * 120))
    return out


def write_goldens(full: Path) -> None:
    import sentencepiece
    import tokenizers
    import transformers
    from transformers import T5Tokenizer, T5TokenizerFast

    # The complete folder as diffusers loads an SD3/FLUX export: tokenizer_config.json
    # holds add_prefix_space, so transformers converts spiece.model again.
    tok = T5TokenizerFast.from_pretrained(full)
    # The committed folder (tokenizer.json as saved, no spiece.model): must agree.
    committed = T5TokenizerFast.from_pretrained(OUT)
    # The sentencepiece tokenizer itself, for the record only (the pipelines use the fast
    # one; where the two differ the golden is the fast tokenizer's).
    slow = T5Tokenizer.from_pretrained(full)
    prompts = BASE_PROMPTS + long_prompts()
    cases = []
    for name, text in prompts:
        raw = tok(text, padding="longest", add_special_tokens=True).input_ids
        assert raw == committed(text).input_ids, name
        lengths = [256, 512] + ([77] if name in ("ascii", "long_300_words", "a_times_76", "a_times_77") else [])
        padded = {}
        for length in lengths:
            # As diffusers' `_get_t5_prompt_embeds` calls it.
            enc = tok(text, padding="max_length", max_length=length, truncation=True,
                      add_special_tokens=True, return_length=False)
            removed = None
            if len(raw) >= length and raw != enc.input_ids:
                removed = tok.batch_decode([raw[length - 1:-1]])[0]
            other = committed(text, padding="max_length", max_length=length, truncation=True)
            assert other.input_ids == enc.input_ids, (name, length)
            padded[str(length)] = {"input_ids": enc.input_ids,
                                   "attention_mask": enc.attention_mask,
                                   "removed_text": removed}
        slow_ids = slow(text).input_ids
        cases.append({"name": name, "text": text, "untruncated_ids": raw,
                      "slow_tokenizer_ids": None if slow_ids == raw else slow_ids,
                      "tokens": tok.convert_ids_to_tokens(raw), "padded": padded})

    def sha(name: str) -> str:
        return hashlib.sha256((OUT / name).read_bytes()).hexdigest()

    doc = {
        "description": "T5TokenizerFast ids for onnx/t5-tokenizer (written by onnx/make_t5_tokenizer.py)",
        "call": "tokenizer(text, padding='max_length', max_length=L, truncation=True, add_special_tokens=True)",
        "removed_text": "batch_decode(untruncated_ids[L-1:-1]) when the prompt was cut, as diffusers logs it",
        "tokenizer_dir": "onnx/t5-tokenizer",
        "pad_id": tok.pad_token_id,
        "eos_id": tok.eos_token_id,
        "unk_id": tok.unk_token_id,
        "vocab_size": len(tok),
        "sha256": {name: sha(name) for name in FILES},
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "sentencepiece": sentencepiece.__version__},
        "slow_tokenizer_disagrees": [c["name"] for c in cases if c["slow_tokenizer_ids"]],
        "cases": cases,
    }
    # One case a line (the padded id lists make an indented file several times larger).
    head = {k: v for k, v in doc.items() if k != "cases"}
    lines = json.dumps(head, indent=1, sort_keys=True, ensure_ascii=False)[:-2]
    body = ",\n".join(json.dumps(c, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                      for c in cases)
    GOLDEN.write_text(lines + ',\n "cases": [\n' + body + "\n ]\n}\n", encoding="utf-8")
    print(f"wrote {OUT} and {GOLDEN} ({len(cases)} cases)")


def main() -> None:
    with tempfile.TemporaryDirectory() as td:
        full = Path(td, "full")
        write_fixture(full)
        write_goldens(full)


if __name__ == "__main__":
    main()
