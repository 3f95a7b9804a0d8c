//! The names of the metrics a [`Worker`](crate::Worker) records with feature `metrics`, through
//! the [`metrics`](https://docs.rs/metrics) facade: the one place they are spelled, for the
//! worker and for dashboards and alerts written against them. docs/operating.md ("Metrics")
//! describes each.
//!
//! Nothing is recorded until the application installs a recorder (for Prometheus,
//! `metrics-exporter-prometheus`). Labels: `flow` (the flow slug) and `step` (the step slug)
//! where the name says "task", `flow` on the queue gauges, none on the slot gauges.
//!
//! ```
//! use pgflow_client::metric_names;
//!
//! // An alert on tasks failing for good, in PromQL.
//! let alert = format!("sum by (flow) (rate({}[5m])) > 0", metric_names::TASKS_FAILED);
//! assert_eq!(alert, "sum by (flow) (rate(pgflow_tasks_failed_total[5m])) > 0");
//! ```

/// Counter: attempts this worker started (every attempt of a task counts).
pub const TASKS_STARTED: &str = "pgflow_tasks_started_total";

/// Counter: tasks whose completion this worker reported and the engine applied.
pub const TASKS_COMPLETED: &str = "pgflow_tasks_completed_total";

/// Counter: failed attempts the engine will retry (the task went back to its queue).
pub const TASKS_RETRIED: &str = "pgflow_tasks_retried_total";

/// Counter: failed attempts that failed their task for good (no attempts left, or a
/// permanent error), which fails the run.
pub const TASKS_FAILED: &str = "pgflow_tasks_failed_total";

/// Counter: tasks whose run was cancelled while this worker ran them (nothing reported).
pub const TASKS_CANCELLED: &str = "pgflow_tasks_cancelled_total";

/// Histogram, seconds: how long a handler ran, from its start to its result (a timeout or a
/// shutdown's cancellation ends it too).
pub const TASK_DURATION: &str = "pgflow_task_duration_seconds";

/// Histogram, seconds: how long a task's first attempt waited in its queue, from the moment it
/// could be read (queued, plus its step's `start_delay`, or the run's scheduled time) until a
/// worker started it. Later attempts are not counted: their wait includes the retry delay.
pub const TASK_QUEUE_WAIT: &str = "pgflow_task_queue_wait_seconds";

/// Gauge: messages of the flow's queue that a worker could read now (sampled every few seconds
/// by each worker serving the flow).
pub const QUEUE_DEPTH: &str = "pgflow_queue_depth";

/// Gauge, seconds: how long the message of the flow's queue that has been readable longest has
/// been waiting (0 when none is); sampled with [`QUEUE_DEPTH`].
pub const QUEUE_OLDEST_MESSAGE_AGE: &str = "pgflow_queue_oldest_message_age_seconds";

/// Gauge: tasks this process's workers hold a slot of their concurrency limit for (handlers
/// running, and results waiting for the reporter).
pub const WORKER_SLOTS_IN_USE: &str = "pgflow_worker_slots_in_use";

/// Gauge: the concurrency limits of this process's running workers, added up.
pub const WORKER_SLOTS: &str = "pgflow_worker_slots";

/// Every name above, for tests and for checking a dashboard's queries.
pub const ALL: &[&str] = &[
    TASKS_STARTED,
    TASKS_COMPLETED,
    TASKS_RETRIED,
    TASKS_FAILED,
    TASKS_CANCELLED,
    TASK_DURATION,
    TASK_QUEUE_WAIT,
    QUEUE_DEPTH,
    QUEUE_OLDEST_MESSAGE_AGE,
    WORKER_SLOTS_IN_USE,
    WORKER_SLOTS,
];
