//! What the poller hands the dispatcher: a task this worker just started. Its own module so that
//! the poller depends on the dispatcher and not the other way round.

use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

use super::telemetry::TaskTelemetry;

/// A task this worker just started.
#[derive(Debug)]
pub(crate) struct StartedTask {
    pub(crate) run_id: Uuid,
    pub(crate) step_slug: String,
    /// The input, or why it could not be decoded: the task is started all the same, and must
    /// fail with that reason, without calling the handler.
    pub(crate) input: Result<Value, String>,
    pub(crate) task_index: i32,
    pub(crate) attempt: i32,
    pub(crate) timeout: Duration,
    /// When the read that started it was sent, to tell whether a cancellation of its run
    /// predates it.
    pub(crate) read_at: Instant,
    /// Its run's trace context and its queue wait, when the features that use them are on.
    pub(crate) telemetry: TaskTelemetry,
}
