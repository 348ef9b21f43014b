"""Is a new result a regression against its history? Decided on raw samples, not on two medians.

Latency: a one-sided Mann-Whitney U test (new samples stochastically larger than the history's)
at significance ``alpha``, AND a Hodges-Lehmann shift (the median of all pairwise differences)
beyond ``threshold`` of the history's median: significant and big enough to matter, both. Samples
within one run are not independent of that run's conditions (a busy host, a warm cache), so with
two or more earlier runs the shift must also exceed ``noise_factor`` times the largest night-to-night
deviation already seen in the history: a slow-down must stand out from ordinary nights.
Accuracy: a drop below the best recent accuracy by more than ``accuracy_budget`` (fraction).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MAX_PAIRS = 4_000_000  # pairwise differences for the shift estimate; subsample beyond this


class RegressionPolicy(BaseModel):
    model_config = ConfigDict(frozen=True)
    alpha: float = Field(default=0.01, gt=0, lt=1, description="Significance level of the U test.")
    threshold: float = Field(default=0.05, ge=0, description="Smallest slow-down that counts (0.05 = 5 %).")
    accuracy_budget: float = Field(default=0.01, ge=0, description="Allowed accuracy drop (0.01 = 1 point).")
    history: int = Field(default=5, ge=1, description="How many earlier valid runs form the reference.")
    noise_factor: float = Field(default=2.0, ge=0, description="A shift must exceed this many times the "
                                "history's largest night-to-night deviation (with 2+ earlier runs).")


class Verdict(BaseModel):
    """What the comparison found."""

    model_config = ConfigDict(frozen=True)
    compared_runs: int
    latency_regression: bool
    latency_shift: float | None = Field(description="Hodges-Lehmann shift relative to the history's median.")
    latency_p_value: float | None
    night_to_night: float | None = Field(default=None, description="Largest relative deviation of an earlier "
                                         "run's median from the history's median.")
    accuracy_regression: bool
    accuracy_drop: float | None
    reasons: list[str]

    @property
    def regressed(self) -> bool:
        return self.latency_regression or self.accuracy_regression


def _shift(new: np.ndarray, old: np.ndarray, rng: np.random.Generator) -> float:
    if new.size * old.size > MAX_PAIRS:
        k = int(np.sqrt(MAX_PAIRS))
        new = rng.choice(new, size=min(k, new.size), replace=False)
        old = rng.choice(old, size=min(k, old.size), replace=False)
    return float(np.median(new[:, None] - old[None, :]))


def compare(
    new_samples: list[float], new_accuracy: float | None,
    history_samples: list[list[float]], history_accuracy: list[float | None], policy: RegressionPolicy,
) -> Verdict:
    """Compare one run with up to ``policy.history`` earlier valid runs of the same (model, profile, scheme)."""
    reasons: list[str] = []
    history = [np.asarray(s, np.float64) for s in history_samples[-policy.history:] if len(s)]
    shift = p_value = noise = None
    latency = False
    new = np.asarray(new_samples, np.float64)
    if history and new.size >= 5:
        from scipy.stats import mannwhitneyu  # here, not at import: 2 s of every `deploy` command's start-up

        old = np.concatenate(history)
        p_value = float(mannwhitneyu(new, old, alternative="greater").pvalue)
        reference = float(np.median(old))
        shift = _shift(new, old, np.random.default_rng(0)) / reference if reference > 0 else None
        if len(history) >= 2 and reference > 0:
            noise = max(abs(float(np.median(h)) - reference) / reference for h in history)
        needed = max(policy.threshold, policy.noise_factor * noise if noise is not None else 0.0)
        latency = p_value < policy.alpha and shift is not None and shift > needed
        if latency:
            spread = f", night-to-night {noise * 100:.1f} %" if noise is not None else ""
            reasons.append(f"latency {shift * 100:+.1f} % vs the last {len(history)} run(s) "
                           f"(Mann-Whitney p={p_value:.2g}, threshold {policy.threshold * 100:.0f} %{spread})")
    known = [a for a in history_accuracy[-policy.history:] if a is not None]
    drop = None
    accuracy = False
    if known and new_accuracy is not None:
        drop = max(known) - new_accuracy
        accuracy = drop > policy.accuracy_budget
        if accuracy:
            reasons.append(f"accuracy {drop * 100:.2f} points below the recent best "
                           f"(budget {policy.accuracy_budget * 100:.2f})")
    return Verdict(compared_runs=len(history), latency_regression=latency, latency_shift=shift,
                   latency_p_value=p_value, night_to_night=noise, accuracy_regression=accuracy,
                   accuracy_drop=drop, reasons=reasons)
