"""``python -m tinyserve_patch.eval`` / ``accelerate launch -m tinyserve_patch.eval``: see :mod:`.cli`."""

import sys

from .cli import main

sys.exit(main())
