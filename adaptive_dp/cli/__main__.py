"""``python -m adaptive_dp.cli`` (e.g. under ``torchrun``): the ``adaptive-dp`` console script."""

import sys

from adaptive_dp.cli import main

sys.exit(main())
