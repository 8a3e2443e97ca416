"""The throughput benchmark's quick mode runs every pipeline end to end (tiny model) and reports sane numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from trainer.home import CODE_ROOT, HOME_ENV


def test_quick_benchmark_runs_all_three_pipelines_on_the_same_tokens(tmp_path, default_model_dir):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(HOME_ENV, None)  # the benchmark makes its own home folder
    proc = subprocess.run(
        [sys.executable, str(CODE_ROOT / "bench" / "train_throughput.py"), "--quick", "--packing", "on",
         "--json", str(out)],
        cwd=CODE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "useful tok/s" in proc.stdout and "(c)/(a)" in proc.stdout

    report = json.loads(out.read_text())
    assert report["matmul"]["flops_per_s"] > 0
    assert set(report["datasets"]) == {"alpaca", "raw"}
    for kind, data in report["datasets"].items():
        pipelines = data["pipelines"]
        assert {"a", "b", "c"} <= set(pipelines), kind
        for name, result in pipelines.items():
            assert result["useful_tokens_per_s"] > 0, (kind, name)
            assert math.isfinite(result["final_loss"]) and math.isfinite(result["mean_loss"]), (kind, name)
            assert result["peak_rss_mb"] > 0 and result["loop_s"] > 0, (kind, name)
            assert 0 < result["fraction_of_matmul"], (kind, name)
        # Every pipeline trained exactly the same (non-padding) tokens: the samples the project builds.
        tokens = {result["useful_tokens"] for result in pipelines.values()}
        assert tokens == {data["useful_tokens"]}, (kind, tokens)
        pad = {name: result["padding_fraction"] for name, result in pipelines.items()}
        assert pad["a"] > pad["b"] >= pad["c"] >= 0, (kind, pad)
        assert data["ratios"]["c/a"] > 0 and data["ratios"]["c/b"] > 0


def test_quick_memory_benchmark_compares_the_estimate_with_a_real_run(default_model_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(HOME_ENV, None)
    proc = subprocess.run([sys.executable, str(CODE_ROOT / "bench" / "memory_estimate.py"), "--quick", "--json"],
                          cwd=CODE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "worst ratio" in proc.stdout
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 1 and rows[0]["measured"] > 100e6
    # The tiny model's peak is mostly the libraries: the estimate's parts must add up to a close total.
    assert 0.5 < rows[0]["ratio"] < 2.0, rows
    assert set(rows[0]["parts"]) == {"weights", "adapter + optimiser", "activations", "output layer", "runtime"}
