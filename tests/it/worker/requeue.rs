//! The worker's stalled-task timer: one sweep per period for the whole cluster, and a task
//! whose worker was lost taken back to its queue and finished by a live worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::{Error, Worker};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{assert_consistent, compile, database, eventually, finished, start};

/// A one-step flow whose handler returns the attempt it ran as, and counts its calls.
fn attempts_flow(slug: &str, calls: &Arc<AtomicU32>) -> Flow<Value> {
    let calls = Arc::clone(calls);
    let only = step_fn("only").handler(move |_input: Value, ctx: StepContext| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, StepError>(ctx.attempt()) }
    });
    Flow::new(slug).step(only).build()
}

/// Records every sweep (each update of the sweep's row in `pgflow_ext.sweeps`) in
/// `public.sweep_log`, so a test counts sweeps instead of timing them.
async fn log_sweeps(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE public.sweep_log (swept_at timestamptz NOT NULL);
         CREATE FUNCTION public.log_sweep() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO public.sweep_log (swept_at) VALUES (NEW.last_at);
           RETURN NEW;
         END $$;
         CREATE TRIGGER log_sweep AFTER UPDATE ON pgflow_ext.sweeps
           FOR EACH ROW EXECUTE FUNCTION public.log_sweep();",
    )
    .execute(pool)
    .await
    .expect("sweep log");
}

async fn sweeps(pool: &PgPool) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar("SELECT swept_at FROM public.sweep_log ORDER BY swept_at")
        .fetch_all(pool)
        .await
        .expect("sweep log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_sweep_once_per_period_between_them_and_one_goes_on_alone() {
    let db = database().await;
    let pool = db.pool();
    let calls = Arc::new(AtomicU32::new(0));
    let flow = attempts_flow("swept", &calls);
    compile(pool, &flow).await;
    log_sweeps(pool).await;
    let period = Duration::from_secs(1);
    let spawn = || {
        Worker::builder(pool.clone())
            .flow(flow.clone())
            .requeue_stalled_every(period)
            .spawn()
            .expect("worker")
    };
    let first = spawn();
    let second = spawn();

    eventually("four sweeps", Duration::from_secs(30), async || {
        sweeps(pool).await.len() >= 4
    })
    .await;
    let first = stopped(first).await;
    let before = sweeps(pool).await.len();
    // The second worker goes on sweeping alone, a period apart.
    eventually("two more sweeps", Duration::from_secs(30), async || {
        sweeps(pool).await.len() >= before + 2
    })
    .await;
    let second = stopped(second).await;

    // Both workers called every second or so; the engine let one sweep through per period.
    let log = sweeps(pool).await;
    for pair in log.windows(2) {
        let gap = (pair[1] - pair[0]).to_std().expect("in order");
        assert!(gap >= period, "two sweeps {gap:?} apart: {log:?}");
    }
    // Every sweep was one of theirs, counted once by the worker that ran it (none left
    // uncounted by a shutdown, none counted twice).
    assert_eq!(
        first.stall_sweeps + second.stall_sweeps,
        log.len() as u64,
        "{first:?} {second:?} {log:?}"
    );
    assert!(
        second.stall_sweeps >= 2,
        "it swept alone after the first stopped"
    );
    assert_eq!((first.requeued, second.requeued), (0, 0), "nothing stalled");
}

/// Shuts `worker` down and returns its final counters.
async fn stopped(worker: pgflow_client::WorkerHandle) -> pgflow_client::WorkerStats {
    worker.cancellation_token().cancel();
    eventually("the worker stops", Duration::from_secs(30), async || {
        worker.is_finished()
    })
    .await;
    let stats = worker.stats();
    worker.wait().await.expect("stopped cleanly");
    stats
}

/// Starts the run's task as a worker that then vanishes: a row in `pgflow.workers`, a read and
/// a start, never a report. Its message is archived and its start moved `secs` back, so the
/// read path (the message coming back after the timeout) cannot recover it.
async fn lose_task(pool: &PgPool, flow: &str, run: Uuid, secs: i64) -> Uuid {
    let lost: Uuid = sqlx::query_scalar(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
         VALUES (gen_random_uuid(), $1, 'lost') RETURNING worker_id",
    )
    .bind(flow)
    .fetch_one(pool)
    .await
    .expect("worker row");
    let msg_id: i64 = sqlx::query_scalar("SELECT msg_id FROM pgmq.read($1, 3600, 1)")
        .bind(flow)
        .fetch_one(pool)
        .await
        .expect("a message");
    let started: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.start_tasks($1, ARRAY[$2::bigint], $3) t WHERE t.run_id = $4",
    )
    .bind(flow)
    .bind(msg_id)
    .bind(lost)
    .bind(run)
    .fetch_one(pool)
    .await
    .expect("started");
    assert_eq!(started, 1);
    sqlx::query("SELECT pgmq.archive($1, $2)")
        .bind(flow)
        .bind(msg_id)
        .execute(pool)
        .await
        .expect("archived");
    sqlx::query(
        "UPDATE pgflow.step_tasks \
            SET started_at = started_at - make_interval(secs => $2), \
                queued_at = queued_at - make_interval(secs => $2) \
          WHERE run_id = $1",
    )
    .bind(run)
    .bind(secs as f64)
    .execute(pool)
    .await
    .expect("aged");
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_a_lost_worker_is_requeued_by_a_live_workers_timer_and_run_as_attempt_two() {
    let db = database().await;
    let pool = db.pool();
    let calls = Arc::new(AtomicU32::new(0));
    let flow = attempts_flow("orphans", &calls);
    compile(pool, &flow).await;
    let run = start(pool, "orphans", json!({})).await;
    // Past the default timeout (60 s) plus the sweep's 30 s.
    let lost = lose_task(pool, "orphans", run, 120).await;

    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .requeue_stalled_every(Duration::from_secs(1))
        .max_poll_wait(Duration::from_millis(200))
        .spawn()
        .expect("worker");
    let (status, output) = finished(pool, run, Duration::from_secs(30)).await;
    assert_eq!(status, "completed");
    // The lost attempt counted: the handler ran once, as attempt 2.
    assert_eq!(output, Some(json!({"only": 2})));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let (attempts, requeued, requeued_at, stalled, by): (i32, i32, bool, bool, Option<Uuid>) =
        sqlx::query_as(
            "SELECT attempts_count, requeued_count, last_requeued_at IS NOT NULL, \
                    permanently_stalled_at IS NOT NULL, last_worker_id \
               FROM pgflow.step_tasks WHERE run_id = $1",
        )
        .bind(run)
        .fetch_one(pool)
        .await
        .expect("task");
    assert_eq!(
        (attempts, requeued, requeued_at, stalled),
        (2, 1, true, false)
    );
    assert_eq!(by, worker.worker_id("orphans"));
    assert_ne!(by, Some(lost));
    eventually("the counters", Duration::from_secs(5), async || {
        let stats = worker.stats();
        (stats.requeued, stats.started, stats.completed) == (1, 1, 1)
    })
    .await;
    assert!(worker.stats().stall_sweeps >= 1);
    worker.shutdown().await.expect("shutdown");
    assert_consistent(pool).await;
}

#[tokio::test]
async fn a_requeue_period_the_engine_would_refuse_is_refused_by_spawn() {
    let db = database().await;
    for (every, shown) in [
        (Duration::from_millis(999), "999ms"),
        (Duration::ZERO, "0ns"),
        (Duration::from_secs(86_401), "86401s"),
    ] {
        let refused = Worker::builder(db.pool().clone())
            .handler("f", "s", |v: Value, _ctx| async move { Ok(v) })
            .requeue_stalled_every(every)
            .spawn()
            .expect_err("refused");
        match refused {
            Error::WorkerSetting {
                setting,
                value,
                requirement,
            } => {
                assert_eq!(setting, "requeue_stalled_every");
                assert_eq!(value, shown);
                assert_eq!(requirement, "must be between 1 second and one day");
            }
            other => panic!("{other}"),
        }
    }
    // Off, its period is not used and not checked; the bounds themselves are fine.
    for builder in [
        Worker::builder(db.pool().clone())
            .requeue_stalled_every(Duration::ZERO)
            .requeue_stalled(false),
        Worker::builder(db.pool().clone()).requeue_stalled_every(Duration::from_secs(1)),
        Worker::builder(db.pool().clone()).requeue_stalled_every(Duration::from_secs(86_400)),
    ] {
        builder
            .spawn()
            .expect("spawns")
            .shutdown()
            .await
            .expect("stops");
    }
}

/// A `MakeWriter` that keeps what the worker logs, for a test to read.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// Current-thread runtime: the worker's tasks all run on this thread, under its subscriber.
#[tokio::test]
async fn a_role_without_the_sweep_gets_one_warning_and_the_worker_goes_on_without_it() {
    let db = database().await;
    let pool = db.pool();
    let calls = Arc::new(AtomicU32::new(0));
    let flow = attempts_flow("unswept", &calls);
    compile(pool, &flow).await;
    // Everything of the engine but the sweep.
    let role = format!("no_sweep_{}", db.name());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} NOLOGIN;
         GRANT USAGE ON SCHEMA pgflow, pgmq, pgflow_meta, pgflow_ext TO {role};
         GRANT ALL ON ALL TABLES IN SCHEMA pgflow, pgmq, pgflow_meta, pgflow_ext TO {role};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA pgflow, pgmq TO {role};
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgflow, pgmq TO {role};
         REVOKE EXECUTE ON FUNCTION pgflow.requeue_stalled_tasks_due(interval) FROM {role};"
    ))
    .execute(pool)
    .await
    .expect("role");
    let set_role = format!("SET ROLE {role}");
    let limited = sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .after_connect(move |conn, _| {
            let set_role = set_role.clone();
            Box::pin(async move {
                sqlx::Executor::execute(conn, set_role.as_str()).await?;
                Ok(())
            })
        })
        .connect(db.url())
        .await
        .expect("pool");

    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let worker = Worker::builder(limited.clone())
        .flow(flow)
        .requeue_stalled_every(Duration::from_secs(1))
        .spawn()
        .expect("worker");
    let warned = "this worker cannot requeue stalled tasks, and stops trying";
    eventually("the warning", Duration::from_secs(30), async || {
        logs.text().contains(warned)
    })
    .await;
    // The worker runs its flow all the same.
    let run = start(pool, "unswept", json!({})).await;
    assert_eq!(
        finished(pool, run, Duration::from_secs(30)).await.1,
        Some(json!({"only": 1}))
    );
    // Three periods later, still one warning: the timer stopped rather than warn each period.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = logs.text();
    assert_eq!(text.matches(warned).count(), 1, "{text}");
    assert!(
        text.contains("requeue_stalled_tasks_due(interval)"),
        "{text}"
    );
    let stats = worker.stats();
    assert_eq!((stats.stall_sweeps, stats.requeued), (0, 0));
    let never: bool = sqlx::query_scalar(
        "SELECT last_at = '-infinity' FROM pgflow_ext.sweeps \
          WHERE sweep_name = 'requeue_stalled_tasks'",
    )
    .fetch_one(pool)
    .await
    .expect("sweep row");
    assert!(never, "no sweep ran");
    worker.shutdown().await.expect("shutdown");
    limited.close().await;
    sqlx::raw_sql(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .execute(pool)
        .await
        .expect("role dropped");
}
