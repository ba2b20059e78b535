"""bench/python_bench.py runs (a short run) and prints every figure it
promises, each positive. Figures are not judged here: the bench's own
output compares Python with the C++ baseline of the same run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import kvferry

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "python_bench.py"
# PYTHONPATH=build/<preset>/python: the baseline is built in build/<preset>/bench.
# (abspath, not resolve: the package's files are links into the source tree.)
BASELINE = (pathlib.Path(os.path.abspath(kvferry.__file__)).parents[2] / "bench" /
            "kvferry_binding_baseline")


@pytest.mark.skipif(not os.access(BASELINE, os.X_OK),
                    reason=f"{BASELINE} is not built (KVFERRY_BUILD_BENCHMARKS off)")
def test_a_short_run_prints_every_figure_positive():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, str(SCRIPT), "--seconds", "0.2", "--rounds", "2",
                          "--baseline", str(BASELINE)],
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    median = report["median"]
    for key in ("post_64_us", "post_64_cpu_us", "loop_256k_gbps",
                "poll_notifications_empty_us", "nixl_get_new_notifs_empty_us"):
        assert median["python"][key] > 0, key
    for key in ("post_64_us", "post_64_cpu_us", "post_64_after_10us_gap_us", "loop_256k_gbps",
                "poll_notifications_empty_us"):
        assert median["cpp"][key] > 0, key
    for key in ("post_64_python_over_cpp", "post_64_cpu_python_over_cpp",
                "loop_256k_python_over_cpp"):
        assert report["ratio"][key] > 0, key
    for key in ("post_64_python_over_cpp", "loop_256k_python_over_cpp"):
        assert report["ratio_median_of_rounds"][key] > 0, key
    assert set(report["targets"]) == {"post_64_ratio_at_most_2", "loop_256k_ratio_at_least_0_9",
                                      "nixl_get_new_notifs_under_2us"}
    assert len(report["rounds_detail"]) == 2
    assert report["nproc"] >= 1
    assert report["data_path"]


def test_a_bad_baseline_path_is_refused_naming_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    missing = tmp_path / "no_such_binary"
    out = subprocess.run([sys.executable, str(SCRIPT), "--baseline", str(missing)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert str(missing) in out.stderr
