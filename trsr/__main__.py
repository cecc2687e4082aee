import sys

from trsr.cli import main

sys.exit(main())
