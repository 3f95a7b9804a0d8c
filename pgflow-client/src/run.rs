//! Runs: handles to started runs, waiting for their end, their outputs and their full state.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgflow_core::{IntoStep, MayBeAbsent, RunOutputOf, Skippability, Step, StepKind};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::events::{EventKind, RunEvent, Subscription};
use crate::status::{RunStatus, SkipReason, StepKindText, StepStatus, TaskStatus};
use crate::{Error, Result};

/// How often a waiting run handle re-reads the run even without a notification, so that a
/// notification lost with a dropped connection cannot leave it waiting forever.
const SAFETY_POLL: Duration = Duration::from_secs(2);

/// A started run: wait for it, read its state, follow its events.
///
/// ```no_run
/// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
/// let run = client.run(run_id);
/// let output = run.wait_timeout(std::time::Duration::from_secs(30)).await?;
/// println!("{}", output.output());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RunHandle {
    pool: PgPool,
    run_id: Uuid,
}

impl RunHandle {
    pub(crate) fn new(pool: PgPool, run_id: Uuid) -> Self {
        Self { pool, run_id }
    }

    /// The pool the handle reads through.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The run's id.
    ///
    /// Store it to find the run again later, with [`Client::run`](crate::Client::run):
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
    /// let input = serde_json::json!({"order_id": 42});
    /// let run = client.start_json("order_processing", input, None).await?;
    /// sqlx::query("UPDATE orders SET run_id = $1 WHERE order_id = 42")
    ///     .bind(run.id())
    ///     .execute(client.pool())
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn id(&self) -> Uuid {
        self.run_id
    }

    /// Waits until the run completes, fails or is cancelled.
    ///
    /// Wakes on the engine's `run:completed`/`run:failed`/`run:cancelled` notifications (no
    /// busy polling), and re-reads the run every few seconds as a safety net. A failed run is
    /// [`Error::RunFailed`], with the failing step, task, attempt and message; a cancelled one
    /// is [`Error::RunCancelled`].
    ///
    /// ```no_run
    /// # async fn demo(run: pgflow_client::RunHandle) -> pgflow_client::Result<()> {
    /// use pgflow_client::Error;
    ///
    /// match run.wait().await {
    ///     Ok(output) => println!("{}", output.output()),
    ///     Err(Error::RunFailed(failure)) => {
    ///         eprintln!("step {} failed: {}", failure.step_slug, failure.error_message);
    ///     }
    ///     Err(Error::RunCancelled { run_id, .. }) => eprintln!("run {run_id} was cancelled"),
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok(()) }
    /// ```
    // A failed run is an answer, not a fault of waiting: it is not logged as an error here.
    #[tracing::instrument(skip_all, fields(run_id = %self.run_id))]
    pub async fn wait(&self) -> Result<RunOutput> {
        let mut subscription = Subscription::listen(&self.pool).await?;
        loop {
            if let Some(done) = self.finished().await? {
                subscription.close().await;
                return done;
            }
            // Any event of this run may be its end; anything else (or silence) just re-checks.
            let _ = tokio::time::timeout(SAFETY_POLL, async {
                loop {
                    match subscription.next_event().await {
                        Ok(event) if event.run_id == self.run_id && event.kind.ends_run() => {
                            return;
                        }
                        Ok(_) => {}
                        Err(err) => {
                            tracing::warn!(error = %err, "lost the event listener; polling");
                            tokio::time::sleep(SAFETY_POLL).await;
                            return;
                        }
                    }
                }
            })
            .await;
        }
    }

    /// Like [`RunHandle::wait`], giving up with [`Error::WaitTimedOut`] after `timeout`. The run
    /// itself goes on.
    ///
    /// ```no_run
    /// # async fn demo(run: pgflow_client::RunHandle) -> pgflow_client::Result<()> {
    /// use std::time::Duration;
    ///
    /// use pgflow_client::Error;
    ///
    /// match run.wait_timeout(Duration::from_secs(30)).await {
    ///     Ok(output) => println!("{}", output.output()),
    ///     Err(Error::WaitTimedOut { run_id, .. }) => println!("run {run_id} still running"),
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn wait_timeout(&self, timeout: Duration) -> Result<RunOutput> {
        tokio::time::timeout(timeout, self.wait())
            .await
            .map_err(|_| Error::WaitTimedOut {
                run_id: self.run_id,
                waited: timeout,
            })?
    }

    /// The run's outcome if it has ended: `Ok` with its outputs, or the failure or the
    /// cancellation as an error.
    async fn finished(&self) -> Result<Option<Result<RunOutput>>> {
        type Row = (String, RunStatus, Option<Value>, Option<DateTime<Utc>>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT flow_slug, status, output, cancelled_at FROM pgflow.runs WHERE run_id = $1",
        )
        .bind(self.run_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((flow_slug, status, output, cancelled_at)) = row else {
            return Err(Error::UnknownRun(self.run_id));
        };
        match status {
            RunStatus::Completed => Ok(Some(Ok(RunOutput {
                run_id: self.run_id,
                flow_slug,
                output: output.unwrap_or(Value::Null),
                steps: step_outputs(&self.pool, self.run_id).await?,
            }))),
            RunStatus::Failed => Ok(Some(Err(Error::RunFailed(Box::new(
                failure(&self.pool, self.run_id, flow_slug).await?,
            ))))),
            RunStatus::Cancelled => Ok(Some(Err(Error::RunCancelled {
                run_id: self.run_id,
                flow_slug,
                cancelled_at,
            }))),
            _ => Ok(None),
        }
    }

    /// Reads the run's full state: the run row, every step state and every task.
    ///
    /// ```no_run
    /// # async fn demo(run: pgflow_client::RunHandle) -> pgflow_client::Result<()> {
    /// let state = run.state().await?;
    /// for task in state.tasks.iter().filter(|task| task.attempts_count > 1) {
    ///     println!("{}[{}]: {} attempts", task.step_slug, task.task_index, task.attempts_count);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn state(&self) -> Result<RunState> {
        RunState::read(&self.pool, self.run_id).await
    }

    /// Subscribes to this run's events, ending with the run's end. Events emitted before the
    /// subscription are not replayed (a run that has already ended yields just its final
    /// event); subscribe before starting with [`Client::subscribe`](crate::Client::subscribe)
    /// when every event matters.
    ///
    /// ```no_run
    /// # async fn demo(run: pgflow_client::RunHandle) -> pgflow_client::Result<()> {
    /// use futures_util::StreamExt;
    ///
    /// let mut events = run.events().await?;
    /// while let Some(event) = events.next().await {
    ///     println!("{}", event?);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn events(&self) -> Result<crate::events::RunEvents> {
        let subscription = Subscription::listen(&self.pool).await?;
        let run = RunState::read_run(&self.pool, self.run_id).await?;
        let kind = match run.status {
            RunStatus::Completed => EventKind::RunCompleted,
            RunStatus::Failed => EventKind::RunFailed,
            RunStatus::Cancelled => EventKind::RunCancelled,
            _ => return Ok(subscription.run_events(self.run_id)),
        };
        Ok(crate::events::RunEvents::ended(RunEvent {
            kind,
            run_id: run.run_id,
            flow_slug: Some(run.flow_slug),
            step_slug: None,
            status: Some(run.status.to_string()),
            error_message: None,
            started_at: Some(run.started_at),
            completed_at: run.completed_at,
            failed_at: run.failed_at,
            cancelled_at: run.cancelled_at,
            retry_count: None,
            retried_at: None,
            skip_reason: None,
            skipped_at: None,
            task_index: None,
            child_run_id: None,
            child_flow_slug: None,
        }))
    }
}

/// Every completed step's output as its dependents see it (a map step: the ordered array):
/// the one stored on the step (migration 0010), or else, for a run that completed before
/// outputs were stored, gathered from its tasks.
async fn step_outputs(pool: &PgPool, run_id: Uuid) -> Result<BTreeMap<String, Value>> {
    let rows: Vec<(String, Value)> = sqlx::query_as(
        "SELECT ss.step_slug,
                CASE WHEN ss.output IS NOT NULL THEN ss.output
                     WHEN s.step_type = 'map'
                     THEN coalesce((SELECT jsonb_agg(t.output ORDER BY t.task_index)
                                      FROM pgflow.step_tasks t
                                     WHERE t.run_id = ss.run_id AND t.step_slug = ss.step_slug),
                                   '[]'::jsonb)
                     ELSE coalesce((SELECT t.output FROM pgflow.step_tasks t
                                     WHERE t.run_id = ss.run_id AND t.step_slug = ss.step_slug
                                       AND t.task_index = 0), 'null'::jsonb)
                END
           FROM pgflow.step_states ss
           JOIN pgflow.steps s ON s.flow_slug = ss.flow_slug AND s.step_slug = ss.step_slug
          WHERE ss.run_id = $1 AND ss.status = 'completed'",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

async fn failure(pool: &PgPool, run_id: Uuid, flow_slug: String) -> Result<RunFailure> {
    #[derive(sqlx::FromRow, Default)]
    struct Failed {
        step_slug: String,
        task_index: Option<i32>,
        attempts_count: Option<i32>,
        error_message: Option<String>,
    }
    let row: Option<Failed> = sqlx::query_as(
        "SELECT ss.step_slug, t.task_index, t.attempts_count,
                coalesce(t.error_message, ss.error_message) AS error_message
           FROM pgflow.step_states ss
           LEFT JOIN LATERAL (
                SELECT task_index, attempts_count, error_message FROM pgflow.step_tasks t
                 WHERE t.run_id = ss.run_id AND t.step_slug = ss.step_slug AND t.status = 'failed'
                 ORDER BY t.failed_at LIMIT 1) t ON true
          WHERE ss.run_id = $1 AND ss.status = 'failed'
          ORDER BY ss.failed_at LIMIT 1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?;
    let row = row.unwrap_or_default();
    Ok(RunFailure {
        run_id,
        flow_slug,
        step_slug: row.step_slug,
        task_index: row.task_index.and_then(|i| u32::try_from(i).ok()),
        attempts: row
            .attempts_count
            .and_then(|a| u32::try_from(a).ok())
            .unwrap_or(0),
        error_message: row.error_message.unwrap_or_default(),
    })
}

/// Why a run failed: the step and task whose last attempt failed, and its error.
///
/// ```no_run
/// # async fn demo(run: pgflow_client::RunHandle) {
/// if let Err(pgflow_client::Error::RunFailed(failure)) = run.wait().await {
///     // "run <id> of flow `orders` failed in step `charge`, task 0 after 3 attempts: declined"
///     eprintln!("{failure}");
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RunFailure {
    /// The failed run.
    pub run_id: Uuid,
    /// Its flow.
    pub flow_slug: String,
    /// The step that failed it.
    pub step_slug: String,
    /// The failed task's index (`None` when the step failed without a failed task, e.g. a type
    /// violation detected on a dependency).
    pub task_index: Option<u32>,
    /// How many attempts the failed task had.
    pub attempts: u32,
    /// The error message.
    pub error_message: String,
}

impl fmt::Display for RunFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {} of flow `{}` failed in step `{}`",
            self.run_id, self.flow_slug, self.step_slug
        )?;
        if let Some(index) = self.task_index {
            write!(f, ", task {index}")?;
        }
        write!(
            f,
            " after {} attempt{}: {}",
            self.attempts,
            if self.attempts == 1 { "" } else { "s" },
            self.error_message
        )
    }
}

/// A completed run's outputs.
///
/// ```no_run
/// # use pgflow_core::IntoStep;
/// # async fn demo<S: IntoStep>(client: pgflow_client::Client, run_id: uuid::Uuid, fulfill: S) -> pgflow_client::Result<()> {
/// let output = client.run(run_id).wait().await?;
/// let shipment = output.output_of(fulfill)?; // typed by the step
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutput {
    run_id: Uuid,
    flow_slug: String,
    output: Value,
    steps: BTreeMap<String, Value>,
}

impl RunOutput {
    /// The run's id.
    ///
    /// Which run an output belongs to, e.g. after waiting for several at once:
    ///
    /// ```no_run
    /// # async fn demo(runs: Vec<pgflow_client::RunHandle>) -> pgflow_client::Result<()> {
    /// let waits = runs.iter().map(pgflow_client::RunHandle::wait);
    /// for output in futures_util::future::try_join_all(waits).await? {
    ///     println!("{}: {}", output.run_id(), output.output());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    /// The run's flow.
    ///
    /// ```no_run
    /// # async fn demo(run: pgflow_client::RunHandle) -> pgflow_client::Result<()> {
    /// let output = run.wait().await?;
    /// match output.flow_slug() {
    ///     "order_processing" => println!("order done: {}", output.output()),
    ///     other => println!("run of {other} done"),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn flow_slug(&self) -> &str {
        &self.flow_slug
    }

    /// The run output as the engine stores it: an object mapping each leaf step to its output.
    ///
    /// ```no_run
    /// # async fn demo(run: pgflow_client::RunHandle) -> pgflow_client::Result<()> {
    /// let output = run.wait().await?;
    /// // A flow whose only leaf step is `ship`: {"ship": <its output>}.
    /// let tracking = &output.output()["ship"]["tracking_number"];
    /// println!("tracking number {tracking}");
    /// # Ok(()) }
    /// ```
    pub fn output(&self) -> &Value {
        &self.output
    }

    /// Every step's output by slug, as JSON (map steps: the array of their tasks' outputs).
    ///
    /// ```no_run
    /// # async fn demo(run: pgflow_client::RunHandle) -> pgflow_client::Result<()> {
    /// let output = run.wait().await?;
    /// for (step, value) in output.step_outputs() {
    ///     println!("{step}: {value}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn step_outputs(&self) -> &BTreeMap<String, Value> {
        &self.steps
    }

    /// A step's output, typed by the step (a map step's is the `Vec` of its tasks' outputs).
    ///
    /// A step that the engine may skip (a condition, or a `when_exhausted` that skips), or that
    /// is downstream of one that may be skipped with `skip-cascade`, has an
    /// [`Option`](pgflow_core::RunOutputOf): `None` when it was skipped.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
    /// use pgflow_core::{StepContext, StepError, step_fn};
    ///
    /// // The step the flow was built with, e.g. a map over the flow input's URLs.
    /// let fetch = step_fn("fetch")
    ///     .map_over_input()
    ///     .handler(|url: String, _: StepContext| async move { Ok::<_, StepError>(url.len()) });
    /// let output = client.run(run_id).wait().await?;
    /// let sizes: Vec<usize> = output.output_of(&fetch)?; // one per task, in task order
    /// # Ok(()) }
    /// ```
    // Steps are values (`output_of(fulfill)`); taking them by value reads best.
    #[allow(clippy::needless_pass_by_value)]
    pub fn output_of<T: IntoStep>(&self, step: T) -> Result<RunOutputOf<T::Step>> {
        let step = step.into_step();
        let slug = step.slug();
        let output = if self.steps.contains_key(slug) {
            Some(self.output_as::<<T::Step as Step>::Output>(slug)?)
        } else {
            None
        };
        // Absent is `None` for a step that may have been skipped, an error for one that may not.
        <MayBeAbsent<T::Step> as Skippability>::received(output).ok_or_else(|| {
            Error::NoSuchOutput {
                step: slug.to_string(),
                steps: self.steps.keys().cloned().collect(),
            }
        })
    }

    /// A step's output by slug, deserialized into `T`, for untyped flows.
    ///
    /// ```no_run
    /// # async fn demo(run: pgflow_client::RunHandle) -> pgflow_client::Result<()> {
    /// let output = run.wait().await?;
    /// let total: u64 = output.output_as("total")?;
    /// let pages: Vec<String> = output.output_as("fetch")?; // a map step: one item per task
    /// println!("{total} bytes in {} pages", pages.len());
    /// # Ok(()) }
    /// ```
    pub fn output_as<T: DeserializeOwned>(&self, step_slug: &str) -> Result<T> {
        let value = self
            .steps
            .get(step_slug)
            .ok_or_else(|| Error::NoSuchOutput {
                step: step_slug.to_string(),
                steps: self.steps.keys().cloned().collect(),
            })?;
        serde_json::from_value(value.clone()).map_err(|source| Error::OutputType {
            step: step_slug.to_string(),
            source,
        })
    }
}

/// A run's full state: the run, each step's state and each task, as stored.
///
/// ```no_run
/// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> Result<(), Box<dyn std::error::Error>> {
/// use pgflow_client::{StepStatus, TaskStatus};
///
/// let state = client.run_state(run_id).await?;
/// let failed = state.steps.iter().filter(|step| step.status == StepStatus::Failed);
/// let queued = state.tasks.iter().filter(|task| task.status == TaskStatus::Queued).count();
/// println!("{} steps failed, {queued} tasks queued", failed.count());
/// println!("{}", serde_json::to_string_pretty(&state)?); // e.g. for an admin page
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RunState {
    /// The `pgflow.runs` row.
    pub run: RunRow,
    /// The `pgflow.step_states` rows, in the order of definition.
    pub steps: Vec<StepStateRow>,
    /// The `pgflow.step_tasks` rows, by step (order of definition) and task index.
    pub tasks: Vec<TaskRow>,
}

/// A `pgflow.runs` row.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct RunRow {
    /// The run's id.
    pub run_id: Uuid,
    /// Its flow.
    pub flow_slug: String,
    /// Started, completed, failed or cancelled.
    pub status: RunStatus,
    /// The flow input.
    pub input: Value,
    /// The leaf steps' outputs, once completed.
    pub output: Option<Value>,
    /// Steps not yet completed.
    pub remaining_steps: i32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it completed.
    pub completed_at: Option<DateTime<Utc>>,
    /// When it failed.
    pub failed_at: Option<DateTime<Utc>>,
    /// When it was cancelled, while it is cancelled.
    pub cancelled_at: Option<DateTime<Utc>>,
    /// How many times it was retried ([`Client::retry`](crate::Client::retry)): 0 for a run
    /// never retried. [`Client::retry_history`](crate::Client::retry_history) has how each
    /// earlier attempt of the run ended.
    pub retry_count: i32,
    /// When its root steps start, for a run started with a delay
    /// ([`Client::start_at`](crate::Client::start_at)) while it was in the future; absent from
    /// the JSON otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<DateTime<Utc>>,
}

/// A `pgflow.step_states` row, with the step's kind and index.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct StepStateRow {
    /// The step.
    pub step_slug: String,
    /// Single or map.
    #[sqlx(try_from = "StepKindText")]
    pub step_type: StepKind,
    /// Its position in the flow.
    pub step_index: i32,
    /// Created, started, completed, failed, skipped or cancelled.
    pub status: StepStatus,
    /// Why it was skipped, when it is [`StepStatus::Skipped`]; absent from the JSON
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<SkipReason>,
    /// How many tasks the step has, once known.
    pub initial_tasks: Option<i32>,
    /// Tasks not yet completed, once started.
    pub remaining_tasks: Option<i32>,
    /// Dependencies not yet completed.
    pub remaining_deps: i32,
    /// Why it failed.
    pub error_message: Option<String>,
    /// When the state was created.
    pub created_at: DateTime<Utc>,
    /// When the step started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed.
    pub completed_at: Option<DateTime<Utc>>,
    /// When it failed.
    pub failed_at: Option<DateTime<Utc>>,
    /// When it was skipped; absent from the JSON unless it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped_at: Option<DateTime<Utc>>,
    /// Its output as its dependents read it, once completed: a single step's task output, a
    /// map step's task outputs in order (`[]` for none). Stored by the engine since migration
    /// 0010; `None` for a step that completed before.
    pub output: Option<Value>,
}

/// A `pgflow.step_tasks` row.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct TaskRow {
    /// The task's step.
    pub step_slug: String,
    /// Its index (0 for single steps).
    pub task_index: i32,
    /// Queued, started, completed, failed or cancelled.
    pub status: TaskStatus,
    /// Attempts so far.
    pub attempts_count: i32,
    /// The pgmq message carrying it.
    pub message_id: Option<i64>,
    /// Its output, once completed.
    pub output: Option<Value>,
    /// The last attempt's error.
    pub error_message: Option<String>,
    /// When it was queued.
    pub queued_at: DateTime<Utc>,
    /// When its current attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed.
    pub completed_at: Option<DateTime<Utc>>,
    /// When it failed.
    pub failed_at: Option<DateTime<Utc>>,
    /// The worker that took it last.
    pub last_worker_id: Option<Uuid>,
    /// How many times the stalled-task sweep sent it back to its queue after its worker was
    /// lost (each lost attempt counts in `attempts_count` too).
    pub requeued_count: i32,
    /// When the sweep last did.
    pub last_requeued_at: Option<DateTime<Utc>>,
    /// When the sweep gave up on it, after three requeues: its message is archived and it
    /// stays started for an operator (`pgflow check` reports it). Only while it has not
    /// started again since: a task started after it (by a retry of its run) is `None` here.
    pub permanently_stalled_at: Option<DateTime<Utc>>,
}

const RUN_COLUMNS: &str = "SELECT run_id, flow_slug, status, input, output, remaining_steps,
        started_at, completed_at, failed_at, cancelled_at, retry_count, scheduled_for
   FROM pgflow.runs WHERE run_id = $1";

impl RunState {
    async fn read_run(pool: &PgPool, run_id: Uuid) -> Result<RunRow> {
        sqlx::query_as(RUN_COLUMNS)
            .bind(run_id)
            .fetch_optional(pool)
            .await?
            .ok_or(Error::UnknownRun(run_id))
    }

    pub(crate) async fn read(pool: &PgPool, run_id: Uuid) -> Result<Self> {
        let mut tx = pool.begin().await?;
        // One snapshot for the three reads, so the parts agree with each other.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let run: RunRow = sqlx::query_as(RUN_COLUMNS)
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::UnknownRun(run_id))?;
        let steps: Vec<StepStateRow> = sqlx::query_as(
            "SELECT ss.step_slug, s.step_type, s.step_index, ss.status, ss.skip_reason,
                    ss.initial_tasks, ss.remaining_tasks, ss.remaining_deps, ss.error_message,
                    ss.created_at, ss.started_at, ss.completed_at, ss.failed_at, ss.skipped_at,
                    ss.output
               FROM pgflow.step_states ss
               JOIN pgflow.steps s ON s.flow_slug = ss.flow_slug AND s.step_slug = ss.step_slug
              WHERE ss.run_id = $1
              ORDER BY s.step_index",
        )
        .bind(run_id)
        .fetch_all(&mut *tx)
        .await?;
        let tasks: Vec<TaskRow> = sqlx::query_as(
            "SELECT t.step_slug, t.task_index, t.status, t.attempts_count, t.message_id, t.output,
                    t.error_message, t.queued_at, t.started_at, t.completed_at, t.failed_at,
                    t.last_worker_id, t.requeued_count, t.last_requeued_at,
                    CASE WHEN t.permanently_stalled_at >= t.started_at
                         THEN t.permanently_stalled_at END AS permanently_stalled_at
               FROM pgflow.step_tasks t
               JOIN pgflow.steps s ON s.flow_slug = t.flow_slug AND s.step_slug = t.step_slug
              WHERE t.run_id = $1
              ORDER BY s.step_index, t.task_index",
        )
        .bind(run_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Self { run, steps, tasks })
    }
}

/// One line of a run listing: the run and its progress.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct RunSummary {
    /// The run's id.
    pub run_id: Uuid,
    /// Its flow.
    pub flow_slug: String,
    /// Started, completed, failed or cancelled.
    pub status: RunStatus,
    /// Steps not yet completed.
    pub remaining_steps: i32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it completed, failed or was cancelled.
    pub ended_at: Option<DateTime<Utc>>,
    /// How many times it was retried.
    pub retry_count: i32,
    /// When its root steps start, for a run started with a delay; absent from the JSON
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<DateTime<Utc>>,
}

impl RunSummary {
    pub(crate) async fn recent(
        pool: &PgPool,
        flow: Option<&str>,
        status: Option<RunStatus>,
        limit: i64,
    ) -> Result<Vec<Self>> {
        Ok(sqlx::query_as(
            "SELECT run_id, flow_slug, status, remaining_steps, started_at,
                    coalesce(completed_at, failed_at, cancelled_at) AS ended_at, retry_count,
                    scheduled_for
               FROM pgflow.runs
              WHERE ($1::text IS NULL OR flow_slug = $1) AND ($2::text IS NULL OR status = $2)
              ORDER BY started_at DESC, run_id
              LIMIT $3",
        )
        .bind(flow)
        .bind(status)
        .bind(limit)
        .fetch_all(pool)
        .await?)
    }
}

/// What [`Client::cancel`](crate::Client::cancel) did.
///
/// ```no_run
/// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
/// use pgflow_client::{Cancelled, RunStatus};
///
/// let outcome = client.cancel(run_id).await?;
/// if outcome == Cancelled::AlreadyEnded(RunStatus::Completed) {
///     println!("too late: run {run_id} had completed");
/// }
/// assert!(outcome.status().is_finished());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[non_exhaustive]
pub enum Cancelled {
    /// This call cancelled the started run.
    Now,
    /// The run had already ended, in this status (completed, failed or cancelled); nothing
    /// changed.
    AlreadyEnded(RunStatus),
}

impl Cancelled {
    /// The run's status after the call: `cancelled`, or the one it had already ended in.
    ///
    /// ```
    /// use pgflow_client::{Cancelled, RunStatus};
    ///
    /// assert_eq!(Cancelled::Now.status(), RunStatus::Cancelled);
    /// assert_eq!(Cancelled::AlreadyEnded(RunStatus::Failed).status(), RunStatus::Failed);
    /// ```
    pub const fn status(self) -> RunStatus {
        match self {
            Self::Now => RunStatus::Cancelled,
            Self::AlreadyEnded(status) => status,
        }
    }
}

/// One retry of a run, as `pgflow_ext.run_retries` keeps it: how the run had ended before it.
/// From [`Client::retry_history`](crate::Client::retry_history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct RunRetry {
    /// 1 for the run's first retry.
    pub retry_number: i32,
    /// When the retry happened.
    pub retried_at: DateTime<Utc>,
    /// How the run had ended: failed or cancelled.
    pub previous_status: RunStatus,
    /// When it had ended (its `failed_at` or `cancelled_at` then).
    pub ended_at: DateTime<Utc>,
    /// The step that had failed it (`None` for a cancelled run).
    pub failed_step_slug: Option<String>,
    /// That step's error (`None` for a cancelled run).
    pub error_message: Option<String>,
}

impl RunRetry {
    pub(crate) async fn of(pool: &PgPool, run_id: Uuid) -> Result<Vec<Self>> {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pgflow.runs WHERE run_id = $1)")
                .bind(run_id)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            return Err(Error::UnknownRun(run_id));
        }
        let retries = sqlx::query_as(
            "SELECT retry_number, retried_at, previous_status, ended_at, failed_step_slug,
                    error_message
               FROM pgflow_ext.run_retries
              WHERE run_id = $1
              ORDER BY retry_number",
        )
        .bind(run_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(retries)
    }
}
