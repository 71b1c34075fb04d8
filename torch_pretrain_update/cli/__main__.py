"""``python -m torch_pretrain_update.cli`` runs the ``pretrain-update`` command line."""

import sys

from torch_pretrain_update.cli import main

if __name__ == "__main__":
    sys.exit(main())
