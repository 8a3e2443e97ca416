"""Train page: every parameter, validated before launch; a run starts as a subprocess and is followed
through its files (status.json, metrics.jsonl, train.log), so a reload or a second tab re-attaches."""

from __future__ import annotations

import time
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from views.common import get_tokenizer, home_caption, list_dataset_names, list_format_names
from trainer import batching
from trainer.data import build_samples, unmatched_rows_error
from trainer.errors import DashboardError
from trainer.models import bitsandbytes_problem, list_models
from trainer.params import FIELDS, GROUPS, TrainingParameters
from trainer.runfiles import LIVE_STATES, LOG_FILE, PARAMS_FILE, effective_status, read_json, read_metrics, request_stop
from trainer.runs import launch, list_runs, multi_node_commands, run_dir_for
from trainer.train import list_checkpoints

GROUP_TITLES = {"basic": "Basic", "data": "Data", "lora": "LoRA", "optimisation": "Optimisation",
                "advanced": "Advanced"}
FLOAT_FORMATS = {"learning_rate": "%.2e", "lora_dropout": "%.2f", "weight_decay": "%.3f"}
KEY = "tp_"  # widget keys: tp_<parameter name>

@st.cache_resource
def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


st.title("Train")
home_caption()
gpu_count = visible_gpus()


# ---- state: defaults, copied parameters, the Data page's choices ---------------------------------
# Streamlit forgets a widget's value while another page runs (and can drop it when a run is interrupted),
# so the form lives in "train_form" and every widget key (tp_<name>) is re-assigned each run: a key set by
# the script is kept by Streamlit, and a missing one is filled from the form instead of a widget default.
def load_into_form(values: dict) -> None:
    params = TrainingParameters.from_dict(values)
    st.session_state["train_form"] = params.to_dict()
    for name, value in params.to_dict().items():
        st.session_state[KEY + name] = value


if "train_form" not in st.session_state:
    initial = TrainingParameters().to_dict()
    initial.update(st.session_state.get("data_options", {}))
    st.session_state["train_form"] = TrainingParameters.from_dict(initial).to_dict()
for _name, _value in st.session_state["train_form"].items():
    st.session_state[KEY + _name] = st.session_state.get(KEY + _name, _value)

runs = list_runs()
with st.sidebar:
    st.subheader("Copy parameters from")
    source = st.selectbox("An earlier run", ["—"] + [r.name for r in runs], key="copy_from",
                          help="Fill the form with that run's training_parameters.json (the name too: change it).")
    if st.button("Copy parameters", disabled=source == "—"):
        stored = read_json(run_dir_for(source) / PARAMS_FILE)
        if stored is None:
            st.error(f"{source} has no readable training_parameters.json.")
        else:
            try:
                load_into_form(stored)
                st.session_state[KEY + "lora_name"] = f"{source}-2"
                st.rerun()
            except DashboardError as exc:
                st.error(exc.message)
    if "data_options" in st.session_state and st.button("Use the Data page's settings"):
        load_into_form({**{k[len(KEY):]: v for k, v in st.session_state.items() if k.startswith(KEY)
                           and k[len(KEY):] in FIELDS}, **st.session_state["data_options"]})
        st.rerun()


# ---- the form ----------------------------------------------------------------------------------
def field_widget(name: str, slots: dict) -> None:
    field = FIELDS[name]
    meta, key, label = field.metadata, KEY + name, name.replace("_", " ").capitalize()
    if name == "base_model":
        models = list_models()
        if st.session_state.get(key) not in models:
            models.append(st.session_state[key])
        st.selectbox("Base model", models, key=key, help=meta["help"])
    elif name in ("dataset", "eval_dataset", "raw_text_file"):
        kind = "raw" if name == "raw_text_file" else ("any" if name == "eval_dataset" else "formatted")
        options = [""] + list_dataset_names(kind)
        if st.session_state.get(key) not in options:
            options.append(st.session_state[key])
        st.selectbox(label, options, key=key, help=meta["help"], format_func=lambda v: v or "(none)")
    elif name == "format":
        options = [""] + list_format_names()
        if st.session_state.get(key) not in options:
            options.append(st.session_state[key])
        st.selectbox("Format", options, key=key, help=meta["help"], format_func=lambda v: v or "(none)")
    elif meta.get("choices"):
        st.selectbox(label, meta["choices"], key=key, help=meta["help"])
    elif field.type == "bool":
        st.checkbox(label, key=key, help=meta["help"])
    elif field.type == "int":
        st.number_input(label, key=key, step=1, help=meta["help"])
    elif field.type == "float":
        st.number_input(label, key=key, step=None, format=FLOAT_FORMATS.get(name, "%g"), help=meta["help"])
    else:
        st.text_input(label, key=key, help=meta["help"])
    slots[name] = st.empty()  # validation message for this field, filled in below


slots: dict[str, st.delta_generator.DeltaGenerator] = {}
tabs = st.tabs([GROUP_TITLES[g] for g in GROUPS])
for group, tab in zip(GROUPS, tabs):
    with tab:
        names = [n for n, f in FIELDS.items() if f.metadata["group"] == group]
        columns = st.columns(3)
        for i, name in enumerate(names):
            with columns[i % 3]:
                field_widget(name, slots)
        if group == "optimisation" and gpu_count > 1:
            st.caption(f"{gpu_count} GPUs are visible: set processes to {gpu_count} to use them all.")
        if group == "advanced" and st.session_state.get(KEY + "trust_remote_code"):
            st.warning("Trust remote code runs Python code from the model folder in the trainer. Tick it only for "
                       "a model you trust.")
        if group == "advanced" and st.session_state.get(KEY + "precision") != "full":
            st.info("8-bit and 4-bit base models load through bitsandbytes; the LoRA itself trains in full "
                    "precision (prepare_model_for_kbit_training).")

values = {name: st.session_state.get(KEY + name, st.session_state["train_form"].get(name)) for name in FIELDS}
st.session_state["train_form"] = values
try:
    params = TrainingParameters.from_dict(values)
    problems = params.problems()
except DashboardError as exc:
    params, problems = None, [exc]
if params is not None and (bnb_message := bitsandbytes_problem(params.precision, params.optimizer)):
    problems.append(DashboardError(bnb_message, field="precision" if params.precision != "full" else "optimizer"))
for problem in problems:
    slot = slots.get(problem.field or "")
    (slot or st).error(problem.message)


# ---- plan: samples, steps per epoch, total steps -------------------------------------------------
@st.cache_data(show_spinner="Preparing the samples...", max_entries=8)
def plan(data_key: dict, stamp: tuple) -> dict:
    params = TrainingParameters.from_dict(data_key)
    preview = build_samples(params, get_tokenizer(params.base_model, params.trust_remote_code))
    unmatched = unmatched_rows_error(preview)
    return {"lengths": [s.n_tokens for s in preview.samples], "tokens": preview.stats["tokens"],
            "unmatched": unmatched.message if unmatched else None}


def dataset_stamp(params: TrainingParameters) -> tuple:
    from trainer.home import resolve_user_path

    stamps = []
    for value in (params.dataset, params.raw_text_file, params.format):
        if value:
            path = resolve_user_path(value, "format" if value == params.format else "dataset")
            files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
            stamps += [(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files if p.exists()]
    return tuple(stamps)


st.subheader("Plan")
plan_ok = False
data_fields = {"base_model", "dataset", "raw_text_file", "format", "cutoff_len", "overlap_len", "newline_favor_len",
               "hard_cut_string", "min_chars", "train_only_after", "add_eos_token", "add_bos_token",
               "overlong_samples", "trust_remote_code"}
if params is not None and not any(p.field != "lora_name" for p in problems):
    try:
        info = plan({k: v for k, v in params.to_dict().items() if k in data_fields}, dataset_stamp(params))
        steps = batching.plan(info["lengths"], params)
        cols = st.columns(6)
        cols[0].metric("Samples", steps["samples"])
        cols[1].metric("Rows", steps["rows"], help="Samples packed into rows of cutoff length (packing)."
                       if params.packing else "One sample per row (packing is off).")
        cols[2].metric("Tokens", f"{info['tokens']:,}")
        cols[3].metric("Accumulation", f"{params.gradient_accumulation_steps}",
                       help="batch size / micro batch size micro-batches per optimiser step")
        cols[4].metric("Steps per epoch", steps["steps_per_epoch"])
        cols[5].metric("Total steps", steps["total_steps"])
        if info["unmatched"] and not params.skip_unmatched_rows:
            st.error(info["unmatched"])
        else:
            plan_ok = True
    except DashboardError as exc:
        st.error(exc.message)
else:
    st.info("Fix the fields marked above to see the plan.")


# ---- start ------------------------------------------------------------------------------------
st.subheader("Start")
name = st.session_state.get(KEY + "lora_name", "")
mode = "new"
existing = None
if params is not None and not any(p.field == "lora_name" for p in problems):
    existing = run_dir_for(name)
    if existing.exists():
        status = effective_status(existing) or {}
        if status.get("state") in LIVE_STATES:
            st.warning(f"{name} is running now; follow it below.")
        choice = st.radio(
            f"A LoRA named {name} already exists ({status.get('state', 'no status')}).",
            ["Choose another name", "Resume it from a checkpoint", "Overwrite it (the old folder is kept as a backup)"],
            key="existing_choice")
        mode = {"Choose another name": "none", "Resume it from a checkpoint": "resume"}.get(choice, "overwrite")
checkpoint = "latest"
if mode == "resume" and existing is not None:
    names = [c.name for c in list_checkpoints(existing)]
    if names:
        checkpoint = st.selectbox("Checkpoint", names[::-1], key="resume_checkpoint")
    else:
        st.error(f"{name} has no checkpoint to resume from.")
        mode = "none"

with st.expander("More than one machine"):
    st.caption("For a run folder on storage every machine sees at the same path: start the run on each machine "
               "with its command (node 0 hosts the rendezvous), then follow it below like any other run. "
               "The batch size is the global batch: micro batch x accumulation x all processes.")
    c1, c2, c3 = st.columns(3)
    nodes = c1.number_input("Machines", min_value=2, max_value=64, value=2, key="mn_nodes")
    per_node = c2.number_input("Processes (GPUs) per machine", min_value=1, max_value=16, value=gpu_count or 1,
                               key="mn_per_node")
    endpoint = c3.text_input("Node 0 address:port", value="node0:29500", key="mn_endpoint")
    if name and not any(p.field == "lora_name" for p in problems):
        st.code("\n".join(f"# machine {i}\n{cmd}" for i, cmd in enumerate(
            multi_node_commands(run_dir_for(name), int(nodes), int(per_node), endpoint))), language="bash")
        if params is not None and not (run_dir_for(name) / PARAMS_FILE).exists():
            if st.button("Write the run folder for these machines", disabled=bool(problems)):
                try:
                    run_dir_for(name).mkdir(parents=True, exist_ok=False)
                    stored = TrainingParameters.from_dict({**params.to_dict(), "num_processes": int(nodes * per_node)})
                    stored.write(run_dir_for(name) / PARAMS_FILE)
                    st.success(f"Wrote {run_dir_for(name) / PARAMS_FILE}; run the commands above.")
                except OSError as exc:
                    st.error(f"Cannot write {run_dir_for(name)}: {exc.strerror or exc}.")

can_start = params is not None and not problems and plan_ok and mode != "none"
if st.button("Start training", type="primary", disabled=not can_start):
    try:
        run_dir = launch(params, mode=mode, checkpoint=checkpoint)
        st.session_state["active_run"] = run_dir.name
        st.toast(f"Started {run_dir.name}")
    except DashboardError as exc:
        st.error(exc.message)


# ---- follow a run -----------------------------------------------------------------------------
st.divider()
st.subheader("Runs")
runs = list_runs()
if not runs:
    st.caption("No runs yet.")
    st.stop()
live = [r.name for r in runs if (effective_status(r) or {}).get("state") in LIVE_STATES]
names = [r.name for r in runs]
default = st.session_state.get("active_run")
if default not in names:
    default = live[0] if live else names[0]
# The options stay the plain names: a label that changes when a run starts or ends would make Streamlit
# hand back the changed label instead of the chosen name.
shown = st.selectbox("Run", names, index=names.index(default), key="shown_run")
if live:
    st.caption("Running now: " + ", ".join(live))


def loss_chart(metrics: list[dict]) -> alt.Chart | None:
    rows = [r for r in metrics if "loss" in r]
    if not rows:
        return None
    frame = pd.DataFrame(rows)[["step", "loss"]]
    if len(frame) > 2000:  # keep the chart light: every n-th point, the last one always kept
        frame = pd.concat([frame.iloc[:: len(frame) // 2000 + 1], frame.iloc[[-1]]]).drop_duplicates("step")
    chart = alt.Chart(frame).mark_line(point=len(frame) < 60).encode(
        x=alt.X("step:Q", title="step"), y=alt.Y("loss:Q", title="training loss", scale=alt.Scale(zero=False)),
        tooltip=["step", "loss"])
    evals = [r for r in metrics if "eval_loss" in r]
    if evals:
        eval_frame = pd.DataFrame(evals)[["step", "eval_loss"]]
        chart = chart + alt.Chart(eval_frame).mark_line(color="#2b8a3e", point=True).encode(
            x="step:Q", y=alt.Y("eval_loss:Q"), tooltip=["step", "eval_loss"])
    return chart.properties(height=260)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@st.fragment(run_every=2)
def follow(run_name: str, listed_as_live: bool) -> None:
    run_dir = run_dir_for(run_name)
    status = effective_status(run_dir) or {}
    state = status.get("state", "unknown")
    if (state in LIVE_STATES) != listed_as_live:
        st.rerun(scope="app")  # the run started or ended: refresh the "Running now" line above
    metrics = read_metrics(run_dir)
    last = next((r for r in reversed(metrics) if "loss" in r), {})
    step, total = status.get("step") or 0, status.get("total_steps") or 0
    icon = {"running": "🟢", "queued": "⏳", "completed": "✅", "stopped": "⏹️", "failed": "❌"}.get(state, "❔")
    st.markdown(f"**{icon} {run_name}: {state}**" + (f" — {status['reason']}" if status.get("reason") else ""))
    if status.get("error"):
        st.error(status["error"])
    st.progress(min(step / total, 1.0) if total else 0.0, text=f"step {step} / {total or '?'}")
    cols = st.columns(5)
    cols[0].metric("Epoch", f"{last.get('epoch', 0):.2f}")
    cols[1].metric("Loss", f"{last['loss']:.4f}" if "loss" in last else "—")
    cols[2].metric("Elapsed", format_seconds(last.get("elapsed_s")))
    cols[3].metric("ETA", format_seconds(last.get("eta_s")) if state in LIVE_STATES else "—")
    cols[4].metric("Tokens/s", f"{last.get('tokens_per_second', 0):,.0f}")
    if "loss" in last:
        if last["loss"] == 0.0:
            st.error("A loss of exactly 0 means something is broken (all labels masked, bad data), not a perfect "
                     "model.")
        elif last["loss"] < 1.0:
            st.warning("The loss is under 1.0: the model may be memorising your text and forgetting what it knew. "
                       "Check a checkpoint on the Evaluate page (forgetting check) before training further.")
    chart = loss_chart(metrics)
    if chart is not None:
        st.altair_chart(chart, width="stretch")
    if state in LIVE_STATES:
        if st.button("Stop", key=f"stop_{run_name}", help="Finish the current step, save the adapter and a "
                                                            "checkpoint, then end as stopped."):
            try:
                request_stop(run_dir)
                st.toast("Stop requested; the run ends after its current step.")
            except OSError as exc:
                st.error(f"Cannot write the stop request into {run_dir}: {exc.strerror or exc}.")
    elif state in ("stopped", "failed") and list_checkpoints(run_dir):
        if st.button("Resume from the newest checkpoint", key=f"resume_{run_name}"):
            try:
                stored = TrainingParameters.from_file(run_dir / PARAMS_FILE)
                launch(stored, mode="resume")
                st.session_state["active_run"] = run_name
            except DashboardError as exc:
                st.error(exc.message)
    log = run_dir / LOG_FILE
    if log.exists():
        with st.expander("Log (last 40 lines)", expanded=state == "failed"):
            st.code("\n".join(log.read_text(errors="replace").splitlines()[-40:]) or "(empty)", language=None)


follow(shown, shown in live)
