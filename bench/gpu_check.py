"""This trainer against TRL's SFTTrainer on a CUDA GPU, in one command: `python bench/gpu_check.py`.

It measures useful (non-padding) tokens per second and peak VRAM (`torch.cuda.max_memory_allocated`) of
`python -m trainer train`'s own training function and of TRL's `SFTTrainer`, on the same samples (those
`trainer.data.build_samples` makes; TRL gets them as `input_ids` + `completion_mask` with
`completion_only_loss=True`), for every combination of

  weights   bf16 LoRA, and 4-bit QLoRA (nf4, double quantisation, bf16 compute: bitsandbytes);
  cutoff    1024 and 2048 tokens;
  packing   off (length-grouped batches padded to their longest sample) and on (the trainer's best-fit
            packing into rows of cutoff length; TRL's packing="bfd", which implies padding-free batches).

The model is Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads, 8 key-value heads, MLP 8192, vocabulary
128,256, tied embeddings: 1.24B parameters) built from a config with random weights: weights do not change
the speed, and nothing is downloaded. The samples are Alpaca-style rows (prompt masked out of the loss) with
lengths spread log-uniformly up to the cutoff. LoRA r 8, alpha 16, dropout 0 (the trainer's default) on q, k,
v, o; AdamW; no gradient checkpointing; micro batch = batch = --micro-batch-tokens / cutoff. Each pipeline and
weight type runs in a process of its own (the configurations one after another, the peak reset between them).
Useful tokens/s counts the steps after the first (CUDA warm-up is not training speed).

Requirements on the GPU machine: Python with torch (CUDA build), transformers, peft and accelerate, and a
checkout of this repository (the trainer package is imported from it). Everything else (trl, datasets and
their dependencies, bitsandbytes, natsort) is installed from wheels in a folder given by --wheels, or
bench/gpu_wheels/ beside this script when it exists, with `pip install --no-index --find-links DIR`:
nothing is downloaded there. Make that folder on a machine with the package index:

    python bench/gpu_check.py --download-wheels bench/gpu_wheels --python-version 3.12

which also copies the tokenizer (the default model's, from models/SmolLM2-135M-Instruct, or --tokenizer
DIR) into the folder. It takes at most about 8 minutes (--budget-s; configurations left when the budget
is spent are listed as skipped, with that reason). It writes OUT/gpu_check.json and OUT/gpu_check.md
(--out, default bench/out/gpu_check) and prints the table.

`--cpu-dry-run` runs the same code on the CPU in float32 with a tiny Llama (hidden 64, 2 layers), cutoffs
128 and 256 for 1024 and 2048 and 4 steps (43 to 105 s on a 2-core machine that other processes kept
busy; most of it is starting Python, torch and TRL three times); the 4-bit rows are skipped there
(bitsandbytes' 4-bit training path is a CUDA one). The test suite runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, tie_word_embeddings=True)
WEIGHTS = {"bf16 LoRA": "full", "4-bit QLoRA": "4bit"}  # the dry run's "bf16 LoRA" computes in float32
PIPELINES = {"trainer": "this trainer", "trl": "TRL SFTTrainer"}
# What the GPU machine lacks of what this check imports: installed from the wheels folder (import name, wheel name).
NEEDED = [("trl", "trl"), ("datasets", "datasets"), ("bitsandbytes", "bitsandbytes"), ("natsort", "natsort"),
          ("psutil", "psutil"), ("filelock", "filelock"), ("yaml", "pyyaml")]
# --download-wheels: these and every dependency of them that torch + transformers + peft do not bring.
WHEEL_NAMES = ["trl", "datasets", "bitsandbytes", "natsort", "psutil", "filelock", "pyyaml", "dill", "multiprocess",
               "xxhash", "pyarrow", "pandas", "python-dateutil", "six", "tzdata", "jinja2", "markupsafe", "fsspec"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
LORA = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "q-k-v-o"}


class CheckError(Exception):
    """A problem the person running the check can fix; said in one sentence, before any work starts."""


# ---------------------------------------------------------------------------------------------------------
# Before anything runs: the packages, the tokenizer, the wheels folder


def default_wheels() -> Path | None:
    folder = Path(__file__).resolve().parent / "gpu_wheels"
    return folder if folder.is_dir() else None


def install_from_wheels(wheels: Path) -> list[str]:
    """pip-install, from the folder only, each needed package that cannot be imported yet; their names."""
    missing = [wheel for module, wheel in NEEDED if importlib.util.find_spec(module) is None]
    if missing:
        command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *missing]
        print(f"Installing {', '.join(missing)} from {wheels} ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise CheckError(f"Could not install {', '.join(missing)} from {wheels}: pip said "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}. "
                             f"Make the folder again with --download-wheels for this machine's Python version.")
        importlib.invalidate_caches()
    return missing


def download_wheels(folder: Path, python_version: str | None, tokenizer: Path) -> None:
    """Fill `folder` with the wheels NEEDED (pinned to this environment's versions) and the tokenizer."""
    from importlib.metadata import PackageNotFoundError, version

    folder.mkdir(parents=True, exist_ok=True)
    pinned = []
    for name in WHEEL_NAMES:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    if python_version:
        command += ["--python-version", python_version, "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64"]
    subprocess.run([*command, *pinned], check=True)
    copy_tokenizer(tokenizer, folder / "tokenizer")
    print(f"Wrote {len(list(folder.glob('*.whl')))} wheels and the tokenizer to {folder}.")


def copy_tokenizer(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def find_tokenizer(given: Path | None, wheels: Path | None) -> Path:
    """The tokenizer folder: --tokenizer, else the default model's in the checkout, else the wheels folder's."""
    candidates = [given] if given else [ROOT / "models" / "SmolLM2-135M-Instruct",
                                        *([wheels / "tokenizer"] if wheels else [])]
    for folder in candidates:
        if folder and (folder / "tokenizer.json").is_file():
            return folder
    raise CheckError(f"No tokenizer found (looked for tokenizer.json in {', '.join(str(c) for c in candidates)}). "
                     f"Pass --tokenizer DIR, or make the wheels folder with --download-wheels, which copies one.")


# ---------------------------------------------------------------------------------------------------------
# The model and the samples


def make_model(folder: Path, tokenizer_dir: Path, shape: dict, dtype_name: str) -> dict:
    """A Llama with random weights (seed 0) saved to `folder` with the tokenizer; its size."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {"vocab_size": len(tok), **shape}
    if shape["vocab_size"] < len(tok):
        raise CheckError(f"The model's vocabulary ({shape['vocab_size']}) is smaller than the tokenizer's ({len(tok)}).")
    config = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    with torch.device("cuda" if dtype_name == "bfloat16" else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    size = {"params": sum(p.numel() for p in model.parameters()), **shape}
    del model
    return size


def write_dataset(path: Path, cutoff: int, n: int, seed: int) -> None:
    """Alpaca-style rows whose lengths spread log-uniformly from 32 tokens to past the cutoff (cut there)."""
    rows = json.loads((ROOT / "datasets" / "dashboard-instructions.json").read_text(encoding="utf-8"))
    words = (ROOT / "datasets" / "user-guide.txt").read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        row = rows[i % len(rows)]
        target = int(math.exp(rng.uniform(math.log(32), math.log(cutoff * 1.1))))
        start = rng.randrange(len(words))
        count = max(4, int(target * 0.75))  # about 1.3 tokens per English word
        text = " ".join(words[(start + j) % len(words)] for j in range(count))
        out.append({"instruction": row["instruction"], "input": "", "output": text})
    path.write_text(json.dumps(out), encoding="utf-8")


def run_parameters(model: str, cutoff: int, micro_batch: int, precision: str, packing: bool) -> dict:
    return {"base_model": model, "dataset": f"gpu-check-{cutoff}.json", "format": "alpaca-format",
            "skip_unmatched_rows": True, "train_only_after": "### Response:", "cutoff_len": cutoff,
            "overlap_len": 0, "micro_batch_size": micro_batch, "batch_size": micro_batch, "epochs": 1,
            "learning_rate": 2e-4, "lr_scheduler_type": "linear", "warmup_steps": 0, "optimizer": "adamw_torch",
            "weight_decay": 0.0, "max_grad_norm": 1.0, **LORA, "seed": 0, "group_by_length": True,
            "logging_steps": 1, "save_steps": 0, "precision": precision, "packing": packing,
            "gradient_checkpointing": False}


# ---------------------------------------------------------------------------------------------------------
# The workers: one process per pipeline and weight type, its configurations one after another


def steady_rate(tokens: list[int], ends: list[float]) -> tuple[float, float]:
    """Useful tokens/s over the steps after the first (tokens and end times per step), and over all steps
    from the first step's end back to the loop's start when there is only one step."""
    if len(ends) >= 2 and ends[-1] > ends[0]:
        return sum(tokens[1:]) / (ends[-1] - ends[0]), ends[-1] - ends[0]
    return float("nan"), 0.0


def run_trainer_config(config: dict, home: Path) -> dict:
    """The trainer's own entry point (what `python -m trainer train --run-dir` calls), in this process."""
    from trainer.train import train

    run_dir = home / "loras" / config["name"]
    run_dir.mkdir(parents=True)
    (run_dir / "training_parameters.json").write_text(json.dumps({**config["params"], "lora_name": config["name"]}))
    code = train(run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    if code != 0 or status.get("state") != "completed":
        raise RuntimeError(status.get("error") or f"the trainer ended {status.get('state')}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    lines = [line for line in lines if "loss" in line]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *lines], lines)]
    rate, timed = steady_rate(tokens, [float(line["elapsed_s"]) for line in lines])
    from bench.train_throughput import project_layout
    from trainer.data import build_samples
    from trainer.models import load_tokenizer
    from trainer.params import TrainingParameters

    params = TrainingParameters.from_dict(config["params"])
    lengths = [s.n_tokens for s in build_samples(params, load_tokenizer(params.base_model)).samples]
    layout = project_layout(lengths, params) or {}
    return {"steps": int(lines[-1]["step"]), "useful_tokens": int(lines[-1]["tokens"]), "useful_tokens_per_s": rate,
            "timed_s": timed, "loop_s": float(lines[-1]["elapsed_s"]), "positions": layout.get("positions"),
            "final_loss": float(lines[-1]["loss"])}


def run_trl_config(config: dict, device: str) -> dict:
    """TRL's SFTTrainer on the same samples, as bench/hf_pipelines.py sets it up for the CPU benchmark (d)."""
    from bench.hf_pipelines import trl_trainer
    from trainer.data import build_samples
    from trainer.models import load_tokenizer
    from trainer.params import TrainingParameters

    params = TrainingParameters.from_dict(config["params"])
    tokenizer = load_tokenizer(params.base_model)
    tokenizer.padding_side = "right"
    samples = build_samples(params, tokenizer).samples
    counts = {"positions": 0, "real": 0, "batches": 0, "per_batch": []}
    spec = {"pipeline": "d", "work_dir": config["work_dir"], "device": device, "trl_packing": params.packing}
    trainer, clock = trl_trainer(spec, params, tokenizer, samples, counts)
    output = trainer.train()
    steps = int(output.global_step)
    rate, timed = steady_rate(counts["per_batch"][:steps], clock.step_ends)
    result = {"steps": steps, "useful_tokens": counts["real"], "useful_tokens_per_s": rate, "timed_s": timed,
              "loop_s": (clock.last or 0) - (clock.begin or 0), "positions": counts["positions"],
              "final_loss": clock.losses[-1] if clock.losses else float("nan"), "settings": spec["settings"]}
    del trainer
    return result


def worker(spec: dict) -> None:
    """Run spec's configurations of one pipeline in order, each with its own VRAM peak; one JSON line each."""
    import gc

    import torch

    # The checkout's demo folder datasets/ could pass for the `datasets` package where it is not installed:
    # what is needed from the checkout is imported first, then the checkout leaves sys.path.
    import bench.hf_pipelines  # noqa: F401
    import bench.train_throughput  # noqa: F401
    import trainer.train  # noqa: F401
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    device = spec["device"]
    with open(spec["results"], "a") as out:
        for config in spec["configs"]:
            row = {k: config[k] for k in ("pipeline", "weights", "cutoff", "packing", "micro_batch")}
            if time.time() > spec["deadline"]:
                out.write(json.dumps({**row, "status": "skipped", "reason": "the time budget (--budget-s) was spent"}) + "\n")
                out.flush()
                continue
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            try:
                if config["pipeline"] == "trainer":
                    result = run_trainer_config(config, Path(spec["home"]))
                else:
                    result = run_trl_config(config, device)
                row.update(result, status="ok")
            except Exception as exc:  # one configuration's failure (out of memory, say) must not end the others
                row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
            row["wall_s"] = time.perf_counter() - started
            row["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            out.write(json.dumps(row) + "\n")
            out.flush()
            gc.collect()


# ---------------------------------------------------------------------------------------------------------
# The check: configurations, the runs, the table


def configurations(args, model: str) -> tuple[list[dict], list[dict]]:
    """Every (pipeline, weights, cutoff, packing) to run, and those skipped with the reason."""
    run, skipped = [], []
    for weights, precision in WEIGHTS.items():
        for cutoff in args.cutoffs:
            micro_batch = max(1, args.micro_batch_tokens // cutoff)
            for packing in (False, True):
                for pipeline in PIPELINES:
                    config = {"pipeline": pipeline, "weights": weights, "cutoff": cutoff, "packing": packing,
                              "micro_batch": micro_batch, "name": f"{pipeline}-{precision}-{cutoff}-{int(packing)}",
                              "params": run_parameters(model, cutoff, micro_batch, precision, packing)}
                    if precision == "4bit" and args.cpu_dry_run:
                        skipped.append({**{k: config[k] for k in ("pipeline", "weights", "cutoff", "packing",
                                                                  "micro_batch")}, "status": "skipped",
                                        "reason": "4-bit QLoRA trains through bitsandbytes' CUDA kernels: not in "
                                                  "the CPU dry run"})
                    else:
                        run.append(config)
    return run, skipped


def run_workers(configs: list[dict], home: Path, work: Path, device: str, deadline: float) -> list[dict]:
    """One worker process per (pipeline, weights), bf16 first, each pipeline's pair back to back."""
    results_file = work / "results.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1", LORA_DASHBOARD_HOME=str(home))
    env.pop("PYTHONPATH", None)
    groups: dict[tuple, list] = {}
    for config in configs:
        groups.setdefault((config["weights"], config["pipeline"]), []).append(
            {**config, "work_dir": str(work / config["name"])})
    for (weights, pipeline), group in groups.items():
        spec_path = work / f"spec-{pipeline}-{WEIGHTS[weights]}.json"
        spec_path.write_text(json.dumps({"configs": group, "home": str(home), "device": device,
                                         "results": str(results_file), "deadline": deadline}))
        print(f"  {PIPELINES[pipeline]}, {weights}: {len(group)} configurations ...", flush=True)
        log = work / f"log-{pipeline}-{WEIGHTS[weights]}.txt"
        with open(log, "w") as out:
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=max(60.0, deadline - time.time() + 120))
        if done.returncode != 0:
            print(f"  the worker ended with exit {done.returncode}; the end of its log:\n"
                  + "\n".join(log.read_text(errors="replace").splitlines()[-20:]), flush=True)
    rows = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    seen = {(r["pipeline"], r["weights"], r["cutoff"], r["packing"]) for r in rows}
    for config in configs:  # a worker that died leaves its configurations unreported: say so
        if (config["pipeline"], config["weights"], config["cutoff"], config["packing"]) not in seen:
            rows.append({**{k: config[k] for k in ("pipeline", "weights", "cutoff", "packing", "micro_batch")},
                         "status": "failed", "reason": "its worker process ended before reporting it"})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per configuration: the trainer's useful tokens/s and peak VRAM over TRL's."""
    ok = {(r["pipeline"], r["weights"], r["cutoff"], r["packing"]): r for r in rows if r["status"] == "ok"}
    found = []
    for (pipeline, weights, cutoff, packing), mine in ok.items():
        theirs = ok.get(("trl", weights, cutoff, packing))
        if pipeline != "trainer" or not theirs:
            continue
        found.append({"weights": weights, "cutoff": cutoff, "packing": packing,
                      "speed": mine["useful_tokens_per_s"] / theirs["useful_tokens_per_s"],
                      "vram": (mine["peak_vram_gib"] / theirs["peak_vram_gib"]
                               if mine.get("peak_vram_gib") and theirs.get("peak_vram_gib") else None)})
    return found


def markdown(report: dict) -> str:
    def num(value, spec):
        return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)

    lines = [f"GPU check on {report['machine']['device']}: {report['model']['description']}", "",
             "| pipeline | weights | cutoff | packing | micro batch | steps | useful tok/s | peak VRAM GiB | pad % "
             "| final loss | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {w: i for i, w in enumerate(WEIGHTS)}
    for r in sorted(report["runs"], key=lambda r: (order[r["weights"]], r["cutoff"], r["packing"], r["pipeline"])):
        pad = (1 - r["useful_tokens"] / r["positions"]) * 100 if r.get("positions") else None
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        lines.append(f"| {PIPELINES[r['pipeline']]} | {r['weights']} | {r['cutoff']} | {'on' if r['packing'] else 'off'} "
                     f"| {r['micro_batch']} | {r.get('steps', '')} | {num(r.get('useful_tokens_per_s'), '.0f')} "
                     f"| {num(r.get('peak_vram_gib'), '.2f')} | {num(pad, '.1f')} | {num(r.get('final_loss'), '.4f')} "
                     f"| {status} |")
    lines += ["", "| weights | cutoff | packing | trainer / TRL useful tok/s | trainer / TRL peak VRAM |",
              "| --- | --- | --- | --- | --- |"]
    for q in report["ratios"]:
        lines.append(f"| {q['weights']} | {q['cutoff']} | {'on' if q['packing'] else 'off'} | {q['speed']:.2f} "
                     f"| {num(q['vram'], '.2f')} |")
    return "\n".join(lines) + "\n"


def machine(device: str) -> dict:
    import peft
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            info[name] = version(name)  # not imported here: the workers import them
        except PackageNotFoundError:
            info[name] = None
    info["device"] = (f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
                      if device == "cuda" else f"CPU ({os.cpu_count()} cores), dry run")
    return info


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="the same code on the CPU, float32, a tiny model, 4 steps (about a minute)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="install the missing packages (trl, datasets, bitsandbytes, natsort ...) from this folder "
                             "of wheels, offline (default: bench/gpu_wheels/ when it exists)")
    parser.add_argument("--download-wheels", type=Path, metavar="DIR", default=None,
                        help="instead of checking: download those wheels (and copy the tokenizer) into DIR, here")
    parser.add_argument("--python-version", default=None,
                        help="with --download-wheels: the GPU machine's Python, e.g. 3.12 (default: this one's)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a folder with tokenizer.json (default: models/SmolLM2-135M-Instruct, else WHEELS/tokenizer)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu_check",
                        help="where gpu_check.json and gpu_check.md go (default bench/out/gpu_check)")
    parser.add_argument("--steps", type=int, default=None, help="steps per configuration without packing (default 12; "
                                                                "dry run 4)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="tokens per micro-batch: micro batch = this / cutoff (default 8192; dry run 512)")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="configurations not started after this many seconds are skipped (default 420: the "
                             "whole check stays within 8 minutes)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.cpu_dry_run else 12)
    args.micro_batch_tokens = args.micro_batch_tokens or (512 if args.cpu_dry_run else 8192)
    args.cutoffs = [128, 256] if args.cpu_dry_run else [1024, 2048]
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is CUDA warm-up and is not timed.")
    if args.micro_batch_tokens < max(args.cutoffs):
        parser.error(f"--micro-batch-tokens must be at least the largest cutoff ({max(args.cutoffs)}).")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    args = parse(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    try:
        if args.download_wheels:
            download_wheels(args.download_wheels, args.python_version, find_tokenizer(args.tokenizer, None))
            return 0
        return check(args, started)
    except CheckError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2


def check(args, started: float) -> int:
    wheels = args.wheels or default_wheels()
    if args.wheels and not args.wheels.is_dir():
        raise CheckError(f"The wheels folder {args.wheels} does not exist. Make it with --download-wheels DIR.")
    tokenizer = find_tokenizer(args.tokenizer, wheels)
    import torch

    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckError("No CUDA GPU is visible to torch (torch.cuda.is_available() is False). Run this on a GPU "
                         "machine with a CUDA build of torch, or pass --cpu-dry-run to try the code on the CPU.")
    installed = install_from_wheels(wheels) if wheels else []
    missing = [wheel for module, wheel in NEEDED if importlib.util.find_spec(module) is None
               and not (args.cpu_dry_run and module == "bitsandbytes")]
    if missing:
        raise CheckError(f"These packages are missing: {', '.join(missing)}. Give --wheels DIR (made with "
                         f"--download-wheels) or install them.")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        home = work / "home"
        for sub in ("models", "datasets", "loras"):
            (home / sub).mkdir(parents=True)
        model = "llama-tiny-random" if args.cpu_dry_run else "llama-1b-random"
        shape = TINY if args.cpu_dry_run else LLAMA_1B
        print(f"Building {model} (random weights) ...", flush=True)
        size = make_model(home / "models" / model, tokenizer, shape, "float32" if args.cpu_dry_run else "bfloat16")
        for cutoff in args.cutoffs:
            write_dataset(home / "datasets" / f"gpu-check-{cutoff}.json", cutoff,
                          args.steps * max(1, args.micro_batch_tokens // cutoff), seed=cutoff)
        configs, skipped = configurations(args, model)
        rows = run_workers(configs, home, work, device, deadline=started + args.budget_s) + skipped
        report = {"machine": machine(device), "installed_from_wheels": installed, "wall_s": None,
                  "model": {"name": model, **size, "description": (
                      f"{model}, {size['params'] / 1e9:.2f}B parameters ({size['num_hidden_layers']} layers, hidden "
                      f"{size['hidden_size']}, vocabulary {size['vocab_size']}), "
                      f"{'float32 on the CPU' if args.cpu_dry_run else 'bfloat16'}; LoRA r 8 on q,k,v,o; "
                      f"{args.steps} steps without packing, micro batch = {args.micro_batch_tokens} tokens / cutoff; "
                      f"useful tokens/s over the steps after the first")},
                  "settings": {"steps": args.steps, "micro_batch_tokens": args.micro_batch_tokens,
                               "cutoffs": args.cutoffs, "lora": LORA, "dry_run": args.cpu_dry_run},
                  "runs": rows, "ratios": ratios(rows)}
        report["wall_s"] = time.time() - started
        table = markdown(report)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "gpu_check.md").write_text(table)
        print("\n" + table)
        print(f"Wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}; {report['wall_s']:.0f} s in all.")
        failed = [r for r in rows if r["status"] == "failed"]
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
