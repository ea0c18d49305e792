"""`python -m vlmlab` runs the command line."""

import sys

from vlmlab.cli.main import main

sys.exit(main())
