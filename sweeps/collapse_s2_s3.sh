#!/usr/bin/env bash
# The RobustDARTS collapse study on S2 ({skip, sep3}) and S3 ({none, skip, sep3}): plain DARTS
# against the cures (rf_darts, single_darts, opp_darts), 3 seeds each, CIFAR-10; then one report
# (reports/collapse_s2_s3/) whose "Collapse" section states, from the derived cells, whether
# plain DARTS drifted to skip_connect and whether the cures did not.
#
# By default the pipeline stops after `derive` (UNTIL=derive): the collapse shows in the searched
# cells, and retraining 24 cells for 600 epochs each is a far bigger job than the 24 searches.
# UNTIL=evaluate also retrains them (for the RobustDARTS error table, methods.md §3).
# CPU smoke test (synthetic data, minutes): PROFILE=smoke JOBS=2 SEEDS=1 sweeps/collapse_s2_s3.sh
#
# Settings (environment): METHODS (darts,rf_darts,single_darts,opp_darts), SPACES (s2,s3),
# SEEDS (1,2,3), DATASET (cifar10), JOBS (1), PROFILE (full), DATA (auto: the shared CIFAR-10
# archive for cifar10), UNTIL (derive), NAME (collapse_s2_s3), NO_WAIT=1 (queue only).
# Run from the project root's environment (dvc and python on PATH, e.g. . .venv/bin/activate).
set -euo pipefail
cd "$(dirname "$0")/.."

METHODS=${METHODS:-darts,rf_darts,single_darts,opp_darts}
SPACES=${SPACES:-s2,s3}
SEEDS=${SEEDS:-1,2,3}
DATASET=${DATASET:-cifar10}
JOBS=${JOBS:-1}
PROFILE=${PROFILE:-full}
DATA=${DATA:-auto}
UNTIL=${UNTIL:-derive}
NAME=${NAME:-collapse_s2_s3}

dvc exp run --queue \
  -S "space=$SPACES" -S "dataset=$DATASET" -S "profile=$PROFILE" \
  -S "method=$METHODS" -S "seed=$SEEDS" -S "data.root=$DATA" \
  "$UNTIL"
dvc queue start -j "$JOBS"
[ "${NO_WAIT:-0}" = 1 ] && { echo "queued; follow with: dvc queue status; dvc queue logs <name>"; exit 0; }

# (status captured first: `cmd | grep -q` under pipefail ends the loop early on SIGPIPE)
while status=$(dvc queue status) && grep -qE '\b(Queued|Running)\b' <<<"$status"; do sleep 30; done
echo "$status"
python -m stages.compare --name "$NAME" --space "$SPACES" --dataset "$DATASET" --profile "$PROFILE" \
  --method "$METHODS" --seed "$SEEDS"
echo "report: reports/$NAME/report.md"
