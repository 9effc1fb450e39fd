"""Stage `derive`: derive the discrete cell from the final alphas, draw it, plot alpha.

All the work is in `nascore.pipeline.derive`; params come from params.yaml.
"""
import sys

from nascore.cli import run_stage

if __name__ == "__main__":
    run_stage("derive", sys.argv[1:])
