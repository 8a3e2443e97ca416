"""Data page: choose (or upload) a dataset and the data options, and see exactly what the trainer will
train on: statistics, a length histogram with the cutoff, problem rows and a paged list of samples.

All logic lives in trainer.data.build_samples; this page only collects options and renders its result.
"""

from __future__ import annotations

import html
import math
import os
from itertools import chain
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from views.common import (get_tokenizer, home_caption, list_dataset_names, list_format_names, model_picker,
                          show_error)
from trainer.data import build_samples
from trainer.errors import DashboardError
from trainer.home import check_name, datasets_dir, formats_dirs, resolve_inside
from trainer.params import FIELDS, TrainingParameters

KEY = "dp_"  # widget keys: dp_<name>
STATE = "data_page_state"  # the page's choices, kept while another page is shown
RAW, FORMATTED = "Raw text", "Formatted JSON"
# Option widgets, row by row (the validation message of each appears under it).
RAW_LAYOUT = [["cutoff_len", "overlap_len", "newline_favor_len", "min_chars", "hard_cut_string"],
              ["add_eos_token", "add_bos_token"]]
FORMATTED_LAYOUT = [["format", "train_only_after", "overlong_samples", "cutoff_len"],
                    ["add_eos_token", "add_bos_token"]]
RAW_OPTIONS = [name for row in RAW_LAYOUT for name in row]
FORMATTED_OPTIONS = [name for row in FORMATTED_LAYOUT for name in row]
PREFERRED = {RAW: "user-guide.txt", FORMATTED: "dashboard-instructions.json"}
PREFERRED_FORMAT = "alpaca-format"
UPLOAD_TYPES = ["txt", "json", "jsonl"]
PERSISTED = [KEY + name for name in ["mode", "dataset_raw", "dataset_formatted", "page_size", "page",
                                     *dict.fromkeys(RAW_OPTIONS + FORMATTED_OPTIONS)]]

# Token highlighting; translucent backgrounds so both the light and the dark theme stay readable.
STYLES = {
    "overlap": "background:rgba(250,176,5,.35);border-radius:2px",
    "masked": "color:rgba(134,142,150,1);background:rgba(134,142,150,.14)",
    "trained": "background:rgba(64,192,87,.16)",
    "special": "font-size:.75em;border:1px solid rgba(134,142,150,.8);border-radius:3px;padding:0 2px",
    "plain": "",
}
BOX = ("white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;"
       "font-size:.82rem;line-height:1.55;border:1px solid rgba(134,142,150,.35);border-radius:6px;"
       "padding:.45rem .7rem;margin:.15rem 0 .8rem 0;max-height:20rem;overflow-y:auto")


def label(name: str) -> str:
    return {"cutoff_len": "Cutoff length (tokens)", "overlap_len": "Overlap (tokens)",
            "newline_favor_len": "Newline favour (characters)", "min_chars": "Minimum block size (characters)",
            "hard_cut_string": "Hard cut string", "add_eos_token": "Add EOS token", "add_bos_token": "Add BOS token",
            "format": "Format", "train_only_after": "Train only after", "overlong_samples": "Samples over the cutoff",
            }.get(name, name.replace("_", " ").capitalize())


# ---- state ---------------------------------------------------------------------------------------
def remember(key: str) -> None:
    """on_change of every persisted widget: copy its value where a page switch does not delete it."""
    st.session_state.setdefault(STATE, {})[key] = st.session_state[key]


def restore_state() -> None:
    """Streamlit drops a widget's state while another page runs, so the page's choices live in STATE
    (copied there by each widget's on_change and at the end of a run) and are put back before drawing."""
    saved = st.session_state.setdefault(STATE, {})
    defaults = {KEY + name: value for name, value in TrainingParameters().to_dict().items()}
    defaults.update({KEY + "page_size": 10, KEY + "page": 1})
    for key in PERSISTED:
        if key in saved:
            st.session_state[key] = saved[key]
        elif key in defaults:
            st.session_state.setdefault(key, defaults[key])


def save_state(model: str) -> None:
    saved = st.session_state.setdefault(STATE, {})
    saved.update({key: st.session_state[key] for key in PERSISTED if key in st.session_state})
    saved["base_model"] = model


def choose(key: str, options: list[str], preferred: str) -> None:
    """Keep a selectbox's state among its options (files come and go), preferring the demo file."""
    if st.session_state.get(key) not in options and options:
        st.session_state[key] = preferred if preferred in options else options[0]


# ---- upload --------------------------------------------------------------------------------------
def save_upload(upload_key: str, name_key: str, replace_key: str) -> None:
    """Write the uploaded bytes into datasets/ under a checked name; never overwrite without consent."""
    try:
        data = st.session_state[upload_key].getvalue()
        name = check_name(st.session_state.get(name_key, ""), "file name")
        if Path(name).suffix.lower().lstrip(".") not in UPLOAD_TYPES:
            raise DashboardError(f"{name} must end in .txt, .json or .jsonl.")
        folder = datasets_dir()
        folder.mkdir(parents=True, exist_ok=True)
        target = resolve_inside(folder, name, "file name")
        if target.is_dir():
            raise DashboardError(f"datasets/{name} is a folder; choose another name.")
        if target.exists() and not st.session_state.get(replace_key):
            raise DashboardError(f"datasets/{name} already exists; tick 'Replace the existing file' or rename it.")
        temporary = folder / f".{name}.uploading"
        temporary.write_bytes(data)
        os.replace(temporary, target)
    except DashboardError as exc:
        st.session_state[KEY + "upload_message"] = ("error", exc.message)
        return
    except OSError as exc:
        st.session_state[KEY + "upload_message"] = (
            "error", f"Cannot write into datasets/: {exc.strerror or exc}. Is the home folder writable?")
        return
    mode = RAW if target.suffix.lower() == ".txt" else FORMATTED
    for key, value in ((KEY + "mode", mode), (KEY + ("dataset_raw" if mode == RAW else "dataset_formatted"), name)):
        st.session_state[key] = value
        remember(key)
    st.session_state[KEY + "upload_message"] = ("success", f"Saved datasets/{name} ({len(data):,} bytes).")
    st.session_state[KEY + "uploads"] = st.session_state.get(KEY + "uploads", 0) + 1  # a fresh, empty uploader


def upload_box() -> None:
    with st.expander("Upload a dataset into datasets/"):
        upload_key = f"{KEY}upload_{st.session_state.get(KEY + 'uploads', 0)}"
        uploaded = st.file_uploader("A .txt, .json or .jsonl file", type=UPLOAD_TYPES, key=upload_key,
                                    help="Raw text (.txt, UTF-8) or formatted rows (.json list of objects, .jsonl). "
                                         "The file is written only into the home folder's datasets/.")
        if uploaded is not None:
            name_key, replace_key = f"{KEY}up_name_{uploaded.file_id}", f"{KEY}up_replace_{uploaded.file_id}"
            name = st.text_input("Save as", value=uploaded.name, key=name_key,
                                 help="A plain file name: letters, digits, spaces, '.', '_' and '-'.")
            try:
                exists = (datasets_dir() / check_name(name, "file name")).exists()
            except DashboardError as exc:
                exists = False
                show_error(exc)
            if exists:
                st.warning(f"datasets/{name.strip()} already exists.")
                st.checkbox("Replace the existing file", key=replace_key)
            st.button("Save into datasets/", key=KEY + "up_save", on_click=save_upload,
                      args=(upload_key, name_key, replace_key),
                      disabled=exists and not st.session_state.get(replace_key, False))
        message = st.session_state.pop(KEY + "upload_message", None)
        if message:
            (st.error if message[0] == "error" else st.success)(message[1])


# ---- options -------------------------------------------------------------------------------------
def option_widget(name: str, slots: dict) -> None:
    field, key = FIELDS[name], KEY + name
    meta = field.metadata
    if name == "format":
        formats = list_format_names()
        choose(key, formats, PREFERRED_FORMAT)
        st.selectbox(label(name), formats, key=key, help=meta["help"] + " Searched in the home's formats/ first.",
                     on_change=remember, args=(key,))
    elif meta.get("choices"):
        st.radio(label(name), meta["choices"], key=key, help=meta["help"], horizontal=True, on_change=remember,
                 args=(key,))
    elif field.type == "bool":
        st.checkbox(label(name), key=key, help=meta["help"], on_change=remember, args=(key,))
    elif field.type == "int":
        st.number_input(label(name), key=key, step=1, min_value=meta.get("min"), max_value=meta.get("max"),
                        help=meta["help"], on_change=remember, args=(key,))
    else:
        st.text_input(label(name), key=key, help=meta["help"], on_change=remember, args=(key,))
    slots[name] = st.container()  # this option's validation message, filled in below


def options_form(layout: list[list[str]]) -> dict:
    slots: dict = {}
    width = max(len(row) for row in layout)
    for row in layout:
        for column, name in zip(st.columns(width), row):
            with column:
                option_widget(name, slots)
    return slots


# ---- the preview, cached -------------------------------------------------------------------------
def signature(*paths: Path) -> tuple:
    """(path, mtime, size) of the files behind a preview, so an edited file is previewed afresh."""
    files = []
    for path in paths:
        members = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt") if path.is_dir() else [path]
        for member in members:
            try:
                stat = member.stat()
                files.append((str(member), stat.st_mtime_ns, stat.st_size))
            except OSError:
                files.append((str(member), None, None))
    return tuple(files)


@st.cache_data(show_spinner=False, max_entries=16)
def cached_preview(params: dict, model_name: str, files: tuple, _tokenizer) -> dict:
    """build_samples' result in a compact form (flat numpy arrays) that the cache restores quickly."""
    preview = build_samples(TrainingParameters.from_dict(params), _tokenizer)
    samples = preview.samples
    lengths = np.fromiter((s.n_tokens for s in samples), np.int64, len(samples))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    return {
        "kind": preview.kind,
        "stats": preview.stats,
        "problems": [{"where": p.where, "reason": p.reason, "fields": ", ".join(p.fields)} for p in preview.problems],
        "texts": [s.text for s in samples],
        "sources": [s.source for s in samples],
        "lengths": lengths,
        "trained": np.fromiter((s.n_trained for s in samples), np.int64, len(samples)),
        "overlap": np.fromiter((s.overlap for s in samples), np.int64, len(samples)),
        "truncated": np.fromiter((s.truncated for s in samples), bool, len(samples)),
        "offsets": offsets,
        "ids": np.fromiter(chain.from_iterable(s.input_ids for s in samples), np.int64, total),
        "mask": np.fromiter(chain.from_iterable(s.label_mask for s in samples), np.int8, total),
    }


# ---- rendering -----------------------------------------------------------------------------------
def token_html(tokenizer, ids: list[int], mask: list[int], overlap: int, bos: int, raw: bool) -> str:
    """Decode runs of tokens that look alike; special tokens, overlap and masked tokens each styled apart."""
    special = set(tokenizer.all_special_ids)

    def kind(position: int) -> str:
        if ids[position] in special:
            return "special"
        if bos <= position < bos + overlap:
            return "overlap"
        if raw:
            return "plain"
        return "trained" if mask[position] else "masked"

    parts, start = [], 0
    for position in range(1, len(ids) + 1):
        if position == len(ids) or kind(position) != kind(start) or kind(start) == "special":
            style = kind(start)
            text = html.escape(tokenizer.decode(ids[start:position], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False))
            if style == "special" and not raw and not mask[start]:
                style, extra = "special", STYLES["masked"] + ";"
            else:
                extra = ""
            title = {"special": "special token", "overlap": "shared with the previous chunk",
                     "masked": "masked: context only, not trained", "trained": "trained"}.get(style)
            attributes = f' class="tok-{style}" style="{extra}{STYLES[style]}"' if style != "plain" else ""
            if title:
                attributes += f' title="{title}"'
            parts.append(f"<span{attributes}>{text}</span>" if attributes else text)
            start = position
    return "".join(parts)


def legend(raw: bool) -> str:
    items = ([("overlap", "overlap with the previous chunk (trained again)"), ("special", "special token (BOS/EOS)")]
             if raw else
             [("trained", "trained (counts in the loss)"), ("masked", "masked (context only)"),
              ("special", "special token (BOS/EOS)")])
    sample = {"special": "&lt;|im_end|&gt;"}
    return ('<div style="font-size:.85rem">Legend: ' + " &nbsp; ".join(
        f'<span class="tok-{k}" style="{STYLES[k]}">{sample.get(k, "text")}</span> {html.escape(text)}'
        for k, text in items) + "</div>")


def histogram(lengths: np.ndarray, cutoff: int) -> alt.LayerChart:
    values, counts = np.unique(lengths, return_counts=True)  # one row per length, not per sample
    top = max(cutoff, int(lengths.max()) if len(lengths) else 0)
    x_scale = alt.Scale(domain=[0, top * 1.15], nice=False)  # room for the cutoff label right of its line
    bins = alt.Bin(maxbins=40, extent=[0, top + 1])
    bars = alt.Chart(pd.DataFrame({"tokens": values, "count": counts})).mark_bar().encode(
        x=alt.X("tokens:Q", bin=bins, scale=x_scale, title="tokens per sample"),
        y=alt.Y("sum(count):Q", title="samples"),
        tooltip=[alt.Tooltip("tokens:Q", bin=bins, title="tokens"), alt.Tooltip("sum(count):Q", title="samples")])
    marker = pd.DataFrame({"cutoff": [cutoff], "label": [f"cutoff {cutoff}"]})
    rule = alt.Chart(marker).mark_rule(color="#d9480f", strokeDash=[5, 3], strokeWidth=2).encode(
        x=alt.X("cutoff:Q", scale=x_scale))
    text = alt.Chart(marker).mark_text(align="left", dx=4, dy=8, color="#d9480f", fontWeight="bold").encode(
        x=alt.X("cutoff:Q", scale=x_scale), y=alt.value(0), text="label:N")
    return alt.layer(bars, rule, text).properties(height=200)


def show_metrics(items: list[tuple[str, str]]) -> None:
    for column, (name, value) in zip(st.columns(len(items)), items):
        column.metric(name, value)


def show_preview(data: dict, tokenizer, params: TrainingParameters) -> None:
    stats, raw = data["stats"], data["kind"] == "raw"

    def n(key: str) -> str:
        return f"{stats.get(key, 0):,}"

    if raw:
        show_metrics([("Samples", n("samples")), ("Tokens", n("tokens")),
                      ("Trained tokens", n("trained_tokens")), ("Mean length", f"{stats.get('mean_tokens', 0):.1f}"),
                      ("Max length", n("max_tokens")), ("Dropped blocks", n("dropped_blocks"))])
        st.caption(f"{n('files')} file(s), {n('blocks')} block(s) after cutting at the hard cut string; "
                   f"{n('kept_blocks')} kept.")
    else:
        show_metrics([("Rows", n("rows")), ("Samples", n("samples")),
                      ("Unmatched rows", n("unmatched_rows")),
                      ("Truncated", n("truncated_samples")),
                      ("Dropped over cutoff", n("dropped_overlong"))])
        show_metrics([("Tokens", n("tokens")), ("Trained tokens", n("trained_tokens")),
                      ("Mean length", f"{stats.get('mean_tokens', 0):.1f}"), ("Max length", n("max_tokens")),
                      ("Chat rows skipped", n("chat_rows_skipped"))])
        if stats.get("matched_keys"):
            keys = stats["matched_keys"].items()
            st.caption("Matched format keys: " + ", ".join(f"`{k}` × {count}" for k, count in keys))

    st.markdown("**Sample lengths**")
    st.altair_chart(histogram(data["lengths"], params.cutoff_len), width="stretch")
    problems = data["problems"]
    st.markdown(f"**Problems: {len(problems)}**")
    if problems:
        st.dataframe(pd.DataFrame(problems, columns=["where", "reason", "fields"]), hide_index=True,
                     height=min(35 * len(problems) + 38, 300), width="stretch",
                     column_config={"where": st.column_config.TextColumn("where", width="small"),
                                    "reason": st.column_config.TextColumn("reason", width="large"),
                                    "fields": st.column_config.TextColumn("fields", width="medium")})
    else:
        st.caption("No dropped blocks or unmatched rows." if raw else "Every row became a sample.")

    st.subheader("Samples")
    total = len(data["sources"])
    controls = st.columns([1, 1, 3])
    size = controls[0].selectbox("Per page", [5, 10, 25], key=KEY + "page_size", on_change=remember,
                                 args=(KEY + "page_size",))
    pages = max(1, math.ceil(total / size))
    if st.session_state.get(KEY + "page", 1) > pages:
        st.session_state[KEY + "page"] = pages
    page = controls[1].number_input(f"Page (of {pages})", min_value=1, max_value=pages, step=1, key=KEY + "page",
                                    on_change=remember, args=(KEY + "page",))
    with controls[2]:
        st.html(legend(raw))
    first = (page - 1) * size
    bos = 1 if params.add_bos_token and tokenizer.bos_token_id is not None else 0
    cards = []
    for i in range(first, min(first + size, total)):
        a, b = data["offsets"][i], data["offsets"][i + 1]
        ids, mask = data["ids"][a:b].tolist(), data["mask"][a:b].tolist()
        overlap = int(data["overlap"][i]) if raw else 0
        details = [f"{int(data['lengths'][i]):,} tokens"]
        if raw:
            details.append(f"overlap {overlap} with the previous chunk" if overlap else "no overlap")
        else:
            details.append(f"{int(data['trained'][i]):,} trained")
            if data["truncated"][i]:
                details.append("<b>truncated</b>")
        header = (f'<div style="font-size:.85rem;margin-top:.2rem"><b>#{i + 1}</b> · {html.escape(data["sources"][i])}'
                  f' · {" · ".join(details)}</div>')
        body = token_html(tokenizer, ids, mask, overlap, bos if ids and bos else 0, raw)
        cards.append(f'{header}<div class="sample" style="{BOX}">{body}</div>')
    st.html("".join(cards) or "<p>No samples.</p>")
    st.caption(f"Samples {first + 1}–{min(first + size, total)} of {total:,}.")


# ---- the page ------------------------------------------------------------------------------------
st.title("Data")
home_caption()
restore_state()

top = st.columns([2, 2, 3])
with top[0]:
    model = model_picker(KEY + "model", default=st.session_state.get(STATE, {}).get("base_model"),
                         help="The preview counts tokens with this model's tokenizer.")
with top[1]:
    mode = st.radio("Data", [RAW, FORMATTED], key=KEY + "mode", horizontal=True, on_change=remember,
                    args=(KEY + "mode",),
                    help="Raw text: .txt files cut into overlapping chunks. Formatted: JSON rows rendered through "
                         "a format file (or the chat template for rows with messages).")
with top[2]:
    dataset_key = KEY + ("dataset_raw" if mode == RAW else "dataset_formatted")
    datasets = list_dataset_names("raw" if mode == RAW else "formatted")
    choose(dataset_key, datasets, PREFERRED[mode])
    dataset = st.selectbox(
        "Dataset" if mode == FORMATTED else "Raw text file or folder", datasets, key=dataset_key,
        on_change=remember, args=(dataset_key,),
        help=FIELDS["raw_text_file" if mode == RAW else "dataset"].metadata["help"])
upload_box()

shown = RAW_OPTIONS if mode == RAW else FORMATTED_OPTIONS
st.markdown("**Options**")
slots = options_form(RAW_LAYOUT if mode == RAW else FORMATTED_LAYOUT)
values = {name: st.session_state[KEY + name] for name in shown}
options = {"base_model": model, **values}
options.update({"raw_text_file": dataset or "", "dataset": ""} if mode == RAW
               else {"dataset": dataset or "", "raw_text_file": ""})

try:
    params = TrainingParameters.from_dict(options)
    problems = [p for p in params.problems(require_name=False) if p.field in shown]
except DashboardError as exc:
    params, problems = None, [exc]
for problem in problems:
    with slots.get(problem.field) or st.container():
        show_error(problem)

save_state(model)
action = st.empty()  # the "use on the Train page" button, once the options gave a preview

if not dataset:
    st.info("No dataset of this kind in datasets/ yet: upload one above.")
elif params is not None and not problems:
    try:
        dataset_path = resolve_inside(datasets_dir(), dataset, "dataset")
        build = {**options, "raw_text_file": str(dataset_path)} if mode == RAW else {**options,
                                                                                      "dataset": str(dataset_path)}
        paths = [dataset_path]
        if mode == FORMATTED and params.format:
            format_path = next((folder / f"{params.format}.json" for folder in formats_dirs()
                                if (folder / f"{params.format}.json").is_file()), None)
            if format_path is None:
                raise DashboardError(f"Format file {params.format}.json not found in formats/.", field="format")
            build["format"] = str(format_path)
            paths.append(format_path)
        tokenizer = get_tokenizer(model)
        with st.spinner(f"Tokenising {dataset}..."):
            data = cached_preview(TrainingParameters.from_dict(build).to_dict(), model, signature(*paths), tokenizer)
    except DashboardError as exc:
        show_error(exc)
    else:
        # Options that previewed cleanly are what the Train page starts from.
        st.session_state["data_options"] = dict(options)
        if action.button("Use these settings on the Train page", type="primary",
                         help="Prefill the Train page's data options and base model with the ones above."):
            if "train_form" in st.session_state:  # the Train form exists already: update its fields
                for name, value in params.to_dict().items():
                    if name in options:
                        st.session_state["train_form"][name] = value
                        st.session_state["tp_" + name] = value
            st.switch_page("views/train.py")
        st.divider()
        show_preview(data, tokenizer, params)
