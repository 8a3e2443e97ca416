"""Unit tests of the Evaluate page's trainer modules (metrics, runtable, charts, results, generate, adapters):
reading runs (ours and webui's), chart data, results, forgetting, prompts, one base model for every adapter."""

from __future__ import annotations

import json
import math
import os
import time

import altair as alt
import numpy as np
import pandas as pd
import pytest

from trainer.adapters import BaseWithAdapters
from trainer.charts import CHARTS, MAX_CHART_ROWS, chart_data, downsample_indices, ema, metric_chart, perplexity_chart
from trainer.datafiles import load_format
from trainer.errors import DashboardError
from trainer.generate import apply_chat_template, apply_format, generate_text
from trainer.home import CODE_ROOT
from trainer.metrics import as_metrics_frame, metrics_frame
from trainer.results import (
    RESULT_COLUMNS, adapter_run_name, append_result, checkpoint_results, evaluation_key, find_result,
    forgetting_ratio, forgetting_result, forgetting_sentence, read_results, results_dir, results_frame,
    results_path, run_data_text, save_comments, save_text, texts_dir,
)
from trainer.runtable import parameter_differences, run_summary, runs_table

from .evalhelpers import (
    BIG_LINES, ZERO_STEP, copy_run, eval_line, make_big_run, make_run, make_running_run, make_webui_run,
    train_line, trained_run_source, write_status,
)


# ---- metrics.jsonl ---------------------------------------------------------------------------------


def test_metrics_frame_reads_train_and_eval_lines(home):
    run_dir = make_run(home, "r", losses=[2.0, 1.5, 0.0, 1.2], evals={2: 1.7, 4: 1.6})
    frame = metrics_frame(run_dir)
    assert list(frame.loc[~frame["is_eval"], "loss"]) == [2.0, 1.5, 0.0, 1.2]  # 0.0 is a value
    assert list(frame.loc[frame["is_eval"], "eval_loss"]) == [1.7, 1.6]
    assert list(frame.loc[frame["is_eval"], "step"]) == [2, 4]


def test_metrics_frame_skips_torn_and_broken_lines_and_reads_nan_strings(home):
    run_dir = make_run(home, "r", losses=[2.0])
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"step": 2, "loss": "nan", "tokens": 10}) + "\n")
        handle.write('{"step": 3, "loss": 1.')  # torn: the trainer is writing it right now
    frame = metrics_frame(run_dir)
    assert list(frame["step"]) == [1, 2]
    assert math.isnan(frame["loss"].iloc[1])


def test_metrics_frame_follows_a_growing_file(home):
    run_dir = make_run(home, "r", losses=[3.0, 2.5])
    path = run_dir / "metrics.jsonl"
    assert len(metrics_frame(run_dir)) == 2
    with open(path, "a") as handle:
        handle.write(train_line(3, 10, 2.0, 6.0))
        handle.write(train_line(4, 10, 1.9, 8.0)[:20])  # torn
    assert list(metrics_frame(run_dir)["step"]) == [1, 2, 3]
    with open(path, "a") as handle:
        handle.write(train_line(4, 10, 1.9, 8.0)[20:])
        handle.write(eval_line(4, 10, 1.8))
    frame = metrics_frame(run_dir)
    assert list(frame["step"]) == [1, 2, 3, 4, 4]
    assert frame["is_eval"].tolist() == [False, False, False, False, True]
    # A rewritten file (a resumed run truncates its metrics) is read from scratch.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(train_line(1, 10, 9.0, 1.0))
    os.replace(tmp, path)
    assert metrics_frame(run_dir)["loss"].tolist() == [9.0]


# ---- run summaries and the runs table --------------------------------------------------------------


def test_summary_of_a_completed_run(home):
    run_dir = make_run(home, "done", losses=[2.0, 1.0, 1.4], evals={3: 1.3})
    row = run_summary(run_dir)
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
    assert run_summary(failed)["state"] == "failed"
    assert run_summary(failed)["error"] == "Out of memory. Lower the batch."
    assert run_summary(running)["state"] == "running"
    assert (run_summary(running)["step"], run_summary(running)["total steps"]) == (3, 50)
    assert run_summary(dead)["state"] == "failed"  # its process is gone


@pytest.mark.parametrize("as_list", [False, True])
def test_webui_run_is_read_from_its_training_log(home, as_list):
    run_dir = make_webui_run(home, log_as_list=as_list)
    row = run_summary(run_dir)
    assert row["source"] == "webui" and row["state"] == "completed"  # its adapter is saved
    assert row["base model"] == "tiny-llama" and row["final loss"] == 1.7 and row["step"] == 30
    assert row["learning rate"] == pytest.approx(3e-4) and row["rank"] == 32  # "3e-4" read as a number
    assert row["data"] == "user-guide"  # the webui's "None" dataset is no dataset
    frame = metrics_frame(run_dir)
    assert frame["loss"].tolist() == ([2.9, 2.1, 1.7] if as_list else [1.7])


def test_runs_table_lists_every_run(home):
    make_run(home, "a", losses=[1.0])
    make_webui_run(home)
    make_running_run(home)
    table = runs_table()
    assert set(table["run"]) == {"a", "webui-lora", "running"}
    assert table.set_index("run").loc["running", "state"] == "running"
    assert str(table["started"].dtype).startswith("datetime64")  # sortable by date


def test_parameter_differences(home):
    a = make_run(home, "a", params={"lora_rank": 8, "learning_rate": 3e-4})
    b = make_run(home, "b", params={"lora_rank": 16, "learning_rate": "3e-4"})
    differences = parameter_differences([a, b])
    assert list(differences.index) == ["lora_rank"]  # "3e-4" equals 3e-4; the names are not compared
    assert differences.loc["lora_rank"].tolist() == ["8", "16"]
    assert parameter_differences([a]).empty


# ---- smoothing and downsampling -------------------------------------------------------------------------


def test_ema_is_the_bias_corrected_moving_average():
    values = np.array([4.0, 2.0, np.nan, 1.0])
    smoothed = ema(values, 0.5)
    # s1 = 4; s2 = (0.5*4 + 2) / (1 + 0.5); NaN skipped; s4 = (0.25*4 + 0.5*2 + 1) / (1 + 0.5 + 0.25)
    assert smoothed[0] == pytest.approx(4.0)
    assert smoothed[1] == pytest.approx((0.5 * 4 + 2) / 1.5)
    assert math.isnan(smoothed[2])
    assert smoothed[3] == pytest.approx((0.25 * 4 + 0.5 * 2 + 1) / 1.75)
    assert np.array_equal(ema(values, 0.0), values, equal_nan=True)
    with pytest.raises(DashboardError):
        ema(values, 1.0)


def test_downsampling_is_bounded_and_keeps_extremes_and_zero():
    rng = np.random.default_rng(0)
    values = 2 + rng.random(200_003)
    values[123_457] = 0.0
    values[77] = 99.0
    keep = downsample_indices(values, 2000)
    assert len(keep) <= 2000
    assert 123_457 in keep and 77 in keep and 0 in keep and 200_002 in keep
    assert np.all(np.diff(keep) > 0)
    assert len(downsample_indices(values[:500], 2000)) == 500  # short series are kept whole


def test_chart_data_of_200k_lines_is_bounded_and_fast(home):
    big = make_big_run(home)
    small = make_run(home, "small", losses=[3.0, 2.0, 1.0], evals={3: 1.5})
    started = time.perf_counter()
    frame = metrics_frame(big)
    parsed = time.perf_counter()
    frames = {"big": frame, "small": metrics_frame(small)}
    data = chart_data(frames, "step", 0.9)
    built = time.perf_counter()
    charts = [metric_chart(data[name], name, data["x_title"]) for name in CHARTS]
    specs = [chart.to_dict() for chart in charts]  # Altair's default 5,000-row limit applies here
    drawn = time.perf_counter()
    print(f"\n200k-line metrics: parse {parsed - started:.3f} s (once; cached after), chart data "
          f"{built - parsed:.3f} s, Altair specs {drawn - built:.3f} s, cached re-read "
          f"{_timed(lambda: metrics_frame(big)):.4f} s")
    assert len(frame) == BIG_LINES + BIG_LINES // 1000
    for name in CHARTS:
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
    frames = {"r": metrics_frame(run_dir)}
    by_epoch = chart_data(frames, "epoch", 0.0)
    assert by_epoch["x_title"] == "Epoch"
    assert set(by_epoch["loss"]["series"]) == {"loss", "eval loss"}  # no smoothing: no smoothed line
    assert by_epoch["loss"].query("series == 'loss'")["x"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    by_time = chart_data(frames, "time", 0.5)
    assert by_time["x_title"] == "Time (s)"
    # the eval line has no time of its own: it gets the time of its step
    assert by_time["eval_perplexity"]["x"].tolist() == [4.0]
    assert by_time["eval_perplexity"]["value"].tolist() == pytest.approx([math.exp(2.5)])
    with pytest.raises(DashboardError):
        chart_data(frames, "wallclock")


def test_webui_run_has_no_time_axis_but_draws_by_step(home):
    frames = {"w": metrics_frame(make_webui_run(home, log_as_list=True))}
    assert chart_data(frames, "time")["loss"].empty
    assert chart_data(frames, "step", 0.0)["loss"]["x"].tolist() == [10, 20, 30]


def test_chart_data_stays_under_altair_limit_with_many_runs():
    rng = np.random.default_rng(1)
    frames = {}
    for i in range(6):
        n = 30_000
        frames[f"run{i}"] = as_metrics_frame(pd.DataFrame({
            "step": np.arange(1, n + 1), "epoch": np.arange(1, n + 1) / 1000, "loss": rng.random(n),
            "learning_rate": np.full(n, 1e-4), "tokens_per_second": rng.random(n) * 1000,
            "elapsed_s": np.arange(1, n + 1) * 1.0}))
    data = chart_data(frames, "time", 0.6)
    assert all(len(data[name]) <= MAX_CHART_ROWS for name in CHARTS)
    metric_chart(data["loss"], "loss", data["x_title"]).to_dict()  # no MaxRowsError
    assert alt.data_transformers.active == "default"


# ---- results store ----------------------------------------------------------------------------------------


def _record(home, perplexity: float, adapter=None, stride: int = 64, **extra) -> dict:
    key = evaluation_key("tiny-llama", adapter, home / "datasets" / "general-text.txt", stride, 128)
    return {**key, "adapter": adapter_run_name(adapter), "dataset": "general-text.txt", "tokens": 100,
            "perplexity": perplexity, **extra}


def test_results_are_stored_found_and_reused(home):
    first = append_result(_record(home, 12.5))
    assert first["id"] and first["date"] and first["comment"] == ""
    assert find_result(_record(home, 0)) == first
    assert append_result(_record(home, 99.0)) == first  # identical evaluation: the stored one is kept
    assert find_result(_record(home, 0, stride=32)) is None
    assert len(read_results()) == 1
    lines = results_path().read_text().splitlines()
    assert json.loads(lines[0])["perplexity"] == 12.5


def test_identical_means_same_text_content_and_adapter_weights(home, tiny_model_dir, tmp_path_factory):
    run_dir = copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    stored = append_result(_record(home, 10.0, adapter=run_dir))
    assert stored["checkpoint"] == "final" and stored["adapter"] == "trained"
    assert stored["adapter_path"] == "loras/trained"
    assert find_result(_record(home, 0, adapter=run_dir / "checkpoint-2")) is None
    (run_dir / "adapter_model.safetensors").write_bytes(b"retrained")  # same path, new weights
    assert find_result(_record(home, 0, adapter=run_dir)) is None
    text = home / "datasets" / "general-text.txt"
    base = append_result(_record(home, 8.0))
    text.write_text(text.read_text() + " changed")
    assert find_result(_record(home, 0)) is None and base["dataset_sha256"]


def test_comments_are_saved_atomically(home):
    a = append_result(_record(home, 10.0))
    b = append_result(_record(home, 11.0, stride=32))
    assert save_comments({a["id"]: "baseline, first try"}) == 1
    assert save_comments({a["id"]: "baseline, first try"}) == 0  # nothing changed: file not rewritten
    records = {r["id"]: r for r in read_results()}
    assert records[a["id"]]["comment"] == "baseline, first try"
    assert records[b["id"]]["comment"] == "" and records[b["id"]]["perplexity"] == 11.0
    assert not list(results_dir().glob(".perplexity.jsonl.*.tmp"))
    frame = results_frame()
    assert list(frame.index) == [b["id"], a["id"]]  # newest first, indexed by id
    assert list(frame.columns) == RESULT_COLUMNS


def test_checkpoint_results_put_the_base_model_at_step_zero(home, tiny_model_dir, tmp_path_factory):
    run_dir = copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    append_result(_record(home, 20.0))
    append_result(_record(home, 18.0, adapter=run_dir / "checkpoint-2"))
    append_result(_record(home, 17.0, adapter=run_dir))
    curve = checkpoint_results(run_dir)
    assert curve[["step", "perplexity"]].values.tolist() == [[0, 20.0], [2, 18.0], [6, 17.0]]
    assert perplexity_chart(curve).to_dict()


# ---- forgetting --------------------------------------------------------------------------------------------


def test_forgetting_ratio_in_plain_words():
    assert forgetting_ratio(10.0, 13.0) == pytest.approx(1.3)
    assert "1.30 times more surprised by general text" in forgetting_sentence(1.3)
    assert "some forgetting" in forgetting_sentence(1.3)
    assert "strong forgetting" in forgetting_sentence(2.0)
    assert "1.25 times less surprised by general text" in forgetting_sentence(0.8)
    assert "about as surprised" in forgetting_sentence(1.001)
    with pytest.raises(DashboardError):
        forgetting_ratio(0.0, 1.0)


def test_forgetting_result_from_stored_results(home, tiny_model_dir, tmp_path_factory):
    run_dir = copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    text = home / "datasets" / "general-text.txt"
    assert forgetting_result("tiny-llama", run_dir, text, 64, 128) is None
    append_result(_record(home, 10.0))
    append_result(_record(home, 13.0, adapter=run_dir))
    found = forgetting_result("tiny-llama", run_dir, text, 64, 128)
    assert found["ratio"] == pytest.approx(1.3)
    assert "1.30 times more surprised" in found["sentence"]


# ---- texts, prompts and generation ---------------------------------------------------------------------------


def test_run_data_text_raw_and_formatted(home):
    raw = make_run(home, "raw")
    assert run_data_text(raw) == (home / "datasets" / "user-guide.txt").read_text()
    formatted = make_run(home, "fmt", params={"dataset": "dashboard-instructions.json", "format": "alpaca-format",
                                              "raw_text_file": ""})
    text = run_data_text(formatted)
    rows = json.loads((home / "datasets" / "dashboard-instructions.json").read_text())
    fmt = load_format(CODE_ROOT / "formats" / "alpaca-format.json")
    matched = [row for row in rows if fmt.match(row)]
    assert 0 < len(matched) <= len(rows)  # rows matching no key are not trained on, so not evaluated either
    assert text.count("### Instruction:") == len(matched)
    assert matched[0]["output"] in text
    with pytest.raises(DashboardError, match="no eval data"):
        run_data_text(raw, "eval")
    path = save_text(text, "fmt: training data")
    assert path.parent == texts_dir() and path.read_text() == text
    assert save_text(text, "fmt: training data") == path  # same content, same file


def test_apply_format_stops_where_the_output_begins():
    alpaca = apply_format("alpaca-format", "Name three colours.")
    assert alpaca.endswith("### Instruction:\nName three colours.\n\n### Response:\n")
    chatml = apply_format("chatml-format", "Hi")
    assert chatml == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # not closed after the answer
    assert "%" not in alpaca + chatml


def test_generation_is_reproducible(home, tokenizer):
    with BaseWithAdapters("tiny-llama").using(None) as model:
        greedy = [generate_text(model, tokenizer, "The dashboard", 8, 0.0, seed) for seed in (0, 1)]
        sampled = [generate_text(model, tokenizer, "The dashboard", 8, 1.0, 5) for _ in range(2)]
        with pytest.raises(DashboardError):
            generate_text(model, tokenizer, "", 8)
    assert greedy[0] == greedy[1] and greedy[0]  # greedy ignores the seed
    assert sampled[0] == sampled[1]  # the same seed gives the same sample
    assert "<|im_start|>assistant" in apply_chat_template(tokenizer, "Hi")


def test_one_base_model_serves_every_adapter_with_the_numbers_of_a_fresh_load(home, tiny_model_dir, tmp_path_factory):
    import torch

    from trainer.models import attach_adapter, load_model

    run_dir = copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    ids = torch.tensor([[1, 5, 9, 20, 7, 3, 11, 2]])

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    fresh = {None: logits(load_model("tiny-llama").eval())}
    for folder in (run_dir, run_dir / "checkpoint-2"):
        fresh[folder] = logits(attach_adapter(load_model("tiny-llama"), folder).eval())
    shared = BaseWithAdapters("tiny-llama")
    for folder in (None, run_dir, run_dir / "checkpoint-2", None, run_dir):  # switching back and forth
        with shared.using(folder) as model:
            assert torch.equal(logits(model), fresh[folder]), folder
    assert len(shared.loaded) == 2  # each adapter loaded once, beside the one copy of the base model
    assert not torch.equal(fresh[run_dir], fresh[None])
    weights = run_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # saved again (a run trained on): loaded again, the old copy goes
    os.utime(weights, ns=(time.time_ns() + 10**9,) * 2)
    with shared.using(run_dir) as model:
        assert torch.equal(logits(model), fresh[run_dir])
        assert len(model.peft_config) == 2


def test_live_loss_chart_keeps_a_zero_spike_of_a_long_run(home):
    from trainer.charts import loss_chart

    assert loss_chart(metrics_frame(make_run(home, "empty", state=None))) is None
    frame = metrics_frame(make_big_run(home))
    chart = loss_chart(frame)
    spec = chart.to_dict()  # under Altair's 5,000-row limit
    rows = chart.data
    assert len(rows) <= 5000 and set(rows["series"]) == {"loss", "eval loss"}
    assert ((rows["x"] == ZERO_STEP) & (rows["value"] == 0.0)).any()
    assert spec["title"] == "Training loss"


# ---- charts read at a glance ---------------------------------------------------------------------------


def _layers(spec: dict) -> list[dict]:
    return spec.get("layer", [spec])


def _one_run(losses: list[float]) -> pd.DataFrame:
    rows = [{"step": i, "total_steps": len(losses), "epoch": i / 10, "loss": loss, "learning_rate": 3e-4,
             "tokens": 512 * i, "tokens_per_second": 1000.0, "elapsed_s": 2.0 * i}
            for i, loss in enumerate(losses, start=1)]
    return as_metrics_frame(pd.DataFrame(rows))


def test_step_axes_have_integer_ticks(home):
    from trainer.charts import histogram, loss_chart

    frame = _one_run([3.0, 2.5, 2.2])
    data = chart_data({"r": frame}, "step", 0.0)
    checkpoints = pd.DataFrame({"step": [0, 2, 4], "label": ["base model", "c2", "c4"], "perplexity": [9.0, 8.0, 7.5],
                                "dataset": "t", "stride": 64, "max_length": 128, "setting": "t 64/128"})
    charts = {"metric": metric_chart(data["loss"], "loss", data["x_title"]), "live": loss_chart(frame),
              "perplexity": perplexity_chart(checkpoints), "histogram": histogram(np.array([10, 50, 64]), 64)}
    for name, chart in charts.items():
        x = _layers(chart.to_dict())[0]["encoding"]["x"]
        assert x["axis"]["format"] == ",d" and x["axis"]["tickMinStep"] == 1, name  # 1, 2, 3: never 1.1
    y = _layers(charts["histogram"].to_dict())[0]["encoding"]["y"]
    assert y["axis"]["format"] == ",d"  # sample counts too
    epoch = chart_data({"r": frame}, "epoch", 0.0)
    x = _layers(metric_chart(epoch["loss"], "loss", epoch["x_title"]).to_dict())[0]["encoding"]["x"]
    assert "format" not in x.get("axis", {})  # epochs are fractions


def test_a_one_point_chart_gets_a_readable_domain(home):
    one = chart_data({"r": _one_run([2.5])}, "step", 0.6)
    spec = metric_chart(one["loss"], "loss", one["x_title"]).to_dict()
    encoding = _layers(spec)[0]["encoding"]
    # Without a domain Vega spans [1, 1] and [2.5, 2.5] and prints ticks like 1.000000.
    assert encoding["x"]["scale"]["domain"] == [0.0, 2.0]
    assert encoding["y"]["scale"]["domain"] == pytest.approx([2.25, 2.75])
    rate = _layers(metric_chart(one["learning_rate"], "learning_rate", one["x_title"]).to_dict())[0]["encoding"]
    assert rate["y"]["scale"]["domain"] == pytest.approx([0.0, 3.75e-4])  # a learning rate keeps its zero
    single = pd.DataFrame({"step": [6], "label": ["final adapter"], "perplexity": [12.0], "dataset": "t",
                           "stride": 64, "max_length": 128, "setting": "t 64/128"})
    encoding = _layers(perplexity_chart(single).to_dict())[0]["encoding"]
    assert encoding["x"]["scale"]["domain"] == [5.0, 7.0]
    assert encoding["y"]["scale"]["domain"] == pytest.approx([10.8, 13.2])
    many = chart_data({"r": _one_run([3.0, 2.0])}, "step", 0.6)
    encoding = _layers(metric_chart(many["loss"], "loss", many["x_title"]).to_dict())[0]["encoding"]
    assert "domain" not in encoding["x"].get("scale", {}) and "domain" not in encoding["y"].get("scale", {})


def test_length_bins_end_at_the_cutoff_and_count_every_sample():
    from trainer.charts import length_bins

    lengths = np.array([1, 3, 100, 127, 128, 128, 128, 300])
    bins = length_bins(lengths, 128)
    assert bins["count"].sum() == len(lengths)
    assert 128 in set(bins["end"])  # the cutoff is an edge: every sample it allows is left of its line
    for length in lengths:
        holding = bins[(bins["start"] < length) & (length <= bins["end"])]
        assert len(holding) == 1 and holding["count"].iloc[0] >= 1, length
    assert bins.loc[bins["end"] == 128, "count"].item() == 4  # 127 and the three of 128: width 10, (118, 128]
    assert (np.diff(bins["end"]) == 10).all() and bins["start"].iloc[0] == 0
    assert length_bins(np.array([], dtype=np.int64), 256)["count"].sum() == 0


@pytest.mark.parametrize("cutoff, lengths, align", [
    (128, [20, 60, 127, 128, 128], "right"),  # the usual case: the cutoff at the right edge
    (2048, [100, 300], "right"),
    (64, [300, 400, 500], "left"),  # longer samples than the cutoff: the line in the left half
])
def test_the_cutoff_label_stays_inside_the_plot(cutoff, lengths, align):
    from trainer.charts import HEADROOM, histogram

    spec = histogram(np.array(lengths), cutoff).to_dict()
    bars, rule, text = spec["layer"]
    x_domain = bars["encoding"]["x"]["scale"]["domain"]
    assert x_domain[0] <= cutoff < x_domain[1]
    # The label grows away from the nearer edge (into the half with room), from the rule outwards...
    mark = text["mark"]
    assert mark["align"] == align and (mark["dx"] < 0) == (align == "right")
    assert (cutoff > x_domain[1] / 2) == (align == "right")
    # ...and sits at the top of the plot, in a band no bar reaches.
    assert text["encoding"]["y"] == {"value": 0} and mark["baseline"] == "top"
    highest = max(row["count"] for row in spec["datasets"][bars["data"]["name"]])
    assert bars["encoding"]["y"]["scale"]["domain"][1] == pytest.approx(highest * HEADROOM)


def _colour_settings(node, found=None) -> list[tuple[str, str]]:
    """Every colour a spec sets itself: keys like labelColor or titleColor, and the colour of text marks."""
    found = [] if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("Color") or (key == "mark" and isinstance(value, dict) and value.get("type") == "text"):
                found.append((key, json.dumps(value)))
            _colour_settings(value, found)
    elif isinstance(node, list):
        for item in node:
            _colour_settings(item, found)
    return found


def test_charts_leave_text_colours_to_the_theme():
    """No hard-coded axis, legend or title colour: Streamlit's theme colours them, light and dark. The one text
    mark (the cutoff label) has the accent colour, readable on both backgrounds."""
    from trainer.charts import CUTOFF_COLOR, histogram, loss_chart

    frame = _one_run([3.0, 2.5])
    data = chart_data({"r": frame}, "step", 0.6)
    checkpoints = pd.DataFrame({"step": [0, 2], "label": ["base model", "c2"], "perplexity": [9.0, 8.0],
                                "dataset": "t", "stride": 64, "max_length": 128, "setting": "t 64/128"})
    specs = [metric_chart(data[c], c, data["x_title"]).to_dict() for c in ("loss", "learning_rate")]
    specs += [loss_chart(frame).to_dict(), perplexity_chart(checkpoints).to_dict()]
    assert _colour_settings(specs) == []
    found = _colour_settings(histogram(np.array([10, 20]), 64).to_dict())
    assert len(found) == 1 and json.loads(found[0][1])["color"] == CUTOFF_COLOR


# ---- the runs table: formats, diverged runs; results of one run --------------------------------------------


def test_a_raw_text_run_has_no_format(home):
    raw = make_run(home, "raw", params={"raw_text_file": "user-guide.txt", "format": "alpaca-format"})
    formatted = make_run(home, "formatted", params={"raw_text_file": "", "dataset": "dashboard-instructions.json",
                                                    "format": "alpaca-format"})
    assert run_summary(raw)["format"] == "" and run_summary(raw)["data"] == "user-guide.txt"
    assert run_summary(formatted)["format"] == "alpaca-format"
    table = runs_table([raw, formatted]).set_index("run")
    assert table.loc["raw", "format"] == "" and table.loc["formatted", "format"] == "alpaca-format"


DIVERGED_ERROR = ("the loss rose from 4.39 to 19.2 in 3 steps: the learning rate 1.0 is far too high for LoRA; "
                  "try 1e-4 to 3e-4")


def make_diverged_run(home, name: str = "blown-up"):
    """A run folder as the trainer leaves a run whose loss blew up: state failed, diverged true."""
    return make_run(home, name, losses=[4.39, 14.06, 19.21, 17.65], state="failed", diverged=True,
                    error=DIVERGED_ERROR, params={"learning_rate": 1.0})


def test_a_diverged_run_is_marked(home):
    from trainer.runtable import failure_note

    diverged = make_diverged_run(home)
    failed = make_run(home, "oom", losses=[2.0], state="failed", error="Out of memory. Lower the batch.")
    completed = make_run(home, "fine", losses=[2.0, 1.8])
    table = runs_table([diverged, failed, completed]).set_index("run")
    assert table.loc["blown-up", "state"] == "failed (diverged)"
    assert table.loc["oom", "state"] == "failed" and table.loc["fine", "state"] == "completed"
    assert table.loc["blown-up", "error"] == DIVERGED_ERROR
    assert failure_note(diverged) == f"blown-up diverged, and the trainer ended it as failed: {DIVERGED_ERROR}"
    assert failure_note(failed) == "oom failed: Out of memory. Lower the batch."
    assert failure_note(completed) == ""


def test_results_of_one_run_are_its_own_and_its_base_models(home):
    from trainer.results import run_results

    text = home / "datasets" / "general-text.txt"
    runs = {}
    for name, base in (("a", "tiny-llama"), ("b", "tiny-llama"), ("c", "SmolLM2-135M-Instruct")):
        runs[name] = make_run(home, name, losses=[2.0], params={"base_model": base})
        (runs[name] / "adapter_model.safetensors").write_bytes(name.encode())
    for model, adapter in (("tiny-llama", None), ("SmolLM2-135M-Instruct", None), ("tiny-llama", runs["a"]),
                           ("tiny-llama", runs["b"]), ("SmolLM2-135M-Instruct", runs["c"])):
        key = evaluation_key(model, adapter, text, 64, 128)
        append_result({**key, "adapter": adapter.name if adapter else "", "dataset": "general-text.txt",
                       "tokens": 10, "perplexity": 5.0})
    shown = {(r["model"], r["adapter"]) for r in run_results(runs["a"])}
    assert shown == {("tiny-llama", "a"), ("tiny-llama", "")}  # not b's, not another base model's
    assert {(r["model"], r["adapter"]) for r in run_results(runs["c"])} == {("SmolLM2-135M-Instruct", "c"),
                                                                            ("SmolLM2-135M-Instruct", "")}
    assert len(read_results()) == 5
