"""Tiny random models of several architecture families (2 layers, hidden size 64, the default model's tokenizer),
for tests/test_architectures.py and tests/test_loss.py."""

from __future__ import annotations

from pathlib import Path

import pytest

TEXT = "arch-text.txt"  # a short training text, in datasets/ of family_home

# model_type -> config keys beyond the shared ones. GPT-2 names its sizes its own way (n_embd, n_layer, n_head).
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = {
    "llama": dict(_DECODER),
    "mistral": dict(_DECODER, sliding_window=None),
    "qwen2": dict(_DECODER),
    "qwen3": dict(_DECODER, head_dim=16),
    "gemma2": dict(_DECODER, head_dim=16),
    "gemma3_text": dict(_DECODER, head_dim=16),
    "phi3": dict(_DECODER),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=512),
}


def family_config(model_type: str, tokenizer, **changes):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                **{**FAMILIES[model_type], **changes})


def build_family_model(model_type: str, tokenizer, seed: int = 0, **changes):
    """A float32 model of the family with random weights (the same for the same seed)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_config(model_type, tokenizer, **changes), dtype=torch.float32)


def save_family_model(model_type: str, tokenizer, folder: Path) -> Path:
    build_family_model(model_type, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tokenizer):
    """Every family saved once: model_type -> folder."""
    root = tmp_path_factory.mktemp("families")
    return {model_type: save_family_model(model_type, tokenizer, root / f"arch-{model_type}")
            for model_type in FAMILIES}


@pytest.fixture
def family_home(home, family_dirs):
    from .conftest import _link_tree

    for model_type, folder in family_dirs.items():
        _link_tree(folder, home / "models" / folder.name)
    general = (home / "datasets" / "general-text.txt").read_text(encoding="utf-8")
    (home / "datasets" / TEXT).write_text(general[:1200], encoding="utf-8")
    return home
