//! Run control through the client (issue 19): starting a run inside the caller's transaction,
//! cancelling and retrying runs one at a time and in bulk, what waiting, events, the run's
//! state and the checker make of cancelled and retried runs.
//!
//! Tasks are driven through the SQL API where the test needs to hold a run at a given point,
//! and by a real worker where it needs the engine moving on its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use pgflow_client::{
    Cancelled, Client, Error, EventKind, FindingKind, RunStatus, StepStatus, TaskStatus, Worker,
};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{assert_consistent, client, finished_all};

/// `urls` lists pages, `fetch` maps over them (one attempt each), `save` takes them all.
pub fn pages() -> Flow<Value> {
    let urls = step_fn("urls")
        .handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(vec![v]) });
    let fetch = step_fn("fetch")
        .map_over(&urls)
        .max_attempts(1)
        .handler(|v: Value, _ctx| async move { Ok::<_, StepError>(v) });
    let save = step_fn("save")
        .depends_on(&fetch)
        .handler(|_: Value, pages: Vec<Value>, _ctx| async move { Ok::<_, StepError>(pages) });
    Flow::new("pages").step(urls).step(fetch).step(save).build()
}

/// Takes task `index` of `step` as a worker would, for one more attempt.
pub async fn take(pool: &PgPool, run: Uuid, step: &str, index: i32) {
    sqlx::query(
        "UPDATE pgflow.step_tasks
            SET status = 'started', started_at = now(), attempts_count = attempts_count + 1
          WHERE run_id = $1 AND step_slug = $2 AND task_index = $3 AND status = 'queued'",
    )
    .bind(run)
    .bind(step)
    .bind(index)
    .execute(pool)
    .await
    .unwrap();
}

/// Takes a task and completes it with `output`.
pub async fn complete(pool: &PgPool, run: Uuid, step: &str, index: i32, output: Value) {
    take(pool, run, step, index).await;
    sqlx::query("SELECT pgflow.complete_task($1, $2, $3, $4)")
        .bind(run)
        .bind(step)
        .bind(index)
        .bind(output)
        .execute(pool)
        .await
        .unwrap();
}

/// Takes a task and fails its attempt with `error` (the run fails: `fetch` has one attempt).
pub async fn fail(pool: &PgPool, run: Uuid, step: &str, index: i32, error: &str) {
    take(pool, run, step, index).await;
    sqlx::query("SELECT pgflow.fail_task($1, $2, $3, $4)")
        .bind(run)
        .bind(step)
        .bind(index)
        .bind(error)
        .execute(pool)
        .await
        .unwrap();
}

/// A run of `pages` over three pages whose `urls` step is done: `fetch` has three queued tasks.
pub async fn fetching(client: &Client) -> Uuid {
    let run = client
        .start_json("pages", json!("x"), None)
        .await
        .unwrap()
        .id();
    complete(client.pool(), run, "urls", 0, json!(["a", "b", "c"])).await;
    run
}

/// A `pages` run failed in `fetch`: task 0 completed, task 1 failed, task 2 still queued.
pub async fn failed_in_fetch(client: &Client) -> Uuid {
    let run = fetching(client).await;
    complete(client.pool(), run, "fetch", 0, json!("page a")).await;
    fail(client.pool(), run, "fetch", 1, "404 not found").await;
    run
}

/// The checker finds no inconsistency; runs left started with no worker may be stuck.
pub async fn assert_no_inconsistency(pool: &PgPool) {
    let findings = pgflow_client::check(pool).await.expect("check runs");
    let inconsistent: Vec<String> = findings
        .iter()
        .filter(|f| f.kind == FindingKind::Inconsistent)
        .map(ToString::to_string)
        .collect();
    assert!(inconsistent.is_empty(), "{}", inconsistent.join("\n"));
}

/// How many messages the queue of flow `flow` holds.
async fn messages(pool: &PgPool, flow: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM pgmq.q_{flow}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `(step_slug, task_index) -> (status, attempts_count, output)` of the run's tasks.
async fn task_map(client: &Client, run: Uuid) -> HashMap<(String, i32), (TaskStatus, i32, Value)> {
    let state = client.run_state(run).await.unwrap();
    state
        .tasks
        .into_iter()
        .map(|t| {
            (
                (t.step_slug, t.task_index),
                (t.status, t.attempts_count, t.output.unwrap_or(Value::Null)),
            )
        })
        .collect()
}

#[tokio::test]
async fn start_in_a_rolled_back_transaction_leaves_no_run_no_task_and_no_message() {
    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&pages()).await.unwrap();
    sqlx::raw_sql("CREATE TABLE orders (order_id int PRIMARY KEY, run_id uuid)")
        .execute(pool)
        .await
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders (order_id) VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    // `&mut tx` works as `&mut *tx` does.
    let run = client
        .start_in(&mut tx, &pages(), &json!("x"))
        .await
        .unwrap();
    // Inside the transaction, the run is there with its first task and message.
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.step_tasks WHERE run_id = $1")
        .bind(run.id())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(tasks, 1);
    tx.rollback().await.unwrap();

    for table in [
        "pgflow.runs",
        "pgflow.step_states",
        "pgflow.step_tasks",
        "orders",
    ] {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(rows, 0, "{table}");
    }
    assert_eq!(messages(pool, "pages").await, 0);
    assert!(matches!(run.state().await, Err(Error::UnknownRun(id)) if id == run.id()));
}

#[tokio::test]
async fn start_in_a_committed_transaction_runs_and_an_unknown_flow_spoils_nothing() {
    let (db, client) = client().await;
    let pool = db.pool();
    let flow = pages();
    client.compile(&flow).await.unwrap();
    sqlx::raw_sql("CREATE TABLE orders (order_id int PRIMARY KEY, run_id uuid)")
        .execute(pool)
        .await
        .unwrap();

    let mut tx = pool.begin().await.unwrap();
    // An unknown flow is found before anything is written: the transaction goes on.
    let unknown: Flow<Value> = Flow::new("nope")
        .step(
            step_fn("a")
                .handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) }),
        )
        .build();
    let err = client
        .start_in(&mut *tx, &unknown, &json!(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnknownFlow { flow, flows } if flow == "nope" && flows == &["pages"]),
        "{err}"
    );
    let run = client.start_in(&mut *tx, &flow, &json!("x")).await.unwrap();
    sqlx::query("INSERT INTO orders VALUES (1, $1)")
        .bind(run.id())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let worker = Worker::builder(pool.clone()).flow(flow).spawn().unwrap();
    let output = run.wait_timeout(Duration::from_secs(30)).await.unwrap();
    assert_eq!(output.output(), &json!({"save": ["x"]}));
    let stored: Uuid = sqlx::query_scalar("SELECT run_id FROM orders WHERE order_id = 1")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(stored, run.id());
    worker.shutdown().await.unwrap();
    assert_consistent(pool).await;
}

#[tokio::test]
async fn cancel_ends_a_started_run_and_says_so_for_a_finished_one() {
    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&pages()).await.unwrap();
    let run = fetching(&client).await;
    complete(pool, run, "fetch", 0, json!("page a")).await;
    take(pool, run, "fetch", 1).await;
    assert_eq!(messages(pool, "pages").await, 2);
    let waiting = tokio::spawn({
        let handle = client.run(run);
        async move { handle.wait().await }
    });
    let events = client.run(run).events().await.unwrap();

    assert_eq!(client.cancel(run).await.unwrap(), Cancelled::Now);

    let state = client.run_state(run).await.unwrap();
    assert_eq!(state.run.status, RunStatus::Cancelled);
    assert!(state.run.cancelled_at.is_some());
    assert_eq!(state.run.retry_count, 0);
    let steps: Vec<_> = state.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        steps,
        [
            StepStatus::Completed,
            StepStatus::Cancelled,
            StepStatus::Created
        ]
    );
    let tasks = task_map(&client, run).await;
    assert_eq!(tasks[&("fetch".into(), 0)].0, TaskStatus::Completed);
    assert_eq!(tasks[&("fetch".into(), 1)].0, TaskStatus::Cancelled);
    assert_eq!(tasks[&("fetch".into(), 2)].0, TaskStatus::Cancelled);
    assert_eq!(messages(pool, "pages").await, 0, "messages archived");
    assert_no_inconsistency(pool).await;

    // Waiting ends, with the cancellation; the run's events end with run:cancelled.
    let waited = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&waited, Err(Error::RunCancelled { run_id, flow_slug, cancelled_at })
            if *run_id == run && flow_slug == "pages" && *cancelled_at == state.run.cancelled_at),
        "{waited:?}"
    );
    let seen: Vec<_> = tokio::time::timeout(Duration::from_secs(10), events.collect::<Vec<_>>())
        .await
        .unwrap();
    let kinds: Vec<_> = seen
        .iter()
        .map(|e| {
            let e = e.as_ref().unwrap();
            (e.kind, e.step_slug.clone())
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (EventKind::StepCancelled, Some("fetch".to_string())),
            (EventKind::RunCancelled, None)
        ]
    );
    let last = seen.last().unwrap().as_ref().unwrap();
    assert_eq!(last.cancelled_at, state.run.cancelled_at);
    // Once ended, the events are the final one alone.
    let after: Vec<_> = client.run(run).events().await.unwrap().collect().await;
    assert_eq!(after[0].as_ref().unwrap().kind, EventKind::RunCancelled);

    // A late completion of the cancelled task changes nothing.
    sqlx::query("SELECT pgflow.complete_task($1, 'fetch', 1, '\"late\"')")
        .bind(run)
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(task_map(&client, run).await, tasks);

    // Cancelling again, or a completed or failed run, changes nothing and says why.
    assert_eq!(
        client.cancel(run).await.unwrap(),
        Cancelled::AlreadyEnded(RunStatus::Cancelled)
    );
    let failed = failed_in_fetch(&client).await;
    assert_eq!(
        client.cancel(failed).await.unwrap(),
        Cancelled::AlreadyEnded(RunStatus::Failed)
    );
    let unknown = Uuid::new_v4();
    assert!(matches!(client.cancel(unknown).await, Err(Error::UnknownRun(id)) if id == unknown));
    assert_no_inconsistency(pool).await;
}

#[tokio::test]
async fn retry_resumes_a_failed_run_from_its_completed_tasks() {
    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&pages()).await.unwrap();
    let run = failed_in_fetch(&client).await;
    let mut subscription = client.subscribe().await.unwrap();

    assert_eq!(client.retry(run).await.unwrap(), 1);

    let state = client.run_state(run).await.unwrap();
    assert_eq!(state.run.status, RunStatus::Started);
    assert_eq!(state.run.retry_count, 1);
    assert_eq!(state.run.failed_at, None);
    let tasks = task_map(&client, run).await;
    // The completed task keeps its output and attempt; the others are queued afresh.
    assert_eq!(
        tasks[&("fetch".into(), 0)],
        (TaskStatus::Completed, 1, json!("page a"))
    );
    for index in [1, 2] {
        assert_eq!(
            tasks[&("fetch".into(), index)],
            (TaskStatus::Queued, 0, Value::Null)
        );
    }
    assert_eq!(messages(pool, "pages").await, 2);
    assert_no_inconsistency(pool).await;

    // run:retried, then step:started for fetch.
    let retried = subscription.next_event().await.unwrap();
    assert_eq!(retried.kind, EventKind::RunRetried);
    assert_eq!(retried.run_id, run);
    assert_eq!(retried.retry_count, Some(1));
    assert!(retried.retried_at.is_some());
    let started = subscription.next_event().await.unwrap();
    assert_eq!(started.kind, EventKind::StepStarted);
    assert_eq!(started.step_slug.as_deref(), Some("fetch"));
    subscription.close().await;

    // The history keeps how the run had failed.
    let history = client.retry_history(run).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].retry_number, 1);
    assert_eq!(history[0].previous_status, RunStatus::Failed);
    assert_eq!(history[0].failed_step_slug.as_deref(), Some("fetch"));
    assert_eq!(history[0].error_message.as_deref(), Some("404 not found"));

    // A started run cannot be retried.
    let err = client.retry(run).await.unwrap_err();
    assert!(
        matches!(err, Error::NotRetryable { run_id, status: RunStatus::Started } if run_id == run),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("run {run} is started: only a failed or cancelled run can be retried")
    );

    complete(pool, run, "fetch", 1, json!("page b")).await;
    complete(pool, run, "fetch", 2, json!("page c")).await;
    complete(pool, run, "save", 0, json!("saved")).await;
    let output = client.run(run).wait().await.unwrap();
    assert_eq!(
        output.step_outputs()["fetch"],
        json!(["page a", "page b", "page c"])
    );
    // Neither can a completed one.
    assert!(matches!(
        client.retry(run).await,
        Err(Error::NotRetryable {
            status: RunStatus::Completed,
            ..
        })
    ));
    let unknown = Uuid::new_v4();
    assert!(matches!(client.retry(unknown).await, Err(Error::UnknownRun(id)) if id == unknown));
    assert!(matches!(
        client.retry_history(unknown).await,
        Err(Error::UnknownRun(_))
    ));
    assert_no_inconsistency(pool).await;
}

#[tokio::test]
async fn a_cancelled_run_is_retried_and_its_history_tells_both_ends() {
    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&pages()).await.unwrap();
    let run = fetching(&client).await;
    take(pool, run, "fetch", 0).await;
    assert_eq!(client.cancel(run).await.unwrap(), Cancelled::Now);
    let cancelled_at = client
        .run_state(run)
        .await
        .unwrap()
        .run
        .cancelled_at
        .unwrap();

    assert_eq!(client.retry(run).await.unwrap(), 1);
    let state = client.run_state(run).await.unwrap();
    assert_eq!(state.run.status, RunStatus::Started);
    assert_eq!(state.run.cancelled_at, None);
    assert!(
        state
            .tasks
            .iter()
            .filter(|t| t.step_slug == "fetch")
            .all(|t| t.status == TaskStatus::Queued && t.attempts_count == 0)
    );
    assert_no_inconsistency(pool).await;

    // Failed after the retry, and retried again: two rows of history, the failure's with
    // its own attempt numbering (run_retry 1).
    fail(pool, run, "fetch", 2, "timeout").await;
    assert_eq!(client.retry(run).await.unwrap(), 2);
    let history = client.retry_history(run).await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].previous_status, RunStatus::Cancelled);
    assert_eq!(history[0].ended_at, cancelled_at);
    assert_eq!(history[0].failed_step_slug, None);
    assert_eq!(history[1].previous_status, RunStatus::Failed);
    assert_eq!(history[1].error_message.as_deref(), Some("timeout"));
    let attempts: Vec<(i32, i32)> = sqlx::query_as(
        "SELECT run_retry, attempt FROM pgflow_ext.step_task_attempts WHERE run_id = $1",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(attempts, [(1, 1)]);
    assert_eq!(client.run_state(run).await.unwrap().run.retry_count, 2);
    assert_no_inconsistency(pool).await;
}

#[tokio::test]
async fn of_two_concurrent_retries_exactly_one_wins() {
    let (_db, client) = client().await;
    client.compile(&pages()).await.unwrap();
    for _ in 0..10 {
        let run = failed_in_fetch(&client).await;
        let (first, second) = tokio::join!(client.retry(run), client.retry(run));
        let outcomes = [first, second];
        let won = outcomes.iter().filter(|o| matches!(o, Ok(1))).count();
        let refused = outcomes
            .iter()
            .filter(|o| {
                matches!(o, Err(Error::NotRetryable { run_id, status: RunStatus::Started })
                    if *run_id == run)
            })
            .count();
        assert_eq!((won, refused), (1, 1), "{outcomes:?}");
        assert_eq!(client.run_state(run).await.unwrap().run.retry_count, 1);
        assert_eq!(client.retry_history(run).await.unwrap().len(), 1);
    }
    assert_no_inconsistency(client.pool()).await;
}

#[tokio::test]
async fn cancel_all_cancels_the_started_runs_of_a_flow_before_a_time() {
    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&pages()).await.unwrap();
    let old: Vec<Uuid> = futures_util::future::join_all((0..3).map(|_| fetching(&client))).await;
    let failed = failed_in_fetch(&client).await;
    let boundary: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .unwrap();
    let new = fetching(&client).await;

    assert_eq!(client.cancel_all("pages", Some(boundary)).await.unwrap(), 3);
    for run in &old {
        assert_eq!(
            client.run_state(*run).await.unwrap().run.status,
            RunStatus::Cancelled
        );
    }
    assert_eq!(
        client.run_state(new).await.unwrap().run.status,
        RunStatus::Started
    );
    assert_eq!(
        client.run_state(failed).await.unwrap().run.status,
        RunStatus::Failed
    );

    assert_eq!(client.cancel_all("pages", None).await.unwrap(), 1);
    assert_eq!(
        client.run_state(new).await.unwrap().run.status,
        RunStatus::Cancelled
    );
    assert_eq!(client.cancel_all("pages", None).await.unwrap(), 0);
    let err = client.cancel_all("nope", None).await.unwrap_err();
    assert!(
        matches!(&err, Error::UnknownFlow { flow, .. } if flow == "nope"),
        "{err}"
    );
    assert_no_inconsistency(pool).await;
}

/// One step that fails unless `fixed` is set; input `n` with `n % 5 == 0` fails always.
fn flaky(fixed: Arc<AtomicBool>) -> Flow<u32> {
    let work = step_fn("work")
        .max_attempts(1)
        .handler(move |n: u32, _ctx: StepContext| {
            let fixed = fixed.load(Ordering::SeqCst);
            async move {
                if fixed && !n.is_multiple_of(5) {
                    Ok(n)
                } else {
                    Err(StepError::new(format!("{n} failed")))
                }
            }
        });
    Flow::new("flaky").step(work).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_all_retries_250_failed_runs_in_batches_while_a_worker_runs() {
    let (db, client) = client().await;
    let pool = db.pool();
    let fixed = Arc::new(AtomicBool::new(false));
    let flow = flaky(fixed.clone());
    client.compile(&flow).await.unwrap();
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .concurrency(20)
        .spawn()
        .unwrap();
    let mut runs = Vec::new();
    for n in 0..250 {
        runs.push(client.start(&flow, &n).await.unwrap().id());
    }
    let ended = finished_all(pool, &runs, Duration::from_secs(120)).await;
    assert!(ended.iter().all(|(status, _)| status == "failed"));

    // Nothing failed since a time to come; an unknown flow is an error.
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    assert_eq!(client.retry_all("flaky", Some(later)).await.unwrap(), 0);
    assert!(matches!(
        client.retry_all("nope", None).await,
        Err(Error::UnknownFlow { .. })
    ));

    // The fix is deployed; one run in five still fails, at once, while the bulk retry goes on:
    // it is not taken a second time.
    fixed.store(true, Ordering::SeqCst);
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    assert_eq!(client.retry_all("flaky", Some(since)).await.unwrap(), 250);
    let ended = finished_all(pool, &runs, Duration::from_secs(120)).await;
    for (n, (status, _)) in ended.iter().enumerate() {
        let expected = if n.is_multiple_of(5) {
            "failed"
        } else {
            "completed"
        };
        assert_eq!(status, expected, "run {n}");
    }
    let counts: Vec<(i32, i64)> =
        sqlx::query_as("SELECT retry_count, count(*) FROM pgflow.runs GROUP BY 1 ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(counts, [(1, 250)]);
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow_ext.run_retries")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(history, 250);
    worker.shutdown().await.unwrap();
    assert_consistent(pool).await;
}

#[tokio::test]
async fn check_finds_what_contradicts_a_cancelled_run_and_no_stuck_one() {
    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&pages()).await.unwrap();
    // No worker serves the flow: a started run would be stuck, a cancelled one is not.
    let run = fetching(&client).await;
    let stuck = client.check().await.unwrap();
    assert!(
        stuck.iter().all(|f| f.kind == FindingKind::Stuck),
        "{stuck:?}"
    );
    assert!(!stuck.is_empty());
    client.cancel(run).await.unwrap();
    assert_no_inconsistency(pool).await;

    // A message of a cancelled task still in the queue (as one a worker was reading while the
    // cancel ran): harmless, not a finding, and archived by the next read.
    let msg_id: i64 = sqlx::query_scalar(
        "SELECT * FROM pgmq.send('pages', jsonb_build_object('flow_slug', 'pages', \
         'run_id', $1::uuid, 'step_slug', 'fetch', 'task_index', 1))",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_no_inconsistency(pool).await;
    let started: Vec<Uuid> =
        sqlx::query_scalar("SELECT run_id FROM pgflow._read_and_start('pages', 10, 30, NULL)")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(started.is_empty());
    let archived: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.a_pages WHERE msg_id = $1")
        .bind(msg_id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(archived, 1);

    // A hand edit: a task of the cancelled run queued again.
    sqlx::query(
        "UPDATE pgflow.step_tasks SET status = 'queued' \
          WHERE run_id = $1 AND step_slug = 'fetch' AND task_index = 0",
    )
    .bind(run)
    .execute(pool)
    .await
    .unwrap();
    let findings = client.check().await.unwrap();
    let rules: Vec<(&str, Option<i32>)> = findings.iter().map(|f| (f.rule, f.task_index)).collect();
    assert!(rules.contains(&("cancelled_run", Some(0))), "{findings:#?}");
    assert!(
        findings.iter().all(|f| f.kind == FindingKind::Inconsistent),
        "{findings:#?}"
    );

    // A cancelled step in a started run.
    let other = fetching(&client).await;
    sqlx::query(
        "UPDATE pgflow.step_states SET status = 'cancelled' WHERE run_id = $1 AND step_slug = 'fetch'",
    )
    .bind(other)
    .execute(pool)
    .await
    .unwrap();
    let findings = client.check().await.unwrap();
    assert!(
        findings
            .iter()
            .any(|f| f.rule == "cancelled_outside_cancelled_run" && f.run_id == other),
        "{findings:#?}"
    );
}
