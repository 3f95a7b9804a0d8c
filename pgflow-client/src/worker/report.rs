//! Reporting results: completions batched into `pgflow.complete_tasks`, failures through
//! `pgflow.fail_task`, retried when the database is unreachable and never applied twice.
//!
//! Batching needs no timer. One report is in flight at a time; whatever finishes meanwhile
//! waits in the channel and goes out together in the next call. A lone task is reported the
//! moment it finishes, and under load the batches grow by themselves.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use sqlx::types::Json;
use tokio::sync::{Semaphore, mpsc};
use uuid::Uuid;

use super::backoff::Backoff;
use super::registry::FlowEntry;
use super::shared::Shared;
use super::telemetry::{self, Settled};

/// Reports in flight at once. With one, whatever finishes while a report commits goes out in
/// the next call, so under load a call carries about everything one read started. A second
/// report in flight split those batches in two, and each call costs the database a fixed
/// amount of work: chain5 took 10% more server CPU per task with two (README, "Performance").
const SLOTS: usize = 1;
/// The most tasks in one `complete_tasks` call.
const MAX_BATCH: usize = 1000;
/// Results that may wait for the reporter, per place under the concurrency limit. A handler
/// hands its result over and frees its place at once while fewer wait, so the next read goes
/// out while a report is in flight; past it, finished handlers keep their places and the worker
/// reads nothing more until the database takes the reports. Four per place (issue 24) let the
/// worker start four times its concurrency in tasks whose reports could not go through: with
/// every connection of the worker terminated every 150 ms
/// (`reliability::connection::runs_complete_while_worker_connections_are_terminated_again_and_again`)
/// tasks were still `started` after 90 s, twice in two runs of the reliability tests, while one
/// per place passed; kept at one until that is understood.
const BACKLOG_PER_SLOT: usize = 1;

/// How many results may wait for the reporter in a worker of `concurrency` handlers: never
/// fewer than one per place, more than one call carries only when that is fewer.
pub(crate) fn backlog(concurrency: usize) -> usize {
    concurrency
        .saturating_mul(BACKLOG_PER_SLOT)
        .min(MAX_BATCH)
        .max(concurrency)
}

/// Which attempt of which task a result belongs to.
#[derive(Debug, Clone)]
pub(crate) struct TaskKey {
    pub(crate) run_id: Uuid,
    pub(crate) step_slug: Arc<str>,
    pub(crate) task_index: i32,
    pub(crate) attempt: i32,
    /// The flow, whose worker row started the task.
    pub(crate) flow: Arc<FlowEntry>,
}

/// How a handler's run ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Completed(Value),
    Failed {
        message: String,
        /// `false` when the handler asked not to retry ([`pgflow_core::StepError::no_retry`]).
        retry: bool,
        /// The handler's choice of delay before the next attempt
        /// ([`pgflow_core::StepError::retry_after`]); `None`: the step's backoff.
        retry_delay: Option<Duration>,
    },
}

impl Outcome {
    /// A failure retried (or not) after the step's backoff.
    pub(crate) fn failed(message: String, retry: bool) -> Self {
        Self::Failed {
            message,
            retry,
            retry_delay: None,
        }
    }
}

/// One finished task, for the reporter.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) key: TaskKey,
    pub(crate) outcome: Outcome,
    /// The task's span, for what is logged while reporting it.
    pub(crate) span: tracing::Span,
}

/// A completed task.
struct Done {
    key: TaskKey,
    output: Value,
    span: tracing::Span,
}

/// A failed attempt.
struct Failure {
    key: TaskKey,
    message: String,
    retry: bool,
    retry_delay: Option<Duration>,
    span: tracing::Span,
}

/// The reporter; returns once the channel is closed and every report is done.
pub(crate) async fn run(shared: Arc<Shared>, mut reports: mpsc::Receiver<Report>) {
    let slots = Arc::new(Semaphore::new(SLOTS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let Some(first) = reports.recv().await else {
            break;
        };
        let mut batch = vec![first];
        drain(&mut reports, &mut batch);
        // Handlers of one read often finish together: let them hand over their results.
        tokio::task::yield_now().await;
        drain(&mut reports, &mut batch);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            flush(&shared, batch).await;
            drop(slot);
        });
    }
    // Wait for the reports still in flight.
    let _all = slots.acquire_many(u32::try_from(SLOTS).unwrap_or(1)).await;
}

fn drain(reports: &mut mpsc::Receiver<Report>, batch: &mut Vec<Report>) {
    while batch.len() < MAX_BATCH {
        match reports.try_recv() {
            Ok(report) => batch.push(report),
            Err(_) => break,
        }
    }
}

async fn flush(shared: &Shared, batch: Vec<Report>) {
    let mut done = Vec::with_capacity(batch.len());
    let mut failures = Vec::new();
    for report in batch {
        match report.outcome {
            Outcome::Completed(output) => done.push(Done {
                key: report.key,
                output,
                span: report.span,
            }),
            Outcome::Failed {
                message,
                retry,
                retry_delay,
            } => failures.push(Failure {
                key: report.key,
                message,
                retry,
                retry_delay,
                span: report.span,
            }),
        }
    }
    if !done.is_empty() {
        complete(shared, done).await;
    }
    for failure in failures {
        fail(shared, failure).await;
    }
    // Reported, refused or given up on: nothing of this batch is retried any more.
    reported(shared);
}

/// What an error tells about the statement that raised it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// It certainly changed nothing and may succeed later: retry as is.
    NotApplied,
    /// It may or may not have committed: retry only what is still ours to report.
    Unknown,
    /// The database refused it and will again (bad data): do not retry as is.
    Refused,
    /// The pool was closed: nothing more can be sent.
    Closed,
}

fn verdict(error: &sqlx::Error) -> Verdict {
    match error {
        sqlx::Error::PoolTimedOut => Verdict::NotApplied,
        sqlx::Error::PoolClosed => Verdict::Closed,
        sqlx::Error::Database(db) => match db.code().as_deref().map(|code| code.get(..2)) {
            // transaction rollback (serialization failure, deadlock): nothing was applied
            Some(Some("40")) => Verdict::NotApplied,
            // connection exception, operator intervention, insufficient resources, system
            // error, internal error: the server or the session went away
            Some(Some("08" | "57" | "53" | "58" | "XX")) => Verdict::Unknown,
            _ => Verdict::Refused,
        },
        _ => Verdict::Unknown,
    }
}

/// Completes `tasks` in one call, retrying until it is known to have happened.
async fn complete(shared: &Shared, mut tasks: Vec<Done>) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut verify = false;
    loop {
        if verify {
            match still_started(shared, tasks.iter().map(|task| &task.key)).await {
                Ok(ours) => {
                    reported(shared);
                    let before = tasks.len();
                    let mut position = 0;
                    tasks.retain(|task| {
                        position += 1;
                        let ours = ours.contains(&(position - 1));
                        // No longer ours: the call that broke did land (counted as in `settle`).
                        if !ours {
                            telemetry::task_settled(
                                &task.key.flow.slug,
                                &task.key.step_slug,
                                Settled::Completed,
                            );
                        }
                        ours
                    });
                    settle(shared, before - tasks.len(), 0);
                    if tasks.is_empty() {
                        return;
                    }
                    verify = false;
                }
                Err(error) => {
                    if !retry_later(shared, &mut backoff, &error, tasks.len()).await {
                        abandon(shared, tasks.len());
                        return;
                    }
                    continue;
                }
            }
        }
        let error = match complete_tasks(shared, &tasks).await {
            Ok(()) => {
                reported(shared);
                if backoff.failures() > 0 {
                    tracing::info!(tasks = tasks.len(), "reported completions after retrying");
                }
                tracing::trace!(tasks = tasks.len(), "reported completions");
                settle(shared, tasks.len(), 0);
                return;
            }
            Err(error) => error,
        };
        match verdict(&error) {
            Verdict::Refused if tasks.len() > 1 => {
                // One bad output (say, a string with \u0000) must not sink the others.
                tracing::warn!(%error, tasks = tasks.len(), "batch completion refused; reporting one by one");
                for task in tasks {
                    Box::pin(complete(shared, vec![task])).await;
                }
                return;
            }
            Verdict::Refused => {
                let Some(task) = tasks.pop() else { return };
                let message = format!("the step output could not be stored: {error}");
                task.span
                    .in_scope(|| tracing::error!(%error, "the step output could not be stored"));
                let failure = Failure {
                    key: task.key,
                    message,
                    retry: true,
                    retry_delay: None,
                    span: task.span,
                };
                fail(shared, failure).await;
                return;
            }
            Verdict::Closed => {
                abandon(shared, tasks.len());
                return;
            }
            Verdict::Unknown => verify = true,
            Verdict::NotApplied => {}
        }
        if !retry_later(shared, &mut backoff, &error, tasks.len()).await {
            abandon(shared, tasks.len());
            return;
        }
    }
}

async fn complete_tasks(shared: &Shared, tasks: &[Done]) -> sqlx::Result<()> {
    let mut run_ids = Vec::with_capacity(tasks.len());
    let mut step_slugs = Vec::with_capacity(tasks.len());
    let mut task_indexes = Vec::with_capacity(tasks.len());
    let mut outputs = Vec::with_capacity(tasks.len());
    let mut attempts = Vec::with_capacity(tasks.len());
    let mut worker_ids = Vec::with_capacity(tasks.len());
    for task in tasks {
        run_ids.push(task.key.run_id);
        step_slugs.push(&*task.key.step_slug);
        task_indexes.push(task.key.task_index);
        outputs.push(Json(&task.output));
        attempts.push(task.key.attempt);
        worker_ids.push(task.key.flow.worker_id);
    }
    // The keys only: the rows would carry the outputs back.
    let applied: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT t.run_id, t.step_slug, t.task_index \
           FROM pgflow.complete_tasks($1::uuid[], $2::text[], $3::int4[], $4::jsonb[], \
                                      $5::int4[], $6::uuid[]) t",
    )
    .bind(&run_ids)
    .bind(&step_slugs)
    .bind(&task_indexes)
    .bind(outputs)
    .bind(attempts)
    .bind(worker_ids)
    .fetch_all(&shared.pool)
    .await?;
    if applied.len() == tasks.len() {
        for task in tasks {
            telemetry::task_settled(&task.key.flow.slug, &task.key.step_slug, Settled::Completed);
        }
    } else {
        for task in tasks {
            let key = &task.key;
            let landed = applied.iter().any(|(run_id, step_slug, task_index)| {
                *run_id == key.run_id
                    && **step_slug == *key.step_slug
                    && *task_index == key.task_index
            });
            if landed {
                telemetry::task_settled(&key.flow.slug, &key.step_slug, Settled::Completed);
            } else if shared.running.recently_cancelled(key.run_id) {
                task.span.in_scope(|| {
                    tracing::info!(
                        "completion not applied: the task's run was cancelled meanwhile"
                    );
                });
            } else {
                task.span.in_scope(|| {
                    tracing::info!(
                        "completion not applied: this attempt is no longer the task's current \
                         one (it ran past its timeout and was started again), its run failed \
                         on the output's type, or its run was cancelled"
                    );
                });
            }
        }
    }
    Ok(())
}

/// Fails one attempt, retrying until it is known to have happened.
async fn fail(shared: &Shared, failure: Failure) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut verify = false;
    loop {
        if verify {
            match still_started(shared, std::iter::once(&failure.key)).await {
                Ok(ours) if ours.is_empty() => {
                    settle(shared, 0, 1);
                    return;
                }
                Ok(_) => verify = false,
                Err(error) => {
                    if !retry_later(shared, &mut backoff, &error, 1).await {
                        abandon(shared, 1);
                        return;
                    }
                    continue;
                }
            }
        }
        let error = match fail_task(shared, &failure).await {
            Ok(()) => {
                reported(shared);
                settle(shared, 0, 1);
                // A retried task's message becomes visible again without any notification:
                // let the flow's loop see when.
                failure.key.flow.wake.notify_one();
                return;
            }
            Err(error) => error,
        };
        match verdict(&error) {
            Verdict::Refused => {
                failure.span.in_scope(|| {
                    tracing::error!(%error, "the database refused to fail the task; it stays started");
                });
                abandon(shared, 1);
                return;
            }
            Verdict::Closed => {
                abandon(shared, 1);
                return;
            }
            Verdict::Unknown => verify = true,
            Verdict::NotApplied => {}
        }
        if !retry_later(shared, &mut backoff, &error, 1).await {
            abandon(shared, 1);
            return;
        }
    }
}

/// Fails the attempt `key` names, and only that attempt; a permanent failure is not retried
/// whatever attempts are left, and a retried one waits the handler's delay if it chose one. Logs
/// the failure at the level of its consequence: WARN when the engine retries the task (with the
/// attempt and the delay), ERROR when the task has failed for good, which fails its run (WARN
/// when its step's `when_exhausted` skipped the step instead), INFO when the engine ignored it.
async fn fail_task(shared: &Shared, failure: &Failure) -> sqlx::Result<()> {
    let key = &failure.key;
    let retry_delay = failure
        .retry_delay
        .filter(|_| failure.retry)
        .map(delay_seconds);
    let row: Option<(String, i32, Option<i64>)> = sqlx::query_as(
        "SELECT status::text, attempts_count, message_id \
           FROM pgflow.fail_task($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(key.run_id)
    .bind(&*key.step_slug)
    .bind(key.task_index)
    .bind(&failure.message)
    .bind(key.attempt)
    .bind(key.flow.worker_id)
    .bind(!failure.retry)
    .bind(retry_delay)
    .fetch_optional(&shared.pool)
    .await?;
    match row {
        // A cancellation that came after the handler had finished: not the worker's failure.
        None if shared.running.recently_cancelled(key.run_id) => ignored_by_cancel(failure),
        Some((status, _, _)) if status == "cancelled" => ignored_by_cancel(failure),
        None => failure.span.in_scope(|| {
            tracing::info!(
                error = %failure.message,
                "failure not applied: this attempt is no longer the task's current one (it ran \
                 past its timeout and was started again) or its run was cancelled"
            );
        }),
        Some((status, attempt, message_id)) if status == "queued" => {
            // A second statement: the first one's snapshot predates the new visibility time.
            let retry_in = match message_id {
                Some(id) => retry_in(shared, key, id).await,
                None => None,
            };
            telemetry::task_settled(&key.flow.slug, &key.step_slug, Settled::Retried);
            failure.span.in_scope(|| match retry_in {
                Some(delay) => tracing::warn!(
                    error = %failure.message, attempt, retry_in = ?delay, "task failed; retrying"
                ),
                None => tracing::warn!(error = %failure.message, attempt, "task failed; retrying"),
            });
        }
        Some((_, attempt, _)) => {
            telemetry::task_settled(&key.flow.slug, &key.step_slug, Settled::Failed);
            // The step's when_exhausted decided what followed (migration 0010): asked only
            // here, where a task has failed for good, which is rare.
            let step: Option<String> = sqlx::query_scalar(
                "SELECT status FROM pgflow.step_states WHERE run_id = $1 AND step_slug = $2",
            )
            .bind(key.run_id)
            .bind(&*key.step_slug)
            .fetch_optional(&shared.pool)
            .await
            .unwrap_or(None);
            failure.span.in_scope(|| {
                if step.as_deref() == Some("skipped") {
                    tracing::warn!(
                        error = %failure.message, attempt,
                        "task failed for good; its step is skipped (when_exhausted) and the run goes on"
                    );
                } else {
                    tracing::error!(error = %failure.message, attempt, "task failed for good; its run fails");
                }
            });
        }
    }
    Ok(())
}

fn ignored_by_cancel(failure: &Failure) {
    failure.span.in_scope(|| {
        tracing::info!(
            error = %failure.message,
            "failure not applied: the task's run was cancelled meanwhile"
        );
    });
}

/// `delay` in the engine's unit: whole seconds, rounded up so that the handler never gets less
/// than it asked for, and at most what an `integer` holds.
fn delay_seconds(delay: Duration) -> i32 {
    let seconds = delay
        .as_secs()
        .saturating_add(u64::from(delay.subsec_nanos() > 0));
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

/// How long until message `id` of the task's queue is visible again, in whole milliseconds (the
/// delay is the engine's, in seconds; the rest is noise); `None` when that cannot be read, which
/// only costs the log line its delay.
async fn retry_in(shared: &Shared, key: &TaskKey, id: i64) -> Option<Duration> {
    let seconds: Option<f64> = sqlx::query_scalar(&key.flow.retry_in_sql)
        .bind(id)
        .fetch_optional(&shared.pool)
        .await
        .ok()
        .flatten();
    let millis = (seconds?.max(0.0) * 1000.0).round();
    // In range: a visibility time is at most decades away.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some(Duration::from_millis(millis as u64))
}

/// The positions (0-based) of the tasks that are still `started` with the attempt and worker
/// this worker ran: those whose report has not landed yet.
async fn still_started<'a>(
    shared: &Shared,
    keys: impl Iterator<Item = &'a TaskKey>,
) -> sqlx::Result<Vec<usize>> {
    let mut run_ids = Vec::new();
    let mut step_slugs = Vec::new();
    let mut task_indexes = Vec::new();
    let mut attempts = Vec::new();
    let mut worker_ids = Vec::new();
    for key in keys {
        run_ids.push(key.run_id);
        step_slugs.push(&*key.step_slug);
        task_indexes.push(key.task_index);
        attempts.push(key.attempt);
        worker_ids.push(key.flow.worker_id);
    }
    let positions: Vec<i64> = sqlx::query_scalar(
        "SELECT b.ord - 1 \
           FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::int4[], $5::uuid[]) \
                WITH ORDINALITY AS b(run_id, step_slug, task_index, attempt, worker_id, ord) \
           JOIN pgflow.step_tasks t \
             ON t.run_id = b.run_id AND t.step_slug = b.step_slug AND t.task_index = b.task_index \
          WHERE t.status = 'started' \
            AND t.attempts_count = b.attempt \
            AND t.last_worker_id = b.worker_id",
    )
    .bind(run_ids)
    .bind(step_slugs)
    .bind(task_indexes)
    .bind(attempts)
    .bind(worker_ids)
    .fetch_all(&shared.pool)
    .await?;
    Ok(positions
        .into_iter()
        .filter_map(|position| usize::try_from(position).ok())
        .collect())
}

/// Logs and sleeps before another try; `false` once the shutdown has stopped waiting. Until a
/// report goes through again ([`reported`]), finished handlers keep their places.
async fn retry_later(
    shared: &Shared,
    backoff: &mut Backoff,
    error: &sqlx::Error,
    tasks: usize,
) -> bool {
    tracing::warn!(%error, tasks, "cannot report task results; retrying");
    shared
        .reports_failing
        .send_if_modified(|failing| !std::mem::replace(failing, true));
    backoff.wait(&shared.abandon).await
}

/// A call went through: the backlog takes results again.
fn reported(shared: &Shared) {
    shared
        .reports_failing
        .send_if_modified(|failing| std::mem::replace(failing, false));
}

/// Counts reported results.
fn settle(shared: &Shared, completed: usize, failed: usize) {
    let counters = &shared.counters;
    let completed = u64::try_from(completed).unwrap_or(u64::MAX);
    let failed = u64::try_from(failed).unwrap_or(u64::MAX);
    counters.completed.fetch_add(completed, Ordering::Relaxed);
    counters.failed.fetch_add(failed, Ordering::Relaxed);
    counters
        .in_flight
        .fetch_sub(completed + failed, Ordering::Relaxed);
}

/// Gives up on reporting `tasks` results: their tasks stay `started` in the database.
fn abandon(shared: &Shared, tasks: usize) {
    tracing::warn!(
        tasks,
        "could not report task results; their tasks stay started"
    );
    shared
        .counters
        .in_flight
        .fetch_sub(u64::try_from(tasks).unwrap_or(u64::MAX), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_is_results_per_place_within_one_call() {
        assert_eq!(backlog(1), BACKLOG_PER_SLOT);
        assert_eq!(backlog(10), 10 * BACKLOG_PER_SLOT);
        assert_eq!(backlog(MAX_BATCH), MAX_BATCH);
        // Never fewer than one per place: a finished handler then never waits for another's.
        assert_eq!(backlog(5000), 5000);
    }

    #[test]
    fn errors_sort_into_verdicts() {
        assert_eq!(verdict(&sqlx::Error::PoolTimedOut), Verdict::NotApplied);
        assert_eq!(verdict(&sqlx::Error::PoolClosed), Verdict::Closed);
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(verdict(&io), Verdict::Unknown);
    }

    #[test]
    fn retry_delays_go_in_whole_seconds_rounded_up_and_saturating() {
        assert_eq!(delay_seconds(Duration::ZERO), 0);
        assert_eq!(delay_seconds(Duration::from_nanos(1)), 1);
        assert_eq!(delay_seconds(Duration::from_secs(7)), 7);
        assert_eq!(delay_seconds(Duration::from_millis(7001)), 8);
        assert_eq!(
            delay_seconds(Duration::from_secs(i32::MAX as u64)),
            i32::MAX
        );
        assert_eq!(
            delay_seconds(Duration::from_secs(i32::MAX as u64 + 1)),
            i32::MAX
        );
        assert_eq!(delay_seconds(Duration::MAX), i32::MAX);
    }
}
