//! One run: its row, its steps, its tasks, its failed attempts; and the small snapshot the
//! live updates send.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::Error;

/// Tasks listed on a run page; a map step of thousands shows its counts, and these.
pub(crate) const TASKS_SHOWN: i64 = 200;
/// Failed attempts listed on a run page.
pub(crate) const ATTEMPTS_SHOWN: i64 = 500;
/// Completed tasks of a map step whose outputs a run page shows.
pub(crate) const MAP_OUTPUTS_SHOWN: i32 = 20;

/// `pgflow.runs`, as `to_jsonb` gives it.
#[derive(Debug, Deserialize)]
pub(crate) struct RunView {
    pub(crate) run_id: Uuid,
    pub(crate) flow_slug: String,
    pub(crate) status: String,
    pub(crate) input: Value,
    #[serde(default)]
    pub(crate) output: Option<Value>,
    pub(crate) remaining_steps: i32,
    pub(crate) started_at: DateTime<Utc>,
    #[serde(default)]
    pub(crate) completed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(crate) failed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(crate) cancelled_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(crate) retry_count: i32,
    #[serde(default)]
    pub(crate) scheduled_for: Option<DateTime<Utc>>,
}

impl RunView {
    pub(crate) fn ended_at(&self) -> Option<DateTime<Utc>> {
        self.completed_at.or(self.failed_at).or(self.cancelled_at)
    }
}

/// `pgflow.step_states`, as `to_jsonb` gives it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct StepView {
    pub(crate) step_slug: String,
    pub(crate) status: String,
    #[serde(default)]
    pub(crate) initial_tasks: Option<i32>,
    #[serde(default)]
    pub(crate) remaining_tasks: Option<i32>,
    #[serde(default)]
    pub(crate) error_message: Option<String>,
    #[serde(default)]
    pub(crate) started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(crate) completed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(crate) failed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(crate) cancelled_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(crate) skipped_at: Option<DateTime<Utc>>,
    /// Why a step was skipped (its condition), where the engine records it.
    #[serde(default)]
    pub(crate) skip_reason: Option<String>,
}

impl StepView {
    pub(crate) fn ended_at(&self) -> Option<DateTime<Utc>> {
        self.completed_at
            .or(self.failed_at)
            .or(self.cancelled_at)
            .or(self.skipped_at)
    }
}

/// `pgflow.step_tasks` without its output, as `to_jsonb` gives it.
#[derive(Debug, Deserialize)]
pub(crate) struct TaskView {
    pub(crate) step_slug: String,
    pub(crate) task_index: i32,
    pub(crate) status: String,
    pub(crate) attempts_count: i32,
    #[serde(default)]
    pub(crate) error_message: Option<String>,
    pub(crate) queued_at: DateTime<Utc>,
    #[serde(default)]
    pub(crate) started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(crate) completed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(crate) failed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(crate) last_worker_id: Option<Uuid>,
    /// How often a stalled task was put back in its queue, where the engine counts it.
    #[serde(default)]
    pub(crate) requeued_count: Option<i32>,
}

/// A failed attempt (`pgflow_ext.step_task_attempts`).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct AttemptView {
    pub(crate) step_slug: String,
    pub(crate) task_index: i32,
    pub(crate) run_retry: i32,
    pub(crate) attempt: i32,
    pub(crate) error_message: String,
    pub(crate) failed_at: DateTime<Utc>,
    pub(crate) last_worker_id: Option<Uuid>,
}

/// Everything a run page shows, read in one snapshot.
#[derive(Debug)]
pub(crate) struct RunDetail {
    pub(crate) run: RunView,
    pub(crate) steps: Vec<StepView>,
    /// Per step, tasks by status.
    pub(crate) task_counts: BTreeMap<String, BTreeMap<String, i64>>,
    pub(crate) tasks: Vec<TaskView>,
    pub(crate) attempts: Vec<AttemptView>,
    /// Completed tasks' outputs: per step, (task index, output).
    pub(crate) outputs: BTreeMap<String, Vec<(i32, Value)>>,
}

/// Reads a run; `None` when there is no such run.
pub(crate) async fn run_detail(pool: &PgPool, run_id: Uuid) -> Result<Option<RunDetail>, Error> {
    let mut tx = pool.begin().await?;
    // One snapshot: the parts of a moving run agree with each other.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let run: Option<Value> =
        sqlx::query_scalar("SELECT to_jsonb(r) FROM pgflow.runs r WHERE r.run_id = $1")
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(run) = run else {
        return Ok(None);
    };
    let run: RunView = from_row(run)?;
    let steps: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(ss) FROM pgflow.step_states ss
           JOIN pgflow.steps s ON s.flow_slug = ss.flow_slug AND s.step_slug = ss.step_slug
          WHERE ss.run_id = $1 ORDER BY s.step_index",
    )
    .bind(run_id)
    .fetch_all(&mut *tx)
    .await?;
    let steps = steps
        .into_iter()
        .map(from_row)
        .collect::<Result<Vec<StepView>, _>>()?;
    let counts: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT step_slug, status, count(*) FROM pgflow.step_tasks WHERE run_id = $1
          GROUP BY 1, 2",
    )
    .bind(run_id)
    .fetch_all(&mut *tx)
    .await?;
    let mut task_counts: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (step, status, count) in counts {
        task_counts.entry(step).or_default().insert(status, count);
    }
    // Failed tasks first: they are what a person opens the page for.
    let tasks: Vec<Value> = sqlx::query_scalar(
        "SELECT to_jsonb(t) - 'output' FROM pgflow.step_tasks t
          WHERE t.run_id = $1
          ORDER BY t.status <> 'failed', t.step_slug, t.task_index LIMIT $2",
    )
    .bind(run_id)
    .bind(TASKS_SHOWN)
    .fetch_all(&mut *tx)
    .await?;
    let tasks = tasks
        .into_iter()
        .map(from_row)
        .collect::<Result<Vec<TaskView>, _>>()?;
    let attempts: Vec<AttemptView> = sqlx::query_as(
        "SELECT step_slug, task_index, run_retry, attempt, error_message, failed_at,
                last_worker_id
           FROM pgflow_ext.step_task_attempts
          WHERE run_id = $1
          ORDER BY run_retry, failed_at, step_slug, task_index, attempt
          LIMIT $2",
    )
    .bind(run_id)
    .bind(ATTEMPTS_SHOWN)
    .fetch_all(&mut *tx)
    .await?;
    let rows: Vec<(String, i32, Value)> = sqlx::query_as(
        "SELECT step_slug, task_index, output FROM pgflow.step_tasks
          WHERE run_id = $1 AND status = 'completed' AND task_index < $2
          ORDER BY step_slug, task_index",
    )
    .bind(run_id)
    .bind(MAP_OUTPUTS_SHOWN)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut outputs: BTreeMap<String, Vec<(i32, Value)>> = BTreeMap::new();
    for (step, index, output) in rows {
        outputs.entry(step).or_default().push((index, output));
    }
    Ok(Some(RunDetail {
        run,
        steps,
        task_counts,
        tasks,
        attempts,
        outputs,
    }))
}

/// What a run page's live script needs: the run's status and each step's status and task
/// counts, as JSON (`{"status", "remaining_steps", "steps": [{"slug", "status", "map",
/// "initial_tasks", "remaining_tasks"}]}`); `None` when the run is gone.
pub(crate) async fn snapshot(pool: &PgPool, run_id: Uuid) -> Result<Option<Value>, Error> {
    Ok(sqlx::query_scalar(
        "SELECT jsonb_build_object(
                  'status', r.status, 'remaining_steps', r.remaining_steps,
                  'steps', coalesce((SELECT jsonb_agg(jsonb_build_object(
                                        'slug', ss.step_slug, 'status', ss.status,
                                        'map', s.step_type = 'map',
                                        'initial_tasks', ss.initial_tasks,
                                        'remaining_tasks', ss.remaining_tasks)
                                      ORDER BY s.step_index)
                                       FROM pgflow.step_states ss
                                       JOIN pgflow.steps s ON s.flow_slug = ss.flow_slug
                                                          AND s.step_slug = ss.step_slug
                                      WHERE ss.run_id = r.run_id),
                                    '[]'::jsonb))
           FROM pgflow.runs r WHERE r.run_id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?)
}

/// A row read as `to_jsonb`, into its view; a row that does not fit is a server-side error.
fn from_row<T: serde::de::DeserializeOwned>(row: Value) -> Result<T, Error> {
    serde_json::from_value(row).map_err(|err| Error::Database(sqlx::Error::Decode(Box::new(err))))
}
