#!/usr/bin/env bash
# tests/harness/down.sh: stop the servers that tests/harness/up.sh itself started.
#
#   bash tests/harness/down.sh         # stop Tansu (Kafka) if the harness started it
#   bash tests/harness/down.sh --all   # also PostgreSQL / NATS, if the harness started them
#
# Only pids listed in .harness/started are touched, and only while the pid still
# runs the expected program (a recycled pid is left alone). PostgreSQL and NATS are
# machine services on the test machines, so by default they are left running even
# when the harness had to start them. Idempotent: a second run finds nothing to do.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HARNESS_DIR=${HARNESS_DIR:-$root/.harness}
started=$HARNESS_DIR/started

all=0
case ${1:-} in
--all) all=1 ;;
'') ;;
*)
	echo "usage: $0 [--all]" >&2
	exit 2
	;;
esac

log() { printf 'harness: %s\n' "$*" >&2; }

if [[ ! -s $started ]]; then
	log "nothing to stop (no $started)"
	exit 0
fi

# gone PID: PID no longer runs (absent, or a zombie nobody has reaped yet).
gone() {
	local stat
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
	stat=${stat##*) }
	[[ ${stat%% *} == [ZX] ]]
}

# stop_pid NAME PID COMM SIGNAL: stop PID if its /proc/PID/comm starts with COMM.
stop_pid() {
	local name=$1 pid=$2 comm=$3 sig=$4 actual i
	if [[ ! $pid =~ ^[0-9]+$ ]]; then
		log "$name: no usable pid recorded ($pid); skipping"
		return 0
	fi
	actual=$(cat "/proc/$pid/comm" 2>/dev/null || true)
	if [[ -z $actual ]] || gone "$pid"; then
		log "$name (pid $pid) is not running"
		return 0
	fi
	if [[ $actual != "$comm"* ]]; then
		log "$name: pid $pid now runs '$actual', not $comm; leaving it alone"
		return 0
	fi
	log "stopping $name (pid $pid)"
	kill "-$sig" "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		gone "$pid" && return 0
		sleep 0.1
	done
	log "$name (pid $pid) still running after 10s; sending KILL"
	kill -KILL "$pid" 2>/dev/null || true
	for ((i = 0; i < 50; i++)); do
		gone "$pid" && return 0
		sleep 0.1
	done
	log "ERROR: could not stop $name (pid $pid)"
	return 1
}

keep=$(mktemp "$HARNESS_DIR/started.XXXXXX")
trap 'rm -f "$keep"' EXIT
rc=0
while read -r name pid _; do
	[[ -n ${name:-} ]] || continue
	case $name in
	tansu)
		stop_pid tansu "$pid" tansu TERM || rc=1
		rm -f "$HARNESS_DIR/tansu.pid"
		;;
	nats-server)
		if ((all)); then
			stop_pid nats-server "$pid" nats-server TERM || rc=1
			rm -f "$HARNESS_DIR/nats-server.pid"
		else
			log "leaving nats-server (pid $pid) running; use --all to stop it"
			printf '%s %s\n' "$name" "$pid" >>"$keep"
		fi
		;;
	postgres)
		if ((all)); then
			# SIGINT is PostgreSQL's "fast shutdown".
			stop_pid postgres "$pid" postgres INT || rc=1
		else
			log "leaving postgres (pid $pid) running; use --all to stop it"
			printf '%s %s\n' "$name" "$pid" >>"$keep"
		fi
		;;
	*)
		log "unknown entry '$name $pid' in $started; leaving it"
		printf '%s %s\n' "$name" "$pid" >>"$keep"
		;;
	esac
done <"$started"

if [[ -s $keep ]]; then
	mv -f "$keep" "$started"
else
	rm -f "$started"
fi
exit "$rc"
