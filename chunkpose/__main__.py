"""``python -m chunkpose ...`` is the ``chunkpose`` command."""
import sys

from chunkpose.cli import main

if __name__ == "__main__":
    sys.exit(main())
