"""Shared helpers for building the committed tiny fixtures and their Python references.

Everything here is deterministic: fixed seeds, sorted JSON, no timestamps and
no absolute paths in the written files. numpy and onnxruntime are imported inside
the functions that need them, so importing this module does not load them (the
reference scripts import _env before either).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> unicode table (same order as openai/CLIP)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_bpe_path() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def build_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Rebuild OpenAI CLIP's 49408-token vocab and 48894 merges from open_clip's BPE file."""
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # == lines[1:48895]
    assert len(merges) == 48894, len(merges)
    vocab_list = list(bytes_to_unicode().values())
    vocab_list = vocab_list + [v + "</w>" for v in vocab_list]
    for m in merges:
        vocab_list.append("".join(m.split(" ")))
    vocab_list.extend([BOS, EOS])
    assert len(vocab_list) == 49408
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    assert len(vocab) == 49408, "duplicate tokens"
    assert vocab[BOS] == 49406 and vocab[EOS] == 49407
    return vocab, merges


def _dump_json(obj, path: Path, indent=2, sort_keys=False):
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=sort_keys) + "\n", encoding="utf-8")


def write_clip_tokenizer(out: Path, pad_token: str = EOS) -> None:
    """Write vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json.

    pad_token: "<|endoftext|>" (SD1.x, SDXL tokenizer) or "!" (SD2.x, SDXL tokenizer_2, id 0).
    """
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    # Same layout as the Hugging Face openai/clip-vit-large-patch14 files.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    def special(tok):
        return {"content": tok, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special_map = {
        "bos_token": special(BOS),
        "eos_token": special(EOS),
        "pad_token": pad_token if pad_token != EOS else special(EOS),
        "unk_token": special(EOS),
    }
    _dump_json(special_map, out / "special_tokens_map.json")
    tok_config = {
        "add_prefix_space": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    _dump_json(tok_config, out / "tokenizer_config.json")

    # tokenizer.json: converted from the slow files by transformers, saved in a scratch dir
    # (save_pretrained also rewrites the config files; we keep ours).
    slow = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token=pad_token)
    fast = CLIPTokenizerFast(
        vocab_file=str(out / "vocab.json"),
        merges_file=str(out / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )
    with tempfile.TemporaryDirectory() as td:
        fast.save_pretrained(td)
        tj = json.loads(Path(td, "tokenizer.json").read_text(encoding="utf-8"))
    # Fixed-length padding/truncation are call-time options; keep the file neutral.
    tj["truncation"] = None
    tj["padding"] = None
    # Compact JSON (same content as the pretty file transformers writes; ~40% smaller on disk).
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    # sanity: both implementations load from the folder and agree on a simple prompt
    a = CLIPTokenizer.from_pretrained(str(out))("a photo of a cat").input_ids
    b = CLIPTokenizerFast.from_pretrained(str(out))("a photo of a cat").input_ids
    assert a == b == slow("a photo of a cat").input_ids, (a, b)


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def deterministic_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
    )
    return env


def copy_tree_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_file():
            shutil.copyfile(p, dst / p.name)


def sha256(p: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(p.read_bytes()).hexdigest()


def select_cases(plan: list[dict], only: list[str] | None) -> list[dict]:
    """The cases of plan whose id is in only (all of them when only is empty or None); an id that no
    case has stops the script, naming the known ids."""
    if only:
        unknown = set(only) - {c["id"] for c in plan}
        if unknown:
            raise SystemExit(f"unknown case ids {sorted(unknown)}; known: {[c['id'] for c in plan]}")
        plan = [c for c in plan if c["id"] in only]
    return plan


# ---------------------------------------------------------------------------------------------
# Reference pipelines (make_references.py, make_edit_references.py, make_transformer_references.py
# and the scripts built on them)
# ---------------------------------------------------------------------------------------------

# How every reference pipeline's ONNX Runtime sessions are set up (load_ort_pipeline); the
# manifests record this dict as their "session_options".
SESSION_OPTIONS = {
    "provider": "CPUExecutionProvider",
    "intra_op_num_threads": 1,
    "inter_op_num_threads": 1,
    "execution_mode": "ORT_SEQUENTIAL",
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "use_io_binding": False,
    "use_deterministic_compute": True,
}


def load_ort_pipeline(cls, model_dir: Path):
    """cls.from_pretrained(model_dir) for an Optimum ORT pipeline class, with SESSION_OPTIONS: one
    intra/inter-op thread, sequential, every graph optimization, no IO binding, local files only; the
    progress bar off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = SESSION_OPTIONS["intra_op_num_threads"]
    so.inter_op_num_threads = SESSION_OPTIONS["inter_op_num_threads"]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.use_deterministic_compute", "1")  # no-op on CPU; recorded
    pipe = cls.from_pretrained(
        str(model_dir),
        provider=SESSION_OPTIONS["provider"],
        session_options=so,
        use_io_binding=False,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Recorder:
    """Wraps an ORT session's run() to record what the pipeline fed it (calls: one dict of numpy copies
    per call) and, with keep_outputs, what the session returned (outputs: one list of copies per call).
    restore() puts the session's own run() back."""

    def __init__(self, session, keep_outputs: bool = True):
        self.session = session
        self.orig = session.run
        self.keep_outputs = keep_outputs
        self.calls = []
        self.outputs = []
        session.run = self.run

    def run(self, output_names, feeds, *a, **kw):
        import numpy as np

        self.calls.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        out = self.orig(output_names, feeds, *a, **kw)
        if self.keep_outputs:
            self.outputs.append([np.array(o, copy=True) for o in out])
        return out

    def restore(self):
        self.session.run = self.orig


def save_images(out_dir: Path, images, pils, stem: str = "image", rel: str | None = None):
    """For each k: out_dir/{stem}{k}.npy (images[k] as float32) and out_dir/{stem}{k}.png (pils[k], the
    pipeline's numpy_to_pil of images). Returns (npy paths, png paths) as "rel/NAME" (rel: out_dir.name)."""
    import numpy as np

    rel = out_dir.name if rel is None else rel
    npys, pngs = [], []
    for k, pil in enumerate(pils):
        np.save(out_dir / f"{stem}{k}.npy", images[k].astype(np.float32))
        pil.save(out_dir / f"{stem}{k}.png")
        npys.append(f"{rel}/{stem}{k}.npy")
        pngs.append(f"{rel}/{stem}{k}.png")
    return npys, pngs
