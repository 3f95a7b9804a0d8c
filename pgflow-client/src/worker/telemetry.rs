//! What the worker tells the application's telemetry about each task: its span (a child of its
//! run's stored trace context with feature `otel`), and its metrics (feature `metrics`, named in
//! [`crate::metric_names`]). Without these features the functions here do nothing, the
//! per-batch read is not compiled, and [`TaskTelemetry`] holds nothing.

use std::sync::Arc;
use std::time::Duration;

#[cfg(any(feature = "otel", feature = "metrics"))]
use sqlx::PgPool;

use super::registry::FlowEntry;
use super::task::StartedTask;

/// What the database tells about a started task besides the engine's record, read for a whole
/// batch at once by [`annotate`].
#[derive(Debug, Default)]
pub(crate) struct TaskTelemetry {
    /// The trace context of the code that started the task's run.
    #[cfg(feature = "otel")]
    pub(crate) parent: Option<opentelemetry::Context>,
    /// How long the task's first attempt waited in the queue.
    #[cfg(feature = "metrics")]
    pub(crate) queue_wait: Option<Duration>,
}

/// Reads, in one call for the whole batch (`pgflow.started_task_telemetry`), the trace
/// contexts of the runs of `tasks` and their first attempts' queue waits, into each task's
/// [`TaskTelemetry`]. A failure (a role not granted the function, an engine older than
/// migration 0012) costs the batch its parents and waits, never its tasks: it is logged, at
/// WARN the first time (`warned` remembers it) and at DEBUG while it lasts.
#[cfg(any(feature = "otel", feature = "metrics"))]
pub(crate) async fn annotate(
    pool: &PgPool,
    flow: &FlowEntry,
    tasks: &mut [StartedTask],
    warned: &mut bool,
) {
    type Row = (i64, Option<String>, Option<String>, Option<f64>);
    if tasks.is_empty() {
        return;
    }
    let run_ids: Vec<uuid::Uuid> = tasks.iter().map(|task| task.run_id).collect();
    let step_slugs: Vec<&str> = tasks.iter().map(|task| task.step_slug.as_str()).collect();
    let task_indexes: Vec<i32> = tasks.iter().map(|task| task.task_index).collect();
    let rows: sqlx::Result<Vec<Row>> = sqlx::query_as(
        "SELECT ord, traceparent, tracestate, queue_wait \
           FROM pgflow.started_task_telemetry($1, $2, $3, $4, $5)",
    )
    .bind(&*flow.slug)
    .bind(flow.worker_id)
    .bind(&run_ids)
    .bind(&step_slugs)
    .bind(&task_indexes)
    .fetch_all(pool)
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(error) => {
            if *warned {
                tracing::debug!(flow_slug = %flow.slug, %error, "cannot read the trace context of started tasks");
            } else {
                tracing::warn!(
                    flow_slug = %flow.slug,
                    %error,
                    "cannot read the trace context and queue wait of started tasks: their spans \
                     start new traces and their wait is not measured (is the worker's role \
                     granted pgflow.started_task_telemetry?)"
                );
                *warned = true;
            }
            return;
        }
    };
    *warned = false;
    for (ord, traceparent, tracestate, queue_wait) in rows {
        let Some(task) = usize::try_from(ord)
            .ok()
            .and_then(|ord| ord.checked_sub(1))
            .and_then(|index| tasks.get_mut(index))
        else {
            continue;
        };
        #[cfg(feature = "otel")]
        {
            task.telemetry.parent = traceparent.as_deref().and_then(|traceparent| {
                crate::trace_context::parent(traceparent, tracestate.as_deref())
            });
        }
        #[cfg(feature = "metrics")]
        {
            task.telemetry.queue_wait =
                queue_wait.and_then(|seconds| Duration::try_from_secs_f64(seconds).ok());
        }
        #[cfg(not(feature = "otel"))]
        let _ = (traceparent, tracestate);
        #[cfg(not(feature = "metrics"))]
        let _ = queue_wait;
    }
}

/// The span a task runs in: a root, or with feature `otel` a child of its run's trace context.
/// Its fields name the task and the worker row that started it; INFO, so that the usual filter
/// keeps it (the events inside have their own levels).
pub(crate) fn task_span(flow: &FlowEntry, task: &mut StartedTask) -> tracing::Span {
    // `parent: None`: whatever span the poller happens to be in is no parent of the task.
    let span = tracing::info_span!(
        parent: None,
        "task",
        otel.name = tracing::field::Empty,
        flow_slug = %flow.slug,
        step_slug = %task.step_slug,
        run_id = %task.run_id,
        task_index = task.task_index,
        attempt = task.attempt,
        worker_id = %flow.worker_id,
    );
    #[cfg(feature = "otel")]
    {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        // What trace viewers list: "task" alone says nothing.
        span.record(
            "otel.name",
            tracing::field::display(format_args!("{} {}", flow.slug, task.step_slug)),
        );
        if let Some(parent) = task.telemetry.parent.take() {
            // An error means no OpenTelemetry layer sees the span: nothing to link then.
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// A task started: counted, and its queue wait recorded when known.
pub(crate) fn task_started(flow: &Arc<str>, step: &Arc<str>, telemetry: &TaskTelemetry) {
    #[cfg(feature = "metrics")]
    {
        use crate::metric_names as names;
        metrics::counter!(names::TASKS_STARTED, "flow" => Arc::clone(flow), "step" => Arc::clone(step))
            .increment(1);
        if let Some(wait) = telemetry.queue_wait {
            metrics::histogram!(names::TASK_QUEUE_WAIT, "flow" => Arc::clone(flow), "step" => Arc::clone(step))
                .record(wait.as_secs_f64());
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (flow, step, telemetry);
}

/// A handler returned (or was stopped by its timeout or a shutdown) after `elapsed`.
pub(crate) fn handler_finished(flow: &Arc<str>, step: &Arc<str>, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(
        crate::metric_names::TASK_DURATION,
        "flow" => Arc::clone(flow),
        "step" => Arc::clone(step)
    )
    .record(elapsed.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (flow, step, elapsed);
}

/// What became of a task, once the engine has said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    Completed,
    /// Failed, and queued again for another attempt.
    Retried,
    /// Failed for good.
    Failed,
    /// Its run was cancelled while it ran.
    Cancelled,
}

/// Counts a task's end.
pub(crate) fn task_settled(flow: &Arc<str>, step: &Arc<str>, settled: Settled) {
    #[cfg(feature = "metrics")]
    {
        use crate::metric_names as names;
        let name = match settled {
            Settled::Completed => names::TASKS_COMPLETED,
            Settled::Retried => names::TASKS_RETRIED,
            Settled::Failed => names::TASKS_FAILED,
            Settled::Cancelled => names::TASKS_CANCELLED,
        };
        metrics::counter!(name, "flow" => Arc::clone(flow), "step" => Arc::clone(step))
            .increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (flow, step, settled);
}

/// One slot of a worker's concurrency limit held by a task, counted in
/// [`WORKER_SLOTS_IN_USE`](crate::metric_names::WORKER_SLOTS_IN_USE) while it lives. An
/// increment and a decrement rather than a sampled value: several workers of one process add up.
#[derive(Debug)]
pub(crate) struct SlotInUse(());

impl SlotInUse {
    pub(crate) fn take() -> Self {
        #[cfg(feature = "metrics")]
        metrics::gauge!(crate::metric_names::WORKER_SLOTS_IN_USE).increment(1.0);
        Self(())
    }
}

impl Drop for SlotInUse {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        metrics::gauge!(crate::metric_names::WORKER_SLOTS_IN_USE).decrement(1.0);
    }
}

/// A worker's concurrency limit, counted in
/// [`WORKER_SLOTS`](crate::metric_names::WORKER_SLOTS) while the worker runs; also describes
/// the metrics to the recorder.
#[derive(Debug)]
pub(crate) struct WorkerSlots(f64);

impl WorkerSlots {
    pub(crate) fn open(concurrency: usize) -> Self {
        // At most 2^20 (checked by `spawn`): exact in an f64.
        #[allow(clippy::cast_precision_loss)]
        let slots = concurrency as f64;
        #[cfg(feature = "metrics")]
        {
            describe();
            metrics::gauge!(crate::metric_names::WORKER_SLOTS).increment(slots);
        }
        Self(slots)
    }
}

impl Drop for WorkerSlots {
    fn drop(&mut self) {
        let slots = self.0;
        #[cfg(feature = "metrics")]
        metrics::gauge!(crate::metric_names::WORKER_SLOTS).decrement(slots);
        #[cfg(not(feature = "metrics"))]
        let _ = slots;
    }
}

/// Tells the recorder what each metric is (Prometheus prints it as `# HELP`).
#[cfg(feature = "metrics")]
fn describe() {
    use metrics::Unit;

    use crate::metric_names as names;
    metrics::describe_counter!(names::TASKS_STARTED, Unit::Count, "Task attempts started");
    metrics::describe_counter!(
        names::TASKS_COMPLETED,
        Unit::Count,
        "Tasks completed (reported and applied)"
    );
    metrics::describe_counter!(
        names::TASKS_RETRIED,
        Unit::Count,
        "Failed attempts the engine retries"
    );
    metrics::describe_counter!(
        names::TASKS_FAILED,
        Unit::Count,
        "Failed attempts that failed their task for good"
    );
    metrics::describe_counter!(
        names::TASKS_CANCELLED,
        Unit::Count,
        "Tasks whose run was cancelled while they ran"
    );
    metrics::describe_histogram!(names::TASK_DURATION, Unit::Seconds, "How long handlers ran");
    metrics::describe_histogram!(
        names::TASK_QUEUE_WAIT,
        Unit::Seconds,
        "How long first attempts waited in their queue"
    );
    metrics::describe_gauge!(
        names::QUEUE_DEPTH,
        Unit::Count,
        "Messages a worker could read now"
    );
    metrics::describe_gauge!(
        names::QUEUE_OLDEST_MESSAGE_AGE,
        Unit::Seconds,
        "How long the longest-readable message has waited"
    );
    metrics::describe_gauge!(
        names::WORKER_SLOTS_IN_USE,
        Unit::Count,
        "Concurrency slots held by tasks"
    );
    metrics::describe_gauge!(
        names::WORKER_SLOTS,
        Unit::Count,
        "Concurrency slots of the running workers"
    );
}
