# Shell helpers shared by scripts/demo, scripts/killtest and scripts/bench: a private Postgres,
# a Tansu broker, a noida-db broker.
# shellcheck shell=bash

export PATH="$HOME/.cargo/bin:$PATH"
PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# as_pg CMD...: runs a Postgres server tool, as the postgres OS user when we are root.
# From / so that a working directory the postgres user cannot enter (a clone under /root) draws
# no warnings.
as_pg() {
  if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# start_pg DIR PORT: a throwaway cluster with wal_level=logical, trust auth on loopback.
start_pg() {
  local dir=$1 port=$2
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
  as_pg "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres --no-sync -E UTF8 >/dev/null
  cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
CONF
  as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w start >/dev/null
}

stop_pg() {
  as_pg "$PG_BIN/pg_ctl" -D "$1/data" -m fast -w stop >/dev/null 2>&1 || true
}

# wait_port PORT TRIES: waits until 127.0.0.1:PORT accepts connections, TRIES x 0.1 s at most.
wait_port() {
  for _ in $(seq 1 "$2"); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
}

# start_tansu PORT LOGFILE: prints the broker's pid.
start_tansu() {
  local port=$1 log=$2
  tansu broker --storage-engine memory://tansu/ \
    --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    >"$log" 2>&1 &
  local pid=$!
  wait_port "$port" 100
  echo "$pid"
}

# start_noida PORT DIR LOGFILE: noida-db's Kafka service (a Kafka-protocol broker, `pip install
# noida-db==0.2.3`, which scripts/setup does); prints its pid.
start_noida() {
  local port=$1 dir=$2 log=$3 bin
  bin="${NOIDA_DB_BIN:-$(python3 -c 'import noida_db, os; print(os.path.join(os.path.dirname(noida_db.__file__), "noida-db"))')}"
  mkdir -p "$dir"
  "$bin" start --only kafka --host 127.0.0.1 --kafka-port "$port" --data-dir "$dir" >"$log" 2>&1 &
  local pid=$!
  wait_port "$port" 300
  echo "$pid"
}
