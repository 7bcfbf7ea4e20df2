"""`python -m folio` (and `torchrun -m folio train ...`)."""

from folio.cli import run

run()
