"""``python -m glauber ...`` is the ``glauber`` command (used where the console script is not on PATH: srun, torchrun)."""

import sys

from glauber.commands.cli import main

sys.exit(main())
