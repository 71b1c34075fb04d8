"""``python -m torch_pretrain_update`` runs the ``pretrain-update`` command line."""

import sys

from torch_pretrain_update.cli import main

if __name__ == "__main__":  # spawned worker processes import this module under another name
    sys.exit(main())
