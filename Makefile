# Benchmarks only; building and testing use cargo directly (see README.md).
#
#   make bench            the whole suite: writes bench/results/<date>.md and .svg (~30 min)
#   make bench QUICK=1    a short version for iteration (100k users, 1 round, short loads)
#   make bench ONLY=proxy,revocation   some parts only (decision, proxy, floor, instructions, scim, revocation, profile, replicas, console)
#
# Takes /tmp/bench.lock so that two benchmark runs on one machine never overlap.

QUICK ?=
ONLY ?=

.PHONY: bench bench-deps

bench: bench-deps
	flock /tmp/bench.lock python3 bench/suite.py $(if $(QUICK),--quick) $(if $(ONLY),--only $(ONLY))

bench-deps:
	scripts/deps.sh bench
	@python3 -c 'import sys; sys.path.insert(0, "bench"); import common; common.ensure_idp_modules()'
	@# scim2-server with everything it needs pinned, as the conformance suite pins them
	@if [ ! -x target/bench-venv/bin/scim2-server ] || \
		! cmp -s tests/conformance/requirements.txt target/bench-venv/requirements.txt; then \
		python3 -m venv target/bench-venv && \
		target/bench-venv/bin/pip install -q -r tests/conformance/requirements.txt && \
		cp tests/conformance/requirements.txt target/bench-venv/requirements.txt; fi
