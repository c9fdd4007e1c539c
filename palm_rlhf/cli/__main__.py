"""`python -m palm_rlhf.cli`."""

import sys

from . import main

sys.exit(main())
