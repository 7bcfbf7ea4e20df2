"""`python -m folio` (and `torchrun -m folio train ...`)."""

import sys

from folio.cli import main

sys.exit(main())
