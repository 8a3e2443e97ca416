"""Command line: `python -m trainer preview | train | perplexity | run-job | export` (the first three, as the
README shows them, stay stable)."""

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
    try:
        refuse_what_cannot_train(run_dir)
    except StoppedBeforeStart:
        if os.environ.get("RANK", "0") == "0":
            _record_status(run_dir, state="stopped", reason="a stop was requested before training began", error=None)
        return 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return train(run_dir, args.resume)


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
    from .perplexity import resolve_lora

    adapter_dir = resolve_lora(args.lora)
    result = export_merged(adapter_dir, args.name or default_export_name(adapter_dir), args.model,
                           progress=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"saved {result['path']} (max |logit difference| {result['max_abs_diff_reloaded']:.2e})")
    return 0


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

    export = commands.add_parser("export", help="merge an adapter into its base model and save it under models/",
                                 description="Merge a LoRA adapter into its base model (full precision), save a "
                                             "safetensors model folder models/NAME and check that its logits "
                                             "equal base+adapter. An existing folder is never overwritten.")
    export.add_argument("--lora", required=True, help="adapter folder: loras/NAME or loras/NAME/checkpoint-STEP")
    export.add_argument("--name", default=None, help="folder name under models/ (default NAME-merged)")
    export.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    export.add_argument("--json", action="store_true", help="print the result as JSON")
    export.set_defaults(handler=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except DashboardError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
