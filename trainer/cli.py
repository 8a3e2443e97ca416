"""Command line: `python -m trainer preview | train | perplexity | run-job | export | sweep | rank` (the first
three, as the README shows them, stay stable)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys

from .errors import DashboardError
from .params import FIELDS, PRECISIONS, SAMPLE_OPTIONS, read_and_check
from .perplexity import DEFAULT_SETTINGS, EvaluationSettings, perplexity_of_file

# Options of `preview`: the options that shape the samples (and the model, for its tokenizer), and
# skip_unmatched_rows, so that a run's data options can be given as they are (the preview lists unmatched
# rows either way).
PREVIEW_FIELDS = [*SAMPLE_OPTIONS, "skip_unmatched_rows"]


def _add_field_option(parser: argparse.ArgumentParser, name: str, flag: str | None = None) -> None:
    field = FIELDS[name]
    meta = field.metadata
    help_text = meta["help"].replace("%", "%%")
    default = field.default if field.default is not dataclasses.MISSING else None
    extra = []
    if meta.get("choices"):
        extra.append("one of " + ", ".join(meta["choices"]))
    if meta.get("min") is not None:
        extra.append(f"range {meta['min']:g}..{meta['max']:g}")
    help_text += f" ({'; '.join(extra + [f'default {default!r}'])})".replace("%", "%%")
    flag = flag or "--" + name.replace("_", "-")
    if field.type == "bool":
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        # Values are read by the same coercion as training_parameters.json, so errors read alike.
        parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def _given(args: argparse.Namespace) -> dict:
    """The parameters given on the command line (read by the same coercion as training_parameters.json)."""
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


def cmd_preview(args: argparse.Namespace) -> int:
    from .data import build_samples
    from .models import load_tokenizer

    params, problems = read_and_check(_given(args), only=PREVIEW_FIELDS + ["base_model"], require_name=False)
    if problems:
        raise DashboardError(" ".join(p.message for p in problems))
    tokenizer = load_tokenizer(params.base_model, params.trust_remote_code, progress=lambda m: print(m, file=sys.stderr))
    preview = build_samples(params, tokenizer)
    if args.json:
        json.dump(preview.to_json(), sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    stats = preview.stats
    print("Statistics:")
    for key, value in stats.items():
        print(f"  {key}: {value}")
    if preview.problems:
        print(f"Problems ({len(preview.problems)}):")
        for problem in preview.problems:
            print(f"  {problem.where}: {problem.reason}")
    for sample in preview.samples[: args.show]:
        print(f"--- {sample.source}: {sample.n_tokens} tokens, {sample.n_trained} trained, overlap {sample.overlap}")
        print(sample.text)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train import train

    run_dir = Path(args.run_dir)
    if not (run_dir / "training_parameters.json").is_file():
        raise DashboardError(f"{run_dir} has no training_parameters.json.")
    # A stop (Stop, SIGTERM, Ctrl-C) during the check ends the run as stopped; the trainer then takes them over.
    handlers = {sig: signal.signal(sig, _stop_before_start) for sig in (signal.SIGTERM, signal.SIGINT)}
    main = os.environ.get("RANK", "0") == "0"
    try:
        refuse_what_cannot_train(run_dir)
    except StoppedBeforeStart:
        if main:
            _record_status(run_dir, state="stopped", reason="a stop was requested before training began", error=None)
            _start_next_queued_run()
        return 0
    except DashboardError:
        if main:  # refused: it ended failed, and the queue goes on
            _start_next_queued_run()
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return train(run_dir, args.resume)  # it starts the next queued run as it ends


def _start_next_queued_run() -> None:
    from .runs import start_after_run_end

    start_after_run_end()


class StoppedBeforeStart(BaseException):
    """A stop requested while the run was being checked (a BaseException: no library's `except Exception`
    swallows it)."""


def _stop_before_start(*_) -> None:
    raise StoppedBeforeStart


def refuse_what_cannot_train(run_dir) -> None:
    """Before any model loads: print each warning as `warning: ...`, and refuse a run that cannot train (the
    Train page's plan refuses the same: batching.start_problems) by raising its sentence, recorded in
    status.json as the failure of a refused run is. What this check cannot read (parameters with problems, a
    model or dataset that does not load) is left to the trainer, which reports it as it always has."""
    from .batching import StepPlan, start_problems, start_warnings, training_units
    from .footprint import estimate
    from .models import load_tokenizer
    from .params import TrainingParameters, batch_problem
    from .samplecache import cached_build_samples

    world, main = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0") == "0"
    try:
        params = TrainingParameters.from_file(run_dir / "training_parameters.json")
        if params.problems(require_name=False) or batch_problem(params.batch_size, params.micro_batch_size, world):
            return
        tokenizer = load_tokenizer(params.base_model, params.trust_remote_code,
                                   progress=lambda m: print(m, file=sys.stderr, flush=True))
        preview, _ = cached_build_samples(params, tokenizer)
    except DashboardError:
        return
    units = training_units([s.n_tokens for s in preview.samples], params)
    total = StepPlan.of(params, len(units), world).total
    problems = start_problems(params, preview, len(units), total, world)
    warnings = start_warnings(params)
    try:
        warnings += [w for w in [estimate(params, total, run_dir.parent).warning()] if w is not None]
    except (DashboardError, OSError):
        pass  # the disk estimate is advice; the run does not depend on it
    for warning in warnings if main else []:
        print(f"warning: {warning.message}", file=sys.stderr, flush=True)
    if problems:
        message = " ".join(p.message for p in problems)
        if main:
            _record_status(run_dir, state="failed", error=message)
        raise DashboardError(message, field=problems[0].field)


def _record_status(run_dir, **changes) -> None:
    """status.json of a run that ended before training began: refused (failed, with the sentence the page
    shows) or stopped."""
    from .runfiles import now_iso, read_status, run_lock_file, update_status
    from .storage import named_lock

    with named_lock(run_lock_file(run_dir)):
        started = (read_status(run_dir) or {}).get("started_at") or now_iso()
        update_status(run_dir, **changes, started_at=started, finished_at=now_iso())


def cmd_perplexity(args: argparse.Namespace) -> int:
    settings = EvaluationSettings(args.stride, args.max_length, args.precision).validate()
    result = perplexity_of_file(args.model, args.lora, args.text_file, settings.stride, settings.max_length,
                                precision=settings.precision)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens")
    return 0


def cmd_run_job(args: argparse.Namespace) -> int:
    from .jobs import run_job

    return run_job(args.job_dir)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import default_export_name, export_merged
    from .gguf import default_gguf_name, export_gguf, gguf_sentence
    from .perplexity import resolve_lora

    adapter_dir = resolve_lora(args.lora)
    progress = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.to == "gguf":
        result = export_gguf(adapter_dir, args.name or default_gguf_name(adapter_dir), args.model, progress=progress)
        sentence = gguf_sentence(result)
    else:
        result = export_merged(adapter_dir, args.name or default_export_name(adapter_dir), args.model,
                               progress=progress)
        sentence = f"saved {result['path']} (max |logit difference| {result['max_abs_diff_reloaded']:.2e})"
    print(json.dumps(result) if args.json else sentence)
    return 0


def _home_path(text: str):
    """A path as the command line takes it: absolute, relative to the working folder, or to the home folder."""
    from pathlib import Path

    from .home import home_dir

    path = Path(text)
    return path if path.is_absolute() or path.exists() else home_dir() / path


def cmd_sweep(args: argparse.Namespace) -> int:
    from .params import TrainingParameters
    from .runfiles import PARAMS_FILE
    from .sweeps import launch_sweep, parse_values, read_sweep_file

    if bool(args.sweep_file) == bool(args.base_run):
        raise DashboardError("Give either --sweep-file FILE or --base-run loras/NAME (with --param).")
    if args.sweep_file:
        base, swept = read_sweep_file(_home_path(args.sweep_file))
    else:
        folder = _home_path(args.base_run)
        if not (folder / PARAMS_FILE).is_file():
            raise DashboardError(f"{args.base_run} has no {PARAMS_FILE}.")
        base, swept = TrainingParameters.from_file(folder / PARAMS_FILE), {}
    for item in args.param:
        name, sep, values = item.partition("=")
        if not sep:
            raise DashboardError(f"--param {item}: write NAME=VALUE1,VALUE2.")
        swept[name.strip()] = parse_values(name.strip(), values)
    for run_dir in launch_sweep(base, swept, args.name):
        print(run_dir.name)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from .ranking import evaluate_and_wait, experiment_ranking, ranking_records, ranking_sentence
    from .runs import is_live
    from .sweeps import experiment_run_dirs

    settings = EvaluationSettings(args.stride, args.max_length, args.precision, args.general_text).validate()
    if args.evaluate:
        run_dirs = experiment_run_dirs(args.experiment)
        live = [d.name for d in run_dirs if is_live(d)]
        if live:
            raise DashboardError(f"{', '.join(live)} has not finished yet; rank the experiment when its runs have ended.")
        evaluate_and_wait(run_dirs, args.checkpoints, settings, args.held_out_file)
    table = experiment_ranking(args.experiment, args.checkpoints, args.threshold, settings, args.held_out_file)
    sentence = ranking_sentence(table, args.threshold)
    if args.json:
        print(json.dumps({"experiment": args.experiment, "threshold": args.threshold,
                          "rows": ranking_records(table.drop(columns="path")), "sentence": sentence}))
    else:
        print(table.drop(columns="path").to_string(index=False))
        print(sentence)
    return 0


def _add_sweep_and_rank(commands) -> None:
    sweep = commands.add_parser("sweep", help="queue a grid of runs (one experiment) from a sweep file",
                                description="Every combination of the swept values becomes a run NAME-lr1e-4-r8, "
                                            "grouped as one experiment and queued; the first starts when the "
                                            "device is idle. Nothing is written if any run is invalid or exists.")
    sweep.add_argument("--sweep-file", default=None,
                       help='JSON: {"base": {parameters}, "sweep": {"learning_rate": [1e-4, 2e-4], ...}}')
    sweep.add_argument("--base-run", default=None, help="take the base parameters from loras/NAME instead")
    sweep.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2",
                       help="a swept parameter and its values (repeat for more; adds to the sweep file's)")
    sweep.add_argument("--name", default=None, help="experiment and run name prefix (default: the base LoRA name)")
    sweep.set_defaults(handler=cmd_sweep)

    rank = commands.add_parser("rank", help="rank an experiment's adapters by held-out perplexity and forgetting",
                               description="Rank every final adapter (and checkpoint) of an experiment: the best "
                                           "held-out perplexity among those whose forgetting ratio stays under "
                                           "the threshold, best first.")
    rank.add_argument("--experiment", required=True, help="the experiment name (loras/.experiments/NAME.json)")
    rank.add_argument("--checkpoints", action="store_true", help="rank every checkpoint too")
    rank.add_argument("--threshold", type=float, default=1.1, help="highest forgetting ratio allowed (default 1.1)")
    rank.add_argument("--held-out-file", default=None, help="a .txt of datasets/ (default: each run's eval data)")
    rank.add_argument("--general-text", default=DEFAULT_SETTINGS.general_text,
                      help=f"the general text of the forgetting ratio (default {DEFAULT_SETTINGS.general_text})")
    rank.add_argument("--stride", type=int, default=DEFAULT_SETTINGS.stride, help="perplexity window stride")
    rank.add_argument("--max-length", type=int, default=DEFAULT_SETTINGS.max_length, help="perplexity window length")
    rank.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_SETTINGS.precision,
                      help="base model precision")
    rank.add_argument("--evaluate", action="store_true",
                      help="first run the evaluations still missing (a background job) and wait for them")
    rank.add_argument("--json", action="store_true", help="print the ranking as JSON")
    rank.set_defaults(handler=cmd_rank)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    preview = commands.add_parser("preview", help="print the exact samples the trainer would train on",
                                  description="Print the samples (text, token ids, label mask, token counts) "
                                              "and statistics for these data options.")
    _add_field_option(preview, "base_model", "--model")
    for name in PREVIEW_FIELDS:
        _add_field_option(preview, name)
    _add_field_option(preview, "trust_remote_code")
    preview.add_argument("--json", action="store_true", help="print JSON: stats, problems and every sample")
    preview.add_argument("--show", type=int, default=5, help="samples to print without --json (default 5)")
    preview.set_defaults(handler=cmd_preview)

    train = commands.add_parser("train", help="train from DIR/training_parameters.json",
                                description="Train a LoRA from DIR/training_parameters.json, writing status.json, "
                                            "metrics.jsonl, checkpoints and the adapter into DIR.")
    train.add_argument("--run-dir", required=True, help="the run folder, e.g. loras/NAME")
    train.add_argument("--resume", nargs="?", const="latest", default=None,
                       help="resume from the newest checkpoint, or the one named (checkpoint-STEP)")
    train.set_defaults(handler=cmd_train)

    ppl = commands.add_parser("perplexity", help="sliding-window perplexity of a model (and adapter) on a text",
                              description="Perplexity by the sliding-window method: each token is scored once, "
                                          "with up to max-length tokens of context.")
    ppl.add_argument("--model", required=True, help="base model name or folder")
    ppl.add_argument("--lora", default=None, help="adapter folder (a run folder or one of its checkpoints)")
    ppl.add_argument("--text-file", required=True, help="a UTF-8 .txt file")
    ppl.add_argument("--stride", type=int, default=DEFAULT_SETTINGS.stride,
                     help=f"tokens the window moves each time (default {DEFAULT_SETTINGS.stride})")
    ppl.add_argument("--max-length", type=int, default=DEFAULT_SETTINGS.max_length,
                     help=f"window length in tokens (default {DEFAULT_SETTINGS.max_length})")
    ppl.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_SETTINGS.precision,
                     help="base model precision")
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    ppl.set_defaults(handler=cmd_perplexity)

    job = commands.add_parser("run-job", help="run a background job folder (the Evaluate page starts these)",
                              description="Run results/jobs/ID/job.json (perplexity evaluations or an export), "
                                          "writing progress to status.json and results to results/perplexity.jsonl.")
    job.add_argument("--job-dir", required=True, help="the job folder, e.g. results/jobs/ID")
    job.set_defaults(handler=cmd_run_job)

    export = commands.add_parser("export", help="merge an adapter into its base model, or write GGUF files, "
                                                "under models/",
                                 description="--to safetensors: merge a LoRA adapter into its base model (full "
                                             "precision), save a model folder models/NAME and check that its logits "
                                             "equal base+adapter. --to gguf: write models/NAME/ with the adapter as "
                                             "a GGUF LoRA, the merged model as f16, q8_0 (and the GGUF base's own "
                                             "type) GGUF files and Ollama Modelfiles, all checked in llama.cpp "
                                             "(needs `make gguf-setup`). An existing folder is never overwritten.")
    export.add_argument("--lora", required=True, help="adapter folder: loras/NAME or loras/NAME/checkpoint-STEP")
    export.add_argument("--name", default=None, help="folder name under models/ (default NAME-merged or NAME-gguf)")
    export.add_argument("--to", choices=("safetensors", "gguf"), default="safetensors", help="what to write")
    export.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    export.add_argument("--json", action="store_true", help="print the result as JSON")
    export.set_defaults(handler=cmd_export)
    _add_sweep_and_rank(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except DashboardError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
