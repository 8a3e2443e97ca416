"""Unit tests of trainer.evaluation: reading runs (ours and webui's), chart data, results, forgetting, prompts."""

from __future__ import annotations

import json
import math
import os
import time

import altair as alt
import numpy as np
import pandas as pd
import pytest

from trainer import evaluation as ev
from trainer.data import load_format
from trainer.errors import DashboardError
from trainer.home import CODE_ROOT

from .evalhelpers import (
    BIG_LINES, ZERO_STEP, copy_run, eval_line, make_big_run, make_run, make_running_run, make_webui_run,
    train_line, trained_run_source, write_status,
)


# ---- metrics.jsonl ---------------------------------------------------------------------------------


def test_metrics_frame_reads_train_and_eval_lines(home):
    run_dir = make_run(home, "r", losses=[2.0, 1.5, 0.0, 1.2], evals={2: 1.7, 4: 1.6})
    frame = ev.metrics_frame(run_dir)
    assert list(frame.loc[~frame["is_eval"], "loss"]) == [2.0, 1.5, 0.0, 1.2]  # 0.0 is a value
    assert list(frame.loc[frame["is_eval"], "eval_loss"]) == [1.7, 1.6]
    assert list(frame.loc[frame["is_eval"], "step"]) == [2, 4]


def test_metrics_frame_skips_torn_and_broken_lines_and_reads_nan_strings(home):
    run_dir = make_run(home, "r", losses=[2.0])
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"step": 2, "loss": "nan", "tokens": 10}) + "\n")
        handle.write('{"step": 3, "loss": 1.')  # torn: the trainer is writing it right now
    frame = ev.metrics_frame(run_dir)
    assert list(frame["step"]) == [1, 2]
    assert math.isnan(frame["loss"].iloc[1])


def test_metrics_frame_follows_a_growing_file(home):
    run_dir = make_run(home, "r", losses=[3.0, 2.5])
    path = run_dir / "metrics.jsonl"
    assert len(ev.metrics_frame(run_dir)) == 2
    with open(path, "a") as handle:
        handle.write(train_line(3, 10, 2.0, 6.0))
        handle.write(train_line(4, 10, 1.9, 8.0)[:20])  # torn
    assert list(ev.metrics_frame(run_dir)["step"]) == [1, 2, 3]
    with open(path, "a") as handle:
        handle.write(train_line(4, 10, 1.9, 8.0)[20:])
        handle.write(eval_line(4, 10, 1.8))
    frame = ev.metrics_frame(run_dir)
    assert list(frame["step"]) == [1, 2, 3, 4, 4]
    assert frame["is_eval"].tolist() == [False, False, False, False, True]
    # A rewritten file (a resumed run truncates its metrics) is read from scratch.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(train_line(1, 10, 9.0, 1.0))
    os.replace(tmp, path)
    assert ev.metrics_frame(run_dir)["loss"].tolist() == [9.0]


# ---- run summaries and the runs table --------------------------------------------------------------


def test_summary_of_a_completed_run(home):
    run_dir = make_run(home, "done", losses=[2.0, 1.0, 1.4], evals={3: 1.3})
    row = ev.run_summary(run_dir)
    assert row["state"] == "completed" and row["source"] == "dashboard"
    assert (row["step"], row["total steps"]) == (3, 3)
    assert row["final loss"] == 1.4 and row["best loss"] == 1.0 and row["best eval loss"] == 1.3
    assert row["tokens"] == 3 * 512
    assert row["duration (min)"] == pytest.approx(6.0 / 60, abs=0.01)
    assert row["base model"] == "tiny-llama" and row["rank"] == 8 and row["data"] == "user-guide.txt"
    assert row["started"] == pd.Timestamp("2026-01-02T10:00:00+00:00")


def test_summary_states_failed_running_and_dead(home):
    failed = make_run(home, "failed", losses=[2.0], state="failed", error="Out of memory. Lower the batch.")
    running = make_running_run(home)
    dead = make_run(home, "dead", losses=[2.0], state=None)
    write_status(dead, "running", pid=2**22 + 12345, pid_start_time=1)  # no such process
    assert ev.run_summary(failed)["state"] == "failed"
    assert ev.run_summary(failed)["error"] == "Out of memory. Lower the batch."
    assert ev.run_summary(running)["state"] == "running"
    assert (ev.run_summary(running)["step"], ev.run_summary(running)["total steps"]) == (3, 50)
    assert ev.run_summary(dead)["state"] == "failed"  # its process is gone


@pytest.mark.parametrize("as_list", [False, True])
def test_webui_run_is_read_from_its_training_log(home, as_list):
    run_dir = make_webui_run(home, log_as_list=as_list)
    row = ev.run_summary(run_dir)
    assert row["source"] == "webui" and row["state"] == "completed"  # its adapter is saved
    assert row["base model"] == "tiny-llama" and row["final loss"] == 1.7 and row["step"] == 30
    assert row["learning rate"] == pytest.approx(3e-4) and row["rank"] == 32  # "3e-4" read as a number
    assert row["data"] == "user-guide"  # the webui's "None" dataset is no dataset
    frame = ev.metrics_frame(run_dir)
    assert frame["loss"].tolist() == ([2.9, 2.1, 1.7] if as_list else [1.7])


def test_runs_table_lists_every_run(home):
    make_run(home, "a", losses=[1.0])
    make_webui_run(home)
    make_running_run(home)
    table = ev.runs_table()
    assert set(table["run"]) == {"a", "webui-lora", "running"}
    assert table.set_index("run").loc["running", "state"] == "running"
    assert str(table["started"].dtype).startswith("datetime64")  # sortable by date


def test_parameter_differences(home):
    a = make_run(home, "a", params={"lora_rank": 8, "learning_rate": 3e-4})
    b = make_run(home, "b", params={"lora_rank": 16, "learning_rate": "3e-4"})
    differences = ev.parameter_differences([a, b])
    assert list(differences.index) == ["lora_rank"]  # "3e-4" equals 3e-4; the names are not compared
    assert differences.loc["lora_rank"].tolist() == ["8", "16"]
    assert ev.parameter_differences([a]).empty


# ---- smoothing and downsampling -------------------------------------------------------------------------


def test_ema_is_the_bias_corrected_moving_average():
    values = np.array([4.0, 2.0, np.nan, 1.0])
    smoothed = ev.ema(values, 0.5)
    # s1 = 4; s2 = (0.5*4 + 2) / (1 + 0.5); NaN skipped; s4 = (0.25*4 + 0.5*2 + 1) / (1 + 0.5 + 0.25)
    assert smoothed[0] == pytest.approx(4.0)
    assert smoothed[1] == pytest.approx((0.5 * 4 + 2) / 1.5)
    assert math.isnan(smoothed[2])
    assert smoothed[3] == pytest.approx((0.25 * 4 + 0.5 * 2 + 1) / 1.75)
    assert np.array_equal(ev.ema(values, 0.0), values, equal_nan=True)
    with pytest.raises(DashboardError):
        ev.ema(values, 1.0)


def test_downsampling_is_bounded_and_keeps_extremes_and_zero():
    rng = np.random.default_rng(0)
    values = 2 + rng.random(200_003)
    values[123_457] = 0.0
    values[77] = 99.0
    keep = ev.downsample_indices(values, 2000)
    assert len(keep) <= 2000
    assert 123_457 in keep and 77 in keep and 0 in keep and 200_002 in keep
    assert np.all(np.diff(keep) > 0)
    assert len(ev.downsample_indices(values[:500], 2000)) == 500  # short series are kept whole


def test_chart_data_of_200k_lines_is_bounded_and_fast(home):
    big = make_big_run(home)
    small = make_run(home, "small", losses=[3.0, 2.0, 1.0], evals={3: 1.5})
    started = time.perf_counter()
    frame = ev.metrics_frame(big)
    parsed = time.perf_counter()
    frames = {"big": frame, "small": ev.metrics_frame(small)}
    data = ev.chart_data(frames, "step", 0.9)
    built = time.perf_counter()
    charts = [ev.metric_chart(data[name], name, data["x_title"]) for name in ev.CHARTS]
    specs = [chart.to_dict() for chart in charts]  # Altair's default 5,000-row limit applies here
    drawn = time.perf_counter()
    print(f"\n200k-line metrics: parse {parsed - started:.3f} s (once; cached after), chart data "
          f"{built - parsed:.3f} s, Altair specs {drawn - built:.3f} s, cached re-read "
          f"{_timed(lambda: ev.metrics_frame(big)):.4f} s")
    assert len(frame) == BIG_LINES + BIG_LINES // 1000
    for name in ev.CHARTS:
        chart = data[name]
        assert len(chart) <= 5000, name
        assert chart.groupby(["run", "series"]).size().max() <= 2000
    loss = data["loss"]
    raw_big = loss[(loss["run"] == "big") & (loss["series"] == "loss")]
    assert ((raw_big["x"] == ZERO_STEP) & (raw_big["value"] == 0.0)).any()  # the 0.0 loss is drawn
    assert set(loss["series"]) == {"loss", "smoothed", "eval loss"}
    small_rows = loss[(loss["run"] == "small") & (loss["series"] == "loss")]
    assert small_rows["value"].tolist() == [3.0, 2.0, 1.0]  # a short run keeps every point
    assert all(spec for spec in specs)


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def test_chart_data_x_axes(home):
    run_dir = make_run(home, "r", losses=[3.0, 2.0, 1.0, 0.5], evals={2: 2.5})
    frames = {"r": ev.metrics_frame(run_dir)}
    by_epoch = ev.chart_data(frames, "epoch", 0.0)
    assert by_epoch["x_title"] == "Epoch"
    assert set(by_epoch["loss"]["series"]) == {"loss", "eval loss"}  # no smoothing: no smoothed line
    assert by_epoch["loss"].query("series == 'loss'")["x"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    by_time = ev.chart_data(frames, "time", 0.5)
    assert by_time["x_title"] == "Time (s)"
    # the eval line has no time of its own: it gets the time of its step
    assert by_time["eval_perplexity"]["x"].tolist() == [4.0]
    assert by_time["eval_perplexity"]["value"].tolist() == pytest.approx([math.exp(2.5)])
    with pytest.raises(DashboardError):
        ev.chart_data(frames, "wallclock")


def test_webui_run_has_no_time_axis_but_draws_by_step(home):
    frames = {"w": ev.metrics_frame(make_webui_run(home, log_as_list=True))}
    assert ev.chart_data(frames, "time")["loss"].empty
    assert ev.chart_data(frames, "step", 0.0)["loss"]["x"].tolist() == [10, 20, 30]


def test_chart_data_stays_under_altair_limit_with_many_runs():
    rng = np.random.default_rng(1)
    frames = {}
    for i in range(6):
        n = 30_000
        frames[f"run{i}"] = ev._finish(pd.DataFrame({
            "step": np.arange(1, n + 1), "epoch": np.arange(1, n + 1) / 1000, "loss": rng.random(n),
            "learning_rate": np.full(n, 1e-4), "tokens_per_second": rng.random(n) * 1000,
            "elapsed_s": np.arange(1, n + 1) * 1.0}))
    data = ev.chart_data(frames, "time", 0.6)
    assert all(len(data[name]) <= ev.MAX_CHART_ROWS for name in ev.CHARTS)
    ev.metric_chart(data["loss"], "loss", data["x_title"]).to_dict()  # no MaxRowsError
    assert alt.data_transformers.active == "default"


# ---- results store ----------------------------------------------------------------------------------------


def _record(home, perplexity: float, adapter=None, stride: int = 64, **extra) -> dict:
    key = ev.evaluation_key("tiny-llama", adapter, home / "datasets" / "general-text.txt", stride, 128)
    return {**key, "adapter": ev.adapter_run_name(adapter), "dataset": "general-text.txt", "tokens": 100,
            "perplexity": perplexity, **extra}


def test_results_are_stored_found_and_reused(home):
    first = ev.append_result(_record(home, 12.5))
    assert first["id"] and first["date"] and first["comment"] == ""
    assert ev.find_result(_record(home, 0)) == first
    assert ev.append_result(_record(home, 99.0)) == first  # identical evaluation: the stored one is kept
    assert ev.find_result(_record(home, 0, stride=32)) is None
    assert len(ev.read_results()) == 1
    lines = ev.results_path().read_text().splitlines()
    assert json.loads(lines[0])["perplexity"] == 12.5


def test_identical_means_same_text_content_and_adapter_weights(home, tiny_model_dir, tmp_path_factory):
    run_dir = copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    stored = ev.append_result(_record(home, 10.0, adapter=run_dir))
    assert stored["checkpoint"] == "final" and stored["adapter"] == "trained"
    assert stored["adapter_path"] == "loras/trained"
    assert ev.find_result(_record(home, 0, adapter=run_dir / "checkpoint-2")) is None
    (run_dir / "adapter_model.safetensors").write_bytes(b"retrained")  # same path, new weights
    assert ev.find_result(_record(home, 0, adapter=run_dir)) is None
    text = home / "datasets" / "general-text.txt"
    base = ev.append_result(_record(home, 8.0))
    text.write_text(text.read_text() + " changed")
    assert ev.find_result(_record(home, 0)) is None and base["dataset_sha256"]


def test_comments_are_saved_atomically(home):
    a = ev.append_result(_record(home, 10.0))
    b = ev.append_result(_record(home, 11.0, stride=32))
    assert ev.save_comments({a["id"]: "baseline, first try"}) == 1
    assert ev.save_comments({a["id"]: "baseline, first try"}) == 0  # nothing changed: file not rewritten
    records = {r["id"]: r for r in ev.read_results()}
    assert records[a["id"]]["comment"] == "baseline, first try"
    assert records[b["id"]]["comment"] == "" and records[b["id"]]["perplexity"] == 11.0
    assert not list(ev.results_dir().glob(".perplexity.jsonl.*.tmp"))
    frame = ev.results_frame()
    assert list(frame.index) == [b["id"], a["id"]]  # newest first, indexed by id
    assert list(frame.columns) == ev.RESULT_COLUMNS


def test_checkpoint_results_put_the_base_model_at_step_zero(home, tiny_model_dir, tmp_path_factory):
    run_dir = copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    ev.append_result(_record(home, 20.0))
    ev.append_result(_record(home, 18.0, adapter=run_dir / "checkpoint-2"))
    ev.append_result(_record(home, 17.0, adapter=run_dir))
    curve = ev.checkpoint_results(run_dir)
    assert curve[["step", "perplexity"]].values.tolist() == [[0, 20.0], [2, 18.0], [6, 17.0]]
    assert ev.perplexity_chart(curve).to_dict()


# ---- forgetting --------------------------------------------------------------------------------------------


def test_forgetting_ratio_in_plain_words():
    assert ev.forgetting_ratio(10.0, 13.0) == pytest.approx(1.3)
    assert "1.30 times more surprised by general text" in ev.forgetting_sentence(1.3)
    assert "some forgetting" in ev.forgetting_sentence(1.3)
    assert "strong forgetting" in ev.forgetting_sentence(2.0)
    assert "1.25 times less surprised by general text" in ev.forgetting_sentence(0.8)
    assert "about as surprised" in ev.forgetting_sentence(1.001)
    with pytest.raises(DashboardError):
        ev.forgetting_ratio(0.0, 1.0)


def test_forgetting_result_from_stored_results(home, tiny_model_dir, tmp_path_factory):
    run_dir = copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    text = home / "datasets" / "general-text.txt"
    assert ev.forgetting_result("tiny-llama", run_dir, text, 64, 128) is None
    ev.append_result(_record(home, 10.0))
    ev.append_result(_record(home, 13.0, adapter=run_dir))
    found = ev.forgetting_result("tiny-llama", run_dir, text, 64, 128)
    assert found["ratio"] == pytest.approx(1.3)
    assert "1.30 times more surprised" in found["sentence"]


# ---- texts, prompts and generation ---------------------------------------------------------------------------


def test_run_data_text_raw_and_formatted(home):
    raw = make_run(home, "raw")
    assert ev.run_data_text(raw) == (home / "datasets" / "user-guide.txt").read_text()
    formatted = make_run(home, "fmt", params={"dataset": "dashboard-instructions.json", "format": "alpaca-format",
                                              "raw_text_file": ""})
    text = ev.run_data_text(formatted)
    rows = json.loads((home / "datasets" / "dashboard-instructions.json").read_text())
    fmt = load_format(CODE_ROOT / "formats" / "alpaca-format.json")
    matched = [row for row in rows if fmt.match(row)]
    assert 0 < len(matched) <= len(rows)  # rows matching no key are not trained on, so not evaluated either
    assert text.count("### Instruction:") == len(matched)
    assert matched[0]["output"] in text
    with pytest.raises(DashboardError, match="no eval data"):
        ev.run_data_text(raw, "eval")
    path = ev.save_text(text, "fmt: training data")
    assert path.parent == ev.texts_dir() and path.read_text() == text
    assert ev.save_text(text, "fmt: training data") == path  # same content, same file


def test_apply_format_stops_where_the_output_begins():
    alpaca = ev.apply_format("alpaca-format", "Name three colours.")
    assert alpaca.endswith("### Instruction:\nName three colours.\n\n### Response:\n")
    chatml = ev.apply_format("chatml-format", "Hi")
    assert chatml == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # not closed after the answer
    assert "%" not in alpaca + chatml


def test_generation_is_reproducible(home, tokenizer):
    model = ev.load_for_generation("tiny-llama")
    greedy = [ev.generate_text(model, tokenizer, "The dashboard", 8, 0.0, seed) for seed in (0, 1)]
    assert greedy[0] == greedy[1] and greedy[0]  # greedy ignores the seed
    sampled = [ev.generate_text(model, tokenizer, "The dashboard", 8, 1.0, 5) for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed gives the same sample
    assert "<|im_start|>assistant" in ev.apply_chat_template(tokenizer, "Hi")
    with pytest.raises(DashboardError):
        ev.generate_text(model, tokenizer, "", 8)
