"""bench/gpu_check.py --cpu-dry-run: the GPU check's own code, on the CPU with a tiny model, so that the
script is known to work before a GPU is lent: every configuration reported, the same samples for both
pipelines, the 4-bit rows skipped with their reason, the table and the JSON written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from trainer.home import CODE_ROOT, HOME_ENV


def test_the_cpu_dry_run_measures_both_pipelines_on_the_same_samples(tmp_path, default_model_dir):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(HOME_ENV, None)  # the check makes its own home folder
    proc = subprocess.run([sys.executable, str(CODE_ROOT / "bench" / "gpu_check.py"), "--cpu-dry-run", "--out", str(out)],
                          cwd=CODE_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.md").read_text()
    assert table in proc.stdout  # the table printed is the one written
    assert "| pipeline | weights | cutoff | packing | micro batch | steps | useful tok/s | peak VRAM GiB |" in table
    runs = {(r["pipeline"], r["weights"], r["cutoff"], r["packing"]): r for r in report["runs"]}
    assert len(runs) == 16 == len(report["runs"])  # 2 pipelines x 2 weight types x 2 cutoffs x packing off/on
    for (pipeline, weights, cutoff, packing), r in runs.items():
        if weights == "4-bit QLoRA":
            assert r["status"] == "skipped" and "CPU dry run" in r["reason"], r
            continue
        assert r["status"] == "ok", r
        assert r["useful_tokens_per_s"] > 0 and math.isfinite(r["useful_tokens_per_s"]), r
        assert math.isfinite(r["final_loss"]) and r["steps"] >= 2, r
        assert r["peak_vram_gib"] is None  # no GPU: no VRAM figure, not a made-up one
        assert r["micro_batch"] == 512 // cutoff
        # Both pipelines trained exactly the same tokens: the samples the trainer builds.
        assert r["useful_tokens"] == runs[("trainer", weights, cutoff, packing)]["useful_tokens"], (pipeline, cutoff)
        assert r["positions"] >= r["useful_tokens"]
        cells = f"| {'this trainer' if pipeline == 'trainer' else 'TRL SFTTrainer'} | {weights} | {cutoff} | " \
                f"{'on' if packing else 'off'} | {r['micro_batch']} | {r['steps']} | {r['useful_tokens_per_s']:.0f} |"
        assert cells in table
    trl = runs[("trl", "bf16 LoRA", 128, True)]["settings"]
    assert trl["packing"] and trl["padding_free"] and trl["completion_only_loss"] and not trl["bf16"]
    assert {(q["cutoff"], q["packing"]) for q in report["ratios"]} == {(128, False), (128, True), (256, False),
                                                                      (256, True)}
    for q in report["ratios"]:
        mine = runs[("trainer", q["weights"], q["cutoff"], q["packing"])]["useful_tokens_per_s"]
        theirs = runs[("trl", q["weights"], q["cutoff"], q["packing"])]["useful_tokens_per_s"]
        assert math.isclose(q["speed"], mine / theirs)
    assert report["settings"]["dry_run"] and report["model"]["num_hidden_layers"] == 2


def test_without_a_gpu_the_check_says_so_before_any_work(tmp_path, default_model_dir):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(CODE_ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "o")],
                          cwd=CODE_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "No CUDA GPU is visible" in proc.stderr and "--cpu-dry-run" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_missing_wheels_folder_is_named(tmp_path, default_model_dir):
    proc = subprocess.run([sys.executable, str(CODE_ROOT / "bench" / "gpu_check.py"), "--cpu-dry-run",
                           "--wheels", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
                          cwd=CODE_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"The wheels folder {tmp_path / 'nowhere'} does not exist" in proc.stderr
    assert "--download-wheels" in proc.stderr
