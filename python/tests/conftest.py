"""pytest setup: the suite runs against the build tree (PYTHONPATH=build/<preset>/python)
or an installed package. Without the extension (or numpy and torch) nothing is collected, and
pytest exits with 5, which ctest reports as skipped."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # kvpeers, for spawned children

try:
    import kvferry  # noqa: F401
    import numpy  # noqa: F401
    import torch  # noqa: F401
except ImportError as e:  # the extension is not built or not on PYTHONPATH, or
    # python3-numpy / python3-torch are missing (scripts/install-deps.sh)
    sys.stderr.write(f"kvferry tests skipped: cannot import kvferry ({e})\n")
    collect_ignore_glob = ["test_*.py"]
