"""`python -m tfpar` runs the `tfpar` command line."""

import sys

from tfpar.cli import main

sys.exit(main())
