"""Evaluate page: did the LoRA learn, which checkpoint is best, how much did it forget, what does it say now.

Widgets and calls only: runs come from trainer.runtable and trainer.metrics, charts from trainer.charts,
results and texts from trainer.results, prompts and answers from trainer.generate. Perplexity and export
run as background jobs (trainer.jobs, subprocesses); the page only reads their files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import streamlit as st

from views.common import cached_tokenizer, home_caption, show_error
from views.experiments import experiments_section
from trainer import jobs
from trainer.adapters import BaseWithAdapters
from trainer.charts import CHARTS, X_AXES, chart_data, empty_chart_note, metric_chart, perplexity_chart
from trainer.errors import DashboardError
from trainer.export import RELATIVE_TOLERANCE, default_export_name
from trainer.gguf import default_gguf_name, gguf_exports, gguf_sentence
from trainer.llamacpp import generate as llamacpp_generate, llama_cpp_problem
from trainer.generate import (
    TEMPLATE_FORMAT, base_and_adapter_answers, full_prompt, template_choices, visible_answer,
)
from trainer.metrics import metrics_frame
from trainer.models import list_models
from trainer.perplexity import DEFAULT_SETTINGS, LONGEST_WINDOW, EvaluationSettings
from trainer.results import (
    TEXT_FROM_FILE, TEXT_PASTED, checkpoint_results, chosen_adapters, forgetting_result, read_results,
    results_frame, run_results, save_comments, start_sentence, text_file_names, text_sources, text_to_evaluate,
)
from trainer.processes import LIVE_STATES
from trainer.runs import list_runs
from trainer.runtable import (
    adapter_choices, failure_note, parameter_differences, run_base_model, run_format_name, runs_table,
)

STATE_ICONS = {"running": "🟢", "queued": "⏳", "completed": "✅", "stopped": "⏹️", "failed": "❌"}
TABLE_COLUMNS = {
    "state": st.column_config.TextColumn("state", help="A running run whose process died shows as failed; a run "
                                                   "the trainer ended because its loss blew up, as failed (diverged)."),
    "final loss": st.column_config.NumberColumn(format="%.4f"),
    "best loss": st.column_config.NumberColumn(format="%.4f"),
    "best eval loss": st.column_config.NumberColumn(format="%.4f"),
    "learning rate": st.column_config.NumberColumn(format="%.1e"),
    "duration (min)": st.column_config.NumberColumn(format="%.1f"),
    "started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
    "tokens": st.column_config.NumberColumn(format="%d"),
}


# ---- runs and curves -----------------------------------------------------------------------------------


def runs_section(run_paths: dict[str, Path]) -> None:
    """The runs table; ticking rows chooses the runs to compare."""
    names = list(run_paths)
    st.subheader("Runs")
    if "ev_selected" not in st.session_state:
        st.session_state["ev_selected"] = names[:1]
    st.session_state["ev_selected"] = [n for n in st.session_state["ev_selected"] if n in run_paths]

    def select_from_table() -> None:
        rows = st.session_state["ev_table"].selection.rows
        if rows:
            st.session_state["ev_selected"] = [names[i] for i in rows if i < len(names)]

    st.dataframe(runs_table(run_paths.values()), key="ev_table", on_select=select_from_table,
                 selection_mode="multi-row", hide_index=True, column_config=TABLE_COLUMNS)
    st.caption("Click column headers to sort; tick rows to compare them below. Runs from text-generation-webui "
               "(source webui) show what their training_log.json holds.")


def curves_section(run_paths: dict[str, Path]) -> list[str]:
    """The chosen runs' curves over each other and their parameter differences; returns the chosen runs."""
    st.subheader("Curves")
    left, middle, right = st.columns([3, 2, 2])
    selected = left.multiselect("Runs to compare", list(run_paths), key="ev_selected")
    x_axis = middle.radio("X axis", list(X_AXES), format_func=X_AXES.get, horizontal=True, key="ev_x")
    smoothing = right.slider("Smoothing", 0.0, 0.99, 0.6, 0.01, key="ev_smooth",
                             help="Exponential moving average of the loss (0: none). The raw loss stays drawn "
                                  "faintly.")
    if not selected:
        st.caption("Choose runs above (or tick rows in the table) to draw their curves.")
        return selected
    data = chart_data({n: metrics_frame(run_paths[n]) for n in selected}, x_axis, smoothing)
    st.space("medium")  # a chart's toolbar shows above its top right corner on hover: keep it off the controls
    columns = st.columns(2)
    for position, chart_name in enumerate(CHARTS):
        chart = metric_chart(data[chart_name], chart_name, data["x_title"], runs=data["runs"])
        with columns[position % 2]:
            if chart is None:
                st.caption(empty_chart_note(chart_name, x_axis))
            else:
                st.altair_chart(chart, width="stretch")
    st.caption("Loss: the faint line is the raw loss, the solid one the smoothed loss, the dashed one the eval "
               "loss. Long runs are drawn downsampled (each bucket keeps its lowest and highest point), so spikes "
               "and a loss of 0.0 stay visible. Drag to pan, scroll to zoom, double-click to reset.")
    if len(selected) >= 2:
        differences = parameter_differences([run_paths[n] for n in selected])
        st.markdown("**Parameter differences**")
        if differences.empty:
            st.caption("The selected runs were trained with the same parameters.")
        else:
            st.dataframe(differences, width="stretch")
    return selected


def focus_section(run_paths: dict[str, Path], selected: list[str]) -> tuple[str, Path, str, dict[str, Path]]:
    """The run to evaluate, try and export: its name, folder, base model and adapters by label."""
    st.divider()
    if st.session_state.get("ev_run") not in run_paths:
        st.session_state["ev_run"] = selected[0] if selected else next(iter(run_paths))
    focus = st.selectbox("Run to evaluate, try and export", list(run_paths), key="ev_run")
    run_dir = run_paths[focus]
    base_model = run_base_model(run_dir)
    adapters = adapter_choices(run_dir)
    if base_model not in list_models():
        st.warning(f"The base model of {focus} ({base_model or 'unknown'}) is not under models/; copy it there to "
                   f"evaluate, try or export this adapter.")
    note = failure_note(run_dir)
    if note:
        st.error(note)
    st.caption(f"Base model: **{base_model or 'unknown'}** · adapters: {', '.join(adapters) or 'none saved yet'}")
    return focus, run_dir, base_model, adapters


# ---- background jobs -----------------------------------------------------------------------------------


def watch(job_id: str) -> None:
    st.session_state.setdefault("ev_watch", []).append(job_id)


def forget_finished(prefix: str) -> None:
    """Stop showing the finished jobs whose title starts with `prefix`: a new action's outcome replaces them,
    so a green line of an earlier start never sits under a later error."""
    watched = st.session_state.setdefault("ev_watch", [])
    for job_id in list(watched):
        job = jobs.job_state(jobs.job_dir_for(job_id))
        if job.get("title", "").startswith(prefix) and job["state"] not in LIVE_STATES:
            watched.remove(job_id)


def start_action(flash: str, prefix: str, start: Callable[[], str]) -> None:
    """Run a start button's action: `start` returns the sentence to show, or raises a DashboardError. Only
    this latest outcome is shown (under the button, until the next rerun of the page)."""
    forget_finished(prefix)
    try:
        st.session_state[flash] = ("info", start())
    except DashboardError as exc:
        st.session_state[flash] = ("error", exc.message)


def show_outcome(flash: str) -> None:
    kind, message = st.session_state.pop(flash, (None, None))
    if kind == "error":
        st.error(message, icon="⚠️")
    elif kind:
        st.info(message)


def show_job(job_id: str, job: dict) -> None:
    """One job's line: progress with a Cancel button while it runs, then how it ended."""
    icon = STATE_ICONS.get(job["state"], "❔")
    if job["state"] in LIVE_STATES:
        cols = st.columns([6, 1])
        cols[0].progress(min(max(float(job.get("progress") or 0), 0.0), 1.0),
                         text=f"{icon} {job['title']}: {job.get('message') or job['state']}")
        if cols[1].button("Cancel", key=f"ev_cancel_{job_id}"):
            jobs.cancel_job(job_id)
    elif job["state"] == "failed":
        st.error(jobs.job_sentence(job))
    elif job.get("result"):
        st.success(jobs.job_sentence(job))
    else:
        st.caption(f"{icon} {jobs.job_sentence(job)}")


def job_panel(prefix: str) -> None:
    """Progress of this page's background jobs whose title starts with `prefix`; refreshes while one runs."""
    watched = st.session_state.setdefault("ev_watch", [])
    for job in jobs.list_jobs(30):
        if job["state"] in LIVE_STATES and job["id"] not in watched:
            watched.append(job["id"])  # re-attach after a reload or from another tab
    shown = [j for j in (jobs.job_state(jobs.job_dir_for(i)) for i in watched) if j.get("title", "").startswith(prefix)]
    live = any(j["state"] in LIVE_STATES for j in shown)

    @st.fragment(run_every=1.0 if live else None)
    def panel() -> None:
        done = st.session_state.setdefault("ev_done", [])
        for job_id in list(watched):
            job = jobs.job_state(jobs.job_dir_for(job_id))
            if not job.get("title", "").startswith(prefix):
                continue
            show_job(job_id, job)
            if job["state"] not in LIVE_STATES and job_id not in done:
                done.append(job_id)
                if live:
                    st.rerun(scope="app")  # show the new results everywhere on the page

    panel()


def evaluation_controls(button: str, key: str, plan: Callable[[], list[dict]], title: str, prefix: str) -> None:
    """A button that starts the evaluations `plan` returns in the background (reusing identical stored
    ones), the sentence saying what happened, and the panel of those jobs."""
    def start() -> str:
        started = jobs.start_perplexity(plan(), title)
        if started["job"]:
            watch(started["job"])
        return start_sentence(started)

    if st.button(button, key=key, type="primary"):
        start_action(f"{key}_flash", prefix, start)
    show_outcome(f"{key}_flash")
    job_panel(prefix)


# ---- shared inputs -------------------------------------------------------------------------------------


def window_inputs(stride_column, length_column, prefix: str) -> EvaluationSettings:
    """Stride and max length of the sliding window (checked when an evaluation is planned)."""
    stride = stride_column.number_input("Stride", 1, LONGEST_WINDOW, DEFAULT_SETTINGS.stride, key=f"{prefix}_stride")
    max_length = length_column.number_input("Max length", 2, LONGEST_WINDOW, DEFAULT_SETTINGS.max_length,
                                            key=f"{prefix}_maxlen")
    return EvaluationSettings(int(stride), int(max_length))


def text_file_input(column, label: str, key: str) -> str | None:
    """A .txt file from datasets/, the general text chosen first."""
    options = text_file_names()
    general = DEFAULT_SETTINGS.general_text
    return column.selectbox(label, options, key=key, index=options.index(general) if general in options else 0)


# ---- perplexity ----------------------------------------------------------------------------------------


def perplexity_tab(focus: str, run_dir: Path, base_model: str, adapters: dict[str, Path]) -> None:
    st.markdown("Sliding-window perplexity: each token is scored once, with up to *max length* tokens of "
                "context; the window moves by *stride*. Lower is better; compare only numbers computed with the "
                "same text, stride and max length.")
    cols = st.columns(3)
    use_base = cols[0].checkbox("Base model alone", value=True, key="ev_ppl_base")
    use_final = cols[1].checkbox("Final adapter", value="final" in adapters, key=f"ev_ppl_final_{focus}",
                                 disabled="final" not in adapters)
    checkpoints = cols[2].multiselect("Checkpoints", [name for name in adapters if name != "final"],
                                      key=f"ev_ppl_ckpts_{focus}", placeholder="none (each one is another evaluation)",
                                      help="Evaluate checkpoints to see which step is best.")
    cols = st.columns([2, 3])
    source = cols[0].radio("Text", text_sources(run_dir), key="ev_ppl_source")
    text_choice = pasted = None
    if source == TEXT_FROM_FILE:
        text_choice = text_file_input(cols[1], "Text file", "ev_ppl_text")
    elif source == TEXT_PASTED:
        pasted = cols[1].text_area("Held-out text", key="ev_ppl_paste", height=120,
                                   help="Text the LoRA did not train on; it is stored under results/texts/.")
    cols = st.columns(3)
    settings = window_inputs(cols[0], cols[1], "ev_ppl")
    comment = cols[2].text_input("Comment (optional)", key="ev_ppl_comment")

    def plan() -> list[dict]:
        settings.validate()
        text_file, label = text_to_evaluate(source, run_dir, text_choice, pasted)
        chosen = chosen_adapters(adapters, use_base, use_final, checkpoints)
        return [jobs.perplexity_task(base_model, adapter, text_file, label, settings.stride, settings.max_length,
                                     comment) for adapter in chosen]

    evaluation_controls("Evaluate perplexity", "ev_ppl_start", plan, f"perplexity of {focus}", "perplexity")
    results_section(focus, run_dir)


def results_section(focus: str, run_dir: Path) -> None:
    """The focused run's stored results (or every run's), with an editable comment column, and its perplexity
    by checkpoint."""
    records = read_results()
    cols = st.columns([3, 1])
    cols[0].markdown("**Results** (edit the comment column; it is saved at once)")
    show_all = cols[1].toggle("All runs", key="ev_results_all",
                              help=f"Off: {focus}'s results and its base model's alone. On: every stored result.")
    shown = records if show_all else run_results(run_dir, records)
    if not shown:
        st.caption("No results yet." if not records else
                   f"No results for {focus} yet ({len(records)} of other runs: switch on *All runs*).")
        return
    results = results_frame(shown)
    version = st.session_state.setdefault("ev_results_version", 0)
    edited = st.data_editor(
        results, key=f"ev_results_{version}", hide_index=True, width="stretch",
        disabled=[c for c in results.columns if c != "comment"],
        column_config={"perplexity": st.column_config.NumberColumn(format="%.4f"),
                       "comment": st.column_config.TextColumn("comment", width="medium")})
    changes = {rid: text for rid, text in edited["comment"].items() if text != results.at[rid, "comment"]}
    if changes:
        save_comments(changes)
        st.session_state["ev_results_version"] = version + 1  # a fresh editor over the saved file
        st.toast("Comment saved.")
        st.rerun()
    chart = perplexity_chart(checkpoint_results(run_dir, records))
    if chart is not None:
        st.space("small")  # the chart's toolbar (on hover) stays off the table above
        st.altair_chart(chart, width="stretch")
    else:
        st.caption(f"Evaluate {focus}'s checkpoints to see perplexity by checkpoint.")


# ---- forgetting ----------------------------------------------------------------------------------------


def forgetting_tab(focus: str, run_dir: Path, base_model: str, adapters: dict[str, Path]) -> None:
    st.markdown("A low training loss can mean the model memorised your text and lost general language. This "
                "measures it: perplexity on a text the LoRA was not trained on, base model against adapter.")
    cols = st.columns(4)
    general = text_file_input(cols[0], "General text", "ev_fg_text")
    adapter_label = cols[1].selectbox("Adapter", list(adapters), key=f"ev_fg_adapter_{focus}")
    settings = window_inputs(cols[2], cols[3], "ev_fg")
    if not adapters:
        st.caption(f"{focus} has no saved adapter yet.")
        return
    if not general:
        st.caption("Put a general .txt text into datasets/ (general-text.txt ships with the project).")
        return
    general_path, _ = text_to_evaluate(TEXT_FROM_FILE, run_dir, general)
    adapter_dir = adapters[adapter_label]

    def plan() -> list[dict]:
        settings.validate()
        return [jobs.perplexity_task(base_model, adapter, general_path, general, settings.stride, settings.max_length,
                                     "forgetting check") for adapter in (None, adapter_dir)]

    evaluation_controls("Run the forgetting check", "ev_fg_start", plan, f"forgetting check of {focus}", "forgetting")
    found = forgetting_result(base_model, adapter_dir, general_path, settings.stride, settings.max_length)
    if not found:
        st.caption("No forgetting check with these settings yet.")
        return
    cols = st.columns(3)
    cols[0].metric("Base model perplexity", f"{found['base']:.3f}")
    cols[1].metric(f"With {focus} ({adapter_label})", f"{found['adapter']:.3f}")
    cols[2].metric("Ratio", f"{found['ratio']:.3f}", delta=f"{found['ratio'] - 1:+.1%}", delta_color="inverse")
    (st.warning if found["worrying"] else st.success)(found["sentence"])


# ---- try it --------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False, max_entries=2)
def generation_models(model_name: str) -> BaseWithAdapters:
    """One copy of a base model per server, with the adapters tried so far (a retrained one is reloaded)."""
    return BaseWithAdapters(model_name, progress=lambda message: None)


def try_tab(focus: str, run_dir: Path, base_model: str, adapters: dict[str, Path]) -> None:
    if not adapters:
        st.caption(f"{focus} has no saved adapter yet.")
        return
    cols = st.columns([1, 2])
    try_label = cols[0].selectbox("Adapter", list(adapters), key=f"ev_try_adapter_{focus}")
    format_name = run_format_name(run_dir)
    try:
        tokenizer = cached_tokenizer(base_model)
    except DashboardError as exc:
        tokenizer = None
        show_error(exc)
    templates = template_choices(format_name, tokenizer)
    template = cols[1].radio("Template", list(templates), format_func=templates.get, key="ev_try_template",
                             index=list(templates).index(TEMPLATE_FORMAT) if format_name else 0)
    prompt = st.text_area("Prompt", key="ev_try_prompt", height=100,
                          placeholder="Ask something your LoRA was trained on.")
    cols = st.columns(3)
    temperature = cols[0].slider("Temperature", 0.0, 1.5, 0.0, 0.05, key="ev_try_temperature",
                                 help="0: greedy, the same answer every time.")
    max_new = cols[1].number_input("Max new tokens", 1, 1024, 64, key="ev_try_max_new")
    seed = cols[2].number_input("Seed", 0, 2**31 - 1, 0, key="ev_try_seed",
                                help="Fixes the sampling, so an answer can be reproduced.")
    exported = gguf_exports(adapters[try_label]) if not llama_cpp_problem() else []
    on_gguf = exported and st.checkbox(
        "Also answer with llama.cpp (the GGUF base with the GGUF LoRA)", value=True, key="ev_try_gguf",
        help=f"From the GGUF export in {Path(exported[0]['folder']).name}/; llama.cpp is much faster on a CPU.")
    if st.button("Generate with both", key="ev_try_go", type="primary", disabled=tokenizer is None):
        try:
            given = full_prompt(template, prompt, format_name, tokenizer)
            with st.spinner("Loading the model (once) and generating..."):
                answers = base_and_adapter_answers(generation_models(base_model), adapters[try_label], tokenizer,
                                                   given, int(max_new), float(temperature), int(seed))
                if on_gguf:
                    answers["gguf"] = llamacpp_generate(Path(exported[0]["base_path"]), Path(exported[0]["lora_path"]),
                                                        given, int(max_new), float(temperature), int(seed))
                    answers["gguf_label"] = Path(exported[0]["lora_path"]).name
            st.session_state["ev_try_output"] = {"prompt": given, "label": f"{focus} ({try_label})", **answers}
        except DashboardError as exc:
            st.session_state.pop("ev_try_output", None)  # the latest outcome only: no old answers under the error
            show_error(exc)
    show_answers(base_model, st.session_state.get("ev_try_output"))


def show_answers(base_model: str, output: dict | None) -> None:
    """The base model's and the adapter's answers side by side, and the exact prompt."""
    if not output:
        return
    left_col, right_col = st.columns(2)
    left_col.markdown(f"**Base model: {base_model}**")
    left_col.code(visible_answer(output["base"]), language=None, wrap_lines=True)
    right_col.markdown(f"**With the adapter: {output['label']}**")
    right_col.code(visible_answer(output["adapter"]), language=None, wrap_lines=True)
    if "gguf" in output:
        st.markdown(f"**llama.cpp: the GGUF base with {output['gguf_label']}**")
        st.code(visible_answer(output["gguf"]), language=None, wrap_lines=True)
    with st.expander("The exact prompt"):
        st.code(output["prompt"], language=None, wrap_lines=True)


# ---- export --------------------------------------------------------------------------------------------


def export_tab(focus: str, adapters: dict[str, Path], base_model: str) -> None:
    st.markdown("Merge an adapter into its base model and save a normal model folder under `models/` that "
                "transformers (and text-generation-webui) load without PEFT. The merged model's logits are "
                f"checked against base+adapter (the largest difference under {RELATIVE_TOLERANCE:.1%} of their "
                "spread) before the folder is put in place; nothing is overwritten.")
    if not adapters:
        st.caption(f"{focus} has no saved adapter yet.")
        return
    cols = st.columns(2)
    export_label = cols[0].selectbox("Adapter", list(adapters), key=f"ev_exp_adapter_{focus}")
    export_dir = adapters[export_label]
    export_name = cols[1].text_input("Name under models/", value=default_export_name(export_dir),
                                     key=f"ev_exp_name_{focus}_{export_label}")
    def start() -> str:
        watch(jobs.start_export(export_dir, export_name, base_model))
        return f"Merging {export_label} into {base_model} in the background; the check runs before anything is saved."

    if st.button("Merge and save", key="ev_exp_start", type="primary"):
        start_action("ev_exp_flash", "export", start)
    show_outcome("ev_exp_flash")
    gguf_export(focus, export_label, export_dir, base_model)
    job_panel("export")


def gguf_export(focus: str, export_label: str, export_dir: Path, base_model: str) -> None:
    """The adapter for llama.cpp and Ollama: GGUF files checked by llama.cpp, and the commands to chat with it."""
    st.markdown("**GGUF for llama.cpp, Ollama and LM Studio**")
    st.caption("Writes the adapter as a GGUF LoRA (llama.cpp's `--lora`), the merged model as f16 and q8_0 GGUF "
               "files (and in the GGUF base's own type), and Ollama Modelfiles, into one folder under `models/`. "
               "llama.cpp loads each file and its logits are compared with transformers' before anything is kept.")
    problem = llama_cpp_problem()
    if problem:
        st.info(problem)
        return
    name = st.text_input("Folder name under models/", value=default_gguf_name(export_dir),
                         key=f"ev_gguf_name_{focus}_{export_label}")

    def start() -> str:
        watch(jobs.start_export(export_dir, name, base_model, to="gguf"))
        return f"Writing GGUF files for {export_label} in the background; llama.cpp checks them before they are kept."

    if st.button("Write GGUF files", key="ev_gguf_start"):
        start_action("ev_gguf_flash", "export", start)
    show_outcome("ev_gguf_flash")
    exports = gguf_exports(export_dir)
    if exports:
        report = exports[0]
        st.success(gguf_sentence(report))
        st.markdown(f"Chat with it in Ollama (from `{report['folder']}`):")
        st.code("\n".join(report["commands"][1:]), language="bash")
        st.markdown("Or in llama.cpp:")
        st.code(f"llama-cli -m {report['base_path']} --lora {report['lora_path']} -cnv", language="bash")


# ---- the page ------------------------------------------------------------------------------------------


def evaluate_page() -> None:
    st.title("Evaluate")
    home_caption()
    run_paths = {p.name: p for p in list_runs()}
    if not run_paths:
        st.info("No runs yet under loras/. Train one on the Train page, or point LORA_DASHBOARD_HOME at a "
                "text-generation-webui user_data folder to see its LoRAs.")
        return
    runs_section(run_paths)
    selected = curves_section(run_paths)
    experiments_section(run_paths, selected, evaluation_controls)
    focus, run_dir, base_model, adapters = focus_section(run_paths, selected)
    tab_ppl, tab_forget, tab_try, tab_export = st.tabs(["Perplexity", "Forgetting check", "Try it", "Export"])
    with tab_ppl:
        perplexity_tab(focus, run_dir, base_model, adapters)
    with tab_forget:
        forgetting_tab(focus, run_dir, base_model, adapters)
    with tab_try:
        try_tab(focus, run_dir, base_model, adapters)
    with tab_export:
        export_tab(focus, adapters, base_model)


evaluate_page()
