"""Small UI helpers shared by the pages (Streamlit only; all logic lives in trainer/)."""

from __future__ import annotations

import streamlit as st

from trainer.errors import DashboardError
from trainer.home import home_dir
from trainer.models import list_models, load_tokenizer
from trainer.params import DEFAULT_MODEL


@st.cache_resource(show_spinner=False)
def cached_tokenizer(model_name: str, trust_remote_code: bool = False):
    """The tokenizer of a model, loaded once per server (the default model is converted on first use)."""
    return load_tokenizer(model_name, trust_remote_code, progress=lambda message: None)


def get_tokenizer(model_name: str, trust_remote_code: bool = False):
    """Tokenizer with a visible message while the default model is converted the first time."""
    from trainer.models import models_dir

    first_use = model_name == DEFAULT_MODEL and not (models_dir() / DEFAULT_MODEL / "config.json").exists()
    label = ("Converting the embedded default model to a safetensors folder (once, about 30 s)..."
             if first_use else f"Loading the tokenizer of {model_name}...")
    with st.spinner(label):
        return cached_tokenizer(model_name, trust_remote_code)


def model_picker(key: str, default: str | None = None, help: str | None = None) -> str:
    names = list_models()
    default = default if default in names else DEFAULT_MODEL
    return st.selectbox("Base model", names, index=names.index(default), key=key,
                        help=help or "Folders with config.json and GGUF files under models/; "
                                     "the embedded SmolLM2-135M-Instruct is always offered.")


def show_error(exc: DashboardError) -> None:
    st.error(exc.message, icon="⚠️")


def home_caption() -> None:
    st.caption(f"Home folder: `{home_dir()}` (set LORA_DASHBOARD_HOME to use another, e.g. a webui user_data).")


def list_dataset_names(kind: str = "any") -> list[str]:
    """Dataset names under datasets/: "raw" (.txt files and folders of them), "formatted" (.json/.jsonl), "any"."""
    from trainer.home import datasets_dir

    root = datasets_dir()
    if not root.is_dir():
        return []
    names = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        is_raw = path.suffix.lower() == ".txt" or (path.is_dir() and any(path.glob("*.txt")))
        is_formatted = path.suffix.lower() in (".json", ".jsonl")
        if (kind in ("raw", "any") and is_raw) or (kind in ("formatted", "any") and is_formatted):
            names.append(path.name)
    return names


def list_format_names() -> list[str]:
    from trainer.home import formats_dirs

    names = []
    for folder in formats_dirs():
        if folder.is_dir():
            names += [p.stem for p in sorted(folder.glob("*.json"))]
    return list(dict.fromkeys(names))
