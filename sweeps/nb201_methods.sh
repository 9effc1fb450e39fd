#!/usr/bin/env bash
# NB201: darts, rf_darts, single_darts, opp_darts x 3 seeds on real CIFAR-10 (or DATASET), each derived cell
# looked up in the NB201 accuracy table; then one comparison report (reports/nb201_methods/).
#
# A GPU job: 12 searches of 50 epochs (+ the NB201 retrain protocol, 200 epochs per cell, unless
# RETRAIN_EPOCHS says otherwise: the benchmark lookup does not need it). Smoke test of the same
# sweep on a CPU (synthetic data, minutes): PROFILE=smoke JOBS=2 sweeps/nb201_methods.sh
#
# Settings (environment):
#   METHODS         comma-separated nascore methods  (darts,rf_darts,single_darts,opp_darts)
#   SEEDS           comma-separated seeds            (1,2,3)
#   JOBS            experiments at a time            (1: one GPU; >2 wants an MLflow server, README)
#   PROFILE         full | smoke                     (full)
#   DATASET         cifar10 | cifar100 | imagenet16_120 (cifar10)
#   DATA            data.root                        (cifar10: ../shared/data/cifar10-jpeg.tar.gz, else auto)
#   TABLE           evaluate.nb201_table             (../shared/data/nb201-accuracy.csv)
#   RETRAIN_EPOCHS  retrain.train.epochs             (auto: the NB201 protocol's 200)
#   UNTIL           last stage to run: derive (search only) | evaluate (everything)   (evaluate)
#   NAME            report name                      (nb201_methods)
#   NO_WAIT=1       only queue and start the workers; run `python -m stages.compare` yourself later
# Run from the project root's environment (dvc and python on PATH, e.g. . .venv/bin/activate).
set -euo pipefail
cd "$(dirname "$0")/.."

METHODS=${METHODS:-darts,rf_darts,single_darts,opp_darts}
SEEDS=${SEEDS:-1,2,3}
JOBS=${JOBS:-1}
PROFILE=${PROFILE:-full}
DATASET=${DATASET:-cifar10}
if [ "$DATASET" = cifar10 ]; then DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}; else DATA=${DATA:-auto}; fi
TABLE=${TABLE:-../shared/data/nb201-accuracy.csv}
RETRAIN_EPOCHS=${RETRAIN_EPOCHS:-auto}
UNTIL=${UNTIL:-evaluate}
NAME=${NAME:-nb201_methods}

# `-S key=a,b` queues one experiment per value; two such flags queue the grid (DVC >= 3).
dvc exp run --queue \
  -S space=nb201 -S "dataset=$DATASET" -S "profile=$PROFILE" \
  -S "method=$METHODS" -S "seed=$SEEDS" \
  -S "data.root=$DATA" -S "evaluate.nb201_table=$TABLE" -S "retrain.train.epochs=$RETRAIN_EPOCHS" \
  "$UNTIL"
dvc queue start -j "$JOBS"
[ "${NO_WAIT:-0}" = 1 ] && { echo "queued; follow with: dvc queue status; dvc queue logs <name>"; exit 0; }

# (status captured first: `cmd | grep -q` under pipefail ends the loop early on SIGPIPE)
while status=$(dvc queue status) && grep -qE '\b(Queued|Running)\b' <<<"$status"; do sleep 30; done
echo "$status"
python -m stages.compare --name "$NAME" --space nb201 --dataset "$DATASET" --profile "$PROFILE" \
  --method "$METHODS" --seed "$SEEDS" --nb201-table "$TABLE"
echo "report: reports/$NAME/report.md"
