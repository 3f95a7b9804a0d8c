#!/usr/bin/env bash
# The per-task protocol on three engines, side by side: this engine (`pgflow install`),
# upstream pgflow 0.8.1 (its npm package's migrations) and the protocol's floor (floor.sql: the
# least any engine must write). Two workloads: chain5 (five steps in a chain, RUNS runs queued)
# and fanout1000 (a root map of 1,000 tasks per run, FANOUT_RUNS runs queued); enough that no
# run drains them. Each run is a fresh database drained by pgbench with CLIENTS clients for
# SECONDS_PER_RUN seconds (task.sql: one task = three transactions). The engines' order is
# reversed every other round.
#
#   DATABASE_URL=postgres://postgres@localhost/postgres examples/bench/protocol_floor/run.sh
#
# DATABASE_URL: a superuser of a server on this machine (its databases pgflow_floor_* are
# dropped and created). Needs psql, pgbench, cargo, and npm unless the bench has already
# fetched @pgflow/core@0.8.1 into target/bench-engines. Writes OUT (JSON), prints a table on
# standard error, and drops its databases (pgflow_floor_*) when done.
# Server CPU per task is the CPU of the server's backends that ended (the postmaster's reaped
# children, from /proc): the run's connections, plus any autovacuum worker or other client's
# backend that ended meanwhile; the WAL writer and checkpointer are not in it. Without access to
# the postmaster (a remote server, another container) it is null.
# Each run needs more tasks queued than it completes: with RUNS too small the queue runs dry and
# pgbench stops ("expected one row, got 0"); raise RUNS or FANOUT_RUNS then.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
export PGOPTIONS="-c client_min_messages=warning"
: "${DATABASE_URL:?set DATABASE_URL to a superuser connection of a local PostgreSQL server}"
clients=${CLIENTS:-4}
seconds=${SECONDS_PER_RUN:-20}
rounds=${ROUNDS:-3}
runs=${RUNS:-10000}
fanout_runs=${FANOUT_RUNS:-60}
IFS=, read -r -a workloads <<<"${WORKLOADS:-chain5,fanout1000}"
# One client's per-call latencies take this long per engine and workload.
one_client_seconds=$((seconds < 10 ? seconds : 10))
out=${OUT:-$root/examples/bench/results/protocol-floor.json}
engines=(floor upstream current)
worker=00000000-0000-0000-0000-000000000001

fail() { echo "run.sh: $*" >&2; exit 1; }
for tool in psql pgbench cargo; do
  command -v "$tool" >/dev/null || fail "$tool not found"
done
for setting in CLIENTS=$clients SECONDS_PER_RUN=$seconds ROUNDS=$rounds RUNS=$runs \
  FANOUT_RUNS=$fanout_runs; do
  [[ ${setting#*=} =~ ^[1-9][0-9]*$ ]] || fail "$setting: a whole number above 0 expected"
done
for workload in "${workloads[@]}"; do
  [[ $workload == chain5 || $workload == fanout1000 ]] ||
    fail "unknown workload '$workload' in WORKLOADS (chain5, fanout1000)"
done
# Every database this script drops or writes is named pgflow_floor_*, reached through url_of.
[[ $DATABASE_URL =~ ^postgres(ql)?:// ]] ||
  fail "DATABASE_URL must be a postgres:// or postgresql:// URL (got another form)"
[[ $DATABASE_URL != *dbname=* ]] ||
  fail "DATABASE_URL must name its database in its path, not dbname="

# DATABASE_URL with its database replaced by $1 (query parameters such as host= kept).
url_of() { sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\\1/$1#" <<<"$DATABASE_URL"; }
admin() { psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }
in_db() { local db=$1; shift; psql -X -q -v ON_ERROR_STOP=1 "$(url_of "$db")" "$@"; }
# Its arguments joined with commas (JSON lists and objects).
join() { local IFS=,; echo "$*"; }

echo "building the pgflow CLI" >&2
cargo build -q --manifest-path "$root/Cargo.toml" --features cli --bin pgflow
pgflow="$root/target/debug/pgflow"

cache="$root/target/bench-engines"
migrations="$cache/pgflow-core-0.8.1/package/dist/supabase/migrations"
if [[ ! -d $migrations ]]; then
  echo "fetching @pgflow/core@0.8.1" >&2
  mkdir -p "$cache/pgflow-core-0.8.1"
  (cd "$cache" && npm pack --silent @pgflow/core@0.8.1 >/dev/null \
     && tar -xzf pgflow-core-0.8.1.tgz -C pgflow-core-0.8.1)
fi

# A database with pgmq alone, as `pgflow install` installs it (the extension where the server
# has it, else pgmq's SQL), the template of the upstream and floor databases.
admin -c "DROP DATABASE IF EXISTS pgflow_floor_pgmq" -c "CREATE DATABASE pgflow_floor_pgmq"
# Before anything is written through url_of: it must reach the database it names.
reached=$(in_db pgflow_floor_pgmq -Atc "SELECT current_database()")
[[ $reached == pgflow_floor_pgmq ]] ||
  fail "DATABASE_URL with its database replaced reached '$reached', not pgflow_floor_pgmq"
"$pgflow" --database-url "$(url_of pgflow_floor_pgmq)" install >/dev/null
in_db pgflow_floor_pgmq -c "DROP SCHEMA IF EXISTS pgflow, pgflow_private, pgflow_ext, pgflow_meta
  CASCADE"

# The flow of workload $1 and its runs, through the engine's definition API (the same calls
# on this engine and upstream's).
define() {
  case $1 in
    chain5) echo "SELECT pgflow.create_flow('c5');
SELECT pgflow.add_step('c5', 's1');
SELECT pgflow.add_step('c5', 's2', ARRAY['s1']);
SELECT pgflow.add_step('c5', 's3', ARRAY['s2']);
SELECT pgflow.add_step('c5', 's4', ARRAY['s3']);
SELECT pgflow.add_step('c5', 's5', ARRAY['s4']);
INSERT INTO pgflow.workers (worker_id, queue_name, function_name)
VALUES ('$worker', 'c5', 'protocol_floor');
SELECT count(*) FROM (
  SELECT pgflow.start_flow('c5', jsonb_build_object('i', g)) FROM generate_series(1, $runs) g
) s;" ;;
    fanout1000) echo "SELECT pgflow.create_flow('fo');
SELECT pgflow.add_step('fo', 's1', step_type => 'map');
INSERT INTO pgflow.workers (worker_id, queue_name, function_name)
VALUES ('$worker', 'fo', 'protocol_floor');
SELECT count(*) FROM (
  SELECT pgflow.start_flow('fo', (SELECT jsonb_agg(x + 0 * g) FROM generate_series(1, 1000) x))
    FROM generate_series(1, $fanout_runs) g
) s;" ;;
  esac
}
flow_of() { if [[ $1 == chain5 ]]; then echo c5; else echo fo; fi; }

# A fresh database pgflow_floor_$1 with engine $1 and workload $2's flow and runs.
prepare() {
  local engine=$1 workload=$2 db=pgflow_floor_$1
  admin -c "DROP DATABASE IF EXISTS $db"
  case $engine in
    current)
      admin -c "CREATE DATABASE $db"
      "$pgflow" --database-url "$(url_of "$db")" install >/dev/null
      in_db "$db" -c "$(define "$workload")" >/dev/null ;;
    upstream)
      admin -c "CREATE DATABASE $db TEMPLATE pgflow_floor_pgmq"
      # Upstream targets Supabase: its broadcasts need realtime.send (a stand-in that drops
      # them), and it creates pgmq as an extension, which the template already has. The same
      # rule as Upstream::apply (pgflow-client/src/throwaway/upstream.rs), for the bench's
      # engines: keep the two in step.
      in_db "$db" -c "CREATE SCHEMA realtime" -c "CREATE FUNCTION realtime.send(payload jsonb,
        event text, topic text, private boolean DEFAULT true) RETURNS void LANGUAGE sql AS ''"
      for f in "$migrations"/*.sql; do
        sed 's/CREATE EXTENSION IF NOT EXISTS "pgmq" WITH SCHEMA "pgmq";//' "$f" \
          | in_db "$db" >/dev/null
      done
      in_db "$db" -c "$(define "$workload")" >/dev/null ;;
    floor)
      admin -c "CREATE DATABASE $db TEMPLATE pgflow_floor_pgmq"
      in_db "$db" -f "$here/floor.sql" >/dev/null
      local n=$runs
      if [[ $workload == fanout1000 ]]; then n=$fanout_runs; fi
      in_db "$db" -c "SELECT pgflow.start_runs('$(flow_of "$workload")', $n)" >/dev/null ;;
  esac
  in_db "$db" -c "VACUUM ANALYZE"
}

# The postmaster's reaped children's CPU in clock ticks (its parent is the checkpointer's).
checkpointer=$(admin -Atc "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")
postmaster=$(awk '/^PPid/ { print $2 }' "/proc/$checkpointer/status" 2>/dev/null || true)
# A process id from the server's own namespace may name another process here (containers).
if [[ -z $postmaster || $(cat "/proc/$postmaster/comm" 2>/dev/null) != postgres* ]]; then
  echo "run.sh: the server's postmaster is not visible here: no server CPU figures" >&2
  postmaster=
fi
children_ticks() {
  if [[ -n $postmaster && -r /proc/$postmaster/stat ]]; then
    awk '{ print $16 + $17 }' "/proc/$postmaster/stat"
  else
    echo ""
  fi
}
tick=$(getconf CLK_TCK)

# The commit ceiling of the moment: one-row updates, each its own transaction, a row per client.
admin -c "DROP DATABASE IF EXISTS pgflow_floor_ceiling" -c "CREATE DATABASE pgflow_floor_ceiling"
in_db pgflow_floor_ceiling -c "CREATE TABLE c (id integer PRIMARY KEY, n integer)" \
  -c "INSERT INTO c SELECT g, 0 FROM generate_series(1, 256) g"
ceiling_sql=$(mktemp)
trap 'rm -f "$ceiling_sql"' EXIT
echo 'UPDATE c SET n = n + 1 WHERE id = :client_id + 1;' >"$ceiling_sql"

# pgbench on engine $1 (its database prepared) with workload $2, $3 clients for $4 seconds;
# extra options after.
drain() {
  local engine=$1 workload=$2 clients=$3 secs=$4
  shift 4
  pgbench -n -M prepared -c "$clients" -j 2 -T "$secs" -D flow="$(flow_of "$workload")" "$@" \
    -f "$here/task.sql" "$(url_of "pgflow_floor_$engine")" 2>&1
}

# pgbench failed with output $1.
dry() {
  echo "$1" >&2
  if [[ $1 == *"expected one row, got 0"* ]]; then
    fail "the queue ran dry before the run ended: raise RUNS (chain5) or FANOUT_RUNS (fanout1000)"
  fi
  fail "pgbench failed"
}

rows=()
for round in $(seq 1 "$rounds"); do
  order=("${engines[@]}")
  if ((round % 2 == 0)); then order=(current upstream floor); fi
  ceiling=$(pgbench -n -M prepared -c "$clients" -j 2 -T 5 -f "$ceiling_sql" \
    "$(url_of pgflow_floor_ceiling)" 2>&1 | sed -n 's/^tps = \([0-9]*\).*/\1/p')
  for workload in "${workloads[@]}"; do
    for engine in "${order[@]}"; do
      prepare "$engine" "$workload"
      # The server reaps a backend a moment after its client has gone: the set-up's last.
      sleep 1
      load=$(cut -d' ' -f1 /proc/loadavg)
      before=$(children_ticks)
      result=$(drain "$engine" "$workload" "$clients" "$seconds") || dry "$result"
      sleep 1
      after=$(children_ticks)
      tasks=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$result")
      tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$result")
      cpu=null
      if [[ -n $before && -n $after && $tasks -gt 0 ]]; then
        cpu=$(((after - before) * 1000000 / tick / tasks))
      fi
      printf '%-10s %-8s round %d: %8.1f tasks/s, server CPU %s us/task, ceiling %s tx/s, load %s\n' \
        "$workload" "$engine" "$round" "$tps" "$cpu" "$ceiling" "$load" >&2
      rows+=("{\"workload\": \"$workload\", \"engine\": \"$engine\", \"round\": $round, \"tasks\": $tasks, \"tasks_per_s\": $tps, \"server_cpu_us_per_task\": $cpu, \"ceiling_tx_per_s\": $ceiling, \"load_before\": $load}")
    done
  done
done

# Where one task's time goes on each engine: one client, pgbench's per-statement latencies
# (ms, client side: the call, its commit and the round trip).
calls=()
for workload in "${workloads[@]}"; do
  per_engine=()
  for engine in "${engines[@]}"; do
    prepare "$engine" "$workload"
    result=$(drain "$engine" "$workload" 1 "$one_client_seconds" -r) || dry "$result"
    latencies=$(awk '$3 == "select" { print $1 }' <<<"$result" | paste -sd' ')
    read -r read_ms start_ms complete_ms <<<"$latencies"
    printf '%-10s %-8s one client: read %s ms, start_tasks %s ms, complete_task %s ms\n' \
      "$workload" "$engine" "$read_ms" "$start_ms" "$complete_ms" >&2
    per_engine+=("\"$engine\": {\"read\": $read_ms, \"start_tasks\": $start_ms, \"complete_task\": $complete_ms}")
  done
  calls+=("\"$workload\": {$(join "${per_engine[@]}")}")
done

median() { # workload engine field
  for row in "${rows[@]}"; do
    if [[ $row == *"\"workload\": \"$1\", \"engine\": \"$2\""* ]]; then
      sed -E "s/.*\"$3\": ([0-9.]+|null).*/\\1/" <<<"$row"
    fi
  done | sort -g | awk '
    $1 == "null" { missing = 1 }
    { v[NR] = $1 }
    END {
      if (missing) print "null"
      else print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    }'
}
ratio() { # workload engine engine
  awk -v a="$(median "$1" "$2" tasks_per_s)" -v b="$(median "$1" "$3" tasks_per_s)" \
    'BEGIN { printf "%.2f", a / b }'
}
medians=()
for workload in "${workloads[@]}"; do
  per_engine=()
  for engine in "${engines[@]}"; do
    per_engine+=("\"$engine\": {\"tasks_per_s\": $(median "$workload" "$engine" tasks_per_s), \"server_cpu_us_per_task\": $(median "$workload" "$engine" server_cpu_us_per_task)}")
  done
  current=$(ratio "$workload" current upstream)
  floor=$(ratio "$workload" floor upstream)
  per_engine+=("\"current_over_upstream\": $current" "\"floor_over_upstream\": $floor")
  medians+=("\"$workload\": {$(join "${per_engine[@]}")}")
  echo "$workload medians: current / upstream $current, floor / upstream $floor" >&2
done

cat >"$out" <<JSON
{
  "command": "DATABASE_URL=... CLIENTS=$clients SECONDS_PER_RUN=$seconds ROUNDS=$rounds RUNS=$runs FANOUT_RUNS=$fanout_runs WORKLOADS=$(join "${workloads[@]}") examples/bench/protocol_floor/run.sh",
  "git_commit": "$(git -C "$root" describe --always --dirty)",
  "server_version": "$(admin -Atc 'SHOW server_version')",
  "clients": $clients,
  "seconds": $seconds,
  "runs": [
    $(join "${rows[@]}")
  ],
  "medians": {$(join "${medians[@]}")},
  "one_client_call_ms": {$(join "${calls[@]}")}
}
JSON
echo "wrote $out" >&2
for db in floor upstream current ceiling pgmq; do
  admin -c "DROP DATABASE IF EXISTS pgflow_floor_$db"
done
