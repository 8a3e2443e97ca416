"""Small UI helpers shared by the pages (Streamlit only; all logic lives in trainer/).

Three things are done here once for every page:
- `app_pages`: the pages app.py registers, so a page switches to another by its page object;
- `keep_widget_values` / `set_widget_values`: the one rule by which a widget keeps its value while another
  page is shown and across a reload (the form file), and by which a script changes a widget's value;
- `parameter_widget`: every training parameter drawn from its metadata in trainer/params.py (label, help,
  choices, number format), so a field looks and reads the same on the Data and the Train page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from trainer.chattemplates import instruction_template_names
from trainer.datafiles import dataset_names, format_names
from trainer.errors import DashboardError
from trainer.formstate import changed, read_form, restored, save_form
from trainer.home import home_dir
from trainer.models import list_models, load_tokenizer
from trainer.params import DEFAULT_MODEL, FIELDS

VIEWS = Path(__file__).resolve().parent
KEPT = "kept_widget_values"  # a plain session-state dict: Streamlit never cleans it up
SENT_TO_TRAIN = "sent_to_train"  # options the Data page hands to the Train form
DATA_OPTIONS = "data_options"  # the Data page's last options that previewed cleanly
SAVED_FORM = "saved_form_values"  # what this session knows the form file holds
# Streamlit keeps a widget's value while another page is shown (and a run that does not draw it) only when asked;
# every widget `keep_widget_values` keeps is drawn with this.
KEEP_WHILE_HIDDEN = "session"
FLASH = "action_outcomes"  # slot -> (kind, text): an action's outcome, shown once
OPTIONAL_CHOICES = {"instruction templates": "(the model's own)"}  # pickers whose empty value means something
CHOICE_SOURCES = {"models": list_models, "raw datasets": lambda: dataset_names("raw"),
                  "formatted datasets": lambda: dataset_names("formatted"), "datasets": dataset_names,
                  "formats": format_names, "instruction templates": instruction_template_names}


# ---- pages ---------------------------------------------------------------------------------------
def app_pages() -> dict[str, st.Page]:
    """The app's pages by name; app.py registers them with st.navigation (the first is the default)."""
    return {
        "data": st.Page(VIEWS / "data.py", title="Data", icon="📄", url_path="data", default=True),
        "train": st.Page(VIEWS / "train.py", title="Train", icon="🏋️", url_path="train"),
        "evaluate": st.Page(VIEWS / "evaluate.py", title="Evaluate", icon="📈", url_path="evaluate"),
    }


def send_to_train(options: dict[str, Any]) -> None:
    """Hand these parameters to the Train form (it applies them on its next run) and show the Train page."""
    st.session_state[SENT_TO_TRAIN] = dict(options)
    st.switch_page(app_pages()["train"])


def take_sent_options() -> dict[str, Any] | None:
    """The parameters the Data page sent, once."""
    return st.session_state.pop(SENT_TO_TRAIN, None)


def offer_to_train(options: dict[str, Any]) -> None:
    """Keep the Data page's options that previewed cleanly: the Train form starts from them, and its
    "Use the Data page's settings" puts them in."""
    st.session_state[DATA_OPTIONS] = dict(options)


def offered_options() -> dict[str, Any] | None:
    return st.session_state.get(DATA_OPTIONS)


# ---- widget values that survive a page switch and a reload -----------------------------------------
def keep_widget_values(defaults: dict[str, Any], *, baseline: dict[str, Any] | None = None,
                       choices: dict[str, list] | None = None) -> None:
    """Call at the top of a page with every widget key it keeps, and each key's first value.

    Each such widget is drawn with `persist_state=KEEP_WHILE_HIDDEN`, so Streamlit keeps its value while
    another page is shown; each run also keeps a copy of every value in a plain session-state dict, from which a
    key that is gone all the same is put back (only then assigned: see below).

    A reload starts a new session: its first values come from the form file (trainer/formstate.py) where they
    fit the widget (`choices`: the options of a key that has fixed ones). Every value that changed is written
    back; `baseline` (default: `defaults`) is what a key missing from the file stands for.
    """
    kept = st.session_state.setdefault(KEPT, {})
    if SAVED_FORM not in st.session_state:  # a new session: a reload, a new tab, a restarted server
        st.session_state[SAVED_FORM] = read_form()
    saved = st.session_state[SAVED_FORM]
    for key, default in defaults.items():
        if key in st.session_state:
            # Not assigned again: a value the script assigns is pushed into the browser's widget, and a run that
            # was already under way when a person typed into a field would overwrite what they typed.
            kept[key] = st.session_state[key]
            continue
        value = kept[key] if key in kept else restored(saved, key, default, (choices or {}).get(key))
        st.session_state[key] = kept[key] = value
    _save_changes({key: kept[key] for key in defaults}, baseline if baseline is not None else defaults)


def set_widget_values(values: dict[str, Any]) -> None:
    """Change widgets' values from the script: in a callback, or before the widgets are drawn."""
    kept = st.session_state.setdefault(KEPT, {})
    for key, value in values.items():
        st.session_state[key] = kept[key] = value
    _save_changes(values, {})


def _save_changes(values: dict[str, Any], baseline: dict[str, Any]) -> None:
    saved = st.session_state.setdefault(SAVED_FORM, {})
    changes = changed(values, saved, baseline)
    if changes:
        save_form(changes)  # a home that cannot be written keeps the form for this session only
        saved.update(changes)


def field_choices(prefix: str) -> dict[str, list]:
    """The fixed options of every parameter widget named PREFIX<parameter> (for `keep_widget_values`)."""
    return {prefix + name: list(f.metadata["choices"]) for name, f in FIELDS.items() if f.metadata["choices"]}


# ---- the parameter widget ------------------------------------------------------------------------
def parameter_widget(name: str, key: str, *, required: bool = False, preferred: str | None = None):
    """Draw the training parameter `name` as widget `key`, all from its metadata, and return the container
    under it where the field's problems go (`show_problems`).

    A picker of files (`choices_from`) offers "(none)" and keeps a value it does not list (copied from a run);
    with `required` it offers only what exists, and a value that is gone becomes `preferred` (or the first).
    """
    field = FIELDS[name]
    meta = field.metadata
    label, kept = meta["label"], {"key": key, "help": meta["help"], "persist_state": KEEP_WHILE_HIDDEN}
    if meta["choices_from"]:
        source = meta["choices_from"]
        # An empty chat template is a choice, never a gap: the model's own template.
        required = required and source not in OPTIONAL_CHOICES
        options = _picker_options(source, key, required, preferred)
        empty = OPTIONAL_CHOICES.get(source, "(none)")
        st.selectbox(label, options, format_func=lambda value: value or empty, **kept)
    elif meta["choices"]:
        st.selectbox(label, meta["choices"], **kept)
    elif field.type == "bool":
        st.checkbox(label, **kept)
    elif field.type in ("int", "float"):
        # No min/max on the widget: a value out of range is shown with its problem under the field.
        st.number_input(label, step=1 if field.type == "int" else None, format=meta["format"], **kept)
    else:
        st.text_input(label, **kept)
    return st.container()


def _picker_options(source: str, key: str, required: bool, preferred: str | None) -> list[str]:
    options = CHOICE_SOURCES[source]()
    current = st.session_state.get(key)
    if required and source != "models":
        if current not in options and options:
            set_widget_values({key: preferred if preferred in options else options[0]})
        return options
    if source != "models":
        options = [""] + options
    if current not in options:
        options.append(current)
    return options


def show_problems(problems: list[DashboardError], slots: dict[str, Any]) -> None:
    """Each problem under its field's widget (slots: field name -> container), the others where the page is."""
    for problem in problems:
        with slots.get(problem.field or "") or st.container():
            show_error(problem)


# ---- tokenizers, messages --------------------------------------------------------------------------
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


def show_error(exc: DashboardError) -> None:
    st.error(exc.message, icon="⚠️")


def flash(slot: str, kind: str, text: str) -> None:
    """Say the outcome of an action (an upload, a start) in the page's next run, where `show_flash(slot)` is
    called, and only then: the next action's outcome replaces it, so no success stays under a later error."""
    st.session_state.setdefault(FLASH, {})[slot] = (kind, text)


def show_flash(slot: str) -> None:
    kind, text = st.session_state.get(FLASH, {}).pop(slot, ("", ""))
    if text:
        {"success": st.success, "error": st.error, "warning": st.warning}.get(kind, st.info)(text)


def home_caption() -> None:
    st.caption(f"Home folder: `{home_dir()}` (set LORA_DASHBOARD_HOME to use another, e.g. a webui user_data).")
