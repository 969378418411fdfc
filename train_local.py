"""Train locally (CPU, CUDA or MPS): the seed's command, same as `slm train`.

    python train_local.py --config configs/tiny.yaml --no-wandb --device cpu
    torchrun --standalone --nproc_per_node=2 train_local.py --config configs/tiny.yaml
"""

import sys

from src.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
