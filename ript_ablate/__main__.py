"""`python -m ript_ablate ...` runs the command line (what `torchrun -m ript_ablate` needs)."""

import sys

from ript_ablate.cli import main

sys.exit(main())
