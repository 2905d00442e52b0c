"""The command line (`r1jax ...`): argument parsing, logging set-up and one-line errors. Library modules keep
plain functions a notebook can call; nothing in the library imports this package."""

from r1jax.cli.common import EXIT
from r1jax.cli.parser import main

__all__ = ["EXIT", "main"]
