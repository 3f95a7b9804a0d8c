//! How cost grows (issue 24): step-tasks/s against map size, backlog, flow count and worker
//! instances, each point on a fresh database; and what starting a run of a large root map costs
//! in time, buffers and the backend's memory.
//!
//! Every curve is a table in the output and an entry of `curves` in the JSON. The points are few
//! on purpose: all five curves take a few minutes on two cores.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use pgflow_client::throwaway::TestDatabase;
use pgflow_client::{Client, Worker};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

use crate::engines::Engine;
use crate::flows::{self, Workload};
use crate::measure::{self, BoxResult, CeilingVariant, round3};
use crate::{Env, Executor, Row};

/// Map widths of the map-size curve.
const MAP_SIZES: [u64; 4] = [10, 1_000, 10_000, 100_000];
/// Map elements per point of the map-size curve (at least one run): every point does about
/// the same work.
const MAP_ELEMENTS: u64 = 20_000;
/// Root-map widths whose start is measured.
const START_SIZES: [usize; 3] = [1_000, 10_000, 100_000];
/// Starts measured per width; the table gives the median.
const START_REPEATS: usize = 3;
/// Runs of chain5 queued before the workers start, per point of the backlog curve.
const BACKLOGS: [usize; 4] = [0, 1_000, 10_000, 100_000];
/// How long the backlog curve watches the workers drain, from their first task.
const BACKLOG_WINDOW: Duration = Duration::from_secs(8);
/// Flows served by the one worker of the flow-count curve.
const FLOW_COUNTS: [usize; 4] = [1, 10, 100, 1_000];
/// How long the flow-count curve counts an idle worker's queries: two `max_poll_wait`s.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// Worker instances of the worker curve.
const WORKER_COUNTS: [usize; 4] = [1, 2, 4, 8];
/// Worker instances of the map-size and backlog curves: the README's command's largest count.
const WORKERS: usize = 4;
/// Runs of chain5 started in a burst while the workers poll (backlog, flow count, workers).
const BURST_RUNS: usize = 500;
/// Connections per worker instance, as the other worker rows give it.
const POOL_SIZE: u32 = 6;

/// Which curves to run and the references they are read against.
#[derive(Debug)]
pub(crate) struct CurveSettings {
    pub(crate) which: Vec<String>,
    /// The run's ceiling (plain, 4 clients), tx/s.
    pub(crate) ceiling: f64,
    pub(crate) ceiling_secs: f64,
}

/// One curve: its table and its JSON points.
#[derive(Debug)]
pub(crate) struct Curve {
    name: &'static str,
    description: String,
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    points: Vec<Value>,
}

impl Curve {
    fn new(name: &'static str, description: impl Into<String>, headers: &[&'static str]) -> Self {
        Self {
            name,
            description: description.into(),
            headers: headers.to_vec(),
            rows: Vec::new(),
            points: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<String>, point: Value) {
        println!("  {}: {}", self.name, row.join(" | "));
        self.rows.push(row);
        self.points.push(point);
    }

    /// The curve as a Markdown table under its description.
    pub(crate) fn render(&self) -> String {
        let mut out = format!("{}: {}\n\n", self.name, self.description);
        let _ = writeln!(out, "| {} |", self.headers.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            self.headers
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "--:|" })
                .collect::<String>()
        );
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "description": self.description,
            "points": self.points,
        })
    }
}

/// Runs the curves `settings.which` names (`all`, or any of map, start, backlog, flows,
/// workers), in that order.
pub(crate) async fn run(env: &Env, settings: &CurveSettings) -> BoxResult<Vec<Curve>> {
    const NAMES: [&str; 5] = ["map", "start", "backlog", "flows", "workers"];
    let mut which = Vec::new();
    for name in &settings.which {
        match name.trim() {
            "all" => which.extend(NAMES),
            other => match NAMES.iter().find(|n| **n == other) {
                Some(n) => which.push(*n),
                None => {
                    return Err(
                        format!("unknown curve `{other}` (all, {})", NAMES.join(", ")).into(),
                    );
                }
            },
        }
    }
    let mut curves = Vec::new();
    for name in NAMES {
        if !which.contains(&name) {
            continue;
        }
        println!("curve: {name}");
        curves.push(match name {
            "map" => map_curve(env, settings.ceiling).await?,
            "start" => start_curve(env).await?,
            "backlog" => backlog_curve(env, settings.ceiling).await?,
            "flows" => flows_curve(env, settings.ceiling).await?,
            _ => workers_curve(env, settings).await?,
        });
    }
    Ok(curves)
}

fn rate(x: f64) -> String {
    format!("{x:.0}")
}

/// `fanout<W>`: a root step makes an array of W numbers, a map step runs one task per element,
/// a last step sums them; enough runs for about [`MAP_ELEMENTS`] map tasks per point.
async fn map_curve(env: &Env, ceiling: f64) -> BoxResult<Curve> {
    let mut curve = Curve::new(
        "map size",
        format!(
            "runs of root → map over W elements → sum, about {MAP_ELEMENTS} map tasks per point \
             (at least one run), {WORKERS} default workers; the map's tasks are made when the \
             root step completes"
        ),
        &[
            "elements W",
            "runs",
            "step tasks",
            "step-tasks/s",
            "× ceiling",
            "run p50 (ms)",
            "server CPU µs/task",
        ],
    );
    for width in MAP_SIZES {
        let runs = usize::try_from((MAP_ELEMENTS / width).max(1))?;
        // A name per width, for the row's label; a handful per invocation.
        let name: &'static str = Box::leak(format!("fanout{width}").into_boxed_str());
        let workload = Workload { name, runs, width };
        let row = crate::load_row(
            env,
            workload,
            Executor::Worker,
            WORKERS,
            None,
            &Engine::Current,
        )
        .await?;
        let (cpu, _) = row.cpu_per_task();
        curve.push(
            vec![
                width.to_string(),
                runs.to_string(),
                row.stats.tasks.to_string(),
                rate(row.tasks_per_sec()),
                format!("{:.2}", row.tasks_per_sec() / ceiling),
                format!("{:.0}", row.stats.run_latency_ms.p50),
                cpu.map_or("?".to_owned(), |c| format!("{c:.0}")),
            ],
            json!({
                "elements": width,
                "row": crate::row_json(&row, ceiling),
            }),
        );
    }
    Ok(curve)
}

/// A backend's memory figure from `/proc/<pid>/status`, KiB.
fn backend_kib(pid: i32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets a backend's peak RSS, where this process may (root, or the server's own user).
fn reset_backend_peak(pid: i32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// One start of a root map, as `EXPLAIN (ANALYZE, BUFFERS)` and the backend's memory saw it.
#[derive(Debug, Clone, Copy)]
struct StartSample {
    wall_ms: f64,
    execution_ms: f64,
    temp_written_blocks: f64,
    shared_dirtied_blocks: f64,
    /// Growth of the backend's peak RSS over its RSS before the call, MiB.
    peak_growth_mib: Option<f64>,
}

/// `start_flow` of a flow whose only step maps over the run's input, an array of N numbers:
/// the time, the temporary files written, and how much the backend's peak RSS grew.
async fn start_curve(env: &Env) -> BoxResult<Curve> {
    let mut curve = Curve::new(
        "root map start",
        format!(
            "start_flow of a run whose root map step takes an N-element array input (one call \
             from one connection, input bound as a parameter), median of {START_REPEATS}; time \
             and buffers from EXPLAIN (ANALYZE, BUFFERS), peak memory from the backend's VmHWM \
             (its resident set, shared buffers it touched included)"
        ),
        &[
            "elements N",
            "wall (ms)",
            "µs/element",
            "temp written (blocks)",
            "shared dirtied (blocks)",
            "backend peak RSS growth (MiB)",
            "KiB/element",
        ],
    );
    for n in START_SIZES {
        let db = TestDatabase::new_in(&env.admin_url).await?;
        sqlx::raw_sql(
            "SELECT pgflow.create_flow('curve_root_map'); \
             SELECT pgflow.add_step('curve_root_map', 'items', step_type => 'map');",
        )
        .execute(db.pool())
        .await?;
        let mut conn = PgConnection::connect(db.url()).await?;
        // Compiles the engine's functions and plans their statements on this backend first.
        start_root_map(&mut conn, &json!([0])).await?;
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        // The backend's memory is only readable when the server runs on this machine.
        let local = env.postmaster.is_some();
        let input = Value::Array((0..n).map(|i| json!(i)).collect());
        let mut samples = Vec::new();
        for _ in 0..START_REPEATS {
            let before = if local && reset_backend_peak(pid) {
                backend_kib(pid, "VmRSS:")
            } else if local {
                backend_kib(pid, "VmHWM:")
            } else {
                None
            };
            let began = Instant::now();
            let plan = start_root_map(&mut conn, &input).await?;
            let wall_ms = began.elapsed().as_secs_f64() * 1e3;
            let after = if local {
                backend_kib(pid, "VmHWM:")
            } else {
                None
            };
            let top = &plan[0];
            let node = &top["Plan"];
            samples.push(StartSample {
                wall_ms,
                execution_ms: top["Execution Time"].as_f64().unwrap_or(f64::NAN),
                temp_written_blocks: node["Temp Written Blocks"].as_f64().unwrap_or(0.0),
                shared_dirtied_blocks: node["Shared Dirtied Blocks"].as_f64().unwrap_or(0.0),
                peak_growth_mib: before
                    .zip(after)
                    .map(|(before, after)| (after - before).max(0.0) / 1024.0),
            });
        }
        conn.close().await?;
        let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.step_tasks")
            .fetch_one(db.pool())
            .await?;
        let expected = 1 + START_REPEATS * n;
        if usize::try_from(tasks)? != expected {
            return Err(format!("root map start: {tasks} tasks made, expected {expected}").into());
        }
        samples.sort_by(|a, b| a.wall_ms.total_cmp(&b.wall_ms));
        let median = samples[samples.len() / 2];
        let peak = samples
            .iter()
            .filter_map(|s| s.peak_growth_mib)
            .max_by(f64::total_cmp);
        let per_element_kib = peak.map(|p| p * 1024.0 / n as f64);
        curve.push(
            vec![
                n.to_string(),
                format!("{:.0}", median.wall_ms),
                format!("{:.1}", median.wall_ms * 1e3 / n as f64),
                format!("{:.0}", median.temp_written_blocks),
                format!("{:.0}", median.shared_dirtied_blocks),
                peak.map_or("?".to_owned(), |p| format!("{p:.1}")),
                per_element_kib.map_or("?".to_owned(), |k| format!("{k:.2}")),
            ],
            json!({
                "elements": n,
                "repeats": START_REPEATS,
                "wall_ms": samples.iter().map(|s| round3(s.wall_ms)).collect::<Vec<_>>(),
                "median_wall_ms": round3(median.wall_ms),
                "median_execution_ms": round3(median.execution_ms),
                "temp_written_blocks": median.temp_written_blocks,
                "shared_dirtied_blocks": median.shared_dirtied_blocks,
                "max_backend_peak_rss_growth_mib": peak.map(round3),
                "limit_ms_at_100000": 4000,
            }),
        );
    }
    Ok(curve)
}

/// Starts one run of `curve_root_map` over `input` under `EXPLAIN (ANALYZE, BUFFERS)`; returns
/// the plan (the run is made: ANALYZE executes the call).
async fn start_root_map(conn: &mut PgConnection, input: &Value) -> BoxResult<Value> {
    let plan: Value = sqlx::query_scalar(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) \
         SELECT run_id FROM pgflow.start_flow('curve_root_map', $1::jsonb)",
    )
    .bind(input)
    .fetch_one(conn)
    .await?;
    Ok(plan)
}

/// B runs of chain5 queued (one statement) before [`WORKERS`] workers start, then
/// [`BURST_RUNS`] more started while they poll: the step tasks completed in the first
/// [`BACKLOG_WINDOW`] from the first task's start, or all of them if they finish sooner.
async fn backlog_curve(env: &Env, ceiling: f64) -> BoxResult<Curve> {
    let window = BACKLOG_WINDOW.as_secs_f64();
    let mut curve = Curve::new(
        "backlog",
        format!(
            "B chain5 runs queued (one INSERT … SELECT of start_flow) before {WORKERS} default \
             workers start, then {BURST_RUNS} more started in a burst: step tasks completed in \
             the first {window:.0} s from the first task's start (all of them, if sooner) ÷ that \
             span"
        ),
        &[
            "queued runs B",
            "queueing B (s)",
            "runs queued/s",
            "step tasks in window",
            "span (s)",
            "step-tasks/s",
            "× ceiling",
            "server CPU µs/task",
        ],
    );
    for backlog in BACKLOGS {
        let workload = Workload {
            name: "chain5",
            runs: BURST_RUNS,
            width: 0,
        };
        let db = crate::prepare(env, &workload, &Engine::Current).await?;
        let began = Instant::now();
        if backlog > 0 {
            let started: i64 = sqlx::query_scalar(
                "SELECT count(r.run_id)
                   FROM generate_series(1, $1::bigint) AS g(i),
                        LATERAL pgflow.start_flow('bench_chain5', to_jsonb(g.i)) AS r",
            )
            .bind(i64::try_from(backlog)?)
            .fetch_one(db.pool())
            .await?;
            if usize::try_from(started)? != backlog {
                return Err(format!("backlog: {started} runs queued of {backlog}").into());
            }
        }
        let queue_secs = began.elapsed().as_secs_f64();
        let flow = workload.flow();
        let mark = measure::CpuMark::now(env.postmaster);
        let workers = crate::worker::Workers::start(
            db.url(),
            &flow,
            WORKERS,
            env.tuning.concurrency,
            env.tuning.batch,
        )
        .await?;
        let mut starter = PgConnection::connect(db.url()).await?;
        // After the backlog in the queue, as later work is.
        crate::start_burst(&mut starter, &workload, backlog + 1, BURST_RUNS).await?;
        starter.close().await?;
        let total = backlog + BURST_RUNS;
        let deadline = Instant::now() + env.row_timeout;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let (completed, since_first): (i64, Option<f64>) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM pgflow.runs WHERE status = 'completed'),
                        (SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(started_at))::float8
                           FROM pgflow.step_tasks)",
            )
            .fetch_one(db.pool())
            .await?;
            if usize::try_from(completed)? >= total || since_first.is_some_and(|secs| secs > window)
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("backlog {backlog}: {completed} of {total} runs").into());
            }
        }
        let cpu = mark.spent();
        workers.stop().await?;
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pgflow.step_tasks WHERE status = 'completed'")
                .fetch_one(db.pool())
                .await?;
        let cpu_per_task = cpu
            .server_secs
            .map(|s| s * 1e6 / usize::try_from(done).unwrap_or(0).max(1) as f64);
        let (tasks, span): (i64, Option<f64>) = sqlx::query_as(
            "WITH first AS (SELECT min(started_at) AS t0 FROM pgflow.step_tasks)
             SELECT count(*),
                    least($1, EXTRACT(EPOCH FROM max(t.completed_at) - min(first.t0))::float8)
               FROM pgflow.step_tasks t, first
              WHERE t.status = 'completed'
                AND t.completed_at <= first.t0 + make_interval(secs => $1)",
        )
        .bind(window)
        .fetch_one(db.pool())
        .await?;
        let span = span.unwrap_or(0.0);
        let per_sec = if span > 0.0 { tasks as f64 / span } else { 0.0 };
        curve.push(
            vec![
                backlog.to_string(),
                format!("{queue_secs:.1}"),
                if backlog > 0 {
                    format!("{:.0}", backlog as f64 / queue_secs)
                } else {
                    "—".to_owned()
                },
                tasks.to_string(),
                format!("{span:.2}"),
                rate(per_sec),
                format!("{:.2}", per_sec / ceiling),
                cpu_per_task.map_or("?".to_owned(), |c| format!("{c:.0}")),
            ],
            json!({
                "queued_runs": backlog,
                "queue_secs": round3(queue_secs),
                "burst_runs": BURST_RUNS,
                "workers": WORKERS,
                "window_secs": window,
                "step_tasks_in_window": tasks,
                "span_secs": round3(span),
                "step_tasks_per_sec": per_sec.round(),
                "ratio_to_ceiling": round3(per_sec / ceiling),
                "step_tasks_completed_by_stop": done,
                "server_cpu_us_per_task": cpu_per_task.map(f64::round),
            }),
        );
    }
    Ok(curve)
}

/// Reads of the queue tables (index and sequential scans of `pgmq.q_*`) and committed
/// transactions of this database, as the statistics system has them.
async fn activity(pool: &PgPool) -> BoxResult<(f64, f64)> {
    // A fresh snapshot: statistics read earlier in a session are otherwise kept.
    let (scans, commits): (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT (SELECT sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::float8
                   FROM pg_stat_user_tables
                  WHERE schemaname = 'pgmq' AND relname LIKE 'q\\_%'),
                (SELECT xact_commit::float8 FROM pg_stat_database
                  WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await?;
    Ok((scans.unwrap_or(0.0), commits.unwrap_or(0.0)))
}

/// One worker serving F copies of chain5: its queries while idle, then [`BURST_RUNS`] runs
/// (at least one per flow) spread over the flows round robin.
async fn flows_curve(env: &Env, ceiling: f64) -> BoxResult<Curve> {
    let idle = IDLE_WINDOW.as_secs_f64();
    let mut curve = Curve::new(
        "flow count",
        format!(
            "one default worker serving F copies of chain5: scans of the queue tables (pgmq.q_*: \
             reads, next-visible probes, archiving) and transactions per second over {idle:.0} s \
             idle, then max({BURST_RUNS}, F) runs \
             started round robin over the flows in a burst"
        ),
        &[
            "flows F",
            "compile (s)",
            "idle queue-table scans/s",
            "idle tx/s",
            "runs",
            "step-tasks/s",
            "× ceiling",
            "queue-table scans per task",
            "server CPU µs/task",
        ],
    );
    for count in FLOW_COUNTS {
        let db = TestDatabase::new_in(&env.admin_url).await?;
        if env.profile {
            measure::enable_profile(&env.admin, db.name()).await?;
        }
        let all: Vec<_> = (0..count)
            .map(|i| flows::chain5_named(&format!("bench_f{i:04}")))
            .collect();
        let client = Client::new(db.pool().clone());
        let began = Instant::now();
        for flow in &all {
            client.compile(flow).await?;
        }
        let compile_secs = began.elapsed().as_secs_f64();

        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect(db.url())
            .await?;
        let mut builder = Worker::builder(pool.clone())
            .concurrency(env.tuning.concurrency)
            .batch_size(env.tuning.batch);
        for flow in &all {
            builder = builder.flow(flow.clone());
        }
        let handle = builder.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let registered: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pgflow.workers WHERE deprecated_at IS NULL",
            )
            .fetch_one(db.pool())
            .await?;
            if usize::try_from(registered)? >= count {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("flows {count}: {registered} worker rows").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The first read of every flow (the listener wakes them all when it connects), and the
        // statistics of the start-up flushed.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (scans0, commits0) = activity(db.pool()).await?;
        let idle_began = Instant::now();
        tokio::time::sleep(IDLE_WINDOW).await;
        let (scans1, commits1) = activity(db.pool()).await?;
        let idle_secs = idle_began.elapsed().as_secs_f64();
        let idle_reads = (scans1 - scans0) / idle_secs;
        let idle_tx = (commits1 - commits0) / idle_secs;

        let runs = BURST_RUNS.max(count);
        let mut starter = PgConnection::connect(db.url()).await?;
        let since = measure::server_clock(&mut starter).await?;
        let mark = measure::CpuMark::now(env.postmaster);
        let mut started = 0;
        while started < runs {
            let chunk = 50.min(runs - started);
            sqlx::query(
                "SELECT r.run_id
                   FROM generate_series($1::bigint, $2::bigint) AS g(i),
                        LATERAL pgflow.start_flow('bench_f' || lpad((g.i % $3)::text, 4, '0'),
                                                  to_jsonb(g.i)) AS r",
            )
            .bind(i64::try_from(started)?)
            .bind(i64::try_from(started + chunk)? - 1)
            .bind(i64::try_from(count)?)
            .execute(&mut starter)
            .await?;
            started += chunk;
        }
        starter.close().await?;
        measure::wait_for_runs(db.pool(), runs, Duration::from_millis(10), env.row_timeout)
            .await
            .map_err(|error| format!("flows {count}: {error}"))?;
        let cpu = mark.spent();
        handle.shutdown().await?;
        pool.close().await;
        // The workers' last statistics, flushed as their backends exit.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (scans2, _) = activity(db.pool()).await?;
        let stats = measure::run_stats(db.pool(), since).await?;
        let expected = runs * 5;
        if stats.tasks != expected {
            return Err(format!(
                "flows {count}: {} step tasks, expected {expected}",
                stats.tasks
            )
            .into());
        }
        let per_sec = if stats.span_secs > 0.0 {
            stats.tasks as f64 / stats.span_secs
        } else {
            0.0
        };
        let reads_per_task = (scans2 - scans1) / stats.tasks.max(1) as f64;
        let cpu_per_task = cpu.server_secs.map(|s| s * 1e6 / stats.tasks.max(1) as f64);
        curve.push(
            vec![
                count.to_string(),
                format!("{compile_secs:.1}"),
                format!("{idle_reads:.1}"),
                format!("{idle_tx:.1}"),
                runs.to_string(),
                rate(per_sec),
                format!("{:.2}", per_sec / ceiling),
                format!("{reads_per_task:.2}"),
                cpu_per_task.map_or("?".to_owned(), |c| format!("{c:.0}")),
            ],
            json!({
                "flows": count,
                "compile_secs": round3(compile_secs),
                "idle_secs": round3(idle_secs),
                "idle_queue_scans_per_sec": round3(idle_reads),
                "idle_tx_per_sec": round3(idle_tx),
                "runs": runs,
                "step_tasks": stats.tasks,
                "span_secs": round3(stats.span_secs),
                "step_tasks_per_sec": per_sec.round(),
                "ratio_to_ceiling": round3(per_sec / ceiling),
                "queue_scans_per_task": round3(reads_per_task),
                "server_cpu_us_per_task": cpu_per_task.map(f64::round),
                "run_latency_ms": stats.run_latency_ms.to_json(),
            }),
        );
    }
    Ok(curve)
}

/// 1, 2, 4, 8 worker instances on chain5 and fanout1000, each against the ceiling measured
/// with as many clients on the same server.
async fn workers_curve(env: &Env, settings: &CurveSettings) -> BoxResult<Curve> {
    let mut curve = Curve::new(
        "worker instances",
        "P default workers (each its own Worker and pool of 6 connections, in the bench's \
         process) on chain5 (1,000 runs) and fanout1000 (20 runs); the ceiling measured with P \
         clients on the same server",
        &[
            "workers P",
            "ceiling, P clients (tx/s)",
            "chain5 step-tasks/s",
            "× ceiling(P)",
            "fanout1000 step-tasks/s",
            "× ceiling(P)",
            "server CPU µs/task chain5 / fanout",
        ],
    );
    let chain5 = Workload {
        name: "chain5",
        runs: 1_000,
        width: 0,
    };
    let fanout = Workload {
        name: "fanout1000",
        runs: 20,
        width: 1_000,
    };
    for parallel in WORKER_COUNTS {
        let ceiling = {
            let db = TestDatabase::new_in(&env.admin_url).await?;
            measure::ceiling(
                db.url(),
                parallel,
                settings.ceiling_secs,
                CeilingVariant::Plain,
            )
            .await?
        };
        let mut rows: Vec<Row> = Vec::new();
        for workload in [chain5, fanout] {
            rows.push(
                crate::load_row(
                    env,
                    workload,
                    Executor::Worker,
                    parallel,
                    None,
                    &Engine::Current,
                )
                .await?,
            );
        }
        let cpu = |row: &Row| {
            row.cpu_per_task()
                .0
                .map_or("?".to_owned(), |c| format!("{c:.0}"))
        };
        curve.push(
            vec![
                parallel.to_string(),
                format!("{ceiling:.0}"),
                rate(rows[0].tasks_per_sec()),
                format!("{:.2}", rows[0].tasks_per_sec() / ceiling),
                rate(rows[1].tasks_per_sec()),
                format!("{:.2}", rows[1].tasks_per_sec() / ceiling),
                format!("{} / {}", cpu(&rows[0]), cpu(&rows[1])),
            ],
            json!({
                "workers": parallel,
                "ceiling_tx_per_sec": ceiling.round(),
                "run_ceiling_tx_per_sec": settings.ceiling.round(),
                "rows": rows.iter().map(|row| crate::row_json(row, ceiling)).collect::<Vec<_>>(),
            }),
        );
    }
    Ok(curve)
}
