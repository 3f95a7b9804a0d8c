//! Feature `metrics`: the queue gauges, sampled by the worker (not per task) every
//! [`SAMPLE_INTERVAL`], one query per flow, each an index range scan of the queue's `vt` index
//! over the messages readable now.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::backoff::sleep_or_stop;
use super::registry::{FlowEntry, queue_table};
use crate::metric_names as names;

/// How often the queues are sampled: often enough for a scrape every 15 s, rare enough to cost
/// the database nothing noticeable.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Samples the queues of `flows` until `stop` fires. A flow whose queue cannot be read (not
/// compiled yet, a role without `SELECT` on it) is logged at WARN once, then at DEBUG.
pub(crate) async fn run(pool: PgPool, flows: Vec<Arc<FlowEntry>>, stop: CancellationToken) {
    let queries: Vec<String> = flows
        .iter()
        .map(|flow| {
            format!(
                "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(vt)), 0)::float8 \
                   FROM {} WHERE vt <= clock_timestamp()",
                queue_table(&flow.slug)
            )
        })
        .collect();
    let mut warned = vec![false; flows.len()];
    loop {
        for ((flow, sql), warned) in flows.iter().zip(&queries).zip(&mut warned) {
            match sqlx::query_as::<_, (i64, f64)>(sql).fetch_one(&pool).await {
                Ok((depth, oldest)) => {
                    *warned = false;
                    // A queue's length is far below 2^53: exact in an f64.
                    #[allow(clippy::cast_precision_loss)]
                    metrics::gauge!(names::QUEUE_DEPTH, "flow" => Arc::clone(&flow.slug))
                        .set(depth as f64);
                    metrics::gauge!(names::QUEUE_OLDEST_MESSAGE_AGE, "flow" => Arc::clone(&flow.slug))
                        .set(oldest.max(0.0));
                }
                Err(error) if *warned => {
                    tracing::debug!(flow_slug = %flow.slug, %error, "cannot sample the queue");
                }
                Err(error) => {
                    tracing::warn!(flow_slug = %flow.slug, %error, "cannot sample the queue for its metrics");
                    *warned = true;
                }
            }
        }
        if !sleep_or_stop(SAMPLE_INTERVAL, &stop).await {
            return;
        }
    }
}
