"""Convert checkpoints: HF safetensors directory <-> Megatron dist checkpoint, at any TP/PP.

The same command as `megatron-fipo convert`. Run it with TP x PP ranks:

    torchrun --nproc-per-node 4 tools/convert_checkpoint.py --to megatron HF_DIR MCORE_DIR --tp 2 --pp 2
    torchrun --nproc-per-node 2 tools/convert_checkpoint.py --to hf MCORE_DIR HF_OUT --tp 2
    python tools/convert_checkpoint.py --to megatron HF_DIR --dry-run --tp 8   # the mapping; loads no weights

MCORE_DIR loads in the trainer with actor.load_megatron=MCORE_DIR at any layout. --to hf also takes
a run's checkpoints directory (its newest step) with --hf-config pointing at the model's HF directory.
"""

import sys

from megatron_fipo.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
