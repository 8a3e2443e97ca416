"""Perplexity: the command line against independent computations, the sliding window against a brute-force
reference, and the page's background job against the command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer import jobs
from trainer.errors import DashboardError
from trainer.home import CODE_ROOT
from trainer.params import DEFAULT_MODEL
from trainer.perplexity import sliding_window_nll
from trainer.results import find_result, read_results

from .evalhelpers import cli, copy_run, trained_run_source, wait_for

SHORT_TEXT = ("The dashboard trains a small adapter on your own text. Afterwards you compare runs, measure "
              "perplexity on a held-out text and try the adapter next to the base model.")


@pytest.fixture
def one_thread():
    """Hundreds of tiny forward passes: one thread is fastest (and not slowed by other work on the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=CODE_ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli_perplexity(*args: str) -> dict:
    done = cli("perplexity", *args, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # stdout holds only the JSON line (progress goes to stderr)


def plain_forward_perplexity(model_dir, text: str) -> tuple[float, int]:
    """exp(mean next-token loss) of one plain forward pass over the whole text (no special tokens added)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss)), ids.shape[1] - 1


def test_cli_matches_a_plain_forward_pass_on_the_tiny_model(home, tiny_model_dir):
    (home / "datasets" / "short.txt").write_text(SHORT_TEXT)
    result = cli_perplexity("--model", "tiny-llama", "--text-file", "short.txt", "--stride", "256",
                            "--max-length", "256")
    expected, scored = plain_forward_perplexity(tiny_model_dir, SHORT_TEXT)
    assert scored < 256  # the whole text fits one window
    assert result["tokens"] == scored
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]), rel=1e-12)


@pytest.mark.slow
def test_cli_matches_a_plain_forward_pass_on_the_default_model(home, default_model_dir):
    text = (CODE_ROOT / "datasets" / "general-text.txt").read_text()[:1000]  # plain English, ~200 tokens
    (home / "datasets" / "short.txt").write_text(text)
    result = cli_perplexity("--model", DEFAULT_MODEL, "--text-file", "datasets/short.txt", "--stride", "128",
                            "--max-length", "512")
    expected, scored = plain_forward_perplexity(default_model_dir, text)
    assert scored < 512
    assert result["tokens"] == scored
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert 1 < result["perplexity"] < 60  # a real model finds plain English only mildly surprising


def brute_force_nll(model, ids: list[int], stride: int, max_length: int) -> tuple[float, int]:
    """Every token t >= 1 scored by its own forward pass over exactly the context the method gives it.

    The method's windows: the first starts at 0; each spans up to max_length tokens; the next starts
    `stride` later but no later than one token before the previous window's end (a window needs one token of
    context). Token t is scored by the first window that ends after it, seeing that window's tokens before it.
    """
    n = len(ids)
    windows, begin = [], 0
    while True:
        end = min(begin + max_length, n)
        windows.append((begin, end))
        if end == n:
            break
        begin = min(begin + stride, end - 1)
    total = 0.0
    for t in range(1, n):
        begin = next(b for b, e in windows if e > t)
        assert 1 <= t - begin <= max_length - 1  # at least one and at most max_length - 1 tokens of context
        context = torch.tensor([ids[begin:t]])
        with torch.no_grad():
            logits = model(input_ids=context, logits_to_keep=1).logits[0, -1].float()
        total -= float(F.log_softmax(logits, dim=-1)[ids[t]])
    return total, n - 1


@pytest.mark.parametrize("stride, max_length, n_tokens", [(32, 64, 200), (64, 64, 200), (17, 50, 160),
                                                          (1, 8, 40)])
def test_sliding_window_matches_brute_force(tiny_model_dir, one_thread, stride, max_length, n_tokens):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    text = (CODE_ROOT / "datasets" / "general-text.txt").read_text()[:1500]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    assert len(ids) == n_tokens and n_tokens > 2 * max_length  # several windows
    nll, scored = sliding_window_nll(model, ids, stride, max_length)
    reference, reference_scored = brute_force_nll(model, ids, stride, max_length)
    assert scored == reference_scored == len(ids) - 1  # each token scored exactly once
    assert nll == pytest.approx(reference, rel=1e-5)


def test_sliding_window_context_matters(tiny_model_dir, one_thread):
    """A longer context changes the numbers (the method really uses its context window)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tokenizer(SHORT_TEXT * 3, add_special_tokens=False)["input_ids"]
    short, _ = sliding_window_nll(model, ids, 4, 4)
    long, _ = sliding_window_nll(model, ids, 4, 64)
    assert short != pytest.approx(long, rel=1e-6)


def test_sliding_window_refuses_bad_settings(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(DashboardError, match="Stride"):
        sliding_window_nll(model, [1, 2, 3], 8, 4)
    with pytest.raises(DashboardError, match="at least two tokens"):
        sliding_window_nll(model, [1], 1, 4)


def test_cli_reports_errors_in_words(home):
    done = cli("perplexity", "--model", "tiny-llama", "--text-file", "general-text.txt", "--stride", "64",
               "--max-length", "10000", "--json")
    assert done.returncode == 2
    assert "more than the model's 4096 positions" in done.stderr
    done = cli("perplexity", "--model", "tiny-llama", "--text-file", "missing.txt", "--json")
    assert done.returncode == 2 and "not found" in done.stderr


def test_page_job_gives_the_same_number_as_the_cli(home, tiny_model_dir, tmp_path_factory):
    run_dir = copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)
    text = home / "datasets" / "probe.txt"
    text.write_text((CODE_ROOT / "datasets" / "general-text.txt").read_text()[:2500])  # ~500 tokens
    tasks = [jobs.perplexity_task("tiny-llama", adapter, text, "probe.txt", 96, 192)
             for adapter in (None, run_dir, run_dir / "checkpoint-2")]
    started = jobs.start_perplexity(tasks, "perplexity of trained")
    assert started["job"] and started["pending"] == 3 and not started["reused"]
    # The command line for the same inputs, run alongside the job (a bare run name is looked up in loras/).
    args = ["perplexity", "--model", "tiny-llama", "--text-file", "probe.txt", "--stride", "96", "--max-length",
            "192", "--json"]
    commands = {checkpoint: cli_process(*args, *(["--lora", lora] if lora else []))
                for checkpoint, lora in (("", None), ("final", "trained"))}
    job_dir = jobs.job_dir_for(started["job"])
    state = wait_for(lambda: (s := jobs.job_state(job_dir))["state"] not in ("queued", "running") and s,
                     timeout=180, what="the perplexity job")
    assert state["state"] == "completed", state
    records = {r["id"]: r for r in read_results()}
    assert set(state["results"]) == set(records) and len(records) == 3

    by_checkpoint = {r["checkpoint"]: r for r in records.values()}
    for checkpoint, process in commands.items():
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err[-3000:]
        result = json.loads(out)
        stored = by_checkpoint[checkpoint]
        assert stored["perplexity"] == pytest.approx(result["perplexity"], rel=1e-9)
        assert stored["tokens"] == result["tokens"]
        assert stored["dataset_sha256"] == result["text_sha256"]
    # Training changed the model: base, checkpoint-2 and the final adapter give three different numbers.
    values = [by_checkpoint[c]["perplexity"] for c in ("", "checkpoint-2", "final")]
    assert len({round(v, 6) for v in values}) == 3, values

    again = jobs.start_perplexity(tasks)
    assert again["job"] is None and len(again["reused"]) == 3  # identical evaluations are not run again
    text.write_text(text.read_text() + "\nOne more sentence.\n")
    changed = [jobs.perplexity_task("tiny-llama", None, text, "probe.txt", 96, 192)]
    assert find_result(changed[0]) is None  # a changed text is a new evaluation


def test_job_failure_is_reported(home):
    (home / "datasets" / "tiny.txt").write_text("Hi")
    task = jobs.perplexity_task("no-such-model", None, home / "datasets" / "tiny.txt", "tiny.txt", 8, 8)
    started = jobs.start_perplexity([task])
    job_dir = jobs.job_dir_for(started["job"])
    state = wait_for(lambda: (s := jobs.job_state(job_dir))["state"] not in ("queued", "running") and s,
                     timeout=120, what="the failing job")
    assert state["state"] == "failed"
    assert "Model not found" in state["error"]
    assert read_results() == []


def test_evaluation_settings_are_one_definition_in_words():
    from trainer.cli import build_parser
    from trainer.perplexity import DEFAULT_SETTINGS, EvaluationSettings

    assert (DEFAULT_SETTINGS.stride, DEFAULT_SETTINGS.max_length) == (256, 512)  # as README documents
    args = build_parser().parse_args(["perplexity", "--model", "m", "--text-file", "t.txt"])
    assert (args.stride, args.max_length, args.precision) == (256, 512, "full")
    with pytest.raises(DashboardError, match=r"^Stride \(600\) must be between 1 and the max length \(512\)\.$"):
        EvaluationSettings(600, 512).validate()
    with pytest.raises(DashboardError, match=r"Max length \(1\) must be at least 2 tokens"):
        EvaluationSettings(1, 1).validate()
    with pytest.raises(DashboardError, match="Precision"):
        EvaluationSettings(precision="2bit").validate()


def test_cli_names_a_bad_stride_in_words(home):
    done = cli("perplexity", "--model", "tiny-llama", "--text-file", "general-text.txt", "--stride", "600",
               "--max-length", "512")
    assert done.returncode == 2
    assert "Stride (600) must be between 1 and the max length (512)." in done.stderr
