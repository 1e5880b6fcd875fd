"""Hypothesis profiles for the fuzz targets: a short one for the suite, a long one for ``./dev.sh fuzz``.

Every fuzz test is decorated with :data:`fuzz_settings`, the profile named by
``$HYPOTHESIS_PROFILE`` (default ``ci``). The profile is applied per test, not
loaded globally, so the rest of the suite keeps Hypothesis' own defaults.

* ``ci``: :data:`CI_EXAMPLES` examples per target, derandomized (the same
  examples on every run, so the suite never flakes on a new random draw).
* ``long``: :data:`LONG_EXAMPLES` examples per target (``$KMUX_FUZZ_EXAMPLES``
  overrides it), freshly random each run.

Neither has a deadline: timings on a loaded 2-core machine mean nothing.
Neither writes an example database; a failure prints its falsifying example
(and a ``@reproduce_failure`` blob), which is what goes into a regression test.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

#: Environment variable that picks the profile.
PROFILE_ENV = "HYPOTHESIS_PROFILE"
#: Environment variable that overrides the long profile's example count.
EXAMPLES_ENV = "KMUX_FUZZ_EXAMPLES"
#: Examples per target in the normal test suite (all targets together stay well under 20 s).
CI_EXAMPLES = 100
#: Examples per target in the long run (the issue asks for at least 100,000).
LONG_EXAMPLES = 100_000

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    # Slow draws are the machine's load, not a test problem.
    suppress_health_check=[HealthCheck.too_slow],
)

settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, **_COMMON)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get(EXAMPLES_ENV, LONG_EXAMPLES)),
    **_COMMON,
)

PROFILE = os.environ.get(PROFILE_ENV, "ci")
#: The decorator every fuzz test carries.
fuzz_settings = settings.get_profile(PROFILE)
