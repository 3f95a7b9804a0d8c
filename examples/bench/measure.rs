//! Measuring: the ceiling, run and dispatch latencies from the engine's own timestamps, peak RSS,
//! per-function profiles, percentiles.

use std::error::Error;
use std::time::{Duration, Instant};

use pgflow_client::throwaway::ThrowawayServer;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};

pub(crate) type BoxResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// p50 / p95 / p99 / max of a sample, in the sample's unit.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Percentiles {
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p95: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

impl Percentiles {
    pub(crate) fn of(mut values: Vec<f64>) -> Self {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        // Nearest rank; `per_mille` is the quantile in thousandths.
        let at = |per_mille: usize| {
            let rank = (per_mille * values.len()).div_ceil(1000).max(1);
            values[rank.min(values.len()) - 1]
        };
        Self {
            n: values.len(),
            p50: at(500),
            p95: at(950),
            p99: at(990),
            max: values[values.len() - 1],
            mean: values.iter().sum::<f64>() / values.len() as f64,
        }
    }

    pub(crate) fn to_json(self) -> Value {
        json!({
            "n": self.n,
            "p50": round3(self.p50),
            "p95": round3(self.p95),
            "p99": round3(self.p99),
            "max": round3(self.max),
            "mean": round3(self.mean),
        })
    }
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What the engine's tables say about a finished batch of runs.
#[derive(Debug, Clone)]
pub(crate) struct RunStats {
    pub(crate) runs: usize,
    pub(crate) tasks: usize,
    /// First run's `started_at` to last run's `completed_at`, seconds.
    pub(crate) span_secs: f64,
    /// `completed_at - started_at` per run, milliseconds.
    pub(crate) run_latency_ms: Percentiles,
    /// Per (run, dependent step): the step's first task's `started_at` minus the latest
    /// `completed_at` of its dependencies' step states, milliseconds.
    pub(crate) dispatch_ms: Percentiles,
    /// Per (run, root step): the step's first task's `started_at` minus the run's
    /// `started_at`, milliseconds.
    pub(crate) pickup_ms: Percentiles,
}

/// The server's clock, in seconds since the epoch: where a row's warm-up ends, for
/// [`run_stats`].
pub(crate) async fn server_clock(conn: &mut sqlx::PgConnection) -> BoxResult<f64> {
    Ok(
        sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8")
            .fetch_one(conn)
            .await?,
    )
}

/// Figures of the runs started at or after `since` (seconds since the epoch, from
/// [`server_clock`]; 0 for all): every row leaves out its warm-up.
pub(crate) async fn run_stats(pool: &PgPool, since: f64) -> BoxResult<RunStats> {
    let (runs, span): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM max(completed_at) - min(started_at))::float8
           FROM pgflow.runs WHERE status = 'completed' AND started_at >= to_timestamp($1)",
    )
    .bind(since)
    .fetch_one(pool)
    .await?;
    let tasks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_tasks t JOIN pgflow.runs r ON r.run_id = t.run_id
          WHERE t.status = 'completed' AND r.started_at >= to_timestamp($1)",
    )
    .bind(since)
    .fetch_one(pool)
    .await?;
    let latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM completed_at - started_at)::float8 * 1000
           FROM pgflow.runs WHERE status = 'completed' AND started_at >= to_timestamp($1)",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    let dispatch: Vec<Option<f64>> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM
                  (SELECT min(t.started_at) FROM pgflow.step_tasks t
                    WHERE t.run_id = ss.run_id AND t.step_slug = ss.step_slug)
                - (SELECT max(dep.completed_at)
                     FROM pgflow.deps d
                     JOIN pgflow.step_states dep
                       ON dep.run_id = ss.run_id AND dep.step_slug = d.dep_slug
                    WHERE d.flow_slug = ss.flow_slug AND d.step_slug = ss.step_slug)
                )::float8 * 1000
           FROM pgflow.step_states ss
           JOIN pgflow.runs r ON r.run_id = ss.run_id
          WHERE r.started_at >= to_timestamp($1)
            AND EXISTS (SELECT 1 FROM pgflow.deps d
                         WHERE d.flow_slug = ss.flow_slug AND d.step_slug = ss.step_slug)",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    let pickup: Vec<Option<f64>> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM
                  (SELECT min(t.started_at) FROM pgflow.step_tasks t
                    WHERE t.run_id = ss.run_id AND t.step_slug = ss.step_slug)
                - r.started_at)::float8 * 1000
           FROM pgflow.step_states ss
           JOIN pgflow.runs r ON r.run_id = ss.run_id
          WHERE r.started_at >= to_timestamp($1)
            AND NOT EXISTS (SELECT 1 FROM pgflow.deps d
                             WHERE d.flow_slug = ss.flow_slug AND d.step_slug = ss.step_slug)",
    )
    .bind(since)
    .fetch_all(pool)
    .await?;
    Ok(RunStats {
        runs: usize::try_from(runs)?,
        tasks: usize::try_from(tasks)?,
        span_secs: span.unwrap_or(0.0),
        run_latency_ms: Percentiles::of(latencies),
        dispatch_ms: Percentiles::of(dispatch.into_iter().flatten().collect()),
        pickup_ms: Percentiles::of(pickup.into_iter().flatten().collect()),
    })
}

/// Waits until `expected` runs exist and none is still `started`; fails on a failed run.
pub(crate) async fn wait_for_runs(
    pool: &PgPool,
    expected: usize,
    poll: Duration,
    timeout: Duration,
) -> BoxResult<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (completed, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'completed'),
                    count(*) FILTER (WHERE status = 'failed')
               FROM pgflow.runs",
        )
        .fetch_one(pool)
        .await?;
        if failed > 0 {
            let error: Option<String> = sqlx::query_scalar(
                "SELECT error_message FROM pgflow.step_states
                  WHERE status = 'failed' LIMIT 1",
            )
            .fetch_optional(pool)
            .await?
            .flatten();
            return Err(format!("{failed} run(s) failed: {}", error.unwrap_or_default()).into());
        }
        if usize::try_from(completed)? >= expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            let states: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT step_slug, status, count(*) FROM pgflow.step_states
                  GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .fetch_all(pool)
            .await?;
            let tasks: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT step_slug, status, count(*) FROM pgflow.step_tasks
                  GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .fetch_all(pool)
            .await?;
            return Err(format!(
                "timed out after {timeout:?}: {completed} of {expected} runs completed; \
                 step states {states:?}; step tasks {tasks:?}"
            )
            .into());
        }
        tokio::time::sleep(poll).await;
    }
}

/// The ceiling: `clients` connections each committing `BEGIN; INSERT; UPDATE; DELETE; COMMIT`
/// of one row of their own, for `secs` seconds. Returns transactions per second.
pub(crate) async fn ceiling(
    url: &str,
    clients: usize,
    secs: f64,
    variant: CeilingVariant,
) -> BoxResult<f64> {
    let mut setup = PgConnection::connect(url).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_ceiling (id bigint PRIMARY KEY, v bigint NOT NULL)",
    )
    .execute(&mut setup)
    .await?;
    setup.close().await?;

    let duration = Duration::from_secs_f64(secs);
    let start = tokio::sync::Barrier::new(clients);
    let start = std::sync::Arc::new(start);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let url = url.to_owned();
        let start = std::sync::Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await?;
            if variant == CeilingVariant::SyncCommitOff {
                sqlx::query("SET synchronous_commit = off")
                    .execute(&mut conn)
                    .await?;
            }
            start.wait().await;
            let began = Instant::now();
            let mut commits = 0_u64;
            let base = i64::try_from(client)? << 40;
            while began.elapsed() < duration {
                let id = base + i64::try_from(commits)?;
                let mut tx = conn.begin().await?;
                sqlx::query("INSERT INTO bench_ceiling (id, v) VALUES ($1, 0)")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE bench_ceiling SET v = v + 1 WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM bench_ceiling WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                if variant == CeilingVariant::WithNotify {
                    sqlx::query("SELECT pg_notify('bench_ceiling', $1)")
                        .bind(id.to_string())
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                commits += 1;
            }
            let elapsed = began.elapsed().as_secs_f64();
            conn.close().await?;
            Ok::<_, Box<dyn Error + Send + Sync>>((commits, elapsed))
        }));
    }
    let mut total = 0.0;
    for task in tasks {
        let (commits, elapsed) = task.await??;
        total += commits as f64 / elapsed;
    }
    Ok(total)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CeilingVariant {
    /// The reference: synchronous commit on.
    Plain,
    /// The same with `synchronous_commit = off` (an extra line).
    SyncCommitOff,
    /// The same plus one `pg_notify` per transaction (the engine notifies on every event).
    WithNotify,
}

impl CeilingVariant {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Plain => "insert+update+delete per tx, synchronous_commit=on",
            Self::SyncCommitOff => "same, synchronous_commit=off",
            Self::WithNotify => "same + one pg_notify per tx, synchronous_commit=on",
        }
    }

    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::SyncCommitOff => "sync_commit_off",
            Self::WithNotify => "with_notify",
        }
    }
}

/// Resets the process's peak RSS (`VmHWM`), where the kernel allows it.
pub(crate) fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak RSS (`VmHWM`) in MiB.
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Turns on per-function timing for new connections to `database` (`track_functions = pl`).
pub(crate) async fn enable_profile(admin: &PgPool, database: &str) -> BoxResult<()> {
    sqlx::query(&format!(
        "ALTER DATABASE \"{}\" SET track_functions = 'pl'",
        database.replace('"', "\"\"")
    ))
    .execute(admin)
    .await?;
    Ok(())
}

/// One PL/pgSQL function's share of the time, from `pg_stat_user_functions`.
#[derive(Debug, Clone)]
pub(crate) struct FunctionProfile {
    pub(crate) name: String,
    pub(crate) calls: i64,
    pub(crate) total_ms: f64,
    pub(crate) self_ms: f64,
}

/// Per-function statistics of `pool`'s database. Backends flush their statistics when they
/// exit, so call this after the connections that did the work are closed.
pub(crate) async fn function_profile(pool: &PgPool) -> BoxResult<Vec<FunctionProfile>> {
    // Backends report on exit, asynchronously to the client closing them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rows: Vec<(String, String, i64, f64, f64)> = sqlx::query_as(
        "SELECT schemaname::text, funcname::text, calls, total_time, self_time
           FROM pg_stat_user_functions
          ORDER BY self_time DESC",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(schema, name, calls, total_ms, self_ms)| FunctionProfile {
            name: format!("{schema}.{name}"),
            calls,
            total_ms,
            self_ms,
        })
        .collect())
}

/// Facts about the machine, for the record.
pub(crate) fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|line| line.starts_with("MemTotal:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| round3(kib / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    json!({
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "kernel": kernel,
    })
}

/// The server's version and the settings that matter for commit cost.
pub(crate) async fn server_settings(pool: &PgPool) -> BoxResult<Value> {
    let mut settings = serde_json::Map::new();
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(pool)
        .await?;
    settings.insert("server_version".into(), json!(version));
    for name in [
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "shared_buffers",
        "max_connections",
        "wal_level",
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(pool)
            .await?;
        settings.insert(name.into(), json!(value));
    }
    let pgmq: Option<String> =
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'pgmq'")
            .fetch_optional(pool)
            .await?;
    settings.insert(
        "pgmq".into(),
        json!(pgmq.map_or_else(|| "sql install".to_owned(), |v| format!("extension {v}"))),
    );
    Ok(Value::Object(settings))
}

/// Clock ticks per second of `/proc` CPU times (`USER_HZ`, 100 on every mainstream Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// Fields after the command name of `/proc/<pid>/stat`, starting with the state.
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // The state letter parses as 0; index i is field i + 3 of proc(5).
    Some(
        rest.split_whitespace()
            .map(|field| field.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU seconds used so far by this process (the bench harness, the driver, the workers).
pub(crate) fn own_cpu_secs() -> Option<f64> {
    let fields = stat_fields("self")?;
    Some((fields.get(11)? + fields.get(12)?) as f64 / TICKS_PER_SEC)
}

/// CPU seconds used so far by the PostgreSQL server whose postmaster is `postmaster`: its own
/// time, its reaped children's, and its live children's. The difference of two readings is what
/// the server spent in between (a backend's time moves from "live" to "reaped" when it exits).
pub(crate) fn server_cpu_secs(postmaster: u32) -> Option<f64> {
    let own = stat_fields(&postmaster.to_string())?;
    let mut ticks = own.get(11)? + own.get(12)? + own.get(13)? + own.get(14)?;
    let parent = u64::from(postmaster);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Some(fields) = stat_fields(pid)
            && fields.get(1) == Some(&parent)
        {
            ticks += fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
        }
    }
    Some(ticks as f64 / TICKS_PER_SEC)
}

/// The postmaster's pid of a throwaway server, for its CPU time.
pub(crate) fn postmaster_pid(server: &ThrowawayServer) -> Option<u32> {
    let pid_file =
        std::fs::read_to_string(server.dir().join("data").join("postmaster.pid")).ok()?;
    pid_file.lines().next()?.trim().parse().ok()
}

/// The 1-minute load average: how busy the machine was besides us.
pub(crate) fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU readings at the start of a row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuMark {
    own: Option<f64>,
    server: Option<f64>,
    postmaster: Option<u32>,
}

/// CPU seconds spent since a [`CpuMark`]: by this process and by the server.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuSpent {
    pub(crate) own_secs: Option<f64>,
    pub(crate) server_secs: Option<f64>,
}

impl CpuMark {
    pub(crate) fn now(postmaster: Option<u32>) -> Self {
        Self {
            own: own_cpu_secs(),
            server: postmaster.and_then(server_cpu_secs),
            postmaster,
        }
    }

    pub(crate) fn spent(&self) -> CpuSpent {
        let now = Self::now(self.postmaster);
        CpuSpent {
            own_secs: self.own.zip(now.own).map(|(a, b)| b - a),
            server_secs: self.server.zip(now.server).map(|(a, b)| b - a),
        }
    }
}
