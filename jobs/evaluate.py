"""Evaluate job: `python -m jobs.evaluate --config jobs/configs/demo.yaml [--set k=v]`.

Same as `trsr evaluate`; runs on the Ray cluster named by RAY_ADDRESS (as under
`ray job submit`) or on a local Ray cluster it starts.
"""

import sys

from trsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
