"""Pipeline job: `python -m jobs.pipeline --config jobs/configs/demo.yaml [--set k=v]`.

Same as `trsr run`: every stage of the experiment into its run folder.
"""

import sys

from trsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
