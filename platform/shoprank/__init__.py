"""shoprank: train and serve e-commerce search and recommendation models on Ray.

Nothing runs at import time: every submodule is safe to import on any Ray worker.
"""

__version__ = "0.1.0"
