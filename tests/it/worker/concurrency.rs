//! The concurrency limit holds across all flows of a worker, measured inside the handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::Worker;
use serde_json::json;

use crate::support::{compile, database, finished, start};

/// Counts handlers running at once and remembers the most seen.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
    calls: AtomicUsize,
}

impl Gauge {
    async fn hold(&self, pause: Duration) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(pause).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A root map step over the input array whose handler holds the gauge for a while.
fn fan_out(slug: &str, gauge: &Arc<Gauge>) -> Flow<Vec<u32>> {
    let gauge = Arc::clone(gauge);
    let work = step_fn("work")
        .map_over_input()
        .handler(move |x: u32, _ctx: StepContext| {
            let gauge = Arc::clone(&gauge);
            async move {
                gauge.hold(Duration::from_millis(20)).await;
                Ok::<_, StepError>(x)
            }
        });
    Flow::new(slug).step(work).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_handlers_than_the_limit_across_flows() {
    let db = database().await;
    let pool = db.pool();
    let gauge = Arc::new(Gauge::default());
    let first = fan_out("fan_a", &gauge);
    let second = fan_out("fan_b", &gauge);
    compile(pool, &first).await;
    compile(pool, &second).await;

    let worker = Worker::builder(pool.clone())
        .flow(first)
        .flow(second)
        .concurrency(4)
        .batch_size(3)
        .spawn()
        .expect("worker");

    let input = json!((0..40).collect::<Vec<u32>>());
    let mut runs = Vec::new();
    for _ in 0..2 {
        runs.push(start(pool, "fan_a", input.clone()).await);
        runs.push(start(pool, "fan_b", input.clone()).await);
    }
    for run in runs {
        let (status, output) = finished(pool, run, Duration::from_secs(60)).await;
        assert_eq!(status, "completed");
        assert_eq!(output, Some(json!({ "work": input })));
    }
    worker.shutdown().await.expect("shutdown");

    let max = gauge.max.load(Ordering::SeqCst);
    eprintln!(
        "concurrency 4: at most {max} handlers at once over {} calls",
        gauge.calls.load(Ordering::SeqCst)
    );
    assert_eq!(gauge.calls.load(Ordering::SeqCst), 160);
    assert!(max <= 4, "{max} handlers ran at once with a limit of 4");
    assert!(
        max >= 2,
        "the worker should run tasks in parallel (max {max})"
    );
}

/// What the slow handler of [`one_slow`] saw of the others: how many had run when it started,
/// and when it finished.
#[derive(Default)]
struct SlowSaw {
    fast_done: AtomicUsize,
    at_start: AtomicUsize,
    at_end: AtomicUsize,
}

/// A root map step over the input array of `1 + fast` elements: the first handler to run
/// waits until the `fast` others have run (a 30 s cap keeps a broken worker from hanging the
/// test); the others return at once.
fn one_slow(slug: &str, fast: usize, saw: &Arc<SlowSaw>) -> Flow<Vec<u32>> {
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let saw = Arc::clone(saw);
    let work = step_fn("work")
        .map_over_input()
        .handler(move |x: u32, _ctx: StepContext| {
            let slow = first.swap(false, Ordering::SeqCst);
            let saw = Arc::clone(&saw);
            async move {
                if slow {
                    let done = || saw.fast_done.load(Ordering::SeqCst);
                    saw.at_start.store(done(), Ordering::SeqCst);
                    let cap = tokio::time::Instant::now() + Duration::from_secs(30);
                    while done() < fast && tokio::time::Instant::now() < cap {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    saw.at_end.store(done(), Ordering::SeqCst);
                } else {
                    saw.fast_done.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, StepError>(x)
            }
        });
    Flow::new(slug).step(work).build()
}

/// Issue 24: a place a fast handler frees is read into again while a slow handler holds the
/// other, rather than the worker waiting for a whole batch to free. With two places, the 20
/// fast tasks can only all run while the slow one runs if the one free place is refilled again
/// and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_freed_by_a_fast_handler_is_refilled_while_a_slow_one_runs() {
    const FAST: usize = 20;
    let db = database().await;
    let pool = db.pool();
    let saw = Arc::new(SlowSaw::default());
    let flow = one_slow("refill", FAST, &saw);
    compile(pool, &flow).await;
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .concurrency(2)
        .batch_size(2)
        .spawn()
        .expect("worker");

    let input = json!((0..=FAST).collect::<Vec<usize>>());
    let run = start(pool, "refill", input.clone()).await;
    let (status, output) = finished(pool, run, Duration::from_secs(60)).await;
    assert_eq!(status, "completed");
    assert_eq!(output, Some(json!({ "work": input })));
    worker.shutdown().await.expect("shutdown");

    assert_eq!(saw.fast_done.load(Ordering::SeqCst), FAST);
    // The slow handler is the first called, so few fast ones (normally none or the other one of
    // the first read) ran before it; all the others ran in the place left free while it ran,
    // or it would have given up waiting for them.
    let (at_start, at_end) = (
        saw.at_start.load(Ordering::SeqCst),
        saw.at_end.load(Ordering::SeqCst),
    );
    assert!(
        at_start < FAST / 2,
        "{at_start} fast tasks ran before the first handler"
    );
    assert_eq!(
        at_end, FAST,
        "only {at_end} of {FAST} fast tasks ran while the slow one held its place"
    );
}

/// Handlers' calls, and when to let the reports through.
async fn calls_reach(calls: &AtomicUsize, at_least: usize) {
    crate::support::eventually(
        &format!("{at_least} handler calls"),
        Duration::from_secs(30),
        async || calls.load(Ordering::SeqCst) >= at_least,
    )
    .await;
}

/// A root map step over the input array whose handler only counts its calls.
fn counted(slug: &str, calls: &Arc<AtomicUsize>) -> Flow<Vec<u32>> {
    let calls = Arc::clone(calls);
    let work = step_fn("work")
        .map_over_input()
        .handler(move |x: u32, _ctx: StepContext| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, StepError>(x) }
        });
    Flow::new(slug).step(work).build()
}

/// How a blocked report is let through.
#[derive(Clone, Copy)]
enum Unblock {
    /// The lock holder commits.
    Release,
    /// The blocked report's connection is terminated mid-call (its outcome unknown to the
    /// worker), then the lock holder rolls back.
    KillReporter,
}

/// Issue 24: while a report is in flight, finished handlers hand their results over and free
/// their places, up to a backlog of one result per place, and the next report carries all of
/// them in one `complete_tasks` call; however the blocked call ends, every task completes once.
async fn reports_pile_up_behind_a_blocked_report_and_go_out_together(unblock: Unblock) {
    const CONCURRENCY: usize = 2;
    // `report::backlog`: one result per place.
    const BACKLOG: usize = CONCURRENCY;
    let db = database().await;
    let pool = db.pool();
    let calls = Arc::new(AtomicUsize::new(0));
    let flow = counted("backlog", &calls);
    compile(pool, &flow).await;
    let input = json!((0..40).collect::<Vec<u32>>());
    let run = start(pool, "backlog", input.clone()).await;

    // Every completion of the map's tasks updates its step's row: hold it, and the first
    // report waits (reads only look at the row, and take no lock a key-share would).
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query(
        "SELECT 1 FROM pgflow.step_states WHERE run_id = $1 AND step_slug = 'work' \
           FOR NO KEY UPDATE",
    )
    .bind(run)
    .execute(&mut *holder)
    .await
    .expect("lock the step");
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .concurrency(CONCURRENCY)
        .batch_size(CONCURRENCY)
        .spawn()
        .expect("worker");

    // The blocked call's tasks (one read at most), the backlog, then one finished handler per
    // place waiting for room: more than the places alone would let run.
    calls_reach(&calls, 1 + BACKLOG + CONCURRENCY).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let piled = calls.load(Ordering::SeqCst);
    assert!(
        piled <= 2 * CONCURRENCY + BACKLOG,
        "{piled} handlers ran behind one blocked report: the backlog is not bounded"
    );
    let completed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_tasks WHERE run_id = $1 AND status = 'completed'",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .expect("count");
    assert_eq!(completed, 0, "a completion went past the held step row");

    match unblock {
        Unblock::Release => holder.commit().await.expect("commit"),
        Unblock::KillReporter => {
            let killed: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(w.pid)) FROM ( \
                   SELECT a.pid FROM pg_stat_activity a \
                    WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() \
                      AND a.wait_event_type = 'Lock' AND a.query LIKE '%complete_tasks%' \
                   OFFSET 0) w",
            )
            .fetch_one(pool)
            .await
            .expect("terminate");
            assert_eq!(killed, 1, "one report waits on the step row");
            holder.rollback().await.expect("rollback");
        }
    }

    let (status, output) = finished(pool, run, Duration::from_secs(60)).await;
    assert_eq!(status, "completed");
    assert_eq!(output, Some(json!({ "work": input })));
    worker.shutdown().await.expect("shutdown");
    assert_eq!(calls.load(Ordering::SeqCst), 40, "a handler ran twice");
    let attempts: Vec<i32> = sqlx::query_scalar(
        "SELECT attempts_count FROM pgflow.step_tasks WHERE run_id = $1 ORDER BY task_index",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .expect("attempts");
    assert_eq!(attempts, vec![1; 40]);
    // One call's tasks share its transaction's timestamp: the backlog went out in one call.
    let largest: i64 = sqlx::query_scalar(
        "SELECT max(n) FROM (SELECT count(*) AS n FROM pgflow.step_tasks \
                              WHERE run_id = $1 GROUP BY completed_at) c",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .expect("groups");
    assert!(
        largest >= i64::try_from(BACKLOG).unwrap(),
        "the largest complete_tasks call carried {largest} tasks, fewer than the {BACKLOG} that waited"
    );
    crate::support::assert_consistent(pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_wait_behind_a_slow_report_in_a_bounded_backlog_and_go_out_together() {
    reports_pile_up_behind_a_blocked_report_and_go_out_together(Unblock::Release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_report_cut_off_mid_call_still_completes_every_task_once() {
    reports_pile_up_behind_a_blocked_report_and_go_out_together(Unblock::KillReporter).await;
}
