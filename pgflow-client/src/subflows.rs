//! A run's child runs and its parent (subflows, issue 22): the runs a subflow step started,
//! as the engine linked them (`pgflow.run_children`, `pgflow_ext.subflow_runs`).

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{Client, Result, RunHandle, RunStatus};

/// A child run started by one of a run's subflow steps ([`Client::children`]).
///
/// One per attempt of the parent task: a child that failed and was retried, or one from
/// before a retry of the parent run, stays listed with its status.
///
/// ```no_run
/// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
/// for child in client.children(run_id).await? {
///     println!(
///         "{}[{}] attempt {} -> {} run {} ({})",
///         child.step_slug, child.task_index, child.attempt, child.flow_slug, child.run_id, child.status
///     );
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ChildRun {
    /// The child run.
    pub run_id: Uuid,
    /// Its flow.
    pub flow_slug: String,
    /// Its status now.
    pub status: RunStatus,
    /// The parent's subflow step that started it.
    pub step_slug: String,
    /// The parent task's index (a map step's element).
    pub task_index: u32,
    /// The parent task's attempt it was started for, from 1.
    pub attempt: u32,
    /// How deep it runs: 1 for a child of a top-level run, 2 for a grandchild, ...
    pub depth: u32,
    /// When it started.
    pub started_at: DateTime<Utc>,
}

/// The parent of a child run ([`Client::parent`]): the run, step and task that started it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ParentLink {
    /// The parent run.
    pub run_id: Uuid,
    /// The parent's subflow step.
    pub step_slug: String,
    /// The parent task's index.
    pub task_index: u32,
    /// The parent task's attempt it was started for.
    pub attempt: u32,
    /// The child's depth (1: the parent is a top-level run).
    pub depth: u32,
}

type ChildRow = (
    Uuid,
    String,
    RunStatus,
    String,
    i32,
    i32,
    i32,
    DateTime<Utc>,
);

fn unsigned(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

pub(crate) async fn children(pool: &PgPool, run_id: Uuid) -> Result<Vec<ChildRun>> {
    let rows: Vec<ChildRow> = sqlx::query_as(
        "SELECT child_run_id, child_flow_slug, status, step_slug, task_index, attempt, depth,
                started_at
           FROM pgflow.run_children($1)",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(run_id, flow_slug, status, step_slug, index, attempt, depth, started_at)| ChildRun {
                run_id,
                flow_slug,
                status,
                step_slug,
                task_index: unsigned(index),
                attempt: unsigned(attempt),
                depth: unsigned(depth),
                started_at,
            },
        )
        .collect())
}

impl Client {
    /// The child runs that `run_id`'s subflow steps started, oldest first; empty for a run
    /// without subflow steps (or an unknown run).
    pub async fn children(&self, run_id: Uuid) -> Result<Vec<ChildRun>> {
        children(self.pool(), run_id).await
    }

    /// The run, step and task that started `run_id` as a child run; `None` for a run started
    /// otherwise.
    ///
    /// ```no_run
    /// # async fn demo(client: pgflow_client::Client, run_id: uuid::Uuid) -> pgflow_client::Result<()> {
    /// if let Some(parent) = client.parent(run_id).await? {
    ///     println!("started by {} of run {}", parent.step_slug, parent.run_id);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn parent(&self, run_id: Uuid) -> Result<Option<ParentLink>> {
        let row: Option<(Uuid, String, i32, i32, i32)> = sqlx::query_as(
            "SELECT parent_run_id, parent_step_slug, parent_task_index, parent_attempt, depth
               FROM pgflow_ext.subflow_runs WHERE child_run_id = $1",
        )
        .bind(run_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(
            row.map(|(run_id, step_slug, index, attempt, depth)| ParentLink {
                run_id,
                step_slug,
                task_index: unsigned(index),
                attempt: unsigned(attempt),
                depth: unsigned(depth),
            }),
        )
    }
}

impl RunHandle {
    /// The child runs this run's subflow steps started, as [`Client::children`].
    pub async fn children(&self) -> Result<Vec<ChildRun>> {
        children(self.pool(), self.id()).await
    }
}
