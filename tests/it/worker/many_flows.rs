//! A worker serving many flows (issue 24): idle, it looks at all its queues in one statement
//! (`pgflow.queue_probe`) instead of reading each, and still picks up messages that become
//! visible later. The reads are counted by the server (`pg_stat_user_functions`), not by the
//! worker: what it sends is what is measured.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::{Worker, WorkerBuilder};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::support::{compile, database, finished, set_engine_options, start};

/// The application name of the worker's connections, by which the test finds them.
const WORKER_APP: &str = "many-flows-worker";

/// How many idle flows the worker serves besides the ones a test watches.
const IDLE_FLOWS: usize = 200;

/// A one-step flow that echoes its input.
fn echo(slug: &str) -> Flow<u32> {
    let only =
        step_fn("only").handler(|n: u32, _ctx: StepContext| async move { Ok::<_, StepError>(n) });
    Flow::new(slug).step(only).build()
}

/// Compiles the idle flows and adds them to `builder`.
async fn with_idle_flows(pool: &PgPool, mut builder: WorkerBuilder) -> WorkerBuilder {
    for index in 0..IDLE_FLOWS {
        let flow = echo(&format!("idle_{index}"));
        compile(pool, &flow).await;
        builder = builder.flow(flow);
    }
    builder
}

/// Makes the server count calls of every function in new sessions of this database.
async fn count_function_calls(pool: &PgPool) {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .expect("database name");
    sqlx::raw_sql(&format!(
        "ALTER DATABASE \"{name}\" SET track_functions = 'all'"
    ))
    .execute(pool)
    .await
    .expect("track_functions");
}

/// A pool of its own for the worker: new sessions (which count function calls) under a name
/// the test can wait for.
async fn worker_pool(pool: &PgPool) -> PgPool {
    let options = (*pool.connect_options())
        .clone()
        .application_name(WORKER_APP);
    PgPoolOptions::new()
        .max_connections(5)
        .connect_with(options)
        .await
        .expect("worker pool")
}

/// Closes the worker's pool and waits until its sessions have ended: a session flushes its
/// statistics as it ends, before it leaves `pg_stat_activity`. A session the closed pool still
/// keeps open (sqlx may return a connection to a closing pool) is terminated, which flushes
/// them too.
async fn close_and_flush(pool: &PgPool, worker_pool: PgPool) {
    worker_pool.close().await;
    let began = Instant::now();
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
              WHERE application_name = $1 AND datname = current_database()",
        )
        .bind(WORKER_APP)
        .fetch_one(pool)
        .await
        .expect("sessions");
        if left == 0 {
            return;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{left} worker sessions left"
        );
        if began.elapsed() > Duration::from_millis(500) {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                  WHERE application_name = $1 AND datname = current_database()",
            )
            .bind(WORKER_APP)
            .execute(pool)
            .await
            .expect("terminate");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls so far of `pgflow.<function>`, summed over its overloads.
async fn calls(pool: &PgPool, function: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_user_functions \
          WHERE schemaname = 'pgflow' AND funcname = $1",
    )
    .bind(function)
    .fetch_one(pool)
    .await
    .expect("function statistics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_of_many_flows_probes_them_all_at_once_and_reads_none() {
    let db = database().await;
    let pool = db.pool();
    count_function_calls(pool).await;

    // Without notifications, each flow's loop used to read its queue every poll_interval:
    // 200 flows, 2 s, 100 ms would be some 4,000 reads.
    let wpool = worker_pool(pool).await;
    let builder = Worker::builder(wpool.clone())
        .notifications(false)
        .poll_interval(Duration::from_millis(100))
        .requeue_stalled(false);
    let worker = with_idle_flows(pool, builder)
        .await
        .spawn()
        .expect("worker");
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.shutdown().await.expect("shutdown");
    close_and_flush(pool, wpool).await;
    let reads = calls(pool, "_read_and_start").await;
    let probes = calls(pool, "queue_probe").await;
    eprintln!("no notifications, {IDLE_FLOWS} idle flows, 2 s: {reads} reads, {probes} probes");
    assert_eq!(reads, 0, "an empty queue is never read ({probes} probes)");
    // One look per 100 ms at most (fewer when a look takes longer than that, on a busy machine).
    assert!((1..=25).contains(&probes), "{probes} probes in 2 s");

    // With notifications (the default), idle: one look at start, one when the listener
    // connects, then one per max_poll_wait; the loops used to read once each at start, then
    // every 5 s.
    let wpool = worker_pool(pool).await;
    let builder = Worker::builder(wpool.clone()).requeue_stalled(false);
    let worker = with_idle_flows_compiled(builder).spawn().expect("worker");
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.shutdown().await.expect("shutdown");
    close_and_flush(pool, wpool).await;
    let more_reads = calls(pool, "_read_and_start").await - reads;
    let more_probes = calls(pool, "queue_probe").await - probes;
    eprintln!(
        "notifications, {IDLE_FLOWS} idle flows, 2 s: {more_reads} reads, {more_probes} probes"
    );
    assert_eq!(more_reads, 0, "an empty queue is never read");
    assert!(
        (1..=3).contains(&more_probes),
        "{more_probes} probes in 2 s"
    );
}

/// The idle flows, already compiled, added to `builder`.
fn with_idle_flows_compiled(mut builder: WorkerBuilder) -> WorkerBuilder {
    for index in 0..IDLE_FLOWS {
        builder = builder.flow(echo(&format!("idle_{index}")));
    }
    builder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_become_visible_later_are_read_when_due_among_many_flows() {
    let db = database().await;
    let pool = db.pool();
    count_function_calls(pool).await;

    // A step queued with a 2 s delay: its notification comes at once, the message 2 s later.
    // The slug has capitals: its queue is pgmq.q_delayed_start.
    let started_at = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&started_at);
    let delayed = step_fn("later").handler(move |n: u32, _ctx: StepContext| {
        *seen.lock().expect("start time") = Some(Instant::now());
        async move { Ok::<_, StepError>(n) }
    });
    let delayed: Flow<u32> = Flow::new("Delayed_Start").step(delayed).build();
    compile(pool, &delayed).await;
    set_engine_options(pool, "Delayed_Start", Some("later"), &[("start_delay", 2)]).await;

    // A handler that asks for its retry 1 s later: no notification when it is due.
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&attempts);
    let flaky = step_fn("flaky")
        .max_attempts(2)
        .handler(move |n: u32, ctx: StepContext| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if ctx.attempt() < 2 {
                    return Err(StepError::new("not yet").retry_after(Duration::from_secs(1)));
                }
                Ok(n)
            }
        });
    let flaky: Flow<u32> = Flow::new("retried_later").step(flaky).build();
    compile(pool, &flaky).await;

    // A flow whose queue was dropped behind the worker's back: the others must not suffer.
    let dropped = echo("queue_dropped");
    compile(pool, &dropped).await;
    sqlx::query("SELECT pgmq.drop_queue('queue_dropped')")
        .execute(pool)
        .await
        .expect("drop the queue");

    // The safety net far away: only the probe's schedule can read these in time.
    let wpool = worker_pool(pool).await;
    let builder = Worker::builder(wpool.clone())
        .max_poll_wait(Duration::from_secs(60))
        .requeue_stalled(false)
        .flow(delayed)
        .flow(flaky)
        .flow(dropped);
    let worker = with_idle_flows(pool, builder)
        .await
        .spawn()
        .expect("worker");
    // Past the start-up looks.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let queued_at = Instant::now();
    let delayed_run = start(pool, "Delayed_Start", json!(1)).await;
    let retried_run = start(pool, "retried_later", json!(2)).await;
    let (status, output) = finished(pool, retried_run, Duration::from_secs(10)).await;
    assert_eq!(status, "completed", "{output:?}");
    let retried_in = queued_at.elapsed();
    let (status, output) = finished(pool, delayed_run, Duration::from_secs(10)).await;
    assert_eq!(status, "completed", "{output:?}");
    let delayed_by = started_at
        .lock()
        .expect("start time")
        .expect("the delayed step ran")
        .duration_since(queued_at);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    // Due at 1 s and 2 s; read within a second of that (the probe wakes a flow when due).
    assert!(
        retried_in >= Duration::from_secs(1) && retried_in < Duration::from_secs(3),
        "retry read after {retried_in:?}"
    );
    assert!(
        delayed_by >= Duration::from_millis(1900) && delayed_by < Duration::from_secs(4),
        "delayed step read after {delayed_by:?}"
    );

    worker.shutdown().await.expect("shutdown");
    close_and_flush(pool, wpool).await;
    // Reads only where something was or was about to be: each run's notification, the
    // retry's report and the two due times; never a read of each of the 200 idle queues.
    let reads = calls(pool, "_read_and_start").await;
    eprintln!("retry read after {retried_in:?}, delayed step after {delayed_by:?}, {reads} reads");
    assert!(reads <= 20, "{reads} reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_probe_skips_what_it_cannot_answer_for_and_answers_the_rest() {
    let db = database().await;
    let pool = db.pool();
    for slug in ["Mixed_Case", "empty_one", "gone"] {
        compile(pool, &echo(slug)).await;
    }
    sqlx::query("SELECT pgmq.drop_queue('gone')")
        .execute(pool)
        .await
        .expect("drop the queue");
    // A table named like a queue that is not one: no vt column.
    sqlx::raw_sql("CREATE TABLE pgmq.q_not_a_queue (msg_id bigint)")
        .execute(pool)
        .await
        .expect("fake queue");
    start(pool, "Mixed_Case", json!(1)).await;

    let hostile = vec![
        Some("Mixed_Case".to_owned()),
        Some("Mixed_Case".to_owned()),
        Some("empty_one".to_owned()),
        Some("gone".to_owned()),
        Some("never_compiled".to_owned()),
        Some("not_a_queue".to_owned()),
        Some("x\"; DROP TABLE pgmq.q_empty_one; --".to_owned()),
        None,
    ];
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT flow_slug, extract(epoch FROM next_vt - clock_timestamp())::float8 \
           FROM pgflow.queue_probe($1)",
    )
    .bind(&hostile)
    .fetch_all(pool)
    .await
    .expect("the probe answers");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "Mixed_Case");
    assert!(rows[0].1 <= 0.0, "visible now: {rows:?}");
    let still_there: bool =
        sqlx::query_scalar("SELECT to_regclass('pgmq.q_empty_one') IS NOT NULL")
            .fetch_one(pool)
            .await
            .expect("lookup");
    assert!(still_there);

    // A role that may read one queue but not the other is answered for the one only.
    let role = format!("probe_{}", db.name());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} NOLOGIN; \
         GRANT USAGE ON SCHEMA pgflow, pgmq TO {role}; \
         GRANT EXECUTE ON FUNCTION pgflow.queue_probe(text[]) TO {role}; \
         GRANT SELECT ON pgmq.q_empty_one TO {role}"
    ))
    .execute(pool)
    .await
    .expect("role");
    sqlx::query("SELECT pgmq.send('empty_one', '{}'::jsonb, 3)")
        .execute(pool)
        .await
        .expect("a delayed message");
    let mut tx = pool.begin().await.expect("tx");
    sqlx::raw_sql(&format!("SET LOCAL ROLE {role}"))
        .execute(&mut *tx)
        .await
        .expect("set role");
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "SELECT flow_slug, extract(epoch FROM next_vt - clock_timestamp())::float8 \
           FROM pgflow.queue_probe(ARRAY['Mixed_Case', 'empty_one'])",
    )
    .fetch_all(&mut *tx)
    .await
    .expect("the probe answers a restricted role");
    tx.rollback().await.expect("rollback");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "empty_one");
    assert!(
        (2.0..=3.0).contains(&rows[0].1),
        "visible in about 3 s: {rows:?}"
    );
    sqlx::raw_sql(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .execute(pool)
        .await
        .expect("drop role");
}

/// A queue whose table another session holds (a flow being deleted in a long transaction)
/// costs the probe a short lock wait and that slug, not the answer for every other flow; a
/// caller's statement timeout still ends the probe (issue 24, F6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_locked_by_another_session_does_not_stall_the_probe_of_the_others() {
    let db = database().await;
    let pool = db.pool();
    for slug in ["rl", "free"] {
        compile(pool, &echo(slug)).await;
        start(pool, slug, json!(1)).await;
    }
    let mut locker = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE pgmq.q_rl IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .expect("lock");
    let began = Instant::now();
    let probe = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::query_scalar::<_, String>(
            "SELECT flow_slug FROM pgflow.queue_probe(ARRAY['rl', 'free'])",
        )
        .fetch_all(pool),
    )
    .await;
    let elapsed = began.elapsed();

    let mut timed = pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL statement_timeout = '20ms'")
        .execute(&mut *timed)
        .await
        .expect("timeout set");
    let cancelled = sqlx::query("SELECT * FROM pgflow.queue_probe(ARRAY['rl'])")
        .execute(&mut *timed)
        .await;
    timed.rollback().await.expect("rollback");
    locker.rollback().await.expect("unlock");

    let rows = probe
        .expect("the probe does not wait for the locked queue")
        .expect("the probe answers");
    assert_eq!(rows, vec!["free".to_owned()]);
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    let code = cancelled
        .expect_err("a statement timeout is not a skipped slug")
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("57014"));
}
