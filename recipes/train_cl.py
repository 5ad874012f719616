#!/usr/bin/env python
"""Continual learning with Prompt Gradient Projection.

    python recipes/train_cl.py                                  # the offline demo
    accelerate launch recipes/train_cl.py --recipe dualprompt_imr
    python recipes/train_cl.py --recipe l2p_cifar100_10 --no-pgp training.num_train_epochs=1
    python recipes/train_cl.py --recipe l2p_cifar100_10 --num_train_epochs 1 --per_device_train_batch_size 32
    python recipes/train_cl.py --list

Recipes are the YAML files next to this script (see README.md for the list and paper numbers).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("PGP_RECIPES_DIR", str(Path(__file__).resolve().parent))

from pgp_peft.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
