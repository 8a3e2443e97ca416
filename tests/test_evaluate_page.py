"""AppTest tests of the Evaluate page with synthetic run folders (completed, failed, running, webui-style, a
200,000-line metrics file) and a really trained tiny run for the background perplexity job and Try it."""

from __future__ import annotations

import json
import time

import pytest
from streamlit import dataframe_util
from streamlit.testing.v1 import AppTest

from trainer.home import CODE_ROOT, home_dir
from trainer.results import adapter_run_name, append_result, evaluation_key, read_results, results_dir, texts_dir

from .evalhelpers import (
    ZERO_STEP, copy_run, make_big_run, make_run, make_running_run, make_webui_run, trained_run_source, wait_for,
)

PAGE = str(CODE_ROOT / "views" / "evaluate.py")


def open_page(timeout: float = 60) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=timeout)
    at.run()
    assert not at.exception, at.exception
    return at


def rerun(at: AppTest, timeout: float = 60) -> AppTest:
    at.run(timeout=timeout)
    assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> dict[str, list]:
    """Each Altair chart on the page by title: the rows of its data."""
    found = {}
    for element in at.get("vega_lite_chart"):
        spec = json.loads(element.proto.spec)
        rows = [dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data) for d in element.proto.datasets]
        found[spec.get("title")] = rows
    return found


@pytest.fixture
def runs(home):
    make_run(home, "completed", losses=[3.0, 2.0, 1.5, 1.2], evals={2: 2.2, 4: 1.9},
             params={"lora_rank": 16, "lora_alpha": 32})
    make_run(home, "failed", losses=[3.0, float("nan")], state="failed",
             error="The loss became nan at step 2: training diverged. Lower the learning rate.")
    make_running_run(home)
    make_webui_run(home)
    return home


def test_empty_home_says_what_to_do(home):
    at = open_page()
    assert any("No runs yet" in info.value for info in at.info)


def test_table_lists_every_kind_of_run(runs):
    make_big_run(runs)
    at = open_page()
    table = at.dataframe(key="ev_table").value.set_index("run")
    assert set(table.index) == {"completed", "failed", "running", "webui-lora", "big"}
    assert table.loc["completed", "state"] == "completed"
    assert table.loc["failed", "state"] == "failed"
    assert "diverged" in table.loc["failed", "error"]
    assert table.loc["running", "state"] == "running"  # its process (this test) is alive
    assert table.loc["webui-lora", "source"] == "webui" and table.loc["webui-lora", "final loss"] == 1.7
    assert table.loc["completed", "best eval loss"] == 1.9 and table.loc["completed", "final loss"] == 1.2
    assert table.loc["big", "step"] == 200_000 and table.loc["big", "best loss"] == 0.0


def test_charts_build_for_all_runs_including_200k_lines(runs):
    make_big_run(runs)
    at = open_page()
    at.multiselect(key="ev_selected").set_value(["completed", "failed", "running", "webui-lora", "big"])
    started = time.perf_counter()
    rerun(at)
    print(f"\npage run drawing 5 runs, one of 200,000 lines (parsed once when the table was built): "
          f"{time.perf_counter() - started:.2f} s")
    found = charts(at)
    assert {"Loss", "Eval perplexity", "Learning rate", "Tokens per second"} <= set(found)
    for title, datasets in found.items():
        assert sum(len(d) for d in datasets) <= 5000, title
    loss = found["Loss"][0]
    assert set(loss["run"]) == {"completed", "failed", "running", "webui-lora", "big"}
    big = loss[(loss["run"] == "big") & (loss["series"] == "loss")]
    assert ((big["x"] == ZERO_STEP) & (big["value"] == 0.0)).any()  # the 0.0 loss is drawn
    differences = [d.value for d in at.dataframe if d.key != "ev_table"]
    assert any("lora_rank" in d.index for d in differences)  # parameter differences below the charts

    for x_axis in ("epoch", "time"):
        at.radio(key="ev_x").set_value(x_axis)
        at.slider(key="ev_smooth").set_value(0.0)
        rerun(at)
        assert "Loss" in charts(at)
    time_loss = charts(at)["Loss"][0]
    assert "webui-lora" not in set(time_loss["run"])  # a webui run logs no times: absent on a time axis


def test_perplexity_job_started_from_the_page_writes_its_result(home, tiny_model_dir, tmp_path_factory):
    copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    at = open_page()
    at.selectbox(key="ev_run").set_value("trained")
    rerun(at)
    at.multiselect(key="ev_ppl_ckpts_trained").set_value(["checkpoint-2"])
    at.radio(key="ev_ppl_source").set_value("A held-out text (paste it)")
    rerun(at)
    held_out = (CODE_ROOT / "datasets" / "general-text.txt").read_text()[:2000]
    at.text_area(key="ev_ppl_paste").input(held_out)
    at.number_input(key="ev_ppl_stride").set_value(64)
    at.number_input(key="ev_ppl_maxlen").set_value(128)
    at.text_input(key="ev_ppl_comment").input("from the page")
    at.button(key="ev_ppl_start").click()
    rerun(at)
    assert any("3 evaluation(s) started in the background" in i.value for i in at.info)
    records = wait_for(lambda: len(read_results()) == 3 and read_results(), timeout=180,
                       what="three results in results/perplexity.jsonl")
    assert {r["checkpoint"] for r in records} == {"", "checkpoint-2", "final"}
    assert all(r["comment"] == "from the page" and r["stride"] == 64 and r["max_length"] == 128 for r in records)
    assert all(r["perplexity"] > 1 and r["tokens"] > 300 for r in records)
    assert all(r["dataset"].startswith("held-out") for r in records)
    stored_text = home_dir() / records[0]["dataset_path"]
    assert stored_text.parent == texts_dir() and stored_text.read_text() == held_out

    rerun(at)
    table = at.data_editor[0].value
    assert len(table) == 3 and set(table["checkpoint"]) == {"", "checkpoint-2", "final"}
    curve = charts(at)["Perplexity by checkpoint"][0]
    assert sorted(curve["step"]) == [0, 2, 6]

    at.button(key="ev_ppl_start").click()  # the identical evaluation again: reused, nothing started
    rerun(at)
    assert any("were done before" in i.value for i in at.info)
    assert len(read_results()) == 3


def test_comment_edits_are_saved(home):
    adapter_run = make_fake_adapter_run(home)
    key = evaluation_key("tiny-llama", adapter_run, home / "datasets" / "general-text.txt", 64, 128)
    stored = append_result({**key, "adapter": "fake", "dataset": "general-text.txt", "tokens": 10,
                               "perplexity": 5.0})
    at = open_page()
    at.session_state["ev_results_0"] = {"edited_rows": {0: {"comment": "looks good"}}, "added_rows": [],
                                        "deleted_rows": []}
    rerun(at)
    assert read_results()[0]["comment"] == "looks good"
    assert read_results()[0]["id"] == stored["id"]
    assert at.data_editor[0].value["comment"].tolist() == ["looks good"]


def make_fake_adapter_run(home, name: str = "fake"):
    """A finished run with adapter files (never loaded): enough for results and the forgetting check."""
    run_dir = make_run(home, name, losses=[2.0, 1.0])
    (run_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (run_dir / "adapter_model.safetensors").write_bytes(b"weights")
    return run_dir


def test_forgetting_check_reads_as_a_sentence(home):
    run_dir = make_fake_adapter_run(home)
    text = home / "datasets" / "general-text.txt"
    for adapter, perplexity in ((None, 10.0), (run_dir, 13.0)):
        key = evaluation_key("tiny-llama", adapter, text, 256, 512)
        append_result({**key, "adapter": adapter_run_name(adapter), "dataset": "general-text.txt",
                          "tokens": 1000, "perplexity": perplexity})
    at = open_page()
    messages = [w.value for w in at.warning]
    assert any("1.30 times more surprised by general text" in m for m in messages), messages
    assert [m.value for m in at.metric][-1] == "1.300"


def test_try_it_generates_with_base_and_adapter(home, tiny_model_dir, tmp_path_factory):
    copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    at = open_page()
    at.text_area(key="ev_try_prompt").input("How do I start a run?")
    at.radio(key="ev_try_template").set_value("chat")
    at.number_input(key="ev_try_max_new").set_value(6)
    at.button(key="ev_try_go").click()
    rerun(at, timeout=120)
    output = at.session_state["ev_try_output"]
    assert output["prompt"].startswith("<|im_start|>") and "How do I start a run?" in output["prompt"]
    assert output["base"] and output["adapter"]
    codes = [c.value for c in at.code]
    assert len(codes) == 3 and codes[2].strip() == output["prompt"].strip()  # both answers, then the prompt
    headings = [m.value for m in at.markdown]
    assert "**Base model: tiny-llama**" in headings and "**With the adapter: trained (final)**" in headings
    at.button(key="ev_try_go").click()  # greedy and cached: the same answers again
    rerun(at)
    assert at.session_state["ev_try_output"] == output


def test_export_refuses_an_existing_name(home, tiny_model_dir, tmp_path_factory):
    copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    at = open_page()
    at.text_input(key="ev_exp_name_trained_final").input("tiny-llama")
    at.button(key="ev_exp_start").click()
    rerun(at)
    assert any("models/tiny-llama already exists" in e.value for e in at.error)
    assert not (results_dir() / "jobs").exists()


# ---- issue 12: results of the selected run, diverged runs, only the latest outcome -------------------------


def test_results_show_the_selected_run_unless_all_runs_are_asked_for(home):
    text = home / "datasets" / "general-text.txt"
    for adapter in (None, make_fake_adapter_run(home, "a"), make_fake_adapter_run(home, "b")):
        key = evaluation_key("tiny-llama", adapter, text, 64, 128)
        append_result({**key, "adapter": adapter_run_name(adapter), "dataset": "general-text.txt", "tokens": 10,
                       "perplexity": 5.0})
    at = open_page()
    at.selectbox(key="ev_run").set_value("a")
    rerun(at)
    assert sorted(at.data_editor[0].value["adapter"]) == ["", "a"]  # a's own results and its base model's
    at.toggle(key="ev_results_all").set_value(True)
    rerun(at)
    assert sorted(at.data_editor[0].value["adapter"]) == ["", "a", "b"]
    at.toggle(key="ev_results_all").set_value(False)
    at.selectbox(key="ev_run").set_value("b")
    rerun(at)
    assert sorted(at.data_editor[0].value["adapter"]) == ["", "b"]


def test_a_diverged_run_is_marked_in_the_table_and_its_detail(home):
    error = "the loss rose from 4.39 to 19.2 in 3 steps: the learning rate 1.0 is far too high for LoRA"
    make_run(home, "blown-up", losses=[4.39, 14.06, 19.21], state="failed", diverged=True, error=error)
    make_run(home, "fine", losses=[2.0, 1.8])
    at = open_page()
    table = at.dataframe(key="ev_table").value.set_index("run")
    assert table.loc["blown-up", "state"] == "failed (diverged)" and table.loc["fine", "state"] == "completed"
    at.selectbox(key="ev_run").set_value("blown-up")
    rerun(at)
    assert [e.value for e in at.error] == [f"blown-up diverged, and the trainer ended it as failed: {error}"]
    at.selectbox(key="ev_run").set_value("fine")
    rerun(at)
    assert not at.error


def finished_job(home, title: str, kind: str, **status) -> str:
    """A job folder as a finished background job leaves it."""
    job_id = f"20260102-100000-{kind}-abcdef"
    folder = home / "results" / "jobs" / job_id
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"id": job_id, "kind": kind, "title": title,
                                                 "created": "2026-01-02T10:00:00+00:00"}))
    (folder / "status.json").write_text(json.dumps({"state": "completed", "pid": None, "progress": 1.0,
                                                    "results": [], "error": None, **status}))
    return job_id


def test_a_later_error_replaces_an_earlier_success(home):
    run_dir = make_fake_adapter_run(home)
    result = {"name": "fake-merged", "adapter": str(run_dir), "base_model": "tiny-llama",
              "max_abs_diff_reloaded": 1e-6, "tolerance": 1e-3}
    export = finished_job(home, "export fake-merged", "export", result=result)
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["ev_watch"] = [export]  # the page watched this export when it started it
    rerun(at)
    assert any("Saved models/fake-merged" in s.value for s in at.success)
    at.text_input(key="ev_exp_name_fake_final").input("tiny-llama")
    at.button(key="ev_exp_start").click()
    rerun(at)
    assert any("models/tiny-llama already exists" in e.value for e in at.error)
    assert not at.success  # the earlier export's green line is gone: only the latest outcome shows
    at.text_input(key="ev_exp_name_fake_final").input("tiny-llama-2")  # nothing clicked: the error goes too
    rerun(at)
    assert not any("already exists" in e.value for e in at.error)


def test_a_later_perplexity_error_replaces_the_earlier_jobs_line(home):
    make_fake_adapter_run(home)
    job = finished_job(home, "perplexity of fake", "perplexity", results=["r1", "r2"])
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["ev_watch"] = [job]
    rerun(at)
    assert any("perplexity of fake: 2 evaluated" in c.value for c in at.caption)
    at.radio(key="ev_ppl_source").set_value("A held-out text (paste it)")
    rerun(at)
    at.button(key="ev_ppl_start").click()  # nothing pasted
    rerun(at)
    assert [e.value for e in at.error] == ["The text is empty."]
    assert not any("2 evaluated" in c.value for c in at.caption) and not at.info
