"""The `folio` command line: every command's parser, and nothing else."""

from folio.cli.main import main, run

__all__ = ["main", "run"]
