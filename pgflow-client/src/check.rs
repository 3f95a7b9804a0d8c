//! The checker: finds the runs whose rows contradict each other or their queue (an
//! inconsistency), and the runs that cannot move on without someone acting (a stuck run). Used
//! by tests after every scenario and by `pgflow check`.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Result;
use crate::worker::DEFAULT_HEARTBEAT_INTERVAL;
use FindingKind::{Inconsistent, Stuck};

/// How long a worker row may go without a heartbeat and still count as a live worker: six
/// beats at the worker's default interval, 30 s. A worker that misses that many beats in a row
/// is gone or cut off from the database; a worker configured with a longer
/// `heartbeat_interval` than this looks gone between its beats.
pub const LIVE_WORKER_WINDOW: Duration =
    Duration::from_secs(6 * DEFAULT_HEARTBEAT_INTERVAL.as_secs());

/// What the engine adds to a step's timeout before a started task's message reappears: starting
/// a task hides its message for `timeout + 2` seconds.
const REDELIVERY_GRACE_SECS: i32 = 2;

/// What a finding means for the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FindingKind {
    /// The engine's rows contradict each other or the queue: a bug, or a hand edit of the
    /// tables. Nothing the engine does later repairs it.
    Inconsistent,
    /// The rows agree, but the run does not move on without someone acting: no worker serves
    /// it, a worker died or hangs with one of its tasks, or a task's message is gone.
    Stuck,
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Inconsistent => "inconsistent",
            Self::Stuck => "stuck",
        })
    }
}

/// One thing [`check`] found about a run: which rule, where (run, flow, and the step and task
/// when it is about one), what exactly, and what to do.
///
/// Tests assert, after a scenario, that there is none, and print every one otherwise:
///
/// ```no_run
/// # async fn demo(client: pgflow_client::Client) -> pgflow_client::Result<()> {
/// let findings = client.check().await?;
/// assert!(
///     findings.is_empty(),
///     "{}",
///     findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
/// );
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Finding {
    /// Inconsistent or stuck.
    pub kind: FindingKind,
    /// The rule, e.g. `remaining_steps` or `no_live_worker` (docs/operating.md lists them).
    pub rule: &'static str,
    /// The run concerned.
    pub run_id: Uuid,
    /// The run's flow.
    pub flow_slug: String,
    /// The step concerned, when the finding is about one.
    pub step_slug: Option<String>,
    /// The task concerned (the first one, when it is about several), when there is one.
    pub task_index: Option<i32>,
    /// What exactly is wrong.
    pub detail: String,
    /// What to do about it, or what happens next on its own.
    pub action: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}] run {}, flow {}",
            self.kind, self.rule, self.run_id, self.flow_slug
        )?;
        if let Some(step) = &self.step_slug {
            write!(f, ", step {step}")?;
        }
        if let Some(index) = self.task_index {
            write!(f, ", task {index}")?;
        }
        write!(f, ": {}; to do: {}", self.detail, self.action)
    }
}

/// What to do about any inconsistency: the rows are the evidence.
const REPORT: &str = "an engine bug or a hand edit of pgflow's tables: keep the rows as they \
                      are and report them (`pgflow run <run_id> --json` shows the run)";

/// A row of a rule's query: run, flow, step, task index, detail.
type Row = (Uuid, String, Option<String>, Option<i32>, String);

/// The consistency rules: each one's name and a query returning a [`Row`] for every place that
/// breaks it. Runs still moving may be read mid-transition only across transactions, and every
/// rule relates rows that the engine changes in one transaction, so a snapshot is always
/// consistent.
const RULES: &[(&str, &str)] = &[
    (
        "remaining_steps",
        "SELECT r.run_id, r.flow_slug, NULL::text, NULL::int,
                format('remaining_steps is %s but %s steps are neither completed nor skipped',
                       r.remaining_steps,
                       count(ss.*) FILTER (WHERE ss.status NOT IN ('completed', 'skipped')))
           FROM pgflow.runs r JOIN pgflow.step_states ss ON ss.run_id = r.run_id
          WHERE r.status <> 'failed'
          GROUP BY r.run_id, r.flow_slug, r.remaining_steps
         HAVING r.remaining_steps
                <> count(ss.*) FILTER (WHERE ss.status NOT IN ('completed', 'skipped'))",
    ),
    (
        "completed_run",
        "SELECT r.run_id, r.flow_slug, ss.step_slug, NULL::int,
                format('run is completed but step %s is %s', ss.step_slug, ss.status)
           FROM pgflow.runs r JOIN pgflow.step_states ss ON ss.run_id = r.run_id
          WHERE r.status = 'completed' AND ss.status NOT IN ('completed', 'skipped')",
    ),
    (
        "remaining_tasks",
        "SELECT ss.run_id, ss.flow_slug, ss.step_slug, NULL::int,
                format('step %s (%s) has remaining_tasks %s, initial_tasks %s and %s completed tasks',
                       ss.step_slug, ss.status, ss.remaining_tasks, ss.initial_tasks,
                       count(t.*) FILTER (WHERE t.status = 'completed'))
           FROM pgflow.step_states ss
           JOIN pgflow.runs r ON r.run_id = ss.run_id
           LEFT JOIN pgflow.step_tasks t ON t.run_id = ss.run_id AND t.step_slug = ss.step_slug
          WHERE r.status <> 'failed' AND ss.status IN ('started', 'completed')
          GROUP BY ss.run_id, ss.flow_slug, ss.step_slug, ss.status, ss.remaining_tasks,
                   ss.initial_tasks
         HAVING ss.remaining_tasks IS DISTINCT FROM
                ss.initial_tasks - count(t.*) FILTER (WHERE t.status = 'completed')",
    ),
    (
        "task_count",
        "SELECT ss.run_id, ss.flow_slug, ss.step_slug, NULL::int,
                format('step %s has %s tasks (indexes %s..%s) for initial_tasks %s',
                       ss.step_slug, count(t.*), min(t.task_index), max(t.task_index),
                       ss.initial_tasks)
           FROM pgflow.step_states ss
           JOIN pgflow.step_tasks t ON t.run_id = ss.run_id AND t.step_slug = ss.step_slug
          GROUP BY ss.run_id, ss.flow_slug, ss.step_slug, ss.initial_tasks
         HAVING count(t.*) > coalesce(ss.initial_tasks, 0)
             OR min(t.task_index) < 0 OR max(t.task_index) >= coalesce(ss.initial_tasks, 0)",
    ),
    (
        "remaining_deps",
        "SELECT ss.run_id, ss.flow_slug, ss.step_slug, NULL::int,
                format('step %s has remaining_deps %s but %s dependencies are neither completed nor skipped',
                       ss.step_slug, ss.remaining_deps,
                       count(dep.*) FILTER (WHERE dep.status NOT IN ('completed', 'skipped')))
           FROM pgflow.step_states ss
           JOIN pgflow.runs r ON r.run_id = ss.run_id
           LEFT JOIN pgflow.deps d ON d.flow_slug = ss.flow_slug AND d.step_slug = ss.step_slug
           LEFT JOIN pgflow.step_states dep ON dep.run_id = ss.run_id AND dep.step_slug = d.dep_slug
          -- A skipped step's count stays as it was when it was skipped: the engine counts
          -- down only the steps still waiting (a skip-cascade skips a step and its
          -- dependents at once).
          WHERE r.status <> 'failed' AND ss.status <> 'skipped'
          GROUP BY ss.run_id, ss.flow_slug, ss.step_slug, ss.remaining_deps
         HAVING ss.remaining_deps
                <> count(dep.*) FILTER (WHERE dep.status NOT IN ('completed', 'skipped'))",
    ),
    (
        "started_before_deps",
        "SELECT ss.run_id, ss.flow_slug, ss.step_slug, NULL::int,
                format('step %s is %s while dependency %s is %s',
                       ss.step_slug, ss.status, dep.step_slug, dep.status)
           FROM pgflow.step_states ss
           JOIN pgflow.deps d ON d.flow_slug = ss.flow_slug AND d.step_slug = ss.step_slug
           JOIN pgflow.step_states dep ON dep.run_id = ss.run_id AND dep.step_slug = d.dep_slug
          WHERE ss.status IN ('started', 'completed', 'cancelled')
            AND dep.status NOT IN ('completed', 'skipped')",
    ),
    (
        "completed_step",
        "SELECT ss.run_id, ss.flow_slug, ss.step_slug, t.task_index,
                format('step %s is completed but task %s is %s',
                       ss.step_slug, t.task_index, t.status)
           FROM pgflow.step_states ss
           JOIN pgflow.step_tasks t ON t.run_id = ss.run_id AND t.step_slug = ss.step_slug
          WHERE ss.status = 'completed' AND t.status <> 'completed'",
    ),
    (
        "failed_run",
        "SELECT r.run_id, r.flow_slug, NULL::text, NULL::int, 'run is failed but no step is failed'
           FROM pgflow.runs r
          WHERE r.status = 'failed'
            AND NOT EXISTS (SELECT 1 FROM pgflow.step_states ss
                             WHERE ss.run_id = r.run_id AND ss.status = 'failed')",
    ),
    (
        "cancelled_run",
        "SELECT r.run_id, r.flow_slug, ss.step_slug, NULL::int,
                format('run is cancelled but step %s is still started', ss.step_slug)
           FROM pgflow.runs r JOIN pgflow.step_states ss ON ss.run_id = r.run_id
          WHERE r.status = 'cancelled' AND ss.status = 'started'
         UNION ALL
         SELECT r.run_id, r.flow_slug, t.step_slug, t.task_index,
                format('run is cancelled but task %s of step %s is still %s',
                       t.task_index, t.step_slug, t.status)
           FROM pgflow.runs r JOIN pgflow.step_tasks t ON t.run_id = r.run_id
          WHERE r.status = 'cancelled' AND t.status IN ('queued', 'started')",
    ),
    (
        "cancelled_outside_cancelled_run",
        "SELECT r.run_id, r.flow_slug, ss.step_slug, NULL::int,
                format('step %s is cancelled but the run is %s', ss.step_slug, r.status)
           FROM pgflow.runs r JOIN pgflow.step_states ss ON ss.run_id = r.run_id
          WHERE r.status <> 'cancelled' AND ss.status = 'cancelled'
         UNION ALL
         SELECT r.run_id, r.flow_slug, t.step_slug, t.task_index,
                format('task %s of step %s is cancelled but the run is %s',
                       t.task_index, t.step_slug, r.status)
           FROM pgflow.runs r
           JOIN pgflow.step_tasks t ON t.run_id = r.run_id
           JOIN pgflow.step_states ss ON ss.run_id = t.run_id AND ss.step_slug = t.step_slug
          WHERE r.status NOT IN ('cancelled', 'failed')
            AND ss.status <> 'skipped'
            AND t.status = 'cancelled'",
    ),
];

/// Checks every run of the database; an empty result means every run is consistent and none
/// is stuck.
///
/// Inconsistent ([`FindingKind::Inconsistent`]): the rules on the tables (counters, statuses,
/// dependencies), and a message left in the queue of a run that has ended (for a cancelled
/// run: a message of a cancelled task, which cancelling archives). Of run control (migration
/// 0007): `cancelled_run`, a cancelled run with a step still started or a task still queued or
/// started; `cancelled_outside_cancelled_run`, a cancelled step in a run that is not
/// cancelled (a retry takes them back to queued), or a cancelled task outside a cancelled
/// run, a failed run or a skipped step (migration 0010 cancels the tasks left by those).
/// A skipped step (migration 0010) counts as done for `remaining_steps`, `remaining_deps` and
/// `completed_run`.
///
/// Stuck ([`FindingKind::Stuck`]), for runs still started (a cancelled run is not stuck: it
/// waits for nobody):
/// - `no_live_worker`: tasks are queued and no live worker serves the flow (no row in
///   `pgflow.workers` for it, not deprecated, with a heartbeat in the last
///   [`LIVE_WORKER_WINDOW`]); one finding per step, naming its first queued task.
/// - `task_past_timeout`: a task started longer ago than its step's timeout plus the 2 s
///   the engine adds before its message reappears: its worker probably died or hangs. The
///   finding says what happens next: the message is delivered again (to a live worker, if
///   there is one), which starts the next attempt or, with none left, fails the task.
/// - `queued_task_message`: a queued task whose message is not in the flow's queue
///   (`pgmq.q_<flow>`): nothing will ever pick it up.
/// - `permanently_stalled`: a started task that the stalled-task sweep
///   (`pgflow.requeue_stalled_tasks`, the workers' timer) requeued three times and then marked
///   `permanently_stalled_at`, archiving its message: nothing runs it again. The action says
///   to look at its attempts, then cancel the run and retry it. `task_past_timeout` leaves
///   such a task to this rule.
///
/// Everything is read in one read-only snapshot, with `SELECT` rights alone.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> pgflow_client::Result<()> {
/// use pgflow_client::FindingKind;
///
/// for finding in pgflow_client::check(&pool).await? {
///     if finding.kind == FindingKind::Stuck {
///         eprintln!("{finding}");
///     }
/// }
/// # Ok(()) }
/// ```
pub async fn check(pool: &PgPool) -> Result<Vec<Finding>> {
    let mut tx = pool.begin().await?;
    // One snapshot for every rule, so rules never see different moments of a moving run.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let mut findings = Vec::new();
    for (rule, sql) in RULES {
        let rows: Vec<Row> = sqlx::query_as(sql).fetch_all(&mut *tx).await?;
        findings.extend(
            rows.into_iter()
                .map(|row| finding(Inconsistent, rule, row, REPORT)),
        );
    }
    let workers = workers(&mut tx).await?;
    findings.extend(no_live_worker(&mut tx, &workers).await?);
    findings.extend(permanently_stalled(&mut tx).await?);
    // A queue's table is pgmq.q_<name>, lowercased as pgmq names it: a flow `MyFlow` has
    // pgmq.q_myflow. Quoted by PostgreSQL, whatever the name holds.
    let queues: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT f.flow_slug, format('pgmq.%I', 'q_' || lower(f.flow_slug)),
                EXISTS (SELECT 1 FROM pgmq.list_queues() q WHERE q.queue_name = f.flow_slug)
           FROM pgflow.flows f
          ORDER BY f.flow_slug",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (flow, table, exists) in queues {
        let live = workers.get(&flow).is_some_and(|w| w.live);
        if exists {
            findings.extend(leftover_messages(&mut tx, &flow, &table).await?);
            findings.extend(lost_messages(&mut tx, &flow, Some(&table)).await?);
            findings.extend(past_timeout(&mut tx, &flow, &table, live).await?);
        } else {
            findings.extend(lost_messages(&mut tx, &flow, None).await?);
        }
    }
    tx.commit().await?;
    Ok(findings)
}

fn finding(kind: FindingKind, rule: &'static str, row: Row, action: &str) -> Finding {
    let (run_id, flow_slug, step_slug, task_index, detail) = row;
    Finding {
        kind,
        rule,
        run_id,
        flow_slug,
        step_slug,
        task_index,
        detail,
        action: action.to_owned(),
    }
}

/// The workers of a flow, as the checker sees them.
struct Workers {
    /// Whether one of them is live (see [`LIVE_WORKER_WINDOW`]).
    live: bool,
    /// Seconds since the last heartbeat of any of them, deprecated or not.
    last_beat_secs: i64,
}

/// The workers of every flow that has a row in `pgflow.workers`.
async fn workers(tx: &mut PgConnection) -> Result<HashMap<String, Workers>> {
    let rows: Vec<(String, bool, i64)> = sqlx::query_as(
        "SELECT w.queue_name,
                coalesce(bool_or(w.deprecated_at IS NULL
                                 AND w.last_heartbeat_at > now() - make_interval(secs => $1)),
                         false),
                floor(extract(epoch FROM now() - max(w.last_heartbeat_at)))::bigint
           FROM pgflow.workers w
          GROUP BY w.queue_name",
    )
    .bind(LIVE_WORKER_WINDOW.as_secs_f64())
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(flow, live, last_beat_secs)| {
            (
                flow,
                Workers {
                    live,
                    last_beat_secs,
                },
            )
        })
        .collect())
}

/// Why no worker of `flow` is live, for a finding's detail.
fn no_worker_because(flow: &str, workers: Option<&Workers>) -> String {
    let window = LIVE_WORKER_WINDOW.as_secs();
    match workers {
        None => format!("no worker has ever registered for flow {flow}"),
        Some(w) => format!(
            "no worker of flow {flow} is live (the last heartbeat was {} s ago; a live worker \
             is not deprecated and beat in the last {window} s)",
            w.last_beat_secs.max(0)
        ),
    }
}

/// `no_live_worker`: a step of a started run has queued tasks and no live worker serves its flow.
async fn no_live_worker(
    tx: &mut PgConnection,
    workers: &HashMap<String, Workers>,
) -> Result<Vec<Finding>> {
    let rows: Vec<(Uuid, String, String, i32, i32, i64)> = sqlx::query_as(
        "SELECT t.run_id, t.flow_slug, t.step_slug, min(t.task_index), max(t.task_index), count(*)
           FROM pgflow.step_tasks t
           JOIN pgflow.runs r ON r.run_id = t.run_id
          WHERE r.status = 'started' AND t.status = 'queued'
          GROUP BY t.run_id, t.flow_slug, t.step_slug
          ORDER BY t.run_id, t.step_slug",
    )
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, flow, ..)| !workers.get(flow).is_some_and(|w| w.live))
        .map(|(run_id, flow, step, first, last, count)| {
            let (tasks, them) = if count == 1 {
                (format!("task {first} is queued"), "it")
            } else {
                (
                    format!("{count} tasks are queued (indexes {first}..={last})"),
                    "them",
                )
            };
            let detail = format!(
                "{tasks} and {}: nothing takes {them}",
                no_worker_because(&flow, workers.get(&flow))
            );
            let action = format!(
                "start a worker serving flow {flow}; it takes the queued tasks as soon as it \
                 runs (`pgflow.workers` shows who heartbeats)"
            );
            finding(
                Stuck,
                "no_live_worker",
                (run_id, flow, Some(step), Some(first), detail),
                &action,
            )
        })
        .collect())
}

/// A message left in the queue by an ended run: run, step, task index, message id, run status.
type Leftover = (
    Uuid,
    Option<String>,
    Option<i32>,
    i64,
    String,
    Option<String>,
);

/// `ended_run_messages`: a message of a run that has ended is still in the queue.
///
/// Not a cancelled task's: `pgflow.cancel_run` passes over a message a worker is reading at that
/// moment (rather than wait for it while holding the task that worker wants), and the next read
/// of that message archives it. It is harmless meanwhile, and gone once a worker polls the flow.
async fn leftover_messages(tx: &mut PgConnection, flow: &str, table: &str) -> Result<Vec<Finding>> {
    let rows: Vec<Leftover> = sqlx::query_as(&format!(
        "SELECT r.run_id, q.message->>'step_slug', (q.message->>'task_index')::int, q.msg_id,
                r.status, t.status
           FROM {table} q
           JOIN pgflow.runs r ON r.run_id = (q.message->>'run_id')::uuid
           LEFT JOIN pgflow.step_tasks t
                  ON t.run_id = r.run_id AND t.step_slug = q.message->>'step_slug'
                 AND t.task_index = (q.message->>'task_index')::int
          WHERE r.status <> 'started'
            AND t.status IS DISTINCT FROM 'cancelled'
          ORDER BY r.run_id, q.msg_id"
    ))
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(run_id, step, index, msg_id, status, _task_status)| {
            let detail =
                format!("run is {status} but its message {msg_id} is still in the queue {table}");
            let action = format!(
                "{REPORT}; the message itself is harmless (a worker that reads it changes \
                 nothing) and `SELECT pgmq.archive('{flow}', {msg_id})` removes it"
            );
            finding(
                Inconsistent,
                "ended_run_messages",
                (run_id, flow.to_owned(), step, index, detail),
                &action,
            )
        })
        .collect())
}

/// `queued_task_message`: a queued task of a started run has no message in `table` (`None`:
/// the flow has no queue at all).
async fn lost_messages(
    tx: &mut PgConnection,
    flow: &str,
    table: Option<&str>,
) -> Result<Vec<Finding>> {
    let in_queue = match table {
        Some(table) => format!("EXISTS (SELECT 1 FROM {table} q WHERE q.msg_id = t.message_id)"),
        None => "false".to_owned(),
    };
    let rows: Vec<(Uuid, String, i32, Option<i64>)> = sqlx::query_as(&format!(
        "SELECT t.run_id, t.step_slug, t.task_index, t.message_id
           FROM pgflow.step_tasks t
           JOIN pgflow.runs r ON r.run_id = t.run_id
          WHERE t.flow_slug = $1 AND r.status = 'started' AND t.status = 'queued'
            AND NOT {in_queue}
          ORDER BY t.run_id, t.step_slug, t.task_index"
    ))
    .bind(flow)
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(run_id, step, index, message_id)| {
            let message = message_id.map_or_else(
                || "has no message".to_owned(),
                |id| format!("has message {id}"),
            );
            let detail = match table {
                Some(table) => format!(
                    "task is queued and {message}, which is not in {table}: nothing will \
                     ever pick it up"
                ),
                None => format!(
                    "task is queued but flow {flow} has no queue: nothing will ever pick it up"
                ),
            };
            let action = "send its message again (docs/operating.md, \"Stuck runs\", has the \
                          statement), or start a new run with the same input";
            finding(
                Stuck,
                "queued_task_message",
                (run_id, flow.to_owned(), Some(step), Some(index), detail),
                action,
            )
        })
        .collect())
}

/// A started task past its timeout, as read for `task_past_timeout`.
#[derive(sqlx::FromRow)]
struct PastTimeout {
    run_id: Uuid,
    step_slug: String,
    task_index: i32,
    attempts_count: i32,
    max_attempts: i32,
    timeout: i32,
    started_secs: i64,
    worker: Option<Uuid>,
    worker_live: bool,
    message_id: Option<i64>,
    /// Seconds until the message is visible again (negative: visible since); `None`: no message.
    visible_in_secs: Option<i64>,
}

/// `task_past_timeout`: a task started longer ago than its step's timeout plus the engine's
/// grace; `live`: whether a live worker serves `flow`.
async fn past_timeout(
    tx: &mut PgConnection,
    flow: &str,
    table: &str,
    live: bool,
) -> Result<Vec<Finding>> {
    let tasks: Vec<PastTimeout> = sqlx::query_as(&format!(
        "SELECT t.run_id, t.step_slug, t.task_index, t.attempts_count,
                coalesce(s.opt_max_attempts, f.opt_max_attempts) AS max_attempts,
                coalesce(s.opt_timeout, f.opt_timeout) AS timeout,
                floor(extract(epoch FROM now() - t.started_at))::bigint AS started_secs,
                t.last_worker_id AS worker,
                coalesce(w.deprecated_at IS NULL
                         AND w.last_heartbeat_at > now() - make_interval(secs => $2), false)
                  AS worker_live,
                t.message_id,
                ceil(extract(epoch FROM q.vt - now()))::bigint AS visible_in_secs
           FROM pgflow.step_tasks t
           JOIN pgflow.runs r ON r.run_id = t.run_id
           JOIN pgflow.steps s ON s.flow_slug = t.flow_slug AND s.step_slug = t.step_slug
           JOIN pgflow.flows f ON f.flow_slug = t.flow_slug
           LEFT JOIN pgflow.workers w ON w.worker_id = t.last_worker_id
           LEFT JOIN {table} q ON q.msg_id = t.message_id
          WHERE t.flow_slug = $1 AND r.status = 'started' AND t.status = 'started'
            AND NOT {STALLED_FOR_GOOD}
            AND t.started_at < now() - make_interval(
                  secs => coalesce(s.opt_timeout, f.opt_timeout) + $3)
          ORDER BY t.run_id, t.step_slug, t.task_index"
    ))
    .bind(flow)
    .bind(LIVE_WORKER_WINDOW.as_secs_f64())
    .bind(REDELIVERY_GRACE_SECS)
    .fetch_all(tx)
    .await?;
    Ok(tasks
        .into_iter()
        .map(|task| {
            let worker = match (task.worker, task.worker_live) {
                (Some(id), true) => format!("worker {id} still heartbeats: its handler hangs"),
                (Some(id), false) => format!("worker {id} is gone: it probably died"),
                (None, _) => "its worker's row is gone: it probably died".to_owned(),
            };
            let detail = format!(
                "task started {} s ago (attempt {} of {}), past its timeout of {} s + {} s; {worker}",
                task.started_secs,
                task.attempts_count,
                task.max_attempts,
                task.timeout,
                REDELIVERY_GRACE_SECS,
            );
            let next = if task.attempts_count < task.max_attempts {
                format!("starts attempt {}", task.attempts_count + 1)
            } else {
                "fails the task, its attempts used up, and the run with it".to_owned()
            };
            let action = match task.visible_in_secs {
                None => format!(
                    "its message {} is not in {table}, so no reader will get it again: the \
                     stalled-task sweep of a running worker requeues it 30 s past its timeout \
                     (docs/operating.md, \"Stalled tasks\"); with no worker sweeping, send it \
                     again (\"Stuck runs\") or start a new run with the same input",
                    task.message_id
                        .map_or_else(|| "(none)".to_owned(), |id| id.to_string())
                ),
                Some(secs) => {
                    let when = if secs > 0 {
                        format!("reappears in {secs} s")
                    } else {
                        "is visible again".to_owned()
                    };
                    if live {
                        format!(
                            "nothing, unless it recurs: its message {when}, and the live worker \
                             that reads it {next}"
                        )
                    } else {
                        format!(
                            "start a worker serving flow {flow}: its message {when}, but no \
                             live worker serves the flow; the worker that reads it {next}"
                        )
                    }
                }
            };
            finding(
                Stuck,
                "task_past_timeout",
                (
                    task.run_id,
                    flow.to_owned(),
                    Some(task.step_slug),
                    Some(task.task_index),
                    detail,
                ),
                &action,
            )
        })
        .collect())
}

/// Whether task `t` is permanently stalled: marked so by the sweep, and not started again since
/// (the sweep's own test, in migration 0010's `requeue_stalled_tasks`).
const STALLED_FOR_GOOD: &str =
    "(t.permanently_stalled_at IS NOT NULL AND t.permanently_stalled_at >= t.started_at)";

/// A permanently stalled task, as read for `permanently_stalled`.
#[derive(sqlx::FromRow)]
struct Stalled {
    run_id: Uuid,
    flow_slug: String,
    step_slug: String,
    task_index: i32,
    requeued_count: i32,
    attempts_count: i32,
    max_attempts: i32,
    stalled_secs: i64,
}

/// `permanently_stalled`: a started task of a started run that the sweep gave up on.
async fn permanently_stalled(tx: &mut PgConnection) -> Result<Vec<Finding>> {
    let tasks: Vec<Stalled> = sqlx::query_as(&format!(
        "SELECT t.run_id, t.flow_slug, t.step_slug, t.task_index, t.requeued_count,
                t.attempts_count, coalesce(s.opt_max_attempts, f.opt_max_attempts) AS max_attempts,
                floor(extract(epoch FROM now() - t.permanently_stalled_at))::bigint
                  AS stalled_secs
           FROM pgflow.runs r
           JOIN pgflow.step_tasks t ON t.run_id = r.run_id
           JOIN pgflow.steps s ON s.flow_slug = t.flow_slug AND s.step_slug = t.step_slug
           JOIN pgflow.flows f ON f.flow_slug = t.flow_slug
          WHERE r.status = 'started' AND t.status = 'started' AND {STALLED_FOR_GOOD}
          ORDER BY t.run_id, t.step_slug, t.task_index"
    ))
    .fetch_all(tx)
    .await?;
    Ok(tasks
        .into_iter()
        .map(|task| {
            let detail = format!(
                "task lost its worker again after {} requeues (attempt {} of {}) and was marked \
                 permanently stalled {} s ago; its message is archived: nothing will run it again",
                task.requeued_count,
                task.attempts_count,
                task.max_attempts,
                task.stalled_secs.max(0),
            );
            let action = format!(
                "find out why its attempts never end (a handler that hangs past its timeout or \
                 takes its worker down: `pgflow run {run} --attempts`), fix that, then \
                 `pgflow cancel {run}` and `pgflow retry {run}` to run the task again (cancel_run \
                 then retry_run in SQL)",
                run = task.run_id
            );
            finding(
                Stuck,
                "permanently_stalled",
                (
                    task.run_id,
                    task.flow_slug,
                    Some(task.step_slug),
                    Some(task.task_index),
                    detail,
                ),
                &action,
            )
        })
        .collect())
}
