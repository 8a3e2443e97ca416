"""llama.cpp from Python: its converters (HF folder or PEFT adapter to GGUF), quantisation, and its runtime
(logits and generation), used by the GGUF export (trainer/gguf.py) and *Try it* on GGUF.

Conversion uses llama.cpp's own scripts, never a hand-written tensor mapping: `convert_hf_to_gguf.py`,
`convert_lora_to_gguf.py`, their `conversion/` package and the matching `gguf-py`, as vendored in the
source distribution of llama-cpp-python (LLAMA_CPP_PYTHON below). `make gguf-setup` builds that package
(the runtime) and copies the converters into .venv/llama.cpp/; LORA_DASHBOARD_LLAMA_CPP points elsewhere.
The scripts run as subprocesses: they are command-line programs with their own import path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .errors import DashboardError

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned llama-cpp-python: runtime and vendored converters come from it
CONVERTERS_ENV = "LORA_DASHBOARD_LLAMA_CPP"
SETUP_HINT = (f"GGUF needs llama.cpp: run `make gguf-setup` (builds llama-cpp-python {LLAMA_CPP_PYTHON} from "
              "source, 5-10 minutes on two cores the first time) and restart the app.")
# Quantisation types llama_model_quantize writes, by llama.cpp's names (gguf's LlamaFileType: MOSTLY_Q4_1 -> Q4_1);
# f16/f32 come from the converter itself.
QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
               "Q5_K_S", "Q5_K_M", "Q6_K")


def converters_dir() -> Path:
    return Path(os.environ.get(CONVERTERS_ENV) or Path(sys.prefix) / "llama.cpp")


def llama_cpp_problem() -> str | None:
    """A sentence saying what is missing for GGUF export and runs, or None when llama.cpp is ready."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return SETUP_HINT
    folder = converters_dir()
    missing = [name for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
               if not (folder / name).exists()]
    if missing:
        return f"llama.cpp's converters are missing from {folder} ({', '.join(missing)}). {SETUP_HINT}"
    return None


def require_llama_cpp() -> None:
    problem = llama_cpp_problem()
    if problem:
        raise DashboardError(problem)


# ---- converters -------------------------------------------------------------------------------------
def _convert(script: str, arguments: list[str], what: str, progress: Callable[[str], None]) -> None:
    require_llama_cpp()
    command = [sys.executable, str(converters_dir() / script), *arguments]
    progress(f"{what} (llama.cpp's {script})...")
    done = subprocess.run(command, capture_output=True, text=True, cwd=converters_dir())
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise DashboardError(f"{what} failed in llama.cpp's {script}: {last}")


def model_to_gguf(model_folder: Path, out: Path, outtype: str = "f16",
                  progress: Callable[[str], None] = print) -> Path:
    """A transformers model folder as one GGUF file (outtype f32, f16, bf16 or q8_0)."""
    _convert("convert_hf_to_gguf.py", [str(model_folder), "--outfile", str(out), "--outtype", outtype],
             f"Converting {Path(model_folder).name} to {outtype} GGUF", progress)
    return Path(out)


def adapter_to_gguf(adapter_dir: Path, base_folder: Path, out: Path, outtype: str = "f16",
                    progress: Callable[[str], None] = print) -> Path:
    """A PEFT LoRA folder as a GGUF LoRA file that llama.cpp applies to the base model's GGUF (--lora)."""
    _convert("convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_folder), "--outfile", str(out),
                                         "--outtype", outtype], "Converting the adapter to a GGUF LoRA", progress)
    return Path(out)


def quantize(source: Path, target: Path, type_name: str) -> Path:
    """Re-quantise a GGUF file with llama.cpp (llama_model_quantize), e.g. to the base model's own type."""
    require_llama_cpp()
    import llama_cpp

    from gguf import LlamaFileType

    if type_name not in QUANT_TYPES:
        raise DashboardError(f"llama.cpp cannot write {type_name}; choose one of {', '.join(QUANT_TYPES)}.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LlamaFileType[f"MOSTLY_{type_name}"])
    params.nthread = max(1, os.cpu_count() or 1)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise DashboardError(f"llama.cpp could not quantise {Path(source).name} to {type_name}.")
    return Path(target)


def gguf_metadata(path: Path) -> dict:
    """A GGUF file's type ("model" or "adapter"), architecture, file type name and chat template."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(path))

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    file_type = value("general.file_type")
    return {"type": value("general.type") or "model", "architecture": value("general.architecture"),
            "file_type": _file_type_name(LlamaFileType, file_type),
            "chat_template": value("tokenizer.chat_template")}


def _file_type_name(types, number) -> str | None:
    """"Q4_1" for general.file_type 3 (gguf's LlamaFileType names without MOSTLY_; ALL_F32 is "F32")."""
    if number is None:
        return None
    try:
        return types(number).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return str(number)


# ---- runtime ----------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _without_repacking() -> None:
    """Load models without llama.cpp's extra CPU buffer types (weight repacking, AMX). On this project's
    Xeon (AMX) machines a quantised model loaded with them crashes the process (SIGSEGV) on any batch of
    more than one token; without them the same files run correctly, somewhat slower. llama-cpp-python's
    Llama class does not take the setting, so its default model parameters are wrapped, once."""
    import llama_cpp.llama_cpp as library

    defaults = library.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = False
        return params

    library.llama_model_default_params = model_params


def load(path: Path, lora: Path | None = None, n_ctx: int = 512, all_logits: bool = False):
    """A llama.cpp model (llama_cpp.Llama) from a GGUF file, with a GGUF LoRA applied at scale 1."""
    require_llama_cpp()
    import llama_cpp

    _without_repacking()
    options = dict(model_path=str(path), n_ctx=n_ctx, logits_all=all_logits, verbose=False,
                   n_threads=max(1, os.cpu_count() or 1))
    if lora is not None:
        options["lora_path"] = str(lora)
    try:
        return llama_cpp.Llama(**options)
    except (ValueError, RuntimeError) as exc:
        raise DashboardError(f"llama.cpp cannot load {Path(path).name}"
                             f"{' with ' + Path(lora).name if lora else ''}: {exc}") from None


def logits(path: Path, token_ids: list[int], lora: Path | None = None):
    """llama.cpp's logits (float64, one row per token) for these token ids."""
    import numpy as np

    model = load(path, lora, n_ctx=max(64, len(token_ids) + 8), all_logits=True)
    try:
        model.eval(list(token_ids))
        return np.array(model.scores[: len(token_ids)], dtype=np.float64)
    finally:
        model.close()


def generate(path: Path, lora: Path | None, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0) -> str:
    """llama.cpp's answer to a prompt already in its final form (template applied), with the GGUF LoRA."""
    model = load(path, lora, n_ctx=2048)
    try:
        output = model.create_completion(prompt, max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        return output["choices"][0]["text"]
    finally:
        model.close()
