"""Baselines job: `python -m jobs.baselines --config jobs/configs/amazon_games.yaml [--set k=v]`.

Same as `trsr baselines`; runs on the Ray cluster named by RAY_ADDRESS (as under
`ray job submit`) or on a local Ray cluster it starts.
"""

import sys

from trsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["baselines", *sys.argv[1:]]))
