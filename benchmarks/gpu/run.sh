#!/usr/bin/env bash
# The GPU node check: the ONE command to run on a lent GPU node (see benchmarks/gpu/README.md).
# Installs the carried wheels (benchmarks/gpu/wheels) into a temporary folder, then runs every step
# within 9 minutes; results land in $OUT (the device tool returns that folder), else a temporary one.
# Extra arguments go to `python -m benchmarks.gpu.run`, e.g. --only node --budget 300.
set -uo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" -m benchmarks.gpu.run --wheels benchmarks/gpu/wheels "$@"
