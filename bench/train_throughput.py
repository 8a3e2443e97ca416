"""Training throughput, side by side: `python bench/train_throughput.py [--dataset alpaca|raw|both] [--quick]`.

In one run, on the same model, the same samples (the ones `trainer.data.build_samples` makes, so the
work is identical), the same LoRA settings, optimiser (AdamW), seed, batch size and number of trained
(non-padding) tokens, it times four pipelines, each in its own process so that its peak resident
memory is its own:

  (a) alpaca-lora / text-generation-webui style: transformers `Trainer` + peft, every sample padded to
      the cutoff length, random order (no length grouping);
  (b) the best plain transformers baseline: `Trainer` with `DataCollatorForSeq2Seq(pad_to_multiple_of=8)`
      and length-grouped batches;
  (c) this project's trainer as a user runs it: `python -m trainer train --run-dir DIR` (packing off,
      its default, and again with packing on);
  (d) TRL's `SFTTrainer` (what LLaMA-Factory, axolotl and Unsloth train through), given the samples as
      `input_ids` + `completion_mask` with `completion_only_loss=True`, length-grouped, padded to the
      longest sample of each micro-batch; and again padding-free (`--trl-padding-free`, on by default:
      bench/hf_pipelines.py says why it may lose on a CPU); the (c)/(d) goal is judged against the faster.

Every pipeline makes one pass (one epoch) over the same N samples with micro batch = batch size, so each
trains exactly the same tokens. The pipelines run in interleaved rounds (a, b, c, d, a, b, c, d, ...;
--rounds, default 3); ratios are computed inside each round and reported as the median with the
spread (min-max) of the rounds, and each goal is met only when its worst round meets it (bench/rounds.py).
It prints useful (non-padding) tokens per second, padding fraction, peak RSS, training-loop and total wall
time, losses, the ratios (c)/(a), (c)/(b), (c)/(d), and (c)'s achieved model FLOP rate as a fraction of
this machine's float32 matrix-product rate, measured in the same run.

`--quick` uses a tiny random Llama (hidden 64, 2 layers, the real tokenizer), a few samples and 2 rounds:
a smoke test for CI of the same code path. `--json OUT` writes every number, every round included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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

from bench import rounds  # noqa: E402  (the checkout must be on sys.path first)

PIPELINES = {
    "a": "(a) Trainer, padded to cutoff",
    "b": "(b) Trainer, dynamic pad + grouped",
    "c": "(c) python -m trainer",
    "c_pack": "(c) same, packing on",
    "d": "(d) TRL SFTTrainer, grouped",
    "d_pf": "(d) same, padding-free",
}
HF_PIPELINES = ("a", "b", "d", "d_pf")  # run by bench/hf_pipelines.py
FLOP_FORMULA = (
    "model FLOPs per sample of L tokens = (4*N_lin + 6*N_lora)*L + 3 * 4*layers*d_attn * L(L+1)/2, where "
    "N_lin = weights of every Linear layer of the base model incl. lm_head (forward 2*N_lin per token; the backward "
    "of the frozen base computes input gradients only, another 2*N_lin), N_lora = adapter weights (forward 2, "
    "backward 4: input and weight gradients), and attention (QK^T and AV: 2 products x 2 FLOPs x d_attn per "
    "(query, key) pair, only the L(L+1)/2 causal pairs of each sample, backward 2x forward). Only the samples' "
    "real tokens count: FLOPs spent on padding, or on masked-out attention across packed samples, are not useful. "
    "Not counted: embedding lookup, norms, activations, softmax, cross-entropy, optimiser (memory-bound, small)."
)


# ---------------------------------------------------------------------------------------------------------
# Running one pipeline in a child process, with its own peak RSS


def cpu_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, from /proc/stat), 0.0 where unknown."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, window: float = 3.0, threshold: float = 0.15) -> float:
    """Wait (up to max_wait s) for a window in which other processes use under `threshold` of the CPUs.

    Returns the busy share of the last window. Other sessions' tests on a shared machine distort timings.
    """
    deadline = time.monotonic() + max_wait
    ncpu = os.cpu_count() or 1
    while True:
        before = cpu_busy_s()
        time.sleep(window)
        share = (cpu_busy_s() - before) / (window * ncpu)
        if share < threshold or time.monotonic() >= deadline:
            return share


def run_child(command: list[str], env: dict, log_path: Path, timeout: float) -> dict:
    """Run a child to completion; its wall time, CPU time and peak RSS (wait4's ru_maxrss is per child), and
    the share of the machine's CPUs other processes used meanwhile (a measure of how disturbed the timing is)."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    busy_before = cpu_busy_s()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, cpu_busy_s() - busy_before - cpu) / (wall * (os.cpu_count() or 1))
    return {"returncode": proc.returncode, "total_s": wall, "cpu_s": cpu, "other_cpu_share": others,
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "load_before": load_before, "load_after": os.getloadavg()[0], "log": str(log_path)}


def tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_hf(pipeline: str, params: dict, work: Path, env: dict, timeout: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    spec = {"pipeline": pipeline, "params": params, "work_dir": str(work / "out"), "result": str(work / "result.json"),
            "trl_padding_free": pipeline == "d_pf"}
    (work / "spec.json").write_text(json.dumps(spec))
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", str(work / "spec.json")], env,
                      work / "log.txt", timeout)
    if child["returncode"] != 0 or not (work / "result.json").exists():
        raise RuntimeError(f"pipeline {pipeline} failed (exit {child['returncode']}):\n{tail(child['log'])}")
    return {**json.loads((work / "result.json").read_text()), **child}


def run_project(pipeline: str, params: dict, home: Path, env: dict, timeout: float) -> dict:
    name = f"bench-{pipeline}-{int(time.time() * 1000) % 10**8}"
    run_dir = home / "loras" / name
    run_dir.mkdir(parents=True)
    (run_dir / "training_parameters.json").write_text(json.dumps({**params, "lora_name": name}))
    child = run_child([sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir)], env,
                      run_dir / "train.log", timeout)
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
    if child["returncode"] != 0 or status.get("state") != "completed":
        raise RuntimeError(f"pipeline {pipeline} failed (exit {child['returncode']}, state {status.get('state')}: "
                           f"{status.get('error')}):\n{tail(child['log'])}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_lines = [line for line in lines if "loss" in line]
    last = train_lines[-1]
    return {"pipeline": pipeline, "steps": int(last["step"]), "loop_s": float(last["elapsed_s"]),
            "useful_tokens": int(last["tokens"]), "losses": [float(line["loss"]) for line in train_lines],
            "threads": None, **child}


def project_layout(lengths: list[int], params) -> dict | None:
    """Rows and computed positions of the trainer's epoch 0, from its own batching functions (None if they changed)."""
    try:
        from trainer import batching

        units = batching.training_units(lengths, params)
        row_lengths = [sum(lengths[i] for i in unit) for unit in units]
        schedule = batching.epoch_schedule(row_lengths, params.micro_batch_size, params.gradient_accumulation_steps,
                                           params.seed, 0, params.group_by_length)
        positions = sum(len(micro) * max(row_lengths[u] for u in micro) for step in schedule for micro in step)
        return {"rows": len(units), "positions": positions}
    except Exception as exc:  # the trainer's internals are not an API; the benchmark must still run
        print(f"  (cannot lay out the trainer's batches for the padding fraction: {exc})")
        return None


# ---------------------------------------------------------------------------------------------------------
# Set-up: the home folder, the model, the data subsets


def link_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            try:
                os.link(item, target / item.name)
            except OSError:
                try:
                    os.symlink(item, target / item.name)
                except OSError:
                    shutil.copy2(item, target / item.name)


def default_model_dir() -> Path:
    """The default model converted once into the checkout's models/ (as the tests' fixture does)."""
    from trainer.home import HOME_ENV
    from trainer.models import model_path
    from trainer.params import DEFAULT_MODEL

    saved = os.environ.pop(HOME_ENV, None)
    try:
        return model_path(DEFAULT_MODEL)
    finally:
        if saved is not None:
            os.environ[HOME_ENV] = saved


def make_tiny_model(folder: Path, tokenizer_dir: Path) -> None:
    """A 2-layer, hidden-size-64 Llama with random weights and the real tokenizer (as tests/conftest.py)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def prepare_dataset(kind: str, n: int, home: Path, base: dict, tokenizer, seed: int) -> tuple[dict, str]:
    """Write the data subset into the home's datasets/; the training parameters that use it, and a description."""
    from trainer.data import build_samples
    from trainer.datafiles import load_format, read_text_file
    from trainer.params import TrainingParameters

    if kind == "alpaca":
        rows = json.loads((ROOT / "datasets" / "dashboard-instructions.json").read_text(encoding="utf-8"))
        fmt = load_format(ROOT / "formats" / "alpaca-format.json")
        matched = [row for row in rows if fmt.match(row)]
        picked = sorted(random.Random(seed).sample(range(len(matched)), min(n, len(matched))))
        (home / "datasets" / "bench-alpaca.json").write_text(json.dumps([matched[i] for i in picked]))
        params = {**base, "dataset": "bench-alpaca.json", "format": "alpaca-format", "skip_unmatched_rows": True}
        return params, (f"datasets/dashboard-instructions.json + formats/alpaca-format.json: {len(picked)} of "
                        f"{len(matched)} matched rows (seeded random pick)")
    text = read_text_file(ROOT / "datasets" / "user-guide.txt")
    blocks = [b for b in text.split("\n\n\n") if b.strip()]
    params = {**base, "raw_text_file": "bench-raw.txt"}
    used = 0
    for used in range(1, len(blocks) + 1):
        (home / "datasets" / "bench-raw.txt").write_text("\n\n\n".join(blocks[:used]), encoding="utf-8")
        count = len(build_samples(TrainingParameters.from_dict(params), tokenizer).samples)
        if count >= n:
            break
    return params, f"datasets/user-guide.txt: its first {used} of {len(blocks)} blocks (hard cut \\n\\n\\n)"


# ---------------------------------------------------------------------------------------------------------
# FLOPs and the machine's matrix-product rate


def model_dims(folder: Path, targets, rank: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.in_features * module.out_features
            leaf = name.rsplit(".", 1)[-1]
            if (targets == "all-linear" and "lm_head" not in name) or (isinstance(targets, list) and leaf in targets):
                lora += rank * (module.in_features + module.out_features)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"params": sum(p.numel() for p in model.parameters()), "linear_params": linear, "lora_params": lora,
            "layers": config.num_hidden_layers, "d_attn": heads * head_dim, "hidden": config.hidden_size,
            "intermediate": getattr(config, "intermediate_size", 4 * config.hidden_size)}


def sample_flops(lengths: list[int], dims: dict) -> float:
    per_token = 4 * dims["linear_params"] + 6 * dims["lora_params"]
    attention = 3 * 4 * dims["layers"] * dims["d_attn"]
    return float(sum(per_token * n + attention * n * (n + 1) / 2 for n in lengths))


def matmul_rate(n: int, repeats: int, m: int | None = None, k: int | None = None) -> float:
    """Best float32 torch.matmul rate (FLOP/s) of an (m x k) @ (k x n) product over `repeats` tries."""
    import torch

    m, k = m or n, k or n
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    return 2.0 * m * n * k / best


def machine_info() -> dict:
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import peft
    import transformers

    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------
# The benchmark


def summarise(result: dict, flops: float, matmul: float) -> dict:
    positions = result.get("positions")
    useful = result["useful_tokens"]
    losses = result["losses"]
    result.update({
        "useful_tokens_per_s": useful / result["loop_s"] if result["loop_s"] > 0 else 0.0,
        "padding_fraction": (1 - useful / positions) if positions else None,
        "final_loss": losses[-1] if losses else float("nan"),
        "mean_loss": sum(losses) / len(losses) if losses else float("nan"),
        "model_flops": flops,
        "flops_per_s": flops / result["loop_s"] if result["loop_s"] > 0 else 0.0,
    })
    result["fraction_of_matmul"] = result["flops_per_s"] / matmul if matmul else None
    result["cpu_use"] = result["cpu_s"] / (result["total_s"] * max(1, os.cpu_count() or 1))
    return result


def run_pipeline(pipeline: str, args, params: dict, home: Path, env: dict, work: Path, lengths: list[int]) -> dict:
    """One timing of one pipeline, in its own process."""
    from trainer.params import TrainingParameters

    if pipeline in HF_PIPELINES:
        return run_hf(pipeline, params, work, env, args.timeout)
    run_params = dict(params)
    if pipeline in args.packing_of:
        run_params["packing"] = args.packing_of[pipeline]
    result = run_project(pipeline, run_params, home, env, args.timeout)
    result["packing"] = run_params.get("packing")
    layout = project_layout(lengths, TrainingParameters.from_dict(run_params))
    if layout:
        result["positions"] = layout["positions"]
        result["rows"] = layout["rows"]
    return result


def timed_round(kind: str, round_no: int, args, params: dict, home: Path, env: dict, work: Path, lengths: list[int],
                flops: float, matmul: float, pipelines: list[str], matmul_samples: list[float],
                matmul_size: tuple) -> dict:
    """One round: every pipeline once, in order; a disturbed timing is retried up to --retries times."""
    row = {}
    for pipeline in pipelines:
        tries = []
        for attempt in range(1 + max(0, args.retries)):
            if args.wait_quiet:
                wait_for_quiet(args.wait_quiet)
            # The machine's matmul rate is sampled before every pipeline too; the best sample is the reference.
            matmul_samples.append(matmul_rate(*matmul_size))
            print(f"   round {round_no + 1}: {PIPELINES[pipeline]} ...", end=" ", flush=True)
            result = run_pipeline(pipeline, args, params, home, env,
                                  work / f"{kind}-{pipeline}-r{round_no}-{attempt}", lengths)
            result["samples"] = len(lengths)
            summarise(result, flops, matmul)
            tries.append(result)
            print(f"{result['useful_tokens_per_s']:.1f} useful tok/s, loop {result['loop_s']:.1f} s, "
                  f"total {result['total_s']:.1f} s (other processes used {100 * result['other_cpu_share']:.0f}% of "
                  f"the CPUs meanwhile)", flush=True)
            if result["other_cpu_share"] <= args.disturbed:
                break
            if attempt < args.retries:
                print("   (disturbed by other processes: running it again)", flush=True)
        # The least disturbed try counts; every try is kept in the JSON.
        best = min(tries, key=lambda r: r["other_cpu_share"])
        best["tries"] = [{k: r[k] for k in ("useful_tokens_per_s", "loop_s", "other_cpu_share", "peak_rss_mb")}
                         for r in tries]
        row[pipeline] = best
    return row


def run_dataset(kind: str, args, home: Path, env: dict, base: dict, tokenizer, dims: dict, matmul: float,
                pipelines: list[str], work: Path, matmul_samples: list[float], matmul_size: tuple) -> dict:
    from trainer.data import build_samples
    from trainer.params import TrainingParameters

    params, description = prepare_dataset(kind, args.samples, home, base, tokenizer, args.seed)
    built = build_samples(TrainingParameters.from_dict(params), tokenizer).samples
    lengths = [s.n_tokens for s in built]
    useful = sum(lengths)
    flops = sample_flops(lengths, dims)
    print(f"\n== {kind}: {description}\n   {len(built)} samples, {useful} tokens (mean {useful / len(built):.0f}, "
          f"max {max(lengths)}, cutoff {params['cutoff_len']}); every pipeline trains each sample once, "
          f"{args.rounds} interleaved rounds.", flush=True)
    per_round = [timed_round(kind, n, args, params, home, env, work, lengths, flops, matmul, pipelines,
                             matmul_samples, matmul_size) for n in range(args.rounds)]
    return {"description": description, "params": params, "samples": len(built), "useful_tokens": useful,
            "model_flops": flops, "rounds": per_round, "pipelines": rounds.summarise_rounds(per_round),
            "ratios": rounds.round_ratios(per_round),
            "equal_tokens": len({r["useful_tokens"] for row in per_round for r in row.values()}) == 1}


def fmt(value, spec: str, missing: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def print_table(kind: str, data: dict) -> None:
    head = (f"{'pipeline':<36} {'steps':>5} {'useful tok':>10} {'pad %':>6} {'loop s':>7} {'total s':>7} "
            f"{'useful tok/s':>12} {'min-max tok/s':>15} {'GFLOP/s':>8} {'% matmul':>8} {'peak RSS MB':>11} "
            f"{'final loss':>10} {'mean loss':>9} {'others %':>8}")
    print(f"\n{kind}: {data['samples']} samples, {data['useful_tokens']} useful tokens, "
          f"{data['model_flops'] / 1e12:.3f} model TFLOP; each row is the pipeline's median round of "
          f"{len(data['rounds'])}")
    print(head)
    print("-" * len(head))
    for key, r in data["pipelines"].items():
        pad = r["padding_fraction"] * 100 if r["padding_fraction"] is not None else None
        speeds = r["useful_tokens_per_s_spread"]
        print(f"{PIPELINES[key]:<36} {r['steps']:>5} {r['useful_tokens']:>10} {fmt(pad, '6.1f'):>6} "
              f"{r['loop_s']:>7.1f} {r['total_s']:>7.1f} {r['useful_tokens_per_s']:>12.1f} "
              f"{speeds['min']:>7.1f}-{speeds['max']:<7.1f} "
              f"{r['flops_per_s'] / 1e9:>8.1f} {fmt(r['fraction_of_matmul'] and r['fraction_of_matmul'] * 100, '7.1f'):>8} "
              f"{r['peak_rss_mb']:>11.0f} {fmt(r['final_loss'], '10.4f'):>10} {fmt(r['mean_loss'], '9.4f'):>9} {100 * r['other_cpu_share']:>8.0f}")
    shown = [k for k in data["ratios"] if k in rounds.RATIO_NAMES and (k != "c/d_best" or "c/d_pf" in data["ratios"])]
    speed = ", ".join(f"{rounds.RATIO_NAMES[k]} = {data['ratios'][k]['median']:.2f} "
                      f"({data['ratios'][k]['min']:.2f}-{data['ratios'][k]['max']:.2f})" for k in shown)
    if speed:
        print(f"useful tokens/s, median (min-max) of the rounds' ratios: {speed}")
    rss = ", ".join(f"{name} = {data['ratios'][key]['median']:.2f} (max {data['ratios'][key]['max']:.2f})"
                    for key, name in (("rss c/b", "(c)/(b)"), ("rss c/a", "(c)/(a)")) if key in data["ratios"])
    if rss:
        print(f"peak RSS: {rss}")
    if not data["equal_tokens"]:
        print("WARNING: the pipelines did not train the same number of tokens!")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["alpaca", "raw", "both"], default="both")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per dataset, each trained once by every pipeline (default 32; --quick 12)")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few samples: a CI smoke test")
    parser.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    parser.add_argument("--cutoff-len", type=int, default=None, help="default 256 (--quick 128)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="LoRA dropout of every pipeline (default 0, the trainer's default; 0.05 was the default "
                             "before: the trainer's q/k/v then cannot share one LoRA-A product)")
    parser.add_argument("--packing", choices=["on", "off", "both"], default="both",
                        help="(c) with packing off (the trainer's default), on, or both")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per pipeline")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home folder")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds: every pipeline is timed once per round (default 3; --quick 2)")
    parser.add_argument("--pipelines", default=None, metavar="LIST",
                        help="comma-separated subset of a,b,c,d (default all; c_pack follows --packing)")
    parser.add_argument("--trl-padding-free", choices=["off", "both"], default=None,
                        help="both: run (d) again with TRL's padding_free=True (one concatenated row per micro-batch), "
                             "and judge (c)/(d) against the faster of the two in each round (default both; --quick off)")
    parser.add_argument("--retries", type=int, default=0,
                        help="run a pipeline again (up to this many times) when other processes disturbed it; the "
                             "least disturbed try counts")
    parser.add_argument("--disturbed", type=float, default=0.1, metavar="SHARE",
                        help="a try counts as disturbed when other processes used more than this share of the CPUs "
                             "(default 0.1)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each timing, wait up to S seconds for other processes to leave the CPUs idle")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        spec["t0"] = time.perf_counter()
        from bench.hf_pipelines import run_worker

        run_worker(spec)
        return 0

    args.samples = args.samples or (12 if args.quick else 32)
    args.rounds = (2 if args.quick else 3) if args.rounds is None else args.rounds
    if args.rounds < 1:
        parser.error("--rounds must be at least 1: each round times every pipeline once.")
    chosen = [p.strip() for p in (args.pipelines or "a,b,c,d").split(",") if p.strip()]
    if not chosen or set(chosen) - {"a", "b", "c", "d"}:
        parser.error(f"--pipelines takes a comma-separated subset of a,b,c,d, not {args.pipelines!r}.")
    cutoff = args.cutoff_len or (128 if args.quick else 256)
    started = time.perf_counter()
    from trainer.home import HOME_ENV
    from trainer.params import DEFAULT_MODEL, TrainingParameters

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    home = work / "home"
    for sub in ("models", "datasets", "loras"):
        (home / sub).mkdir(parents=True)
    try:
        checkout_model = default_model_dir()
        if args.quick:
            model_name = "tiny-llama"
            make_tiny_model(home / "models" / model_name, checkout_model)
        else:
            model_name = DEFAULT_MODEL
            link_tree(checkout_model, home / "models" / model_name)
        os.environ[HOME_ENV] = str(home)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)

        from trainer.models import load_tokenizer, model_path

        base = {
            "base_model": model_name, "cutoff_len": cutoff, "overlap_len": min(128, cutoff // 2),
            "micro_batch_size": args.micro_batch_size, "batch_size": args.micro_batch_size, "epochs": 1,
            "learning_rate": 3e-4, "lr_scheduler_type": "linear", "warmup_steps": 2, "optimizer": "adamw_torch",
            "weight_decay": 0.0, "max_grad_norm": 1.0, "lora_rank": 8, "lora_alpha": 16,
            "lora_dropout": args.lora_dropout, "target_modules": "q-k-v-o", "seed": args.seed, "group_by_length": True,
            "logging_steps": 1, "save_steps": 0, "precision": "full", "gradient_checkpointing": False,
        }
        has_packing = "packing" in TrainingParameters.__dataclass_fields__
        # (c) is the trainer as a user runs it (packing off, its default, unless --packing on); with
        # --packing both, c_pack runs it again with packing on to show what packing buys.
        pipelines = [p for p in ("a", "b", "c", "d") if p in chosen]
        if "d" in chosen and (args.trl_padding_free or ("off" if args.quick else "both")) == "both":
            pipelines.insert(pipelines.index("d") + 1, "d_pf")
        if "c" in chosen and has_packing and args.packing == "both":
            pipelines.insert(pipelines.index("c") + 1, "c_pack")
        args.packing_of = {"c": args.packing == "on", "c_pack": True} if has_packing else {}

        machine = machine_info()
        tokenizer = load_tokenizer(model_name)
        dims = model_dims(model_path(model_name), TrainingParameters.from_dict(base).lora_target_modules(),
                          base["lora_rank"])
        size = 1024 if args.quick else 2048
        repeats = 3 if args.quick else 10
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        rates = [matmul_rate(size, repeats)]
        rows = args.micro_batch_size * cutoff
        shaped = matmul_rate(dims["intermediate"], repeats, m=rows, k=dims["hidden"])
        print(f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), torch {machine['torch']} with "
              f"{machine['torch_threads']} threads, transformers {machine['transformers']}, peft {machine['peft']}; "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"Model: {model_name}, {dims['params'] / 1e6:.1f}M parameters ({dims['linear_params'] / 1e6:.1f}M in "
              f"Linear layers incl. lm_head), {dims['layers']} layers; LoRA r=8 alpha=16 "
              f"dropout {args.lora_dropout:g} on q,k,v,o "
              f"({dims['lora_params']:,} adapter weights); AdamW lr 3e-4 linear, warm-up 2, clip 1.0, seed {args.seed}; "
              f"micro batch = batch = {args.micro_batch_size}, cutoff {cutoff}, float32, one epoch.")
        print(f"float32 matmul ({size}x{size} @ {size}x{size}, best of {repeats}): {rates[0] / 1e9:.1f} GFLOP/s; "
              f"a model-shaped product ({rows}x{dims['hidden']} @ {dims['hidden']}x{dims['intermediate']}): "
              f"{shaped / 1e9:.1f} GFLOP/s")

        report = {"machine": machine, "model": model_name, "model_dims": dims, "base_params": base,
                  "flop_formula": FLOP_FORMULA, "pipelines": {k: PIPELINES[k] for k in pipelines},
                  "command": " ".join(["python", "bench/train_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
                  "datasets": {}}
        kinds = ["alpaca", "raw"] if args.dataset == "both" else [args.dataset]
        for kind in kinds:
            report["datasets"][kind] = run_dataset(kind, args, home, env, base, tokenizer, dims, rates[0], pipelines,
                                                   work, rates, (size, repeats))
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        rates.append(matmul_rate(size, repeats))
        matmul = max(rates)
        # The fractions use the best of the measurements (at the start, before every pipeline, at the end):
        # a disturbed measurement can only make the machine look slower than it is.
        for data in report["datasets"].values():
            for r in [*data["pipelines"].values(), *(r for row in data["rounds"] for r in row.values())]:
                r["fraction_of_matmul"] = r["flops_per_s"] / matmul
            data["fractions_of_matmul"] = rounds.fractions_of_matmul(data["rounds"], matmul)
        report["matmul"] = {"size": size, "repeats": repeats, "flops_per_s": matmul, "measurements": rates,
                            "model_shaped": {"m": rows, "k": dims["hidden"], "n": dims["intermediate"],
                                             "flops_per_s": shaped}}

        ordered = sorted(rates)
        print(f"\nfloat32 matmul rate: {matmul / 1e9:.1f} GFLOP/s, the best of {len(rates)} measurements through the run "
              f"(median {ordered[len(ordered) // 2] / 1e9:.1f}, lowest {ordered[0] / 1e9:.1f})")
        print(f"FLOP count: {FLOP_FORMULA}")
        for kind, data in report["datasets"].items():
            print_table(kind, data)
        print("\n(others %: share of the machine's CPUs that other processes used during that pipeline; "
              "0 means an undisturbed timing. useful tok = non-padding input tokens; loop s excludes start-up and "
              "model loading, total s is the whole process.)")
        report["goals"] = rounds.goals(report["datasets"])
        print("\nGoals:")
        for goal in report["goals"]:
            print(f"  {rounds.goal_line(goal)}")
        report["wall_s"] = time.perf_counter() - started
        print(f"\nBenchmark wall time {report['wall_s']:.0f} s; load average now {os.getloadavg()[0]:.2f}.")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
