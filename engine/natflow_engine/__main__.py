"""`python -m natflow_engine` is the `natflow` command line."""

import sys

from ._cli import main

sys.exit(main())
