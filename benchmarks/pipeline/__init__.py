"""The pipeline measurements of `python -m benchmarks.run` (issue 6), one module per measurement
(defaults, stages, wav2lip, rss, second, scaling, node), each a `bench_<name>(ctx)` function, with the
helpers they share in `common`. The runner (benchmarks/run.py) parses the options, runs the chosen
measurements in order and prints the target summary."""

import os

# Ray reads the auth mode at import: set it before any of these modules imports ray (as the tests do).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
