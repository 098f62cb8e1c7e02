#!/usr/bin/env bash
# Reproduce the induction-head phase change (Olsson et al. 2022) on the embedded default data:
# 1-, 2- and 3-layer attention-only models x 3 seeds (9 runs, ~15 min on a laptop CPU), then the
# comparison report (figures, detected windows per run, summary.json, report.html).
#
#   scripts/reproduce_phase_change.sh [SWEEP_DIR] [extra Hydra overrides...]
#
# SWEEP_DIR defaults to multirun/phase_change_<date>_<time>; the report goes to SWEEP_DIR/report.
set -euo pipefail
cd "$(dirname "$0")/.."

SWEEP_DIR="${1:-multirun/phase_change_$(date +%Y-%m-%d_%H-%M-%S)}"
shift || true

uv run python -m train -m model.n_layers=1,2,3 seed=0,1,2 logger=none \
    "hydra.sweep.dir=${SWEEP_DIR}" "$@"
uv run python -m analysis "${SWEEP_DIR}" --out "${SWEEP_DIR}/report"
echo "open ${SWEEP_DIR}/report/report.html"
