"""CLIP tokenizer folders laid out as kohya and the Hugging Face cache hold them (small files of the same kinds)."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.pipeline.clip_tokenizer import TOKENIZER_FILES, TOKENIZER_ID, hub_repo_folder

COMMIT = "32bd64288804d66eefd0ccbe215aa642df71cc41"


def write_tokenizer(folder: Path) -> Path:
    """The four files CLIPTokenizer.from_pretrained reads; the vocabulary is cut short, the shapes are the hub's."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"!": 0, "a</w>": 320, "photo</w>": 1125, "<|startoftext|>": 49406, "<|endoftext|>": 49407}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\ni n\nt h\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "pad_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }), encoding="utf-8")
    assert sorted(p.name for p in folder.iterdir()) == sorted(TOKENIZER_FILES)
    return folder


def write_hub_cache(hub: Path, *, commit: str = COMMIT, tokenizer_id: str = TOKENIZER_ID) -> Path:
    """<hub>/models--openai--clip-vit-large-patch14 (or another tokenizer's repo) as a download leaves it:
    refs/main and the snapshot."""
    repo = hub / hub_repo_folder(tokenizer_id)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return write_tokenizer(repo / "snapshots" / commit)
