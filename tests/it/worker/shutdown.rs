//! Graceful shutdown: in-flight tasks finish and are reported, late ones are cancelled and
//! failed, and a worker marked deprecated stops taking tasks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::Worker;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::{
    compile, count_tasks, database, deprecated, eventually, finished, set_engine_options, start,
    tasks,
};

/// A root map step whose handlers count their starts and ends and take `pause` each. Compiled
/// with no backoff, set in the engine (below the builder's bound).
fn slow_map(
    slug: &str,
    pause: Duration,
    started: &Arc<AtomicU32>,
    ended: &Arc<AtomicU32>,
) -> Flow<Vec<u32>> {
    let (started, ended) = (Arc::clone(started), Arc::clone(ended));
    let work = step_fn("work").map_over_input().max_attempts(3).handler(
        move |x: u32, _ctx: StepContext| {
            let (started, ended) = (Arc::clone(&started), Arc::clone(&ended));
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(pause).await;
                ended.fetch_add(1, Ordering::SeqCst);
                Ok::<_, StepError>(x)
            }
        },
    );
    Flow::new(slug).step(work).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_tasks_and_leaves_none_started() {
    let db = database().await;
    let pool = db.pool();
    let (began, ended) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let flow = slow_map("drain", Duration::from_millis(500), &began, &ended);
    compile(pool, &flow).await;
    set_engine_options(pool, "drain", None, &[("base_delay", 0)]).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .concurrency(5)
        .spawn()
        .expect("worker");
    let worker_id = worker.worker_id("drain").expect("row");

    // 8 tasks, 5 at a time: shut down while the first 5 run.
    let run = start(pool, "drain", json!([0, 1, 2, 3, 4, 5, 6, 7])).await;
    eventually("5 handlers to start", Duration::from_secs(10), async || {
        began.load(Ordering::SeqCst) == 5
    })
    .await;
    assert_eq!(worker.stats().in_flight, 5);
    worker.shutdown().await.expect("shutdown");

    assert_eq!(
        began.load(Ordering::SeqCst),
        5,
        "no task taken after the shutdown began"
    );
    assert_eq!(
        ended.load(Ordering::SeqCst),
        5,
        "in-flight handlers ran to the end"
    );
    assert_eq!(count_tasks(pool, "started").await.expect("count"), 0);
    let statuses: Vec<String> = tasks(pool, run)
        .await
        .into_iter()
        .map(|task| task.status)
        .collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|status| *status == "completed")
            .count(),
        5
    );
    assert_eq!(
        statuses.iter().filter(|status| *status == "queued").count(),
        3
    );
    assert!(deprecated(pool, worker_id).await);

    // Another worker picks up the rest.
    let (again, done) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let flow = slow_map("drain", Duration::from_millis(10), &again, &done);
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");
    assert_eq!(
        finished(pool, run, Duration::from_secs(30)).await.0,
        "completed"
    );
    assert_eq!(done.load(Ordering::SeqCst), 3);
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_past_the_shutdown_timeout_are_cancelled_and_their_attempt_failed() {
    let db = database().await;
    let pool = db.pool();
    let (began, ended) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let flow = slow_map("stuck", Duration::from_secs(30), &began, &ended);
    compile(pool, &flow).await;
    set_engine_options(pool, "stuck", None, &[("base_delay", 0)]).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .shutdown_timeout(Duration::from_millis(300))
        .spawn()
        .expect("worker");

    let run = start(pool, "stuck", json!([1, 2])).await;
    eventually("2 handlers to start", Duration::from_secs(10), async || {
        began.load(Ordering::SeqCst) == 2
    })
    .await;
    let stopping = std::time::Instant::now();
    worker.shutdown().await.expect("shutdown");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(ended.load(Ordering::SeqCst), 0);

    // Not left `started`: the attempt failed, and the engine queues the task again.
    assert_eq!(count_tasks(pool, "started").await.expect("count"), 0);
    for task in tasks(pool, run).await {
        assert_eq!((task.status.as_str(), task.attempts_count), ("queued", 1));
        let error = task.error_message.unwrap_or_default();
        assert!(error.contains("shutdown timeout"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_token_and_deprecation_stop_the_worker() {
    let db = database().await;
    let pool = db.pool();
    let (began, ended) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let flow = slow_map("retired", Duration::from_millis(1), &began, &ended);
    compile(pool, &flow).await;
    set_engine_options(pool, "retired", None, &[("base_delay", 0)]).await;

    // The application's token.
    let app = CancellationToken::new();
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .shutdown_token(app.clone())
        .spawn()
        .expect("worker");
    let run = start(pool, "retired", json!([1])).await;
    assert_eq!(
        finished(pool, run, Duration::from_secs(30)).await.0,
        "completed"
    );
    app.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("stops on the app's token")
        .expect("clean stop");

    // Someone marks the worker deprecated: it stops taking tasks and, having no other flow,
    // shuts down.
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .heartbeat_interval(Duration::from_millis(50))
        .spawn()
        .expect("worker");
    let worker_id = worker.worker_id("retired").expect("row");
    // Marked only once its heartbeats run, as they are what notices the mark: a heartbeat after
    // the one that registered the row proves both (the row starts with both columns at the
    // same `now()`). Marked any earlier, the mark could land before the row exists.
    eventually(
        "a heartbeat after registering",
        Duration::from_secs(10),
        async || {
            sqlx::query_scalar::<_, bool>(
                "SELECT last_heartbeat_at > started_at FROM pgflow.workers WHERE worker_id = $1",
            )
            .bind(worker_id)
            .fetch_optional(pool)
            .await
            .expect("workers")
            .unwrap_or(false)
        },
    )
    .await;
    sqlx::query("UPDATE pgflow.workers SET deprecated_at = now() WHERE worker_id = $1")
        .bind(worker_id)
        .execute(pool)
        .await
        .expect("deprecate");
    tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("a deprecated worker stops")
        .expect("clean stop");
    let run = start(pool, "retired", json!([1])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let statuses: Vec<String> = tasks(pool, run)
        .await
        .into_iter()
        .map(|task| task.status)
        .collect();
    assert_eq!(statuses, ["queued"]);
    assert_eq!(began.load(Ordering::SeqCst), 1);
}
