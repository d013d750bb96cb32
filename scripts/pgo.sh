#!/usr/bin/env bash
# Builds Portcullis optimized with profiles of itself under load: target/pgo/bin/release/portcullis,
# with bare pingora built the same way beside it (target/pgo/bin/release/examples/pingora_floor),
# the floor to measure it against.
#
#   1. a release build that records what runs (target/pgo/train);
#   2. the load it records: one short round of bench/proxy.py (plain, signed-in and bearer routes,
#      HTTPS, HTTP/2, two threads; sign-in through the test IdP) and of bench/scim.py (SCIM
#      creates, lookups and group PATCHes);
#   3. llvm-profdata of rustc's LLVM merges the records (Debian's llvm-N: scripts/deps.sh pgo);
#   4. the release build again, laid out and inlined by the profile (profile-guided optimization,
#      target/pgo/<host>), linked with its relocations kept;
#   5. BOLT (Debian's bolt-N) lays out that linked binary again by a second profile: it adds
#      counters to a copy (target/pgo/bolt-train), which is given the same load, and then places
#      the hot code of every crate together, pingora's and the standard library's included,
#      which the compiler, one crate at a time, cannot (target/pgo/bin).
#
# About 20 to 25 min on 2 cores, more from nothing. To measure it: PORTCULLIS_BUILD=target/pgo/bin
# make bench (or bench/floor.py); bench/ab.py target target/pgo/bin [--route plain] sets it beside
# `cargo build --release`, and bench/ab.py target/pgo/<host> target/pgo/bin shows what step 5
# adds. Flags in RUSTFLAGS are kept (added to).
# Usage: scripts/pgo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

host=$(rustc -vV | sed -n 's/^host: //p')
llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
# Both name paths below (target/pgo/$host is removed): neither may be empty.
[ -n "$host" ] && [ -n "$llvm" ] || { echo "pgo.sh: rustc -vV names no host or LLVM" >&2; exit 1; }
# What an earlier run built goes first, so that a run that fails leaves no older build where the
# benchmarks would measure it as this one. (Step 4 builds from nothing anyway: cargo does not
# rebuild dependencies, pingora and tokio, when only the profile's contents changed.)
rm -rf "$root/target/pgo/bin" "$root/target/pgo/bolt-train" "$root/target/pgo/$host"

scripts/deps.sh pgo
make bench-deps
profdata=llvm-profdata-$llvm
bolt=llvm-bolt-$llvm
merge_fdata=merge-fdata-$llvm
for tool in "$profdata" "$bolt" "$merge_fdata"; do
  command -v "$tool" >/dev/null || { echo "pgo.sh: $tool is missing" >&2; exit 1; }
done

# build TARGET_DIR RUSTFLAGS: Portcullis and bare pingora, into TARGET_DIR/<host>/release (a
# build PORTCULLIS_BUILD and bench/ab.py take as TARGET_DIR/<host>). With --target the flags reach
# Portcullis and its dependencies, not the build scripts.
build() {
  RUSTFLAGS="${RUSTFLAGS:-} $2" CARGO_TARGET_DIR="$1" cargo build --release --target "$host" \
    -p portcullis --bin portcullis --example pingora_floor
}
# load BUILD: the training load, run by the build's binaries. Each process writes its record when
# it exits (the benches stop them with SIGTERM).
load() {
  PORTCULLIS_BUILD=$1 flock /tmp/bench.lock python3 bench/proxy.py --rounds 1 --duration 3 \
    >/dev/null
  PORTCULLIS_BUILD=$1 flock /tmp/bench.lock python3 bench/scim.py --rounds 1 --duration 2 \
    --users 101000 >/dev/null
}
# expect RECORDS_DIR PATTERN: at least one record per binary (Portcullis' and bare pingora's).
expect() {
  local name
  for name in portcullis pingora_floor; do
    compgen -G "$1/$name$2" >/dev/null ||
      { echo "pgo.sh: the load wrote no profile record of $name" >&2; exit 1; }
  done
}

# 1 to 3: the compiler's profile.
train=$root/target/pgo/train
records=$train/records
rm -rf "$records" "$train/bin"   # bin: a symlink earlier versions made
mkdir -p "$records"
build "$train" "-Cprofile-generate=$records"
load "$train/$host"
records_written=$(find "$records" -name '*.profraw' | wc -l)
if [ "$records_written" -lt 2 ]; then
  echo "pgo.sh: the load wrote $records_written profile records, not one per binary" >&2
  exit 1
fi
"$profdata" merge -o "$train/portcullis.profdata" "$records"

# 4: built again, from nothing (see above), with the relocations BOLT needs to move functions.
build "$root/target/pgo" "-Cprofile-use=$train/portcullis.profdata -Clink-arg=-Wl,--emit-relocs"
pgo=$root/target/pgo/$host/release

# 5: BOLT's profile, then its layout.
bolt_train=$root/target/pgo/bolt-train
mkdir -p "$bolt_train/release/examples" "$bolt_train/records"
for bin in portcullis examples/pingora_floor; do
  name=$(basename "$bin")
  "$bolt" "$pgo/$bin" -o "$bolt_train/release/$bin" -instrument \
    --instrumentation-file="$bolt_train/records/$name" --instrumentation-file-append-pid \
    >"$bolt_train/$name.instrument.log"
done
load "$bolt_train"
expect "$bolt_train/records" ".*.fdata"
out=$root/target/pgo/bin
mkdir -p "$out/release/examples"
for bin in portcullis examples/pingora_floor; do
  name=$(basename "$bin")
  "$merge_fdata" "$bolt_train/records/$name".*.fdata >"$bolt_train/$name.fdata" \
    2>"$bolt_train/$name.merge.log" ||
    { cat "$bolt_train/$name.merge.log" >&2; exit 1; }
  # Blocks by ext-TSP, functions by cache-directed sort, cold blocks split off, identical
  # functions folded where that is safe. BOLT drops the debug information it cannot rewrite. Its
  # log says how much of the profile matched.
  "$bolt" "$pgo/$bin" -o "$out/release/$bin" -data="$bolt_train/$name.fdata" \
    -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold \
    -split-eh -icf=safe -use-gnu-stack >"$bolt_train/$name.bolt.log"
done
echo "built target/pgo/bin/release/portcullis (and examples/pingora_floor); measure it with"
echo "  PORTCULLIS_BUILD=target/pgo/bin python3 bench/floor.py"
