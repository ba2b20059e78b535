#!/usr/bin/env bash
# Installs everything kvferry needs to build, test and benchmark, from Debian 12.
# Safe to run again; skips apt when every package is already installed.
set -euo pipefail
packages=(
  cmake ninja-build g++ pkg-config ccache
  libucx-dev ucx-utils            # UCX 1.13 and ucx_perftest (the baseline)
  libabsl-dev libboost-dev        # abseil; Boost.Intrusive and intrusive_ptr
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev              # JSON output of the tools
  libcpp-httplib-dev              # the optional /metrics endpoint
  libssl-dev                      # HMAC-SHA256 of the control handshake (libcrypto)
  clang libclang-rt-14-dev        # libFuzzer and the -Wthread-safety build
  iproute2                        # network namespaces for the two-host tests
  etcd-server                     # /usr/bin/etcd for the directory tests
  prometheus                      # promtool: the alert rules' tests, /metrics checks
  python3-dev pybind11-dev python3-pybind11  # the Python package's extension (python/)
  python3-numpy python3-torch python3-pytest # its tensors and its test suite
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
