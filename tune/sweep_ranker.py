"""Sweep the XGBoost ranker (depth, eta, subsample, colsample, rounds, objective) with Ray Tune:

    python tune/sweep_ranker.py --config demo --num-samples 8
    ray job submit --working-dir . -- python tune/sweep_ranker.py --config cluster --num-samples 32
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep import main  # noqa: E402

if __name__ == "__main__":
    main("ranker", __doc__)
