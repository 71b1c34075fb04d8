"""``python -m torch_pretrain_update`` runs the ``pretrain-update`` command line."""

import sys

from torch_pretrain_update.cli import main

sys.exit(main())
