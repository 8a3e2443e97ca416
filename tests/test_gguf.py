"""GGUF out: a trained adapter exported as a GGUF LoRA and as merged GGUF models, loaded by llama.cpp itself and
compared with transformers' base+adapter; Ollama Modelfiles beside them. Needs `make gguf-setup` (CI runs it
and sets LORA_DASHBOARD_REQUIRE_LLAMA_CPP=1, so there these tests fail instead of being skipped)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from trainer import jobs, llamacpp
from trainer.chattemplates import instruction_template_path, load_instruction_template
from trainer.errors import DashboardError
from trainer.gguf import (ADAPTER_MIN_CORRELATION, MERGED_F16_TOLERANCE, default_gguf_name, effect_agreement,
                          export_gguf)
from trainer.home import CODE_ROOT
from trainer.models import list_models
from trainer.ollama import FAMILIES, modelfile, template_family

from .evalhelpers import copy_run, trained_run_source, wait_for
from .trainhelpers import run_trainer, write_run


@pytest.fixture
def llama_cpp_ready():
    problem = llamacpp.llama_cpp_problem()
    if problem:
        if os.environ.get("LORA_DASHBOARD_REQUIRE_LLAMA_CPP"):
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture
def trained(home, tiny_model_dir, tmp_path_factory):
    return copy_run(trained_run_source(tiny_model_dir, tmp_path_factory.mktemp("src")), home)


def modelfile_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_a_tiny_run_exported_from_the_page_runs_in_llama_cpp_like_in_transformers(home, trained, llama_cpp_ready):
    at = AppTest.from_file(str(CODE_ROOT / "views" / "evaluate.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert at.text_input(key="ev_gguf_name_trained_final").value == "trained-gguf"
    at.button(key="ev_gguf_start").click()
    at.run()
    check = home / "models" / "trained-gguf" / "gguf_check.json"
    wait_for(check.exists, timeout=600, interval=0.5, what="the GGUF export job")
    report = json.loads(check.read_text())
    folder = home / "models" / "trained-gguf"
    assert report["name"] == "trained-gguf"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["trained-gguf-f16.lora.gguf", "trained-gguf-merged-f16.gguf",
                            "trained-gguf-merged-q8_0.gguf", "tiny-llama-f16.gguf", "Modelfile",
                            "Modelfile.merged", "gguf_check.json"])
    assert report["adapter_dir"] == str(trained.resolve()) and report["base_gguf"] == "tiny-llama-f16.gguf"
    assert report["lora_check"]["correlation"] >= ADAPTER_MIN_CORRELATION
    assert 0.9 <= report["lora_check"]["norm_ratio"] <= 1.1
    assert report["merged"]["f16"]["relative"] < MERGED_F16_TOLERANCE
    assert report["merged"]["q8_0"]["correlation"] > 0.98
    assert "lora_on_base_gguf" not in report  # the base was a transformers folder: its f16 GGUF is the base

    # Independently of the export's own check: llama.cpp applies the LoRA file and it changes the logits.
    ids = [1, 504, 3458, 282, 260, 1345, 30]
    base = llamacpp.logits(folder / "tiny-llama-f16.gguf", ids)
    adapted = llamacpp.logits(folder / "tiny-llama-f16.gguf", ids, folder / "trained-gguf-f16.lora.gguf")
    assert np.abs(adapted - base).max() > 1e-3

    # Base + adapter for Ollama, and the merged model; the ChatML template carried over in Ollama's syntax.
    lines = modelfile_lines(folder / "Modelfile")
    assert lines[:2] == ["FROM ./tiny-llama-f16.gguf", "ADAPTER ./trained-gguf-f16.lora.gguf"]
    assert lines[2].startswith('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}')
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert modelfile_lines(folder / "Modelfile.merged")[0] == "FROM ./trained-gguf-merged-q8_0.gguf"
    assert report["commands"][1:] == ["ollama create trained-gguf -f Modelfile", "ollama run trained-gguf"]

    # The merged GGUF files are base models to pick; the LoRA file is not.
    models = list_models()
    assert "trained-gguf/trained-gguf-merged-q8_0.gguf" in models
    assert not any(name.endswith(".lora.gguf") for name in models)

    # The page shows the outcome and the commands, and Try it answers through llama.cpp too.
    at.run()
    assert not at.exception, at.exception
    assert any(m.value.startswith("Saved models/trained-gguf/") for m in at.success)
    assert "ollama create trained-gguf -f Modelfile\nollama run trained-gguf" in [c.value for c in at.code]
    assert at.checkbox(key="ev_try_gguf").value is True
    at.text_area(key="ev_try_prompt").input("How do I start a run?")
    at.number_input(key="ev_try_max_new").set_value(6)
    at.button(key="ev_try_go").click()
    at.run(timeout=180)
    assert not at.exception, at.exception
    output = at.session_state["ev_try_output"]
    assert output["gguf"] and output["gguf_label"] == "trained-gguf-f16.lora.gguf"
    assert "**llama.cpp: the GGUF base with trained-gguf-f16.lora.gguf**" in [m.value for m in at.markdown]


def test_the_default_model_exports_from_the_command_line_with_its_own_quantisation(home, llama_cpp_ready):
    run_dir = write_run(home, "smol", base_model="SmolLM2-135M-Instruct", max_steps=2, micro_batch_size=1,
                        batch_size=1, cutoff_len=48, learning_rate="2e-3", save_steps=0)
    done = run_trainer(run_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "trainer", "export", "--lora", "loras/smol", "--to", "gguf",
                          "--json"], cwd=CODE_ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    folder = home / "models" / "smol-gguf"
    assert set(report["merged"]) == {"f16", "q8_0", "q4_1"}  # the embedded default is a Q4_1 GGUF
    assert (folder / "smol-gguf-merged-q4_1.gguf").is_file()
    assert llamacpp.gguf_metadata(folder / "smol-gguf-merged-q4_1.gguf")["file_type"] == "Q4_1"
    assert report["lora_check"]["correlation"] >= ADAPTER_MIN_CORRELATION
    on_base = report["lora_on_base_gguf"]
    assert on_base["on"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and on_base["correlation"] > 0
    # Ollama takes the package's own GGUF file as the base (an absolute path) and the LoRA beside it.
    lines = modelfile_lines(folder / "Modelfile")
    assert lines[0].startswith("FROM /") and lines[0].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert lines[1] == "ADAPTER ./smol-gguf-f16.lora.gguf"
    assert not (folder / "SmolLM2-135M-Instruct-f16.gguf").exists()  # the check's f16 base is not kept


def test_an_untrained_adapter_is_refused_and_nothing_is_written(home, tiny_model_dir, llama_cpp_ready):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run_dir = write_run(home, "untrained")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(run_dir)
    before = sorted(p.name for p in (home / "models").iterdir())
    with pytest.raises(DashboardError, match="untrained"):
        export_gguf(run_dir, "untrained-gguf", progress=lambda message: None)
    assert sorted(p.name for p in (home / "models").iterdir()) == before


def test_an_existing_name_is_refused_at_once(home, trained):
    (home / "models" / "taken").mkdir()
    with pytest.raises(DashboardError, match="already exists"):
        jobs.start_export(trained, "taken", to="gguf")
    assert default_gguf_name(trained / "checkpoint-4") == "trained-checkpoint-4-gguf"


def test_without_llama_cpp_the_export_says_how_to_install_it(home, trained, tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.CONVERTERS_ENV, str(tmp_path / "nowhere"))
    problem = llamacpp.llama_cpp_problem()
    assert "make gguf-setup" in problem
    with pytest.raises(DashboardError, match="make gguf-setup"):
        jobs.start_export(trained, "new-gguf", to="gguf")
    assert not (home / "models" / "new-gguf").exists() and not (home / "results" / "jobs").exists()


def test_each_shipped_template_is_written_in_ollamas_language():
    shipped = {"ChatML": "ChatML", "Llama-v3": "Llama 3", "Mistral": "Mistral", "Alpaca": "Alpaca",
               "Vicuna-v1.1": "Vicuna"}
    for name, family in shipped.items():
        jinja = load_instruction_template(instruction_template_path(name))
        assert template_family(jinja) == family, name
        text = modelfile(Path("/m/base.gguf"), Path("a.lora.gguf"), jinja, "t")
        lines = text.splitlines()
        assert "FROM /m/base.gguf" in lines and "ADAPTER ./a.lora.gguf" in lines
        template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
        assert template == FAMILIES[family][1] and "{{ .Content }}" in template and "range .Messages" in template
        assert [line for line in lines if line.startswith("PARAMETER stop")] == [
            f'PARAMETER stop "{stop}"' for stop in FAMILIES[family][2]]
    unknown = modelfile(Path("/m/base.gguf"), None, "{{ messages }}", "t")
    assert "TEMPLATE" not in unknown.replace("No TEMPLATE line", "") and "ADAPTER" not in unknown


def test_agreement_numbers():
    effect = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]])
    same = effect_agreement(effect, effect * 1.02)
    assert same["correlation"] == pytest.approx(1.0) and same["norm_ratio"] == pytest.approx(1.02)
    assert effect_agreement(effect, -effect)["correlation"] == pytest.approx(-1.0)
    with pytest.raises(DashboardError, match="untrained"):
        effect_agreement(np.zeros((2, 3)), effect)


def test_an_rslora_adapter_exports_with_its_own_scaling_and_dora_is_refused_at_once(home, llama_cpp_ready):
    run_dir = write_run(home, "rs", max_steps=2, use_rslora=True, lora_rank=16, lora_alpha=16,
                        learning_rate="1e-2", target_modules="q-v")
    done = run_trainer(run_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # llama.cpp's converter reads alpha / r; the adapter is scaled by alpha / sqrt(r), four times as much here.
    report = export_gguf(run_dir, "rs-gguf", progress=lambda message: None)
    assert report["lora_check"]["correlation"] >= ADAPTER_MIN_CORRELATION
    assert 0.9 <= report["lora_check"]["norm_ratio"] <= 1.1
    assert json.loads((run_dir / "adapter_config.json").read_text())["use_rslora"] is True  # the run is untouched

    config = json.loads((run_dir / "adapter_config.json").read_text())
    (run_dir / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(DashboardError, match="DoRA adapter cannot be a GGUF LoRA"):
        jobs.start_export(run_dir, "dora-gguf", to="gguf")
    assert not (home / "models" / "dora-gguf").exists() and not (home / "results" / "jobs").exists()
