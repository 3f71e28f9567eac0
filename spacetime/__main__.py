"""`python -m spacetime ...` (and `torchrun -m spacetime train dit ...`): the `spacetime` command."""

import sys

from spacetime.cli import main

sys.exit(main())
