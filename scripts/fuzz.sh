#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a few seconds each (default 10; `scripts/fuzz.sh 300` for
# longer). Uses cargo-fuzz on the stable toolchain without a sanitizer; installs it if missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-10}
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked --quiet cargo-fuzz
fi
for target in $(cargo fuzz list); do
  echo "fuzz: $target for ${seconds}s"
  cargo fuzz run --sanitizer none "$target" -- -max_total_time="$seconds" 2>&1 | tail -1
done
