//! The workers page: `pgflow.workers`, newest heartbeat first.

use chrono::{DateTime, Utc};
use pgflow_client::LIVE_WORKER_WINDOW;
use sqlx::PgPool;
use uuid::Uuid;

use crate::Error;

/// Worker rows shown; older rows are what `pgflow prune` removes.
pub(crate) const WORKERS_SHOWN: i64 = 500;

/// A row of `pgflow.workers`, and whether it counts as live.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct WorkerView {
    pub(crate) worker_id: Uuid,
    pub(crate) queue_name: String,
    pub(crate) function_name: String,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) deprecated_at: Option<DateTime<Utc>>,
    pub(crate) last_heartbeat_at: DateTime<Utc>,
    pub(crate) live: bool,
    /// Seconds since the last heartbeat, by the database's clock.
    pub(crate) silent_secs: i64,
}

/// The workers, live ones first, and per flow how many are live.
pub(crate) async fn workers(pool: &PgPool) -> Result<Vec<WorkerView>, Error> {
    Ok(sqlx::query_as(
        "SELECT worker_id, queue_name, function_name, started_at, deprecated_at,
                last_heartbeat_at,
                deprecated_at IS NULL
                  AND last_heartbeat_at > now() - make_interval(secs => $1) AS live,
                floor(extract(epoch FROM now() - last_heartbeat_at))::bigint AS silent_secs
           FROM pgflow.workers
          ORDER BY live DESC, last_heartbeat_at DESC
          LIMIT $2",
    )
    .bind(LIVE_WORKER_WINDOW.as_secs_f64())
    .bind(WORKERS_SHOWN)
    .fetch_all(pool)
    .await?)
}
