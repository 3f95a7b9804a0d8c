//! The checker (`pgflow_client::check`, `pgflow check`) tells the stuck runs apart: no live
//! worker on the flow, a task started past its timeout, a queued task whose message is gone;
//! and a healthy run has no finding.

use std::time::{Duration, Instant};

use pgflow_client::throwaway::TestDatabase;
use pgflow_client::{Client, Finding, FindingKind, LIVE_WORKER_WINDOW, Worker, WorkerHandle};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::client;

/// A flow of one step, `only`, that returns its input.
fn echo(slug: &str) -> Flow<Value> {
    let only =
        step_fn("only").handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) });
    Flow::new(slug).step(only).build()
}

/// What identifies a finding: kind, rule, run, flow, step, task.
type Where<'a> = (
    FindingKind,
    &'a str,
    Uuid,
    &'a str,
    Option<&'a str>,
    Option<i32>,
);

fn places(findings: &[Finding]) -> Vec<Where<'_>> {
    findings
        .iter()
        .map(|f| {
            (
                f.kind,
                f.rule,
                f.run_id,
                f.flow_slug.as_str(),
                f.step_slug.as_deref(),
                f.task_index,
            )
        })
        .collect()
}

/// Asserts that `finding`, as printed, says each of `parts`.
fn assert_says(finding: &Finding, parts: &[&str]) {
    let text = finding.to_string();
    for part in parts {
        assert!(text.contains(part), "{part:?} in {text}");
    }
}

/// Runs statement `sql`.
async fn execute(pool: &PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.unwrap();
}

/// Registers a worker row for `flow` whose last heartbeat was `ago` ago.
async fn worker_row(pool: &PgPool, flow: &str, ago: Duration, deprecated: bool) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name, started_at,
                                     last_heartbeat_at, deprecated_at)
         SELECT $1, $2, 'test', now() - make_interval(secs => $3),
                now() - make_interval(secs => $3), CASE WHEN $4 THEN now() END",
    )
    .bind(id)
    .bind(flow)
    .bind(ago.as_secs_f64())
    .bind(deprecated)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// Waits until query `sql` (bound to `bind`) returns true, for at most 20 s.
async fn eventually(pool: &PgPool, sql: &str, bind: Uuid) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done: bool = sqlx::query_scalar(sql)
            .bind(bind)
            .fetch_one(pool)
            .await
            .unwrap();
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {sql}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh database where flow `slug` (an [`echo`]) has a live worker row and a run started:
/// the database, a client, the worker row's id and the run's.
async fn served_run(slug: &str) -> (TestDatabase, Client, Uuid, Uuid) {
    let (db, client) = client().await;
    client.compile(&echo(slug)).await.unwrap();
    let worker = worker_row(client.pool(), slug, Duration::ZERO, false).await;
    let run = client.start_json(slug, json!(1), None).await.unwrap().id();
    (db, client, worker, run)
}

/// Waits until run `run` has completed.
async fn completed(pool: &PgPool, run: Uuid) {
    eventually(
        pool,
        "SELECT status = 'completed' FROM pgflow.runs WHERE run_id = $1",
        run,
    )
    .await;
}

fn spawn_worker(pool: &PgPool, flow: Flow<Value>) -> WorkerHandle {
    Worker::builder(pool.clone())
        .flow(flow)
        .poll_interval(Duration::from_millis(50))
        .heartbeat_interval(Duration::from_millis(200))
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_healthy_run_has_no_finding() {
    // Waiting for a live worker, its message in the queue: healthy, if not done yet.
    let (_db, client, _, run) = served_run("healthy").await;
    let pool = client.pool();
    assert_eq!(client.check().await.unwrap(), []);

    let worker = spawn_worker(pool, echo("healthy"));
    completed(pool, run).await;
    assert_eq!(client.check().await.unwrap(), []);
    worker.shutdown().await.unwrap();
    // An ended run needs no worker.
    execute(pool, "DELETE FROM pgflow.workers").await;
    assert_eq!(client.check().await.unwrap(), []);
}

#[tokio::test]
async fn a_run_that_no_live_worker_serves_is_stuck() {
    let (_db, client) = client().await;
    let pool = client.pool();
    client.compile(&echo("lonely")).await.unwrap();
    let run = client.start_json("lonely", json!(1), None).await.unwrap();

    let findings = client.check().await.unwrap();
    let stuck = (
        FindingKind::Stuck,
        "no_live_worker",
        run.id(),
        "lonely",
        Some("only"),
        Some(0),
    );
    assert_eq!(places(&findings), [stuck]);
    assert_says(
        &findings[0],
        &["no worker has ever registered for flow lonely"],
    );
    assert_says(&findings[0], &["start a worker serving flow lonely"]);

    // A worker silent for longer than the window, and a deprecated one, serve nothing.
    let silent = LIVE_WORKER_WINDOW + Duration::from_secs(5);
    worker_row(pool, "lonely", silent, false).await;
    worker_row(pool, "lonely", Duration::ZERO, true).await;
    let findings = client.check().await.unwrap();
    assert_eq!(places(&findings), [stuck]);
    assert_says(&findings[0], &["the last heartbeat was 0 s ago"]);
    // A worker that beat within the window is live; a live worker of another flow is not.
    worker_row(pool, "elsewhere", Duration::ZERO, false).await;
    assert_eq!(places(&client.check().await.unwrap()), [stuck]);
    worker_row(
        pool,
        "lonely",
        LIVE_WORKER_WINDOW - Duration::from_secs(5),
        false,
    )
    .await;
    assert_eq!(client.check().await.unwrap(), []);
}

#[tokio::test]
async fn one_finding_per_step_names_its_first_queued_task() {
    let (_db, client) = client().await;
    let pool = client.pool();
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('many');
         SELECT pgflow.add_step('many', 'each', step_type => 'map');",
    )
    .execute(pool)
    .await
    .unwrap();
    let run = client
        .start_json("many", json!([1, 2, 3]), None)
        .await
        .unwrap();
    let findings = client.check().await.unwrap();
    assert_eq!(
        places(&findings),
        [(
            FindingKind::Stuck,
            "no_live_worker",
            run.id(),
            "many",
            Some("each"),
            Some(0)
        )]
    );
    assert!(
        findings[0]
            .detail
            .starts_with("3 tasks are queued (indexes 0..=2)"),
        "{}",
        findings[0]
    );
}

#[tokio::test]
async fn a_live_worker_heartbeating_serves_the_run() {
    let (_db, client) = client().await;
    let pool = client.pool();
    let flow = echo("served");
    client.compile(&flow).await.unwrap();
    let run = client.start(&flow, &json!(1)).await.unwrap();
    // The message waits an hour (as for a retry): the task stays queued while a worker runs.
    execute(
        pool,
        "UPDATE pgmq.q_served SET vt = now() + interval '1 hour'",
    )
    .await;
    let stuck = [(
        FindingKind::Stuck,
        "no_live_worker",
        run.id(),
        "served",
        Some("only"),
        Some(0),
    )];
    assert_eq!(places(&client.check().await.unwrap()), stuck);

    let worker = spawn_worker(pool, flow);
    let id = worker.worker_id("served").unwrap();
    eventually(
        pool,
        "SELECT EXISTS (SELECT 1 FROM pgflow.workers WHERE worker_id = $1)",
        id,
    )
    .await;
    assert_eq!(client.check().await.unwrap(), []);

    // Set its heartbeat back past the window: not live; its next beat makes it live again.
    sqlx::query(
        "UPDATE pgflow.workers SET last_heartbeat_at = now() - make_interval(secs => $2)
          WHERE worker_id = $1",
    )
    .bind(id)
    .bind((LIVE_WORKER_WINDOW + Duration::from_secs(5)).as_secs_f64())
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(places(&client.check().await.unwrap()), stuck);
    eventually(
        pool,
        "SELECT last_heartbeat_at > now() - interval '5 seconds' FROM pgflow.workers
          WHERE worker_id = $1",
        id,
    )
    .await;
    assert_eq!(client.check().await.unwrap(), []);

    // A worker that stopped deprecated its row: nothing serves the run any more.
    worker.shutdown().await.unwrap();
    assert_eq!(places(&client.check().await.unwrap()), stuck);
}

/// Starts the only task of `run` (flow `flow`) as worker `worker`, straight through the SQL API.
async fn start_task(pool: &PgPool, flow: &str, worker: Uuid) {
    let ids: Vec<i64> = sqlx::query_scalar("SELECT msg_id FROM pgmq.read($1, 30, 1)")
        .bind(flow)
        .fetch_all(pool)
        .await
        .unwrap();
    let started: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.start_tasks($1, $2, $3)")
        .bind(flow)
        .bind(&ids)
        .bind(worker)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(started, 1);
}

/// Moves the start of `run`'s tasks `secs` seconds back.
async fn started_ago(pool: &PgPool, run: Uuid, secs: i32) {
    sqlx::query(
        "UPDATE pgflow.step_tasks
            SET queued_at = now() - make_interval(secs => $2),
                started_at = now() - make_interval(secs => $2)
          WHERE run_id = $1",
    )
    .bind(run)
    .bind(f64::from(secs))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_task_started_past_its_timeout_is_stale() {
    let (_db, client, worker, run) = served_run("slow").await;
    let pool = client.pool();
    start_task(pool, "slow", worker).await;
    assert_eq!(client.check().await.unwrap(), []);

    // The step's timeout is the default 60 s; its message reappears 62 s after the start.
    started_ago(pool, run, 55).await;
    assert_eq!(client.check().await.unwrap(), []);
    started_ago(pool, run, 70).await;
    let findings = client.check().await.unwrap();
    let stale = [(
        FindingKind::Stuck,
        "task_past_timeout",
        run,
        "slow",
        Some("only"),
        Some(0),
    )];
    assert_eq!(places(&findings), stale);
    assert_says(
        &findings[0],
        &[
            "task started 70 s ago (attempt 1 of 3), past its timeout of 60 s + 2 s",
            &format!("worker {worker} still heartbeats: its handler hangs"),
            "its message reappears in",
            "the live worker that reads it starts attempt 2",
        ],
    );

    // Its worker gone and the message visible: nobody takes it until a worker starts.
    execute(pool, "UPDATE pgflow.workers SET deprecated_at = now()").await;
    execute(pool, "UPDATE pgmq.q_slow SET vt = now()").await;
    let findings = client.check().await.unwrap();
    assert_eq!(places(&findings), stale);
    assert_says(
        &findings[0],
        &[
            &format!("worker {worker} is gone: it probably died"),
            "start a worker serving flow slow: its message is visible again",
            "the worker that reads it starts attempt 2",
        ],
    );

    // What the finding says happens: a worker reads the message and runs attempt 2.
    let handle = spawn_worker(pool, echo("slow"));
    completed(pool, run).await;
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts_count FROM pgflow.step_tasks WHERE run_id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(attempts, 2);
    handle.shutdown().await.unwrap();
    assert_eq!(client.check().await.unwrap(), []);
}

#[tokio::test]
async fn a_stale_task_with_no_attempt_left_is_said_to_fail() {
    let (_db, client, worker, run) = served_run("spent").await;
    let pool = client.pool();
    start_task(pool, "spent", worker).await;
    started_ago(pool, run, 70).await;
    execute(pool, "UPDATE pgflow.step_tasks SET attempts_count = 3").await;
    let findings = client.check().await.unwrap();
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_says(
        &findings[0],
        &["the live worker that reads it fails the task, its attempts used up"],
    );
}

/// The statement docs/operating.md gives to send a lost message again.
const RESEND: &str = "UPDATE pgflow.step_tasks t
   SET message_id = (SELECT pgmq.send('<flow>', jsonb_build_object(
         'flow_slug', t.flow_slug, 'run_id', t.run_id,
         'step_slug', t.step_slug, 'task_index', t.task_index)))
 WHERE t.run_id = '<run_id>' AND t.step_slug = '<step>' AND t.task_index = <task>
   AND t.status = 'queued';";

#[tokio::test]
async fn a_queued_task_whose_message_is_gone_is_stuck() {
    let (_db, client, _, run) = served_run("lost").await;
    let pool = client.pool();
    let message: i64 = sqlx::query_scalar("SELECT message_id FROM pgflow.step_tasks")
        .fetch_one(pool)
        .await
        .unwrap();
    let deleted: bool = sqlx::query_scalar("SELECT pgmq.delete('lost', $1)")
        .bind(message)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(deleted);

    let lost = [(
        FindingKind::Stuck,
        "queued_task_message",
        run,
        "lost",
        Some("only"),
        Some(0),
    )];
    let findings = client.check().await.unwrap();
    assert_eq!(places(&findings), lost);
    assert_says(
        &findings[0],
        &[
            &format!("task is queued and has message {message}, which is not in pgmq.q_lost"),
            "nothing will ever pick it up",
            "send its message again",
        ],
    );

    // No message id at all: the same.
    execute(pool, "UPDATE pgflow.step_tasks SET message_id = NULL").await;
    let findings = client.check().await.unwrap();
    assert_eq!(places(&findings), lost);
    assert_says(&findings[0], &["has no message"]);

    // The documented remedy works: sent again, the task has its message and a worker runs it.
    let docs = include_str!("../../docs/operating.md");
    assert!(docs.contains(RESEND), "docs/operating.md gives {RESEND}");
    let resend = RESEND
        .replace("<flow>", "lost")
        .replace("<run_id>", &run.to_string())
        .replace("<step>", "only")
        .replace("<task>", "0");
    execute(pool, &resend).await;
    assert_eq!(client.check().await.unwrap(), []);
    let worker = spawn_worker(pool, echo("lost"));
    completed(pool, run).await;
    worker.shutdown().await.unwrap();
    assert_eq!(client.check().await.unwrap(), []);
}

#[tokio::test]
async fn an_inconsistent_run_is_told_from_a_stuck_one() {
    let (_db, client, _, run) = served_run("broken").await;
    let pool = client.pool();
    execute(pool, "UPDATE pgflow.runs SET remaining_steps = 5").await;
    let findings = client.check().await.unwrap();
    assert_eq!(
        places(&findings),
        [(
            FindingKind::Inconsistent,
            "remaining_steps",
            run,
            "broken",
            None,
            None
        )]
    );
    assert_eq!(
        findings[0].to_string(),
        format!(
            "inconsistent [remaining_steps] run {}, flow broken: remaining_steps is 5 but 1 \
             steps are neither completed nor skipped; to do: an engine bug or a hand edit of pgflow's tables: \
             keep the rows as they are and report them (`pgflow run <run_id> --json` shows the \
             run)",
            run
        )
    );
    let json = serde_json::to_value(&findings[0]).unwrap();
    assert_eq!(json["kind"], "inconsistent");
    assert_eq!(json["step_slug"], Value::Null);
}

#[tokio::test]
async fn a_permanently_stalled_task_is_stuck_until_cancelled_and_retried() {
    let (_db, client, worker, run) = served_run("stalls").await;
    let pool = client.pool();
    // Attempts to spare: the sweep gives up after three requeues, not for want of attempts.
    execute(pool, "UPDATE pgflow.flows SET opt_max_attempts = 10").await;
    let sweep = async || -> i32 {
        sqlx::query_scalar("SELECT pgflow.requeue_stalled_tasks()")
            .fetch_one(pool)
            .await
            .unwrap()
    };
    for _ in 0..3 {
        start_task(pool, "stalls", worker).await;
        started_ago(pool, run, 100).await;
        assert_eq!(sweep().await, 1);
    }
    // A requeued task waiting for its next attempt is no finding.
    assert_eq!(client.check().await.unwrap(), []);
    start_task(pool, "stalls", worker).await;
    started_ago(pool, run, 100).await;
    assert_eq!(sweep().await, 0);

    // One finding, this rule's: not also task_past_timeout, whose advice would be wrong.
    let findings = client.check().await.unwrap();
    assert_eq!(
        places(&findings),
        [(
            FindingKind::Stuck,
            "permanently_stalled",
            run,
            "stalls",
            Some("only"),
            Some(0),
        )]
    );
    assert_says(
        &findings[0],
        &[
            "task lost its worker again after 3 requeues (attempt 4 of 10)",
            "its message is archived: nothing will run it again",
            &format!("`pgflow run {run} --attempts`"),
            &format!("`pgflow cancel {run}` and `pgflow retry {run}`"),
        ],
    );

    // What the finding says to do works: cancelled and retried, a worker runs the task.
    client.cancel(run).await.unwrap();
    client.retry(run).await.unwrap();
    assert_eq!(client.check().await.unwrap(), []);
    let handle = spawn_worker(pool, echo("stalls"));
    completed(pool, run).await;
    handle.shutdown().await.unwrap();
    assert_eq!(client.check().await.unwrap(), []);
}
