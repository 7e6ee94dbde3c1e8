"""`python -m selfimprove_workers TASK_JSON`: the entrypoint of every stage Job."""

import sys

from .runtime import main

if __name__ == "__main__":
    sys.exit(main())
