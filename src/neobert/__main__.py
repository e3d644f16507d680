"""``python -m neobert`` (and ``torchrun -m neobert``) runs the command line."""

import sys

from neobert.cli import main

sys.exit(main())
