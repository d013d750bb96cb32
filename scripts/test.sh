#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: formatting, lints, every shipped example config,
# unit tests, the end-to-end tests against real peers, and the scim2-tester conformance suite.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh test
# A Rust installed with rustup's minimal profile has neither.
if command -v rustup >/dev/null; then
  installed=$(rustup component list --installed)
  for component in rustfmt clippy; do
    grep -q "^$component" <<<"$installed" || rustup component add "$component"
  done
fi

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build"
cargo build -p portcullis
# Where cargo builds (`CARGO_TARGET_DIR` or a `build.target-dir` may put it outside target/).
target=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
echo "== check-config examples/"
for file in examples/*.toml; do
  echo "$file"
  "$target/debug/portcullis" check-config "$file"
done
echo "== tests"
cargo test --workspace -- --test-threads=2
echo "== fuzz targets (a few seconds each)"
scripts/fuzz.sh 10
echo "== SCIM conformance (scim2-tester)"
scripts/scim-conformance.sh "$target/debug/portcullis"
echo "== SCIM conformance (scim2-tester), the directory in PostgreSQL"
scripts/with-postgres.sh scripts/scim-conformance.sh "$target/debug/portcullis" --postgres
