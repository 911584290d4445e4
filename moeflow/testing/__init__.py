"""moeflow.testing: the conformance kit for scheduler plugins.

    from moeflow.testing import check_scheduler
    check_scheduler(MyScheduler)

Hypothesis profiles: `dev` (quick), `ci` (derandomized, more examples) and `nightly`
(thorough), chosen by the MOEFLOW_HYPOTHESIS_PROFILE environment variable (default `dev`).
The strategies in `moeflow.testing.strategies` and the semantics state machine in
`moeflow.testing.machine` are reusable in a plugin's own tests.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_VARIABLE = "MOEFLOW_HYPOTHESIS_PROFILE"
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=_SLOW)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=_SLOW, print_blob=True)
settings.register_profile("nightly", max_examples=1000, deadline=None,
                          suppress_health_check=_SLOW)


def load_profile(name: str | None = None) -> str:
    """Activate a profile (by default the one MOEFLOW_HYPOTHESIS_PROFILE names)."""
    chosen = name or os.environ.get(PROFILE_VARIABLE, "dev")
    settings.load_profile(chosen)
    return chosen


load_profile()

from moeflow.testing.conformance import ConformanceError, check_scheduler  # noqa: E402

__all__ = ["ConformanceError", "PROFILE_VARIABLE", "check_scheduler", "load_profile"]
