//! Run priority (issue 22, migration 0015): the order a worker starts a flow's ready tasks in,
//! observed from the handlers; the priority riding on every message of its run; bad values
//! refused at each door; and a flow that never uses it left exactly as it was.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgflow_client::{Client, StartOptions, Worker};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{assert_consistent, compile, database, finished_all, set_engine_options};

/// What the handlers saw, in the order they were called: (the run input's `id`, attempt).
type Seen = Arc<Mutex<Vec<(i64, u32)>>>;

/// A one-step flow `slug` whose handler records each call, fails the first attempt of the
/// runs whose input has `"fail_once": true`, and takes `"sleep_ms"` milliseconds when given.
fn recording_flow(slug: &str, seen: &Seen) -> Flow<Value> {
    let seen = Arc::clone(seen);
    let work = step_fn("work")
        .max_attempts(3)
        .handler(move |input: Value, ctx: StepContext| {
            let seen = Arc::clone(&seen);
            async move {
                let id = input["id"].as_i64().expect("an id");
                seen.lock().unwrap().push((id, ctx.attempt()));
                if let Some(ms) = input["sleep_ms"].as_u64() {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if input["fail_once"] == json!(true) && ctx.attempt() == 1 {
                    return Err(StepError::new("first attempt fails"));
                }
                Ok::<_, StepError>(id)
            }
        });
    Flow::new(slug).step(work).build()
}

/// Starts runs of `slug` with inputs `{"id": id, ...extra}` and the given priorities, one
/// after the other (each its own transaction), through the Rust door.
async fn start_all(client: &Client, slug: &str, runs: &[(i64, i16)], extra: Value) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for &(id, priority) in runs {
        let mut input = json!({ "id": id });
        if let (Some(input), Some(extra)) = (input.as_object_mut(), extra.as_object()) {
            input.extend(extra.clone());
        }
        let run = client
            .start_json_with(slug, input, StartOptions::new().priority(priority))
            .await
            .expect("started");
        ids.push(run.id());
    }
    ids
}

/// Runs the queued backlog of `flow` with one worker of one place, and returns the handlers'
/// calls in order once every run in `runs` has completed.
async fn drain_with_one_place(
    pool: &PgPool,
    flow: Flow<Value>,
    runs: &[Uuid],
    seen: &Seen,
) -> Vec<(i64, u32)> {
    let worker = Worker::builder(pool.clone())
        .flow(flow)
        .concurrency(1)
        .spawn()
        .expect("worker");
    let ended = finished_all(pool, runs, Duration::from_secs(60)).await;
    worker.shutdown().await.expect("shutdown");
    for (run, (status, _)) in runs.iter().zip(ended) {
        assert_eq!(status, "completed", "run {run}");
    }
    assert_consistent(pool).await;
    seen.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_runs_queued_after_a_low_backlog_start_before_the_rest_of_it() {
    let db = database().await;
    let pool = db.pool();
    let client = Client::new(pool.clone());
    let seen = Seen::default();
    let flow = recording_flow("prio_backlog", &seen);
    compile(pool, &flow).await;

    // The backlog first (priority 0, the plain start), then the urgent runs.
    let low: Vec<(i64, i16)> = (0..8).map(|i| (i, 0)).collect();
    let high: Vec<(i64, i16)> = (100..106).map(|i| (i, 5)).collect();
    let mut runs = start_all(&client, "prio_backlog", &low, json!({})).await;
    runs.extend(start_all(&client, "prio_backlog", &high, json!({})).await);

    let order: Vec<i64> = drain_with_one_place(pool, flow, &runs, &seen)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // Every urgent run before every run of the backlog, each group in its start order.
    let expected: Vec<i64> = (100..106).chain(0..8).collect();
    assert_eq!(order, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_start_by_priority_level_and_in_start_order_within_a_level() {
    let db = database().await;
    let pool = db.pool();
    let client = Client::new(pool.clone());
    let seen = Seen::default();
    let flow = recording_flow("prio_levels", &seen);
    compile(pool, &flow).await;

    // Interleaved levels, including negative ones and both ends of the range.
    let levels = [0, 7, -3, i16::MAX, 0, 7, i16::MIN, -3, 0, 7, -3, i16::MAX];
    let runs: Vec<(i64, i16)> = (0..).zip(levels).collect();
    let ids = start_all(&client, "prio_levels", &runs, json!({})).await;

    let order: Vec<i64> = drain_with_one_place(pool, flow, &ids, &seen)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // A stable sort by descending priority keeps the start order within a level.
    let mut expected = runs.clone();
    expected.sort_by_key(|&(_, p)| std::cmp::Reverse(p));
    let expected: Vec<i64> = expected.into_iter().map(|(id, _)| id).collect();
    assert_eq!(order, expected);
    assert_eq!(client.run_priority(ids[3]).await.unwrap(), i16::MAX);
    assert_eq!(client.run_priority(ids[0]).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_task_keeps_its_run_priority() {
    let db = database().await;
    let pool = db.pool();
    let client = Client::new(pool.clone());
    let seen = Seen::default();
    let flow = recording_flow("prio_retry", &seen);
    compile(pool, &flow).await;
    // Retried at once: the retry's message is visible again right after the failure, later
    // than every message of the backlog.
    set_engine_options(pool, "prio_retry", None, &[("base_delay", 0)]).await;

    // The backlog's handlers take a while, so that the failure's report (which the worker
    // sends while its place already reads the next task) lands while one of them runs.
    let backlog: Vec<(i64, i16)> = (0..6).map(|i| (i, 0)).collect();
    let mut runs = start_all(&client, "prio_retry", &backlog, json!({"sleep_ms": 300})).await;
    runs.extend(
        start_all(
            &client,
            "prio_retry",
            &[(100, 9)],
            json!({"fail_once": true}),
        )
        .await,
    );

    let calls = drain_with_one_place(pool, flow, &runs, &seen).await;
    assert_eq!(calls[0], (100, 1), "{calls:?}");
    let retry = calls.iter().position(|&c| c == (100, 2)).expect("retried");
    // At most the one backlog task read while the failure was being reported goes first;
    // without its priority the retry, visible last, would run after the whole backlog.
    assert!(retry <= 2, "the retry goes before the backlog: {calls:?}");
    assert_eq!(calls.len(), 8, "{calls:?}");
}

/// The header on the messages of `run` in `flow`'s queue (msg_id order), as the read sees it.
async fn headers_of(pool: &PgPool, queue: &str, run: Uuid) -> Vec<Option<Value>> {
    sqlx::query_scalar(&format!(
        "SELECT headers FROM pgmq.q_{queue} WHERE message ->> 'run_id' = $1 ORDER BY msg_id"
    ))
    .bind(run.to_string())
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_priority_rides_on_every_message_of_its_run_and_the_message_keeps_its_keys() {
    let db = database().await;
    let pool = db.pool();
    for sql in [
        "SELECT pgflow.create_flow('chain', max_attempts => 1)",
        "SELECT pgflow.add_step('chain', 'a')",
        "SELECT pgflow.add_step('chain', 'b', ARRAY['a'])",
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
         VALUES ('00000000-0000-0000-0000-000000000001', 'chain', 'tests')",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    let run: Uuid =
        sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow_with_priority('chain', '{}', 3)")
            .fetch_one(pool)
            .await
            .unwrap();
    let plain: Uuid = sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('chain', '{}')")
        .fetch_one(pool)
        .await
        .unwrap();
    let header = Some(json!({ "pgflow_priority": 3 }));
    assert_eq!(headers_of(pool, "chain", run).await, vec![header.clone()]);
    assert_eq!(headers_of(pool, "chain", plain).await, vec![None]);
    let message: Value =
        sqlx::query_scalar("SELECT message FROM pgmq.q_chain WHERE message ->> 'run_id' = $1")
            .bind(run.to_string())
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        message,
        json!({"flow_slug": "chain", "run_id": run, "step_slug": "a", "task_index": 0})
    );

    // The Rust worker's read takes the run with the priority first, though started first
    // by the other.
    let read = "SELECT run_id FROM pgflow._read_and_start('chain', 1, 30, \
                '00000000-0000-0000-0000-000000000001')";
    let first: Uuid = sqlx::query_scalar(read).fetch_one(pool).await.unwrap();
    assert_eq!(first, run);
    // A step started later (released by the completion) carries it too.
    sqlx::query("SELECT pgflow.complete_task($1, 'a', 0, '1')")
        .bind(run)
        .execute(pool)
        .await
        .unwrap();
    let b: Vec<Option<Value>> = sqlx::query_scalar(
        "SELECT headers FROM pgmq.q_chain WHERE message ->> 'run_id' = $1 \
           AND message ->> 'step_slug' = 'b'",
    )
    .bind(run.to_string())
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(b, vec![header.clone()]);

    // A failed run retried: its new messages carry it as well.
    let second: Uuid = sqlx::query_scalar(read).fetch_one(pool).await.unwrap();
    assert_eq!(
        second, run,
        "b of the prioritised run before a of the plain one"
    );
    sqlx::query("SELECT pgflow.fail_task($1, 'b', 0, 'boom')")
        .bind(run)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("SELECT pgflow.retry_run($1)")
        .bind(run)
        .execute(pool)
        .await
        .unwrap();
    let retried: Vec<Option<Value>> = sqlx::query_scalar(
        "SELECT q.headers FROM pgmq.q_chain q JOIN pgflow.step_tasks t ON t.message_id = q.msg_id \
          WHERE t.run_id = $1 AND t.step_slug = 'b'",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(retried, vec![header]);

    // A message sent by another party claiming a priority gets none: only a run's row says.
    sqlx::query(
        "INSERT INTO pgmq.q_chain (vt, message, headers) \
         VALUES (now(), jsonb_build_object('run_id', $1::text), '{\"pgflow_priority\": 32000, \"x\": 1}')",
    )
    .bind(plain)
    .execute(pool)
    .await
    .unwrap();
    let forged: Option<Value> =
        sqlx::query_scalar("SELECT headers FROM pgmq.q_chain WHERE headers ? 'x'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(forged, Some(json!({"x": 1})));
    sqlx::query("DELETE FROM pgmq.q_chain WHERE headers ? 'x'")
        .execute(pool)
        .await
        .unwrap();
    assert_consistent(pool).await;
}

#[tokio::test]
async fn bad_priorities_are_refused_with_a_clear_error_and_nothing_written() {
    let db = database().await;
    let pool = db.pool();
    sqlx::query("SELECT pgflow.create_flow('bad')")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("SELECT pgflow.add_step('bad', 'a')")
        .execute(pool)
        .await
        .unwrap();
    for priority in [32768, -32769, i32::MAX, i32::MIN] {
        let err = sqlx::query("SELECT pgflow.start_flow_with_priority('bad', '{}', $1)")
            .bind(priority)
            .execute(pool)
            .await
            .expect_err("out of range");
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.code().as_deref(), Some("22003"), "{priority}");
        assert_eq!(
            db_err.message(),
            format!("priority must be between -32768 and 32767 (got {priority})")
        );
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(runs, 0);
    // NULL is the default priority, as a NULL run id is a generated one.
    let run: Uuid =
        sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow_with_priority('bad', '{}', NULL)")
            .fetch_one(pool)
            .await
            .unwrap();
    let priority: i16 = sqlx::query_scalar("SELECT pgflow.run_priority($1)")
        .bind(run)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(priority, 0);
    // The engine's own start errors come through unchanged.
    let err = sqlx::query("SELECT pgflow.start_flow_with_priority('nope', '{}', 4)")
        .execute(pool)
        .await
        .expect_err("unknown flow");
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("23503")
    );
    // A run id taken: runs_pkey, as start_flow says, and the first run's priority stays.
    let err = sqlx::query("SELECT pgflow.start_flow_with_priority('bad', '{}', 4, $1)")
        .bind(run)
        .execute(pool)
        .await
        .expect_err("run id taken");
    assert_eq!(
        err.as_database_error().and_then(|e| e.constraint()),
        Some("runs_pkey")
    );
}

#[tokio::test]
async fn the_rust_door_takes_any_i16_and_keeps_start_idempotent_by_run_id() {
    let db = database().await;
    let pool = db.pool();
    let client = Client::new(pool.clone());
    let seen = Seen::default();
    let flow = recording_flow("prio_door", &seen);
    compile(pool, &flow).await;
    let run_id = Uuid::new_v4();
    let options = StartOptions::new().priority(i16::MIN).run_id(run_id);
    let input = json!({"id": 1});
    let first = client
        .start_json_with("prio_door", input.clone(), options)
        .await
        .unwrap();
    let again = client
        .start_json_with("prio_door", input, options.priority(3))
        .await
        .unwrap();
    assert_eq!((first.id(), again.id()), (run_id, run_id));
    assert_eq!(client.run_priority(run_id).await.unwrap(), i16::MIN);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);
    // An unknown flow is the client's usual error, before anything is written.
    let err = client
        .start_json_with("nope", json!({}), StartOptions::new().priority(2))
        .await
        .expect_err("unknown flow");
    assert!(
        matches!(err, pgflow_client::Error::UnknownFlow { .. }),
        "{err:?}"
    );
}

/// Whether the queue of `queue` has the priority index, trigger and ordering read.
async fn enabled(pool: &PgPool, queue: &str) -> bool {
    sqlx::query_scalar("SELECT pgflow._run_priority_enabled($1)")
        .bind(queue)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_flow_that_never_uses_priority_keeps_its_queue_and_both_read_paths() {
    let db = database().await;
    let pool = db.pool();
    for sql in [
        "SELECT pgflow.create_flow('plain')",
        "SELECT pgflow.add_step('plain', 'a')",
        "SELECT pgflow.create_flow('used')",
        "SELECT pgflow.add_step('used', 'a')",
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
         VALUES ('00000000-0000-0000-0000-000000000001', 'plain', 'tests')",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    // Priority 0 is start_flow: nothing is enabled, no row written.
    for sql in [
        "SELECT run_id FROM pgflow.start_flow('plain', '{}')",
        "SELECT run_id FROM pgflow.start_flow_with_priority('plain', '{}', 0)",
        "SELECT run_id FROM pgflow.start_flow_with_priority('used', '{}', 1)",
        "SELECT run_id FROM pgflow.start_flow_with_priority('used', '{}', 0)",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    assert!(!enabled(pool, "plain").await);
    assert!(enabled(pool, "used").await);
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'pgmq' AND tablename = 'q_plain' \
         ORDER BY indexname",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(indexes.iter().all(|i| !i.contains("prio")), "{indexes:?}");
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'pgmq.q_plain'::regclass",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow_ext.run_priorities")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(rows, 1, "only the run with priority 1");

    // A TypeScript worker's path, pgmq.read then start_tasks then complete_task, on both.
    for flow in ["plain", "used"] {
        sqlx::query("UPDATE pgflow.workers SET queue_name = $1")
            .bind(flow)
            .execute(pool)
            .await
            .unwrap();
        let started: Vec<(Uuid, String, i32)> = sqlx::query_as(
            "SELECT t.run_id, t.step_slug, t.task_index FROM pgflow.start_tasks($1, \
               ARRAY(SELECT msg_id FROM pgmq.read($1, 30, 10)), \
               '00000000-0000-0000-0000-000000000001') t",
        )
        .bind(flow)
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(started.len(), 2, "{flow}");
        for (run, step, index) in started {
            sqlx::query("SELECT pgflow.complete_task($1, $2, $3, '1')")
                .bind(run)
                .bind(step)
                .bind(index)
                .execute(pool)
                .await
                .unwrap();
        }
    }
    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE status = 'completed'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(completed, 4);
    assert_consistent(pool).await;
}

#[tokio::test]
async fn the_ordering_read_comes_back_when_the_queue_functions_are_made_again() {
    let db = database().await;
    let pool = db.pool();
    for sql in [
        "SELECT pgflow.create_flow('again')",
        "SELECT pgflow.add_step('again', 'a')",
        "SELECT pgflow.enable_run_priority('again')",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    assert!(enabled(pool, "again").await);
    let changed: bool = sqlx::query_scalar("SELECT pgflow.enable_run_priority('again')")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(!changed, "enabling twice is enabling once");
    // Something writes the plain read back (0001's generator, run again).
    sqlx::query("SELECT pgflow._create_queue_functions('again')")
        .execute(pool)
        .await
        .unwrap();
    assert!(!enabled(pool, "again").await);
    sqlx::query("SELECT pgflow.start_flow_with_priority('again', '{}', 2)")
        .execute(pool)
        .await
        .unwrap();
    assert!(enabled(pool, "again").await);
}

#[cfg(feature = "cli")]
#[tokio::test]
async fn the_cli_starts_with_a_priority_and_refuses_one_out_of_range() {
    let db = database().await;
    let pool = db.pool();
    let client = Client::new(pool.clone());
    let seen = Seen::default();
    compile(pool, &recording_flow("prio_cli", &seen)).await;
    let url = db.url();

    let out = crate::cli::pgflow(
        url,
        &["start", "prio_cli", r#"{"id": 1}"#, "--priority", "-7"],
    );
    let run: Uuid = crate::cli::stdout(&out).trim().parse().expect("a run id");
    assert_eq!(client.run_priority(run).await.unwrap(), -7);

    let out = crate::cli::pgflow(
        url,
        &["start", "prio_cli", r#"{"id": 2}"#, "--priority", "40000"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--priority") && stderr.contains("40000"),
        "{stderr}"
    );
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(runs, 1, "nothing started by the refused call");
}

#[tokio::test]
async fn two_readers_at_once_each_take_the_highest_message_the_other_does_not_hold() {
    let db = database().await;
    let pool = db.pool();
    for sql in [
        "SELECT pgflow.create_flow('both')",
        "SELECT pgflow.add_step('both', 'a')",
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
         VALUES ('00000000-0000-0000-0000-000000000001', 'both', 'tests')",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    let mut runs = Vec::new();
    for priority in [0, 0, 4, 4, 9] {
        let run: Uuid = sqlx::query_scalar(
            "SELECT run_id FROM pgflow.start_flow_with_priority('both', '{}', $1)",
        )
        .bind(priority)
        .fetch_one(pool)
        .await
        .unwrap();
        runs.push(run);
    }
    let read = "SELECT run_id FROM pgflow._read_and_start('both', 1, 30, \
                '00000000-0000-0000-0000-000000000001')";
    // Each reader keeps its transaction open, so the messages it took stay locked.
    let mut readers = Vec::new();
    let mut taken = Vec::new();
    for _ in 0..4 {
        let mut tx = pool.begin().await.unwrap();
        let run: Uuid = sqlx::query_scalar(read).fetch_one(&mut *tx).await.unwrap();
        taken.push(run);
        readers.push(tx);
    }
    assert_eq!(taken, vec![runs[4], runs[2], runs[3], runs[0]]);
    for tx in readers {
        tx.rollback().await.unwrap();
    }
    // Rolled back: everything is visible again, in the same order.
    let first: Uuid = sqlx::query_scalar(read).fetch_one(pool).await.unwrap();
    assert_eq!(first, runs[4]);
}

#[tokio::test]
async fn a_run_started_with_a_priority_in_a_transaction_commits_or_rolls_back_with_it() {
    let db = database().await;
    let pool = db.pool();
    let client = Client::new(pool.clone());
    let seen = Seen::default();
    let flow = recording_flow("prio_tx", &seen);
    compile(pool, &flow).await;
    let urgent = StartOptions::new().priority(6);

    let mut tx = pool.begin().await.unwrap();
    let gone = client
        .start_in_with(&mut *tx, &flow, &json!({"id": 1}), urgent)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let kept = client
        .start_in_with(&mut *tx, &flow, &json!({"id": 2}), urgent)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let rows: Vec<(Uuid, i16)> =
        sqlx::query_as("SELECT run_id, priority FROM pgflow_ext.run_priorities")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(rows, vec![(kept.id(), 6)]);
    let runs: Vec<Uuid> = sqlx::query_scalar("SELECT run_id FROM pgflow.runs")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(runs, vec![kept.id()]);
    assert_ne!(gone.id(), kept.id());
    assert_eq!(
        headers_of(pool, "prio_tx", kept.id()).await,
        vec![Some(json!({"pgflow_priority": 6}))]
    );
}

/// Messages sent to a queue before priority is enabled, with headers no pgflow trigger
/// wrote (a bad or out-of-range `pgflow_priority`), count as priority 0: enabling the queue
/// and reading it never fail on them (issue 22, F7).
#[tokio::test]
async fn bad_priority_headers_sent_before_enabling_count_as_zero() {
    let db = database().await;
    let pool = db.pool();
    let seen = Seen::default();
    compile(pool, &recording_flow("pr1", &seen)).await;
    let hostile = [
        json!({ "pgflow_priority": "zz" }),
        json!({ "pgflow_priority": "7" }),
        json!({ "pgflow_priority": 99999 }),
        json!({ "pgflow_priority": -40000 }),
        json!({ "pgflow_priority": 1.5 }),
        json!({ "pgflow_priority": 1e300 }),
        json!({ "pgflow_priority": null }),
        json!({ "pgflow_priority": { "n": 1 } }),
        json!(["pgflow_priority", 9]),
        json!("pgflow_priority"),
    ];
    for headers in &hostile {
        sqlx::query("SELECT pgmq.send('pr1', '{\"junk\": 1}'::jsonb, $1::jsonb)")
            .bind(headers)
            .execute(pool)
            .await
            .expect("sent");
    }
    let run: Uuid = sqlx::query_scalar(
        "SELECT run_id FROM pgflow.start_flow_with_priority('pr1', '{\"id\": 1}', 5)",
    )
    .fetch_one(pool)
    .await
    .expect("a start with a priority enables the queue");
    assert!(enabled(pool, "pr1").await);
    let expression: String = sqlx::query_scalar("SELECT pgflow._priority_expression()")
        .fetch_one(pool)
        .await
        .unwrap();
    let levels: Vec<(Option<String>, i16)> = sqlx::query_as(&format!(
        "SELECT q.message ->> 'run_id', {expression} FROM pgmq.q_pr1 q ORDER BY q.msg_id"
    ))
    .fetch_all(pool)
    .await
    .expect("every row has a level");
    let mut expected: Vec<(Option<String>, i16)> = vec![(None, 0); hostile.len()];
    expected.push((Some(run.to_string()), 5));
    assert_eq!(levels, expected);
    // The ordering read takes the run's message first, then the junk.
    let first: Vec<i64> = sqlx::query_scalar("SELECT pgflow._queue_read_pr1('pr1', 1, 30)")
        .fetch_one(pool)
        .await
        .expect("read");
    let runs_msg: i64 =
        sqlx::query_scalar("SELECT msg_id FROM pgmq.q_pr1 WHERE message ->> 'run_id' = $1")
            .bind(run.to_string())
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(first, vec![runs_msg]);
    // The total expression is still the index's: a level's range is an index scan.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN SELECT q.msg_id FROM pgmq.q_pr1 q WHERE {expression} = 5 AND q.vt <= now() \
          ORDER BY {expression}, q.vt, q.msg_id LIMIT 1"
    ))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("pgflow_prio_pr1"), "{plan}");
    assert!(!plan.contains("Sort"), "{plan}");
}

/// An unknown flow is refused by a start with a priority, whatever the priority, with the
/// very error a plain start gives (issue 22).
#[tokio::test]
async fn an_unknown_flow_is_refused_as_a_plain_start_refuses_it() {
    let db = database().await;
    let pool = db.pool();
    let refusal = async |sql: &str| {
        let error = sqlx::query(sql)
            .execute(pool)
            .await
            .expect_err("an unknown flow is refused");
        let error = error.as_database_error().expect("a database error");
        (
            error.code().map(|c| c.into_owned()),
            error.message().to_owned(),
        )
    };
    let plain = refusal("SELECT * FROM pgflow.start_flow('nope', '{}')").await;
    for priority in [5, -1, 0] {
        let with_priority = refusal(&format!(
            "SELECT * FROM pgflow.start_flow_with_priority('nope', '{{}}', {priority})"
        ))
        .await;
        assert_eq!(with_priority, plain, "priority {priority}");
    }
}
