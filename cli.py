"""`python cli.py ...` and `torchrun cli.py ...` from a checkout: the CLI itself is `moon_rl/cli.py`.

Installed, the same CLI is the `moon-rl` console script and the module `moon_rl.cli` (`python -m moon_rl.cli`,
`accelerate launch -m moon_rl.cli ...`, `torchrun -m moon_rl.cli ...`); this file is not installed.
"""

import sys

from moon_rl.cli import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
