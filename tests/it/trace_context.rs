//! Migration 0012 (issue 23): a run's stored trace context, its format held by the table,
//! written once, gone with its run (prune, a flow replaced with its runs, a plain delete); the
//! per-batch telemetry read, which answers a worker only about the tasks it started, and whose
//! queue wait leaves out the delays a task was meant to wait.

use std::time::Duration;

use pgflow_client::{Replace, Worker};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{client, finished, start};

const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const WITHIN: Duration = Duration::from_secs(30);

fn echo(slug: &str) -> Flow<Value> {
    let step =
        step_fn("echo").handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) });
    Flow::new(slug).step(step).build()
}

async fn set(
    pool: &PgPool,
    run: Uuid,
    traceparent: &str,
    tracestate: Option<&str>,
) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pgflow.set_run_trace_context($1, $2, $3)")
        .bind(run)
        .bind(traceparent)
        .bind(tracestate)
        .fetch_one(pool)
        .await
}

async fn stored(pool: &PgPool, run: Uuid) -> Option<(String, Option<String>)> {
    sqlx::query_as(
        "SELECT traceparent, tracestate FROM pgflow_ext.run_trace_context WHERE run_id = $1",
    )
    .bind(run)
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_trace_context_is_stored_once_and_only_well_formed() {
    let (_db, client) = client().await;
    let pool = client.pool();
    client.compile(&echo("traced_sql")).await.unwrap();
    let run = start(pool, "traced_sql", json!(1)).await;

    let bad_parents = [
        "",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
        "' OR 1=1 --",
    ];
    for bad in bad_parents {
        let error = set(pool, run, bad, None).await.expect_err(bad);
        let code = error.as_database_error().and_then(|db| db.code());
        assert_eq!(code.as_deref(), Some("23514"), "{bad:?}: {error}");
    }
    let long = "k=".to_owned() + &"v".repeat(8191);
    for bad in ["a=b\nc=d", "a=\u{1}", "a=\u{e9}", long.as_str()] {
        let error = set(pool, run, GOOD, Some(bad)).await.expect_err(bad);
        let code = error.as_database_error().and_then(|db| db.code());
        assert_eq!(code.as_deref(), Some("23514"), "{error}");
    }
    assert_eq!(stored(pool, run).await, None, "nothing refused was kept");

    // The first writer wins; an empty state is no state.
    assert!(set(pool, run, GOOD, Some("")).await.unwrap());
    let other = "00-11111111111111111111111111111111-2222222222222222-00";
    assert!(!set(pool, run, other, Some("a=b")).await.unwrap());
    assert_eq!(stored(pool, run).await, Some((GOOD.to_owned(), None)));
    // No such run: nothing stored, no error.
    assert!(!set(pool, Uuid::new_v4(), GOOD, None).await.unwrap());
    let state = "vendor=opaque,other=x:y";
    let second = start(pool, "traced_sql", json!(2)).await;
    assert!(set(pool, second, GOOD, Some(state)).await.unwrap());
    assert_eq!(
        stored(pool, second).await,
        Some((GOOD.to_owned(), Some(state.to_owned())))
    );
}

#[tokio::test]
async fn a_runs_trace_context_goes_with_the_run() {
    let (_db, client) = client().await;
    let pool = client.pool();
    let flow = echo("traced_prune");
    client.compile(&flow).await.unwrap();
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .unwrap();
    let mut runs = Vec::new();
    for n in 0..3 {
        let run = start(pool, "traced_prune", json!(n)).await;
        set(pool, run, GOOD, Some("a=b")).await.unwrap();
        runs.push(run);
    }
    for run in &runs {
        assert_eq!(finished(pool, *run, WITHIN).await.0, "completed");
    }
    worker.shutdown().await.unwrap();
    let count = |runs: Vec<Uuid>| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pgflow_ext.run_trace_context WHERE run_id = ANY($1)",
        )
        .bind(runs)
        .fetch_one(pool)
        .await
        .unwrap()
    };
    assert_eq!(count(runs.clone()).await, 3);

    // A plain delete, as an owner's cleanup script would do it.
    sqlx::query("DELETE FROM pgflow.step_tasks WHERE run_id = $1")
        .bind(runs[0])
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM pgflow.step_states WHERE run_id = $1")
        .bind(runs[0])
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM pgflow.runs WHERE run_id = $1")
        .bind(runs[0])
        .execute(pool)
        .await
        .expect("a run with a trace context can be deleted");
    assert_eq!(count(vec![runs[0]]).await, 0);

    // The engine's prune, as `pgflow prune` calls it.
    let pruned: i32 = sqlx::query_scalar(
        "SELECT (pgflow.prune_runs(now() + interval '1 second', 1)).runs_deleted",
    )
    .fetch_one(pool)
    .await
    .expect("prune_runs");
    assert_eq!(pruned, 1);
    assert_eq!(count(runs[1..].to_vec()).await, 1);

    // A flow replaced with its runs.
    let changed = Flow::new("traced_prune")
        .step(
            step_fn("other")
                .handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) }),
        )
        .build();
    client
        .compile_replacing(&changed, Replace::DeletingRuns)
        .await
        .expect("replaced with its runs");
    assert_eq!(count(runs).await, 0);
}

/// A worker's read of its batch, through the SQL API as a worker of another language would.
async fn read(pool: &PgPool, flow: &str, worker: Uuid) -> Vec<(Uuid, String, i32, i32)> {
    sqlx::query_as(
        "SELECT run_id, step_slug, task_index, attempt FROM pgflow._read_and_start($1, 10, 30, $2)",
    )
    .bind(flow)
    .bind(worker)
    .fetch_all(pool)
    .await
    .unwrap()
}

type Telemetry = (i64, Option<String>, Option<String>, Option<f64>);

async fn telemetry(
    pool: &PgPool,
    flow: &str,
    worker: Uuid,
    tasks: &[(Uuid, String, i32, i32)],
) -> Vec<Telemetry> {
    let runs: Vec<Uuid> = tasks.iter().map(|t| t.0).collect();
    let steps: Vec<&str> = tasks.iter().map(|t| t.1.as_str()).collect();
    let indexes: Vec<i32> = tasks.iter().map(|t| t.2).collect();
    sqlx::query_as(
        "SELECT ord, traceparent, tracestate, queue_wait \
           FROM pgflow.started_task_telemetry($1, $2, $3, $4, $5) ORDER BY ord",
    )
    .bind(flow)
    .bind(worker)
    .bind(runs)
    .bind(steps)
    .bind(indexes)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn register(pool: &PgPool, flow: &str) -> Uuid {
    let worker = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, $2, 'sql')",
    )
    .bind(worker)
    .bind(flow)
    .execute(pool)
    .await
    .unwrap();
    worker
}

#[tokio::test]
async fn the_batch_read_answers_about_the_workers_own_tasks_without_their_intended_delays() {
    let (_db, client) = client().await;
    let pool = client.pool();
    // A one-second start delay, which the queue wait leaves out.
    let delayed = step_fn("delayed")
        .start_delay(1)
        .max_attempts(3)
        .handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) });
    let flow: Flow<Value> = Flow::new("telemetry_sql").step(delayed).build();
    client.compile(&flow).await.unwrap();
    let traced = start(pool, "telemetry_sql", json!(1)).await;
    set(pool, traced, GOOD, Some("a=b")).await.unwrap();
    let plain = start(pool, "telemetry_sql", json!(2)).await;
    let worker = register(pool, "telemetry_sql").await;
    let other_worker = register(pool, "telemetry_sql").await;

    let mut tasks = Vec::new();
    let deadline = tokio::time::Instant::now() + WITHIN;
    while tasks.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "never readable");
        tokio::time::sleep(Duration::from_millis(100)).await;
        tasks.extend(read(pool, "telemetry_sql", worker).await);
    }
    tasks.sort_by_key(|task| task.0 != traced);
    let waited: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM min(started_at - queued_at))::float8 \
           FROM pgflow.step_tasks WHERE run_id = ANY($1)",
    )
    .bind(vec![traced, plain])
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(waited >= 1.0, "the start delay passed: {waited}");

    let rows = telemetry(pool, "telemetry_sql", worker, &tasks).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].0, 1);
    assert_eq!(rows[0].1.as_deref(), Some(GOOD));
    assert_eq!(rows[0].2.as_deref(), Some("a=b"));
    assert_eq!((rows[1].0, rows[1].1.as_deref()), (2, None));
    for row in &rows {
        let wait = row.3.expect("a first attempt's wait");
        assert!(
            (0.0..1.0).contains(&wait),
            "without the start delay: {wait} of {waited}"
        );
    }
    // Another worker row of the flow started none of them; unknown tasks are passed over.
    assert!(
        telemetry(pool, "telemetry_sql", other_worker, &tasks)
            .await
            .is_empty()
    );
    let stranger = [(Uuid::new_v4(), "delayed".to_owned(), 0, 1)];
    assert!(
        telemetry(pool, "telemetry_sql", worker, &stranger)
            .await
            .is_empty()
    );

    // A second attempt has no queue wait: its queued_at predates the first.
    sqlx::query("SELECT pgflow.fail_task($1, 'delayed', 0, 'again', 1, $2, false, 0)")
        .bind(traced)
        .bind(worker)
        .execute(pool)
        .await
        .unwrap();
    let mut again = Vec::new();
    let deadline = tokio::time::Instant::now() + WITHIN;
    while again.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = read(pool, "telemetry_sql", worker).await;
    }
    assert_eq!(again[0].3, 2, "{again:?}");
    let rows = telemetry(pool, "telemetry_sql", worker, &again).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1.as_deref(), Some(GOOD), "the context stays");
    assert_eq!(rows[0].3, None, "{rows:?}");
}
