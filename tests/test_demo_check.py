"""The demo's check is evidence only if it can fail.

The unit tests run everywhere; the tampered-logs tests need real demo logs, which
``scripts/test.sh`` makes and points ``TB_CONCEPTEVO_DEMO_LOGS`` at (one seed's logdir).
"""

import os
import shutil

import numpy as np
import pytest

from demo import check as demo_check
from demo.check import Row, _revert_rows, combine

DEMO_LOGS = os.environ.get("TB_CONCEPTEVO_DEMO_LOGS")
needs_demo_logs = pytest.mark.skipif(
    not DEMO_LOGS, reason="needs the demo's logs: scripts/test.sh sets TB_CONCEPTEVO_DEMO_LOGS")


def _revert(change, random_mean):
    header = {"random_mean": random_mean, "bin_labels": ["0-25%", "25-50%", "50-75%", "75-100%"]}
    return {r.id: r for r in _revert_rows("baseline", header, {"mean_change": np.asarray(change)})}


def test_revert_rows_test_the_order_of_all_bins_not_only_the_ends():
    monotone = _revert([-0.3, -0.2, -0.1, 0.0], -0.15)
    assert monotone["revert_drop_grows_with_importance"].holds
    assert monotone["revert_drop_grows_with_importance"].figures["rho"][0] == pytest.approx(1.0)
    assert "random costs less than 2 of the 4 bins" in monotone["revert_top_vs_random"].measured()
    assert monotone["revert_top_vs_random"].figures["costlier"][0] == 2
    # first below last, but the middle bins cost nothing and the least important most:
    # the end-to-end comparison alone would call this reproduced
    scrambled = _revert([-0.2, 0.1, 0.05, -0.1], -0.3)
    assert not scrambled["revert_drop_grows_with_importance"].holds
    assert not scrambled["revert_top_vs_random"].holds
    assert "random costs less than 0 of the 4 bins" in scrambled["revert_top_vs_random"].measured()


def test_combine_reports_ranges_and_partial_verdicts():
    def row(value, holds):
        return [Row("r", "relation", "{x} vs {y}", {"x": (value, ".2f"), "y": (1.0, ".2f")}, holds)]

    (_, measured, verdict), = combine([row(0.5, True), row(0.7, True), row(0.61, True)])
    assert (measured, verdict) == ("0.50 to 0.70 vs 1.00", "reproduced")
    (_, _, verdict), = combine([row(0.5, True), row(0.7, False), row(0.6, True)])
    assert verdict == "2 of 3 runs"
    (_, _, verdict), = combine([row(0.5, False)])
    assert verdict == "NOT reproduced"


def _swapped_copy(tmp_path, a, b):
    logdir = tmp_path / f"{a}-{b}"
    shutil.copytree(DEMO_LOGS, logdir)
    os.rename(logdir / a, logdir / "_swap")
    os.rename(logdir / b, logdir / a)
    os.rename(logdir / "_swap", logdir / b)
    return str(logdir)


def _verdicts(logdir):
    return {r.id: r.holds for r in demo_check.evaluate(logdir, refit=False)}


@needs_demo_logs
def test_check_passes_on_the_untampered_logs(tmp_path):
    assert demo_check.check([DEMO_LOGS], refit=False) == 0


@needs_demo_logs
@pytest.mark.parametrize("other,must_fail", [
    ("lr_too_high", "d_anchor_lr_too_high_higher"),
    ("overfit", "overfit_moves_less"),
])
def test_check_fails_when_runs_are_swapped(tmp_path, other, must_fail):
    logdir = _swapped_copy(tmp_path, "baseline", other)
    verdicts = _verdicts(logdir)
    assert verdicts[must_fail] is False, verdicts
    assert demo_check.check([logdir], refit=False) == 1
