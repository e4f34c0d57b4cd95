"""``python -m medge`` runs the ``medge`` command line."""

import sys

from .cli.main import main

sys.exit(main())
