"""The `folio` command line: every command's parser, and nothing else."""

from folio.cli.main import ArgumentParser, main

__all__ = ["ArgumentParser", "main"]
