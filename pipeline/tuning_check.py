"""Is the tuned library faster than the build it replaces? A plain `deploy run --tune-minutes` measures both.

MetaSchedule times each kernel alone, and what a kernel of a few microseconds does alone says little about it among
the others (thread-pool wake-ups, caches): the digits CNN's int8 library tuned 9.4 minutes ran 0.94x of onnxruntime
fp32 where its untuned build ran 1.60x (AMD EPYC Zen 3, 2026-12-07). `--quant auto` measures its untuned and tuned
candidates and ships the faster; a run that names its scheme now does the same with two builds of that scheme: the
one before this tuning (default schedules, and what the target's database held before: tuning.defaults) and the
tuned one, in turns on the device (before, tuned, tuned, before), each at its best turn's p50. The tuning's records
stay in the database either way: a later, longer run starts from them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

# The turns, in order: a device whose speed drifts slows both builds alike (the A-B-B-A of pipeline.benchmark).
TURNS: tuple[Literal["before", "tuned"], ...] = ("before", "tuned", "tuned", "before")


class TuningCheck(BaseModel):
    """The tuned library and the build before this tuning, measured in turns on the device; the faster shipped."""

    model_config = ConfigDict(frozen=True)
    tuned_ms: list[float] = Field(description="The tuned library's p50 in each of its turns.")
    before_ms: list[float] = Field(description="The p50 of the build before this tuning (default schedules and the "
                                               "database's records before it), in each of its turns.")
    tuning: dict[str, Any] | None = Field(default=None, description="The tuning run (search.Tuning as a dict), "
                                          "whichever build shipped.")

    @computed_field  # in the result's JSON too
    @property
    def shipped(self) -> Literal["tuned", "before"]:
        """The tuned library ships unless the build before it was faster at its best turn (a tie keeps the tuned)."""
        return "before" if min(self.before_ms) < min(self.tuned_ms) else "tuned"

    def text(self) -> str:
        tuned, before = min(self.tuned_ms), min(self.before_ms)
        measured = (f"tuned library {tuned:.3f} ms against {before:.3f} ms for the build before this tuning (best "
                    f"of {len(self.tuned_ms)} turns each on the device)")
        if self.shipped == "tuned":
            return f"{measured}: the tuned one shipped"
        return (f"{measured}: the tuned library was slower and the build before it shipped; the trials stay in the "
                "tuning database (tune longer, or let --quant auto choose)")
