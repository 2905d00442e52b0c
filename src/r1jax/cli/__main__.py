"""`python -m r1jax.cli ...` (the launchers use it): the same as the `r1jax` script."""

import sys

from r1jax.cli.parser import main

sys.exit(main())
