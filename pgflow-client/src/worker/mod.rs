//! The worker: runs the handlers of one or more flows inside the application's Tokio runtime.
//!
//! A [`Worker`] is built over a [`PgPool`] with [`Worker::builder`], given flows (typed, with
//! their handlers) and untyped handlers (by flow slug and step slug, for flows compiled
//! elsewhere), and [spawned](WorkerBuilder::spawn) onto the current runtime. The returned
//! [`WorkerHandle`] reads counters and shuts the worker down gracefully.
//!
//! # How it works
//!
//! For each flow the worker keeps one row in `pgflow.workers` (`queue_name` = the flow slug,
//! `function_name` = `rust:<flow slug>`) and one polling loop. A loop takes as many permits of the
//! worker-wide concurrency limit as are free (at most the batch size), then reads that many
//! messages from the flow's queue and starts their tasks, in one call and one round trip
//! (`pgflow._read_and_start`: what `pgmq.read` then `pgflow.start_tasks` do, with each message
//! hidden for its step's timeout at once). Each task's handler runs in its own
//! Tokio task, holding one permit, so no more than [`concurrency`](WorkerBuilder::concurrency)
//! handlers ever run at once across all flows.
//!
//! Results go to a reporter that completes finished tasks in batches with the engine's
//! `pgflow.complete_tasks` (one call and one transaction for every task finished, by any
//! handler of the worker, while the previous report was in flight: no timer, so a lone task is
//! reported at once) and fails tasks one by one with `pgflow.fail_task`. A handler that hands
//! its result over frees its place at once, so the worker reads again while the report is in
//! flight, up to a backlog of one result per place waiting for the reporter; past it, or while
//! a report is failing and being retried, finished handlers keep their places and nothing more
//! is read. A read waits a moment (2 ms at most) for the places its predecessor filled, when
//! that one got all it asked for, and never for a place a slow handler has held since earlier.
//!
//! An idle loop reads nothing until something can be there: the engine's notification that it
//! queued tasks of its flow (channel `pgflow_tasks`, payload the flow slug), or, in a worker of
//! several flows, the worker's one probe of all its queues (`pgflow.queue_probe`, a single statement whatever the number of
//! flows), which wakes the loops whose queue has a visible message, when the next delayed
//! message of a queue becomes visible (retry backoff, `start_delay`), and looks at every queue at
//! least once per [`max_poll_wait`](WorkerBuilder::max_poll_wait). While notifications are
//! unavailable it probes every [`poll_interval`](WorkerBuilder::poll_interval) instead. A worker
//! of one flow has no probe: its loop looks up when its queue's next message is due as it goes
//! idle, and reads at least once per `max_poll_wait` (`poll_interval` without notifications).
//!
//! # Failures
//!
//! - A handler's [`StepError`], or a panic (its payload becomes the message), fails the attempt
//!   with `pgflow.fail_task`; the engine retries it per the step's `max_attempts` and
//!   `base_delay`, or after the delay the handler chose with [`StepError::retry_after`] (whole
//!   seconds, rounded up). A [`StepError::no_retry`] error fails the task at once: the worker
//!   passes `permanent` to `fail_task`, which fails the task whatever attempts are left and keeps
//!   its `attempts_count` as it is (the attempts actually made). The error message says so.
//! - A handler still running after the step's timeout (`coalesce(step timeout, flow timeout)`,
//!   60 s when neither is set) has its cancellation token fired, is dropped, and its attempt fails.
//! - Lost connections are retried with capped, jittered exponential backoff. A report whose
//!   outcome is unknown (the connection broke mid-call) is retried only for tasks still
//!   `started` by this worker with the same attempt, so no result is ever applied twice.
//!
//! # Cancelled runs
//!
//! `pgflow.cancel_run` marks a run's queued and started tasks cancelled and notifies
//! `pgflow_cancel` with the run id, which the worker listens to on the same connection as
//! `pgflow_tasks`. Within about a second the worker fires the cancellation token of each task of
//! the run it is running ([`StepContext::cancellation_token`]), polls the handler once more so
//! that one watching its token can return, and drops a handler that ignores it at the await it
//! is suspended in (one that never awaits cannot be stopped). It reports nothing for these tasks
//! (the engine would ignore any report), frees their places under the concurrency limit at once,
//! logs each at INFO ("task cancelled: its run was cancelled") and counts it in
//! [`WorkerStats::cancelled`]. Notifications sent while the listening connection was down are
//! lost: on reconnecting, and at each heartbeat while not listening (as with
//! [`notifications(false)`](WorkerBuilder::notifications)), the worker looks the runs of its
//! running tasks up and cancels those found cancelled. A result that reaches the engine just
//! after its run was cancelled changes nothing and is logged at INFO.
//!
//! # Shutdown
//!
//! On [`WorkerHandle::shutdown`], the [shutdown token](WorkerBuilder::shutdown_token), SIGINT or
//! SIGTERM ([`shutdown_on_signal`](WorkerBuilder::shutdown_on_signal)), or when every one of its
//! `pgflow.workers` rows has been marked deprecated by someone else: the worker stops reading,
//! lets running handlers finish for up to [`shutdown_timeout`](WorkerBuilder::shutdown_timeout),
//! reports them, then cancels the ones still running and fails their attempts (so the engine
//! retries them), and finally sets `deprecated_at` on its rows. A single deprecated row only
//! stops that flow's loop.
//!
//! # Telemetry
//!
//! Each task runs in a `tracing` span named `task` (INFO) with its `run_id`, `flow_slug`,
//! `step_slug`, `task_index`, `attempt` and `worker_id`. With feature `otel` that span is a
//! child of the trace context the run was started in, read from the database once per batch;
//! with feature `metrics` the worker counts its tasks and samples its queues through the
//! `metrics` facade ([`metric_names`](crate::metric_names)). docs/operating.md, "Tracing" and
//! "Metrics", shows the setup.
//!
//! [`StepError`]: pgflow_core::StepError
//! [`StepError::no_retry`]: pgflow_core::StepError::no_retry
//! [`StepError::retry_after`]: pgflow_core::StepError::retry_after
//! [`StepContext::cancellation_token`]: pgflow_core::StepContext::cancellation_token

// The public face is `builder`, `handle` and `context`; `spawn` hands the rest to `supervisor`,
// which runs `heartbeat`, `listen`, one `poll` loop per flow (each `task` it starts goes to
// `dispatch`, whose results go to `report`). Dependencies run in that direction only. `running`
// holds the dispatched tasks by run, for `listen` (and `heartbeat`) to cancel. `telemetry` is
// what `dispatch` and `report` tell the application's tracing and metrics; `queue_gauges`
// samples the queues for the metrics. `requeue` is the stalled-task timer.
mod backoff;
mod builder;
mod context;
mod dispatch;
mod handle;
mod heartbeat;
mod listen;
mod poll;
mod probe;
mod prune;
#[cfg(feature = "metrics")]
mod queue_gauges;
mod registry;
mod report;
mod requeue;
mod running;
mod scheduler;
mod schema_check;
mod settings;
mod shared;
mod slot;
mod supervisor;
mod task;
mod telemetry;

pub use builder::WorkerBuilder;
pub use context::StepContextExt;
pub use handle::{WorkerHandle, WorkerStats};
pub use prune::PRUNE_LOCK_KEY;
pub(crate) use settings::DEFAULT_HEARTBEAT_INTERVAL;

use sqlx::PgPool;

/// Runs the handlers of flows: the entry point is [`Worker::builder`].
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool, flow: pgflow_core::Flow<u64>) -> pgflow_client::Result<()> {
/// use pgflow_client::Worker;
///
/// let worker = Worker::builder(pool).flow(flow).concurrency(20).spawn()?;
/// // ... the application runs ...
/// worker.shutdown().await?; // stops reading, finishes in-flight tasks
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    _private: (),
}

impl Worker {
    /// Starts configuring a worker that talks to the database through `pool`.
    ///
    /// The worker takes a few connections of its own from the pool (one per flow while reading,
    /// one while reporting results, one for heartbeats), plus whatever the handlers use through
    /// [`StepContextExt::pool`]; size the pool for both. Notifications use one dedicated
    /// connection opened with the pool's connect options, outside the pool.
    pub fn builder(pool: PgPool) -> WorkerBuilder {
        WorkerBuilder::new(pool)
    }
}
