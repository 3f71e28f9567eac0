"""`python -m spacetime ...` (and `torchrun -m spacetime train dit ...`): the `spacetime` command."""

import sys

from spacetime.cli import entry

sys.exit(entry())
