"""Run an experiment on a Ray cluster: the entry point for

    ray submit cluster.yaml experiments/submit.py -- experiments/domainbed/pacs.yaml [--resume ...]

`ray submit` copies only this file to the head node; the package and the experiment configs
reach every node through cluster.yaml's file_mounts and setup_commands. The driver attaches to
the running cluster (`ray.init(address="auto")`), so the trials run on the GPU workers.
"""

import os
import sys

from ratatouille.cli.main import main

if __name__ == "__main__":
    os.environ.setdefault("RAY_ADDRESS", "auto")
    sys.exit(main(["run", *sys.argv[1:]]))
