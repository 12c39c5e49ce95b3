#!/usr/bin/env bash
# Runs every test of the project, as CI does:
#   formatting, clippy (-D warnings), docs (-D warnings), unit tests, the
#   conformance suite, the real-server tests, and the examples.
#
#   bash tests/run.sh          # everything CI runs
#   bash tests/run.sh --slow   # and the slow tests (Kafka broker restart)
#
# The real servers (PostgreSQL, NATS JetStream, Kafka-protocol Tansu) are made
# ready first by tests/harness/up.sh, which installs and starts what is
# missing and fails naming any server it cannot reach. Servers the harness
# started are stopped again on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*"; }

step "servers"
# shellcheck source=tests/harness/up.sh
if ! source tests/harness/up.sh; then
	echo "tests/run.sh: the test servers are not ready (see the harness messages above)" >&2
	exit 1
fi
trap 'bash tests/harness/down.sh' EXIT

step "format"
cargo fmt --all --check

step "clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "docs"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --locked

step "tests"
log=$(mktemp)
cargo test --workspace --all-features --locked 2>&1 | tee "$log"
passed=$(grep -Eo '^test result: [a-z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
rm -f "$log"

if [[ ${1:-} == --slow ]]; then
	step "slow tests"
	TANSU_SQLITE=$(bash tests/harness/install-tansu-sqlite.sh)
	export TANSU_SQLITE
	cargo test -p e2e --locked --test restart_kafka
fi

step "examples"
out=$(cargo run -q --locked -p examples --example memory_pubsub)
printf '%s\n' "$out" | tail -n 3
if ! grep -Eq '^done: 12 of 12 events handled and acked$' <<<"$out"; then
	echo "tests/run.sh: example memory_pubsub did not report every event handled" >&2
	exit 1
fi

step "summary"
echo "tests: ${passed} passed, ${failed} failed"
