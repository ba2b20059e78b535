"""pytest setup: the suite runs against the build tree (PYTHONPATH=build/<preset>/python)
or an installed package; without the extension it is skipped, not failed."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # kvpeers, for spawned children

kvferry = pytest.importorskip("kvferry", reason="the kvferry extension is not built")
