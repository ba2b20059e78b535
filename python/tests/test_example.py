"""docs/python.md's two-process example is examples/python/two_process.py
verbatim, and it runs."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "python" / "two_process.py"


def test_docs_embed_the_example_verbatim():
    docs = (ROOT / "docs" / "python.md").read_text()
    marker = "<!-- example: examples/python/two_process.py -->\n```python\n"
    assert marker in docs
    block = docs.split(marker, 1)[1].split("\n```\n", 1)[0] + "\n"
    assert block == EXAMPLE.read_text()


def test_the_two_process_example_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr
    assert "decode pulled blocks 5, 6, 7" in out.stdout
