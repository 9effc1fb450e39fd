"""Stage `retrain`: train the derived cell from scratch and test it (torchrun for several GPUs).

All the work is in `nascore.pipeline.retrain`; params come from params.yaml.
"""
import sys

from nascore.cli import run_stage

if __name__ == "__main__":
    run_stage("retrain", sys.argv[1:])
