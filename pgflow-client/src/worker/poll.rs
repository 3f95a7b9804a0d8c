//! One flow's loop: take free permits, read and start that many tasks in one round trip, hand
//! them to the dispatcher, and sleep until woken (a notification, or the queue probe: see
//! [`super::probe`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgflow_core::FlowOptions;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use uuid::Uuid;

use super::backoff::{Backoff, sleep_or_stop};
use super::dispatch;
use super::registry::FlowEntry;
use super::report::Report;
use super::shared::Shared;
use super::slot::Slot;
use super::task::StartedTask;
#[cfg(any(feature = "otel", feature = "metrics"))]
use super::telemetry;
use super::telemetry::TaskTelemetry;

/// Reads messages and starts their tasks in one call (`pgflow._read_and_start`): what
/// `pgmq.read` then `start_tasks` over the ids read do, in one transaction, plus what the worker
/// needs besides the engine's record (the attempt number and the step's timeout). The statement
/// is the same for every flow, so it is prepared once per connection and its plan is generic;
/// the engine reads the queue through the queue's own read function, planned once per session.
/// The input comes as text, decoded task by task ([`decode_input`]).
const FETCH_SQL: &str = "\
SELECT t.run_id, t.step_slug, t.input::text, t.task_index, t.attempt, t.timeout \
  FROM pgflow._read_and_start($1, $3, $2, $4) t";

/// How long a read waits for the handlers of the previous one to hand back their permits,
/// when the previous read got all it asked for (the queue is likely not empty): one full read
/// costs the database much less than several partial ones. Only the places the previous read
/// filled are waited for: a place held since an earlier read is a slow handler's, and the read
/// refills the others without it.
const BATCH_FILL_WAIT: Duration = Duration::from_millis(2);

type FetchRow = (Uuid, String, Option<String>, i32, Option<i32>, Option<i32>);

/// Reads up to `qty` messages of `flow`'s queue and starts their tasks.
async fn fetch(
    pool: &PgPool,
    flow: &FlowEntry,
    vt: i32,
    qty: i32,
) -> sqlx::Result<Vec<StartedTask>> {
    let read_at = Instant::now();
    let rows: Vec<FetchRow> = sqlx::query_as(FETCH_SQL)
        .bind(&*flow.slug)
        .bind(vt)
        .bind(qty)
        .bind(flow.worker_id)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(run_id, step_slug, input, task_index, attempt, timeout)| StartedTask {
                run_id,
                step_slug,
                input: input.as_deref().map_or(Ok(Value::Null), decode_input),
                task_index,
                attempt: attempt.unwrap_or(1),
                // The database names none only for rows it should never hand out.
                timeout: Duration::from_secs(
                    timeout
                        .and_then(|seconds| u64::try_from(seconds).ok())
                        .unwrap_or(u64::from(FlowOptions::DEFAULT_TIMEOUT))
                        .max(1),
                ),
                read_at,
                telemetry: TaskTelemetry::default(),
            },
        )
        .collect())
}

/// Decodes one task's input. Valid jsonb is not always valid for serde_json (nesting past its
/// recursion limit, a number beyond `f64`): decoded row by row, such an input fails its own task
/// instead of the read that started a whole batch of them. An SQL NULL, which the engine should
/// never hand out, is JSON null, as any client of the SQL API would read it.
fn decode_input(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|error| format!("cannot decode the task input: {error}"))
}

/// The loop of one flow; returns when the flow's stop token fires.
pub(crate) async fn run(shared: Arc<Shared>, flow: Arc<FlowEntry>, reports: mpsc::Sender<Report>) {
    let settings = &shared.settings;
    let vt = settings.visibility_timeout;
    let vt = vt.as_secs() + u64::from(vt.subsec_nanos() > 0);
    let vt = i32::try_from(vt).unwrap_or(i32::MAX).max(1);
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(10));
    tracing::debug!(flow_slug = %flow.slug, worker_id = %flow.worker_id, "polling");

    let mut queue_busy = false;
    // The places the last read filled that are still taken.
    let mut last_read = Arc::new(AtomicUsize::new(0));
    // Whether the read of the batch's trace contexts and queue waits has failed (and said so).
    #[cfg(any(feature = "otel", feature = "metrics"))]
    let mut telemetry_warned = false;
    // Nothing is read before the probe (or a notification) says the queue has something: the
    // probe's first look covers every flow in one statement.
    let mut awake = !shared.probe.enabled || woken(&flow).await;
    while awake {
        let Some(mut permits) = take_permits(&shared, &flow, queue_busy, &last_read).await else {
            break;
        };
        let qty = permits.num_permits();
        tracing::trace!(flow_slug = %flow.slug, qty, "reading");
        // Never cancelled half-way: tasks started in the database must be run.
        let result = fetch(
            &shared.pool,
            &flow,
            vt,
            i32::try_from(qty).unwrap_or(i32::MAX),
        )
        .await;
        #[cfg_attr(not(any(feature = "otel", feature = "metrics")), allow(unused_mut))]
        let mut tasks = match result {
            Ok(tasks) => tasks,
            Err(error) => {
                drop(permits);
                warn_fetch_error(&flow, &error, &backoff);
                if backoff.wait(&flow.stop).await {
                    continue;
                }
                break;
            }
        };
        if backoff.failures() > 0 {
            tracing::info!(flow_slug = %flow.slug, "reading tasks again");
        }
        backoff.reset();
        // One call per batch, before any task's span opens: its parent comes from it.
        #[cfg(any(feature = "otel", feature = "metrics"))]
        telemetry::annotate(&shared.pool, &flow, &mut tasks, &mut telemetry_warned).await;
        let started = tasks.len();
        last_read = Arc::new(AtomicUsize::new(0));
        for task in tasks {
            // `qty` permits for at most `qty` tasks.
            let Some(permit) = permits.split(1) else {
                break;
            };
            let slot = Slot::new(permit, &last_read);
            dispatch::spawn(&shared, &flow, task, slot, reports.clone());
        }
        drop(permits);
        // All it asked for, even when slow handlers kept the read under the batch size.
        queue_busy = started == qty;
        if started == qty {
            // A full read: there may be more right away.
            continue;
        }
        awake = if shared.probe.enabled {
            // Notifications announce new steps; only delayed messages (retries, start delays)
            // appear silently: the probe finds out when the next one is due. Without
            // notifications its periodic look covers that too.
            if shared.listening.load(Ordering::Acquire) {
                shared.probe.probe_flow(&flow.slug);
            }
            tracing::trace!(flow_slug = %flow.slug, "idle");
            woken(&flow).await
        } else {
            idle_wait(&shared, &flow).await
        };
    }
    tracing::debug!(flow_slug = %flow.slug, "stopped polling");
}

/// Waits for at least one free permit, then takes as many more as are free, up to the batch
/// size; when `queue_busy`, waits up to [`BATCH_FILL_WAIT`] for the places the last read filled
/// (`last_read` of them are still taken), and for no other. `None` when the flow stops first.
async fn take_permits(
    shared: &Shared,
    flow: &FlowEntry,
    queue_busy: bool,
    last_read: &AtomicUsize,
) -> Option<OwnedSemaphorePermit> {
    let mut permits = tokio::select! {
        biased;
        () = flow.stop.cancelled() => return None,
        permit = Arc::clone(&shared.semaphore).acquire_owned() => permit.ok()?,
    };
    let batch = shared.settings.batch_size;
    if batch > 1 {
        // Handlers of one batch tend to finish together: let the others release theirs.
        tokio::task::yield_now().await;
        let more = shared.semaphore.available_permits().min(batch - 1);
        if more > 0 {
            let more = u32::try_from(more).unwrap_or(u32::MAX);
            if let Ok(extra) = Arc::clone(&shared.semaphore).try_acquire_many_owned(more) {
                permits.merge(extra);
            }
        }
        let missing = batch
            .saturating_sub(permits.num_permits())
            .min(last_read.load(Ordering::Acquire));
        if queue_busy && missing > 0 {
            let missing = u32::try_from(missing).unwrap_or(u32::MAX);
            let fill = Arc::clone(&shared.semaphore).acquire_many_owned(missing);
            tokio::select! {
                biased;
                () = flow.stop.cancelled() => {}
                result = tokio::time::timeout(BATCH_FILL_WAIT, fill) => {
                    if let Ok(Ok(extra)) = result {
                        permits.merge(extra);
                    }
                }
            }
        }
    }
    Some(permits)
}

/// How long until the next message of `flow`'s queue becomes visible; `None` when the queue is
/// empty.
async fn next_visible(pool: &PgPool, flow: &FlowEntry) -> sqlx::Result<Option<Duration>> {
    let seconds: Option<f64> = sqlx::query_scalar(&flow.next_visible_sql)
        .fetch_one(pool)
        .await?;
    Ok(seconds.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)))
}

/// The wait of a worker's only flow (no probe): sleeps until new tasks may be there; `false`
/// when the flow stops first.
async fn idle_wait(shared: &Shared, flow: &FlowEntry) -> bool {
    let settings = &shared.settings;
    let wait = if shared.listening.load(Ordering::Acquire) {
        // Notifications announce new steps; only delayed messages (retries, start delays)
        // appear silently, so sleep until the next one is due.
        match next_visible(&shared.pool, flow).await {
            // A message due now is locked by another reader: look again shortly.
            Ok(Some(due)) => due
                .max(settings.poll_interval.min(Duration::from_millis(10)))
                .min(settings.max_poll_wait),
            Ok(None) => settings.max_poll_wait,
            Err(error) => {
                tracing::debug!(flow_slug = %flow.slug, %error, "cannot read the queue's next visibility time");
                settings.poll_interval
            }
        }
    } else {
        settings.poll_interval
    };
    tracing::trace!(flow_slug = %flow.slug, ?wait, "idle");
    tokio::select! {
        () = flow.wake.notified() => true,
        ok = sleep_or_stop(wait, &flow.stop) => ok,
    }
}

/// Waits until new tasks may be there (a notification, the probe); `false` when the flow stops
/// first.
async fn woken(flow: &FlowEntry) -> bool {
    tokio::select! {
        biased;
        () = flow.stop.cancelled() => false,
        () = flow.wake.notified() => true,
    }
}

fn warn_fetch_error(flow: &FlowEntry, error: &sqlx::Error, backoff: &Backoff) {
    let missing_queue = error
        .as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "42P01");
    if missing_queue {
        // Compiled later, by a deployment or another process: keep trying, say it once.
        if backoff.failures() == 0 {
            tracing::warn!(
                flow_slug = %flow.slug,
                "flow has no queue in this database (not compiled yet?); retrying"
            );
        }
    } else {
        tracing::warn!(flow_slug = %flow.slug, %error, "cannot read tasks; retrying");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_serde_json_cannot_hold_are_reasons_not_errors() {
        assert_eq!(
            decode_input(r#"{"run": [1]}"#),
            Ok(serde_json::json!({"run": [1]}))
        );
        let deep = format!("{}0{}", "[".repeat(130), "]".repeat(130));
        let reason = decode_input(&deep).unwrap_err();
        assert!(
            reason.starts_with("cannot decode the task input: recursion limit exceeded"),
            "{reason}"
        );
        // What PostgreSQL prints for the jsonb number 1e400.
        let huge = format!("1{}", "0".repeat(400));
        let reason = decode_input(&huge).unwrap_err();
        assert!(
            reason.starts_with("cannot decode the task input: number out of range"),
            "{reason}"
        );
    }
}
