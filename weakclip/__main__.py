"""``python -m weakclip`` (what ``torchrun --nproc_per_node N -m weakclip train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
