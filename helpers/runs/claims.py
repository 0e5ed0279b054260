"""Which of a notebook's checks are asserted where.

A notebook's checks are of two kinds. An integrity check says the pipeline did what it claims
(the store holds what the model wrote, a patch of a complete basis is the plain patch, an interval
holds its value): it holds for any model and any data, and the notebooks assert it everywhere.
A claim about the model or the data (the model solves IOI, an SAE recovers half the CE loss, the
residual norm grows with depth) was measured on one setting only: the embedded default model on
the Brown Corpus (`measured_here`). `claim` asserts such a claim there, and on any other model or
corpus prints its verdict (holds / does not hold) instead, so that a notebook runs to its end on
a model the claim was never measured on and still says what it found.
"""
from __future__ import annotations

from helpers.settings.profiles import EMBEDDED_MODEL

MEASURED_MODEL, MEASURED_CORPUS = EMBEDDED_MODEL, "brown"


def measured_here(profile) -> bool:
    """Whether `profile` runs the setting the notebooks' claims were measured on: the embedded
    default model on the Brown Corpus."""
    return profile.model == MEASURED_MODEL and profile.corpus == MEASURED_CORPUS


def claim(profile, holds, what: str, detail=None) -> bool:
    """Assert the claim `what` (true when `holds`) where it was measured (`measured_here`); elsewhere
    print whether it holds on this profile's model and corpus. `detail` (the measured values) goes
    into the message either way. Returns whether it holds."""
    holds = bool(holds)
    extra = "" if detail is None else f" ({detail})"
    if measured_here(profile):
        assert holds, f"{what}: does not hold{extra}"
    else:
        verdict = "holds" if holds else "does not hold"
        print(f"claim {verdict} on {profile.model} / {profile.corpus}: {what}{extra}")
    return holds
