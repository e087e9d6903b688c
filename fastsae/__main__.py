"""`python -m fastsae ...`: the `fastsae` command, also as `torchrun -m fastsae train CONFIG`."""

import sys

from fastsae.cli import main

sys.exit(main())
