"""Train page: every parameter, validated before launch; a run starts as a subprocess and is followed
through its files (status.json, metrics.jsonl, train.log), so a reload or a second tab re-attaches."""

from __future__ import annotations

from contextlib import ExitStack

import streamlit as st

from views.common import (KEEP_WHILE_HIDDEN, field_choices, flash, get_tokenizer, home_caption, keep_widget_values,
                          offered_options, parameter_widget, set_widget_values, show_error, show_flash, show_problems,
                          take_sent_options)
from trainer import runqueue
from trainer.checkpoints import list_checkpoints
from trainer.errors import DashboardError
from trainer.formstate import GROUP_TITLES, fix_sentence, tab_marks
from trainer.loss import loss_warning
from trainer.params import FIELDS, GROUPS, TrainingParameters, label, read_and_check
from trainer.preview import memory_sentence, training_plan
from trainer.charts import loss_chart
from trainer.metrics import latest_train_line, metrics_frame
from trainer.processes import LIVE_STATES
from trainer.runfiles import LOG_FILE, PARAMS_FILE, effective_status, request_stop
from trainer.runtable import run_base_model
from trainer.targets import describe_targets
from trainer.storage import read_json
from trainer.runs import (busy_device_warning, free_run_name, launch, list_runs, live_runs, multi_node_commands,
                          queue_rows, run_dir_for, start_now, start_waiting_runs, waiting_runs, write_multi_node_run)
from trainer.sweeps import launch_sweep, plan_sweep, read_sweep_texts, sweepable_parameters, value_text

KEY = "tp_"  # widget keys: tp_<parameter name>
TABS = "form_tabs"  # the key of the form's tabs (their CSS class: st-key-form_tabs)
SHOWN_RUN, ACTIVE_RUN = "shown_run", "active_run"  # the Runs panel's selectbox; the run last started here
LOG_OPEN = "run_log_open"  # whether the shown run's log is open
SHOWN_RUN_SET = "shown_run_set"  # the script chose the shown run in this run of the page (see runs_panel)
RUN_BESIDE = "run_beside"  # Start on a busy device: run beside the live runs instead of queueing
SWEPT, SWEEP_VALUES = "sweep_params", "sweep_values_"  # the parameters swept; their values: sweep_values_<name>


@st.cache_resource
def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def load_into_form(values: dict) -> None:
    """Put these parameters (read as training_parameters.json is) into the form's fields."""
    params = TrainingParameters.from_dict(values)
    set_widget_values({KEY + name: value for name, value in params.to_dict().items()})


def follow_run(name: str) -> None:
    """Show this run in the Runs panel below (drawn later in this run, so its selectbox can still be set)."""
    st.session_state[ACTIVE_RUN] = st.session_state[SHOWN_RUN] = name
    st.session_state[SHOWN_RUN_SET] = True


def continue_the_queue() -> None:
    """Start the next queued run of every idle device, so the queue goes on after a restarted server even
    before a run ends (cheap: with nothing queued no file is read but the queue's)."""
    try:
        start_waiting_runs()
    except (DashboardError, OSError) as exc:
        st.warning(f"The run queue could not start its next run: {getattr(exc, 'message', None) or exc}. It is "
                   f"tried again when a run ends or this page is loaded.")


st.title("Train")
home_caption()
gpu_count = visible_gpus()
continue_the_queue()

# ---- state: defaults (the Data page's last clean options first), copied parameters, sent options ------
def first_form_values() -> tuple[dict, dict]:
    """The form's first values (the Data page's last clean options over the defaults, a free name suggested)
    and the baseline a value missing from the form file stands for. A reload starts from the saved form."""
    suggested = free_run_name()
    first = {**TrainingParameters().to_dict(), **(offered_options() or {})}
    first = TrainingParameters.from_dict({**first, "lora_name": first["lora_name"] or suggested}).to_dict()
    baseline = {**TrainingParameters().to_dict(), "lora_name": suggested}
    return {KEY + n: v for n, v in first.items()}, {KEY + n: v for n, v in baseline.items()}


first_values, baseline = first_form_values()
keep_widget_values(first_values, baseline=baseline, choices=field_choices(KEY))
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
                # A webui run names its base model only in its log or its adapter's config.
                stored.setdefault("base_model", run_base_model(run_dir_for(source)) or None)
                load_into_form(stored)
                set_widget_values({KEY + "lora_name": f"{source}-2"})
                st.rerun()
            except DashboardError as exc:
                st.error(exc.message)
    if offered_options() and st.button("Use the Data page's settings"):
        load_into_form({**{name: st.session_state[KEY + name] for name in FIELDS}, **offered_options()})
        st.rerun()

# ---- everything above the runs panel: one container ------------------------------------------------
# The runs panel at the bottom refreshes itself (a fragment). However many elements the form, the plan and the
# start section draw, they are all inside this one container, so the panel keeps its place on the page: a panel
# that moved between two runs of the page left its old copy beside the new one until the run ended (two
# progress bars at once).
above_the_runs = ExitStack()
above_the_runs.enter_context(st.container())


# ---- the form: a tab with a problem is marked ------------------------------------------------------
def mark_tabs(problems: list[DashboardError]) -> None:
    """Mark each tab that holds a problem ("Data ⚠ 1") by a style rule, not by its label: tabs whose labels
    change are new tabs to the browser, which then opens the first one, away from the field being fixed."""
    rules = [f'.st-key-{TABS} [data-testid="stTab"][data-key="{i}"] p::after {{content: " {mark}"; color: #e03131}}'
             for i, mark in enumerate(tab_marks(problems)) if mark]
    st.html(f"<style>{' '.join(rules)}</style>")  # always drawn, so the page's layout does not change


def draw_form(problems: list[DashboardError]) -> dict:
    """Every parameter in its group's tab; returns the container under each field for its problems."""
    slots: dict = {}
    mark_tabs(problems)
    for group, tab in zip(GROUPS, st.tabs([GROUP_TITLES[g] for g in GROUPS], key=TABS)):
        with tab:
            names = [n for n, f in FIELDS.items() if f.metadata["group"] == group]
            columns = st.columns(3)
            for i, name in enumerate(names):
                with columns[i % 3]:
                    slots[name] = parameter_widget(name, KEY + name)
            if group == "optimisation" and gpu_count > 1:
                st.caption(f"{gpu_count} GPUs are visible: set processes to {gpu_count} to use them all.")
            if group == "advanced" and st.session_state.get(KEY + "trust_remote_code"):
                st.warning("Trust remote code runs Python code from the model folder in the trainer. Tick it only "
                           "for a model you trust.")
            if group == "advanced" and st.session_state.get(KEY + "precision") != "full":
                st.info("8-bit and 4-bit base models load through bitsandbytes; the LoRA itself trains in full "
                        "precision (prepare_model_for_kbit_training).")
    return slots


# The values are checked before the form is drawn, so that each tab can be marked with the problems it holds.
params, problems = read_and_check({name: st.session_state[KEY + name] for name in FIELDS})
slots = draw_form(problems)
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
    disk = plan["footprint"].describe() if plan["footprint"] else f"Disk: not estimated ({plan['footprint_error']})"
    st.caption(f"Warm-up {plan['warmup_steps']} of {plan['total_steps']} steps. {disk}")
    st.caption(memory_sentence(plan))
    try:
        st.caption(describe_targets(params.base_model, params.target_modules, params.custom_target_modules,
                                    params.trust_remote_code))
    except DashboardError as exc:
        show_error(exc)


def show_plan_findings(plan: dict, slots: dict) -> None:
    """The plan's refusals (errors: Start stays disabled) and warnings (Start stays enabled), each here, where
    Start is, and under its field."""
    for finding, draw in [(p, show_error) for p in plan["problems"]] + [(w, show_warning) for w in plan["warnings"]]:
        draw(finding)
        if finding.field in slots:
            with slots[finding.field]:
                draw(finding)


def show_warning(warning: DashboardError) -> None:
    st.warning(warning.message, icon="💡")


st.subheader("Plan")
plan_ok = False
if params is not None and not any(p.field != "lora_name" for p in problems):
    try:
        with st.spinner("Preparing the samples..."):
            plan = training_plan(params, get_tokenizer(params.base_model, params.trust_remote_code))
        show_plan(plan, params)
        show_plan_findings(plan, slots)
        plan_ok = not plan["problems"]
    except DashboardError as exc:
        show_error(exc)
else:
    st.info(fix_sentence(problems))


# ---- start ------------------------------------------------------------------------------------
def start_mode(name: str) -> tuple[str, str]:
    """How Start treats the typed name: new, or (an existing run) resume, overwrite or not at all; and the
    checkpoint to resume from."""
    existing = run_dir_for(name)
    if not existing.exists():
        return "new", "latest"
    state = (effective_status(existing) or {}).get("state", "no status")
    choice = st.radio(
        f"A LoRA named {name} already exists ({state}).",
        ["Choose another name", "Resume it from a checkpoint", "Overwrite it (the old folder is kept as a backup)"],
        key="existing_choice")
    mode = {"Choose another name": "none", "Resume it from a checkpoint": "resume"}.get(choice, "overwrite")
    if mode != "resume":
        return mode, "latest"
    names = [c.name for c in list_checkpoints(existing)]
    if not names:
        st.error(f"{name} has no checkpoint to resume from.")
        return "none", "latest"
    return "resume", st.selectbox("Checkpoint", names[::-1], key="resume_checkpoint")


def more_than_one_machine(params: TrainingParameters | None, problems: list, name: str | None) -> None:
    """The commands for a run over several machines, and the button that writes its run folder."""
    with st.expander("More than one machine", key="multi_machine_open", on_change="rerun"):
        st.caption("For a run folder on storage every machine sees at the same path: start the run on each machine "
                   "with its command (node 0 hosts the rendezvous), then follow it below like any other run. "
                   "The batch size is the global batch: micro batch x accumulation x all processes.")
        c1, c2, c3 = st.columns(3)
        nodes = int(c1.number_input("Machines", min_value=2, max_value=64, value=2, key="mn_nodes"))
        per_node = int(c2.number_input("Processes (GPUs) per machine", min_value=1, max_value=16,
                                       value=gpu_count or 1, key="mn_per_node"))
        endpoint = c3.text_input("Node 0 address:port", value="node0:29500", key="mn_endpoint")
        run_dir = run_dir_for(name) if name else None
        st.code("\n".join(f"# machine {i}\n{cmd}" for i, cmd in enumerate(
            multi_node_commands(run_dir, nodes, per_node, endpoint))), language="bash")
        if run_dir is None:
            st.caption("NAME stands for the LoRA name: type one in the Basic tab.")
        elif params is not None and not (run_dir / PARAMS_FILE).exists():
            if st.button("Write the run folder for these machines", disabled=bool(problems)):
                try:
                    written = write_multi_node_run(params, nodes, per_node)
                except DashboardError as exc:
                    st.error(exc.message)
                else:
                    flash("machines", "success", f"Wrote {written / PARAMS_FILE}; run the commands above.")
                    st.rerun()
        show_flash("machines")


def running_now_note(name: str, live: list[str], processes: int) -> bool:
    """What runs now, beside Start: the typed name's own run, or the runs holding the device a new run would take,
    with the choice to run beside them instead of queueing; returns that choice. (The runs panel reruns the page
    when a run starts or ends, so this is never stale.)"""
    if name in live:
        st.warning(f"{name} is running now; follow it below.")
        return False
    if busy_device_warning(processes, gpu_count) is None:
        return False  # an idle device: the box is not drawn, so it is unticked when the device is busy again
    beside = st.checkbox("Run beside the running one instead of queueing", key=RUN_BESIDE,
                         help="Start it now on the same device instead of waiting in the queue.")
    st.warning(busy_device_warning(processes, gpu_count, beside=beside))
    return beside


def start_section(params: TrainingParameters | None, problems: list, plan_ok: bool, live: list[str]) -> None:
    st.subheader("Start")
    name = st.session_state.get(KEY + "lora_name", "")
    name_ok = params is not None and bool(name) and not any(p.field == "lora_name" for p in problems)
    mode, checkpoint = start_mode(name) if name_ok else ("new", "latest")
    more_than_one_machine(params, problems, name if name_ok else None)
    beside = running_now_note(name, live, params.num_processes if params is not None else 1)
    can_start = params is not None and not problems and plan_ok and mode != "none"
    if st.button("Start training", type="primary", disabled=not can_start):
        try:
            run_dir = launch(params, mode=mode, checkpoint=checkpoint, beside=beside)
        except DashboardError as exc:
            st.error(exc.message)
        else:
            follow_run(run_dir.name)
            waits = run_dir.name in waiting_runs()
            flash("start", "success", f"{run_dir.name} is in the queue: it starts when the device is free; it is shown "
                                      f"under Runs below." if waits else
                  f"Started {run_dir.name}{' beside the running one' if beside else ''}; it is shown under Runs below.")
            st.rerun()  # the page as it is now: the name taken, the run live, the panel following it
    show_flash("start")
    sweep_section(params, problems, plan_ok)


# ---- a sweep: several values for some parameters, every combination a queued run ------------------------
def sweep_value_text(name: str) -> str:
    """The list of values for one swept parameter as text: picked from its choices, or typed."""
    key, choices = SWEEP_VALUES + name, FIELDS[name].metadata["choices"]
    if choices:
        return ", ".join(st.multiselect(f"{label(name)}: values", choices, key=key, persist_state=KEEP_WHILE_HIDDEN))
    current = st.session_state.get(KEY + name)
    return st.text_input(f"{label(name)}: values, separated by commas", key=key, persist_state=KEEP_WHILE_HIDDEN,
                         placeholder=f"for example {current}, ..." if current is not None else None)


def sweep_inputs() -> tuple[dict, list[DashboardError], bool]:
    """The swept parameters with their values read, the problems under their fields, and whether every list
    has a value yet (an empty list is a list not typed yet, not an error)."""
    chosen = st.multiselect("Parameters to sweep", sweepable_parameters(), format_func=label, key=SWEPT,
                            persist_state=KEEP_WHILE_HIDDEN)
    texts, slots = {}, {}
    for name in chosen:
        texts[name] = sweep_value_text(name)
        slots[name] = st.container()
    typed = {name: text for name, text in texts.items() if text.strip()}
    swept, problems = read_sweep_texts(typed)
    show_problems(problems, slots)
    return swept, problems, bool(chosen) and len(typed) == len(chosen)


def sweep_section(params: TrainingParameters | None, problems: list, plan_ok: bool) -> None:
    """Lists of values for some parameters: the grid's run names shown before anything is written, then queued
    as one experiment named after the LoRA name."""
    with st.expander("Sweep (try several values)", key="sweep_open", on_change="rerun"):
        st.caption("Give some parameters a list of values: every combination becomes a run named after the LoRA "
                   "name and its values, with the form's other parameters. They are recorded as one experiment "
                   "(the Evaluate page compares them) and queued: they run one after another.")
        show_flash("sweep")
        swept, value_problems, complete = sweep_inputs()
        if not complete or value_problems:
            if not value_problems:
                st.caption("Pick the parameters to sweep and give each one or more values.")
            return
        if params is None or problems or not plan_ok:
            st.info("Fix the form above first: each run of the sweep is the form's parameters with its values.")
            return
        try:
            runs = plan_sweep(params, swept)
        except DashboardError as exc:
            show_error(exc)
            return
        st.caption(f"Experiment {params.lora_name}: {len(runs)} run{'s' if len(runs) != 1 else ''}, queued in this "
                   f"order.")
        st.dataframe([{"run": p.lora_name, **{label(n): value_text(getattr(p, n)) for n in swept}} for p in runs],
                     hide_index=True)
        if st.button(f"Queue {len(runs)} run{'s' if len(runs) != 1 else ''}", key="queue_sweep"):
            try:
                run_dirs = launch_sweep(params, swept, name=params.lora_name)
            except DashboardError as exc:
                st.error(exc.message)
            else:
                follow_run(run_dirs[0].name)
                flash("sweep", "success", f"Queued experiment {params.lora_name}: {len(run_dirs)} runs, one after "
                                          f"another; they are shown under Runs below.")
                st.rerun()


live_now = (tuple(live_runs()), tuple(waiting_runs()))  # one answer for the whole page (start section, runs panel)
start_section(params, problems, plan_ok, list(live_now[0]))
above_the_runs.close()


# ---- follow a run -----------------------------------------------------------------------------
def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_controls(run_name: str, run_dir, state: str) -> None:
    """Stop for a live run; resume for a stopped or failed one that has a checkpoint; nothing for a run waiting in
    the queue (its buttons are in the queue above)."""
    if runqueue.entry(run_name) is not None:
        st.caption(f"{run_name} waits in the queue (place {runqueue.position(run_name)}): move it, cancel it or "
                   f"start it now in the queue above.")
    elif state in LIVE_STATES:
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
                launch(TrainingParameters.from_file(run_dir / PARAMS_FILE), mode="resume")
                st.session_state[ACTIVE_RUN] = run_name
            except DashboardError as exc:
                st.error(exc.message)


def run_log(run_dir, state: str) -> None:
    """The end of train.log, in an expander whose state the page keeps (the browser forgot it at every refresh):
    open at first for a failed run, then as the person left it. One key for every run shown: the browser reuses
    the expander drawn for the run shown before, and a key per run made a click open that other run's log."""
    log = run_dir / LOG_FILE
    if not log.exists():
        return
    if LOG_OPEN not in st.session_state:
        st.session_state[LOG_OPEN] = state == "failed"
    with st.expander("Log (last 40 lines)", key=LOG_OPEN, on_change="rerun"):
        st.code("\n".join(log.read_text(errors="replace").splitlines()[-40:]) or "(empty)", language=None)


# ---- the queue: reorder, cancel, start now ---------------------------------------------------------------
QUEUE_SLOT = "queue"  # the flash slot of the queue's actions


def queue_action(action, name: str) -> None:
    """A queue button's callback: it runs before the panel is drawn, so the panel shows the queue as it is
    after the action; its outcome (or the sentence of a refusal) is shown once above the queue."""
    try:
        outcome = action(name)
    except DashboardError as exc:
        flash(QUEUE_SLOT, "error", exc.message)
    else:
        if outcome:
            flash(QUEUE_SLOT, "success", outcome)


def move_up(name: str) -> None:
    runqueue.move(name, -1)


def move_down(name: str) -> None:
    runqueue.move(name, 1)


def cancel_queued(name: str) -> str:
    runqueue.cancel(run_dir_for(name))
    return f"Cancelled {name}: it left the queue and never started; its folder stays, as stopped."


def start_queued_now(name: str) -> str:
    start_now(name)
    return f"Started {name} now, beside the runs on its device."


def queue_row(row: dict) -> None:
    """One waiting run: its place, name, device and start, and its buttons."""
    name = row["name"]
    cols = st.columns([3, 1, 1, 1.3, 1.6], vertical_alignment="center")
    # Material icons, not emoji: they come with Streamlit's own font, so every browser draws them.
    cols[0].markdown(f"**{row['place']}.** :material/hourglass_top: {name} · {row['device']} · {row['mode']}")
    cols[1].button("Up", key=f"queue_up_{name}", icon=":material/arrow_upward:", help="Earlier in the queue",
                   disabled=row["place"] == 1, on_click=queue_action, args=(move_up, name), width="stretch")
    cols[2].button("Down", key=f"queue_down_{name}", icon=":material/arrow_downward:", help="Later in the queue",
                   disabled=row["place"] == row["of"], on_click=queue_action, args=(move_down, name), width="stretch")
    cols[3].button("Cancel", key=f"queue_cancel_{name}", icon=":material/close:", on_click=queue_action,
                   args=(cancel_queued, name), help="Take it out of the queue; its folder stays, as stopped.",
                   width="stretch")
    cols[4].button("Start now", key=f"queue_start_{name}", icon=":material/play_arrow:", on_click=queue_action,
                   args=(start_queued_now, name), help="Start it at once, beside the runs on its device.",
                   width="stretch")


def queue_panel() -> None:
    """The runs waiting for their device, in order (drawn inside the refreshing runs panel)."""
    rows = queue_rows()
    show_flash(QUEUE_SLOT)
    if not rows:
        return
    st.markdown(f"**Queue** — {len(rows)} run{'s' if len(rows) != 1 else ''} waiting, started one after another "
                f"as the device falls free")
    for row in rows:
        queue_row(row)
    beside = sorted({run for row in rows for run in row["beside"]})
    if beside:
        st.warning(f"Start now runs a queued run at once, beside {', '.join(beside)}: they share the device, each "
                   f"runs slower, and together they may run out of memory.")


@st.fragment(run_every=2)
def follow(run_name: str, live_when_drawn: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    """The shown run, refreshed every two seconds from its files, and which runs are live now. When a run has
    started or ended since the page was drawn, the whole page is drawn again (the start section says what runs);
    the panel keeps its place on the page (see `above_the_runs`), so no copy of it is left behind."""
    if (tuple(live_runs()), tuple(waiting_runs())) != live_when_drawn:
        st.rerun(scope="app")
    running_now = st.empty()  # filled last, after a Stop or Resume of this refresh
    queue_panel()
    run_dir = run_dir_for(run_name)
    status = effective_status(run_dir) or {}
    state = status.get("state", "unknown")
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
    run_controls(run_name, run_dir, state)
    run_log(run_dir, state)
    live, waiting = live_runs(), waiting_runs()
    running_now.caption(("Running now: " + ", ".join(live) if live else "Nothing is running now.")
                        + (" · Waiting in the queue: " + ", ".join(waiting) if waiting else ""))


def runs_panel(live: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    """The run shown: the one just started here, else the one chosen, else a live one, else the newest."""
    st.subheader("Runs")
    names = [r.name for r in list_runs()]
    if not names:
        st.caption("No runs yet.")
        return
    if st.session_state.get(SHOWN_RUN) not in names:  # first drawn, or back from another page
        wanted = st.session_state.get(ACTIVE_RUN)
        st.session_state[SHOWN_RUN] = wanted if wanted in names else (live[0][0] if live[0] else names[0])
        st.session_state[SHOWN_RUN_SET] = True
    # The box's default is the run shown, except in a run that chose it (Streamlit warns when given both): a
    # browser that draws the box afresh (a click while the page's first run was under way) showed the first name
    # while the panel followed another run.
    index = 0 if st.session_state.pop(SHOWN_RUN_SET, False) else names.index(st.session_state[SHOWN_RUN])
    # The options stay the plain names: a label that changes when a run starts or ends would make Streamlit
    # hand back the changed label instead of the chosen name.
    follow(st.selectbox("Run", names, index=index, key=SHOWN_RUN), live)


st.divider()
with st.container():
    runs_panel(live_now)
