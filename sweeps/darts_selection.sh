#!/usr/bin/env bash
# DARTS' selection protocol (methods.md §2.1; ⚠ the counts are unconfirmed): search SEEDS times,
# train each derived cell from scratch for SHORT_EPOCHS, keep the one with the best retrained test
# accuracy (python -m stages.compare --select), then train that cell at the recipe's full length.
#
# The full training reruns the chosen seed's experiment with retrain.train.epochs=FINAL_EPOCHS:
# DVC's run cache restores its prepare, search and derive outputs, so only retrain and the stages
# after it run. Outputs: reports/NAME/selection.md (the ranking), selected_genotype.json (the
# chosen cell, usable as retrain.genotype), and the final experiment in `dvc exp show`.
#
# A GPU job: SEEDS searches, as many SHORT_EPOCHS retrains, one full retrain (600 epochs on
# CIFAR-10). Smoke test of the same protocol on a CPU (synthetic data, minutes):
#   PROFILE=smoke SEEDS=1,2 SHORT_EPOCHS=1 sweeps/darts_selection.sh
#
# Settings (environment):
#   METHOD         nascore method                    (darts_v2: the paper's second-order DARTS)
#   SPACE          search space                      (darts)
#   DATASET        dataset                           (cifar10)
#   SEEDS          comma-separated search seeds      (1,2,3,4)
#   SHORT_EPOCHS   retrain epochs of each candidate  (100)
#   FINAL_EPOCHS   retrain epochs of the chosen cell (auto: the recipe's, 600 on CIFAR-10)
#   UNTIL          last stage of the final run       (evaluate)
#   JOBS           candidates at a time              (1: one GPU)
#   PROFILE        full | smoke                      (full)
#   DATA           data.root                         (auto)
#   NAME           report name                       (selection)
#   EXTRA          more -S flags for every run, e.g. "-S search.backend=fused"
# Run from the project root's environment (dvc and python on PATH, e.g. . .venv/bin/activate).
set -euo pipefail
cd "$(dirname "$0")/.."

METHOD=${METHOD:-darts_v2}
SPACE=${SPACE:-darts}
DATASET=${DATASET:-cifar10}
SEEDS=${SEEDS:-1,2,3,4}
SHORT_EPOCHS=${SHORT_EPOCHS:-100}
FINAL_EPOCHS=${FINAL_EPOCHS:-auto}
UNTIL=${UNTIL:-evaluate}
JOBS=${JOBS:-1}
PROFILE=${PROFILE:-full}
DATA=${DATA:-auto}
NAME=${NAME:-selection}
read -r -a extra <<<"${EXTRA:-}"
common=(-S "method=$METHOD" -S "space=$SPACE" -S "dataset=$DATASET" -S "profile=$PROFILE"
        -S "data.root=$DATA" ${extra[@]+"${extra[@]}"})

wait_for_queue() {
  # Until no task is queued or running and no worker is left. A worker stops ~15 s after the queue
  # empties; a task queued before it has stopped can be taken by it and dropped, left "Running"
  # for ever (seen in CI: the final run queued right after the candidates). A task running with
  # no worker to run it is reported, not waited on.
  # (status captured first: `cmd | grep -q` under pipefail ends the loop early on SIGPIPE)
  local orphaned=0
  while status=$(dvc queue status); do
    if grep -qE 'Worker status: [1-9][0-9]* active|[1-9][0-9]* idle' <<<"$status"; then
      orphaned=0
    elif grep -qE '\bRunning\b' <<<"$status"; then
      orphaned=$((orphaned + 1))
      if [ "$orphaned" -ge 6 ]; then
        echo "$status" >&2
        echo "error: a DVC queue task is Running but no worker has been alive for a minute: the queue" \
             "lost it. Remove it (dvc queue kill / dvc queue remove) and run this script again." >&2
        exit 1
      fi
    elif ! grep -qE '\bQueued\b' <<<"$status"; then
      break
    fi
    sleep 10
  done
  echo "$status"
}

echo "== 1/3: $SEEDS searches of $METHOD, each cell retrained for $SHORT_EPOCHS epochs"
dvc exp run --queue "${common[@]}" -S "seed=$SEEDS" -S "retrain.train.epochs=$SHORT_EPOCHS" retrain
dvc queue start -j "$JOBS"
wait_for_queue

echo "== 2/3: selecting the best cell"
python -m stages.compare --name "$NAME" --method "$METHOD" --space "$SPACE" --dataset "$DATASET" \
  --profile "$PROFILE" --seed "$SEEDS" --param "retrain.train.epochs=$SHORT_EPOCHS" --select
best=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["chosen"]["seed"])' \
  "reports/$NAME/selection.json")

echo "== 3/3: the chosen cell (seed $best) trained in full (retrain.train.epochs=$FINAL_EPOCHS)"
dvc exp run --queue "${common[@]}" -S "seed=$best" -S "retrain.train.epochs=$FINAL_EPOCHS" "$UNTIL"
dvc queue start -j 1
wait_for_queue
echo "ranking: reports/$NAME/selection.md; chosen cell: reports/$NAME/selected_genotype.json; final run: dvc exp show"
