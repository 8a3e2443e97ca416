"""The memory estimate against real runs: peak resident memory of the trainer process for the tiny and the
default model at two micro batch sizes and two cutoffs, beside trainer.memory's CPU estimate.

    .venv/bin/python bench/memory_estimate.py            # the full grid (8 runs, a few minutes)
    .venv/bin/python bench/memory_estimate.py --quick    # the tiny model once (the test suite runs this)

Each run trains 2 steps of raw text in its own process; its peak resident memory is what the kernel
reports for that child (os.wait4's ru_maxrss). Prints one row per configuration and the worst ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.train_throughput import default_model_dir, link_tree, make_tiny_model  # noqa: E402

GOAL = 0.25  # the estimate within 25% of the measured peak
MODELS = ("tiny-llama", "SmolLM2-135M-Instruct")
MICRO_BATCHES = (1, 4)
CUTOFFS = (128, 256)


def make_home(root: Path) -> Path:
    from trainer.params import DEFAULT_MODEL

    home = root / "home"
    default = default_model_dir()
    link_tree(default, home / "models" / DEFAULT_MODEL)
    make_tiny_model(home / "models" / "tiny-llama", default)
    (home / "datasets").mkdir(parents=True)
    (home / "datasets" / "user-guide.txt").write_bytes((ROOT / "datasets" / "user-guide.txt").read_bytes())
    (home / "loras").mkdir()
    return home


def measure(home: Path, model: str, micro: int, cutoff: int) -> dict:
    """Train 2 steps; the trainer process's peak resident memory and the estimate for the same parameters."""
    from trainer.memory import estimate
    from trainer.params import TrainingParameters

    name = f"mem-{model}-{micro}-{cutoff}"
    params = {"lora_name": name, "base_model": model, "raw_text_file": "user-guide.txt", "cutoff_len": cutoff,
              "overlap_len": cutoff // 4, "micro_batch_size": micro, "batch_size": micro, "max_steps": 2,
              "warmup_steps": 0, "learning_rate": 1e-4, "group_by_length": True}
    run_dir = home / "loras" / name
    run_dir.mkdir()
    (run_dir / "training_parameters.json").write_text(json.dumps(params))
    env = dict(os.environ, LORA_DASHBOARD_HOME=str(home), PYTHONUNBUFFERED="1")
    with open(run_dir / "train.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "trainer", "train", "--run-dir", str(run_dir)],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, code, usage = os.wait4(process.pid, 0)
    if code != 0:
        raise SystemExit(f"{name} failed:\n" + (run_dir / "train.log").read_text()[-3000:])
    os.environ["LORA_DASHBOARD_HOME"] = str(home)
    guess = estimate(TrainingParameters.from_dict(params), "cpu")
    measured = usage.ru_maxrss * 1024.0
    return {"model": model, "micro": micro, "cutoff": cutoff, "measured": measured, "estimate": guess.total,
            "ratio": guess.total / measured, "parts": guess.parts()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model at one setting only")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args(argv)
    grid = [("tiny-llama", 1, 128)] if args.quick else [(m, b, c) for m in MODELS for b in MICRO_BATCHES
                                                        for c in CUTOFFS]
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as root:
        home = make_home(Path(root))
        rows = [measure(home, *config) for config in grid]
    print(f"{'model':<24}{'micro':>6}{'cutoff':>8}{'measured MB':>13}{'estimate MB':>13}{'ratio':>8}")
    for row in rows:
        print(f"{row['model']:<24}{row['micro']:>6}{row['cutoff']:>8}{row['measured'] / 1e6:>13.0f}"
              f"{row['estimate'] / 1e6:>13.0f}{row['ratio']:>8.2f}")
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    met = abs(worst["ratio"] - 1) <= GOAL
    print(f"worst ratio {worst['ratio']:.2f} ({worst['model']}, micro {worst['micro']}, cutoff {worst['cutoff']}): "
          f"goal within {GOAL:.0%} {'met' if met else 'missed'}")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
