"""Train page: every parameter, validated before launch; a run starts as a subprocess and is followed
through its files (status.json, metrics.jsonl, train.log), so a reload or a second tab re-attaches."""

from __future__ import annotations

import streamlit as st

from views.common import (get_tokenizer, home_caption, keep_widget_values, offered_options, parameter_widget,
                          set_widget_values, show_error, show_problems, take_sent_options)
from trainer.checkpoints import list_checkpoints
from trainer.errors import DashboardError
from trainer.loss import loss_warning
from trainer.params import FIELDS, GROUPS, TrainingParameters, read_and_check
from trainer.preview import training_plan
from trainer.charts import loss_chart
from trainer.metrics import latest_train_line, metrics_frame
from trainer.processes import LIVE_STATES
from trainer.runfiles import LOG_FILE, PARAMS_FILE, effective_status, request_stop
from trainer.storage import read_json
from trainer.runs import launch, list_runs, multi_node_commands, run_dir_for

GROUP_TITLES = {"basic": "Basic", "data": "Data", "lora": "LoRA", "optimisation": "Optimisation",
                "advanced": "Advanced"}
KEY = "tp_"  # widget keys: tp_<parameter name>


@st.cache_resource
def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def load_into_form(values: dict) -> None:
    """Put these parameters (read as training_parameters.json is) into the form's fields."""
    params = TrainingParameters.from_dict(values)
    set_widget_values({KEY + name: value for name, value in params.to_dict().items()})


st.title("Train")
home_caption()
gpu_count = visible_gpus()

# ---- state: defaults (the Data page's last clean options first), copied parameters, sent options ------
keep_widget_values({KEY + name: value for name, value in TrainingParameters.from_dict(
    {**TrainingParameters().to_dict(), **(offered_options() or {})}).to_dict().items()})
sent = take_sent_options()
if sent:
    load_into_form({**{name: st.session_state[KEY + name] for name in FIELDS}, **sent})

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
                set_widget_values({KEY + "lora_name": f"{source}-2"})
                st.rerun()
            except DashboardError as exc:
                st.error(exc.message)
    if offered_options() and st.button("Use the Data page's settings"):
        load_into_form({**{name: st.session_state[KEY + name] for name in FIELDS}, **offered_options()})
        st.rerun()


# ---- the form ----------------------------------------------------------------------------------
slots: dict = {}
tabs = st.tabs([GROUP_TITLES[g] for g in GROUPS])
for group, tab in zip(GROUPS, tabs):
    with tab:
        names = [n for n, f in FIELDS.items() if f.metadata["group"] == group]
        columns = st.columns(3)
        for i, name in enumerate(names):
            with columns[i % 3]:
                slots[name] = parameter_widget(name, KEY + name)
        if group == "optimisation" and gpu_count > 1:
            st.caption(f"{gpu_count} GPUs are visible: set processes to {gpu_count} to use them all.")
        if group == "advanced" and st.session_state.get(KEY + "trust_remote_code"):
            st.warning("Trust remote code runs Python code from the model folder in the trainer. Tick it only for "
                       "a model you trust.")
        if group == "advanced" and st.session_state.get(KEY + "precision") != "full":
            st.info("8-bit and 4-bit base models load through bitsandbytes; the LoRA itself trains in full "
                    "precision (prepare_model_for_kbit_training).")

params, problems = read_and_check({name: st.session_state[KEY + name] for name in FIELDS})
show_problems(problems, slots)


# ---- plan: samples, steps per epoch, total steps -------------------------------------------------
def show_plan(plan: dict, params: TrainingParameters) -> None:
    cols = st.columns(6)
    cols[0].metric("Samples", plan["samples"])
    cols[1].metric("Rows", plan["rows"], help="Samples packed into rows of cutoff length (packing)."
                   if params.packing else "One sample per row (packing is off).")
    cols[2].metric("Tokens", f"{plan['tokens']:,}")
    cols[3].metric("Accumulation", f"{plan['accumulation']}",
                   help="batch size / micro batch size micro-batches per optimiser step")
    cols[4].metric("Steps per epoch", plan["steps_per_epoch"])
    cols[5].metric("Total steps", plan["total_steps"])


st.subheader("Plan")
plan_ok = False
if params is not None and not any(p.field != "lora_name" for p in problems):
    try:
        with st.spinner("Preparing the samples..."):
            plan = training_plan(params, get_tokenizer(params.base_model, params.trust_remote_code))
        show_plan(plan, params)
        if plan["problem"]:
            st.error(plan["problem"])
        else:
            plan_ok = True
    except DashboardError as exc:
        show_error(exc)
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
    frame = metrics_frame(run_dir)
    last = latest_train_line(frame)
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
    warning = loss_warning(last["loss"]) if "loss" in last else None
    if warning:
        (st.error if warning[0] == "error" else st.warning)(warning[1])
    chart = loss_chart(frame)
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
