"""Pretrain the tiny ViT backbone on data disjoint from the benchmarks (CIFAR-10).

The CPU benchmarks use the backbone shipped with pgp_peft, `pgp_peft:vit-tiny-patch4-32-cifar10`,
which was produced by the training script shipped next to it
(`src/pgp_peft/demo_data/vit-tiny-patch4-32-cifar10/train_backbone.py`; recipe, log and wall time in
its README.md and training_summary.json: 10 epochs, ~35 min on 2 CPU cores, 55.9 % CIFAR-10 top-1).
`run_all.sh` does not retrain it; this wrapper runs that very script, so the backbone can be rebuilt
(or a stronger one trained with more epochs) from `benchmarks/`:

    python benchmarks/pretrain_backbone.py --data cifar10.npz --out /tmp/vit-tiny --epochs 10 --log train.log

CIFAR-10 is not reachable offline here; `--data` takes an .npz (x_train, y_train, x_test, y_test) or
a `train/<class>/*.jpg`, `test/<class>/*.jpg` folder (see the script's --help). Load the result with
`ViTModel.from_pretrained(out, add_pooling_layer=False)` and pass it where `common.shipped_backbone()`
is used.
"""

from __future__ import annotations

import runpy
import sys
from importlib import resources

if __name__ == "__main__":
    script = resources.files("pgp_peft").joinpath(
        "demo_data", "vit-tiny-patch4-32-cifar10", "train_backbone.py"
    )
    with resources.as_file(script) as path:
        sys.argv[0] = str(path)
        runpy.run_path(str(path), run_name="__main__")
