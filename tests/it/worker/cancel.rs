//! A worker running tasks of a cancelled run (issue 19): handlers see their tokens fire within
//! about a second, one that ignores it is dropped and its place freed, nothing is reported for
//! them, and no task of the run completes once the cancellation has committed. And a handler's
//! own retry delay (`StepError::retry_after`), which reaches the engine through the same report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::{Worker, WorkerHandle, WorkerStats};
use serde_json::json;
use sqlx::{Connection, PgPool};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::support::{
    assert_consistent, compile, database, eventually, finished, set_engine_options, start, tasks,
};

/// `SELECT pgflow.cancel_run($1)`: whether this call cancelled the run.
async fn cancel_run<'c>(db: impl sqlx::PgExecutor<'c>, run_id: Uuid) -> bool {
    sqlx::query_scalar("SELECT pgflow.cancel_run($1)")
        .bind(run_id)
        .fetch_one(db)
        .await
        .expect("cancel_run")
}

/// How many failed attempts of the run the engine recorded.
async fn recorded_failures(pool: &PgPool, run_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pgflow_ext.step_task_attempts WHERE run_id = $1")
        .bind(run_id)
        .fetch_one(pool)
        .await
        .expect("attempts")
}

/// Waits until the worker has nothing in flight, and returns its counters then.
async fn settled(worker: &WorkerHandle) -> WorkerStats {
    eventually(
        "the worker to settle",
        Duration::from_secs(10),
        async || worker.stats().in_flight == 0,
    )
    .await;
    worker.stats()
}

/// How many tasks of the run have `status`.
async fn count_status(pool: &PgPool, run_id: Uuid, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pgflow.step_tasks WHERE run_id = $1 AND status = $2")
        .bind(run_id)
        .bind(status)
        .fetch_one(pool)
        .await
        .expect("tasks")
}

/// The indexes of the run's completed tasks.
async fn completed(pool: &PgPool, run_id: Uuid) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT task_index FROM pgflow.step_tasks \
          WHERE run_id = $1 AND status = 'completed' ORDER BY task_index",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .expect("completed tasks")
}

/// What a handler of [`watchers`] did, by its element.
#[derive(Default)]
struct Seen {
    /// When each handler saw its token fire.
    fired_at: Mutex<BTreeMap<String, Instant>>,
    /// Handlers that were dropped (their future, while suspended).
    dropped: Mutex<Vec<String>>,
    /// Handlers that got as far as waiting.
    waiting: AtomicU64,
    waited: Notify,
}

/// Sets its flag when dropped: tells a handler dropped in an await.
struct DropFlag(Arc<Seen>, String);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.dropped.lock().unwrap().push(self.1.clone());
    }
}

/// A map step over strings, one behaviour per element: `err` and `ok` wait on their token and
/// then return an error or an output, `ignore` sleeps 60 s without looking at it.
fn watchers(slug: &str, seen: &Arc<Seen>) -> Flow<Vec<String>> {
    let seen = Arc::clone(seen);
    let wait = step_fn("wait").map_over_input().max_attempts(3).handler(
        move |what: String, ctx: StepContext| {
            let seen = Arc::clone(&seen);
            async move {
                let _flag = DropFlag(Arc::clone(&seen), what.clone());
                seen.waiting.fetch_add(1, Ordering::SeqCst);
                seen.waited.notify_waiters();
                if what == "ignore" {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return Ok(what);
                }
                ctx.cancellation_token().cancelled().await;
                seen.fired_at
                    .lock()
                    .unwrap()
                    .insert(what.clone(), Instant::now());
                match what.as_str() {
                    "err" => Err(StepError::new("stopped: the token fired")),
                    _ => Ok(what),
                }
            }
        },
    );
    Flow::new(slug).step(wait).build()
}

/// Waits until `n` handlers of [`watchers`] are waiting.
async fn all_waiting(seen: &Seen, n: u64) {
    eventually(
        "the handlers to wait",
        Duration::from_secs(20),
        async || seen.waiting.load(Ordering::SeqCst) >= n,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_see_their_tokens_fire_soon_after_the_run_is_cancelled_and_nothing_is_reported() {
    let db = database().await;
    let pool = db.pool();
    let seen = Arc::new(Seen::default());
    let flow = watchers("cancel_tokens", &seen);
    compile(pool, &flow).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");

    let run = start(pool, "cancel_tokens", json!(["err", "ok", "ignore"])).await;
    all_waiting(&seen, 3).await;
    let cancelled_at = Instant::now();
    assert!(cancel_run(pool, run).await, "this call cancelled the run");

    eventually("the tokens to fire", Duration::from_secs(5), async || {
        seen.fired_at.lock().unwrap().len() == 2
    })
    .await;
    for (what, fired_at) in seen.fired_at.lock().unwrap().iter() {
        let after = fired_at.duration_since(cancelled_at);
        assert!(after < Duration::from_secs(2), "{what}: {after:?}");
    }
    // All three futures are gone, the one ignoring its token too.
    eventually(
        "the handlers to be dropped",
        Duration::from_secs(5),
        async || seen.dropped.lock().unwrap().len() == 3,
    )
    .await;
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        cancelled_at.elapsed()
    );

    let stats = settled(&worker).await;
    assert_eq!(
        (
            stats.started,
            stats.cancelled,
            stats.completed,
            stats.failed
        ),
        (3, 3, 0, 0),
        "{stats:?}"
    );
    // Nothing reported: no output, no error, no failed attempt, the tasks as cancel_run left
    // them (the error and the output the handlers returned went nowhere).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = crate::support::run(pool, run).await;
    assert_eq!(status, "cancelled");
    for task in tasks(pool, run).await {
        assert_eq!(task.status, "cancelled", "{task:?}");
        assert_eq!(task.attempts_count, 1, "{task:?}");
        assert_eq!((task.output, task.error_message), (None, None));
    }
    assert_eq!(recorded_failures(pool, run).await, 0);
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_ignoring_its_token_is_dropped_and_its_place_goes_to_another_run() {
    let db = database().await;
    let pool = db.pool();
    let dropped = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(Notify::new());
    let flag = Arc::clone(&dropped);
    let signal = Arc::clone(&entered);
    let work = step_fn("work").handler(move |stuck: bool, _ctx: StepContext| {
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let (flag, signal) = (Arc::clone(&flag), Arc::clone(&signal));
        async move {
            if stuck {
                let _dropped = Dropped(flag);
                signal.notify_one();
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok::<_, StepError>(stuck)
        }
    });
    let flow: Flow<bool> = Flow::new("cancel_slot").step(work).build();
    compile(pool, &flow).await;
    // One place: the stuck handler holds it until its run is cancelled.
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .concurrency(1)
        .spawn()
        .expect("worker");

    let stuck = start(pool, "cancel_slot", json!(true)).await;
    tokio::time::timeout(Duration::from_secs(20), entered.notified())
        .await
        .expect("the stuck handler runs");
    let waiting = start(pool, "cancel_slot", json!(false)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count_status(pool, waiting, "queued").await,
        1,
        "no place for it"
    );

    let began = Instant::now();
    assert!(cancel_run(pool, stuck).await);
    let (status, output) = finished(pool, waiting, Duration::from_secs(10)).await;
    assert_eq!(
        (status.as_str(), output),
        ("completed", Some(json!({"work": false})))
    );
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert!(dropped.load(Ordering::SeqCst), "dropped in its sleep");

    let stats = settled(&worker).await;
    assert_eq!(
        (
            stats.started,
            stats.cancelled,
            stats.completed,
            stats.failed
        ),
        (2, 1, 1, 0),
        "{stats:?}"
    );
    let task = &tasks(pool, stuck).await[0];
    assert_eq!(
        (task.status.as_str(), task.attempts_count),
        ("cancelled", 1)
    );
    assert_eq!(task.error_message, None);
    assert_eq!(recorded_failures(pool, stuck).await, 0);
    worker.shutdown().await.expect("shutdown");
}

/// Without notifications the worker learns of the cancellation from the database, at its
/// heartbeats; the same look-up runs when the listener reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notifications_the_heartbeat_finds_the_cancelled_run() {
    let db = database().await;
    let pool = db.pool();
    let seen = Arc::new(Seen::default());
    let flow = watchers("cancel_polled", &seen);
    compile(pool, &flow).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .notifications(false)
        .heartbeat_interval(Duration::from_millis(300))
        .spawn()
        .expect("worker");

    let run = start(pool, "cancel_polled", json!(["ok", "ignore"])).await;
    all_waiting(&seen, 2).await;
    let cancelled_at = Instant::now();
    assert!(cancel_run(pool, run).await);
    eventually(
        "the handlers to be dropped",
        Duration::from_secs(5),
        async || seen.dropped.lock().unwrap().len() == 2,
    )
    .await;
    let fired_at = seen.fired_at.lock().unwrap()["ok"];
    assert!(
        fired_at.duration_since(cancelled_at) < Duration::from_secs(2),
        "{:?}",
        fired_at.duration_since(cancelled_at)
    );
    let stats = settled(&worker).await;
    assert_eq!((stats.cancelled, stats.completed, stats.failed), (2, 0, 0));
    assert_eq!(count_status(pool, run, "cancelled").await, 2);
    worker.shutdown().await.expect("shutdown");
}

/// Notifications sent while the listening connection is down are lost; the worker looks the
/// runs of its running tasks up when it listens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_while_the_listener_reconnects_still_reaches_the_handlers() {
    let db = database().await;
    let pool = db.pool();
    let seen = Arc::new(Seen::default());
    let flow = watchers("cancel_reconnect", &seen);
    compile(pool, &flow).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        // The heartbeat's look-up must not be what finds it.
        .heartbeat_interval(Duration::from_secs(60))
        .spawn()
        .expect("worker");

    let run = start(pool, "cancel_reconnect", json!(["ok", "ignore"])).await;
    all_waiting(&seen, 2).await;
    let listening = "SELECT pid FROM pg_stat_activity \
                      WHERE datname = current_database() AND query ILIKE 'LISTEN%'";
    eventually(
        "the worker to listen",
        Duration::from_secs(10),
        async || {
            let pids: Vec<i32> = sqlx::query_scalar(listening).fetch_all(pool).await.unwrap();
            pids.len() == 1
        },
    )
    .await;
    // Cut the listening connection and keep the worker from opening another until the
    // cancellation has committed: its notification reaches nobody.
    // (From another database: none may refuse connections to the one it is connected to.)
    let mut conn = pool.acquire().await.expect("a connection");
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *conn)
        .await
        .expect("database name");
    let maintenance = (*pool.connect_options()).clone().database("postgres");
    let mut outside = sqlx::PgConnection::connect_with(&maintenance)
        .await
        .expect("a connection to database postgres");
    let allow_connections =
        |allowed: bool| format!("ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS {allowed}");
    sqlx::raw_sql(&allow_connections(false))
        .execute(&mut outside)
        .await
        .expect("no new connections");
    let listeners: Vec<bool> = sqlx::query_scalar(&format!(
        "SELECT pg_terminate_backend(pid, 5000) FROM ({listening}) l"
    ))
    .fetch_all(&mut *conn)
    .await
    .expect("terminate");
    assert_eq!(listeners, [true], "one listening connection");
    assert!(cancel_run(&mut *conn, run).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        seen.dropped.lock().unwrap().is_empty(),
        "the cancellation reached the worker while it could not listen"
    );
    sqlx::raw_sql(&allow_connections(true))
        .execute(&mut outside)
        .await
        .expect("connections again");
    drop(conn);

    eventually(
        "the handlers to be dropped",
        Duration::from_secs(15),
        async || seen.dropped.lock().unwrap().len() == 2,
    )
    .await;
    assert!(seen.fired_at.lock().unwrap().contains_key("ok"));
    let stats = settled(&worker).await;
    assert_eq!((stats.cancelled, stats.completed, stats.failed), (2, 0, 0));
    worker.shutdown().await.expect("shutdown");
}

/// The worker remembers cancelled runs for a while (for tasks read just before a cancellation
/// and dispatched after it); a run retried at once must still run on the same worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_retried_right_after_its_cancellation_runs_again_on_the_same_worker() {
    let db = database().await;
    let pool = db.pool();
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    let once = step_fn("once").handler(move |n: u32, ctx: StepContext| {
        let call = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if call == 0 {
                // The first call lasts until its run is cancelled.
                ctx.cancellation_token().cancelled().await;
                return Err(StepError::new("stopped"));
            }
            Ok(n + 1)
        }
    });
    let flow: Flow<u32> = Flow::new("cancel_retry").step(once).build();
    compile(pool, &flow).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");

    let run = start(pool, "cancel_retry", json!(41)).await;
    eventually("the first call", Duration::from_secs(20), async || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(cancel_run(pool, run).await);
    eventually(
        "the first call to be cancelled",
        Duration::from_secs(5),
        async || worker.stats().cancelled == 1,
    )
    .await;
    let retries: i32 = sqlx::query_scalar("SELECT pgflow.retry_run($1)")
        .bind(run)
        .fetch_one(pool)
        .await
        .expect("retry_run");
    assert_eq!(retries, 1);
    let (status, output) = finished(pool, run, Duration::from_secs(20)).await;
    assert_eq!(
        (status.as_str(), output),
        ("completed", Some(json!({"once": 42})))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stats = settled(&worker).await;
    assert_eq!(
        (stats.cancelled, stats.completed, stats.failed),
        (1, 1, 0),
        "{stats:?}"
    );
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_hides_the_message_for_the_handlers_delay_not_the_steps_backoff() {
    let db = database().await;
    let pool = db.pool();
    let later =
        step_fn("later")
            .max_attempts(3)
            .handler(|delay_ms: u64, ctx: StepContext| async move {
                let error = StepError::new(format!("attempt {} deferred", ctx.attempt()));
                Err::<u64, _>(error.retry_after(Duration::from_millis(delay_ms)))
            });
    let flow: Flow<u64> = Flow::new("deferred").step(later).build();
    compile(pool, &flow).await;
    // The step's own backoff after attempt 1 would be 100 · 2¹ = 200 s.
    set_engine_options(pool, "deferred", None, &[("base_delay", 100)]).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");

    // 7 s, and 1.5 s rounded up to 2 s.
    for (delay_ms, expected) in [(7000, 7.0), (1500, 2.0)] {
        let run = start(pool, "deferred", json!(delay_ms)).await;
        eventually(
            "the first attempt to fail",
            Duration::from_secs(20),
            async || {
                let task = &tasks(pool, run).await[0];
                task.status == "queued" && task.attempts_count == 1
            },
        )
        .await;
        let invisible_for: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM q.vt - clock_timestamp())::float8 \
               FROM pgflow.step_tasks t JOIN pgmq.q_deferred q ON q.msg_id = t.message_id \
              WHERE t.run_id = $1",
        )
        .bind(run)
        .fetch_one(pool)
        .await
        .expect("the task's message");
        assert!(
            invisible_for > expected - 1.5 && invisible_for <= expected,
            "{delay_ms} ms: invisible for {invisible_for} s"
        );
        assert_eq!(recorded_failures(pool, run).await, 1);
    }
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_ignores_its_retry_delay() {
    let db = database().await;
    let pool = db.pool();
    let refuse =
        step_fn("refuse")
            .max_attempts(5)
            .handler(|_n: u32, _ctx: StepContext| async move {
                let error = StepError::new("invalid order").retry_after(Duration::from_secs(30));
                Err::<u32, _>(error.no_retry())
            });
    let flow: Flow<u32> = Flow::new("refused_later").step(refuse).build();
    compile(pool, &flow).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");
    let run = start(pool, "refused_later", json!(1)).await;
    let (status, _) = finished(pool, run, Duration::from_secs(20)).await;
    assert_eq!(status, "failed");
    let task = &tasks(pool, run).await[0];
    assert_eq!((task.status.as_str(), task.attempts_count), ("failed", 1));
    worker.shutdown().await.expect("shutdown");
}

/// What the handlers of the 1,000-task map did.
#[derive(Default)]
struct MapSeen {
    entered: AtomicU64,
    finished: AtomicU64,
    saw_token: AtomicU64,
    /// Handlers that wait for their token alone, and how many saw it.
    waiters: AtomicU64,
    waiters_saw: AtomicU64,
    last_fired: Mutex<Option<Instant>>,
}

impl MapSeen {
    fn saw(&self, waiter: bool) {
        self.saw_token.fetch_add(1, Ordering::SeqCst);
        if waiter {
            self.waiters_saw.fetch_add(1, Ordering::SeqCst);
        }
        let mut last = self.last_fired.lock().unwrap();
        *last = Some(last.map_or_else(Instant::now, |at| at.max(Instant::now())));
    }
}

/// The test: a 1,000-task map, two workers, a cancellation half-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_thousand_task_map_under_two_workers_stops_it_where_it_stands() {
    let db = database().await;
    let pool = db.pool();
    let seen = Arc::new(MapSeen::default());
    let handler = {
        let seen = Arc::clone(&seen);
        move |n: u64, ctx: StepContext| {
            let seen = Arc::clone(&seen);
            async move {
                seen.entered.fetch_add(1, Ordering::SeqCst);
                let token = ctx.cancellation_token();
                // One element in 25 waits for its token alone: whatever the timing, some
                // handlers are running when the cancellation commits.
                if n % 25 == 7 {
                    seen.waiters.fetch_add(1, Ordering::SeqCst);
                    token.cancelled().await;
                    seen.saw(true);
                    return Err(StepError::new("stopped"));
                }
                // 40 to 120 ms of "work" that watches its token.
                let work = Duration::from_millis(40 + n % 9 * 10);
                tokio::select! {
                    () = token.cancelled() => {
                        seen.saw(false);
                        Err(StepError::new("stopped"))
                    }
                    () = tokio::time::sleep(work) => {
                        seen.finished.fetch_add(1, Ordering::SeqCst);
                        Ok(n)
                    }
                }
            }
        }
    };
    let each = step_fn("each").map_over_input().handler(handler);
    let flow: Flow<Vec<u64>> = Flow::new("big_map").step(each).build();
    compile(pool, &flow).await;
    let workers: Vec<WorkerHandle> = (0..2)
        .map(|_| {
            Worker::builder(pool.clone())
                .flow(flow.clone())
                .concurrency(25)
                .spawn()
                .expect("worker")
        })
        .collect();

    let input: Vec<u64> = (0..1000).collect();
    let run = start(pool, "big_map", json!(input)).await;
    eventually(
        "a tenth of the map to complete",
        Duration::from_secs(60),
        async || count_status(pool, run, "completed").await >= 100,
    )
    .await;
    let cancel_began = Instant::now();
    assert!(cancel_run(pool, run).await);
    // Read once the cancellation has committed.
    let committed_by: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await
        .expect("time");
    let completed_at_cancel = completed(pool, run).await;
    assert!(
        completed_at_cancel.len() < 1000,
        "the map ended before the cancellation"
    );

    for worker in &workers {
        settled(worker).await;
    }
    // Any report in flight has landed (or been ignored) by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        completed(pool, run).await,
        completed_at_cancel,
        "tasks completed after the cancellation committed"
    );
    // From the times the database recorded. `completed_at` is when the completing transaction
    // began, so one that began after the cancellation had committed shows here. (`cancelled_at`
    // is when the cancelling transaction began: a completion that began after it and committed
    // first, while the cancellation waited for its locks, is later than `cancelled_at` and
    // still right.)
    let late: Vec<(i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT task_index, completed_at FROM pgflow.step_tasks \
          WHERE run_id = $1 AND status = 'completed' AND completed_at > $2",
    )
    .bind(run)
    .bind(committed_by)
    .fetch_all(pool)
    .await
    .expect("late completions");
    assert!(
        late.is_empty(),
        "completed after the cancellation committed at {committed_by}: {late:?}"
    );
    let cancelled_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT cancelled_at FROM pgflow.runs WHERE run_id = $1")
            .bind(run)
            .fetch_one(pool)
            .await
            .expect("cancelled_at");
    assert!(cancelled_at <= committed_by);
    assert_eq!(
        count_status(pool, run, "cancelled").await,
        1000 - i64::try_from(completed_at_cancel.len()).unwrap(),
        "every other task is cancelled"
    );
    assert_eq!(
        count_status(pool, run, "queued").await + count_status(pool, run, "started").await,
        0
    );
    assert_eq!(recorded_failures(pool, run).await, 0, "no failure reported");

    // Every handler that was running saw its token, the waiters within 2 s; none was dropped
    // unaware.
    let load = |counter: &AtomicU64| counter.load(Ordering::SeqCst);
    let (entered, finished_normally, saw_token) = (
        load(&seen.entered),
        load(&seen.finished),
        load(&seen.saw_token),
    );
    assert_eq!(
        entered,
        finished_normally + saw_token,
        "{finished_normally} finished, {saw_token} saw the token"
    );
    let waiters = load(&seen.waiters);
    assert!(waiters > 0, "no waiter ran before the cancellation");
    assert_eq!(load(&seen.waiters_saw), waiters);
    let last_fired = seen.last_fired.lock().unwrap().expect("a token fired");
    let after = last_fired.duration_since(cancel_began);
    assert!(after < Duration::from_secs(2), "{after:?}");
    let stats: Vec<WorkerStats> = workers.iter().map(WorkerHandle::stats).collect();
    let cancelled: u64 = stats.iter().map(|stats| stats.cancelled).sum();
    let failed: u64 = stats.iter().map(|stats| stats.failed).sum();
    assert!(cancelled >= saw_token, "{stats:?}");
    assert_eq!(failed, 0, "{stats:?}");
    // Nothing left in the queue to run.
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.q_big_map")
        .fetch_one(pool)
        .await
        .expect("queue");
    assert_eq!(visible, 0);
    assert_consistent(pool).await;
    for worker in workers {
        worker.shutdown().await.expect("shutdown");
    }
}

/// A run fails while one of its handlers still runs here; the run is retried and this worker
/// starts that task again. Attempts count from 1 again after a retry, so the older execution's
/// report would name the same attempt and worker as the new one: the worker drops the older
/// execution unreported, and the run ends with the new execution's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_execution_of_a_task_started_again_after_a_retry_is_never_reported() {
    let db = database().await;
    let pool = db.pool();
    let gates: Arc<[Notify; 2]> = Arc::new([Notify::new(), Notify::new()]);
    let slow_calls = Arc::new(AtomicU64::new(0));
    let (gates_in, calls_in) = (Arc::clone(&gates), Arc::clone(&slow_calls));
    let slow = step_fn("slow").handler(move |_: u32, _ctx: StepContext| {
        let call = calls_in.fetch_add(1, Ordering::SeqCst);
        let gates = Arc::clone(&gates_in);
        async move {
            // Ignores its token on purpose: only the worker can keep its result out.
            gates[usize::try_from(call.min(1)).unwrap_or(1)]
                .notified()
                .await;
            Ok::<_, StepError>(String::from(if call == 0 { "old" } else { "new" }))
        }
    });
    let bad_calls = Arc::new(AtomicU64::new(0));
    let bad_in = Arc::clone(&bad_calls);
    let bad = step_fn("bad").handler(move |_: u32, _ctx: StepContext| {
        let call = bad_in.fetch_add(1, Ordering::SeqCst);
        async move {
            if call == 0 {
                return Err(StepError::new("fails the run").no_retry());
            }
            Ok(1)
        }
    });
    let flow: Flow<u32> = Flow::new("superseded").step(slow).step(bad).build();
    compile(pool, &flow).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");

    let run = start(pool, "superseded", json!(0)).await;
    let (status, _) = finished(pool, run, Duration::from_secs(20)).await;
    assert_eq!(status, "failed");
    assert_eq!(
        slow_calls.load(Ordering::SeqCst),
        1,
        "the first execution still waits"
    );

    let retries: i32 = sqlx::query_scalar("SELECT pgflow.retry_run($1)")
        .bind(run)
        .fetch_one(pool)
        .await
        .expect("retry_run");
    assert_eq!(retries, 1);
    eventually(
        "the second execution",
        Duration::from_secs(20),
        async || slow_calls.load(Ordering::SeqCst) == 2,
    )
    .await;
    // The older execution may now finish: its result must not land on the new attempt.
    gates[0].notify_one();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let slow_status: String = sqlx::query_scalar(
        "SELECT status FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'slow'",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .expect("slow task");
    assert_eq!(
        slow_status, "started",
        "the older execution reported nothing"
    );
    gates[1].notify_one();
    let (status, output) = finished(pool, run, Duration::from_secs(20)).await;
    assert_eq!(
        (status.as_str(), output),
        ("completed", Some(json!({"slow": "new", "bad": 1})))
    );
    let stats = settled(&worker).await;
    assert_eq!(stats.cancelled, 1, "{stats:?}");
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
}

/// Any role that can connect may NOTIFY `pgflow_cancel`: a notification naming a run that was
/// not cancelled stops nothing, and the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_cancel_notification_stops_nothing() {
    let db = database().await;
    let pool = db.pool();
    let gate = Arc::new(Notify::new());
    let saw_token = Arc::new(AtomicBool::new(false));
    let (gate_in, saw_in) = (Arc::clone(&gate), Arc::clone(&saw_token));
    let waits = step_fn("waits").handler(move |n: u32, ctx: StepContext| {
        let (gate, saw) = (Arc::clone(&gate_in), Arc::clone(&saw_in));
        async move {
            tokio::select! {
                () = gate.notified() => Ok::<_, StepError>(n + 1),
                () = ctx.cancellation_token().cancelled() => {
                    saw.store(true, Ordering::SeqCst);
                    Err(StepError::new("cancelled"))
                }
            }
        }
    });
    let flow: Flow<u32> = Flow::new("forged").step(waits).build();
    compile(pool, &flow).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .spawn()
        .expect("worker");
    let run = start(pool, "forged", json!(1)).await;
    eventually("the task to start", Duration::from_secs(20), async || {
        worker.stats().in_flight == 1
    })
    .await;

    sqlx::query("SELECT pg_notify('pgflow_cancel', $1)")
        .bind(run.to_string())
        .execute(pool)
        .await
        .expect("notify");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !saw_token.load(Ordering::SeqCst),
        "a forged notification fired the token"
    );
    assert_eq!(worker.stats().cancelled, 0);

    gate.notify_one();
    let (status, output) = finished(pool, run, Duration::from_secs(20)).await;
    assert_eq!(
        (status.as_str(), output),
        ("completed", Some(json!({"waits": 2})))
    );
    worker.shutdown().await.expect("shutdown");
}
