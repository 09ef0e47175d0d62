"""Test settings shared by the whole suite.

Hypothesis profiles: ``ci`` (the default) turns off what depends on the
machine's speed, so a loaded 2-core machine gives the same verdicts as an
idle one: no per-example deadline and no "input generation is slow" health
check (timing belongs in bench/, not in tests). ``dev`` keeps Hypothesis'
defaults; choose it with ``HYPOTHESIS_PROFILE=dev``. Tests that name their
own ``suppress_health_check`` list also name ``too_slow`` for the same reason.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from pg import pg_url, private_pg  # noqa: E402,F401  (the PostgreSQL fixtures)
