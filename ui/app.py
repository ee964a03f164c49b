"""The Gradio page comparing variants A and B: ``python ui/app.py --config demo`` (same as ``shoprank ui``).

The page itself is :mod:`shoprank.webui.page`; it talks to the Serve app over HTTP only.
"""

import sys

from shoprank.cli import main

if __name__ == "__main__":
    sys.exit(main(["ui", *sys.argv[1:]]))
