//! Retention (issue 21): `pgflow.prune_runs` / `prune_data_older_than` and the client's
//! `prune` delete the runs that ended long ago with everything they left behind, never a
//! started run, in batches that workers run alongside; the dry run counts what a prune
//! deletes; the worker's periodic prune runs on one worker at a time; the CLI end to end.

use std::time::Duration;

use pgflow_client::{Client, PRUNE_LOCK_KEY, Worker};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::run_control::{
    assert_no_inconsistency, complete, fail, failed_in_fetch, fetching, pages,
};
use crate::support::{assert_consistent, client, finished_all};

const DAY: Duration = Duration::from_secs(86_400);

/// Moves every time of a run `days` into the past, as if it had run then.
async fn age(pool: &PgPool, run: Uuid, days: i32) {
    sqlx::query(
        "UPDATE pgflow.runs
            SET started_at = started_at - make_interval(days => $2),
                completed_at = completed_at - make_interval(days => $2),
                failed_at = failed_at - make_interval(days => $2),
                cancelled_at = cancelled_at - make_interval(days => $2)
          WHERE run_id = $1",
    )
    .bind(run)
    .bind(days)
    .execute(pool)
    .await
    .unwrap();
}

/// Rows that name one of `runs`: in every table of the engine, the attempt history, the retry
/// history, and the queue and archive of flow `flow` (by the message's run_id).
async fn traces(pool: &PgPool, flow: &str, runs: &[Uuid]) -> [i64; 7] {
    let ids: Vec<String> = runs.iter().map(ToString::to_string).collect();
    let mut out = [0; 7];
    let queries = [
        "SELECT count(*) FROM pgflow.runs WHERE run_id = ANY($1)".to_string(),
        "SELECT count(*) FROM pgflow.step_states WHERE run_id = ANY($1)".to_string(),
        "SELECT count(*) FROM pgflow.step_tasks WHERE run_id = ANY($1)".to_string(),
        "SELECT count(*) FROM pgflow_ext.step_task_attempts WHERE run_id = ANY($1)".to_string(),
        "SELECT count(*) FROM pgflow_ext.run_retries WHERE run_id = ANY($1)".to_string(),
        format!("SELECT count(*) FROM pgmq.q_{flow} WHERE message->>'run_id' = ANY($2)"),
        format!("SELECT count(*) FROM pgmq.a_{flow} WHERE message->>'run_id' = ANY($2)"),
    ];
    for (slot, query) in out.iter_mut().zip(queries) {
        *slot = sqlx::query_scalar(&query)
            .bind(runs)
            .bind(&ids)
            .fetch_one(pool)
            .await
            .unwrap();
    }
    out
}

/// A `pages` run that completed: three pages fetched and saved.
async fn completed(client: &Client) -> Uuid {
    let run = fetching(client).await;
    let pool = client.pool();
    for (index, page) in ["a", "b", "c"].into_iter().enumerate() {
        complete(
            pool,
            run,
            "fetch",
            i32::try_from(index).unwrap(),
            json!(page),
        )
        .await;
    }
    complete(pool, run, "save", 0, json!(["a", "b", "c"])).await;
    run
}

/// Inserts a worker row whose last heartbeat was `days` ago.
async fn worker_row(pool: &PgPool, days: i32) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name, started_at, last_heartbeat_at)
         VALUES ($1, 'pages', 'test', now() - make_interval(days => $2), now() - make_interval(days => $2))",
    )
    .bind(id)
    .bind(days)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn workers(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT worker_id FROM pgflow.workers ORDER BY worker_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn prune_deletes_old_ended_runs_with_everything_they_left_and_keeps_the_rest() {
    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&pages()).await.unwrap();

    // Forty days ago: a completed run, a failed one (with a failed attempt and a message of a
    // task that never ran), a cancelled one, one that failed, was retried and failed again
    // (its first messages are named by no task any more), and one still started.
    let done = completed(&client).await;
    let failed = failed_in_fetch(&client).await;
    let cancelled = fetching(&client).await;
    client.cancel(cancelled).await.unwrap();
    let retried = failed_in_fetch(&client).await;
    client.retry(retried).await.unwrap();
    fail(pool, retried, "fetch", 1, "404 again").await;
    let started = fetching(&client).await;
    complete(pool, started, "fetch", 0, json!("page a")).await;
    let old_ended = [done, failed, cancelled, retried];
    for run in old_ended.into_iter().chain([started]) {
        age(pool, run, 40).await;
    }
    // Young: ended yesterday, and started today.
    let young_done = completed(&client).await;
    age(pool, young_done, 1).await;
    let young_started = fetching(&client).await;
    let kept = [started, young_done, young_started];

    // Workers: one silent for 40 days, one as silent but named by a started task, one alive.
    let silent = worker_row(pool, 40).await;
    let busy = worker_row(pool, 40).await;
    let alive = worker_row(pool, 0).await;
    crate::run_control::take(pool, started, "fetch", 1).await;
    sqlx::query(
        "UPDATE pgflow.step_tasks SET last_worker_id = $1
          WHERE run_id = $2 AND step_slug = 'fetch' AND task_index = 1",
    )
    .bind(busy)
    .bind(started)
    .execute(pool)
    .await
    .unwrap();

    let before = traces(pool, "pages", &old_ended).await;
    assert_eq!(before[0], 4);
    assert!(before[3] >= 3, "failed attempts recorded: {before:?}");
    assert_eq!(before[4], 1, "one retry recorded");
    assert!(before[6] > 0, "archived messages: {before:?}");
    let kept_before = traces(pool, "pages", &kept).await;
    let started_before = traces(pool, "pages", &[started]).await;

    // The dry run counts it all and deletes nothing.
    let would = client.prune_preview(30 * DAY).await.unwrap();
    assert_eq!(
        (would.runs, would.tasks, would.workers, would.batches),
        (4, u64::try_from(before[2]).unwrap(), 1, 0)
    );
    assert_eq!(
        would.messages,
        u64::try_from(before[5] + before[6]).unwrap()
    );
    assert_eq!(traces(pool, "pages", &old_ended).await, before);

    let report = client.prune(30 * DAY).await.unwrap();
    assert_eq!(
        (
            report.runs,
            report.tasks,
            report.messages,
            report.workers,
            report.batches
        ),
        (would.runs, would.tasks, would.messages, would.workers, 1),
        "the prune deletes what the dry run counted"
    );
    assert_eq!(traces(pool, "pages", &old_ended).await, [0; 7]);
    assert_eq!(traces(pool, "pages", &kept).await, kept_before);
    let mut left = vec![busy, alive];
    left.sort();
    assert_eq!(workers(pool).await, left);
    assert!(!workers(pool).await.contains(&silent));
    assert_no_inconsistency(pool).await;

    // Again: nothing left to delete.
    let again = client.prune(30 * DAY).await.unwrap();
    assert_eq!(
        (again.runs, again.tasks, again.messages, again.workers),
        (0, 0, 0, 0)
    );
    // The young ones go at a shorter age; the started ones never.
    let report = client.prune(Duration::ZERO).await.unwrap();
    assert_eq!(report.runs, 1);
    assert_eq!(traces(pool, "pages", &[young_done]).await, [0; 7]);
    assert_eq!(traces(pool, "pages", &[started]).await, started_before);
    let started_left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE status = 'started'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(started_left, 2);
    assert_no_inconsistency(pool).await;
}

#[tokio::test]
async fn the_documented_sql_function_prunes_in_one_call_and_refuses_bad_arguments() {
    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&pages()).await.unwrap();
    let old = completed(&client).await;
    age(pool, old, 40).await;
    let young = completed(&client).await;
    let started = fetching(&client).await;
    age(pool, started, 400).await;

    sqlx::query("SELECT pgflow.prune_data_older_than('30 days')")
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(traces(pool, "pages", &[old]).await, [0; 7]);
    assert_eq!(traces(pool, "pages", &[young]).await[0], 1);
    assert_eq!(traces(pool, "pages", &[started]).await[0], 1);

    for (sql, message) in [
        (
            "SELECT pgflow.prune_data_older_than('-1 day')",
            "retention_interval must be at least 0",
        ),
        (
            "SELECT pgflow.prune_data_older_than(NULL)",
            "retention_interval must be at least 0",
        ),
        (
            "SELECT * FROM pgflow.prune_runs(now(), 0)",
            "max_runs must be at least 1",
        ),
        (
            "SELECT * FROM pgflow.prune_runs(NULL)",
            "older_than must be a time",
        ),
        (
            "SELECT pgflow.prune_workers(now(), 0)",
            "max_workers must be at least 1",
        ),
    ] {
        let err = sqlx::query(sql).execute(pool).await.unwrap_err();
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.code().as_deref(), Some("22023"), "{sql}");
        assert!(db_err.message().contains(message), "{sql}: {db_err}");
    }
    assert_no_inconsistency(pool).await;

    // The functions are the owner's until granted.
    let role = format!("prune_{}", db.name());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role}; GRANT USAGE ON SCHEMA pgflow TO {role}"
    ))
    .execute(pool)
    .await
    .unwrap();
    for sql in [
        "SELECT pgflow.prune_data_older_than('30 days')",
        "SELECT * FROM pgflow.prune_runs(now())",
        "SELECT pgflow.prune_workers(now())",
        "SELECT * FROM pgflow.prune_preview(now())",
    ] {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(&format!("SET LOCAL ROLE {role}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        let err = sqlx::query(sql).execute(&mut *tx).await.unwrap_err();
        let code = err.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
        tx.rollback().await.unwrap();
    }
    sqlx::raw_sql(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn batches_pass_over_a_run_someone_holds_and_take_it_later() {
    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&pages()).await.unwrap();
    let mut runs = Vec::new();
    for _ in 0..7 {
        let run = completed(&client).await;
        age(pool, run, 40).await;
        runs.push(run);
    }

    // A late report holds a task of one of them.
    let held = runs[3];
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'save' FOR NO KEY UPDATE")
        .bind(held)
        .execute(&mut *holder)
        .await
        .unwrap();

    // Batches of 3: 3 + 3 (one passed over) + 0, nobody waits for the held run.
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        pgflow_client::prune(pool, 30 * DAY, 3, Duration::ZERO),
    )
    .await
    .expect("the prune does not wait for the held row")
    .unwrap();
    assert_eq!(report.runs, 6);
    assert_eq!(report.batches, 3);
    assert_eq!(traces(pool, "pages", &[held]).await[0], 1);
    holder.rollback().await.unwrap();

    let report = pgflow_client::prune(pool, 30 * DAY, 3, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!((report.runs, report.batches), (1, 1));
    assert_eq!(traces(pool, "pages", &runs).await, [0; 7]);
    assert_no_inconsistency(pool).await;
}

fn chain() -> Flow<u64> {
    let first = step_fn("first")
        .handler(|n: u64, _ctx: StepContext| async move { Ok::<_, StepError>(n + 1) });
    let second = step_fn("second")
        .depends_on(&first)
        .handler(|_: u64, n: u64, _ctx| async move { Ok::<_, StepError>(n * 2) });
    Flow::new("chain").step(first).step(second).build()
}

#[tokio::test]
async fn prune_while_a_worker_runs_flows_loses_nothing() {
    let (db, client) = client().await;
    let pool = db.pool();
    let flow = chain();
    client.compile(&flow).await.unwrap();
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .concurrency(20)
        .spawn()
        .unwrap();
    let mut old = Vec::new();
    for n in 0..300 {
        old.push(client.start(&flow, &n).await.unwrap().id());
    }
    finished_all(pool, &old, Duration::from_secs(120)).await;
    sqlx::query(
        "UPDATE pgflow.runs SET started_at = started_at - interval '2 hours',
                                completed_at = completed_at - interval '2 hours'",
    )
    .execute(pool)
    .await
    .unwrap();

    // New runs start and run while the old ones are pruned in small batches.
    let starter = {
        let client = client.clone();
        let flow = flow.clone();
        tokio::spawn(async move {
            let mut new = Vec::new();
            for n in 0..300_u64 {
                new.push(client.start(&flow, &n).await.unwrap().id());
            }
            new
        })
    };
    let mut total = 0;
    loop {
        let report = pgflow_client::prune(pool, Duration::from_secs(3600), 20, Duration::ZERO)
            .await
            .unwrap();
        total += report.runs;
        if starter.is_finished() && report.runs == 0 {
            break;
        }
    }
    assert_eq!(total, 300);
    let new = starter.await.unwrap();
    let ended = finished_all(pool, &new, Duration::from_secs(120)).await;
    for (n, (status, output)) in ended.into_iter().enumerate() {
        assert_eq!(status, "completed");
        assert_eq!(output.unwrap()["second"], json!((n + 1) * 2));
    }
    worker.shutdown().await.unwrap();
    assert_eq!(traces(pool, "chain", &old).await, [0; 7]);
    assert_consistent(pool).await;
    // The archive holds the new runs' messages only: two tasks each.
    let archived: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.a_chain")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(archived, 600);
}

#[tokio::test]
async fn the_periodic_prune_runs_on_one_worker_at_a_time() {
    let (db, client) = client().await;
    let pool = db.pool();
    let flow = chain();
    client.compile(&flow).await.unwrap();
    let mut runs = Vec::new();
    let first = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .unwrap();
    for n in 0..20 {
        runs.push(client.start(&flow, &n).await.unwrap().id());
    }
    finished_all(pool, &runs, Duration::from_secs(60)).await;
    first.shutdown().await.unwrap();
    for &run in &runs {
        age(pool, run, 2).await;
    }

    // While someone holds the lock, the workers' turns are skipped.
    let mut holder = pool.begin().await.unwrap();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(PRUNE_LOCK_KEY)
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    assert!(got);
    let pruning: Vec<_> = (0..3)
        .map(|_| {
            Worker::builder(pool.clone())
                .flow(flow.clone())
                .prune_every(Duration::from_millis(100), DAY)
                .spawn()
                .unwrap()
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(traces(pool, "chain", &runs).await[0], 20);
    holder.rollback().await.unwrap();

    crate::support::eventually("the periodic prune", Duration::from_secs(30), async || {
        traces(pool, "chain", &runs).await == [0; 7]
    })
    .await;
    // Runs younger than the age stay.
    let young = client.start(&flow, &7).await.unwrap().id();
    finished_all(pool, &[young], Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(traces(pool, "chain", &[young]).await[0], 1);
    for worker in pruning {
        worker.shutdown().await.unwrap();
    }
    assert_consistent(pool).await;

    // A zero interval is refused.
    let err = Worker::builder(pool.clone())
        .flow(flow)
        .prune_every(Duration::ZERO, DAY)
        .spawn()
        .unwrap_err();
    assert!(err.to_string().contains("prune_every"), "{err}");
}

#[cfg(feature = "cli")]
#[tokio::test]
async fn the_cli_prunes_counts_with_dry_run_and_refuses_a_bad_age() {
    use crate::cli::{pgflow, stdout};

    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&pages()).await.unwrap();
    let old = completed(&client).await;
    age(pool, old, 40).await;
    let young = completed(&client).await;
    let before = traces(pool, "pages", &[old]).await;

    // A bad age: exit status 2, a message naming the problem, nothing deleted.
    for bad in ["30", "30x", "d", "-3d", "1.5h"] {
        let output = pgflow(db.url(), &["prune", "--older-than", bad]);
        assert_eq!(output.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--older-than"), "{bad}: {stderr}");
    }
    assert_eq!(traces(pool, "pages", &[old]).await, before);

    let dry = stdout(&pgflow(
        db.url(),
        &["prune", "--older-than", "30d", "--dry-run"],
    ));
    assert!(dry.starts_with("would delete 1 run ended before "), "{dry}");
    assert!(dry.contains(&format!("{} tasks", before[2])), "{dry}");
    assert_eq!(traces(pool, "pages", &[old]).await, before);
    let json_dry: serde_json::Value = serde_json::from_str(&stdout(&pgflow(
        db.url(),
        &["prune", "--older-than", "720h", "--dry-run", "--json"],
    )))
    .unwrap();
    assert_eq!(json_dry["dry_run"], json!(true));
    assert_eq!(json_dry["runs"], json!(1));
    assert_eq!(json_dry["tasks"], json!(before[2]));
    assert_eq!(json_dry["messages"], json!(before[5] + before[6]));

    let done: serde_json::Value = serde_json::from_str(&stdout(&pgflow(
        db.url(),
        &["prune", "--older-than", "30d", "--json"],
    )))
    .unwrap();
    assert_eq!(done["dry_run"], json!(false));
    assert_eq!(done["runs"], json!(1));
    assert_eq!(traces(pool, "pages", &[old]).await, [0; 7]);
    assert_eq!(traces(pool, "pages", &[young]).await[0], 1);
    let text = stdout(&pgflow(db.url(), &["prune", "--older-than", "0s"]));
    assert!(text.starts_with("deleted 1 run ended before "), "{text}");
    assert!(text.contains("in 1 batch\n"), "{text}");
    assert_eq!(traces(pool, "pages", &[young]).await, [0; 7]);
}
