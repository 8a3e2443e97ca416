"""Evaluate page: did the LoRA learn, which checkpoint is best, how much did it forget, what does it say now.

Thin UI: every number comes from trainer.evaluation / trainer.jobs / trainer.export. Perplexity and
export run as background jobs (subprocesses); the page only reads their files.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from views.common import cached_tokenizer, home_caption, show_error
from trainer import evaluation as ev
from trainer import jobs
from trainer.errors import DashboardError
from trainer.export import default_export_name
from trainer.home import datasets_dir, resolve_inside
from trainer.models import list_models
from trainer.runfiles import LIVE_STATES
from trainer.runs import list_runs

STATE_ICONS = {"running": "🟢", "queued": "⏳", "completed": "✅", "stopped": "⏹️", "failed": "❌"}

st.title("Evaluate")
home_caption()

run_paths = {p.name: p for p in list_runs()}
if not run_paths:
    st.info("No runs yet under loras/. Train one on the Train page, or point LORA_DASHBOARD_HOME at a "
            "text-generation-webui user_data folder to see its LoRAs.")
    st.stop()
names = list(run_paths)

# ---- runs table ----------------------------------------------------------------------------------
st.subheader("Runs")
table = ev.runs_table(run_paths.values())
if "ev_selected" not in st.session_state:
    st.session_state["ev_selected"] = names[:1]
st.session_state["ev_selected"] = [n for n in st.session_state["ev_selected"] if n in run_paths]


def _select_from_table() -> None:
    rows = st.session_state["ev_table"].selection.rows
    if rows:
        st.session_state["ev_selected"] = [names[i] for i in rows if i < len(names)]


st.dataframe(
    table, key="ev_table", on_select=_select_from_table, selection_mode="multi-row", hide_index=True,
    column_config={
        "state": st.column_config.TextColumn("state", help="A running run whose process died shows as failed."),
        "final loss": st.column_config.NumberColumn(format="%.4f"),
        "best loss": st.column_config.NumberColumn(format="%.4f"),
        "best eval loss": st.column_config.NumberColumn(format="%.4f"),
        "learning rate": st.column_config.NumberColumn(format="%.1e"),
        "duration (min)": st.column_config.NumberColumn(format="%.1f"),
        "started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
        "tokens": st.column_config.NumberColumn(format="%d"),
    })
st.caption("Click column headers to sort; tick rows to compare them below. Runs from text-generation-webui "
           "(source webui) show what their training_log.json holds.")

# ---- curves ----------------------------------------------------------------------------------------
st.subheader("Curves")
left, middle, right = st.columns([3, 2, 2])
selected = left.multiselect("Runs to compare", names, key="ev_selected")
x_axis = middle.radio("X axis", list(ev.X_AXES), format_func=ev.X_AXES.get, horizontal=True, key="ev_x")
smoothing = right.slider("Smoothing", 0.0, 0.99, 0.6, 0.01, key="ev_smooth",
                         help="Exponential moving average of the loss (0: none). The raw loss stays drawn faintly.")
if selected:
    data = ev.chart_data({n: ev.metrics_frame(run_paths[n]) for n in selected}, x_axis, smoothing)
    columns = st.columns(2)
    for position, chart_name in enumerate(ev.CHARTS):
        with columns[position % 2]:
            chart = ev.metric_chart(data[chart_name], chart_name, data["x_title"], runs=data["runs"])
            if chart is None:
                title = ev.CHARTS[chart_name][0]
                st.caption(f"**{title}**: nothing to draw for these runs"
                           + (" (no eval lines: set an eval dataset when training)." if "eval" in chart_name else
                              (" on a time axis (webui runs log no times)." if x_axis == "time" else ".")))
            else:
                st.altair_chart(chart, width="stretch")
    st.caption("Loss: the faint line is the raw loss, the solid one the smoothed loss, the dashed one the eval "
               "loss. Long runs are drawn downsampled (each bucket keeps its lowest and highest point), so spikes "
               "and a loss of 0.0 stay visible. Drag to pan, scroll to zoom, double-click to reset.")
    if len(selected) >= 2:
        differences = ev.parameter_differences([run_paths[n] for n in selected])
        st.markdown("**Parameter differences**")
        if differences.empty:
            st.caption("The selected runs were trained with the same parameters.")
        else:
            st.dataframe(differences, width="stretch")
else:
    st.caption("Choose runs above (or tick rows in the table) to draw their curves.")

# ---- one run: perplexity, forgetting, try, export -------------------------------------------------
st.divider()
focus_default = selected[0] if selected else names[0]
if st.session_state.get("ev_run") not in run_paths:
    st.session_state["ev_run"] = focus_default
focus = st.selectbox("Run to evaluate, try and export", names, key="ev_run")
run_dir = run_paths[focus]
base_model = ev.run_base_model(run_dir)
adapters = ev.adapter_choices(run_dir)
if base_model not in list_models():
    st.warning(f"The base model of {focus} ({base_model or 'unknown'}) is not under models/; copy it there to "
               f"evaluate, try or export this adapter.")
st.caption(f"Base model: **{base_model or 'unknown'}** · adapters: {', '.join(adapters) or 'none saved yet'}")


def text_files() -> list[str]:
    root = datasets_dir()
    return sorted(p.name for p in root.glob("*.txt") if p.is_file()) if root.is_dir() else []


def job_panel(prefix: str) -> None:
    """Progress of this page's background jobs whose title starts with `prefix`; refreshes while one runs."""
    watched = st.session_state.setdefault("ev_watch", [])
    for job in jobs.list_jobs(30):
        if job["state"] in LIVE_STATES and job["id"] not in watched:
            watched.append(job["id"])  # re-attach after a reload or from another tab
    shown = [jobs.job_state(jobs.job_dir_for(j)) for j in watched]
    shown = [j for j in shown if j.get("title", "").startswith(prefix)]
    live = any(j["state"] in LIVE_STATES for j in shown)

    @st.fragment(run_every=1.0 if live else None)
    def panel() -> None:
        done = st.session_state.setdefault("ev_done", [])
        for job_id in list(watched):
            job = jobs.job_state(jobs.job_dir_for(job_id))
            if not job.get("title", "").startswith(prefix):
                continue
            icon = STATE_ICONS.get(job["state"], "❔")
            if job["state"] in LIVE_STATES:
                cols = st.columns([6, 1])
                cols[0].progress(min(max(float(job.get("progress") or 0), 0.0), 1.0),
                                 text=f"{icon} {job['title']}: {job.get('message') or job['state']}")
                if cols[1].button("Cancel", key=f"ev_cancel_{job_id}"):
                    jobs.cancel_job(job_id)
            elif job["state"] == "failed":
                st.error(f"{job['title']} failed: {job.get('error')}")
            elif job["state"] == "stopped":
                st.caption(f"{icon} {job['title']}: stopped.")
            elif job.get("result"):
                result = job["result"]
                st.success(f"Saved models/{result['name']} (merged {Path(result['adapter']).name} into "
                           f"{result['base_model']}); max |logit difference| after reloading: "
                           f"{result['max_abs_diff_reloaded']:.1e} (must be under {result['tolerance']:g}).")
            else:
                st.caption(f"{icon} {job['title']}: {len(job.get('results', []))} evaluated, "
                           f"{len(job.get('reused', []))} reused.")
            if job["state"] not in LIVE_STATES and job_id not in done:
                done.append(job_id)
                if live:
                    st.rerun(scope="app")  # show the new results everywhere on the page

    panel()


def start_evaluations(tasks: list[dict], title: str, flash: str) -> None:
    try:
        started = jobs.start_perplexity(tasks, title)
    except DashboardError as exc:
        show_error(exc)
        return
    if started["job"]:
        st.session_state.setdefault("ev_watch", []).append(started["job"])
    reused, running = len(started["reused"]), started["running"]
    if started["job"]:
        message = f"{started['pending']} evaluation(s) started in the background"
    elif running:
        message = f"{running} identical evaluation(s) are already running in the background"
    else:
        message = f"All {reused} evaluation(s) were done before; their stored results are shown"
    if started["job"] and running:
        message += f"; {running} identical one(s) already running"
    if (started["job"] or running) and reused:
        message += f"; {reused} identical one(s) reused from earlier results"
    st.session_state[flash] = message + "."


tab_ppl, tab_forget, tab_try, tab_export = st.tabs(["Perplexity", "Forgetting check", "Try it", "Export"])

# ---- perplexity ---------------------------------------------------------------------------------------
with tab_ppl:
    st.markdown("Sliding-window perplexity: each token is scored once, with up to *max length* tokens of "
                "context; the window moves by *stride*. Lower is better; compare only numbers computed with the "
                "same text, stride and max length.")
    cols = st.columns(3)
    use_base = cols[0].checkbox("Base model alone", value=True, key="ev_ppl_base")
    use_final = cols[1].checkbox("Final adapter", value="final" in adapters, key="ev_ppl_final",
                                 disabled="final" not in adapters)
    checkpoint_names = [name for name in adapters if name != "final"]
    chosen_checkpoints = cols[2].multiselect("Checkpoints", checkpoint_names, key=f"ev_ppl_ckpts_{focus}",
                                             placeholder="none (each one is another evaluation)",
                                             help="Evaluate checkpoints to see which step is best.")
    sources = ["A .txt file from datasets/", "The run's training data"]
    if ev.run_parameters(run_dir).get("eval_dataset"):
        sources.append("The run's eval data")
    sources.append("A held-out text (paste it)")
    cols = st.columns([2, 3])
    source = cols[0].radio("Text", sources, key="ev_ppl_source")
    text_choice = pasted = None
    if source == sources[0]:
        options = text_files()
        text_choice = cols[1].selectbox("Text file", options, key="ev_ppl_text",
                                        index=options.index("general-text.txt") if "general-text.txt" in options
                                        else 0)
    elif source.startswith("A held-out"):
        pasted = cols[1].text_area("Held-out text", key="ev_ppl_paste", height=120,
                                   help="Text the LoRA did not train on; it is stored under results/texts/.")
    cols = st.columns(3)
    stride = cols[0].number_input("Stride", 1, 32768, 256, key="ev_ppl_stride")
    max_length = cols[1].number_input("Max length", 2, 32768, 512, key="ev_ppl_maxlen")
    comment = cols[2].text_input("Comment (optional)", key="ev_ppl_comment")

    if st.button("Evaluate perplexity", key="ev_ppl_start", type="primary"):
        try:
            if source == sources[0]:
                if not text_choice:
                    raise DashboardError("There is no .txt file in datasets/.")
                text_file, label = resolve_inside(datasets_dir(), text_choice, "text file"), text_choice
            elif source.startswith("The run's training"):
                text_file = ev.save_text(ev.run_data_text(run_dir, "train"), f"{focus}-train")
                label = f"{focus}: training data"
            elif source.startswith("The run's eval"):
                text_file = ev.save_text(ev.run_data_text(run_dir, "eval"), f"{focus}-eval")
                label = f"{focus}: eval data"
            else:
                text_file = ev.save_text(pasted or "", "held-out")
                label = f"held-out {text_file.stem[-12:]}"
            chosen = ([None] if use_base else []) + ([adapters["final"]] if use_final and "final" in adapters
                                                     else []) + [adapters[c] for c in chosen_checkpoints]
            tasks = [jobs.perplexity_task(base_model, adapter, text_file, label, int(stride), int(max_length),
                                          comment) for adapter in chosen]
            start_evaluations(tasks, f"perplexity of {focus}", "ev_ppl_flash")
        except DashboardError as exc:
            show_error(exc)
    if st.session_state.get("ev_ppl_flash"):
        st.info(st.session_state.pop("ev_ppl_flash"))
    job_panel("perplexity")

    records = ev.read_results()
    st.markdown("**Results** (edit the comment column; it is saved at once)")
    if records:
        results = ev.results_frame(records)
        version = st.session_state.setdefault("ev_results_version", 0)
        edited = st.data_editor(
            results, key=f"ev_results_{version}", hide_index=True, width="stretch",
            disabled=[c for c in results.columns if c != "comment"],
            column_config={"perplexity": st.column_config.NumberColumn(format="%.4f"),
                           "comment": st.column_config.TextColumn("comment", width="medium")})
        changes = {rid: text for rid, text in edited["comment"].items() if text != results.at[rid, "comment"]}
        if changes:
            ev.save_comments(changes)
            st.session_state["ev_results_version"] = version + 1  # a fresh editor over the saved file
            st.toast("Comment saved.")
            st.rerun()
        curve = ev.checkpoint_results(run_dir, records)
        chart = ev.perplexity_chart(curve)
        if chart is not None:
            st.altair_chart(chart, width="stretch")
        else:
            st.caption(f"Evaluate {focus}'s checkpoints to see perplexity by checkpoint.")
    else:
        st.caption("No results yet.")

# ---- forgetting -----------------------------------------------------------------------------------------
with tab_forget:
    st.markdown("A low training loss can mean the model memorised your text and lost general language. This "
                "measures it: perplexity on a text the LoRA was not trained on, base model against adapter.")
    options = text_files()
    cols = st.columns(4)
    general = cols[0].selectbox("General text", options, key="ev_fg_text",
                                index=options.index("general-text.txt") if "general-text.txt" in options else 0)
    adapter_label = cols[1].selectbox("Adapter", list(adapters), key=f"ev_fg_adapter_{focus}")
    fg_stride = cols[2].number_input("Stride", 1, 32768, 256, key="ev_fg_stride")
    fg_max_length = cols[3].number_input("Max length", 2, 32768, 512, key="ev_fg_maxlen")
    if not adapters:
        st.caption(f"{focus} has no saved adapter yet.")
    elif general:
        general_path = resolve_inside(datasets_dir(), general, "text file")
        if st.button("Run the forgetting check", key="ev_fg_start", type="primary"):
            try:
                tasks = [jobs.perplexity_task(base_model, adapter, general_path, general, int(fg_stride),
                                              int(fg_max_length), "forgetting check")
                         for adapter in (None, adapters[adapter_label])]
                start_evaluations(tasks, f"forgetting check of {focus}", "ev_fg_flash")
            except DashboardError as exc:
                show_error(exc)
        if st.session_state.get("ev_fg_flash"):
            st.info(st.session_state.pop("ev_fg_flash"))
        job_panel("forgetting")
        found = ev.forgetting_result(base_model, adapters[adapter_label], general_path, int(fg_stride),
                                     int(fg_max_length))
        if found:
            cols = st.columns(3)
            cols[0].metric("Base model perplexity", f"{found['base']:.3f}")
            cols[1].metric(f"With {focus} ({adapter_label})", f"{found['adapter']:.3f}")
            cols[2].metric("Ratio", f"{found['ratio']:.3f}", delta=f"{found['ratio'] - 1:+.1%}",
                           delta_color="inverse")
            (st.warning if found["ratio"] >= 1.1 else st.success)(found["sentence"])
        else:
            st.caption("No forgetting check with these settings yet.")
    else:
        st.caption("Put a general .txt text into datasets/ (general-text.txt ships with the project).")


# ---- try it ---------------------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False, max_entries=3)
def generation_model(model_name: str, adapter_dir: str, stamp: float):
    """A model for generation, loaded once (stamp: the adapter's modification time, to reload a new one)."""
    return ev.load_for_generation(model_name, Path(adapter_dir) if adapter_dir else None)


def stamp_of(folder: Path | None) -> float:
    weights = folder / ev.ADAPTER_WEIGHTS if folder else None
    return weights.stat().st_mtime if weights and weights.exists() else 0.0


def shown_answer(text: str) -> str:
    return text if text.strip() else f"(no visible text: {text!r})"


with tab_try:
    if not adapters:
        st.caption(f"{focus} has no saved adapter yet.")
    else:
        cols = st.columns([1, 2])
        try_label = cols[0].selectbox("Adapter", list(adapters), key=f"ev_try_adapter_{focus}")
        templates = {"none": "No template: the prompt as typed"}
        format_name = ev.run_format_name(run_dir)
        if format_name:
            templates["format"] = f"The run's format ({format_name}), instruction filled in"
        try:
            tokenizer = cached_tokenizer(base_model)
        except DashboardError as exc:
            tokenizer = None
            show_error(exc)
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            templates["chat"] = "The model's chat template (user turn)"
        template = cols[1].radio("Template", list(templates), format_func=templates.get, key="ev_try_template",
                                 index=1 if format_name else 0)
        prompt = st.text_area("Prompt", key="ev_try_prompt", height=100,
                              placeholder="Ask something your LoRA was trained on.")
        cols = st.columns(3)
        temperature = cols[0].slider("Temperature", 0.0, 1.5, 0.0, 0.05, key="ev_try_temperature",
                                     help="0: greedy, the same answer every time.")
        max_new = cols[1].number_input("Max new tokens", 1, 1024, 64, key="ev_try_max_new")
        seed = cols[2].number_input("Seed", 0, 2**31 - 1, 0, key="ev_try_seed",
                                    help="Fixes the sampling, so an answer can be reproduced.")
        if st.button("Generate with both", key="ev_try_go", type="primary", disabled=tokenizer is None):
            try:
                if template == "format":
                    full_prompt = ev.apply_format(format_name, prompt)
                elif template == "chat":
                    full_prompt = ev.apply_chat_template(tokenizer, prompt)
                else:
                    full_prompt = prompt
                adapter_dir = adapters[try_label]
                outputs = {}
                with st.spinner("Loading the models (once) and generating..."):
                    for label, folder in (("base", None), ("adapter", adapter_dir)):
                        model = generation_model(base_model, str(folder or ""), stamp_of(folder))
                        outputs[label] = ev.generate_text(model, tokenizer, full_prompt, int(max_new),
                                                          float(temperature), int(seed))
                st.session_state["ev_try_output"] = {"prompt": full_prompt, "label": f"{focus} ({try_label})",
                                                     **outputs}
            except DashboardError as exc:
                show_error(exc)
        output = st.session_state.get("ev_try_output")
        if output:
            left_col, right_col = st.columns(2)
            left_col.markdown(f"**Base model: {base_model}**")
            left_col.code(shown_answer(output["base"]), language=None, wrap_lines=True)
            right_col.markdown(f"**With the adapter: {output['label']}**")
            right_col.code(shown_answer(output["adapter"]), language=None, wrap_lines=True)
            with st.expander("The exact prompt"):
                st.code(output["prompt"], language=None, wrap_lines=True)

# ---- export ---------------------------------------------------------------------------------------------
with tab_export:
    st.markdown("Merge an adapter into its base model and save a normal model folder under `models/` that "
                "transformers (and text-generation-webui) load without PEFT. The merged model's logits are "
                "checked against base+adapter before the folder is put in place; nothing is overwritten.")
    if not adapters:
        st.caption(f"{focus} has no saved adapter yet.")
    else:
        cols = st.columns(2)
        export_label = cols[0].selectbox("Adapter", list(adapters), key=f"ev_exp_adapter_{focus}")
        export_dir = adapters[export_label]
        export_name = cols[1].text_input("Name under models/", value=default_export_name(export_dir),
                                         key=f"ev_exp_name_{focus}_{export_label}")
        if st.button("Merge and save", key="ev_exp_start", type="primary"):
            try:
                job_id = jobs.start_export(export_dir, export_name, base_model)
                st.session_state.setdefault("ev_watch", []).append(job_id)
            except DashboardError as exc:
                show_error(exc)
        job_panel("export")
