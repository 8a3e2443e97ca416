"""One typed definition of every training parameter: labels, defaults, ranges, help, groups and validation.

Both pages draw each field from its metadata (views/common.parameter_widget), the command line builds its
options from it, the sample cache keys on the fields marked `shapes_samples`, every message names a field by
its label, and the trainer reads `training_parameters.json` through `TrainingParameters.from_dict`. Keys are named as
text-generation-webui names them where it has them, so a webui run folder's parameters load too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import DashboardError
from .fieldvalues import coerce, decode_escapes, range_problem
from .home import check_name
from .webui import read_webui_parameters

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

SCHEDULERS = [
    "linear", "constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "polynomial",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
]
OPTIMIZERS = ["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"]
TARGET_MODULE_CHOICES = {
    "q-v": ["q_proj", "v_proj"],
    "q-k-v-o": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",
    "custom": None,
}
PRECISIONS = ["full", "8bit", "4bit"]
# peft's init_lora_weights: "default" is peft's own (True); pissa and olora move part of the base weights into
# the adapter (trainer/variants.py converts what is saved).
LORA_INITS = ["default", "pissa", "olora"]
OVERLONG_CHOICES = ["truncate", "drop"]

GROUPS = ["basic", "data", "lora", "optimisation", "advanced"]


def _p(label, default, help, group, lo=None, hi=None, choices=None, lo_open=False, *, fmt=None,
       shapes_samples=False, data_kind=None, choices_from=None):
    """A field with its metadata, the one description every list, form, option and message reads:

    - `label`: what a person reads, on both pages and in every error message (never the code name);
    - `help`, `group` (the Train page's tab), `min`/`max` (inclusive; `min_open`: the minimum itself is
      refused), `choices`;
    - `format`: how a number input shows the value (printf style, as st.number_input takes it);
    - `shapes_samples`: the option changes the samples build_samples makes (the sample cache keys on these,
      `preview` offers them, the Data page shows them);
    - `data_kind`: "raw" or "formatted" when the option applies to that kind of data only;
    - `choices_from`: where a picker's choices come from ("models", "raw datasets", "formatted datasets",
      "datasets", "formats") for a text field naming a file.
    """
    if fmt is None and isinstance(default, (int, float)) and not isinstance(default, bool):
        fmt = "%d" if isinstance(default, int) else "%g"
    meta = {"label": label, "help": help, "group": group, "min": lo, "max": hi, "choices": choices,
            "min_open": lo_open, "format": fmt, "shapes_samples": shapes_samples, "data_kind": data_kind,
            "choices_from": choices_from}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _data(label, default, help, lo=None, hi=None, choices=None, **meta):
    """A data option: it shapes the samples."""
    return _p(label, default, help, "data", lo, hi, choices, shapes_samples=True, **meta)


@dataclass
class TrainingParameters:
    # basic
    lora_name: str = _p("LoRA name", "", "Name of the LoRA: its folder under loras/.", "basic")
    base_model: str = _p("Base model", DEFAULT_MODEL,
                         "Model folder or GGUF file under models/ (or the embedded default); its tokenizer counts "
                         "the tokens of the samples.", "basic", choices_from="models")
    epochs: float = _p("Epochs", 3.0, "Passes over the data. Ignored when max steps is set.", "basic", 0.0, 1000.0,
                       lo_open=True)
    max_steps: int = _p("Max steps", 0, "Stop after this many optimiser steps (0: use epochs).", "basic", 0,
                        10_000_000)
    learning_rate: float = _p("Learning rate", 3e-4, "Peak learning rate. 3e-4 is a good start for LoRA.", "basic",
                              0.0, 1.0, lo_open=True, fmt="%.2e")
    # data
    dataset: str = _data("Dataset", "", "Rows in datasets/ (.json, .jsonl, .csv, .tsv, .parquet): format-file "
                                        "records, chat rows, prompt/completion or text rows. Empty for raw text.", data_kind="formatted", choices_from="formatted datasets")
    format: str = _data("Format", "", "Format file in formats/ (the home's first, then the shipped ones) that renders "
                                      "each JSON row into a prompt.", data_kind="formatted", choices_from="formats")
    raw_text_file: str = _data("Raw text file or folder", "", "A .txt file or folder of them in datasets/ (raw text).",
                               data_kind="raw", choices_from="raw datasets")
    eval_dataset: str = _p("Eval dataset", "", "Optional held-out dataset, evaluated every eval steps.", "data",
                           choices_from="datasets")
    eval_steps: int = _p("Eval steps", 100, "Evaluate every this many steps (when an eval dataset is set).", "data",
                         1, 10_000_000)
    cutoff_len: int = _data("Cutoff length (tokens)", 256,
                            "Maximum tokens in one sample. Longer text is cut into chunks.", 8, 32768)
    overlap_len: int = _data("Overlap length (tokens)", 128,
                             "Raw text: tokens shared by consecutive chunks. Must be below cutoff.", 0, 32768,
                             data_kind="raw")
    newline_favor_len: int = _data("Newline favour (characters)", 128,
                                   "Raw text: move a cut to a newline lying within this many characters.", 0, 100_000,
                                   data_kind="raw")
    hard_cut_string: str = _data("Hard cut string", "\\n\\n\\n",
                                 "Raw text: no chunk crosses this string (escapes such as \\n allowed).",
                                 data_kind="raw")
    min_chars: int = _data("Minimum block size (characters)", 0,
                           "Raw text: drop blocks whose stripped length is at most this many characters.", 0,
                           10_000_000, data_kind="raw")
    train_only_after: str = _data(
        "Train only after", "", "Formatted data: only tokens after this string (e.g. 'Assistant:') count in the loss.",
        data_kind="formatted")
    add_eos_token: bool = _data("Add EOS token", True,
                                "Append the end-of-sequence token to each sample / raw-text block.")
    add_bos_token: bool = _data("Add BOS token", False,
                                "Prepend the beginning-of-sequence token to each sample / chunk.")
    overlong_samples: str = _data("Samples over the cutoff", "truncate",
                                  "Formatted samples over the cutoff: truncate them or drop them.",
                                  choices=OVERLONG_CHOICES, data_kind="formatted")
    chat_template: str = _data(
        "Chat template", "", "Chat rows (messages, ShareGPT conversations, prompt/completion messages): empty for "
        "the model's own chat template, or an instruction template from instruction-templates/ (the home's, then "
        "the shipped ChatML, Llama-v3, Mistral, Alpaca, Vicuna-v1.1).", data_kind="formatted",
        choices_from="instruction templates")
    train_last_turn_only: bool = _data(
        "Train the last assistant turn only", False,
        "Chat rows: only the last assistant reply counts in the loss; earlier turns are context.",
        data_kind="formatted")
    skip_unmatched_rows: bool = _p(
        "Skip unmatched rows", False,
        "Train even though some rows match no key of the format file (they are skipped).", "data")
    # lora
    lora_rank: int = _p("LoRA rank", 32, "LoRA rank: capacity of the adapter. Higher learns more, costs more.",
                        "lora", 1, 1024)
    lora_alpha: int = _p("LoRA alpha", 64, "LoRA alpha: scale of the adapter. Usually twice the rank.", "lora", 1,
                         4096)
    lora_dropout: float = _p("LoRA dropout", 0.0, "Dropout on the LoRA layers. 0 (text-generation-webui's default too) "
                             "trains fastest: sibling layers such as q, k and v then share one LoRA-A product.",
                             "lora", 0.0, 0.9, fmt="%.2f")
    target_modules: str = _p(
        "Target modules", "all-linear", "Which layers get LoRA: q+v, q+k+v+o, all linear layers or a custom list.", "lora",
        choices=list(TARGET_MODULE_CHOICES))
    custom_target_modules: str = _p(
        "Custom target modules", "",
        "Comma-separated module names, checked against the model (with target modules 'custom').", "lora")
    use_dora: bool = _p(
        "DoRA", False, "Weight-decomposed LoRA (peft's use_dora): a magnitude per output feature is trained beside "
        "the LoRA matrices. Often closer to full fine-tuning at low rank; each step is slower.", "lora")
    use_rslora: bool = _p(
        "rsLoRA", False, "Rank-stabilised LoRA (peft's use_rslora): the adapter is scaled by alpha / sqrt(rank) "
        "instead of alpha / rank, so high ranks still learn.", "lora")
    lora_init: str = _p(
        "LoRA initialisation", "default",
        "default: peft's (the adapter's effect starts at zero). pissa: the principal singular vectors of each "
        "weight (full SVD); olora: its QR decomposition. Both often converge faster, and train with that part "
        "moved out of the base weights; the saved adapters are converted so they apply to the original base "
        "model (at twice the rank). Full precision only.", "lora", choices=LORA_INITS)
    loraplus_lr_ratio: float = _p(
        "LoRA+ learning-rate ratio", 0.0,
        "LoRA+ (peft's create_loraplus_optimizer): the LoRA B matrices learn this many times faster than the A "
        "matrices (the paper suggests 16; 0: off, one learning rate).", "lora", 0.0, 1000.0)
    # optimisation
    micro_batch_size: int = _p("Micro batch size", 4, "Samples per forward pass; lower it if memory runs out.",
                               "optimisation", 1, 4096)
    batch_size: int = _p(
        "Batch size", 8, "Samples per optimiser step: a multiple of micro batch (accumulation = batch / micro).",
        "optimisation", 1, 65536)
    num_processes: int = _p(
        "Processes / GPUs", 1, "Processes / GPUs on this machine (torchrun). The batch size is the global batch: "
                               "micro batch x accumulation x processes.", "optimisation", 1, 64)
    distributed_strategy: str = _p(
        "Distributed strategy", "ddp",
        "With several processes: ddp (each holds the whole model) or fsdp (the model is sharded across "
        "them, for models that do not fit one GPU).", "optimisation", choices=["ddp", "fsdp"])
    lr_scheduler_type: str = _p("Learning-rate schedule", "linear", "Learning-rate schedule (transformers' schedulers).",
                                "optimisation", choices=SCHEDULERS)
    warmup_steps: int = _p("Warmup steps", 10, "Steps of linear warm-up at the start (unless warmup ratio is set).",
                           "optimisation", 0, 10_000_000)
    warmup_ratio: float = _p("Warmup ratio", 0.0, "Warm-up as a fraction of the run's steps (0.1 = the first "
                                                  "10%); used instead of warm-up steps when above 0.", "optimisation",
                             0.0, 0.5)
    optimizer: str = _p("Optimiser", "adamw_torch", "Optimiser. 8-bit and paged ones come from bitsandbytes.",
                        "optimisation", choices=OPTIMIZERS)
    weight_decay: float = _p("Weight decay", 0.0, "Weight decay of the optimiser.", "optimisation", 0.0, 1.0,
                             fmt="%.3f")
    max_grad_norm: float = _p("Max grad norm", 1.0, "Clip gradients to this norm (0: no clipping).", "optimisation",
                              0.0, 1e6)
    save_steps: int = _p("Save every n steps", 0,
                         "Save a checkpoint every this many steps (0: only the final adapter).", "optimisation",
                         0, 10_000_000)
    save_total_limit: int = _p("Keep the last n checkpoints", 0,
                               "Delete older checkpoints once a newer one is complete (0: keep all), as the HF "
                               "Trainer's save_total_limit.", "optimisation", 0, 10_000_000)
    stop_at_loss: float = _p("Stop at loss", 0.0, "End the run once the loss falls below this (0: never).",
                             "optimisation", 0.0, 100.0)
    logging_steps: int = _p("Logging steps", 1, "Write a metrics line every this many steps.", "optimisation", 1,
                            100_000)
    # advanced
    precision: str = _p("Precision", "full",
                        "Base model weights: full precision, or 8-bit / 4-bit through bitsandbytes.",
                        "advanced", choices=PRECISIONS)
    bnb_4bit_quant_type: str = _p("4-bit quantisation type", "nf4", "4-bit data type.", "advanced",
                                  choices=["nf4", "fp4"])
    bnb_4bit_use_double_quant: bool = _p("4-bit double quantisation", True,
                                         "4-bit: quantise the quantisation constants too.", "advanced")
    gradient_checkpointing: bool = _p("Gradient checkpointing", False,
                                      "Recompute activations in the backward pass: less memory, slower.", "advanced")
    group_by_length: bool = _p("Group by length", True,
                               "Batch samples of similar length together so little padding is computed.", "advanced")
    packing: bool = _p("Packing", False,
                       "Pack several short samples into one row of cutoff length (each still attends only to "
                       "itself). Off by default: with length grouping little padding is left, and on a CPU "
                       "packed rows measured slower and used more memory (bench/RESULTS.md).", "advanced")
    seed: int = _p("Seed", 0, "Random seed for shuffling, dropout and the LoRA initialisation.", "advanced", 0,
                   2**32 - 1)
    neftune_noise_alpha: float = _p(
        "NEFTune noise alpha", 0.0,
        "NEFTune (transformers' hook): uniform noise of this scale on the input embeddings while training, never "
        "when evaluating (the paper uses 5 to 15; 0: off).", "advanced", 0.0, 100.0)
    trust_remote_code: bool = _p("Trust remote code", False,
                                 "Run the model folder's own Python code. Only for models you trust.", "advanced")

    # ---- conversion -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingParameters":
        """Build from a dict as stored in training_parameters.json (ours or the webui's, whose keys
        trainer/webui.py maps onto ours).

        Values are coerced (the webui stores numbers as strings such as "3e-4"); a value that cannot be
        read raises DashboardError naming the field. Unknown keys are ignored.
        """
        if not isinstance(data, dict):
            raise DashboardError("Training parameters must be a JSON object.")
        data = read_webui_parameters(data)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data and data[f.name] is not None:
                values[f.name] = coerce(f, data[f.name])
        return cls(**values)

    @classmethod
    def from_file(cls, path: Path) -> "TrainingParameters":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DashboardError(f"No training parameters at {path}.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DashboardError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        from .storage import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())

    # ---- derived values -----------------------------------------------------------------------
    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimiser step on each process: batch / (micro batch x processes)."""
        return max(1, self.batch_size // max(1, self.micro_batch_size * self.num_processes))

    @property
    def hard_cut(self) -> str:
        """The hard cut string with its escapes (\\n, \\t) turned into the characters they name."""
        return decode_escapes(self.hard_cut_string)

    def lora_target_modules(self) -> list[str] | str:
        choice = TARGET_MODULE_CHOICES.get(self.target_modules)
        if choice is None:
            return [m.strip() for m in self.custom_target_modules.split(",") if m.strip()]
        return choice

    @property
    def is_raw_text(self) -> bool:
        return bool(self.raw_text_file) and not self.dataset

    # ---- validation ---------------------------------------------------------------------------
    def problems(self, require_name: bool = True) -> list[DashboardError]:
        """Every problem with these values, each naming its field. Empty list: valid."""
        found: list[DashboardError] = []

        def bad(name: str, message: str) -> None:
            found.append(DashboardError(message, field=name))

        for f in dataclasses.fields(self):
            message = range_problem(f, getattr(self, f.name))
            if message:
                bad(f.name, message)
        if require_name:
            try:
                check_name(self.lora_name, label("lora_name"))
            except DashboardError as exc:
                bad("lora_name", exc.message)
        if not self.base_model.strip():
            bad("base_model", "Choose a base model.")
        if not self.dataset:  # overlap only applies to raw text
            overlap = overlap_problem(self.overlap_len, self.cutoff_len,
                                      int(self.add_bos_token) + int(self.add_eos_token))
            if overlap:
                found.append(overlap)
        batch = batch_problem(self.batch_size, self.micro_batch_size, self.num_processes)
        if batch:
            bad("batch_size", batch)
        if not self.dataset and not self.raw_text_file:
            bad("dataset", "Choose a dataset (formatted JSON) or a raw text file.")
        if self.dataset and self.raw_text_file:
            bad("raw_text_file", "Choose either a formatted dataset or a raw text file, not both.")
        if self.target_modules == "custom" and not self.lora_target_modules():
            bad("custom_target_modules", "List at least one module name (e.g. q_proj, v_proj).")
        for name, message in lora_variant_problems(self):
            bad(name, message)
        return found

    def validate(self, require_name: bool = True) -> "TrainingParameters":
        """Raise one DashboardError listing every problem (the first one's field), or return self."""
        found = self.problems(require_name)
        if found:
            raise DashboardError(" ".join(p.message for p in found), field=found[0].field)
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainingParameters)}
# The options that shape the samples, in form order: the sample cache's key, `preview`'s options, the Data page.
SAMPLE_OPTIONS = [name for name, f in FIELDS.items() if f.metadata["shapes_samples"]]


def label(name: str) -> str:
    """What a person reads for a parameter: its label, on the pages and in every message."""
    return FIELDS[name].metadata["label"]


def lora_variant_problems(params: "TrainingParameters") -> list[tuple[str, str]]:
    """The one rule for combining the PEFT variants: (field, sentence) for each combination that cannot give a
    saved adapter equal to the trained model. PiSSA and OLoRA move part of each base weight into the adapter;
    what is saved is converted back for the original base (trainer/variants.py), which needs the weights exact
    (no quantised base), DoRA's magnitudes left out of it (peft's conversion keeps only the LoRA matrices), and
    the whole adapter on one process (not FSDP)."""
    init, found = {"pissa": "PiSSA", "olora": "OLoRA"}.get(params.lora_init), []
    if init is None:  # the default initialisation (or an unknown one, refused by its choices)
        return []
    if params.use_dora:
        found.append(("lora_init", f"{init} initialisation cannot be combined with DoRA: the adapter converted for "
                                   f"the original base model would lose DoRA's magnitudes. Turn one of them off."))
    if params.precision != "full":
        found.append(("lora_init", f"{init} initialisation needs a full-precision base model: it rewrites the base "
                                   f"weights, and a {params.precision} base cannot hold them exactly, so the saved "
                                   f"adapter would not give the trained model. Choose full precision or the "
                                   f"default initialisation."))
    if params.num_processes > 1 and params.distributed_strategy == "fsdp":
        found.append(("lora_init", f"{init} initialisation cannot be used with fsdp: converting the adapter for the "
                                   f"original base model needs it whole on one process. Choose ddp or the default "
                                   f"initialisation."))
    return found


def overlap_problem(overlap_len: int, cutoff_len: int, special_tokens: int) -> DashboardError | None:
    """The one overlap rule. Consecutive raw-text chunks share `overlap_len` tokens, so the overlap must stay
    below the room a chunk has for text: the cutoff minus the BOS/EOS tokens each chunk gets. The form
    counts the tokens its add_bos/add_eos options ask for; build_raw_samples those the tokenizer has."""
    room = cutoff_len - special_tokens
    if overlap_len < room:
        return None
    minus = (f" minus {special_tokens} for the BOS/EOS token{'s' if special_tokens > 1 else ''} ({room})"
             if special_tokens else "")
    return DashboardError(f"Overlap length ({overlap_len}) must be below the cutoff length ({cutoff_len}){minus}.",
                          field="overlap_len")


def batch_problem(batch_size: int, micro_batch_size: int, processes: int) -> str | None:
    """The one batch rule: the batch size is the global batch, micro batch x accumulation x processes, so
    both must divide it (the form checks the processes it asks for, the trainer those it runs)."""
    if micro_batch_size > 0 and batch_size % micro_batch_size:
        return (f"Batch size ({batch_size}) must be a multiple of the micro batch size ({micro_batch_size}); "
                f"gradient accumulation is batch / micro batch.")
    if micro_batch_size > 0 and processes > 0 and batch_size % (micro_batch_size * processes):
        return (f"Batch size ({batch_size}) must be a multiple of micro batch size x processes "
                f"({micro_batch_size} x {processes}): it is the global batch.")
    return None


def read_and_check(values: dict[str, Any], only: Iterable[str] | None = None,
                   require_name: bool = True) -> tuple["TrainingParameters | None", list[DashboardError]]:
    """A form's values read and checked: the parameters (None when a value cannot be read) and every problem,
    each naming its field, a quantised choice that bitsandbytes cannot run here included. `only`: keep the
    problems of these fields (a page that shows some of the options)."""
    try:
        params = TrainingParameters.from_dict(values)
    except DashboardError as exc:
        return None, [exc]
    problems = params.problems(require_name)
    from .models import bitsandbytes_problem  # models imports this module

    message = bitsandbytes_problem(params.precision, params.optimizer)
    if message:
        problems.append(DashboardError(message, field="precision" if params.precision != "full" else "optimizer"))
    if only is not None:
        problems = [p for p in problems if p.field in set(only)]
    return params, problems

