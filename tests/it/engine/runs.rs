//! Starting runs, step inputs for single steps, completion and leaf outputs, reading.

use serde_json::{Value, json};
use uuid::Uuid;

use super::Engine;

#[tokio::test]
async fn start_flow_creates_the_run_and_one_state_per_step() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("a", &[], "single"),
                ("b", &["a"], "single"),
                ("m", &["a"], "map"),
                ("r", &[], "map"),
            ],
        )
        .await;
    let (run_id, status, remaining): (Uuid, String, i32) = sqlx::query_as(
        "SELECT run_id, status, remaining_steps FROM pgflow.start_flow('f', '[1, 2]')",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!((status.as_str(), remaining), ("started", 4));
    assert_eq!(
        engine.step(run_id, "a").await,
        ("started".into(), Some(1), Some(1), 0)
    );
    assert_eq!(
        engine.step(run_id, "b").await,
        ("created".into(), None, Some(1), 1)
    );
    assert_eq!(
        engine.step(run_id, "m").await,
        ("created".into(), None, None, 1)
    );
    assert_eq!(
        engine.step(run_id, "r").await,
        ("started".into(), Some(2), Some(2), 0)
    );
    // The root steps' messages are in the queue with the documented keys.
    let messages: Vec<Value> = sqlx::query_scalar("SELECT message FROM pgmq.q_f ORDER BY msg_id")
        .fetch_all(engine.pool())
        .await
        .unwrap();
    assert_eq!(
        messages,
        vec![
            json!({"flow_slug": "f", "run_id": run_id, "step_slug": "a", "task_index": 0}),
            json!({"flow_slug": "f", "run_id": run_id, "step_slug": "r", "task_index": 0}),
            json!({"flow_slug": "f", "run_id": run_id, "step_slug": "r", "task_index": 1}),
        ]
    );
    let tasks = engine.tasks(run_id).await;
    assert_eq!(tasks.len(), 3);
    assert!(
        tasks
            .iter()
            .all(|t| t.status == "queued" && t.attempts_count == 0)
    );
}

#[tokio::test]
async fn start_flow_takes_a_custom_run_id() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    let id = Uuid::new_v4();
    let got: Uuid = sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow('f', '{}', $1)")
        .bind(id)
        .fetch_one(engine.pool())
        .await
        .unwrap();
    assert_eq!(got, id);
    let named: Uuid = sqlx::query_scalar(
        "SELECT run_id FROM pgflow.start_flow(flow_slug => 'f', input => '{}', run_id => NULL)",
    )
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_ne!(named, id);
}

#[tokio::test]
async fn a_root_map_refuses_input_that_is_not_an_array() {
    let engine = Engine::new().await;
    engine.flow("f", &[("m", &[], "map")]).await;
    assert_eq!(
        engine
            .error("SELECT pgflow.start_flow('f', '{\"a\": 1}')")
            .await,
        "Flow f has root map steps but input is not an array (got object)"
    );
    assert_eq!(
        engine
            .error_code("SELECT pgflow.start_flow('f', '\"text\"')")
            .await,
        "P0001"
    );
    assert_eq!(
        engine.error("SELECT pgflow.start_flow('f', 'null')").await,
        "Flow f has root map steps but input is not an array (got null)"
    );
    assert_eq!(
        engine.error("SELECT pgflow.start_flow('f', NULL)").await,
        "Flow f has root map steps but input is NULL"
    );
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.runs")
            .await,
        0
    );
}

#[tokio::test]
async fn a_linear_chain_passes_outputs_along_and_completes() {
    let engine = Engine::new().await;
    engine
        .flow(
            "chain",
            &[
                ("a", &[], "single"),
                ("b", &["a"], "single"),
                ("c", &["b"], "single"),
            ],
        )
        .await;
    let run = engine.start("chain", json!({"x": 1})).await;
    let handled = engine
        .drain("chain", |task| json!(format!("{}-out", task.step_slug)))
        .await;
    let inputs: Vec<(String, Value)> = handled
        .iter()
        .map(|t| (t.step_slug.clone(), t.input.clone()))
        .collect();
    assert_eq!(
        inputs,
        vec![
            ("a".into(), json!({"run": {"x": 1}})),
            ("b".into(), json!({"run": {"x": 1}, "a": "a-out"})),
            ("c".into(), json!({"run": {"x": 1}, "b": "b-out"})),
        ]
    );
    assert!(
        handled
            .iter()
            .all(|t| t.flow_slug == "chain" && t.run_id == run && t.task_index == 0)
    );
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"c": "c-out"})))
    );
    let (remaining, completed_after_start): (i32, bool) = sqlx::query_as(
        "SELECT remaining_steps, completed_at >= started_at FROM pgflow.runs WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!((remaining, completed_after_start), (0, true));
    // Every message was archived.
    assert_eq!(engine.queue_counts("chain").await, (0, 3));
}

#[tokio::test]
async fn a_diamond_joins_both_branches() {
    let engine = Engine::new().await;
    engine
        .flow(
            "diamond",
            &[
                ("root", &[], "single"),
                ("left", &["root"], "single"),
                ("right", &["root"], "single"),
                ("join", &["left", "right"], "single"),
            ],
        )
        .await;
    let run = engine.start("diamond", json!(10)).await;

    let roots = engine.poll("diamond").await;
    assert_eq!(roots.len(), 1);
    engine.complete(&roots[0], json!({"n": 1})).await;
    let branches = engine.poll("diamond").await;
    assert_eq!(
        branches
            .iter()
            .map(|t| (t.step_slug.as_str(), t.input.clone()))
            .collect::<Vec<_>>(),
        vec![
            ("left", json!({"run": 10, "root": {"n": 1}})),
            ("right", json!({"run": 10, "root": {"n": 1}})),
        ]
    );
    engine.complete(&branches[0], json!("L")).await;
    // The join waits for both branches.
    assert!(engine.poll("diamond").await.is_empty());
    assert_eq!(engine.step(run, "join").await.3, 1);
    engine.complete(&branches[1], json!("R")).await;
    let join = engine.poll("diamond").await;
    assert_eq!(join[0].input, json!({"run": 10, "left": "L", "right": "R"}));
    engine.complete(&join[0], json!(42)).await;
    assert_eq!(
        engine.run(run).await,
        ("completed".into(), Some(json!({"join": 42})))
    );
}

#[tokio::test]
async fn independent_roots_run_side_by_side_and_all_leaves_form_the_output() {
    let engine = Engine::new().await;
    engine
        .flow(
            "two",
            &[
                ("r1", &[], "single"),
                ("r2", &[], "single"),
                ("after1", &["r1"], "single"),
            ],
        )
        .await;
    let run = engine.start("two", json!("in")).await;
    let first = engine.poll("two").await;
    assert_eq!(
        first
            .iter()
            .map(|t| (t.step_slug.as_str(), t.input.clone()))
            .collect::<Vec<_>>(),
        vec![("r1", json!({"run": "in"})), ("r2", json!({"run": "in"}))]
    );
    for task in &first {
        engine
            .complete(task, json!(task.step_slug.to_uppercase()))
            .await;
    }
    engine
        .drain("two", |task| json!(task.step_slug.to_uppercase()))
        .await;
    assert_eq!(
        engine.run(run).await,
        (
            "completed".into(),
            Some(json!({"r2": "R2", "after1": "AFTER1"}))
        )
    );
}

#[tokio::test]
async fn a_flow_without_steps_completes_at_start() {
    let engine = Engine::new().await;
    engine.exec("SELECT pgflow.create_flow('empty')").await;
    let (status, output): (String, Option<Value>) =
        sqlx::query_as("SELECT status, output FROM pgflow.start_flow('empty', '{}')")
            .fetch_one(engine.pool())
            .await
            .unwrap();
    assert_eq!((status.as_str(), output), ("completed", Some(json!({}))));
}

#[tokio::test]
async fn start_flow_of_an_unknown_flow_fails() {
    let engine = Engine::new().await;
    assert!(
        engine
            .error("SELECT pgflow.start_flow('nope', '{}')")
            .await
            .contains("runs_flow_slug_fkey")
    );
}

#[tokio::test]
async fn complete_task_only_completes_a_started_task_once() {
    let engine = Engine::new().await;
    engine
        .flow("f", &[("a", &[], "single"), ("b", &["a"], "single")])
        .await;
    let run = engine.start("f", json!({})).await;
    // Queued, not started yet: nothing changes.
    let rows = engine.complete_at(run, "a", 0, json!("early")).await;
    assert_eq!(rows[0].status, "queued");
    assert_eq!(rows[0].output, None);

    let task = engine.poll("f").await.remove(0);
    let rows = engine.complete(&task, json!("first")).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].output.clone()),
        ("completed", Some(json!("first")))
    );
    // A duplicate delivery completes nothing twice.
    let rows = engine.complete(&task, json!("second")).await;
    assert_eq!(rows[0].output, Some(json!("first")));
    assert_eq!(engine.step(run, "b").await.0, "started");
    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.step_tasks WHERE step_slug = 'b'")
            .await,
        1
    );
    // An unknown task returns nothing.
    assert!(
        engine
            .complete_at(run, "nope", 0, json!(1))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn get_run_with_states_and_start_flow_with_states_return_run_and_steps() {
    let engine = Engine::new().await;
    engine
        .flow("f", &[("a", &[], "single"), ("b", &["a"], "single")])
        .await;
    let id = Uuid::new_v4();
    let started: Value =
        sqlx::query_scalar("SELECT pgflow.start_flow_with_states('f', '{\"k\": 1}', $1)")
            .bind(id)
            .fetch_one(engine.pool())
            .await
            .unwrap();
    assert_eq!(started["run"]["run_id"], json!(id));
    assert_eq!(started["run"]["status"], json!("started"));
    assert_eq!(started["run"]["input"], json!({"k": 1}));
    let steps = started["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["step_slug"], json!("a"));
    assert_eq!(steps[0]["status"], json!("started"));
    assert_eq!(steps[1]["remaining_deps"], json!(1));

    let read: Value = sqlx::query_scalar("SELECT pgflow.get_run_with_states($1)")
        .bind(id)
        .fetch_one(engine.pool())
        .await
        .unwrap();
    assert_eq!(read, started);
}

#[tokio::test]
async fn poll_for_tasks_is_deprecated_and_returns_nothing() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    engine.start("f", json!({})).await;
    let rows: Vec<super::Task> =
        sqlx::query_as("SELECT * FROM pgflow.poll_for_tasks('f', 30, 10, max_poll_seconds => 1, poll_interval_ms => 10)")
            .fetch_all(engine.pool())
            .await
            .unwrap();
    assert!(rows.is_empty());
    // Its message is untouched: still there for read_with_poll + start_tasks.
    assert_eq!(engine.queue_counts("f").await, (1, 0));
    let polled: Vec<i64> =
        sqlx::query_scalar("SELECT msg_id FROM pgmq.read_with_poll('f', 30, 10, 1, 50)")
            .fetch_all(engine.pool())
            .await
            .unwrap();
    assert_eq!(engine.start_tasks("f", &polled).await.len(), 1);
}

#[tokio::test]
async fn maybe_complete_run_and_start_ready_steps_are_callable_and_harmless() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    let run = engine.start("f", json!({})).await;
    for sql in [
        "SELECT pgflow.maybe_complete_run($1)",
        "SELECT pgflow.start_ready_steps($1)",
        "SELECT pgflow.cascade_complete_taskless_steps($1)",
    ] {
        sqlx::query(sql)
            .bind(run)
            .execute(engine.pool())
            .await
            .unwrap();
    }
    assert_eq!(engine.run(run).await.0, "started");
    assert_eq!(engine.tasks(run).await.len(), 1);
    assert_eq!(engine.queue_counts("f").await, (1, 0));
}

/// How a drain reads and starts tasks: `$1` the flow, `$2` the worker; rows of
/// `(run_id, step_slug, task_index, msg_id)`.
const READ_THEN_START: &str = "SELECT t.run_id, t.step_slug, t.task_index, t.msg_id \
     FROM pgflow.start_tasks($1, ARRAY(SELECT msg_id FROM pgmq.read($1, 30, 100)), $2) t";
/// The Rust worker's read.
const READ_AND_START: &str = "SELECT run_id, step_slug, task_index, msg_id \
     FROM pgflow._read_and_start($1, 10, 30, $2)";

/// Starts a run of `flow` on `conn`, then reads and starts tasks with `read` and completes them
/// on that same connection until none is left; returns the run and how many tasks ran. With
/// `hidden_for`, every started task's message must be hidden for that many seconds.
async fn run_on(
    conn: &mut sqlx::PgConnection,
    flow: &str,
    read: &str,
    hidden_for: Option<i64>,
) -> (Uuid, usize) {
    let run: Uuid = sqlx::query_scalar("SELECT run_id FROM pgflow.start_flow($1, '{}')")
        .bind(flow)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let mut ran = 0;
    loop {
        let tasks: Vec<(Uuid, String, i32, i64)> = sqlx::query_as(read)
            .bind(flow)
            .bind(super::WORKER)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        if tasks.is_empty() {
            return (run, ran);
        }
        for (run_id, step_slug, task_index, msg_id) in tasks {
            if let Some(seconds) = hidden_for {
                let visible_in: i64 = sqlx::query_scalar(&format!(
                    "SELECT round(extract(epoch FROM vt - clock_timestamp()))::bigint \
                       FROM pgmq.q_{flow} WHERE msg_id = $1"
                ))
                .bind(msg_id)
                .fetch_one(&mut *conn)
                .await
                .unwrap();
                assert_eq!(visible_in, seconds, "{step_slug}");
            }
            sqlx::query("SELECT count(*) FROM pgflow.complete_task($1, $2, $3, '1')")
                .bind(run_id)
                .bind(&step_slug)
                .bind(task_index)
                .execute(&mut *conn)
                .await
                .unwrap();
            ran += 1;
        }
    }
}

/// The archive statement is prepared once per session and marked in a setting. Whatever parts
/// the two (DEALLOCATE, RESET after a rolled-back transaction, a queue dropped and created
/// again), the next completion still archives its message.
#[tokio::test]
async fn the_prepared_archive_survives_deallocate_rollback_and_a_recreated_queue() {
    let engine = Engine::new().await;
    engine
        .flow("prep", &[("a", &[], "single"), ("b", &["a"], "single")])
        .await;
    let mut conn = engine.pool().acquire().await.unwrap();
    let mut runs = Vec::new();
    let exec = async |conn: &mut sqlx::PgConnection, sql: &str| {
        sqlx::raw_sql(sql).execute(conn).await.unwrap();
    };

    runs.push(run_on(&mut conn, "prep", READ_THEN_START, None).await);
    let marked: Option<String> =
        sqlx::query_scalar("SELECT current_setting('pgflow.pgflow_archive_prep', true)")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(marked.as_deref(), Some("prepared"));
    assert_eq!(engine.queue_counts("prep").await, (0, 2));

    // Deallocated behind the engine's back: prepared again.
    exec(&mut conn, "DEALLOCATE pgflow_archive_prep").await;
    runs.push(run_on(&mut conn, "prep", READ_THEN_START, None).await);
    assert_eq!(engine.queue_counts("prep").await, (0, 4));

    // Prepared in a transaction that rolls back: the statement stays, its mark does not.
    exec(&mut conn, "DEALLOCATE pgflow_archive_prep; RESET ALL").await;
    exec(
        &mut conn,
        "BEGIN; \
         SELECT pgflow._archive_messages('prep', ARRAY[pgmq.send('prep', '{}')]); \
         ROLLBACK",
    )
    .await;
    runs.push(run_on(&mut conn, "prep", READ_THEN_START, None).await);
    assert_eq!(engine.queue_counts("prep").await, (0, 6));

    // The queue dropped and created again: the statement follows the new tables.
    exec(
        &mut conn,
        "SELECT pgmq.drop_queue('prep'); SELECT pgmq.create('prep')",
    )
    .await;
    runs.push(run_on(&mut conn, "prep", READ_THEN_START, None).await);
    assert_eq!(engine.queue_counts("prep").await, (0, 2));

    // A queue that does not exist gets pgmq's own error, not one about a statement.
    let error = sqlx::query("SELECT pgflow._archive_messages('no_such_queue', ARRAY[1::bigint])")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    let message = error.as_database_error().map(|e| e.message().to_owned());
    assert_eq!(
        message.as_deref(),
        Some("relation \"pgmq.q_no_such_queue\" does not exist")
    );
    drop(conn);

    for (run, ran) in runs {
        assert_eq!(ran, 2);
        assert_eq!(engine.run(run).await.0, "completed");
    }
}

/// create_flow gives each queue its own send and read functions (static SQL, plans cached per
/// session). The engine works the same without them (a queue made by pgmq.create alone), the
/// next create_flow makes them again, and they follow a queue dropped and created again.
#[tokio::test]
async fn the_queue_functions_come_with_create_flow_and_are_optional() {
    let engine = Engine::new().await;
    engine
        .flow("qf", &[("a", &[], "single"), ("b", &["a"], "single")])
        .await;
    let functions = "SELECT coalesce(array_agg(proname::text ORDER BY proname), '{}') \
                       FROM pg_catalog.pg_proc \
                      WHERE pronamespace = 'pgflow'::regnamespace \
                        AND proname IN ('_queue_read_qf', '_queue_send_qf')";
    let both = vec!["_queue_read_qf".to_string(), "_queue_send_qf".to_string()];
    assert_eq!(engine.scalar::<Vec<String>>(functions).await, both);
    // Every started task's message is hidden for the flow's default timeout (60 s) + 2 s.
    let mut conn = engine.pool().acquire().await.unwrap();
    let mut runs = vec![run_on(&mut conn, "qf", READ_AND_START, Some(62)).await];

    engine
        .exec(
            "DROP FUNCTION pgflow._queue_read_qf(text, integer, integer); \
             DROP FUNCTION pgflow._queue_send_qf(timestamptz[], jsonb[])",
        )
        .await;
    assert!(engine.scalar::<Vec<String>>(functions).await.is_empty());
    runs.push(run_on(&mut conn, "qf", READ_AND_START, Some(62)).await);

    engine.exec("SELECT pgflow.create_flow('qf')").await;
    assert_eq!(engine.scalar::<Vec<String>>(functions).await, both);
    runs.push(run_on(&mut conn, "qf", READ_AND_START, Some(62)).await);

    engine
        .exec("SELECT pgmq.drop_queue('qf'); SELECT pgmq.create('qf')")
        .await;
    runs.push(run_on(&mut conn, "qf", READ_AND_START, Some(62)).await);
    drop(conn);

    for (run, ran) in runs {
        assert_eq!(ran, 2);
        assert_eq!(engine.run(run).await.0, "completed");
    }
}
