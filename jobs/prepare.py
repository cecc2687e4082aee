"""Prepare job: `python -m jobs.prepare --config jobs/configs/demo.yaml [--set k=v]`.

Same as `trsr data prepare`; see `python -m jobs.prepare --help`.
"""

import sys

from trsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
