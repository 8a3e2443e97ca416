"""Interleaved rounds of the throughput benchmark: per-round ratios, their median and spread, and the goals.

Every pipeline is timed once per round, the rounds interleaved (a, b, c, d, a, b, c, d, ...), so a slow
stretch of a shared host slows one round of every pipeline rather than all rounds of one. A ratio is
computed inside each round (both pipelines ran minutes apart at most) and reported as the median of the
rounds with their spread (min-max). A goal is met only when its worst round meets it.
"""

from __future__ import annotations

import statistics

# (name in the report, numerator, denominator, what is divided)
RATIOS = [
    ("c/a", "c", "a", "useful_tokens_per_s"),
    ("c/b", "c", "b", "useful_tokens_per_s"),
    ("c/d", "c", "d", "useful_tokens_per_s"),
    ("c/d_pf", "c", "d_pf", "useful_tokens_per_s"),
    ("c/c_pack", "c", "c_pack", "useful_tokens_per_s"),
    ("rss c/a", "c", "a", "peak_rss_mb"),
    ("rss c/b", "c", "b", "peak_rss_mb"),
]
RATIO_NAMES = {"c/a": "(c)/(a)", "c/b": "(c)/(b)", "c/d": "(c)/(d)", "c/d_pf": "(c)/(d padding-free)",
               "c/d_best": "(c)/(faster d)", "c/c_pack": "(c) packing off/on"}

# (ratio or measure, datasets, threshold, True when higher is better, wording)
GOALS = [
    ("c/b", ("alpaca", "raw"), 1.3, True, "(c)/(b) useful tokens/s >= 1.3"),
    # Against TRL's best: the faster of its padded and padding-free runs in each round, where both ran.
    ("c/d_best", ("alpaca", "raw"), 1.5, True, "(c)/(d) useful tokens/s >= 1.5"),
    ("rss c/b", ("alpaca", "raw"), 1.0, False, "peak RSS (c) <= (b) (ratio (c)/(b))"),
    ("fraction_of_matmul", ("raw",), 0.6, True, "(c) >= 60% of the float32 matmul rate"),
    ("c/a", ("alpaca",), 2.0, True, "(c)/(a) useful tokens/s >= 2.0"),
]


def spread(values: list[float]) -> dict:
    """The median of the rounds' values, their min and max, and the values themselves in round order."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": list(values)}


def round_ratios(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Each ratio of RATIOS whose two pipelines ran, computed inside every round, with its spread."""
    found = {}
    for name, top, bottom, field in RATIOS:
        values = [r[top][field] / r[bottom][field] for r in rounds
                  if top in r and bottom in r and r[bottom][field]]
        if values and len(values) == len(rounds):
            found[name] = spread(values)
    if "c/d" in found:  # TRL at its best in each round: the smaller ratio, against whichever (d) was faster
        found["c/d_best"] = spread([min(pair) for pair in zip(found["c/d"]["rounds"],
                                                              found.get("c/d_pf", found["c/d"])["rounds"])])
    return found


def median_round(results: list[dict], field: str = "useful_tokens_per_s") -> dict:
    """The round whose `field` is the median (the lower middle one of an even count): the row the table shows."""
    ordered = sorted(results, key=lambda r: r[field])
    return ordered[(len(ordered) - 1) // 2]


def summarise_rounds(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per pipeline: its median round's numbers, plus every round's timing and the spread of its speed."""
    summary = {}
    for pipeline in rounds[0]:
        results = [r[pipeline] for r in rounds]
        row = dict(median_round(results))
        row["rounds"] = [{k: r.get(k) for k in ("useful_tokens_per_s", "loop_s", "total_s", "peak_rss_mb",
                                                 "other_cpu_share", "final_loss")} for r in results]
        row["useful_tokens_per_s_spread"] = spread([r["useful_tokens_per_s"] for r in results])
        summary[pipeline] = row
    return summary


def fractions_of_matmul(rounds: list[dict[str, dict]], matmul: float, pipeline: str = "c") -> dict | None:
    """The pipeline's achieved model FLOP rate over the machine's matmul rate, in every round."""
    values = [r[pipeline]["flops_per_s"] / matmul for r in rounds if pipeline in r]
    return spread(values) if values and matmul else None


def goals(datasets: dict[str, dict]) -> list[dict]:
    """Every goal of GOALS whose figures were measured, judged by its worst round."""
    found = []
    for measure, kinds, threshold, higher, wording in GOALS:
        for kind in kinds:
            data = datasets.get(kind)
            if not data:
                continue
            figures = data.get("fractions_of_matmul") if measure == "fraction_of_matmul" else data["ratios"].get(measure)
            if not figures:
                continue
            worst = figures["min"] if higher else figures["max"]
            found.append({"goal": f"{wording} on {kind}", "dataset": kind, "measure": measure,
                          "threshold": threshold, "median": figures["median"], "min": figures["min"],
                          "max": figures["max"], "worst": worst, "rounds": figures["rounds"],
                          "percent": measure == "fraction_of_matmul",
                          "met": worst >= threshold if higher else worst <= threshold})
    return found


def goal_line(goal: dict) -> str:
    """One line of the goals list: met or MISSED by the worst round, then median (min-max) of the rounds."""
    def shown(value):
        return f"{value * 100:.1f} %" if goal["percent"] else f"{value:.2f}"

    return (f"[{'met' if goal['met'] else 'MISSED'}] {goal['goal']}: worst round {shown(goal['worst'])}, "
            f"median {shown(goal['median'])} ({shown(goal['min'])}-{shown(goal['max'])}, "
            f"{len(goal['rounds'])} rounds)")
