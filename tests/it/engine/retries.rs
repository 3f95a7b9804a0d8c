//! Failures, retries with backoff, exhaustion, failed runs, visibility timeouts and delays.

use serde_json::json;

use super::Engine;

#[tokio::test]
async fn fail_task_requeues_with_exponential_backoff_until_attempts_run_out() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 3, base_delay => 2)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let run = engine.start("f", json!({})).await;

    for (attempt, delay) in [(1, 4), (2, 8)] {
        let task = engine.poll("f").await.remove(0);
        let rows = engine.fail(&task, &format!("boom {attempt}")).await;
        let row = &rows[0];
        assert_eq!(row.status, "queued");
        assert_eq!(row.attempts_count, attempt);
        assert_eq!(
            row.error_message.as_deref(),
            Some(format!("boom {attempt}").as_str())
        );
        let started_at_cleared: bool = sqlx::query_scalar(
            "SELECT started_at IS NULL FROM pgflow.step_tasks WHERE run_id = $1",
        )
        .bind(run)
        .fetch_one(engine.pool())
        .await
        .unwrap();
        assert!(started_at_cleared);
        // floor(base_delay * 2^attempts_count)
        assert_eq!(engine.visible_in("f", task.msg_id).await, delay);
        assert!(
            engine.poll("f").await.is_empty(),
            "not visible before the delay"
        );
        engine.make_visible("f").await;
    }

    let task = engine.poll("f").await.remove(0);
    assert_eq!(engine.tasks(run).await[0].attempts_count, 3);
    let rows = engine.fail(&task, "final").await;
    assert_eq!(rows[0].status, "failed");
    assert_eq!(engine.run(run).await.0, "failed");
    let (state, error): (String, Option<String>) =
        sqlx::query_as("SELECT status, error_message FROM pgflow.step_states WHERE run_id = $1")
            .bind(run)
            .fetch_one(engine.pool())
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), error.as_deref()),
        ("failed", Some("final"))
    );
    assert_eq!(engine.queue_counts("f").await, (0, 1));
}

#[tokio::test]
async fn step_options_override_flow_options() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 5, base_delay => 1, timeout => 30)")
        .await;
    engine
        .exec("SELECT pgflow.add_step('f', 'a', max_attempts => 2, base_delay => 10, timeout => 7)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'b')").await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    let (a, b) = (&tasks[0], &tasks[1]);
    // Visibility after start_tasks: coalesce(step timeout, flow timeout) + 2.
    assert_eq!(engine.visible_in("f", a.msg_id).await, 9);
    assert_eq!(engine.visible_in("f", b.msg_id).await, 32);

    engine.fail(a, "x").await;
    assert_eq!(engine.visible_in("f", a.msg_id).await, 20);
    engine.fail(b, "x").await;
    assert_eq!(engine.visible_in("f", b.msg_id).await, 2);

    engine.make_visible("f").await;
    let again = engine.poll("f").await;
    let a = again.iter().find(|t| t.step_slug == "a").unwrap();
    // Step a allows two attempts only.
    assert_eq!(engine.fail(a, "x").await[0].status, "failed");
    assert_eq!(engine.run(run).await.0, "failed");
}

#[tokio::test]
async fn zero_max_attempts_fails_at_the_first_error() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 0)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let run = engine.start("f", json!({})).await;
    let task = engine.poll("f").await.remove(0);
    assert_eq!(engine.fail(&task, "no").await[0].status, "failed");
    assert_eq!(engine.run(run).await.0, "failed");
}

#[tokio::test]
async fn exhaustion_fails_step_and_run_and_archives_every_message_of_the_run() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1)")
        .await;
    engine
        .exec("SELECT pgflow.add_step('f', 'm', step_type => 'map')")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'other')").await;
    let run = engine.start("f", json!([1, 2, 3, 4])).await;
    let other_run = engine.start("f", json!([9])).await;
    // Start only two of this run's tasks; the others stay queued.
    let msg_ids: Vec<i64> = sqlx::query_scalar(
        "SELECT message_id FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'm' AND task_index < 2",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    let started = engine.start_tasks("f", &msg_ids).await;
    engine.complete(&started[0], json!("ok")).await;
    let failed = engine.fail(&started[1], "fatal").await;
    assert_eq!(
        (failed[0].status.as_str(), failed[0].attempts_count),
        ("failed", 1)
    );

    let (status, failed_at): (String, bool) =
        sqlx::query_as("SELECT status, failed_at IS NOT NULL FROM pgflow.runs WHERE run_id = $1")
            .bind(run)
            .fetch_one(engine.pool())
            .await
            .unwrap();
    assert_eq!((status.as_str(), failed_at), ("failed", true));
    assert_eq!(engine.step(run, "m").await.0, "failed");
    // The run's five messages are all archived; the other run's two are untouched.
    let left: Vec<String> = sqlx::query_scalar("SELECT message->>'run_id' FROM pgmq.q_f")
        .fetch_all(engine.pool())
        .await
        .unwrap();
    assert_eq!(left, vec![other_run.to_string(), other_run.to_string()]);
    assert_eq!(engine.queue_counts("f").await.1, 5);
    // Nothing of the failed run can be started any more.
    // Its queued tasks are cancelled (pgflow 0.15.1), and cannot be started any more.
    let cancelled: Vec<i64> = sqlx::query_scalar(
        "SELECT message_id FROM pgflow.step_tasks WHERE run_id = $1 AND status = 'cancelled'",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(cancelled.len(), 3);
    assert!(engine.start_tasks("f", &cancelled).await.is_empty());
}

#[tokio::test]
async fn complete_and_fail_on_a_failed_run_change_nothing_but_the_late_task() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    engine.exec("SELECT pgflow.add_step('f', 'b')").await;
    engine.exec("SELECT pgflow.add_step('f', 'c')").await;
    engine
        .exec("SELECT pgflow.add_step('f', 'after', ARRAY['b'])")
        .await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    engine.fail(&tasks[0], "a failed").await;
    assert_eq!(engine.run(run).await.0, "failed");

    // A late completion: the task is cancelled (pgflow 0.15.1), its output not kept, and
    // the step does not move.
    let rows = engine.complete(&tasks[1], json!("late")).await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].output.clone()),
        ("cancelled", None)
    );
    assert_eq!(engine.step(run, "b").await.0, "started");
    assert_eq!(engine.step(run, "after").await.0, "created");

    // A late failure: its task was cancelled with the run's failure, and stays so.
    let rows = engine.fail(&tasks[2], "late error").await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].error_message.as_deref()),
        ("cancelled", None)
    );
    assert_eq!(engine.step(run, "c").await.0, "started");
    let failed_states: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_states WHERE run_id = $1 AND status = 'failed'",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(failed_states, 1);
    let (status, error): (String, Option<String>) = sqlx::query_as(
        "SELECT status, (SELECT error_message FROM pgflow.step_states WHERE run_id = $1 AND status = 'failed') \
         FROM pgflow.runs WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), error.as_deref()),
        ("failed", Some("a failed"))
    );
    assert_eq!(engine.queue_counts("f").await, (0, 3));
}

#[tokio::test]
async fn fail_task_on_a_task_that_is_not_started_changes_nothing() {
    let engine = Engine::new().await;
    engine.flow("f", &[("a", &[], "single")]).await;
    let run = engine.start("f", json!({})).await;
    let rows = engine.fail_at(run, "a", 0, "too early").await;
    assert_eq!(
        (rows[0].status.as_str(), rows[0].error_message.clone()),
        ("queued", None)
    );
    assert_eq!(engine.run(run).await.0, "started");
    assert!(engine.fail_at(run, "a", 7, "unknown").await.is_empty());
}

#[tokio::test]
async fn start_tasks_starts_each_queued_task_once_and_records_the_worker() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', timeout => 5)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let run = engine.start("f", json!({})).await;
    let msg_id: i64 = engine.scalar("SELECT msg_id FROM pgmq.q_f").await;
    let first = engine.start_tasks("f", &[msg_id]).await;
    assert_eq!(first.len(), 1);
    assert_eq!(engine.visible_in("f", msg_id).await, 7);
    // The same message again (a redelivery): the task is started already.
    assert!(engine.start_tasks("f", &[msg_id]).await.is_empty());
    // Another flow's name does not start this flow's tasks.
    engine.exec("SELECT pgflow.create_flow('g')").await;
    assert!(engine.start_tasks("g", &[msg_id]).await.is_empty());
    let (status, attempts, worker, started): (String, i32, Option<uuid::Uuid>, bool) = sqlx::query_as(
        "SELECT status, attempts_count, last_worker_id, started_at IS NOT NULL FROM pgflow.step_tasks WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), attempts, worker, started),
        ("started", 1, Some(super::WORKER), true)
    );
}

#[tokio::test]
async fn a_reappearing_message_of_a_started_task_does_not_start_it_twice() {
    // pgflow 0.8.1 semantics: start_tasks starts queued tasks only, so the message of a task
    // whose handler outlived the visibility timeout reappears but never runs the handler a
    // second time concurrently; the late complete_task (or fail_task) still lands.
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', timeout => 1)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let run = engine.start("f", json!({})).await;
    let first = engine.poll("f").await.remove(0);
    engine.make_visible("f").await;
    assert!(engine.poll("f").await.is_empty());
    assert_eq!(engine.tasks(run).await[0].attempts_count, 1);
    engine.complete(&first, json!("late but fine")).await;
    assert_eq!(engine.run(run).await.0, "completed");
    assert_eq!(engine.queue_counts("f").await, (0, 1));
}

#[tokio::test]
async fn start_delay_delays_the_first_delivery() {
    let engine = Engine::new().await;
    engine.exec("SELECT pgflow.create_flow('f')").await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    engine
        .exec("SELECT pgflow.add_step('f', 'b', ARRAY['a'], start_delay => 30)")
        .await;
    engine
        .exec("SELECT pgflow.add_step('f', 'm', step_type => 'map', start_delay => 15)")
        .await;
    let run = engine.start("f", json!([1, 2])).await;
    let visible = engine.poll("f").await;
    assert_eq!(
        visible
            .iter()
            .map(|t| t.step_slug.as_str())
            .collect::<Vec<_>>(),
        vec!["a"]
    );
    for msg in sqlx::query_scalar::<_, i64>(
        "SELECT message_id FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'm'",
    )
    .bind(run)
    .fetch_all(engine.pool())
    .await
    .unwrap()
    {
        assert_eq!(engine.visible_in("f", msg).await, 15);
    }
    engine.complete(&visible[0], json!(1)).await;
    assert!(engine.poll("f").await.is_empty());
    let b_msg: i64 = sqlx::query_scalar(
        "SELECT message_id FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'b'",
    )
    .bind(run)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    assert_eq!(engine.visible_in("f", b_msg).await, 30);
}

/// The Rust worker's read (`_read_and_start`): each message is hidden for its step's timeout
/// + 2 seconds in the read itself, as start_tasks would set next; a message whose task does not
/// start keeps the visibility pgmq.read gives.
#[tokio::test]
async fn read_and_start_hides_each_message_for_its_steps_timeout_at_once() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', timeout => 10)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    engine
        .exec("SELECT pgflow.add_step('f', 'b', timeout => 20)")
        .await;
    let run = engine.start("f", json!({})).await;
    let stray: i64 = engine
        .scalar("SELECT pgmq.send('f', '{\"not\": \"a task\"}')")
        .await;

    let read = "SELECT step_slug, input, attempt, timeout \
                  FROM pgflow._read_and_start('f', 10, 5, $1) ORDER BY step_slug";
    let started: Vec<(String, serde_json::Value, i32, i32)> = sqlx::query_as(read)
        .bind(super::WORKER)
        .fetch_all(engine.pool())
        .await
        .unwrap();
    assert_eq!(
        started,
        vec![
            ("a".to_string(), json!({"run": {}}), 1, 10),
            ("b".to_string(), json!({"run": {}}), 1, 20),
        ]
    );
    let tasks = engine.tasks(run).await;
    assert!(
        tasks
            .iter()
            .all(|t| t.status == "started" && t.attempts_count == 1)
    );
    assert_eq!(
        engine.visible_in("f", tasks[0].message_id.unwrap()).await,
        12
    );
    assert_eq!(
        engine.visible_in("f", tasks[1].message_id.unwrap()).await,
        22
    );
    // A message no task names is of no use to anyone: archived, not read again forever.
    assert_eq!(
        engine
            .scalar::<i64>(&format!(
                "SELECT count(*) FROM pgmq.a_f WHERE msg_id = {stray}"
            ))
            .await,
        1
    );
    assert_eq!(
        engine
            .scalar::<i64>("SELECT sum(read_ct) FROM pgmq.q_f")
            .await,
        2
    );

    // Nothing visible: nothing read, nothing started.
    let again: Vec<(String, serde_json::Value, i32, i32)> = sqlx::query_as(read)
        .bind(super::WORKER)
        .fetch_all(engine.pool())
        .await
        .unwrap();
    assert!(again.is_empty());

    // A queue that does not exist is PostgreSQL's undefined_table, as pgmq.read gives.
    assert_eq!(
        engine
            .error_code(
                "SELECT * FROM pgflow._read_and_start('missing', 1, 1, \
                 '00000000-0000-0000-0000-000000000001')"
            )
            .await,
        "42P01"
    );
}

/// The queue's own read takes the messages that have been visible longest first, and skips
/// hidden ones whatever their msg_id.
#[tokio::test]
async fn the_queue_read_takes_the_longest_visible_messages_first() {
    let engine = Engine::new().await;
    engine.exec("SELECT pgflow.create_flow('f')").await;
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT * FROM pgmq.send_batch('f', ARRAY['{\"n\": 1}'::jsonb, '{\"n\": 2}', '{\"n\": 3}'])",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    // The first hidden, the third visible for longer than the second.
    sqlx::query(
        "UPDATE pgmq.q_f SET vt = clock_timestamp() + make_interval(secs => (ARRAY[60, -10, -20])[n]) \
           FROM unnest($1::bigint[]) WITH ORDINALITY AS x(id, n) WHERE msg_id = x.id",
    )
    .bind(&ids)
    .execute(engine.pool())
    .await
    .unwrap();

    let read = "SELECT pgflow._queue_read_f('f', 1, 30)";
    let mut order = Vec::new();
    for _ in 0..3 {
        let got: Option<Vec<i64>> = engine.scalar(read).await;
        order.push(got);
    }
    assert_eq!(order, vec![Some(vec![ids[2]]), Some(vec![ids[1]]), None]);
    assert_eq!(engine.visible_in("f", ids[0]).await, 60);
}

#[tokio::test]
async fn set_vt_batch_sets_each_offset_in_one_call() {
    let engine = Engine::new().await;
    engine.exec("SELECT pgmq.create('q')").await;
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT * FROM pgmq.send_batch('q', ARRAY['{}'::jsonb, '{}', '{}'])")
            .fetch_all(engine.pool())
            .await
            .unwrap();
    let rows: Vec<(i64, i32, serde_json::Value, Option<serde_json::Value>, i64)> = sqlx::query_as(
        "SELECT msg_id, read_ct, message, headers, round(extract(epoch FROM vt - clock_timestamp()))::bigint \
           FROM pgflow.set_vt_batch('q', $1, ARRAY[10, 20]) ORDER BY msg_id",
    )
    .bind(&ids[..2])
    .fetch_all(engine.pool())
    .await
    .unwrap();
    assert_eq!(
        rows.iter().map(|r| (r.0, r.4)).collect::<Vec<_>>(),
        vec![(ids[0], 10), (ids[1], 20)]
    );
    assert_eq!(engine.visible_in("q", ids[2]).await, 0);

    assert_eq!(
        engine
            .scalar::<i64>("SELECT count(*) FROM pgflow.set_vt_batch('q', '{}', '{}')")
            .await,
        0
    );
    assert_eq!(
        engine
            .error("SELECT * FROM pgflow.set_vt_batch('q', ARRAY[1, 2]::bigint[], ARRAY[1])")
            .await,
        "msg_ids length (2) must equal vt_offsets length (1)"
    );
    assert_eq!(
        engine
            .error_code(
                "SELECT * FROM pgflow.set_vt_batch('missing', ARRAY[1]::bigint[], ARRAY[1])"
            )
            .await,
        "42P01"
    );
    assert!(
        engine
            .error("SELECT * FROM pgflow.set_vt_batch('missing', ARRAY[1]::bigint[], ARRAY[1])")
            .await
            .contains("pgmq.q_missing")
    );
}

/// pgflow 0.8.1 returns no row when either array is NULL, even for a queue that does not
/// exist (0005; it raised before), and touches no message.
#[tokio::test]
async fn set_vt_batch_returns_no_row_for_a_null_array() {
    let engine = Engine::new().await;
    engine.exec("SELECT pgmq.create('q')").await;
    let id: i64 = engine
        .scalar("SELECT * FROM pgmq.send('q', '{}'::jsonb)")
        .await;
    for call in [
        "pgflow.set_vt_batch('q', NULL, ARRAY[60])",
        "pgflow.set_vt_batch('q', ARRAY[$1], NULL)",
        "pgflow.set_vt_batch('q', NULL, NULL)",
        "pgflow.set_vt_batch('missing', NULL, ARRAY[60])",
        "pgflow.set_vt_batch('missing', ARRAY[$1], NULL)",
    ] {
        let rows: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {call} WHERE $1::bigint IS NOT NULL"
        ))
        .bind(id)
        .fetch_one(engine.pool())
        .await
        .unwrap_or_else(|err| panic!("{call}: {err}"));
        assert_eq!(rows, 0, "{call}");
    }
    assert_eq!(engine.visible_in("q", id).await, 0);
}

/// Makes task `step`/0 of `run` look started `seconds` ago, as if its worker had died then.
async fn age_started_task(engine: &Engine, run: uuid::Uuid, step: &str, seconds: i32) {
    sqlx::query(
        "UPDATE pgflow.step_tasks
            SET queued_at = queued_at - make_interval(secs => $3),
                started_at = started_at - make_interval(secs => $3)
          WHERE run_id = $1 AND step_slug = $2",
    )
    .bind(run)
    .bind(step)
    .bind(f64::from(seconds))
    .execute(engine.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn a_task_whose_worker_died_is_started_again_when_its_message_reappears() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 3, timeout => 5)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let run = engine.start("f", json!({"n": 1})).await;
    let first = engine.poll("f").await.remove(0);
    // The worker dies; its message reappears after timeout + 2 seconds.
    age_started_task(&engine, run, "a", 8).await;
    engine.make_visible("f").await;
    let again = engine.poll("f").await;
    assert_eq!(again.len(), 1, "the lost task is delivered again");
    assert_eq!(again[0].input, first.input);
    let task = engine.tasks(run).await.remove(0);
    assert_eq!((task.status.as_str(), task.attempts_count), ("started", 2));
    engine.complete(&again[0], json!("done")).await;
    assert_eq!(engine.run(run).await.0, "completed");
}

#[tokio::test]
async fn a_lost_task_on_its_last_attempt_fails_the_run_with_a_clear_message() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1, timeout => 5)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let run = engine.start("f", json!({})).await;
    engine.poll("f").await;
    age_started_task(&engine, run, "a", 8).await;
    engine.make_visible("f").await;
    assert!(engine.poll("f").await.is_empty());
    assert_eq!(engine.run(run).await.0, "failed");
    let task = engine.tasks(run).await.remove(0);
    assert_eq!(task.status, "failed");
    assert_eq!(
        task.error_message.as_deref(),
        Some(
            "Task did not finish within its timeout of 5 seconds on attempt 1 (its worker was lost)"
        )
    );
    assert_eq!(engine.queue_counts("f").await, (0, 1));
}
