//! A chain with a map step runs end to end through the worker, typed and with the client.

use std::time::Duration;

use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::{Client, Worker};
use serde_json::json;

use crate::support::{database, deprecated, eventually, finished, tasks};

/// n → n + 1 → ×2 → [0, 1, ..] → each squared (map) → sum.
fn squares() -> Flow<u64> {
    let inc = step_fn("inc")
        .handler(|n: u64, _ctx: StepContext| async move { Ok::<_, StepError>(n + 1) });
    let double = step_fn("double")
        .depends_on(&inc)
        .handler(|_n: u64, inc: u64, _ctx| async move { Ok(inc * 2) });
    let range = step_fn("range")
        .depends_on(&double)
        .handler(|_n: u64, double: u64, _ctx| async move { Ok((0..double).collect::<Vec<u64>>()) });
    let square =
        step_fn("square")
            .map_over(&range)
            .handler(|x: u64, ctx: StepContext| async move {
                assert_eq!(u64::from(ctx.task_index()), x, "map element by task index");
                Ok(x * x)
            });
    let sum = step_fn("sum")
        .depends_on(&square)
        .handler(|_n: u64, square: Vec<u64>, _ctx| async move { Ok(square.iter().sum::<u64>()) });
    Flow::new("squares")
        .step(inc)
        .step(double)
        .step(range)
        .step(square)
        .step(sum)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_with_a_map_step_runs_end_to_end() {
    let db = database().await;
    let pool = db.pool();
    let flow = squares();
    let client = Client::new(pool.clone());
    client.compile(&flow).await.expect("compile");

    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");
    let worker_id = worker.worker_id("squares").expect("a row for the flow");

    // n = 4: 5 → 10 → [0..10) → squares → 285
    let runs: Vec<_> = futures_util::future::join_all((0..5).map(|_| client.start(&flow, &4)))
        .await
        .into_iter()
        .map(|run| run.expect("start"))
        .collect();
    for run in &runs {
        let (status, output) = finished(pool, run.id(), Duration::from_secs(30)).await;
        assert_eq!(status, "completed");
        assert_eq!(output, Some(json!({"sum": 285})));
        let tasks = tasks(pool, run.id()).await;
        assert_eq!(tasks.len(), 4 + 10);
        assert!(
            tasks
                .iter()
                .all(|task| task.status == "completed" && task.attempts_count == 1),
            "{tasks:?}"
        );
    }

    let (queue, function, last_worker): (String, String, i64) = sqlx::query_as(
        "SELECT w.queue_name, w.function_name, \
                (SELECT count(*) FROM pgflow.step_tasks t WHERE t.last_worker_id = w.worker_id) \
           FROM pgflow.workers w WHERE w.worker_id = $1",
    )
    .bind(worker_id)
    .fetch_one(pool)
    .await
    .expect("worker row");
    assert_eq!(
        (queue.as_str(), function.as_str()),
        ("squares", "rust:squares")
    );
    assert_eq!(last_worker, 5 * 14);

    // Counted once each report returns, just after the rows changed.
    eventually("the counters", Duration::from_secs(5), async || {
        let stats = worker.stats();
        (
            stats.started,
            stats.completed,
            stats.failed,
            stats.in_flight,
        ) == (70, 70, 0, 0)
    })
    .await;

    worker.shutdown().await.expect("shutdown");
    assert!(
        deprecated(pool, worker_id).await,
        "shutdown sets deprecated_at"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waits_for_a_flow_compiled_after_it_started() {
    let db = database().await;
    let pool = db.pool();
    let flow = squares();
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let client = Client::new(pool.clone());
    client.compile(&flow).await.expect("compile");
    let run = client.start(&flow, &1).await.expect("start");
    let (status, output) = finished(pool, run.id(), Duration::from_secs(30)).await;
    assert_eq!(
        (status.as_str(), output),
        ("completed", Some(json!({"sum": 14})))
    );
    worker.shutdown().await.expect("shutdown");
}
