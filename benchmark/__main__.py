"""``python -m benchmark`` == ``fscl``."""
import sys

from benchmark.cli import main

sys.exit(main())
