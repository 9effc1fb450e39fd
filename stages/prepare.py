"""Stage `prepare`: decode the dataset once into uint8 arrays and fix the seeded search split.

All the work is in `nascore.pipeline.prepare`; params come from params.yaml.
"""
import sys

from nascore.cli import run_stage

if __name__ == "__main__":
    run_stage("prepare", sys.argv[1:])
