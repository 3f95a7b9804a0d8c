//! The worker's stalled-task timer
//! ([`WorkerBuilder::requeue_stalled_every`](super::WorkerBuilder::requeue_stalled_every)):
//! every period it calls `pgflow.requeue_stalled_tasks_due`, which sweeps for the whole
//! cluster at most once per period, so a hundred workers sweep no more often than one.
//!
//! A sweep requeues the started tasks whose worker was lost and whose message will not come
//! back to a reader (migration 0010, "Stalled tasks"); the engine counts the lost attempt. A
//! worker whose role may not call the function says so once, at WARN, and stops its timer:
//! the read path (a message delivered again after the step's timeout) still recovers most lost
//! tasks, and a warning every period would bury everything else in the log.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::backoff::sleep_or_stop;
use super::handle::Counters;
use crate::{Error, Result};

/// How often the worker calls the sweep unless
/// [`WorkerBuilder::requeue_stalled_every`](super::WorkerBuilder::requeue_stalled_every) says
/// otherwise: upstream's pg_cron job for `requeue_stalled_tasks` runs every 15 s too.
pub(crate) const DEFAULT_REQUEUE_EVERY: Duration = Duration::from_secs(15);

/// The shortest period `pgflow.requeue_stalled_tasks_due` accepts.
pub(crate) const MIN_REQUEUE_EVERY: Duration = Duration::from_secs(1);

/// What one call of the sweep found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// This worker swept, and requeued this many tasks.
    Swept(u64),
    /// Another caller swept within the period.
    Taken,
}

/// Calls the sweep at once, then `every` after each call returns, until `stop` fires.
///
/// Sleeping after the call, rather than on a fixed beat, keeps a lone worker's calls at least
/// `every` apart by the server's clock too (the function compares transaction start times), so
/// it never finds its own previous sweep too recent and skips a period.
pub(crate) async fn run(
    pool: sqlx::PgPool,
    every: Duration,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    // Failures in a row: the first is a warning, the next ones are debug until one succeeds.
    let mut failing = false;
    loop {
        // Waiting for a connection gives way to a shutdown; the call itself runs to its end
        // (one short statement), so that a sweep that commits is always counted.
        let conn = tokio::select! {
            () = stop.cancelled() => return,
            conn = pool.acquire() => conn,
        };
        let turn = match conn {
            Ok(mut conn) => once(&mut conn, every).await,
            Err(error) => Err(error.into()),
        };
        match turn {
            Ok(turn) => {
                if failing {
                    tracing::info!("stalled-task sweep works again");
                    failing = false;
                }
                record(&counters, turn);
            }
            Err(Error::Database(sqlx::Error::Database(db)))
                if matches!(db.code().as_deref(), Some("42501" | "42883")) =>
            {
                // 42501: not granted; 42883: a schema without the function. Neither changes
                // while the worker runs.
                tracing::warn!(
                    error = %db.message(),
                    "this worker cannot requeue stalled tasks, and stops trying: grant its role \
                     EXECUTE on pgflow.requeue_stalled_tasks_due(interval) (docs/security.md), or \
                     turn the timer off with requeue_stalled(false)"
                );
                return;
            }
            Err(error) if !failing => {
                tracing::warn!(%error, "stalled-task sweep failed; trying again next period");
                failing = true;
            }
            Err(error) => tracing::debug!(%error, "stalled-task sweep failed again"),
        }
        if !sleep_or_stop(every, &stop).await {
            return;
        }
    }
}

/// Counts and logs one turn.
fn record(counters: &Counters, turn: Turn) {
    match turn {
        Turn::Swept(0) => {
            counters.stall_sweeps.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("stalled-task sweep: nothing to requeue");
        }
        Turn::Swept(requeued) => {
            counters.stall_sweeps.fetch_add(1, Ordering::Relaxed);
            counters.requeued.fetch_add(requeued, Ordering::Relaxed);
            tracing::info!(
                requeued,
                "stalled-task sweep requeued tasks whose worker was lost"
            );
        }
        Turn::Taken => tracing::trace!("stalled-task sweep: another worker swept this period"),
    }
}

/// One call: `Taken` when another caller swept less than `every` ago.
async fn once(conn: &mut sqlx::PgConnection, every: Duration) -> Result<Turn> {
    let requeued: Option<i32> = sqlx::query_scalar(
        "SELECT pgflow.requeue_stalled_tasks_due(make_interval(secs => $1::float8))",
    )
    .bind(every.as_secs_f64())
    .fetch_one(conn)
    .await?;
    Ok(requeued.map_or(Turn::Taken, |n| {
        Turn::Swept(u64::try_from(n).unwrap_or_default())
    }))
}
