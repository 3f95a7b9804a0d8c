//! Concurrency and rate limits of steps (migration 0014, issue 22), observed from the handlers:
//! each handler writes when it started and ended (`clock_timestamp()`) through a pool of its
//! own, never the engine's counters.

use std::time::Duration;

use futures_util::future::BoxFuture;

use pgflow::{Flow, StepContext, StepError, step_fn};
use pgflow_client::{Worker, WorkerBuilder};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::reliability::{ChildProcess, serve_in_child};
use crate::support::{compile, database, finished, finished_all, set_engine_options, start};

/// The table handlers write their starts and ends into.
async fn create_log(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE limit_log (
           id bigserial PRIMARY KEY, label text NOT NULL,
           started_at timestamptz NOT NULL, ended_at timestamptz)",
    )
    .execute(pool)
    .await
    .expect("log table");
}

/// A handler that logs its start and end (labelled with the run input's `tenant`, else
/// `item` for a map element), holding for `hold` in between; `log` is the handlers' own pool.
fn logging(
    hold: Duration,
    log: PgPool,
) -> impl Fn(Value, StepContext) -> BoxFuture<'static, Result<Value, StepError>> + Clone {
    move |input: Value, _ctx: StepContext| {
        let log = log.clone();
        Box::pin(async move {
            let label = input
                .get("tenant")
                .and_then(Value::as_str)
                .unwrap_or("item")
                .to_owned();
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO limit_log (label, started_at) VALUES ($1, clock_timestamp()) RETURNING id",
            )
            .bind(&label)
            .fetch_one(&log)
            .await
            .map_err(|e| StepError::new(e.to_string()))?;
            tokio::time::sleep(hold).await;
            sqlx::query("UPDATE limit_log SET ended_at = clock_timestamp() WHERE id = $1")
                .bind(id)
                .execute(&log)
                .await
                .map_err(|e| StepError::new(e.to_string()))?;
            Ok(input)
        })
    }
}

/// A flow of one step `work` whose handler is [`logging`], run once per run.
fn logged_flow(slug: &str, hold: Duration, log: PgPool) -> Flow<Value> {
    let work = step_fn("work").max_attempts(3).handler(logging(hold, log));
    Flow::new(slug).step(work).build()
}

/// A flow of one map step `work` over the input array whose handler is [`logging`].
fn logged_map(slug: &str, hold: Duration, log: PgPool) -> Flow<Vec<Value>> {
    let work = step_fn("work")
        .map_over_input()
        .max_attempts(3)
        .handler(logging(hold, log));
    Flow::new(slug).step(work).build()
}

/// The handlers' own pool on the database at `url`.
fn log_pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(12)
        .connect_lazy(url)
        .expect("log pool")
}

/// The most handlers the log shows running at once (at each start, those started before or
/// then and not yet ended).
async fn max_overlap(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(max((SELECT count(*) FROM limit_log b
                               WHERE b.started_at <= a.started_at
                                 AND (b.ended_at IS NULL OR b.ended_at > a.started_at))), 0)
           FROM limit_log a",
    )
    .fetch_one(pool)
    .await
    .expect("overlap")
}

fn worker<I>(pool: PgPool, flow: Flow<I>, concurrency: usize) -> WorkerBuilder {
    Worker::builder(pool)
        .flow(flow)
        .concurrency(concurrency)
        .poll_interval(Duration::from_millis(50))
        .max_poll_wait(Duration::from_secs(1))
        .shutdown_timeout(Duration::from_secs(10))
}

/// A worker row for flow `flow`, as a worker registers itself.
async fn register_worker(pool: &PgPool, flow: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, $2, 'limits')",
    )
    .bind(id)
    .bind(flow)
    .execute(pool)
    .await
    .expect("worker registered");
    id
}

const CHILD_URL: &str = "PGFLOW_LIMITS_CHILD_URL";

/// Not a test on its own: the second worker process of
/// `a_concurrency_limit_holds_across_two_worker_processes`.
#[test]
#[ignore = "run by limits::a_concurrency_limit_holds_across_two_worker_processes"]
fn limits_child_worker() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let log_url = url.clone();
    serve_in_child(&url, move |pool| {
        // Inside the child's runtime, which a pool needs.
        let log = log_pool(&log_url);
        worker(
            pool,
            logged_map("limited", Duration::from_millis(30), log),
            10,
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_holds_across_two_worker_processes() {
    let db = database().await;
    let pool = db.pool();
    create_log(pool).await;
    let log = log_pool(db.url());
    let flow = logged_map("limited", Duration::from_millis(30), log);
    compile(pool, &flow).await;
    sqlx::query("SELECT pgflow.set_concurrency_limit('limited', 'work', 3)")
        .execute(pool)
        .await
        .expect("limit set");

    // The second process: this binary again, serving the same flow with ten places.
    let _child = ChildProcess(
        std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--exact",
                "limits::limits_child_worker",
                "--include-ignored",
            ])
            .stdout(std::process::Stdio::null())
            .env(CHILD_URL, db.url())
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("child process starts"),
    );
    let here = worker(pool.clone(), flow, 10).spawn().expect("worker");

    let input = json!((0..200).collect::<Vec<u32>>());
    let run = start(pool, "limited", input.clone()).await;
    let (status, output) = finished(pool, run, Duration::from_secs(90)).await;
    assert_eq!(status, "completed");
    assert_eq!(output, Some(json!({ "work": input })));
    here.shutdown().await.expect("shutdown");

    let (handled, workers): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM limit_log),
                (SELECT count(DISTINCT last_worker_id) FROM pgflow.step_tasks)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(handled >= 200, "{handled}");
    assert_eq!(workers, 2, "both processes took tasks");
    let max = max_overlap(pool).await;
    eprintln!("limit 3, two processes of 10 places: at most {max} handlers at once");
    assert!(max <= 3, "{max} handlers at once");
    assert_eq!(max, 3, "the limit is used, not undershot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_a_backlog_does_not_hold_back_another() {
    let db = database().await;
    let pool = db.pool();
    create_log(pool).await;
    let flow = logged_flow("tenants", Duration::from_millis(50), log_pool(db.url()));
    compile(pool, &flow).await;
    sqlx::query("SELECT pgflow.set_concurrency_limit('tenants', 'work', 2, 'tenant')")
        .execute(pool)
        .await
        .expect("limit set");

    let mut runs = Vec::new();
    for _ in 0..100 {
        runs.push(start(pool, "tenants", json!({"tenant": "A"})).await);
    }
    for _ in 0..5 {
        runs.push(start(pool, "tenants", json!({"tenant": "B"})).await);
    }
    let here = worker(pool.clone(), flow, 10).spawn().expect("worker");
    finished_all(pool, &runs, Duration::from_secs(90)).await;
    here.shutdown().await.expect("shutdown");

    let (a_end, b_end, a_done_before_b, max_a, max_b): (f64, f64, i64, i64, i64) =
        sqlx::query_as(
            "WITH e AS (SELECT label, max(ended_at) AS last FROM limit_log GROUP BY label)
             SELECT extract(epoch FROM (SELECT last FROM e WHERE label = 'A') - (SELECT min(started_at) FROM limit_log))::float8,
                    extract(epoch FROM (SELECT last FROM e WHERE label = 'B') - (SELECT min(started_at) FROM limit_log))::float8,
                    (SELECT count(*) FROM limit_log WHERE label = 'A'
                        AND ended_at <= (SELECT last FROM e WHERE label = 'B')),
                    (SELECT coalesce(max((SELECT count(*) FROM limit_log b WHERE b.label = 'A' AND b.started_at <= a.started_at AND b.ended_at > a.started_at)), 0) FROM limit_log a WHERE a.label = 'A'),
                    (SELECT coalesce(max((SELECT count(*) FROM limit_log b WHERE b.label = 'B' AND b.started_at <= a.started_at AND b.ended_at > a.started_at)), 0) FROM limit_log a WHERE a.label = 'B')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
    eprintln!(
        "per key 2: B's 5 done after {b_end:.2} s ({a_done_before_b} of A's 100 by then), A's after {a_end:.2} s"
    );
    assert!(max_a <= 2 && max_b <= 2, "per key: A {max_a}, B {max_b}");
    // In FIFO order without keys, B's would wait for all of A's 100.
    assert!(
        a_done_before_b < 40,
        "{a_done_before_b} of A's before B's last"
    );
    assert!(b_end * 3.0 < a_end, "B {b_end} s, A {a_end} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_over_ten_seconds() {
    let db = database().await;
    let pool = db.pool();
    create_log(pool).await;
    let flow = logged_map("rated", Duration::ZERO, log_pool(db.url()));
    compile(pool, &flow).await;
    sqlx::query("SELECT pgflow.set_rate_limit('rated', 'work', 20, interval '1 second')")
        .execute(pool)
        .await
        .expect("limit set");
    let input = json!((0..400).collect::<Vec<u32>>());
    let run = start(pool, "rated", input).await;
    let here = worker(pool.clone(), flow, 10).spawn().expect("worker");
    // Twelve seconds of starts: the measure is ten of them, half a second after the first.
    tokio::time::sleep(Duration::from_secs(12)).await;
    here.shutdown().await.expect("shutdown");

    let (in_ten, total): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE started_at >= t0 + interval '0.5 s'
                                   AND started_at < t0 + interval '10.5 s'),
                count(*)
           FROM limit_log, (SELECT min(started_at) AS t0 FROM limit_log) f",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    eprintln!("20 per second: {in_ten} starts in 10 s ({total} in all)");
    assert!((180..=220).contains(&in_ten), "{in_ten} starts in 10 s");
    let (status, _) = crate::support::run(pool, run).await;
    assert_eq!(status, "started", "400 tasks take 20 s at 20 a second");
}

/// A worker that took a limited task and died (it never reports) holds its slot only until
/// the task's timeout: the next task starts then, and the lost one runs again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_task_frees_its_slot_after_its_timeout() {
    let db = database().await;
    let pool = db.pool();
    create_log(pool).await;
    let flow = logged_flow("lost", Duration::ZERO, log_pool(db.url()));
    compile(pool, &flow).await;
    set_engine_options(pool, "lost", Some("work"), &[("timeout", 2)]).await;
    sqlx::query("SELECT pgflow.set_concurrency_limit('lost', 'work', 1)")
        .execute(pool)
        .await
        .expect("limit set");
    let first = start(pool, "lost", json!({"tenant": "first"})).await;
    let second = start(pool, "lost", json!({"tenant": "second"})).await;

    // The dead worker: reads (its message hidden 4 s), starts one task, never reports.
    let dead = register_worker(pool, "lost").await;
    let read = |qty: i32| {
        sqlx::query_scalar::<_, Uuid>(
            "SELECT run_id FROM pgflow_private._read_and_start('lost', $1, 4, $2)",
        )
        .bind(qty)
        .bind(dead)
        .fetch_all(pool)
    };
    assert_eq!(read(1).await.unwrap(), [first]);
    // The limit is taken: the second task's message is read but its task not started.
    assert_eq!(read(10).await.unwrap(), Vec::<Uuid>::new());
    let queued: String =
        sqlx::query_scalar("SELECT status FROM pgflow.step_tasks WHERE run_id = $1")
            .bind(second)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(queued, "queued");

    let here = worker(pool.clone(), flow, 10).spawn().expect("worker");
    let (status, _) = finished(pool, second, Duration::from_secs(10)).await;
    assert_eq!(status, "completed", "the dead worker's slot was freed");
    let (status, _) = finished(pool, first, Duration::from_secs(15)).await;
    assert_eq!(status, "completed", "the lost task ran again");
    here.shutdown().await.expect("shutdown");
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts_count FROM pgflow.step_tasks WHERE run_id = $1")
            .bind(first)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(attempts, 2, "the lost attempt counts");
    assert!(max_overlap(pool).await <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_limits_are_refused_with_a_clear_error() {
    let db = database().await;
    let pool = db.pool();
    sqlx::raw_sql("SELECT pgflow.create_flow('f'); SELECT pgflow.add_step('f', 's');")
        .execute(pool)
        .await
        .unwrap();
    let refused = [
        (
            "SELECT pgflow.set_concurrency_limit('f', 's', 0)",
            "max_concurrent must be between 1 and 1000000 (got 0)",
        ),
        (
            "SELECT pgflow.set_concurrency_limit('f', 's', -3)",
            "max_concurrent must be between 1 and 1000000 (got -3)",
        ),
        (
            "SELECT pgflow.set_concurrency_limit('f', 's', 1000001)",
            "max_concurrent must be between 1 and 1000000",
        ),
        (
            "SELECT pgflow.set_concurrency_limit('f', 's', 2, '')",
            "key_name must be 1 to 255 bytes long (got 0 bytes)",
        ),
        (
            "SELECT pgflow.set_concurrency_limit('f', 's', 2, repeat('k', 256))",
            "key_name must be 1 to 255 bytes long",
        ),
        (
            "SELECT pgflow.set_concurrency_limit('f', 'nope', 2)",
            "step nope of flow f not found",
        ),
        (
            "SELECT pgflow.set_concurrency_limit('f', NULL, 2)",
            "flow_slug and step_slug must not be NULL",
        ),
        (
            "SELECT pgflow.set_concurrency_limit('f', 's', NULL, 'tenant')",
            "key_name needs a max_concurrent",
        ),
        (
            "SELECT pgflow.set_rate_limit('f', 's', 0, interval '1 second')",
            "max_starts must be between 1 and 1000000 (got 0)",
        ),
        (
            "SELECT pgflow.set_rate_limit('f', 's', 10, interval '500 ms')",
            "per must be between 1 second and 1 day",
        ),
        (
            "SELECT pgflow.set_rate_limit('f', 's', 10, interval '-1 second')",
            "per must be between 1 second and 1 day",
        ),
        (
            "SELECT pgflow.set_rate_limit('f', 's', 10, NULL)",
            "per must be between 1 second and 1 day (got NULL)",
        ),
        (
            "SELECT pgflow.set_rate_limit('f', 's', 10, interval '2 days')",
            "per must be between 1 second and 1 day",
        ),
    ];
    for (sql, message) in refused {
        let error = sqlx::query(sql).execute(pool).await.expect_err(sql);
        let text = error
            .as_database_error()
            .expect("a database error")
            .message()
            .to_owned();
        assert!(text.contains(message), "{sql}: {text}");
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow_ext.step_limits")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing refused was stored");

    // Set, set again (idempotent), clear one kind, clear all.
    sqlx::raw_sql(
        "SELECT pgflow.set_concurrency_limit('f', 's', 2, 'tenant');
         SELECT pgflow.set_concurrency_limit('f', 's', 2, 'tenant');
         SELECT pgflow.set_rate_limit('f', 's', 5, interval '1 minute');",
    )
    .execute(pool)
    .await
    .unwrap();
    let row: (Option<i32>, Option<String>, Option<i32>) = sqlx::query_as(
        "SELECT max_concurrent, concurrency_key, rate_max_starts FROM pgflow_ext.step_limits",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(row, (Some(2), Some("tenant".to_owned()), Some(5)));
    sqlx::query("SELECT pgflow.set_concurrency_limit('f', 's', NULL)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("SELECT pgflow.set_rate_limit('f', 's', NULL, NULL)")
        .execute(pool)
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow_ext.step_limits")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "a step without limits has no row");
}

/// Hostile key values: a huge string, JSON null, a missing key and an input that is not an
/// object each fall in a bucket (the last two in the same "absent" one), and a TypeScript
/// worker's path (pgmq.read, then start_tasks) is limited as the Rust worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_get_buckets_and_the_start_tasks_path_is_limited() {
    let db = database().await;
    let pool = db.pool();
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('k'); SELECT pgflow.add_step('k', 's');
         SELECT pgflow.set_concurrency_limit('k', 's', 1, 'tenant');",
    )
    .execute(pool)
    .await
    .unwrap();
    let huge = "x".repeat(1 << 20);
    for input in [
        json!({"tenant": huge}),
        json!({"tenant": huge}),
        json!({"tenant": null}),
        json!({"other": 1}),
        json!(["tenant"]),
        json!("tenant"),
    ] {
        start(pool, "k", input).await;
    }
    let msgs: Vec<i64> =
        sqlx::query_scalar("SELECT msg_id FROM pgmq.read('k', 30, 10) ORDER BY msg_id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(msgs.len(), 6);
    let started: Vec<Value> =
        sqlx::query_scalar("SELECT input FROM pgflow_private.start_tasks('k', $1, $2)")
            .bind(&msgs)
            .bind(register_worker(pool, "k").await)
            .fetch_all(pool)
            .await
            .unwrap();
    // One of the two huge ones, the null one, one of the three without a key.
    assert_eq!(started.len(), 3, "{}", started.len());
    let hidden_for: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM q.vt - clock_timestamp())::float8
           FROM pgmq.q_k q JOIN pgflow.step_tasks t ON t.message_id = q.msg_id
          WHERE t.status = 'queued'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(hidden_for.len(), 3);
    for secs in hidden_for {
        assert!(
            secs < 1.0,
            "a held-back message comes back soon, not in {secs} s"
        );
    }
    let bucket_len: i32 = sqlx::query_scalar(
        "SELECT octet_length(pgflow._limit_bucket(jsonb_build_object('tenant', repeat('y', 100000)), 'tenant'))",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(bucket_len, 32);
}

/// max_concurrent, rate_max_starts, the rate period in seconds and rate_key, as stored.
type StoredLimits = (Option<i32>, Option<i32>, f64, Option<String>);

/// The Rust API: a step's limits go through `Client::compile` (set, changed and cleared in
/// place, never drift) and bad values are refused before anything reaches the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_limits_from_the_rust_api_are_compiled_in_place() {
    let (db, client) = crate::support::client().await;
    let pool = db.pool();
    let limited = |concurrency: Option<u32>| {
        let step = step_fn("call").rate_limit_per_key("tenant", 50, Duration::from_millis(1500));
        let step = match concurrency {
            Some(max) => step.concurrency(max),
            None => step,
        };
        Flow::<Value>::new("api")
            .step(step.handler(|input: Value, _ctx: StepContext| async move { Ok(input) }))
            .build()
    };
    let stored = async || -> Option<StoredLimits> {
        sqlx::query_as(
            "SELECT max_concurrent, rate_max_starts, extract(epoch FROM rate_period)::float8, rate_key
               FROM pgflow_ext.step_limits WHERE flow_slug = 'api' AND step_slug = 'call'",
        )
        .fetch_optional(pool)
        .await
        .unwrap()
    };
    client.compile(&limited(Some(3))).await.expect("created");
    assert_eq!(
        stored().await,
        Some((Some(3), Some(50), 2.0, Some("tenant".to_owned())))
    );
    client
        .compile(&limited(None))
        .await
        .expect("tuned in place");
    assert_eq!(
        stored().await,
        Some((None, Some(50), 2.0, Some("tenant".to_owned())))
    );
    let plain = Flow::<Value>::new("api")
        .step(step_fn("call").handler(|input: Value, _ctx: StepContext| async move { Ok(input) }))
        .build();
    client.compile(&plain).await.expect("cleared in place");
    assert_eq!(stored().await, None);

    let zero = step_fn("call")
        .concurrency(0)
        .handler(|input: Value, _ctx: StepContext| async move { Ok(input) });
    let error = Flow::<Value>::new("api")
        .step(zero)
        .try_build()
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "step `call` of flow `api` has a concurrency limit of 0, but it must be 1 to 1000000"
    );
    let empty_key = step_fn("call")
        .concurrency_per_key("", 2)
        .handler(|input: Value, _ctx: StepContext| async move { Ok(input) });
    assert!(matches!(
        Flow::<Value>::new("api").step(empty_key).try_build(),
        Err(pgflow_core::Error::InvalidLimit { .. })
    ));
    let long_period = step_fn("call")
        .rate_limit(5, Duration::from_secs(86_401))
        .handler(|input: Value, _ctx: StepContext| async move { Ok(input) });
    assert!(
        Flow::<Value>::new("api")
            .step(long_period)
            .try_build()
            .unwrap_err()
            .to_string()
            .ends_with("has a rate period of 86401 seconds, but it must be 1 to 86400 seconds")
    );
}

/// A TypeScript worker's read, then start, of one message of flow `cl`: the number started.
const READ_THEN_START: &str = "SELECT count(*) FROM pgflow.start_tasks('cl', \
     array(SELECT msg_id FROM pgmq.read('cl', 30, 1)), $1)";

/// Two readers under REPEATABLE READ, the second taking its snapshot while the first holds
/// the step's only slot: the second must not count with its stale snapshot and start a task
/// too; it gets a serialization failure (40001) or starts none (issue 22, F4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeatable_read_readers_never_exceed_a_concurrency_limit() {
    let db = database().await;
    let pool = db.pool();
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('cl'); SELECT pgflow.add_step('cl', 's');
         SELECT pgflow.set_concurrency_limit('cl', 's', 1);",
    )
    .execute(pool)
    .await
    .unwrap();
    for i in 0..4 {
        start(pool, "cl", json!({ "i": i })).await;
    }
    let worker_id = register_worker(pool, "cl").await;
    let begin_rr = async || {
        let mut tx = pool.begin().await.expect("begin");
        sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT 1")
            .execute(&mut *tx)
            .await
            .expect("snapshot taken");
        tx
    };
    let mut first = begin_rr().await;
    let started_first: i64 = sqlx::query_scalar(READ_THEN_START)
        .bind(worker_id)
        .fetch_one(&mut *first)
        .await
        .expect("first start");
    assert_eq!(started_first, 1);
    // The second's snapshot predates the first's commit.
    let mut second = begin_rr().await;
    let second_start = tokio::spawn(async move {
        let result: Result<i64, sqlx::Error> = sqlx::query_scalar(READ_THEN_START)
            .bind(worker_id)
            .fetch_one(&mut *second)
            .await;
        (second, result)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.commit().await.expect("first commits");
    let (second, result) = second_start.await.expect("second task");
    match result {
        Ok(started) => {
            assert_eq!(started, 0, "the second started a task past the limit");
            second.commit().await.expect("second commits");
        }
        Err(error) => {
            let code = error
                .as_database_error()
                .and_then(|e| e.code())
                .map(|c| c.into_owned());
            assert_eq!(code.as_deref(), Some("40001"), "{error}");
            second.rollback().await.expect("second rolls back");
        }
    }
    let started: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.step_tasks WHERE status = 'started'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(started, 1);
}
