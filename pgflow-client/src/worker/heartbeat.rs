//! The worker's rows in `pgflow.workers`: registering, heartbeats (which also notice rows marked
//! deprecated by someone else), and deprecating them on the way out.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::backoff::{Backoff, sleep_or_stop};
use super::registry::FlowEntry;
use super::shared::Shared;

/// Inserts the rows, or refreshes their heartbeat (re-creating any that were deleted); returns
/// the ids of the rows that are marked deprecated.
pub(crate) async fn beat(pool: &PgPool, flows: &[Arc<FlowEntry>]) -> sqlx::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = flows.iter().map(|flow| flow.worker_id).collect();
    let queues: Vec<&str> = flows.iter().map(|flow| &*flow.slug).collect();
    let functions: Vec<&str> = flows
        .iter()
        .map(|flow| flow.function_name.as_str())
        .collect();
    sqlx::query_scalar(
        "INSERT INTO pgflow.workers AS w (worker_id, queue_name, function_name) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[]) \
         ON CONFLICT (worker_id) DO UPDATE SET last_heartbeat_at = now() \
         RETURNING CASE WHEN w.deprecated_at IS NOT NULL THEN w.worker_id END",
    )
    .bind(ids)
    .bind(queues)
    .bind(functions)
    .fetch_all(pool)
    .await
    .map(|ids: Vec<Option<Uuid>>| ids.into_iter().flatten().collect())
}

/// Heartbeats every `interval` until `stop` fires. A flow whose row is found deprecated stops
/// taking tasks; when all are, the whole worker shuts down through `shutdown`. While nothing
/// listens for cancelled runs (notifications are off, or the listener is reconnecting), each
/// heartbeat also looks for them among the runs of the running tasks.
pub(crate) async fn run(
    shared: Arc<Shared>,
    flows: Vec<Arc<FlowEntry>>,
    interval: Duration,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let pool = &shared.pool;
    let mut backoff = Backoff::new(Duration::from_millis(200), interval);
    let mut delay = interval;
    while sleep_or_stop(delay, &stop).await {
        match beat(pool, &flows).await {
            Ok(deprecated) => {
                if backoff.failures() > 0 {
                    tracing::info!("heartbeat succeeded again");
                }
                backoff.reset();
                delay = interval;
                apply_deprecations(&flows, &deprecated, &shutdown);
                if !shared.listening.load(Ordering::Acquire) {
                    shared.running.sweep(pool).await;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "heartbeat failed; retrying");
                delay = backoff.next_delay();
            }
        }
    }
}

/// Stops the flows whose rows are deprecated, and the worker when all of them are.
pub(crate) fn apply_deprecations(
    flows: &[Arc<FlowEntry>],
    deprecated: &[Uuid],
    shutdown: &CancellationToken,
) {
    for flow in flows {
        if deprecated.contains(&flow.worker_id) && !flow.stop.is_cancelled() {
            tracing::info!(
                flow_slug = %flow.slug,
                worker_id = %flow.worker_id,
                "worker row marked deprecated; no longer taking tasks of this flow"
            );
            flow.stop.cancel();
        }
    }
    if !flows.is_empty()
        && flows.iter().all(|flow| flow.stop.is_cancelled())
        && !shutdown.is_cancelled()
    {
        tracing::info!("every worker row is deprecated; shutting down");
        shutdown.cancel();
    }
}

/// Sets `deprecated_at` on the worker's rows (keeping an earlier mark), trying a few times.
pub(crate) async fn deprecate(pool: &PgPool, flows: &[Arc<FlowEntry>]) {
    let ids: Vec<Uuid> = flows.iter().map(|flow| flow.worker_id).collect();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    for attempt in 1..=3 {
        let result = sqlx::query(
            "UPDATE pgflow.workers SET deprecated_at = coalesce(deprecated_at, now()) \
             WHERE worker_id = ANY($1)",
        )
        .bind(&ids)
        .execute(pool)
        .await;
        match result {
            Ok(_) => return,
            Err(error) if attempt < 3 => {
                tracing::warn!(%error, "cannot mark the worker deprecated; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot mark the worker deprecated; giving up");
            }
        }
    }
}
