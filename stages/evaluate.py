"""Stage `evaluate`: gather every stage's results into one summary, MLflow's parent run and the NB201 lookup.

All the work is in `nascore.pipeline.evaluate`; params come from params.yaml.
"""
import sys

from nascore.cli import run_stage

if __name__ == "__main__":
    run_stage("evaluate", sys.argv[1:])
