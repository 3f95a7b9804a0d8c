//! The flows a worker serves: per flow its worker row id, its handlers by step slug, its wake-up
//! signal and its stop token.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use pgflow_core::ErasedHandler;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One flow served by the worker.
pub(crate) struct FlowEntry {
    /// The flow slug, which is also its queue name.
    pub(crate) slug: Arc<str>,
    /// The id of this worker's `pgflow.workers` row for this flow.
    pub(crate) worker_id: Uuid,
    /// `function_name` of the worker row.
    pub(crate) function_name: String,
    /// Step slug → handler.
    pub(crate) steps: HashMap<String, StepEntry>,
    /// Woken when new tasks may be in the queue (a notification, the listener reconnecting).
    pub(crate) wake: Notify,
    /// Cancelled when the worker shuts down or this flow's row is marked deprecated.
    pub(crate) stop: CancellationToken,
    /// `SELECT` of the seconds until the next message of the queue becomes visible.
    pub(crate) next_visible_sql: String,
    /// `SELECT` of the seconds until message `$1` of the queue is visible again: when a failed
    /// task is retried, for the log line.
    pub(crate) retry_in_sql: String,
}

impl fmt::Debug for FlowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowEntry")
            .field("slug", &self.slug)
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

/// One step's handler.
pub(crate) struct StepEntry {
    /// The step slug, shared by every task's context.
    pub(crate) slug: Arc<str>,
    pub(crate) handler: Arc<dyn ErasedHandler>,
}

impl FlowEntry {
    /// `slug` and the step slugs must be valid slugs (checked by `spawn`): they end up in SQL text.
    pub(crate) fn new(
        slug: String,
        steps: BTreeMap<String, Arc<dyn ErasedHandler>>,
        shutdown: &CancellationToken,
    ) -> Self {
        let queue_table = queue_table(&slug);
        let next_visible_sql = format!(
            "SELECT extract(epoch FROM min(vt) - clock_timestamp())::float8 FROM {queue_table}"
        );
        let retry_in_sql = format!(
            "SELECT extract(epoch FROM vt - clock_timestamp())::float8 \
               FROM {queue_table} WHERE msg_id = $1"
        );
        let steps = steps
            .into_iter()
            .map(|(step, handler)| {
                let entry = StepEntry {
                    slug: Arc::from(step.as_str()),
                    handler,
                };
                (step, entry)
            })
            .collect();
        Self {
            function_name: format!("rust:{slug}"),
            slug: Arc::from(slug),
            worker_id: Uuid::new_v4(),
            steps,
            wake: Notify::new(),
            stop: shutdown.child_token(),
            next_visible_sql,
            retry_in_sql,
        }
    }
}

/// The flow's queue table, as SQL text: `pgmq."q_<lowercased slug>"`. `slug` must be a valid slug
/// (checked by `spawn`): a valid slug needs no escaping, and the quotes only keep the lowercase
/// name from being folded again.
pub(crate) fn queue_table(slug: &str) -> String {
    format!("pgmq.\"q_{}\"", slug.to_lowercase())
}
