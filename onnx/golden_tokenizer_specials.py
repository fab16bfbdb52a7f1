#!/usr/bin/env python3
"""Write tests/golden/tokenizer/specials.json: token ids of prompts holding special tokens
(the `!` that SD2.x and SDXL's second tokenizer declare as their pad token, and the
start/end tokens written out), as transformers computes them for the fixtures' tokenizers.

transformers turns a tokenizer's special tokens (bos, eos, unk, pad, and the entries of
`added_tokens_decoder`) into added tokens and splits them out of the text before BPE, so
`!` in a prompt becomes id 0 on those tokenizers, not the ordinary `!</w>`. Each folder is
tokenized twice, as Optimum would load it:

* `fast`: CLIPTokenizerFast from the folder as exported (with tokenizer.json);
* `slow`: CLIPTokenizer from a copy holding only vocab.json, merges.txt,
  tokenizer_config.json and special_tokens_map.json (an export without tokenizer.json).

Both with padding="max_length", max_length=77, truncation=True. The output is
deterministic (sorted JSON, no timestamps).

    /work/venv/ref/bin/python onnx/golden_tokenizer_specials.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer, CLIPTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["onnx/tiny-sd15/tokenizer", "onnx/tiny-sd2-v/tokenizer", "onnx/tiny-sdxl/tokenizer",
           "onnx/tiny-sdxl/tokenizer_2"]
SLOW_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
PROMPTS = [
    "a castle on a hill! dramatic!!",
    "!",
    "!!!",
    "hello!world",
    "wow ! such ! spaces",
    "a cat<|endoftext|>a dog",
    "<|startoftext|>start",
    "Excited!? yes!.",
    "",
]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, padding="max_length", max_length=77, truncation=True)["input_ids"]


def main() -> None:
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for rel in FOLDERS:
            src = ROOT / rel
            slow_dir = Path(tmp) / rel.replace("/", "_")
            slow_dir.mkdir()
            for f in SLOW_FILES:
                shutil.copy(src / f, slow_dir / f)
            fast = CLIPTokenizerFast.from_pretrained(src)
            slow = CLIPTokenizer.from_pretrained(slow_dir)
            for text in PROMPTS:
                cases.append({"tokenizer_dir": rel, "text": text, "fast": ids(fast, text),
                              "slow": ids(slow, text)})
    out = ROOT / "tests/golden/tokenizer/specials.json"
    doc = {"description": __doc__.strip().splitlines()[0], "cases": cases}
    out.write_text(json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
