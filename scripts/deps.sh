#!/usr/bin/env bash
# Installs the system packages Portcullis needs to build, test and benchmark, if missing.
# Usage: scripts/deps.sh [build|demo|test|bench|pgo]   (each level includes the ones before it)
set -euo pipefail

level=${1:-build}
# cmake with make (the generator it uses; a recommendation, which --no-install-recommends drops)
# and gcc with libc6-dev (its C library's headers and start files, also only a recommendation):
# crates that build C (pingora's zlib-ng, ring), and the linker's own start files
want=(cmake make gcc libc6-dev)
browser=(chromium chromium-driver)   # the sign-in tests drive a real headless Chromium
case "$level" in
  # postgresql: the replicas tests make their own cluster; nginx: a load balancer in front;
  # libnss-wrapper: a hosts file of the test's own, for an upstream name that moves to a new address
  # g++: libfuzzer-sys (scripts/fuzz.sh) compiles libFuzzer's C++
  test) want+=("${browser[@]}" postgresql nginx-light libnss-wrapper g++) ;;
  # linux-perf: the profile part and `bench/floor.py --profile` record with `perf`;
  # valgrind: `bench/instructions.py` counts instructions per request with callgrind
  bench|pgo) want+=("${browser[@]}" postgresql nginx-light libnss-wrapper g++ wrk apache2 libapache2-mod-auth-openidc nghttp2-client linux-perf valgrind) ;;
  build|demo) ;;
  *) echo "usage: $0 [build|demo|test|bench|pgo]" >&2; exit 2 ;;
esac
# pgo (scripts/pgo.sh): the llvm-profdata of rustc's own LLVM, the only one that reads its profiles,
# and BOLT of the same LLVM, which lays the linked binary out again
if [ "$level" = pgo ]; then
  llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
  want+=("llvm-$llvm" "bolt-$llvm")
fi

# The SCIM conformance tester (test) and scim2-server (bench) run in venvs: Debian's own python3
# needs python3-venv for that (a python3 built elsewhere, e.g. pyenv, has it built in).
if [ "$level" != build ] && [ "$level" != demo ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  want+=(python3-venv)
fi
# The demo's IdP set-up, sample upstream and agent are Python scripts.
if [ "$level" != build ] && ! command -v python3 >/dev/null; then
  want+=(python3)
fi

missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "run as root, or install sudo, to install: ${missing[*]}" >&2; exit 1; }
    sudo_cmd=(sudo)
  fi
  # `env`: sudo drops DEBIAN_FRONTEND from the environment. The lock timeout: on a fresh
  # machine unattended-upgrades often holds dpkg's lock for a while (and apt-daily the package
  # lists' lock, which that timeout does not cover: `update` is tried again).
  apt=("${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
  for try in $(seq 30); do
    "${apt[@]}" update -qq && break
    [ "$try" -lt 30 ] || { echo "apt-get update kept failing" >&2; exit 1; }
    echo "apt-get update failed (its lists locked by apt-daily?); again in 10 s" >&2
    sleep 10
  done
  "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The demo and the sign-in tests run a real OpenID provider (tests/idp, oidc-provider) under
# Node.js 20+; they run `npm ci` there themselves on first use. Debian 12's own nodejs (18) is too
# old for it, so it is not installed here: the README asks for Node.js 20+ beside Rust.
if [ "$level" != build ]; then
  node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
  if [ "$node_major" -lt 20 ] || ! command -v npm >/dev/null; then
    echo "Node.js 20+ with npm is needed for the test IdP (found: $(node --version 2>/dev/null || echo none))" >&2
    exit 1
  fi
fi
