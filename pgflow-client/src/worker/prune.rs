//! The worker's periodic prune ([`WorkerBuilder::prune_every`](super::WorkerBuilder::prune_every)):
//! one worker of the cluster at a time deletes what ended long ago.

use std::time::Duration;

use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::{PRUNE_BATCH, PruneReport, Result};

/// The key of the transaction-level advisory lock (`pg_try_advisory_xact_lock`) that a worker
/// holds while it prunes: whoever holds it prunes, the others skip their turn. The bytes spell
/// `pgflowPR`; no other lock of the engine uses it.
pub const PRUNE_LOCK_KEY: i64 = 0x7067_666c_6f77_5052;

/// What the periodic prune sleeps between two batches: it runs beside the worker's own
/// handlers, and yields the server to them that long after each batch.
const PAUSE: Duration = Duration::from_millis(200);

/// How often, and what.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PrunePolicy {
    /// Time between two prunes of this worker.
    pub(crate) every: Duration,
    /// What ended more than this long ago goes.
    pub(crate) older_than: Duration,
}

/// Prunes every `policy.every` until `shutdown` fires; a failed prune is logged and tried
/// again at the next turn.
pub(crate) async fn run(pool: PgPool, policy: PrunePolicy, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(policy.every) => {}
        }
        let once = tokio::select! {
            () = shutdown.cancelled() => return,
            once = once(&pool, policy.older_than) => once,
        };
        match once {
            Ok(Some(report)) => tracing::debug!(?report, "periodic prune done"),
            Ok(None) => {
                tracing::debug!("another worker is pruning: skipping this turn");
            }
            Err(err) => tracing::warn!(error = %err, "periodic prune failed; trying again later"),
        }
    }
}

/// One prune, if no other worker of the cluster is pruning: takes [`PRUNE_LOCK_KEY`] in a
/// transaction of a connection of its own, prunes in batches on other connections of the pool
/// (each batch its own transaction), then ends the transaction, which frees the lock. A
/// worker that dies mid-prune frees it with its connection. `None`: the lock was taken.
pub(crate) async fn once(pool: &PgPool, older_than: Duration) -> Result<Option<PruneReport>> {
    let mut conn = pool.acquire().await?;
    let mut lock = conn.begin().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(PRUNE_LOCK_KEY)
        .fetch_one(&mut *lock)
        .await?;
    if !got {
        lock.rollback().await?;
        return Ok(None);
    }
    // The locking transaction holds no snapshot between its statements (read committed), so it
    // keeps no row versions from vacuum while the batches run.
    let report = crate::prune(pool, older_than, PRUNE_BATCH, PAUSE).await;
    lock.rollback().await?;
    report.map(Some)
}
