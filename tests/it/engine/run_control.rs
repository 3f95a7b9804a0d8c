//! Run control (migration 0007): `cancel_run`, `retry_run` and their bulk forms, the
//! handler's own retry delay, and the retry policy of a definition, through SQL alone.

use serde_json::json;
use uuid::Uuid;

use super::Engine;

/// `(status, cancelled_at IS NOT NULL, retry_count, remaining_steps)` of a run.
async fn run_row(engine: &Engine, run: Uuid) -> (String, bool, i32, i32) {
    sqlx::query_as(
        "SELECT status, cancelled_at IS NOT NULL, retry_count, remaining_steps \
           FROM pgflow.runs WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap()
}

async fn cancel(engine: &Engine, run: Uuid) -> bool {
    sqlx::query_scalar("SELECT pgflow.cancel_run($1)")
        .bind(run)
        .fetch_one(engine.pool())
        .await
        .unwrap()
}

async fn retry(engine: &Engine, run: Uuid) -> Result<i32, (String, String)> {
    sqlx::query_scalar("SELECT pgflow.retry_run($1)")
        .bind(run)
        .fetch_one(engine.pool())
        .await
        .map_err(|err| {
            let db = err.as_database_error().expect("a database error");
            (
                db.code().unwrap_or_default().to_string(),
                db.message().to_string(),
            )
        })
}

/// A root map `items` over the run input and a single `total` after it, one attempt each.
async fn map_flow(engine: &Engine) {
    engine
        .exec("SELECT pgflow.create_flow('m', max_attempts => 1, base_delay => 0)")
        .await;
    engine
        .exec("SELECT pgflow.add_step('m', 'items', step_type => 'map')")
        .await;
    engine
        .exec("SELECT pgflow.add_step('m', 'total', ARRAY['items'])")
        .await;
}

fn statuses(tasks: &[crate::support::TaskRow]) -> Vec<(&str, i32, &str)> {
    tasks
        .iter()
        .map(|t| (t.step_slug.as_str(), t.task_index, t.status.as_str()))
        .collect()
}

#[tokio::test]
async fn cancel_ends_a_started_run_and_archives_its_messages() {
    let engine = Engine::new().await;
    map_flow(&engine).await;
    let run = engine.start("m", json!([1, 2, 3, 4])).await;
    // Two tasks started and one completed; two still queued.
    let msg_ids: Vec<i64> =
        sqlx::query_scalar("SELECT msg_id FROM pgmq.read('m', 30, 3) ORDER BY msg_id")
            .fetch_all(engine.pool())
            .await
            .unwrap();
    let started = engine.start_tasks("m", &msg_ids).await;
    engine.complete(&started[0], json!(10)).await;

    assert!(cancel(&engine, run).await);

    assert_eq!(
        run_row(&engine, run).await,
        ("cancelled".into(), true, 0, 2)
    );
    assert_eq!(
        statuses(&engine.tasks(run).await),
        vec![
            ("items", 0, "completed"),
            ("items", 1, "cancelled"),
            ("items", 2, "cancelled"),
            ("items", 3, "cancelled"),
        ]
    );
    assert_eq!(engine.step(run, "items").await.0, "cancelled");
    assert_eq!(engine.step(run, "total").await.0, "created");
    assert_eq!(engine.queue_counts("m").await, (0, 4));

    // Idempotent: the second call changes nothing and says so.
    assert!(!cancel(&engine, run).await);
    assert_eq!(
        run_row(&engine, run).await,
        ("cancelled".into(), true, 0, 2)
    );
}

#[tokio::test]
async fn cancel_refuses_an_unknown_run_and_leaves_finished_runs_alone() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    assert_eq!(
        engine
            .error_code(&format!("SELECT pgflow.cancel_run('{}')", Uuid::nil()))
            .await,
        "P0002"
    );
    let run = engine.start("f", json!({})).await;
    engine.drain("f", |_| json!(1)).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"a": 1})))
    );
    assert!(!cancel(&engine, run).await);
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"a": 1})))
    );
}

#[tokio::test]
async fn reports_for_a_cancelled_run_change_nothing() {
    let engine = Engine::new().await;
    engine
        .flow("f", &[("a", &[], "single"), ("b", &[], "single")])
        .await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    assert!(cancel(&engine, run).await);

    // The 0.8.1 forms and the attempt-checked forms alike.
    let rows = engine.complete(&tasks[0], json!("late")).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].output.clone()),
        ("cancelled", None)
    );
    let rows = engine.fail(&tasks[1], "late error").await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].error_message.clone()),
        ("cancelled", None)
    );
    engine
        .exec(&format!(
            "SELECT pgflow.complete_task('{run}', 'a', 0, '1'::jsonb, 1, NULL); \
             SELECT pgflow.fail_task('{run}', 'b', 0, 'x', 1, NULL, false, 5)"
        ))
        .await;

    assert_eq!(
        statuses(&engine.tasks(run).await),
        vec![("a", 0, "cancelled"), ("b", 0, "cancelled")]
    );
    assert_eq!(engine.run(run).await, ("cancelled".into(), None));
    let attempts: i64 = engine
        .scalar("SELECT count(*) FROM pgflow_ext.step_task_attempts")
        .await;
    assert_eq!(attempts, 0);
}

#[tokio::test]
async fn a_message_being_read_during_a_cancel_is_archived_by_its_reader() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    let run = engine.start("f", json!({})).await;

    // A reader holds the message's row lock (as _read_and_start does between its read and
    // its start), so the cancel passes it over instead of waiting for it.
    let mut reader = engine.pool().begin().await.unwrap();
    let msg_id: i64 = sqlx::query_scalar("SELECT msg_id FROM pgmq.q_f FOR UPDATE")
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    let cancelled = tokio::time::timeout(std::time::Duration::from_secs(5), cancel(&engine, run))
        .await
        .expect("cancel does not wait for a reader");
    assert!(cancelled);
    reader.rollback().await.unwrap();
    assert_eq!(engine.queue_counts("f").await, (1, 0));

    // The next read finds the message's task cancelled and archives the message.
    assert!(engine.start_tasks("f", &[msg_id]).await.is_empty());
    assert_eq!(engine.queue_counts("f").await, (0, 1));
}

#[tokio::test]
async fn read_and_start_archives_messages_no_task_needs() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    let cancelled = engine.start("f", json!({})).await;
    let live = engine.start("f", json!({})).await;
    // Leave the cancelled run's message in the queue, as a reader that held it would.
    let mut reader = engine.pool().begin().await.unwrap();
    sqlx::query("SELECT msg_id FROM pgmq.q_f m JOIN pgflow.step_tasks t ON t.message_id = m.msg_id WHERE t.run_id = $1 FOR UPDATE OF m")
        .bind(cancelled)
        .fetch_all(&mut *reader)
        .await
        .unwrap();
    assert!(cancel(&engine, cancelled).await);
    reader.rollback().await.unwrap();

    let started: Vec<Uuid> =
        sqlx::query_scalar("SELECT run_id FROM pgflow._read_and_start('f', 10, 30, $1)")
            .bind(super::WORKER)
            .fetch_all(engine.pool())
            .await
            .unwrap();
    assert_eq!(started, vec![live]);
    // The cancelled run's message is archived; the live one's is hidden, not archived.
    assert_eq!(engine.queue_counts("f").await, (1, 1));
}

#[tokio::test]
async fn retry_resumes_a_failed_map_without_running_completed_tasks_again() {
    let engine = Engine::new().await;
    map_flow(&engine).await;
    let run = engine.start("m", json!([1, 2, 3, 4])).await;
    let tasks = engine.poll("m").await;
    engine.complete(&tasks[0], json!(10)).await;
    engine.complete(&tasks[1], json!(20)).await;
    engine.fail(&tasks[2], "boom").await;
    // Task 3 is still started when the run fails.
    assert_eq!(engine.run(run).await.0, "failed");

    assert_eq!(retry(&engine, run).await, Ok(1));
    assert_eq!(run_row(&engine, run).await, ("started".into(), false, 1, 2));
    let rows = engine.tasks(run).await;
    assert_eq!(
        rows.iter()
            .map(|t| (
                t.task_index,
                t.status.as_str(),
                t.attempts_count,
                t.output.clone()
            ))
            .collect::<Vec<_>>(),
        vec![
            (0, "completed", 1, Some(json!(10))),
            (1, "completed", 1, Some(json!(20))),
            (2, "queued", 0, None),
            (3, "queued", 0, None),
        ]
    );
    assert_eq!(
        engine.step(run, "items").await,
        ("started".into(), Some(2), Some(4), 0)
    );

    // Only the two unfinished tasks run again; the run completes with every output.
    let handled = engine
        .drain("m", |task| match task.step_slug.as_str() {
            "items" => json!((task.task_index + 1) * 10),
            _ => json!("sum"),
        })
        .await;
    assert_eq!(
        handled
            .iter()
            .map(|t| (t.step_slug.as_str(), t.task_index))
            .collect::<Vec<_>>(),
        vec![("items", 2), ("items", 3), ("total", 0)]
    );
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"total": "sum"})))
    );
    crate::support::assert_consistent(engine.pool()).await;
}

#[tokio::test]
async fn retry_keeps_the_history_of_the_run_and_of_its_attempts() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1, base_delay => 0)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let run = engine.start("f", json!({})).await;
    let task = engine.poll("f").await.remove(0);
    engine.fail(&task, "first failure").await;
    assert_eq!(retry(&engine, run).await, Ok(1));
    let task = engine.poll("f").await.remove(0);
    engine.fail(&task, "second failure").await;
    assert!(!cancel(&engine, run).await, "a failed run is not cancelled");
    assert_eq!(retry(&engine, run).await, Ok(2));
    let task = engine.poll("f").await.remove(0);
    assert!(cancel(&engine, run).await);
    let _ = task;
    assert_eq!(retry(&engine, run).await, Ok(3));

    let history: Vec<(i32, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT retry_number, previous_status, failed_step_slug, error_message \
           FROM pgflow_ext.run_retries WHERE run_id = $1 ORDER BY retry_number",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(
        history,
        vec![
            (
                1,
                "failed".into(),
                Some("a".into()),
                Some("first failure".into())
            ),
            (
                2,
                "failed".into(),
                Some("a".into()),
                Some("second failure".into())
            ),
            (3, "cancelled".into(), None, None),
        ]
    );
    let attempts: Vec<(i32, i32, String)> = sqlx::query_as(
        "SELECT run_retry, attempt, error_message FROM pgflow_ext.step_task_attempts \
          WHERE run_id = $1 ORDER BY run_retry, attempt",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(
        attempts,
        vec![
            (0, 1, "first failure".into()),
            (1, 1, "second failure".into())
        ]
    );
}

#[tokio::test]
async fn retry_refuses_started_completed_and_unknown_runs() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    let run = engine.start("f", json!({})).await;
    assert_eq!(
        retry(&engine, run).await,
        Err((
            "55000".into(),
            format!("run {run} is started: only a failed or cancelled run can be retried")
        ))
    );
    engine.drain("f", |_| json!(1)).await;
    assert_eq!(retry(&engine, run).await.unwrap_err().0, "55000");
    assert_eq!(retry(&engine, Uuid::nil()).await.unwrap_err().0, "P0002");
}

#[tokio::test]
async fn a_late_report_of_an_attempt_from_before_the_retry_is_ignored() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1, base_delay => 0)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    engine.exec("SELECT pgflow.add_step('f', 'b')").await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    engine.fail(&tasks[0], "a failed").await;
    // `b` is still running on its first attempt when the run is retried.
    assert_eq!(retry(&engine, run).await, Ok(1));

    // Its late reports, with the attempt and without (a 0.8.1 worker), change nothing.
    engine
        .exec(&format!(
            "SELECT pgflow.complete_task('{run}', 'b', 0, '\"late\"'::jsonb, 1, NULL)"
        ))
        .await;
    let rows = engine.complete(&tasks[1], json!("late")).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].output.clone()),
        ("queued", None)
    );

    let handled = engine.drain("f", |t| json!(t.step_slug)).await;
    assert_eq!(handled.len(), 2);
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"a": "a", "b": "b"})))
    );
}

/// After the retry, another worker starts the task again, on attempt 1 as before the retry:
/// the older execution's reports, naming its own worker, change nothing. (A report naming the
/// worker that started the task again, or none, would be taken: attempts count from 1 again.
/// The Rust worker never sends one: it drops an execution it has started again.)
#[tokio::test]
async fn a_late_report_naming_its_worker_is_ignored_once_another_worker_restarted_the_task() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1, base_delay => 0)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    engine.exec("SELECT pgflow.add_step('f', 'b')").await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    engine.fail(&tasks[0], "a failed").await;
    assert_eq!(retry(&engine, run).await, Ok(1));

    let second = Uuid::from_u128(2);
    engine
        .exec(&format!(
            "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
             VALUES ('{second}', 'f', 'tests')"
        ))
        .await;
    let restarted: Vec<(String, i32)> = sqlx::query_as(
        "SELECT step_slug, attempt FROM pgflow._read_and_start('f', 10, 30, $1) ORDER BY 1",
    )
    .bind(second)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(restarted, vec![("a".into(), 1), ("b".into(), 1)]);

    let first = super::WORKER;
    let ignored: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM pgflow.complete_task($1, 'b', 0, '\"late\"'::jsonb, 1, $2)",
    )
    .bind(run)
    .bind(first)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert!(ignored.is_empty());
    let ignored: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM pgflow.fail_task($1, 'b', 0, 'late', 1, $2, false, NULL::integer)",
    )
    .bind(run)
    .bind(first)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert!(ignored.is_empty());
    let b: (String, i32, Option<serde_json::Value>) = sqlx::query_as(
        "SELECT status, attempts_count, output FROM pgflow.step_tasks \
          WHERE run_id = $1 AND step_slug = 'b'",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(b, ("started".into(), 1, None));
    assert_eq!(engine.run(run).await.0, "started");
}

#[tokio::test]
async fn of_two_retries_at_once_one_wins_and_the_other_is_told() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    for _ in 0..5 {
        let run = engine.start("f", json!({})).await;
        let task = engine.poll("f").await.remove(0);
        engine.fail(&task, "boom").await;
        let (one, two) = tokio::join!(retry(&engine, run), retry(&engine, run));
        let mut results = [one, two];
        results.sort();
        assert_eq!(results[0], Ok(1));
        assert_eq!(
            results[1],
            Err((
                "55000".into(),
                format!("run {run} is started: only a failed or cancelled run can be retried")
            ))
        );
        assert_eq!(
            engine.queue_counts("f").await.0,
            1,
            "one new message, not two"
        );
        let task = engine.poll("f").await.remove(0);
        engine.complete(&task, json!(1)).await;
    }
}

#[tokio::test]
async fn a_retried_cancelled_run_starts_its_waiting_steps_when_their_dependencies_complete() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("a", &[], "single"),
                ("b", &["a"], "single"),
                ("c", &["b"], "single"),
            ],
        )
        .await;
    let run = engine.start("f", json!({"x": 1})).await;
    let a = engine.poll("f").await.remove(0);
    engine.complete(&a, json!("A")).await;
    assert!(cancel(&engine, run).await);
    assert_eq!(engine.step(run, "b").await.0, "cancelled");
    assert_eq!(retry(&engine, run).await, Ok(1));
    assert_eq!(run_row(&engine, run).await, ("started".into(), false, 1, 2));

    let handled = engine
        .drain("f", |t| json!(t.step_slug.to_uppercase()))
        .await;
    assert_eq!(
        handled
            .iter()
            .map(|t| t.step_slug.as_str())
            .collect::<Vec<_>>(),
        vec!["b", "c"]
    );
    assert_eq!(handled[0].input, json!({"run": {"x": 1}, "a": "A"}));
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"c": "C"})))
    );
    crate::support::assert_consistent(engine.pool()).await;
}

#[tokio::test]
async fn bulk_cancel_and_retry_take_the_runs_they_name_in_batches() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let mut runs = Vec::new();
    for _ in 0..7 {
        runs.push(engine.start("f", json!({})).await);
    }
    // The first three started "an hour ago".
    sqlx::query(
        "UPDATE pgflow.runs SET started_at = now() - interval '1 hour' WHERE run_id = ANY($1)",
    )
    .bind(&runs[..3])
    .execute(engine.pool())
    .await
    .unwrap();
    engine
        .exec("UPDATE pgflow.step_states SET created_at = now() - interval '2 hours'")
        .await;
    let cancelled: i32 = engine
        .scalar("SELECT pgflow.cancel_runs('f', now() - interval '1 minute', 2)")
        .await;
    assert_eq!(cancelled, 2);
    let cancelled: i32 = engine
        .scalar("SELECT pgflow.cancel_runs('f', now() - interval '1 minute', 2)")
        .await;
    assert_eq!(cancelled, 1);
    let statuses: Vec<String> =
        sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE run_id = ANY($1) ORDER BY status")
            .bind(&runs)
            .fetch_all(engine.pool())
            .await
            .unwrap();
    assert_eq!(statuses.iter().filter(|s| *s == "cancelled").count(), 3);

    // The four others fail; a bulk retry takes failed runs only, in batches.
    for task in engine.poll("f").await {
        engine.fail(&task, "boom").await;
    }
    let retried: i32 = engine
        .scalar("SELECT pgflow.retry_runs('f', max_runs => 3)")
        .await;
    assert_eq!(retried, 3);
    let retried: i32 = engine
        .scalar("SELECT pgflow.retry_runs('f', max_runs => 3)")
        .await;
    assert_eq!(retried, 1);
    let retried: i32 = engine
        .scalar("SELECT pgflow.retry_runs('f', max_runs => 3)")
        .await;
    assert_eq!(retried, 0);
    let (started, cancelled): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'started'), count(*) FILTER (WHERE status = 'cancelled') \
           FROM pgflow.runs",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!((started, cancelled), (4, 3));

    assert_eq!(
        engine.error_code("SELECT pgflow.cancel_runs('nope')").await,
        "P0002"
    );
    assert_eq!(
        engine
            .error_code("SELECT pgflow.retry_runs('f', max_runs => 0)")
            .await,
        "22023"
    );
}

#[tokio::test]
async fn a_handlers_retry_delay_replaces_the_backoff() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 3, base_delay => 1)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let run = engine.start("f", json!({})).await;
    let task = engine.poll("f").await.remove(0);
    engine
        .exec(&format!(
            "SELECT pgflow.fail_task('{run}', 'a', 0, 'later', 1, NULL, false, 40)"
        ))
        .await;
    let visible_in = engine.visible_in("f", task.msg_id).await;
    assert!((39..=40).contains(&visible_in), "visible in {visible_in} s");
    assert_eq!(
        engine
            .error_code(&format!(
                "SELECT pgflow.fail_task('{run}', 'a', 0, 'x', 1, NULL, false, -1)"
            ))
            .await,
        "22023"
    );
}

#[tokio::test]
async fn max_delay_caps_the_backoff_and_jitter_stays_within_half_of_it() {
    let engine = Engine::new().await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 20, base_delay => 10); \
             SELECT pgflow.add_step('f', 'a'); \
             SELECT pgflow.set_retry_policy('f', NULL, 25, false)",
        )
        .await;
    let run = engine.start("f", json!({})).await;
    let mut delays = Vec::new();
    for _ in 0..4 {
        engine.make_visible("f").await;
        let task = engine.poll("f").await.remove(0);
        engine.fail(&task, "again").await;
        delays.push(engine.visible_in("f", task.msg_id).await);
    }
    assert_eq!(delays, vec![20, 25, 25, 25]);

    // With jitter on the step: each delay d' of a capped d = 25 lies in [13, 25].
    engine
        .exec("SELECT pgflow.set_retry_policy('f', 'a', NULL, true)")
        .await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        engine.make_visible("f").await;
        let task = engine.poll("f").await.remove(0);
        engine.fail(&task, "again").await;
        let d = engine.visible_in("f", task.msg_id).await;
        assert!((12..=25).contains(&d), "jittered delay {d}");
        seen.insert(d);
    }
    assert!(seen.len() > 1, "jitter varies the delay: {seen:?}");
    let _ = run;
    assert_eq!(
        engine
            .error_code("SELECT pgflow.set_retry_policy('f', 'nope', 1, false)")
            .await,
        "P0002"
    );
}

/// A flow whose shape or options change is recompiled only by deleting its runs
/// (`Replace::DeletingRuns`): a failed run of the old definition is then gone, and retrying it
/// says so instead of resuming it against another definition.
#[tokio::test]
async fn a_run_deleted_by_recompiling_its_flow_cannot_be_retried() {
    use pgflow_client::{Client, Replace};
    use pgflow_core::{Flow, StepContext, StepError, step_fn};

    fn flow(max_attempts: u32) -> Flow<serde_json::Value> {
        let only = step_fn("only").max_attempts(max_attempts).handler(
            |v: serde_json::Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) },
        );
        Flow::new("recompiled").step(only).build()
    }

    let engine = Engine::new().await;
    let client = Client::new(engine.pool().clone());
    client.compile(&flow(1)).await.unwrap();
    let run = engine.start("recompiled", json!({})).await;
    let task = engine.poll("recompiled").await.remove(0);
    engine.fail(&task, "boom").await;
    assert_eq!(engine.run(run).await.0, "failed");

    client
        .compile_replacing(&flow(2), Replace::DeletingRuns)
        .await
        .unwrap();
    assert_eq!(retry(&engine, run).await.unwrap_err().0, "P0002");
}
