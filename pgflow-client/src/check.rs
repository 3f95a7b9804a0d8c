//! The invariant checker: verifies that a database's runs are consistent with themselves and
//! with their queues. Used by tests after every scenario and by `pgflow check`.

use std::fmt;

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::Result;

/// One broken invariant.
///
/// What tests assert after a scenario: no violation, or every one of them in the failure message.
///
/// ```no_run
/// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
/// let violations = client.check().await?;
/// assert!(
///     violations.is_empty(),
///     "{}",
///     violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
/// );
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Violation {
    /// The rule that is broken, e.g. `remaining_steps`.
    pub rule: &'static str,
    /// The run concerned.
    pub run_id: Uuid,
    /// What exactly disagrees.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] run {}: {}", self.rule, self.run_id, self.detail)
    }
}

/// Each rule: its name and a query returning `(run_id, detail)` for every row that breaks it.
/// Runs still moving may be read mid-transition only across transactions, and every rule
/// relates rows that the engine changes in one transaction, so a snapshot is always consistent.
const RULES: &[(&str, &str)] = &[
    (
        "remaining_steps",
        "SELECT r.run_id, format('remaining_steps is %s but %s steps are not completed',
                                 r.remaining_steps, count(ss.*) FILTER (WHERE ss.status <> 'completed'))
           FROM pgflow.runs r JOIN pgflow.step_states ss ON ss.run_id = r.run_id
          WHERE r.status <> 'failed'
          GROUP BY r.run_id, r.remaining_steps
         HAVING r.remaining_steps <> count(ss.*) FILTER (WHERE ss.status <> 'completed')",
    ),
    (
        "completed_run",
        "SELECT r.run_id, format('run is completed but step %s is %s', ss.step_slug, ss.status)
           FROM pgflow.runs r JOIN pgflow.step_states ss ON ss.run_id = r.run_id
          WHERE r.status = 'completed' AND ss.status <> 'completed'",
    ),
    (
        "remaining_tasks",
        "SELECT ss.run_id, format('step %s (%s) has remaining_tasks %s, initial_tasks %s and %s completed tasks',
                                  ss.step_slug, ss.status, ss.remaining_tasks, ss.initial_tasks,
                                  count(t.*) FILTER (WHERE t.status = 'completed'))
           FROM pgflow.step_states ss
           JOIN pgflow.runs r ON r.run_id = ss.run_id
           LEFT JOIN pgflow.step_tasks t ON t.run_id = ss.run_id AND t.step_slug = ss.step_slug
          WHERE r.status <> 'failed' AND ss.status IN ('started', 'completed')
          GROUP BY ss.run_id, ss.step_slug, ss.status, ss.remaining_tasks, ss.initial_tasks
         HAVING ss.remaining_tasks IS DISTINCT FROM
                ss.initial_tasks - count(t.*) FILTER (WHERE t.status = 'completed')",
    ),
    (
        "task_count",
        "SELECT ss.run_id, format('step %s has %s tasks (indexes %s..%s) for initial_tasks %s',
                                  ss.step_slug, count(t.*), min(t.task_index), max(t.task_index),
                                  ss.initial_tasks)
           FROM pgflow.step_states ss
           JOIN pgflow.step_tasks t ON t.run_id = ss.run_id AND t.step_slug = ss.step_slug
          GROUP BY ss.run_id, ss.step_slug, ss.initial_tasks
         HAVING count(t.*) > coalesce(ss.initial_tasks, 0)
             OR min(t.task_index) < 0 OR max(t.task_index) >= coalesce(ss.initial_tasks, 0)",
    ),
    (
        "remaining_deps",
        "SELECT ss.run_id, format('step %s has remaining_deps %s but %s dependencies are not completed',
                                  ss.step_slug, ss.remaining_deps,
                                  count(dep.*) FILTER (WHERE dep.status <> 'completed'))
           FROM pgflow.step_states ss
           JOIN pgflow.runs r ON r.run_id = ss.run_id
           LEFT JOIN pgflow.deps d ON d.flow_slug = ss.flow_slug AND d.step_slug = ss.step_slug
           LEFT JOIN pgflow.step_states dep ON dep.run_id = ss.run_id AND dep.step_slug = d.dep_slug
          WHERE r.status <> 'failed'
          GROUP BY ss.run_id, ss.step_slug, ss.remaining_deps
         HAVING ss.remaining_deps <> count(dep.*) FILTER (WHERE dep.status <> 'completed')",
    ),
    (
        "started_before_deps",
        "SELECT ss.run_id, format('step %s is %s while dependency %s is %s',
                                  ss.step_slug, ss.status, dep.step_slug, dep.status)
           FROM pgflow.step_states ss
           JOIN pgflow.deps d ON d.flow_slug = ss.flow_slug AND d.step_slug = ss.step_slug
           JOIN pgflow.step_states dep ON dep.run_id = ss.run_id AND dep.step_slug = d.dep_slug
          WHERE ss.status IN ('started', 'completed') AND dep.status <> 'completed'",
    ),
    (
        "completed_step",
        "SELECT ss.run_id, format('step %s is completed but task %s is %s',
                                  ss.step_slug, t.task_index, t.status)
           FROM pgflow.step_states ss
           JOIN pgflow.step_tasks t ON t.run_id = ss.run_id AND t.step_slug = ss.step_slug
          WHERE ss.status = 'completed' AND t.status <> 'completed'",
    ),
    (
        "failed_run",
        "SELECT r.run_id, 'run is failed but no step is failed'
           FROM pgflow.runs r
          WHERE r.status = 'failed'
            AND NOT EXISTS (SELECT 1 FROM pgflow.step_states ss
                             WHERE ss.run_id = r.run_id AND ss.status = 'failed')",
    ),
];

/// Checks every run of the database; an empty result means consistent.
///
/// Besides the rules on the tables, each flow's queue is checked: a failed or completed run has
/// no message left in it, and every queued task of a running run has its message there.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
/// for violation in pgflow_client::check(&pool).await? {
///     eprintln!("{violation}");
/// }
/// # Ok(()) }
/// ```
pub async fn check(pool: &PgPool) -> Result<Vec<Violation>> {
    let mut tx = pool.begin().await?;
    // One snapshot for every rule, so rules never see different moments of a moving run.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let mut violations = Vec::new();
    for (rule, sql) in RULES {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(sql).fetch_all(&mut *tx).await?;
        violations.extend(rows.into_iter().map(|(run_id, detail)| Violation {
            rule,
            run_id,
            detail,
        }));
    }
    // A queue's table is pgmq.q_<name>, lowercased as pgmq names it: a flow `MyFlow` has
    // pgmq.q_myflow. Quoted by PostgreSQL, whatever the name holds.
    let queues: Vec<(String, String)> = sqlx::query_as(
        "SELECT f.flow_slug, format('pgmq.%I', 'q_' || lower(f.flow_slug))
           FROM pgflow.flows f
           JOIN pgmq.list_queues() q ON q.queue_name = f.flow_slug",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (queue, table) in queues {
        let leftover: Vec<(Uuid, String)> = sqlx::query_as(&format!(
            "SELECT r.run_id, format('run is %s but message %s (step %s) is still in the queue',
                                     r.status, q.msg_id, q.message->>'step_slug')
               FROM {table} q
               JOIN pgflow.runs r ON r.run_id = (q.message->>'run_id')::uuid
              WHERE r.status <> 'started'"
        ))
        .fetch_all(&mut *tx)
        .await?;
        let lost: Vec<(Uuid, String)> = sqlx::query_as(&format!(
            "SELECT t.run_id, format('task %s/%s is queued but its message %s is not in the queue',
                                     t.step_slug, t.task_index, t.message_id)
               FROM pgflow.step_tasks t
               JOIN pgflow.runs r ON r.run_id = t.run_id
              WHERE t.flow_slug = $1 AND r.status = 'started' AND t.status = 'queued'
                AND NOT EXISTS (SELECT 1 FROM {table} q WHERE q.msg_id = t.message_id)"
        ))
        .bind(&queue)
        .fetch_all(&mut *tx)
        .await?;
        for (rule, rows) in [
            ("ended_run_messages", leftover),
            ("queued_task_message", lost),
        ] {
            violations.extend(rows.into_iter().map(|(run_id, detail)| Violation {
                rule,
                run_id,
                detail,
            }));
        }
    }
    tx.commit().await?;
    Ok(violations)
}
