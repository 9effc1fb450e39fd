"""Stage `search`: run the configured method's architecture search (resumable).

All the work is in `nascore.pipeline.search`; params come from params.yaml.
"""
import sys

from nascore.cli import run_stage

if __name__ == "__main__":
    run_stage("search", sys.argv[1:])
