"""Data page: choose (or upload) a dataset and the data options, and see exactly what the trainer will
train on: statistics, a length histogram with the cutoff, problem rows and a paged list of samples.

The samples come from the sample cache (trainer/samplecache.py, the trainer's own entries); the options,
numbers, tables and highlighting from trainer/preview.py. This page only draws them.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import streamlit as st

from views.common import (KEEP_WHILE_HIDDEN, field_choices, flash, get_tokenizer, home_caption, keep_widget_values,
                          offer_to_train, parameter_widget, send_to_train, set_widget_values, show_error, show_flash,
                          show_problems)
from trainer.charts import histogram
from trainer.data import special_tokens
from trainer.datafiles import (DATASET_ENDINGS, deletable_files, delete_file, kind_by_ending, save_upload,
                               upload_folder_for, upload_path)
from trainer.errors import DashboardError
from trainer.params import TrainingParameters, read_and_check
from trainer.preview import (DATASET_FIELD, KINDS, PAGE_SIZES, data_options, dataset_shapes, option_rows,
                             page_range, preview_caption, preview_metrics, problem_rows, sample_details, token_runs)
from trainer.samplecache import cached_build_samples

KEY = "dp_"  # widget keys: dp_<name>
MODES = {"Raw text": "raw", "Formatted JSON": "formatted"}
DATASET_KEYS = {"raw": KEY + "dataset_raw", "formatted": KEY + "dataset_formatted"}
PREFERRED = {"raw_text_file": "user-guide.txt", "dataset": "dashboard-instructions.json", "format": "alpaca-format"}
UPLOAD_TYPES = [ending.lstrip(".") for ending in DATASET_ENDINGS]
UPLOAD_FOLDERS = {"datasets/ (a dataset)": "datasets", "formats/ (a format file)": "formats"}
TITLES = {"special": "special token", "overlap": "shared with the previous chunk",
          "masked": "masked: context only, not trained", "trained": "trained"}

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



def widget_defaults() -> dict:
    """Every widget key the page keeps across pages, with its first value."""
    defaults = TrainingParameters().to_dict()
    names = dict.fromkeys(name for kind in KINDS for row in option_rows(kind) for name in row)
    return {**{KEY + name: defaults[name] for name in names}, KEY + "model": defaults["base_model"],
            KEY + "mode": next(iter(MODES)), DATASET_KEYS["raw"]: None, DATASET_KEYS["formatted"]: None,
            KEY + "page_size": 10, KEY + "page": 1}


# ---- upload and delete ---------------------------------------------------------------------------
def save_uploaded(upload_key: str, name_key: str, replace_key: str, folder_key: str) -> None:
    """Write the uploaded bytes into datasets/ or formats/ once the preview's readers accept them (never over a
    file without consent), and show them: a dataset previewed, a format file chosen."""
    data, folder = st.session_state[upload_key].getvalue(), UPLOAD_FOLDERS[st.session_state[folder_key]]
    try:
        target = save_upload(st.session_state.get(name_key, ""), data, folder,
                             bool(st.session_state.get(replace_key)))
    except DashboardError as exc:
        flash("upload", "error", exc.message)
        return
    kind = "formatted" if folder == "formats" else kind_by_ending(target.name)
    mode = next(mode for mode, k in MODES.items() if k == kind)
    chosen = {KEY + "format": target.stem} if folder == "formats" else {DATASET_KEYS[kind]: target.name}
    set_widget_values({KEY + "mode": mode, **chosen})
    flash("upload", "success", f"Saved {folder}/{target.name} ({len(data):,} bytes).")
    st.session_state[KEY + "uploads"] = st.session_state.get(KEY + "uploads", 0) + 1  # a fresh, empty uploader


def upload_box() -> None:
    with st.expander("Upload a dataset or a format file"):
        upload_key = f"{KEY}upload_{st.session_state.get(KEY + 'uploads', 0)}"
        uploaded = st.file_uploader(
            "A dataset (.txt, .md, .json, .jsonl, .csv, .tsv, .parquet) or a format file (.json)", type=UPLOAD_TYPES,
            key=upload_key, help="Raw text (.txt, .md; UTF-8), rows (.json list of objects, .jsonl, .csv, .tsv, "
                                 ".parquet) or a format file (a .json object of templates). It is checked as the "
                                 "preview reads it, then written only into the home folder's datasets/ or formats/.")
        if uploaded is not None:
            keys = {part: f"{KEY}up_{part}_{uploaded.file_id}" for part in ("name", "replace", "folder")}
            suggested = list(UPLOAD_FOLDERS.values()).index(upload_folder_for(uploaded.name, uploaded.getvalue()))
            columns = st.columns([3, 2])
            name = columns[0].text_input("Save as", value=uploaded.name, key=keys["name"],
                                         help="A plain file name: letters, digits, spaces, '.', '_' and '-'.")
            folder = UPLOAD_FOLDERS[columns[1].radio("Save into", list(UPLOAD_FOLDERS), index=suggested,
                                                     key=keys["folder"], horizontal=True)]
            try:
                exists = upload_path(name, folder).exists()
            except DashboardError as exc:
                exists = False
                show_error(exc)
            if exists:
                st.warning(f"{folder}/{name.strip()} already exists.")
                st.checkbox("Replace the existing file", key=keys["replace"])
            st.button(f"Save into {folder}/", key=KEY + "up_save", on_click=save_uploaded,
                      args=(upload_key, keys["name"], keys["replace"], keys["folder"]),
                      disabled=exists and not st.session_state.get(keys["replace"], False))
        show_flash("upload")


def ask_to_delete(place: str | None) -> None:
    st.session_state[KEY + "delete_asked"] = place  # the confirmation shows while it names the chosen file


def delete_now(place: str) -> None:
    ask_to_delete(None)
    try:
        flash("delete", "success", f"Deleted {delete_file(place)}.")
    except DashboardError as exc:
        flash("delete", "error", exc.message)


def delete_box() -> None:
    """A dataset or format file of the home deleted after a confirmation; the pickers list what is left."""
    with st.expander("Delete a dataset or a format file"):
        files = list(deletable_files())
        if files:
            place = st.selectbox("File", files, key=KEY + "delete_choice", on_change=ask_to_delete, args=(None,),
                                 help="Datasets and format files in the home folder's datasets/ and formats/ (and a "
                                      "webui's training/). The format files shipped with the dashboard are not listed.")
            # The question and its answers take the places of an empty slot and the Delete button, element for
            # element, so neither state stays on the page while the rest of the run (the preview) is drawn.
            asked = st.session_state.get(KEY + "delete_asked") == place
            question = st.empty()
            with st.container(horizontal=True):
                if not asked:
                    st.button("Delete", key=KEY + "delete", on_click=ask_to_delete, args=(place,))
                    st.empty()
                else:
                    question.warning(f"Really delete {place}? It cannot be undone.")
                    st.button(f"Delete {place}", key=KEY + "delete_confirm", type="primary", on_click=delete_now,
                              args=(place,))
                    st.button("Cancel", key=KEY + "delete_cancel", on_click=ask_to_delete, args=(None,))
        else:
            st.caption("Nothing to delete: no dataset or format file of your own in the home folder.")
        show_flash("delete")


# ---- options -------------------------------------------------------------------------------------
def options_form(rows: list[list[str]]) -> dict:
    """The option widgets row by row; returns the container under each for its problems."""
    slots: dict = {}
    width = max(len(row) for row in rows)
    for row in rows:
        for column, name in zip(st.columns(width), row):
            with column:
                slots[name] = parameter_widget(name, KEY + name, required=True, preferred=PREFERRED.get(name))
    return slots


# ---- rendering -----------------------------------------------------------------------------------
def token_html(tokenizer, sample, kind: str, bos: int) -> str:
    """Runs of tokens that look alike, decoded; special tokens, overlap and masked tokens each styled apart."""
    parts = []
    for start, end, style in token_runs(sample, kind, bos, set(tokenizer.all_special_ids)):
        text = html.escape(tokenizer.decode(sample.input_ids[start:end], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False))
        extra = STYLES["masked"] + ";" if style == "special" and kind != "raw" and not sample.label_mask[start] else ""
        attributes = f' class="tok-{style}" style="{extra}{STYLES[style]}"' if style != "plain" else ""
        if style in TITLES:
            attributes += f' title="{TITLES[style]}"'
        parts.append(f"<span{attributes}>{text}</span>" if attributes else text)
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


def show_metrics(items: list[tuple[str, str]]) -> None:
    for column, (name, value) in zip(st.columns(len(items)), items):
        column.metric(name, value)


def show_problem_table(preview) -> None:
    rows = problem_rows(preview)
    st.markdown(f"**Problems: {len(rows)}**")
    if rows:
        st.dataframe(pd.DataFrame(rows, columns=["where", "reason", "fields"]), hide_index=True,
                     height=min(35 * len(rows) + 38, 300), width="stretch",
                     column_config={"where": st.column_config.TextColumn("where", width="small"),
                                    "reason": st.column_config.TextColumn("reason", width="large"),
                                    "fields": st.column_config.TextColumn("fields", width="medium")})
    else:
        st.caption("No dropped blocks or unmatched rows." if preview.kind == "raw" else "Every row became a sample.")


def show_samples(preview, tokenizer, params: TrainingParameters) -> None:
    st.subheader("Samples")
    total = len(preview.samples)
    controls = st.columns([1, 1, 3])
    size = controls[0].selectbox("Per page", PAGE_SIZES, key=KEY + "page_size", persist_state=KEEP_WHILE_HIDDEN)
    pages = page_range(total, size, 1)[0]
    if st.session_state.get(KEY + "page", 1) > pages:
        set_widget_values({KEY + "page": pages})
    page = controls[1].number_input(f"Page (of {pages})", min_value=1, max_value=pages, step=1, key=KEY + "page",
                                    persist_state=KEEP_WHILE_HIDDEN)
    with controls[2]:
        st.html(legend(preview.kind == "raw"))
    _, first, end = page_range(total, size, page)
    bos = len(special_tokens(params, tokenizer)[0])
    cards = []
    for i in range(first, end):
        sample = preview.samples[i]
        header = (f'<div style="font-size:.85rem;margin-top:.2rem"><b>#{i + 1}</b> · {html.escape(sample.source)}'
                  f' · {" · ".join(sample_details(sample, preview.kind))}</div>')
        cards.append(f'{header}<div class="sample" style="{BOX}">{token_html(tokenizer, sample, preview.kind, bos)}'
                     f'</div>')
    st.html("".join(cards) or "<p>No samples.</p>")
    st.caption(f"Samples {first + 1}–{end} of {total:,}.")


def show_preview(preview, tokenizer, params: TrainingParameters) -> None:
    if preview.shape:
        st.info(preview.shape, icon="🔎")  # what the rows were recognised as, and how they are read
    for row in preview_metrics(preview):
        show_metrics(row)
    caption = preview_caption(preview)
    if caption:
        st.caption(caption)
    st.markdown("**Sample lengths**")
    lengths = np.fromiter((s.n_tokens for s in preview.samples), np.int64, len(preview.samples))
    st.altair_chart(histogram(lengths, params.cutoff_len), width="stretch")
    show_problem_table(preview)
    show_samples(preview, tokenizer, params)


# ---- the page ------------------------------------------------------------------------------------
st.title("Data")
home_caption()
keep_widget_values(widget_defaults(), choices={**field_choices(KEY), KEY + "mode": list(MODES),
                                                KEY + "page_size": list(PAGE_SIZES)})

top = st.columns([2, 2, 3])
with top[0]:
    parameter_widget("base_model", KEY + "model")
with top[1]:
    mode = st.radio("Data", list(MODES), key=KEY + "mode", horizontal=True, persist_state=KEEP_WHILE_HIDDEN,
                    help="Raw text: .txt and .md files cut into overlapping chunks. Formatted: rows (.json, .jsonl, "
                         ".csv, .tsv, .parquet) read by their shape: chat rows through a chat template, "
                         "prompt/completion, text rows chunked like raw text, or records through a format file.")
kind = MODES[mode]
with top[2]:
    slots = {DATASET_FIELD[kind]: parameter_widget(DATASET_FIELD[kind], DATASET_KEYS[kind], required=True,
                                                   preferred=PREFERRED[DATASET_FIELD[kind]])}
upload_box()
delete_box()

st.markdown("**Options**")
rows = option_rows(kind, dataset_shapes(kind, st.session_state[DATASET_KEYS[kind]]))
slots.update(options_form(rows))
shown = [name for row in rows for name in row]
model, dataset = st.session_state[KEY + "model"], st.session_state[DATASET_KEYS[kind]]
options = data_options(kind, dataset, {name: st.session_state[KEY + name] for name in shown}, model)
params, problems = read_and_check(options, only=shown, require_name=False)
show_problems(problems, slots)
action = st.empty()  # the "use on the Train page" button, once the options gave a preview

if not dataset:
    st.info("No dataset of this kind in datasets/ yet: upload one above.")
elif params is not None and not problems:
    try:
        tokenizer = get_tokenizer(model)
        with st.spinner(f"Tokenising {dataset}..."):
            preview, _ = cached_build_samples(params, tokenizer)
    except DashboardError as exc:
        show_error(exc)
    else:
        offer_to_train(options)
        if action.button("Use these settings on the Train page", type="primary",
                         help="Prefill the Train page's data options and base model with the ones above."):
            send_to_train({name: value for name, value in params.to_dict().items() if name in options})
        st.divider()
        show_preview(preview, tokenizer, params)
