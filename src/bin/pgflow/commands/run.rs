use std::io::Write;

use chrono::{DateTime, Utc};
use pgflow_client::{ChildRun, Client, ParentLink, RunRetry, RunState};
use serde::Serialize;
use uuid::Uuid;

use crate::CliResult;
use crate::failure::Failure;
use crate::output::print_json;
use crate::run_view::{render_attempts, render_retries, render_run};

/// A row of `pgflow_ext.step_task_attempts` (migrations 0006, 0007): one failed attempt of a
/// task.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub(crate) struct FailedAttempt {
    pub(crate) step_slug: String,
    pub(crate) task_index: i32,
    /// The task's `attempts_count` when it failed: 1 for the first attempt.
    pub(crate) attempt: i32,
    /// The run's retry count when it failed: 0 before the run's first retry.
    pub(crate) run_retry: i32,
    pub(crate) error_message: String,
    pub(crate) failed_at: DateTime<Utc>,
    pub(crate) last_worker_id: Option<Uuid>,
}

/// `run --json`: the run's state, its parent and its direct child runs (subflows; each child's
/// own children are one `run --json` of it away), and with `--attempts` its failed attempts
/// under `attempts` and its retries under `retries`.
#[derive(Serialize)]
struct RunJson<'a> {
    #[serde(flatten)]
    state: &'a RunState,
    parent: Option<ParentLink>,
    children: Vec<ChildRun>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<&'a [FailedAttempt]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retries: Option<&'a [RunRetry]>,
}

pub(crate) async fn show_run(
    client: &Client,
    run_id: Uuid,
    attempts: bool,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    let state = client.run_state(run_id).await?;
    let history = if attempts {
        let retries = client
            .retry_history(run_id)
            .await
            .map_err(|err| match err {
                pgflow_client::Error::Database(err) => not_granted(err, "run_retries"),
                err => Failure::from(err),
            })?;
        Some((failed_attempts(client, run_id).await?, retries))
    } else {
        None
    };
    if json {
        let (parent, children) = crate::subflow_tree::links(client, run_id).await?;
        return print_json(
            out,
            &RunJson {
                state: &state,
                parent,
                children,
                attempts: history.as_ref().map(|(attempts, _)| attempts.as_slice()),
                retries: history.as_ref().map(|(_, retries)| retries.as_slice()),
            },
        );
    }
    let shape = client.flow_shape(&state.run.flow_slug).await?;
    write!(out, "{}", render_run(&state, shape.as_ref()))?;
    // Subflows (issue 22): the parent and the tree of child runs, when there are any.
    let tree = crate::subflow_tree::read(client, run_id).await?;
    let tree = crate::subflow_tree::render(&tree);
    if !tree.is_empty() {
        write!(out, "\n{tree}")?;
    }
    if let Some((attempts, retries)) = &history {
        write!(out, "\n{}", render_attempts(attempts))?;
        if !retries.is_empty() {
            write!(out, "\n{}", render_retries(retries))?;
        }
    }
    Ok(())
}

/// Every failed attempt of the run's tasks: by the run's retry, step (order of definition),
/// task, attempt.
async fn failed_attempts(client: &Client, run_id: Uuid) -> Result<Vec<FailedAttempt>, Failure> {
    sqlx::query_as(
        "SELECT a.step_slug, a.task_index, a.attempt, a.run_retry, a.error_message, \
                a.failed_at, a.last_worker_id \
           FROM pgflow_ext.step_task_attempts a \
           JOIN pgflow.runs r ON r.run_id = a.run_id \
           JOIN pgflow.steps s ON s.flow_slug = r.flow_slug AND s.step_slug = a.step_slug \
          WHERE a.run_id = $1 \
          ORDER BY a.run_retry, s.step_index, a.task_index, a.attempt",
    )
    .bind(run_id)
    .fetch_all(client.pool())
    .await
    .map_err(|err| not_granted(err, "step_task_attempts"))
}

/// A read of `pgflow_ext.<table>` that failed; a role that may not read it is told the grant.
fn not_granted(err: sqlx::Error, table: &str) -> Failure {
    match &err {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42501") => {
            Failure::error(format!(
                "{db}: --attempts reads pgflow_ext.step_task_attempts and pgflow_ext.run_retries; \
                 grant them with `GRANT USAGE ON SCHEMA pgflow_ext TO <role>; \
                 GRANT SELECT ON pgflow_ext.step_task_attempts, pgflow_ext.run_retries TO <role>;` \
                 (reading pgflow_ext.{table})"
            ))
        }
        _ => Failure::from(pgflow_client::Error::from(err)),
    }
}
