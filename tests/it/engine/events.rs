//! Events: pg_notify on channel `pgflow`, and realtime.send where it exists.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::PgListener;

use super::Engine;

const REALTIME_KEYS: &[&str] = &[
    "event_type",
    "run_id",
    "flow_slug",
    "step_slug",
    "status",
    "input",
    "output",
    "error_message",
    "started_at",
    "completed_at",
    "failed_at",
    "remaining_tasks",
    "remaining_deps",
];

async fn listen(engine: &Engine) -> PgListener {
    let mut listener = PgListener::connect(engine.url()).await.unwrap();
    listener.listen("pgflow").await.unwrap();
    listener
}

/// Every notification that arrives until the channel is quiet.
async fn drain(listener: &mut PgListener) -> Vec<Value> {
    let mut events = Vec::new();
    while let Ok(Ok(notification)) =
        tokio::time::timeout(Duration::from_millis(500), listener.recv()).await
    {
        assert_eq!(notification.channel(), "pgflow");
        assert!(notification.payload().len() < 8000);
        events.push(serde_json::from_str(notification.payload()).unwrap());
    }
    events
}

fn summary(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e.get("step_slug").and_then(Value::as_str) {
            Some(step) => format!("{} {step}", e["event_type"].as_str().unwrap()),
            None => e["event_type"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// Installs a stand-in for Supabase's realtime.send that records its calls.
async fn fake_realtime(engine: &Engine) {
    engine
        .exec(
            "CREATE SCHEMA realtime; \
             CREATE TABLE realtime.sent (id bigserial, payload jsonb, event text, topic text, private boolean); \
             CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true) \
             RETURNS void LANGUAGE sql AS \
             $$ INSERT INTO realtime.sent (payload, event, topic, private) VALUES (payload, event, topic, private) $$;",
        )
        .await;
}

async fn realtime_sent(engine: &Engine) -> Vec<(Value, String, String, bool)> {
    sqlx::query_as("SELECT payload, event, topic, private FROM realtime.sent ORDER BY id")
        .fetch_all(engine.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_run_notifies_every_state_change_once_in_order_without_outputs() {
    let engine = Engine::new().await;
    engine
        .flow(
            "f",
            &[
                ("list", &[], "single"),
                ("each", &["list"], "map"),
                ("fin", &["each"], "single"),
            ],
        )
        .await;
    let mut listener = listen(&engine).await;
    let run = engine.start("f", json!({"secret": "input"})).await;
    engine
        .drain("f", |task| match task.step_slug.as_str() {
            "list" => json!([1, 2]),
            _ => json!({"big": "output"}),
        })
        .await;
    let events = drain(&mut listener).await;
    assert_eq!(
        summary(&events),
        vec![
            "run:started",
            "step:started list",
            "step:completed list",
            "step:started each",
            "step:completed each",
            "step:started fin",
            "step:completed fin",
            "run:completed",
        ]
    );
    for event in &events {
        assert_eq!(event["run_id"], json!(run));
        assert_eq!(event["flow_slug"], json!("f"));
        assert!(
            event.get("output").is_none() && event.get("input").is_none(),
            "{event}"
        );
        let status = event["status"].as_str().unwrap();
        assert!(
            event["event_type"].as_str().unwrap().ends_with(status),
            "{event}"
        );
        let timestamp = match status {
            "started" => "started_at",
            "completed" => "completed_at",
            _ => "failed_at",
        };
        assert!(event[timestamp].is_string(), "{event}");
    }
    assert_eq!(events[3]["remaining_tasks"], json!(2));
}

#[tokio::test]
async fn failures_notify_step_failed_then_run_failed_with_a_bounded_message() {
    let engine = Engine::new().await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    engine.exec("SELECT pgflow.add_step('f', 'b')").await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    let mut listener = listen(&engine).await;
    let long_error = "x".repeat(20_000);
    engine.fail(&tasks[0], &long_error).await;
    // After the run failed: nothing more is announced.
    engine.complete(&tasks[1], json!(1)).await;
    let events = drain(&mut listener).await;
    assert_eq!(summary(&events), vec!["step:failed a", "run:failed"]);
    for event in &events {
        assert_eq!(event["run_id"], json!(run));
        assert!(event["failed_at"].is_string());
        let message = event["error_message"].as_str().unwrap();
        assert!(message.len() <= 1000 && message.chars().all(|c| c == 'x'));
    }
    // The table keeps the whole message.
    assert_eq!(
        engine.tasks(run).await[0]
            .error_message
            .as_deref()
            .map(str::len),
        Some(20_000)
    );
}

#[tokio::test]
async fn realtime_send_gets_every_event_with_outputs_topic_and_names() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    engine
        .flow(
            "f",
            &[
                ("list", &[], "single"),
                ("each", &["list"], "map"),
                ("fin", &["each"], "single"),
            ],
        )
        .await;
    let run = engine.start("f", json!({"in": 1})).await;
    engine
        .drain("f", |task| match task.step_slug.as_str() {
            "list" => json!(["a", "b"]),
            "each" => json!(format!("{}!", task.input.as_str().unwrap())),
            _ => json!("end"),
        })
        .await;
    let sent = realtime_sent(&engine).await;
    let names: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "run:started",
            "step:list:started",
            "step:list:completed",
            "step:each:started",
            "step:each:completed",
            "step:fin:started",
            "step:fin:completed",
            "run:completed",
        ]
    );
    for (payload, _, topic, private) in &sent {
        assert_eq!(topic, &format!("pgflow:run:{run}"));
        assert!(!private);
        for key in payload.as_object().unwrap().keys() {
            assert!(
                REALTIME_KEYS.contains(&key.as_str()),
                "unexpected key {key}"
            );
        }
    }
    assert_eq!(sent[0].0["input"], json!({"in": 1}));
    assert_eq!(sent[2].0["output"], json!(["a", "b"]));
    assert_eq!(sent[4].0["output"], json!(["a!", "b!"]));
    assert_eq!(sent[7].0["output"], json!({"fin": "end"}));
}

#[tokio::test]
async fn empty_maps_send_one_completed_event_each_parent_before_child() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    engine
        .flow(
            "f",
            &[
                ("list", &[], "single"),
                ("m1", &["list"], "map"),
                ("m2", &["m1"], "map"),
                ("fin", &["m2"], "single"),
            ],
        )
        .await;
    engine.start("f", json!({})).await;
    engine
        .drain("f", |task| {
            if task.step_slug == "list" {
                json!([])
            } else {
                json!(0)
            }
        })
        .await;
    let sent = realtime_sent(&engine).await;
    let names: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "run:started",
            "step:list:started",
            "step:list:completed",
            "step:m1:completed",
            "step:m2:completed",
            "step:fin:started",
            "step:fin:completed",
            "run:completed",
        ]
    );
    assert_eq!(sent[3].0["output"], json!([]));
    assert_eq!(sent[4].0["output"], json!([]));
}

#[tokio::test]
async fn realtime_gets_no_events_after_a_type_violation_failed_the_run() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    engine
        .flow(
            "f",
            &[
                ("a", &[], "single"),
                ("side", &[], "single"),
                ("m", &["a"], "map"),
            ],
        )
        .await;
    engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    engine.exec("TRUNCATE realtime.sent").await;
    engine.complete(&tasks[0], json!(42)).await;
    engine.complete(&tasks[1], json!(1)).await;
    let sent = realtime_sent(&engine).await;
    let names: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(names, vec!["step:a:failed", "run:failed"]);
    assert_eq!(
        sent[0].0["error_message"],
        json!("[TYPE_VIOLATION] Map step m expects array input but dependency a produced number")
    );
}

#[tokio::test]
async fn queueing_tasks_notifies_pgflow_tasks_with_the_flow_slug_once_per_transaction() {
    let engine = Engine::new().await;
    engine
        .flow("wide", &[("a", &[], "single"), ("b", &[], "single")])
        .await;
    engine.flow("idle", &[("only", &[], "single")]).await;
    let mut listener = PgListener::connect(engine.url()).await.unwrap();
    listener.listen("pgflow_tasks").await.unwrap();

    // Two runs of two root steps each, in one transaction: four steps queued, one wake-up.
    engine
        .exec(
            "BEGIN; \
             SELECT pgflow.start_flow('wide', '{}'::jsonb); \
             SELECT pgflow.start_flow('wide', '{}'::jsonb); \
             COMMIT;",
        )
        .await;
    let mut payloads = Vec::new();
    while let Ok(Ok(notification)) =
        tokio::time::timeout(Duration::from_millis(500), listener.recv()).await
    {
        assert_eq!(notification.channel(), "pgflow_tasks");
        payloads.push(notification.payload().to_owned());
    }
    assert_eq!(payloads, vec!["wide"]);

    // Completing a task that releases nothing queues nothing.
    engine.drain("wide", |_| json!(null)).await;
    let quiet = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(quiet.is_err(), "unexpected notification: {quiet:?}");
}
