"""Drift monitoring: do the scores of images judged good still look like the calibration's good scores?

A lighting change, a moved camera or a new surface finish shifts every score, and nothing else
says so: the verdicts go on, with a threshold that no longer means what calibration made it mean.
The model keeps its good calibration scores (``calibration.json``, ``good_scores``); ``score`` and
``watch`` compare the scores of the good verdicts with them, window by window.

Statistic: the two-sided Mann-Whitney U test (Wilcoxon rank sum) of each window of ``window``
consecutive good-verdict scores (default 50, non-overlapping) against the calibration's good
scores below the image threshold. Why this one:

- Its false alarm rate is exact and needs no model of the scores: with no drift the new good
  images are exchangeable with the calibration images, and the distribution of U then depends
  only on the two sample sizes (:func:`u_distribution`, exact, no normal approximation). The rate
  per check is computed (:attr:`DriftMonitor.false_alarm_rate`, at most :data:`ALPHA`) and shown.
- It works with the 10-50 calibration images a model usually has. A Kolmogorov-Smirnov test has
  less power against a shift at these sizes; the population stability index (PSI) needs bins and
  has no false alarm rate at all; a test of one quantile uses less of the data.
- Ranks ignore the score's units (DRAEM and CS-Flow scores live on different scales) and outliers
  (one odd part in a window is not drift).
- Two-sided: scores drifting *down* is the dangerous direction (defects may then pass unseen),
  while scores drifting up also show as more rejects.

Only scores below the image threshold are compared, on both sides: a good verdict is a score below
the threshold, so the calibration scores are cut at the threshold the same way, and with no drift
both samples come from the same cut distribution. :data:`ALPHA` = 0.001 per check: on a stable line
one false alarm per ``window / ALPHA`` good images on average (50,000 at the default window). That
rate is averaged over calibration sets; for the one calibration set a model has it varies, the
more so the fewer images it has (simulated with 30 calibration images and windows of 50: below
0.0011 per check for 90 % of calibration sets, up to 0.013 for 1 %).

A drift alarm is a warning: it is printed, it goes into the ``warnings`` of every record from the
window that raised it until a later window passes, and into the summary; the exit code changes only
with ``--fail-on-drift`` (exit 5, see README "Exit codes").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from surfaceinspect.storage.records import ScoreRecord
from surfaceinspect.ui import Reporter

ALPHA = 1e-3  # false alarm rate per check (at most; the exact rate is computed)
DEFAULT_WINDOW = 50  # good verdicts per check


@functools.lru_cache(maxsize=32)
def u_distribution(m: int, n: int) -> np.ndarray:
    """P(U = u), u = 0 .. m*n, of the Mann-Whitney U of samples of sizes m and n under no drift (no ties).

    The number of orderings with U = u is the coefficient of q^u of the Gaussian binomial
    coefficient [m+n choose m]_q = prod_{i=1..k} (1 - q^(l+i)) / (1 - q^i) (k, l the smaller and
    larger size): each factor is one multiplication and one division by a polynomial, exact in
    float64 in the tails that matter (their counts are small integers).
    """
    k, l_ = min(m, n), max(m, n)
    size = m * n + 1
    poly = np.zeros(size)
    poly[0] = 1.0
    for i in range(1, k + 1):
        if l_ + i < size:  # multiply by (1 - q^(l+i))
            poly[l_ + i :] -= poly[: size - l_ - i].copy()
        for r in range(i):  # divide by (1 - q^i): a running sum with stride i
            poly[r::i] = np.cumsum(poly[r::i])
    poly = np.maximum(poly, 0.0)  # float rounding in the (huge) middle coefficients must not go negative
    return poly / poly.sum()


@dataclass
class DriftCheck:
    """One window of good-verdict scores compared with the calibration's."""

    index: int  # 1 for the first check of this run
    p_value: float
    direction: str  # "higher" or "lower": where the window's scores lie relative to the calibration's
    median: float  # of the window's scores
    reference_median: float  # of the calibration's good scores below the threshold
    drifted: bool
    last_path: str  # the record that completed the window

    def describe(self) -> str:
        return (
            f"the good scores up to {self.last_path} are {self.direction} than at calibration "
            f"(median {self.median:.5g} vs {self.reference_median:.5g}, Mann-Whitney p = {self.p_value:.2g})"
        )


class DriftMonitor:
    """Tests each window of ``window`` good-verdict scores against the calibration's good scores.

    ``reference`` are the calibration's good scores, ``threshold`` the image threshold. Feed every
    record to :meth:`add`; :attr:`alarm` is the latest check when it found drift (else None).
    """

    def __init__(
        self, reference: Sequence[float], threshold: float, window: int = DEFAULT_WINDOW, alpha: float = ALPHA
    ) -> None:
        self.reference = np.sort(np.asarray([s for s in reference if s < threshold], dtype=np.float64))
        self.window = int(window)
        self.alpha = alpha
        self.scores: list[float] = []
        self.checks: list[DriftCheck] = []
        self.alarm: DriftCheck | None = None
        self.reason: str | None = None
        self.false_alarm_rate = math.nan
        self._cdf = np.zeros(1)
        if not len(reference):
            self.reason = (
                "the model's calibration.json holds no calibration scores (written by an older surfaceinspect); "
                "`surfaceinspect recalibrate` adds them"
            )
            return
        m, n = self.reference.size, self.window
        self._cdf = np.cumsum(u_distribution(m, n)) if m else np.zeros(1)
        # Two-sided and symmetric: alarm when U <= a or U >= m*n - a, a the largest with 2 P(U <= a) <= alpha.
        inside = np.flatnonzero(2.0 * self._cdf <= alpha)
        if m == 0 or inside.size == 0:
            self.reason = (
                f"{m} calibration score(s) below the threshold are too few to detect drift; recalibrate on more images"
            )
            return
        self.false_alarm_rate = float(2.0 * self._cdf[inside[-1]])

    @property
    def available(self) -> bool:
        return self.reason is None

    def add(self, verdict: str, score: float | None, path: str) -> DriftCheck | None:
        """Take one record; returns the check it completed, if any."""
        if not self.available or verdict != "good" or score is None or not math.isfinite(score):
            return None
        self.scores.append(float(score))
        if len(self.scores) < self.window:
            return None
        check = self._test(np.asarray(self.scores), path)
        self.scores = []
        self.checks.append(check)
        self.alarm = check if check.drifted else None
        return check

    def _test(self, recent: np.ndarray, path: str) -> DriftCheck:
        below = np.searchsorted(self.reference, recent, side="left")
        ties = np.searchsorted(self.reference, recent, side="right") - below
        # U: the pairs (calibration score, window score) in which the window's score is the higher (ties count half)
        u = float(np.sum(below) + 0.5 * np.sum(ties))
        top = self.reference.size * recent.size
        lower = float(self._cdf[min(top, math.floor(u))])
        upper = float(self._cdf[min(top, top - math.ceil(u))])  # P(U >= u) = P(U <= m*n - u) by symmetry
        p_value = min(1.0, 2.0 * min(lower, upper))
        return DriftCheck(
            index=len(self.checks) + 1,
            p_value=p_value,
            direction="higher" if u > top / 2 else "lower",
            median=float(np.median(recent)),
            reference_median=float(np.median(self.reference)),
            drifted=p_value <= self.alpha,
            last_path=path,
        )

    def track(self, record: ScoreRecord, reporter: Reporter) -> None:
        """Feed one record (before it is written); say when drift starts or ends; mark records while it lasts."""
        before = self.alarm
        check = self.add(record.verdict, record.score, record.path)
        if check is not None and check.drifted and before is None:
            reporter.warn(
                f"drift: {check.describe()}: verdicts may no longer mean what calibration made them mean; check "
                "lighting, camera and parts, then recalibrate or retrain (docs/drift.md)"
            )
        elif check is not None and not check.drifted and before is not None:
            reporter.info(f"drift: check {check.index} found none (the good scores look like calibration again)")
        note = self.record_warning()
        if note is not None:
            record.warnings.append(note)

    def record_warning(self) -> str | None:
        """The warning every record carries while the latest check found drift."""
        if self.alarm is None:
            return None
        return f"drift: good scores {self.alarm.direction} than at calibration since check {self.alarm.index}"

    def describe(self) -> str:
        """The summary line."""
        if not self.available:
            return f"drift: not monitored ({self.reason})"
        test = (
            f"windows of {self.window} good scores vs {self.reference.size} calibration scores, two-sided "
            f"Mann-Whitney, false alarm rate {self.false_alarm_rate:.2g} per check"
        )
        if not self.checks:
            return f"drift: not checked (only {len(self.scores)} good verdicts; {test})"
        drifted = [c for c in self.checks if c.drifted]
        if not drifted:
            return f"drift: none in {len(self.checks)} check(s) ({test})"
        latest = "; the latest check found none" if self.alarm is None else ""
        found = f"DETECTED in {len(drifted)} of {len(self.checks)} check(s)"
        return f"drift: {found}: {drifted[-1].describe()}{latest} ({test})"

    @property
    def detected(self) -> bool:
        return any(c.drifted for c in self.checks)
