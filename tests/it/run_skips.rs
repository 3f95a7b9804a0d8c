//! What the client reads of skipped steps (migration 0010): typed statuses and reasons in a
//! run's state, stored outputs, and the `step:skipped` event.

use futures_util::TryStreamExt;
use pgflow_client::{EventKind, SkipReason, StepStatus};
use serde_json::json;
use uuid::Uuid;

use crate::support::client;

#[tokio::test]
async fn a_skipped_step_reads_as_skipped_with_its_reason_and_its_event() {
    let (db, client) = client().await;
    let pool = db.pool();
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('gated');
         SELECT pgflow.add_step('gated', 'vip', required_input_pattern => '{\"vip\": true}');
         SELECT pgflow.add_step('gated', 'all');",
    )
    .execute(pool)
    .await
    .unwrap();
    // Subscribed before the start: the skip happens in start_flow itself.
    let subscription = client.subscribe().await.unwrap();
    let run = client
        .start_json("gated", json!({"vip": false}), None)
        .await
        .unwrap();
    let worker: Uuid = sqlx::query_scalar(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name)
         VALUES (gen_random_uuid(), 'gated', 'test') RETURNING worker_id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let started: Vec<String> = sqlx::query_scalar(
        "SELECT t.step_slug FROM pgflow.start_tasks('gated',
                  ARRAY(SELECT msg_id FROM pgmq.read('gated', 60, 10)), $1) t",
    )
    .bind(worker)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(started, ["all"], "the skipped step has no task");
    sqlx::query("SELECT pgflow.complete_task($1, 'all', 0, '[1, 2]')")
        .bind(run.id())
        .execute(pool)
        .await
        .unwrap();

    let events: Vec<_> = subscription
        .run_events(run.id())
        .try_collect()
        .await
        .unwrap();
    let skipped: Vec<_> = events
        .iter()
        .filter(|event| event.kind == EventKind::StepSkipped)
        .collect();
    assert_eq!(skipped.len(), 1, "{events:?}");
    assert_eq!(skipped[0].step_slug.as_deref(), Some("vip"));
    assert_eq!(skipped[0].skip_reason, Some(SkipReason::ConditionUnmet));
    assert!(skipped[0].skipped_at.is_some());
    assert_eq!(skipped[0].to_string(), "step:skipped vip (condition_unmet)");
    assert_eq!(events.last().unwrap().kind, EventKind::RunCompleted);

    let state = client.run_state(run.id()).await.unwrap();
    let step = |slug: &str| state.steps.iter().find(|s| s.step_slug == slug).unwrap();
    assert_eq!(step("vip").status, StepStatus::Skipped);
    assert_eq!(step("vip").skip_reason, Some(SkipReason::ConditionUnmet));
    assert!(step("vip").skipped_at.is_some());
    assert_eq!(step("vip").output, None);
    assert_eq!(step("all").status, StepStatus::Completed);
    assert_eq!(step("all").skip_reason, None);
    assert_eq!(step("all").output, Some(json!([1, 2])));
    let task = &state.tasks[0];
    assert_eq!((task.requeued_count, task.last_requeued_at), (0, None));
    assert_eq!(task.permanently_stalled_at, None);

    // The run's outputs: the completed step's, read from the stored output; none for the
    // skipped one.
    let output = run.wait().await.unwrap();
    assert_eq!(output.output_as::<Vec<u32>>("all").unwrap(), [1, 2]);
    assert!(output.output_as::<u32>("vip").is_err());
    assert_eq!(output.output(), &json!({"all": [1, 2]}));
}

#[tokio::test]
async fn a_stored_output_is_what_the_run_output_reports_even_when_tasks_say_otherwise() {
    // The stored output is the one fact: a task row edited afterwards does not change what
    // the client reports (it used to gather task rows again).
    let (db, client) = client().await;
    let pool = db.pool();
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('stored');
         SELECT pgflow.add_step('stored', 'only');",
    )
    .execute(pool)
    .await
    .unwrap();
    let run = client.start_json("stored", json!({}), None).await.unwrap();
    let worker: Uuid = sqlx::query_scalar(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name)
         VALUES (gen_random_uuid(), 'stored', 'test') RETURNING worker_id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::query(
        "SELECT pgflow.start_tasks('stored', ARRAY(SELECT msg_id FROM pgmq.read('stored', 60, 1)), $1)",
    )
    .bind(worker)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("SELECT pgflow.complete_task($1, 'only', 0, '\"kept\"')")
        .bind(run.id())
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE pgflow.step_tasks SET output = '\"edited\"' WHERE run_id = $1")
        .bind(run.id())
        .execute(pool)
        .await
        .unwrap();
    let output = run.wait().await.unwrap();
    assert_eq!(output.output_as::<String>("only").unwrap(), "kept");
}
