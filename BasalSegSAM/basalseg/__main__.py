"""``python -m basalseg`` runs the command line (:mod:`basalseg.commands`)."""

import sys

from .commands import main

sys.exit(main())
