#!/usr/bin/env python3
"""Write tests/golden/a1111/schedules.json: AUTOMATIC1111's prompt editing
(`[from:to:when]`), alternation (`[a|b]`) and `AND` splitting, as webui itself computes
them, for diffusiond's `prompt_syntax::schedule` module to be checked against.

Usage:
    python onnx/golden_a1111_schedules.py --webui /tmp/webui \
        [--out tests/golden/a1111/schedules.json]

`--webui` is a checkout (or any folder) of AUTOMATIC1111/stable-diffusion-webui at
v1.10.1 (commit 82a973c) holding `modules/prompt_parser.py`. That file is imported from
there, never copied (it is AGPL-licensed); it needs lark==1.1.2 (the version webui pins)
and imports torch, for which a stub module is put in its place when torch is missing
(only the parsing functions are called).

For every prompt of the corpus and a step count, the JSON records:
  * `parts`: `get_multicond_prompt_list([prompt])` for that one prompt: the prompt split
    at `\\bAND\\b`, each part's text and weight (every part, in order, duplicates kept);
  * `schedules`: for each part, `get_learned_conditioning_prompt_schedules([text],
    steps)` (no hires steps, new scheduling): `[[end_at_step, text], ...]`;
  * `error`: instead of `schedules`, the exception type's name where webui raises one.

Lark's Earley parser resolves an ambiguous parse by sorting the alternatives of each node
and, among equals, takes the one a Python set yields first; sets of those nodes iterate in
an order that depends on string hashing, so for some inputs (unbalanced brackets around an
edit) webui's result changes from one process to the next. Each case is therefore
computed in several processes with different PYTHONHASHSEED values; a part whose schedule
is not the same in all of them is recorded as `null` (diffusiond must refuse it: there is
no single answer to reproduce).

Corpus: webui's doctests, hand-written prompts of the kinds users paste (`group`
"handwritten"), and seeded random strings over the syntax's characters (`group`
"random").
"""

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import types

HASH_SEEDS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 42, 1234]

DOCTESTS = [
    "test",
    "a [b:3]",
    "a [b: 3]",
    "a [[[b]]:2]",
    "[(a:2):3]",
    "a [b : c : 1] d",
    "a[b:[c:d:2]:1]e",
    "a [unbalanced",
    "a [b:.5] c",
    "a [{b|d{:.5] c",
    "((a][:b:c [d:3]",
    "[a|(b:1.1)]",
    "[fe|]male",
    "[fe|||]male",
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
    "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]",
]

HANDWRITTEN = [
    "a photo of a [cat:dog:0.5]",
    "a photo of a [cat:dog:10]",
    "a [cat::0.3] sitting on a bench",
    "a bench [:with a dog:0.3]",
    "a [cat: dog :4 ] in the garden",
    "[cat:dog: 0.25 ], oil painting",
    "portrait of a [man:[woman:child:0.6]:0.3]",
    "a [[red:blue:5]:green:10] car",
    "a [red|blue] car",
    "a [red|blue|green] car",
    "[a|b|c]",
    "[fe|]male knight",
    "[|fe]male knight",
    "a [cat|dog|] on a sofa",
    "a [[cat|dog]:bird:0.5] in a tree",
    "a [cat:[dog|wolf]:0.5] in the snow",
    "[[a|b]|c]",
    "[a|[b|c]] d",
    "a (cat:1.2) and a [dog:fox:0.4]",
    "((masterpiece)), best quality, [cat:dog:0.5]",
    "a [(red:1.3)|blue] dress",
    "[a (cat:1.2)|a (dog:0.8)]",
    "(a [cat:dog:0.5] portrait:1.1)",
    "[[small]] house, [large:tiny:0.2]",
    "a [cat] and a [[dog]]",
    "(masterpiece:1.2), (best quality), [lowres]",
    "\\(escaped\\) parens and \\[brackets\\]",
    "a \\[cat:dog:0.5\\] literally",
    "time 12\\:30 [day:night:0.5]",
    "an [escaped \\| bar|plain] word",
    "a cat BREAK a dog [red:blue:0.5]",
    "a cat AND a dog",
    "a cat AND a dog :1.2",
    "a cat :0.8 AND a dog:1.5",
    "a cat AND a dog :-0.5",
    "a castle AND blurry:-1",
    "a cat :1.2",
    "a cat:1.2",
    "a cat : +.5",
    "a cat :0.",
    "a cat :-1",
    "a cat:1e1",
    "a cat :3 ]",
    "a cat ANDROID",
    "a cat AND",
    "AND a cat",
    "a cat AND AND a dog",
    "a cat\nAND a dog",
    "a cat and a dog",
    "a [cat:dog:0.5] AND a [red|blue] ball:0.7",
    "line one\nline two [a:b:0.5]\n",
    "[cat\n:dog\n:\n3\n]",
    "a [cat:dog:1e1]",
    "a [cat:dog:-1]",
    "a [cat:dog:+.5]",
    "a [cat:dog:0.]",
    "a [cat:dog:3 ]",
    "a [cat:dog:0]",
    "a [cat:dog:1]",
    "a [cat:dog:1.0]",
    "a [cat:dog:25]",
    "a [cat:dog:1.5]",
    "a [cat:dog:.1]",
    "a [cat:dog]",
    "a [cat:dog:x]",
    "a [cat:dog:0.5",
    "a cat:dog:0.5]",
    "a [cat:dog:0.5]]",
    "a [[cat:dog:0.5]",
    "a (cat:dog:0.5) b",
    "a (cat [dog:fox:3]",
    "a cat) [dog:fox:3]",
    "a (cat:1.2",
    "a cat]",
    "(((a)))",
    "[[[a]]]",
    "a [b] (c) [d:e:2] (f:0.5)",
    "a | b",
    "a [b|c",
    "[a:b:2] [c:d:4] [e|f]",
    "score_9, [watercolor:photo:0.4], (1girl:1.1), [blonde|red] hair",
    "",
    "   ",
    "a\\",
    "[a:b:2]\\",
    "a ( [b:c:2] )",
    "a [b:c:d:2]",
    "[[a::3]::5]",
    "[:[a:3]:5]",
    "a [cat:dog:1e400]",
    "a [cat:dog:1.0e308]",
    "a [cat:dog:1e-400]",
    "a [cat:dog:99999999999999999999]",
    "a cat AND\u3000a dog",
    "\u00fcber AND stra\u00dfe :1.5",
    "a\u00a0AND b",
    "\u732b AND \u72ac:0.5",
    "a cat\x1c:1.5",
    "[a:\u2003 3\u2003]",
    "caf\u00e9 [latte|mocha]",
    "[a:b:3]]",
    "(a [b:c:3]",
    "a) [b|c]",
    ") " + "[a|b] (x:1.1), [c:d:0.5] " * 12,
    "[a|b] (x:1.1), [c:d:0.5] " * 12 + "(",
    "masterpiece), best quality, [sketch:photo:0.3], (detailed:1.2",
]

# Single characters of the syntax, and a few whole constructs so that edits and
# alternations also meet stray brackets.
ALPHABET = ["a", "b", "c", "(", ")", "[", "]", ":", "|", "0.5", "3", " AND ", "AND", "\\",
            ",", " ", "\n", " BREAK ", "1", ".", "-", "e", "[", "]", ":", " ", "x y",
            "[a:b:3]", "[x|y]", "[c:0.5]", "(d:1.2)", "[:e:1]"]


def random_corpus(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randrange(0, 31)
        out.append("".join(rng.choice(ALPHABET) for _ in range(length)))
    return out


def load_prompt_parser(webui):
    if "torch" not in sys.modules:
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.modules["torch"] = types.ModuleType("torch")
    path = os.path.join(webui, "modules", "prompt_parser.py")
    spec = importlib.util.spec_from_file_location("webui_prompt_parser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate(pp, prompt, steps):
    """webui's answer for one prompt: parts and per-part schedules, or the error."""
    try:
        res_indexes, flat, _ = pp.get_multicond_prompt_list([prompt])
        parts = [{"text": flat[i], "weight": w} for i, w in res_indexes[0]]
        schedules = [pp.get_learned_conditioning_prompt_schedules([p["text"]], steps)[0]
                     for p in parts]
    except Exception as e:  # webui raises: record the type
        return {"error": type(e).__name__}
    return {"parts": parts, "schedules": schedules}


def worker(webui, cases):
    """Evaluates every (prompt, steps) in this process (one hash seed)."""
    pp = load_prompt_parser(webui)
    return [evaluate(pp, p, s) for p, s in cases]


def build_cases():
    rng = random.Random(1111)
    step_choices = [1, 4, 10, 20]
    cases = []
    for p in DOCTESTS:
        cases.append(("doctest", p, 10))
    for i, p in enumerate(HANDWRITTEN):
        cases.append(("handwritten", p, [10, 20, 4, 1][i % 4]))
    for p in random_corpus(1500, 20240601):
        cases.append(("random", p, rng.choice(step_choices)))
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--webui", required=True, help="stable-diffusion-webui v1.10.1 folder")
    ap.add_argument("--out", default="tests/golden/a1111/schedules.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    cases = build_cases()
    if args.worker:
        json.dump(worker(args.webui, [(p, s) for _, p, s in cases]), sys.stdout)
        return

    import lark
    if lark.__version__ != "1.1.2":
        sys.exit(f"lark {lark.__version__} found; webui 1.10.1 pins lark==1.1.2")

    runs = []
    for seed in HASH_SEEDS:
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
        out = subprocess.run([sys.executable, __file__, "--webui", args.webui, "--worker"],
                             env=env, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out))

    records = []
    nondeterministic = 0
    for i, (group, prompt, steps) in enumerate(cases):
        first = runs[0][i]
        rec = {"group": group, "prompt": prompt, "steps": steps}
        if "error" in first:
            if any(r[i] != first for r in runs):
                sys.exit(f"webui raises only sometimes for {prompt!r}")
            rec["error"] = first["error"]
        else:
            if any(r[i].get("parts") != first["parts"] for r in runs):
                sys.exit(f"AND split differs between runs for {prompt!r}")
            rec["parts"] = first["parts"]
            schedules = []
            for j, sched in enumerate(first["schedules"]):
                if all(r[i]["schedules"][j] == sched for r in runs):
                    schedules.append(sched)
                else:
                    schedules.append(None)
                    nondeterministic += 1
            rec["schedules"] = schedules
        records.append(rec)

    doc = {
        "description": "AUTOMATIC1111 prompt editing, alternation and AND splitting: "
                       "get_multicond_prompt_list and get_learned_conditioning_prompt_schedules "
                       "(hires_steps None, use_old_scheduling False) of webui's "
                       "modules/prompt_parser.py, per prompt and step count; written by "
                       "onnx/golden_a1111_schedules.py. A schedule of null: webui's result "
                       f"differed between processes (PYTHONHASHSEED in {HASH_SEEDS}).",
        "webui": "1.10.1 (82a973c)",
        "lark": lark.__version__,
        "cases": records,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("{\n")
        for key in ("description", "webui", "lark"):
            f.write(f"  {json.dumps(key)}: {json.dumps(doc[key], ensure_ascii=False)},\n")
        f.write('  "cases": [\n')
        for n, rec in enumerate(records):
            sep = "," if n + 1 < len(records) else ""
            f.write("    " + json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + sep + "\n")
        f.write("  ]\n}\n")
    print(f"{args.out}: {len(records)} cases, {nondeterministic} nondeterministic schedules",
          file=sys.stderr)


if __name__ == "__main__":
    main()
