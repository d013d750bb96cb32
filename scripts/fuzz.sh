#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a few seconds each (default 10; `scripts/fuzz.sh 300` for
# longer). Uses cargo-fuzz on the stable toolchain without a sanitizer; installs the version
# this was tried with if it is missing or another (a newer one may change its flags or toolchain).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-10}
cargo_fuzz=0.13.2
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $cargo_fuzz" ]; then
  cargo install --locked --quiet --force "cargo-fuzz@$cargo_fuzz"
fi
targets=$(cargo fuzz list)
if [ -z "$targets" ]; then
  echo "fuzz: no targets listed" >&2
  exit 1
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for target in $targets; do
  echo "fuzz: $target for ${seconds}s"
  # -timeout: an input that takes this long is a finding (libFuzzer's default is 20 minutes).
  if cargo fuzz run --sanitizer none "$target" -- -max_total_time="$seconds" -timeout=10 >"$out" 2>&1; then
    tail -1 "$out"
  else
    # The panic and the input that caused it, which a CI machine does not keep.
    tail -60 "$out"
    exit 1
  fi
done
