"""GGUF out: an adapter as a llama.cpp LoRA file and merged into its base as GGUF models (f16, q8_0 and, for a
run trained from a quantised GGUF base, that base's own type), with Ollama Modelfiles, in models/NAME/.

Nothing is declared done before llama.cpp itself has loaded the files and its next-token logits on a
sample were compared with transformers' (the numbers go into gguf_check.json and onto the page):
- the LoRA file: the logit change it causes on the base model's weights in f16 (converted by llama.cpp
  from the very folder transformers loads) against the change the PEFT adapter causes in transformers,
  by correlation and norm ratio (ADAPTER_MIN_CORRELATION, ADAPTER_NORM_RATIO). On the quantised base GGUF
  people chat with, the same two numbers are measured and shown but not required: llama.cpp quantises
  activations for quantised weights, and that rounding moves logits by about as much as a few training
  steps do (measured: correlation 0.4-0.6 for a small adapter on SmolLM2's Q4_1 and Q8_0 files);
- the merged f16 file directly against base+adapter: largest difference under MERGED_F16_TOLERANCE of
  the logits' spread (f16 rounding of the weights is about 0.007 of it on SmolLM2-135M);
- every quantised merged file: correlation with base+adapter at least QUANTISED_MIN_CORRELATION.
A failed check raises DashboardError and nothing is placed in models/.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from . import llamacpp
from .errors import DashboardError
from .models import LORA_GGUF_ENDING
from .export import (SAMPLE_TEXT, adapter_base_model, default_export_name, check_export_target, merge_checked, place_folder)
from .runfiles import now_iso
from .storage import write_json_atomic, write_text_atomic

ADAPTER_MIN_CORRELATION = 0.99
ADAPTER_NORM_RATIO = (0.9, 1.1)
MERGED_F16_TOLERANCE = 0.03
QUANTISED_MIN_CORRELATION = 0.98
LORA_ENDING = LORA_GGUF_ENDING  # models/ lists every *.gguf as a base model except these
CHECK_FILE = "gguf_check.json"
MERGED_TYPES = ("f16", "q8_0")  # what convert_hf_to_gguf.py writes itself


def default_gguf_name(adapter_dir: Path) -> str:
    return default_export_name(adapter_dir, "gguf")


def base_gguf_file(base_model: str) -> Path | None:
    """The GGUF file a base model was read from (the embedded default, or a .gguf under models/), else None."""
    from .home import models_dir
    from .models import DEFAULT_MODEL, default_gguf_path

    if base_model == DEFAULT_MODEL:
        return default_gguf_path()
    path = models_dir() / base_model
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def check_gguf_adapter(adapter_dir: Path) -> None:
    """Refuse, before any work, an adapter that has no GGUF LoRA form."""
    from .storage import read_json

    if (read_json(Path(adapter_dir) / "adapter_config.json") or {}).get("use_dora"):
        raise DashboardError("A DoRA adapter cannot be a GGUF LoRA: llama.cpp has no place for its magnitude "
                             "vectors. Use 'Merge and save' for a merged model instead.")


def plain_lora_folder(adapter_dir: Path, work: Path) -> Path:
    """The adapter as llama.cpp's converter reads it: a plain LoRA scaled by alpha / r. An rsLoRA adapter
    (scaled by alpha / sqrt(r)) is copied with lora_alpha = alpha * sqrt(r), the same scaling in plain terms,
    because the converter ignores use_rslora. A DoRA adapter has magnitude vectors no GGUF LoRA holds."""
    import math

    from .storage import read_json

    check_gguf_adapter(adapter_dir)
    config = read_json(Path(adapter_dir) / "adapter_config.json") or {}
    if not config.get("use_rslora"):
        return Path(adapter_dir)
    folder = work / "rslora-as-lora"
    folder.mkdir(parents=True)
    for item in Path(adapter_dir).iterdir():
        if item.is_file() and item.name != "adapter_config.json":
            (folder / item.name).symlink_to(item.resolve())
    rank = int(config.get("r") or 8)
    alpha = float(config.get("lora_alpha") or rank)
    write_json_atomic(folder / "adapter_config.json", {**config, "use_rslora": False,
                                                       "lora_alpha": alpha * math.sqrt(rank)})
    return folder


# ---- the comparisons ----------------------------------------------------------------------------------
def effect_agreement(hf_effect, llama_effect) -> dict:
    """How well llama.cpp's logit change matches transformers': correlation and norm ratio (llama / hf)."""
    import numpy as np

    a, b = np.asarray(hf_effect, np.float64).ravel(), np.asarray(llama_effect, np.float64).ravel()
    norm = float(np.linalg.norm(a))
    if norm == 0.0:
        raise DashboardError("The adapter does not change the base model's predictions at all (it is untrained): "
                             "there is nothing to export. Train it for at least a few steps.")
    return {"correlation": float(np.corrcoef(a, b)[0, 1]), "norm_ratio": float(np.linalg.norm(b) / norm)}


def logit_agreement(reference, logits) -> dict:
    """A GGUF model's logits against base+adapter's: largest difference (absolute and relative to their
    spread) and correlation."""
    import numpy as np

    a, b = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
    difference = float(np.abs(a - b).max())
    return {"max_abs_diff": difference, "relative": difference / max(float(a.std()), 1e-9),
            "correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1])}


def _check(passed: bool, sentence: str) -> None:
    if not passed:
        raise DashboardError(sentence + " Nothing was saved.")


def _check_adapter(agreement: dict) -> None:
    low, high = ADAPTER_NORM_RATIO
    _check(agreement["correlation"] >= ADAPTER_MIN_CORRELATION and low <= agreement["norm_ratio"] <= high,
           f"In llama.cpp the GGUF LoRA changes the logits differently from the PEFT adapter (correlation "
           f"{agreement['correlation']:.3f}, needs {ADAPTER_MIN_CORRELATION}; norm ratio {agreement['norm_ratio']:.3f}, "
           f"needs {low}-{high}): the conversion is wrong for this model.")


# ---- the export ---------------------------------------------------------------------------------------
def export_gguf(adapter_dir: Path, name: str, base_model: str | None = None, progress: Callable[[str], None] = print,
                sample_text: str = SAMPLE_TEXT) -> dict:
    """Write models/NAME/: NAME-f16.lora.gguf, NAME-merged-f16.gguf, NAME-merged-q8_0.gguf (and
    NAME-merged-<base type>.gguf for a quantised GGUF base), Modelfile (base + adapter), Modelfile.merged
    and gguf_check.json. Returns what gguf_check.json holds."""
    from .models import model_path

    llamacpp.require_llama_cpp()
    adapter_dir = Path(adapter_dir)
    target = check_export_target(name)
    check_gguf_adapter(adapter_dir)
    base_model = base_model or adapter_base_model(adapter_dir)
    base_folder = model_path(base_model, progress)
    original = base_gguf_file(base_model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    work = Path(tempfile.mkdtemp(prefix=".gguf-work.", dir=target.parent))
    try:
        report = _write_and_check(adapter_dir, target.name, base_model, base_folder, original, staging, work,
                                  progress, sample_text)
        shutil.rmtree(work, ignore_errors=True)
        write_json_atomic(staging / CHECK_FILE, report)
        staging.chmod(0o755)
        place_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    report["path"] = str(target)
    progress(gguf_sentence(report))
    return report


def gguf_sentence(report: dict) -> str:
    """What an export wrote and what llama.cpp measured, in one sentence."""
    lora, merged = report["lora_check"], report["merged"]
    files = ", ".join(report["files"].values())
    sentence = (f"Saved models/{report['name']}/ ({files}, Modelfile). In llama.cpp the GGUF LoRA changes the "
                f"logits as the PEFT adapter does (correlation {lora['correlation']:.4f}, norm ratio "
                f"{lora['norm_ratio']:.3f}); the merged f16 file's logits match base+adapter within "
                f"{merged['f16']['relative']:.3f} of their spread.")
    on_base = report.get("lora_on_base_gguf")
    if on_base:
        sentence += (f" On the quantised {on_base['on']} the effect correlates {on_base['correlation']:.2f} "
                     f"(quantisation noise, not required).")
    return sentence


def _write_and_check(adapter_dir: Path, name: str, base_model: str, base_folder: Path, original: Path | None,
                     staging: Path, work: Path, progress: Callable[[str], None], sample_text: str) -> dict:
    lora = llamacpp.adapter_to_gguf(plain_lora_folder(adapter_dir, work), base_folder,
                                    staging / f"{name}-f16{LORA_ENDING}", "f16", progress)
    checked = merge_checked(adapter_dir, base_model, work / "merged", progress, sample_text)
    ids, reference = checked["token_ids"], checked["reference"].numpy()
    hf_effect = reference - checked["base_logits"].numpy()

    # The base in f16 from the folder transformers loads: beside the files when it is the base people use
    # (no GGUF of their own), else only for the check.
    base_f16 = llamacpp.model_to_gguf(base_folder, (work if original else staging) / f"{Path(base_model).stem}-f16.gguf",
                                      "f16", progress)
    progress("Comparing the GGUF LoRA's effect in llama.cpp with the PEFT adapter's...")
    adapter = effect_agreement(hf_effect, llamacpp.logits(base_f16, ids, lora) - llamacpp.logits(base_f16, ids))
    _check_adapter(adapter)
    report = {"date": now_iso(), "adapter_dir": str(adapter_dir.resolve()), "base_model": base_model, "sample_text": sample_text,
              "name": name, "lora_check": {**adapter, "on": base_f16.name}, "merged": {}, "files": {"lora": lora.name}}
    chat_base = original or (staging / base_f16.name)
    report["base_gguf"] = str(original) if original else base_f16.name  # a bare name lies in the folder
    if original is not None:
        report["lora_on_base_gguf"] = {**effect_agreement(
            hf_effect, llamacpp.logits(original, ids, lora) - llamacpp.logits(original, ids)), "on": original.name}
    for outtype, path in _merged_files(work / "merged", name, original, staging, progress).items():
        progress(f"Checking {path.name} in llama.cpp...")
        agreement = logit_agreement(reference, llamacpp.logits(path, ids))
        report["merged"][outtype] = {**agreement, "file": path.name}
        if outtype == "f16":
            _check(agreement["relative"] < MERGED_F16_TOLERANCE,
                   f"The merged f16 GGUF's logits differ from base+adapter by {agreement['relative']:.3f} of their "
                   f"spread in llama.cpp (limit {MERGED_F16_TOLERANCE}).")
        else:
            _check(agreement["correlation"] >= QUANTISED_MIN_CORRELATION,
                   f"The merged {outtype} GGUF's logits correlate only {agreement['correlation']:.3f} with "
                   f"base+adapter in llama.cpp (needs {QUANTISED_MIN_CORRELATION}).")
    report["files"].update({k: v["file"] for k, v in report["merged"].items()})
    template = _chat_template(adapter_dir) or llamacpp.gguf_metadata(staging / report["files"]["f16"])["chat_template"]
    report.update(_write_modelfiles(name, staging, chat_base, lora, report["merged"], template))
    return report


def _merged_files(merged_folder: Path, name: str, original: Path | None, staging: Path,
                  progress: Callable[[str], None]) -> dict[str, Path]:
    files = {t: llamacpp.model_to_gguf(merged_folder, staging / f"{name}-merged-{t}.gguf", t, progress)
             for t in MERGED_TYPES}
    base_type = llamacpp.gguf_metadata(original)["file_type"] if original else None
    if base_type and base_type.lower() not in files and base_type in llamacpp.QUANT_TYPES:
        progress(f"Quantising the merged model to the base's own type, {base_type}...")
        files[base_type.lower()] = llamacpp.quantize(files["f16"], staging / f"{name}-merged-{base_type.lower()}.gguf",
                                                     base_type)
    return files


def _chat_template(adapter_dir: Path) -> str | None:
    """The instruction template the run was trained with (its chat_template parameter), or None for the
    model's own, which the merged GGUF carries."""
    from .chattemplates import instruction_template_path, load_instruction_template
    from .runtable import run_parameters

    run_dir = adapter_dir.parent if adapter_dir.name.startswith("checkpoint-") else adapter_dir
    choice = run_parameters(run_dir).get("chat_template")
    return load_instruction_template(instruction_template_path(choice)) if choice else None


def _write_modelfiles(name: str, staging: Path, chat_base: Path, lora: Path, merged: dict,
                      template: str | None) -> dict:
    from .ollama import modelfile, ollama_commands, template_family

    smallest = next((merged[t]["file"] for t in merged if t != "f16" and t != "q8_0"), merged["q8_0"]["file"])
    base = chat_base if chat_base.parent != staging else Path(chat_base.name)
    write_text_atomic(staging / "Modelfile", modelfile(base, Path(lora.name), template,
                                                       f"{name}: the base model with the LoRA adapter"))
    write_text_atomic(staging / "Modelfile.merged", modelfile(Path(smallest), None, template,
                                                              f"{name}: the merged model ({smallest})"))
    folder = staging.parent / name
    return {"modelfiles": ["Modelfile", "Modelfile.merged"], "chat_template_family": template_family(template),
            "commands": ollama_commands(name, folder), "commands_merged": ollama_commands(
                f"{name}-merged", folder, "Modelfile.merged")}



# ---- finding exports ------------------------------------------------------------------------------------
def gguf_exports(adapter_dir: Path) -> list[dict]:
    """The GGUF exports of this adapter in models/ (newest first), each its gguf_check.json with the absolute
    paths of its base GGUF ("base_path") and LoRA file ("lora_path")."""
    from .home import models_dir
    from .storage import read_json

    found = []
    for check in sorted(models_dir().glob(f"*/{CHECK_FILE}")):
        report = read_json(check) or {}
        if report.get("adapter_dir") != str(Path(adapter_dir).resolve()) or not report.get("base_gguf"):
            continue
        base = Path(report["base_gguf"])
        report.update(folder=str(check.parent), base_path=str(base if base.is_absolute() else check.parent / base),
                      lora_path=str(check.parent / report["files"]["lora"]))
        if Path(report["base_path"]).is_file() and Path(report["lora_path"]).is_file():
            found.append(report)
    return sorted(found, key=lambda r: r.get("date", ""), reverse=True)
