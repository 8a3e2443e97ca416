"""Shared fixtures: the real default model (converted once), a tiny random model with the real tokenizer,
and a temporary home folder per test so tests never touch the checkout's data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from trainer.home import CODE_ROOT, HOME_ENV
from trainer.params import DEFAULT_MODEL

TINY_MODEL = "tiny-llama"


def _link_tree(source: Path, target: Path) -> None:
    """Copy a model folder by hard links: instant, and the 540 MB of weights are not duplicated."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            if (target / item.name).exists():  # never write through a hard link into the shared model's file
                (target / item.name).unlink()
            try:
                os.link(item, target / item.name)
            except OSError:
                shutil.copy2(item, target / item.name)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model converted into the checkout's models/ (once; later runs reuse it)."""
    from trainer.models import model_path

    saved = os.environ.pop(HOME_ENV, None)
    try:
        return model_path(DEFAULT_MODEL)
    finally:
        if saved is not None:
            os.environ[HOME_ENV] = saved


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer, hidden-size-64 Llama with random weights and the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("models") / TINY_MODEL
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch, default_model_dir, tiny_model_dir) -> Path:
    """A fresh home folder: both models, the shipped demo datasets, and empty loras/."""
    root = tmp_path / "home"
    _link_tree(default_model_dir, root / "models" / DEFAULT_MODEL)
    _link_tree(tiny_model_dir, root / "models" / TINY_MODEL)
    shutil.copytree(CODE_ROOT / "datasets", root / "datasets")
    (root / "loras").mkdir()
    monkeypatch.setenv(HOME_ENV, str(root))
    return root
