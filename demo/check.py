"""Check, from the logged events only, the papers' discoveries as reproduced by the demo.

    python demo/run.py --check --logdir runs/demo

Prints one row per relation and exits non-zero when one fails, except relations listed
in ``KNOWN_DIFFERENCES`` (documented in the README with their measured numbers), which
are reported without failing.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: relation id -> why it does not reproduce here (shown in the table, does not fail).
KNOWN_DIFFERENCES: Dict[str, str] = {
    "entropy_lr_too_high_falls": (
        "with lr 0.5 this 176-neuron batch-norm CNN still trains (58-80 % train accuracy) and its "
        "entropy rises, though it ends below the baseline's (1.45 vs 1.60); at lr 1.0 or 2.0 entropy does fall, but the "
        "network no longer learns at all (chance accuracy), which is not the papers' failure case"),
    "diversity_regularizer_lowers_d_anchor": (
        "the margin is small (0.645 vs 0.656 on the reference machine) and may flip elsewhere: the regularizer "
        "optimises cos^3 similarity with image-level ground-truth concepts on training batches, while the monitor "
        "measures spatial NetDissect IoU on the probe set; the batch measure it optimises falls clearly (0.348 vs 0.674)"
    ),
}

RUN_NAMES = ("baseline", "lr_too_high", "overfit", "diverse")


def _series(scalars: Dict[str, List[Tuple[int, float]]], tag: str, run: str) -> List[Tuple[int, float]]:
    if tag not in scalars:
        raise SystemExit(f"run {run!r} has no scalar {tag!r}: was the demo logged completely? "
                         f"(python demo/run.py --no-serve --force --logdir ...)")
    return sorted(scalars[tag])


def movement_per_accuracy_gain(scalars, run) -> Tuple[float, float, float]:
    """Total embedding movement (sum of per-step speeds) over the training-accuracy gain,
    both from the first to the last epoch."""
    speed = dict(_series(scalars, "concepts/speed/conceptevo/all", run))
    accuracy = _series(scalars, "train/accuracy", run)
    first_step, first_acc = accuracy[0]
    last_step, last_acc = accuracy[-1]
    moved = sum(v for s, v in speed.items() if first_step < s <= last_step)
    gain = last_acc - first_acc
    return moved, gain, moved / gain if gain > 1e-6 else float("inf")


def evaluate(logdir: str) -> List[Tuple[str, str, str, bool]]:
    """``[(id, relation, measured, holds)]``."""
    from tb_conceptevo import metadata
    from tb_conceptevo.reading import LogReader

    with LogReader(logdir) as logs:
        missing = [r for r in RUN_NAMES if r not in logs.runs()]
        if missing:
            raise SystemExit(f"{logdir!r} lacks the demo runs {missing}; run: python demo/run.py --no-serve --logdir {logdir}")
        scalars = {run: logs.scalars(run) for run in RUN_NAMES}
        revert_tags = [t for t in logs.series("baseline").get("baseline", {}) if t.startswith(metadata.PREFIX + metadata.REVERT)]
        if not revert_tags:
            raise SystemExit("the baseline run has no revert evaluation logged")
        revert_header, revert_arrays = logs.payload("baseline", revert_tags[0])

    rows = []
    # The papers' entropy series start at the first trained epoch; the untrained
    # snapshot (step 0) is shown for reference but not compared.
    entropy = {run: _series(scalars[run], "concepts/entropy/conceptevo/all", run) for run in RUN_NAMES}
    for run, rid, relation, holds in (
            ("baseline", "entropy_baseline_rises", "baseline: differential entropy rises over training",
             lambda first, last: last > first),
            ("lr_too_high", "entropy_lr_too_high_falls", "lr_too_high: differential entropy falls over training",
             lambda first, last: last < first)):
        series = entropy[run]
        init, first, last = series[0][1], series[1][1], series[-1][1]
        rows.append((rid, relation, f"epoch {series[1][0]} {first:.2f} -> epoch {series[-1][0]} {last:.2f} "
                                    f"(untrained {init:.2f})", holds(first, last)))

    d_base = _series(scalars["baseline"], "concepts/d_anchor/text/all", "baseline")[-1][1]
    d_high = _series(scalars["lr_too_high"], "concepts/d_anchor/text/all", "lr_too_high")[-1][1]
    rows.append(("d_anchor_lr_too_high_higher", "d_anchor ends higher for lr_too_high than baseline",
                 f"{d_high:.3f} vs {d_base:.3f}", d_high > d_base))
    # the regularizer's own measure (cos^3 on the training batches) and the monitor's
    # (NetDissect IoU on the probe set), both for the regularized layer
    batch_base = _series(scalars["baseline"], "train/diversity_loss", "baseline")[-1][1]
    batch_diverse = _series(scalars["diverse"], "train/diversity_loss", "diverse")[-1][1]
    rows.append(("diversity_regularizer_lowers_batch_d_anchor",
                 "the diversity regularizer lowers its layer's d_anchor on the training batches",
                 f"{batch_diverse:.3f} vs baseline {batch_base:.3f}", batch_diverse < batch_base))
    layer_tag = "concepts/d_anchor/text/features.12"
    d_layer_base = _series(scalars["baseline"], layer_tag, "baseline")[-1][1]
    d_layer_diverse = _series(scalars["diverse"], layer_tag, "diverse")[-1][1]
    rows.append(("diversity_regularizer_lowers_d_anchor",
                 "... and the monitored d_anchor of that layer (NetDissect on the probe set)",
                 f"{d_layer_diverse:.3f} vs baseline {d_layer_base:.3f}", d_layer_diverse < d_layer_base))

    moved_b, gain_b, rate_b = movement_per_accuracy_gain(scalars["baseline"], "baseline")
    moved_o, gain_o, rate_o = movement_per_accuracy_gain(scalars["overfit"], "overfit")
    rows.append(("overfit_moves_less", "overfit moves its embeddings less per gain in training accuracy",
                 f"{moved_o:.2f}/{gain_o:.2f} = {rate_o:.2f} vs {moved_b:.2f}/{gain_b:.2f} = {rate_b:.2f}",
                 rate_o < rate_b))

    change = revert_arrays["mean_change"]
    random_mean = float(revert_header["random_mean"])
    rows.append(("revert_top_vs_bottom", "reverting the most important quartile costs more than the least",
                 f"{change[0]:+.3f} vs {change[-1]:+.3f}", change[0] < change[-1]))
    rows.append(("revert_top_vs_random", "... and more than a random quartile",
                 f"{change[0]:+.3f} vs {random_mean:+.3f}", change[0] < random_mean))
    return rows


def format_table(rows: Sequence[Tuple[str, str, str, bool]]) -> str:
    lines = ["| relation (paper) | measured | result |", "|---|---|---|"]
    for rid, relation, measured, holds in rows:
        verdict = "reproduced" if holds else ("known difference" if rid in KNOWN_DIFFERENCES else "NOT reproduced")
        lines.append(f"| {relation} | {measured} | {verdict} |")
    return "\n".join(lines)


def check(logdir: str) -> int:
    rows = evaluate(logdir)
    print(format_table(rows))
    failed = [rid for rid, _, _, holds in rows if not holds and rid not in KNOWN_DIFFERENCES]
    for rid, why in KNOWN_DIFFERENCES.items():
        print(f"known difference {rid}: {why}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("all relations reproduced" + (", except the known differences above" if KNOWN_DIFFERENCES else ""))
    return 0


if __name__ == "__main__":
    sys.exit(check(sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "demo")))
