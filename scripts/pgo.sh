#!/usr/bin/env bash
# Builds Portcullis optimized with a profile of itself under load (profile-guided optimization):
# target/pgo/bin/release/portcullis, with bare pingora built from the same profile beside it
# (target/pgo/bin/release/examples/pingora_floor), the floor to measure it against.
#
#   1. a release build that records what runs (target/pgo/train);
#   2. the load it records: one short round of bench/proxy.py (plain, signed-in and bearer routes,
#      HTTPS, HTTP/2, two threads; sign-in through the test IdP) and of bench/scim.py (SCIM
#      creates, lookups and group PATCHes);
#   3. llvm-profdata of rustc's LLVM merges the records (Debian's llvm-N: scripts/deps.sh pgo);
#   4. the release build again, laid out and inlined by the profile (target/pgo).
#
# About 22 min on 2 cores. To measure it: PORTCULLIS_BUILD=target/pgo/bin make bench (or
# bench/floor.py); bench/ab.py target target/pgo/bin [--route plain] sets it beside
# `cargo build --release`. Flags in RUSTFLAGS are kept (added to).
# Usage: scripts/pgo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/deps.sh pgo
make bench-deps

host=$(rustc -vV | sed -n 's/^host: //p')
profdata=llvm-profdata-$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
command -v "$profdata" >/dev/null || { echo "pgo.sh: $profdata is missing" >&2; exit 1; }

# build TARGET_DIR RUSTFLAGS: Portcullis and bare pingora, reachable as TARGET_DIR/bin/release/...
# (what PORTCULLIS_BUILD and bench/ab.py expect). With --target the flags reach Portcullis and its
# dependencies, not the build scripts.
build() {
  RUSTFLAGS="${RUSTFLAGS:-} $2" CARGO_TARGET_DIR="$1" cargo build --release --target "$host" \
    -p portcullis --bin portcullis --example pingora_floor
  ln -sfn "$host" "$1/bin"
}

train=$root/target/pgo/train
records=$train/records
rm -rf "$records"
mkdir -p "$records"
build "$train" "-Cprofile-generate=$records"

# Each process writes its record when it exits (the benches stop them with SIGTERM): one file
# per binary, Portcullis' and bare pingora's.
export PORTCULLIS_BUILD=$train/bin
flock /tmp/bench.lock python3 bench/proxy.py --rounds 1 --duration 3 >/dev/null
flock /tmp/bench.lock python3 bench/scim.py --rounds 1 --duration 2 --users 101000 >/dev/null
unset PORTCULLIS_BUILD
records_written=$(find "$records" -name '*.profraw' | wc -l)
if [ "$records_written" -lt 2 ]; then
  echo "pgo.sh: the load wrote $records_written profile records, not one per binary" >&2
  exit 1
fi
"$profdata" merge -o "$train/portcullis.profdata" "$records"

# Built again from nothing: cargo does not rebuild dependencies (pingora, tokio) when only the
# profile's contents changed.
rm -rf "$root/target/pgo/$host"
build "$root/target/pgo" "-Cprofile-use=$train/portcullis.profdata"
echo "built target/pgo/bin/release/portcullis (and examples/pingora_floor); measure it with"
echo "  PORTCULLIS_BUILD=target/pgo/bin python3 bench/floor.py"
