"""Sweep the encoder fine-tuning (learning rate, LoRA r and alpha, temperature, hard negatives,
epochs) with Ray Tune:

    python tune/sweep_encoder.py --config demo --num-samples 6
    ray job submit --working-dir . -- python tune/sweep_encoder.py --config cluster --num-samples 24
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep import main  # noqa: E402

if __name__ == "__main__":
    main("encoder", __doc__)
