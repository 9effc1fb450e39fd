"""Stage `transfer_imagenet`: train the cell's ImageNet mobile network, or record that it was skipped.

All the work is in `nascore.pipeline.transfer_imagenet`; params come from params.yaml.
"""
import sys

from nascore.cli import run_stage

if __name__ == "__main__":
    run_stage("transfer_imagenet", sys.argv[1:])
