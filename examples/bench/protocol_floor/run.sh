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
# fetched @pgflow/core@0.8.1 into target/bench-engines. Writes OUT (JSON) and prints a table.
# Server CPU per task is the CPU of the server's backends that ended (the postmaster's reaped
# children, from /proc): the run's connections, plus any autovacuum worker that ran meanwhile.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
export PGOPTIONS="-c client_min_messages=warning"
: "${DATABASE_URL:?set DATABASE_URL to a superuser connection of a local PostgreSQL server}"
clients=${CLIENTS:-4}
seconds=${SECONDS_PER_RUN:-20}
rounds=${ROUNDS:-3}
runs=${RUNS:-8000}
fanout_runs=${FANOUT_RUNS:-40}
IFS=, read -r -a workloads <<<"${WORKLOADS:-chain5,fanout1000}"
out=${OUT:-$root/examples/bench/results/protocol-floor.json}
engines=(floor upstream current)
worker=00000000-0000-0000-0000-000000000001

for tool in psql pgbench cargo; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool not found" >&2; exit 1; }
done

# DATABASE_URL with its database replaced by $1 (query parameters such as host= kept).
url_of() { sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?#\\1/$1#" <<<"$DATABASE_URL"; }
admin() { psql -X -q -v ON_ERROR_STOP=1 "$DATABASE_URL" "$@"; }
in_db() { local db=$1; shift; psql -X -q -v ON_ERROR_STOP=1 "$(url_of "$db")" "$@"; }

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
"$pgflow" --database-url "$(url_of pgflow_floor_pgmq)" install >/dev/null
in_db pgflow_floor_pgmq -c "DROP SCHEMA pgflow, pgflow_private, pgflow_ext, pgflow_meta CASCADE" \
  2>/dev/null

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
    *) echo "run.sh: unknown workload $1 (chain5, fanout1000)" >&2; exit 1 ;;
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
      # them), and it creates pgmq as an extension, which the template already has.
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

rows=()
for round in $(seq 1 "$rounds"); do
  order=("${engines[@]}")
  if ((round % 2 == 0)); then order=(current upstream floor); fi
  ceiling=$(pgbench -n -M prepared -c "$clients" -j 2 -T 5 -f "$ceiling_sql" \
    "$(url_of pgflow_floor_ceiling)" 2>&1 | sed -n 's/^tps = \([0-9]*\).*/\1/p')
  for workload in "${workloads[@]}"; do
    for engine in "${order[@]}"; do
      prepare "$engine" "$workload"
      load=$(cut -d' ' -f1 /proc/loadavg)
      before=$(children_ticks)
      result=$(drain "$engine" "$workload" "$clients" "$seconds") || { echo "$result" >&2; exit 1; }
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
    result=$(drain "$engine" "$workload" 1 10 -r) || { echo "$result" >&2; exit 1; }
    latencies=$(awk '$3 == "select" { print $1 }' <<<"$result" | paste -sd' ')
    read -r read_ms start_ms complete_ms <<<"$latencies"
    printf '%-10s %-8s one client: read %s ms, start_tasks %s ms, complete_task %s ms\n' \
      "$workload" "$engine" "$read_ms" "$start_ms" "$complete_ms" >&2
    per_engine+=("\"$engine\": {\"read\": $read_ms, \"start_tasks\": $start_ms, \"complete_task\": $complete_ms}")
  done
  calls+=("\"$workload\": {$(IFS=,; echo "${per_engine[*]}")}")
done

median() { # workload engine field
  for row in "${rows[@]}"; do
    if [[ $row == *"\"workload\": \"$1\", \"engine\": \"$2\""* ]]; then
      sed -E "s/.*\"$3\": ([0-9.]+).*/\\1/" <<<"$row"
    fi
  done | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
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
  per_engine+=("\"current_over_upstream\": $(ratio "$workload" current upstream)")
  per_engine+=("\"floor_over_upstream\": $(ratio "$workload" floor upstream)")
  medians+=("\"$workload\": {$(IFS=,; echo "${per_engine[*]}")}")
  echo "$workload medians: current / upstream $(ratio "$workload" current upstream), floor / upstream $(ratio "$workload" floor upstream)" >&2
done

join() { local IFS=,; echo "$*"; }
cat >"$out" <<JSON
{
  "command": "DATABASE_URL=... CLIENTS=$clients SECONDS_PER_RUN=$seconds ROUNDS=$rounds RUNS=$runs FANOUT_RUNS=$fanout_runs WORKLOADS=$(IFS=,; echo "${workloads[*]}") examples/bench/protocol_floor/run.sh",
  "git_commit": "$(git -C "$root" rev-parse --short HEAD)",
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
