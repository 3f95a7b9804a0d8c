//! Events: pg_notify on channel `pgflow`, and realtime.send where it exists, with pgflow
//! 0.8.1's keys and values plus the additions docs/sql-api.md lists.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::postgres::PgListener;
use uuid::Uuid;

use super::Engine;

/// The keys of one kind of event: those pgflow 0.8.1 puts in it, and those this engine adds.
struct Shape {
    /// The first cell of its row in docs/sql-api.md's payload table.
    row: &'static str,
    upstream: &'static [&'static str],
    added: &'static [&'static str],
}

impl Shape {
    fn keys(&self) -> BTreeSet<&'static str> {
        self.upstream.iter().chain(self.added).copied().collect()
    }
}

const RUN_STARTED: Shape = Shape {
    row: "`run:started`",
    upstream: &[
        "event_type",
        "run_id",
        "flow_slug",
        "status",
        "started_at",
        "remaining_steps",
        "input",
    ],
    added: &[],
};
const STEP_STARTED: Shape = Shape {
    row: "`step:started`",
    upstream: &[
        "event_type",
        "run_id",
        "step_slug",
        "status",
        "started_at",
        "remaining_tasks",
        "remaining_deps",
    ],
    added: &["flow_slug"],
};
const STEP_COMPLETED: Shape = Shape {
    row: "`step:completed` (after its tasks)",
    upstream: &[
        "event_type",
        "run_id",
        "step_slug",
        "status",
        "completed_at",
        "output",
    ],
    added: &["flow_slug", "started_at", "remaining_tasks"],
};
const EMPTY_STEP_COMPLETED: Shape = Shape {
    row: "`step:completed` (empty map)",
    upstream: &[
        "event_type",
        "run_id",
        "step_slug",
        "status",
        "started_at",
        "completed_at",
        "remaining_tasks",
        "remaining_deps",
        "output",
    ],
    added: &["flow_slug"],
};
const STEP_FAILED: Shape = Shape {
    row: "`step:failed`",
    upstream: &[
        "event_type",
        "run_id",
        "step_slug",
        "status",
        "error_message",
        "failed_at",
    ],
    added: &["flow_slug"],
};
const RUN_COMPLETED: Shape = Shape {
    row: "`run:completed`",
    upstream: &[
        "event_type",
        "run_id",
        "flow_slug",
        "status",
        "completed_at",
        "output",
    ],
    added: &["started_at"],
};
const RUN_FAILED: Shape = Shape {
    row: "`run:failed`",
    upstream: &[
        "event_type",
        "run_id",
        "flow_slug",
        "status",
        "error_message",
        "failed_at",
    ],
    added: &[],
};
const TYPE_VIOLATION_RUN_FAILED: Shape = Shape {
    row: "`run:failed` (type violation)",
    upstream: &["event_type", "run_id", "flow_slug", "status", "failed_at"],
    added: &["error_message"],
};

const STEP_CANCELLED: Shape = Shape {
    row: "`step:cancelled` *(ext 0007)*",
    upstream: &[],
    added: &[
        "event_type",
        "run_id",
        "flow_slug",
        "step_slug",
        "status",
        "cancelled_at",
    ],
};
const RUN_CANCELLED: Shape = Shape {
    row: "`run:cancelled` *(ext 0007)*",
    upstream: &[],
    added: &[
        "event_type",
        "run_id",
        "flow_slug",
        "status",
        "cancelled_at",
    ],
};
const RUN_RETRIED: Shape = Shape {
    row: "`run:retried` *(ext 0007)*",
    upstream: &[],
    added: &[
        "event_type",
        "run_id",
        "flow_slug",
        "status",
        "retry_count",
        "retried_at",
    ],
};

const STEP_SKIPPED: Shape = Shape {
    row: "`step:skipped` *(upstream 0.14, 0010)*",
    upstream: &[],
    added: &[
        "event_type",
        "run_id",
        "flow_slug",
        "step_slug",
        "status",
        "skip_reason",
        "skipped_at",
    ],
};
const STEP_SKIPPED_HANDLER_FAILED: Shape = Shape {
    row: "`step:skipped` (handler failed) *(upstream 0.14, 0010)*",
    upstream: &[],
    added: &[
        "event_type",
        "run_id",
        "flow_slug",
        "step_slug",
        "status",
        "skip_reason",
        "skipped_at",
        "error_message",
    ],
};

const STEP_SUBFLOW_STARTED: Shape = Shape {
    row: "`step:subflow_started` *(ext 0016)*",
    upstream: &[],
    added: &[
        "event_type",
        "run_id",
        "flow_slug",
        "step_slug",
        "task_index",
        "child_run_id",
        "child_flow_slug",
        "depth",
    ],
};

const SHAPES: &[&Shape] = &[
    &RUN_STARTED,
    &STEP_STARTED,
    &STEP_COMPLETED,
    &EMPTY_STEP_COMPLETED,
    &STEP_FAILED,
    &RUN_COMPLETED,
    &RUN_FAILED,
    &TYPE_VIOLATION_RUN_FAILED,
    &STEP_CANCELLED,
    &RUN_CANCELLED,
    &RUN_RETRIED,
    &STEP_SKIPPED,
    &STEP_SKIPPED_HANDLER_FAILED,
    &STEP_SUBFLOW_STARTED,
];

/// Checks one payload: exactly the keys of `shape`, each with the value that `values` or, for
/// a timestamp, `times` gives it.
fn assert_payload(
    payload: &Value,
    shape: &Shape,
    values: Value,
    times: &[(&str, Option<DateTime<Utc>>)],
) {
    assert_eq!(keys_of(payload), shape.keys(), "keys of {payload}");
    let Value::Object(values) = values else {
        panic!("values must be an object")
    };
    for key in shape.keys() {
        match (values.get(key), times.iter().find(|(k, _)| *k == key)) {
            (Some(value), None) => assert_eq!(&payload[key], value, "{key} of {payload}"),
            (None, Some((_, time))) => {
                let sent = DateTime::parse_from_rfc3339(payload[key].as_str().unwrap())
                    .unwrap()
                    .with_timezone(&Utc);
                assert_eq!(Some(sent), *time, "{key} of {payload}");
            }
            _ => panic!("the test gives no single value for {key}"),
        }
    }
}

fn keys_of(payload: &Value) -> BTreeSet<&str> {
    payload
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect()
}

/// `(started_at, completed_at, failed_at)` of a run, or of one of its steps.
async fn times(engine: &Engine, run: Uuid, step: Option<&str>) -> [Option<DateTime<Utc>>; 3] {
    let (started, completed, failed) = sqlx::query_as(match step {
        None => "SELECT started_at, completed_at, failed_at FROM pgflow.runs WHERE run_id = $1",
        Some(_) => {
            "SELECT started_at, completed_at, failed_at FROM pgflow.step_states \
              WHERE run_id = $1 AND step_slug = $2"
        }
    })
    .bind(run)
    .bind(step)
    .fetch_one(engine.pool())
    .await
    .unwrap();
    [started, completed, failed]
}

/// The payload realtime.send got under event name `event` (sent once).
fn payload_of<'a>(sent: &'a [(Value, String, String, bool)], event: &str) -> &'a Value {
    let mut found = sent.iter().filter(|s| s.1 == event);
    let payload = &found.next().unwrap_or_else(|| panic!("no {event}")).0;
    assert!(found.next().is_none(), "{event} sent twice");
    payload
}

/// A flow `f`: `list` (single) -> `each` (map) -> `fin` (single).
async fn list_each_fin(engine: &Engine) {
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
}

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
    list_each_fin(&engine).await;
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
    list_each_fin(&engine).await;
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
        let shape = match payload["event_type"].as_str().unwrap() {
            "run:started" => &RUN_STARTED,
            "step:started" => &STEP_STARTED,
            "step:completed" => &STEP_COMPLETED,
            "run:completed" => &RUN_COMPLETED,
            other => panic!("unexpected {other}"),
        };
        assert_eq!(keys_of(payload), shape.keys(), "{payload}");
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

/// 0.8.1's order for a type violation: run:failed, then step:failed, and nothing after. Its
/// run:failed has no error_message there; ours carries the step's, an addition.
#[tokio::test]
async fn a_type_violation_sends_run_failed_then_step_failed_as_0_8_1_and_nothing_after() {
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
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    engine.exec("TRUNCATE realtime.sent").await;
    let mut listener = listen(&engine).await;
    engine.complete(&tasks[0], json!(42)).await;
    engine.complete(&tasks[1], json!(1)).await;
    let sent = realtime_sent(&engine).await;
    let names: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(names, vec!["run:failed", "step:a:failed"]);
    let message =
        "[TYPE_VIOLATION] Map step m expects array input but dependency a produced number";
    let [_, _, run_failed_at] = times(&engine, run, None).await;
    assert_payload(
        &sent[0].0,
        &TYPE_VIOLATION_RUN_FAILED,
        json!({"event_type": "run:failed", "run_id": run, "flow_slug": "f",
               "status": "failed", "error_message": message}),
        &[("failed_at", run_failed_at)],
    );
    let [_, _, step_failed_at] = times(&engine, run, Some("a")).await;
    assert_payload(
        &sent[1].0,
        &STEP_FAILED,
        json!({"event_type": "step:failed", "run_id": run, "flow_slug": "f", "step_slug": "a",
               "status": "failed", "error_message": message}),
        &[("failed_at", step_failed_at)],
    );
    // Channel pgflow keeps run:failed last: its listeners stop at the event that ends a run.
    assert_eq!(
        summary(&drain(&mut listener).await),
        vec!["step:failed a", "run:failed"]
    );
}

/// A handler's error that reads like a type violation is a plain failure: 0.8.1's order for
/// fail_task, step:failed then run:failed, with the message on both.
#[tokio::test]
async fn a_failure_that_only_reads_like_a_type_violation_keeps_the_order_of_fail_task() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    engine
        .exec("SELECT pgflow.add_step('f', 'm', ARRAY['a'], step_type => 'map')")
        .await;
    engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    engine.exec("TRUNCATE realtime.sent").await;
    let message =
        "[TYPE_VIOLATION] Map step m expects array input but dependency a produced number";
    engine.fail(&tasks[0], message).await;
    let sent = realtime_sent(&engine).await;
    let names: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(names, vec!["step:a:failed", "run:failed"]);
    assert_eq!(sent[1].0["error_message"], json!(message));
}

#[tokio::test]
async fn run_started_carries_remaining_steps_and_every_key_of_0_8_1() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    list_each_fin(&engine).await;
    engine
        .flow("empty", &[("m", &[], "map"), ("after", &["m"], "single")])
        .await;
    engine.exec("SELECT pgflow.create_flow('nothing')").await;
    let mut listener = listen(&engine).await;

    let run = engine.start("f", json!({"in": 1})).await;
    let with_states: Uuid = engine
        .scalar("SELECT (pgflow.start_flow_with_states('f', '[2]') -> 'run' ->> 'run_id')::uuid")
        .await;
    // An empty root map completes at once: remaining_steps is the count as inserted.
    let empty = engine.start("empty", json!([])).await;
    let nothing = engine.start("nothing", json!(null)).await;

    let sent = realtime_sent(&engine).await;
    let started: Vec<&Value> = sent
        .iter()
        .filter(|s| s.1 == "run:started")
        .map(|s| &s.0)
        .collect();
    assert_eq!(started.len(), 4);
    for (payload, run, flow, input, steps) in [
        (started[0], run, "f", json!({"in": 1}), 3),
        (started[1], with_states, "f", json!([2]), 3),
        (started[2], empty, "empty", json!([]), 2),
        (started[3], nothing, "nothing", json!(null), 0),
    ] {
        let [started_at, _, _] = times(&engine, run, None).await;
        assert_payload(
            payload,
            &RUN_STARTED,
            json!({"event_type": "run:started", "run_id": run, "flow_slug": flow,
                   "status": "started", "remaining_steps": steps, "input": input}),
            &[("started_at", started_at)],
        );
    }
    // Channel pgflow: the same without `input`.
    let notified: Vec<Value> = drain(&mut listener)
        .await
        .into_iter()
        .filter(|e| e["event_type"] == "run:started")
        .collect();
    let mut expected = started[0].clone();
    expected.as_object_mut().unwrap().remove("input");
    assert_eq!(notified[0], expected);
}

#[tokio::test]
async fn step_started_carries_every_key_of_0_8_1_for_roots_and_released_steps() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    list_each_fin(&engine).await;
    let run = engine.start("f", json!({})).await;
    engine
        .drain("f", |task| match task.step_slug.as_str() {
            "list" => json!([1, 2, 3]),
            _ => json!(0),
        })
        .await;
    let sent = realtime_sent(&engine).await;
    for (step, tasks) in [("list", 1), ("each", 3), ("fin", 1)] {
        let [started_at, _, _] = times(&engine, run, Some(step)).await;
        assert_payload(
            payload_of(&sent, &format!("step:{step}:started")),
            &STEP_STARTED,
            json!({"event_type": "step:started", "run_id": run, "flow_slug": "f",
                   "step_slug": step, "status": "started", "remaining_tasks": tasks,
                   "remaining_deps": 0}),
            &[("started_at", started_at)],
        );
    }
}

#[tokio::test]
async fn step_completed_and_run_completed_carry_every_key_of_0_8_1() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    list_each_fin(&engine).await;
    let run = engine.start("f", json!({})).await;
    engine
        .drain("f", |task| match task.step_slug.as_str() {
            "list" => json!(["a", "b"]),
            "each" => json!(format!("{}!", task.input.as_str().unwrap())),
            _ => json!({"done": true}),
        })
        .await;
    let sent = realtime_sent(&engine).await;
    for (step, output) in [
        ("list", json!(["a", "b"])),
        ("each", json!(["a!", "b!"])),
        ("fin", json!({"done": true})),
    ] {
        let [started_at, completed_at, _] = times(&engine, run, Some(step)).await;
        assert_payload(
            payload_of(&sent, &format!("step:{step}:completed")),
            &STEP_COMPLETED,
            json!({"event_type": "step:completed", "run_id": run, "flow_slug": "f",
                   "step_slug": step, "status": "completed", "remaining_tasks": 0,
                   "output": output}),
            &[("started_at", started_at), ("completed_at", completed_at)],
        );
    }
    let [started_at, completed_at, _] = times(&engine, run, None).await;
    assert_payload(
        payload_of(&sent, "run:completed"),
        &RUN_COMPLETED,
        json!({"event_type": "run:completed", "run_id": run, "flow_slug": "f",
               "status": "completed", "output": {"fin": {"done": true}}}),
        &[("started_at", started_at), ("completed_at", completed_at)],
    );
}

#[tokio::test]
async fn an_empty_map_completes_with_every_key_of_0_8_1() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    engine
        .flow(
            "f",
            &[
                ("list", &[], "single"),
                ("m", &["list"], "map"),
                ("root", &[], "map"),
            ],
        )
        .await;
    // A root map empty at start (cascade from start_flow), and one a completion empties.
    let run = engine.start("f", json!([])).await;
    engine.drain("f", |_| json!([])).await;
    let sent = realtime_sent(&engine).await;
    for step in ["root", "m"] {
        let [started_at, completed_at, _] = times(&engine, run, Some(step)).await;
        assert_payload(
            payload_of(&sent, &format!("step:{step}:completed")),
            &EMPTY_STEP_COMPLETED,
            json!({"event_type": "step:completed", "run_id": run, "flow_slug": "f",
                   "step_slug": step, "status": "completed", "remaining_tasks": 0,
                   "remaining_deps": 0, "output": []}),
            &[("started_at", started_at), ("completed_at", completed_at)],
        );
    }
}

#[tokio::test]
async fn step_failed_then_run_failed_carry_every_key_of_0_8_1() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let run = engine.start("f", json!({})).await;
    let tasks = engine.poll("f").await;
    engine.exec("TRUNCATE realtime.sent").await;
    engine.fail(&tasks[0], "boom").await;
    let sent = realtime_sent(&engine).await;
    let names: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(names, vec!["step:a:failed", "run:failed"]);
    let [_, _, failed_at] = times(&engine, run, Some("a")).await;
    assert_payload(
        &sent[0].0,
        &STEP_FAILED,
        json!({"event_type": "step:failed", "run_id": run, "flow_slug": "f", "step_slug": "a",
               "status": "failed", "error_message": "boom"}),
        &[("failed_at", failed_at)],
    );
    let [_, _, failed_at] = times(&engine, run, None).await;
    assert_payload(
        &sent[1].0,
        &RUN_FAILED,
        json!({"event_type": "run:failed", "run_id": run, "flow_slug": "f",
               "status": "failed", "error_message": "boom"}),
        &[("failed_at", failed_at)],
    );
}

#[tokio::test]
async fn cancel_and_retry_send_their_events_with_every_documented_key() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    engine
        .exec("SELECT pgflow.create_flow('f', max_attempts => 1)")
        .await;
    engine.exec("SELECT pgflow.add_step('f', 'a')").await;
    let run = engine.start("f", json!({})).await;
    engine.poll("f").await;
    engine.exec("TRUNCATE realtime.sent").await;
    let mut listener = listen(&engine).await;
    engine
        .exec(&format!("SELECT pgflow.cancel_run('{run}')"))
        .await;
    let sent = realtime_sent(&engine).await;
    let names: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(names, vec!["step:a:cancelled", "run:cancelled"]);
    let notified = drain(&mut listener).await;
    assert_eq!(
        summary(&notified),
        vec!["step:cancelled a", "run:cancelled"]
    );
    let cancelled_at: Option<DateTime<Utc>> = engine
        .scalar(&format!(
            "SELECT cancelled_at FROM pgflow.runs WHERE run_id = '{run}'"
        ))
        .await;
    assert_payload(
        &sent[0].0,
        &STEP_CANCELLED,
        json!({"event_type": "step:cancelled", "run_id": run, "flow_slug": "f",
               "step_slug": "a", "status": "cancelled"}),
        &[("cancelled_at", cancelled_at)],
    );
    assert_payload(
        &sent[1].0,
        &RUN_CANCELLED,
        json!({"event_type": "run:cancelled", "run_id": run, "flow_slug": "f",
               "status": "cancelled"}),
        &[("cancelled_at", cancelled_at)],
    );

    engine.exec("TRUNCATE realtime.sent").await;
    engine
        .exec(&format!("SELECT pgflow.retry_run('{run}')"))
        .await;
    let sent = realtime_sent(&engine).await;
    let names: Vec<&str> = sent.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(names, vec!["run:retried", "step:a:started"]);
    let retried_at: Option<DateTime<Utc>> = engine
        .scalar(&format!(
            "SELECT retried_at FROM pgflow_ext.run_retries WHERE run_id = '{run}'"
        ))
        .await;
    assert_payload(
        &sent[0].0,
        &RUN_RETRIED,
        json!({"event_type": "run:retried", "run_id": run, "flow_slug": "f",
               "status": "started", "retry_count": 1}),
        &[("retried_at", retried_at)],
    );
    let [started_at, _, _] = times(&engine, run, Some("a")).await;
    assert_payload(
        &sent[1].0,
        &STEP_STARTED,
        json!({"event_type": "step:started", "run_id": run, "flow_slug": "f", "step_slug": "a",
               "status": "started", "remaining_tasks": 1, "remaining_deps": 0}),
        &[("started_at", started_at)],
    );
}

#[tokio::test]
async fn a_subflow_task_sends_subflow_started_with_every_documented_key() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    engine.flow("child", &[("x", &[], "single")]).await;
    engine.flow("parent", &[("s", &[], "single")]).await;
    engine
        .exec("SELECT pgflow.set_subflow('parent', 's', 'child')")
        .await;
    let run = engine.start("parent", json!({"n": 1})).await;
    let sent = realtime_sent(&engine).await;
    let child: Uuid = engine
        .scalar(&format!(
            "SELECT child_run_id FROM pgflow_ext.subflow_runs WHERE parent_run_id = '{run}'"
        ))
        .await;
    assert_payload(
        payload_of(&sent, "step:s:subflow_started"),
        &STEP_SUBFLOW_STARTED,
        json!({"event_type": "step:subflow_started", "run_id": run, "flow_slug": "parent",
               "step_slug": "s", "task_index": 0, "child_run_id": child,
               "child_flow_slug": "child", "depth": 1}),
        &[],
    );
}

/// docs/sql-api.md's payload table lists the keys these tests check, 0.8.1's and ours apart.
#[test]
fn the_documented_payloads_are_the_shapes_tested_here() {
    let docs = include_str!("../../../docs/sql-api.md");
    let section = &docs[docs.find("### Event payloads").unwrap()..];
    let documented: Vec<(String, BTreeSet<String>, BTreeSet<String>)> = section
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells[1].to_string(), keys_in(cells[3]), keys_in(cells[4]))
        })
        .collect();
    let tested: Vec<(String, BTreeSet<String>, BTreeSet<String>)> = SHAPES
        .iter()
        .map(|shape| {
            let set = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect();
            (shape.row.to_string(), set(shape.upstream), set(shape.added))
        })
        .collect();
    assert_eq!(documented, tested);
}

/// The keys a table cell names: its code spans, without the values in parentheses.
fn keys_in(cell: &str) -> BTreeSet<String> {
    let mut bare = String::new();
    let mut depth = 0;
    for c in cell.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 => bare.push(c),
            _ => {}
        }
    }
    bare.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// What 0005 replaced kept what it had: SECURITY DEFINER (start_flow, since 0004), the
/// settings, and the grants, which the security tests exercise.
#[tokio::test]
async fn the_replaced_functions_keep_their_attributes() {
    let engine = Engine::new().await;
    let rows: Vec<(String, bool, Vec<String>)> = sqlx::query_as(
        "SELECT p.oid::regprocedure::text, p.prosecdef, coalesce(p.proconfig, '{}') \
           FROM pg_proc p \
          WHERE p.oid IN ('pgflow.start_flow(text, jsonb, uuid)'::regprocedure, \
                          'pgflow._emit_all(jsonb[])'::regprocedure, \
                          'pgflow._fail_run(uuid, text, text, text)'::regprocedure, \
                          'pgflow.set_vt_batch(text, bigint[], integer[])'::regprocedure) \
          ORDER BY 1",
    )
    .fetch_all(engine.pool())
    .await
    .unwrap();
    let hot = vec![
        "search_path=\"\"".to_string(),
        "plan_cache_mode=force_generic_plan".to_string(),
        "enable_seqscan=off".to_string(),
        "enable_hashjoin=off".to_string(),
        "enable_mergejoin=off".to_string(),
    ];
    assert_eq!(
        rows,
        vec![
            ("pgflow._emit_all(jsonb[])".to_string(), false, hot.clone()),
            (
                "pgflow._fail_run(uuid,text,text,text)".to_string(),
                false,
                hot.clone()
            ),
            (
                "pgflow.set_vt_batch(text,bigint[],integer[])".to_string(),
                false,
                hot
            ),
            (
                "pgflow.start_flow(text,jsonb,uuid)".to_string(),
                true,
                vec!["search_path=\"\"".to_string()]
            ),
        ]
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

/// `skipped_at` of a step of a run.
async fn skipped_at(engine: &Engine, run: Uuid, step: &str) -> Option<DateTime<Utc>> {
    sqlx::query_scalar(
        "SELECT skipped_at FROM pgflow.step_states WHERE run_id = $1 AND step_slug = $2",
    )
    .bind(run)
    .bind(step)
    .fetch_one(engine.pool())
    .await
    .unwrap()
}

/// Skips by condition (the trigger, then the steps below it in step_index order) and by
/// exhaustion (with the handler's error), each a step:skipped under the event name
/// step:<slug>:skipped, in order among the run's other events.
#[tokio::test]
async fn skipped_steps_send_step_skipped_with_their_reason_in_order() {
    let engine = Engine::new().await;
    fake_realtime(&engine).await;
    engine
        .exec(
            "SELECT pgflow.create_flow('f', max_attempts => 1); \
             SELECT pgflow.add_step('f', 'a', when_exhausted => 'skip'); \
             SELECT pgflow.add_step('f', 'gate', required_input_pattern => '{\"go\": true}', \
                                    when_unmet => 'skip-cascade'); \
             SELECT pgflow.add_step('f', 'below', ARRAY['gate']); \
             SELECT pgflow.add_step('f', 'fin', ARRAY['a']);",
        )
        .await;
    let mut listener = listen(&engine).await;
    let run = engine.start("f", json!({})).await;
    let a = engine.poll("f").await.remove(0);
    engine.fail(&a, "handler broke").await;
    let events = drain(&mut listener).await;
    assert_eq!(
        summary(&events),
        vec![
            "run:started",
            "step:skipped gate",
            "step:skipped below",
            "step:started a",
            "step:skipped a",
            "step:started fin",
        ]
    );
    let sent = realtime_sent(&engine).await;
    for (step, reason) in [("gate", "condition_unmet"), ("below", "dependency_skipped")] {
        assert_payload(
            payload_of(&sent, &format!("step:{step}:skipped")),
            &STEP_SKIPPED,
            json!({"event_type": "step:skipped", "run_id": run, "flow_slug": "f",
                   "step_slug": step, "status": "skipped", "skip_reason": reason}),
            &[("skipped_at", skipped_at(&engine, run, step).await)],
        );
    }
    assert_payload(
        payload_of(&sent, "step:a:skipped"),
        &STEP_SKIPPED_HANDLER_FAILED,
        json!({"event_type": "step:skipped", "run_id": run, "flow_slug": "f",
               "step_slug": "a", "status": "skipped", "skip_reason": "handler_failed",
               "error_message": "handler broke"}),
        &[("skipped_at", skipped_at(&engine, run, "a").await)],
    );
}
