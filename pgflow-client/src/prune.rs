//! Retention: deletes the runs that ended long ago, with their step states, tasks, attempt
//! history, queue messages and archive rows, and the workers gone silent as long; or counts
//! what that would delete. The SQL is migration 0008 (`pgflow.prune_runs`,
//! `pgflow.prune_workers`, `pgflow.prune_preview`); docs/sql-api.md, "Retention".

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::Result;

/// Runs deleted per batch by [`prune`] (and [`Client::prune`](crate::Client::prune)): each batch
/// is a transaction of its own, short enough that workers keep their throughput.
pub const PRUNE_BATCH: u32 = 1000;

/// Workers deleted per call of `pgflow.prune_workers`.
const WORKER_BATCH: i32 = 100;

/// What a prune deleted, or what a preview counted ([`prune_preview`]).
///
/// Runs are those completed, failed or cancelled before [`cutoff`](Self::cutoff); `tasks`
/// are their `step_tasks` rows (their failed-attempt history goes with them, uncounted);
/// `messages` their tasks' messages still in the flows' queues plus their rows in the queues'
/// archives; `workers` the `pgflow.workers` rows whose last heartbeat is before the cutoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PruneReport {
    /// The server's time minus `older_than`, read once when the prune began.
    pub cutoff: DateTime<Utc>,
    /// Runs deleted (or that would be).
    pub runs: u64,
    /// Task rows deleted (or that would be).
    pub tasks: u64,
    /// Queue messages and archive rows deleted (or that would be).
    pub messages: u64,
    /// Worker rows deleted (or that would be).
    pub workers: u64,
    /// Transactions the runs were deleted in (0 for a preview).
    pub batches: u64,
}

/// The cutoff for `older_than`: the server's time minus it, so that the comparison is made
/// with the clock that stored the end times.
async fn cutoff(pool: &PgPool, older_than: Duration) -> Result<DateTime<Utc>> {
    Ok(
        sqlx::query_scalar("SELECT now() - make_interval(secs => $1)")
            .bind(older_than.as_secs_f64())
            .fetch_one(pool)
            .await?,
    )
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or_default()
}

/// Deletes every run that ended (completed, failed or cancelled) more than `older_than` ago
/// with everything it left behind, then the workers whose last heartbeat is that old; returns
/// what it deleted. A started run is never touched, however old.
///
/// Runs go in batches of at most `batch` runs, oldest first, each batch a transaction of its
/// own (`pgflow.prune_runs`), until a batch finds nothing: workers running meanwhile keep their
/// throughput, and an interrupted prune keeps what it did. `pause` is slept between two
/// batches: on a server short of CPU, a pause about as long as a batch takes (about a second
/// for 1,000 runs of five tasks) leaves more of it to the workers (docs/operating.md, "What a
/// prune costs the workers"). A run one of whose rows a
/// concurrent transaction holds (a late report, a retry) is passed over, left for the next
/// prune. The cutoff is the server's time when the call begins.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
/// use std::time::Duration;
///
/// // Keep 30 days, in batches of 500 runs, resting 200 ms between two.
/// let day = Duration::from_secs(86_400);
/// let report = pgflow_client::prune(&pool, 30 * day, 500, Duration::from_millis(200)).await?;
/// println!("deleted {} runs and {} tasks", report.runs, report.tasks);
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) when the database fails or the role may not
/// prune (the functions are the owner's until granted: docs/security.md); the batches that
/// committed before stay deleted.
///
/// # Panics
///
/// Never; a `batch` of 0 is taken as 1.
#[tracing::instrument(skip(pool), err)]
pub async fn prune(
    pool: &PgPool,
    older_than: Duration,
    batch: u32,
    pause: Duration,
) -> Result<PruneReport> {
    let cutoff = cutoff(pool, older_than).await?;
    let batch = i32::try_from(batch.max(1)).unwrap_or(i32::MAX);
    let mut report = PruneReport {
        cutoff,
        runs: 0,
        tasks: 0,
        messages: 0,
        workers: 0,
        batches: 0,
    };
    loop {
        let (runs, tasks, messages): (i32, i32, i32) = sqlx::query_as(
            "SELECT runs_deleted, tasks_deleted, messages_deleted FROM pgflow.prune_runs($1, $2)",
        )
        .bind(cutoff)
        .bind(batch)
        .fetch_one(pool)
        .await?;
        // Until a batch deletes nothing: one that passed over runs held elsewhere deletes fewer
        // than it took, and more may be left behind them.
        if runs <= 0 {
            break;
        }
        report.runs += count(runs.into());
        report.tasks += count(tasks.into());
        report.messages += count(messages.into());
        report.batches += 1;
        tracing::debug!(
            runs,
            tasks,
            messages,
            total = report.runs,
            "pruned a batch of runs"
        );
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    loop {
        let workers: i32 = sqlx::query_scalar("SELECT pgflow.prune_workers($1, $2)")
            .bind(cutoff)
            .bind(WORKER_BATCH)
            .fetch_one(pool)
            .await?;
        report.workers += count(workers.into());
        if workers < WORKER_BATCH {
            break;
        }
    }
    tracing::info!(
        %cutoff,
        runs = report.runs,
        tasks = report.tasks,
        messages = report.messages,
        workers = report.workers,
        "pruned what ended before the cutoff"
    );
    Ok(report)
}

/// Counts what [`prune`] would delete for `older_than`, deleting and locking nothing
/// (`pgflow.prune_preview`); [`PruneReport::batches`] is 0.
///
/// A prune right after can delete less (rows held by a concurrent transaction are passed over)
/// or more (runs ending in between).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
/// use std::time::Duration;
///
/// let would = pgflow_client::prune_preview(&pool, Duration::from_secs(30 * 86_400)).await?;
/// println!("{} runs, {} tasks, {} messages", would.runs, would.tasks, would.messages);
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::Database`](crate::Error::Database) when the database fails or the role may not
/// call `pgflow.prune_preview`.
#[tracing::instrument(skip(pool), err)]
pub async fn prune_preview(pool: &PgPool, older_than: Duration) -> Result<PruneReport> {
    let cutoff = cutoff(pool, older_than).await?;
    let (runs, tasks, messages, workers): (i64, i64, i64, i64) =
        sqlx::query_as("SELECT runs, tasks, messages, workers FROM pgflow.prune_preview($1)")
            .bind(cutoff)
            .fetch_one(pool)
            .await?;
    Ok(PruneReport {
        cutoff,
        runs: count(runs),
        tasks: count(tasks),
        messages: count(messages),
        workers: count(workers),
        batches: 0,
    })
}
