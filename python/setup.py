"""Builds and installs the kvferry Python package from this source tree.

    cd python && /usr/bin/python3 -m pip install --no-build-isolation .

works offline with Debian's python3-setuptools and python3-pybind11: the
extension is built by the project's CMake (the library and kvferry._kvferry
only; no tests), with the interpreter running this script. KVFERRY_BUILD_JOBS
sets the parallelism (default 2); CMAKE_ARGS adds options.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not (ROOT / "CMakeLists.txt").exists():
            raise RuntimeError(f"{ROOT} is not the kvferry source tree: build from a checkout")
        out = pathlib.Path(self.get_ext_fullpath(ext.name)).resolve()
        build = pathlib.Path(self.build_temp).resolve() / "cmake"
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build),
            "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
            "-DKVFERRY_BUILD_TESTS=OFF", "-DKVFERRY_BUILD_BENCHMARKS=OFF",
            "-DKVFERRY_BUILD_EXAMPLES=OFF", "-DKVFERRY_PYTHON=ON",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(build), "--target", "_kvferry",
                               "-j", os.environ.get("KVFERRY_BUILD_JOBS", "2")])
        built = sorted((build / "python" / "kvferry").glob("_kvferry*.so"))
        if not built:
            raise RuntimeError(f"the build left no _kvferry*.so in {build / 'python' / 'kvferry'}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], out)


setup(
    name="kvferry",
    version="0.1.0",
    description="Move paged KV-cache blocks between LLM serving processes (UCX)",
    packages=["kvferry"],
    ext_modules=[CMakeExtension("kvferry._kvferry")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    zip_safe=False,
)
