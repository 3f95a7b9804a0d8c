//! Bad input, each refused with a clear error or failing only its own task: invalid and reserved
//! slugs, unknown flows and steps, inputs that do not decode, outputs that do not encode, a
//! non-array input to a root map, very large inputs and outputs, and SQL injection attempts.

use std::collections::HashMap;
use std::time::Duration;

use pgflow_client::{Error, Worker};
use pgflow_core::{Flow, StepContext, StepError, step_fn};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::support::{assert_consistent, client, finished_all, start, step_error};

const INJECTION: &str = "x'); DROP TABLE pgflow.runs; --";

async fn tables_intact(pool: &PgPool) {
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'pgflow'")
            .fetch_one(pool)
            .await
            .expect("tables");
    assert_eq!(tables, 7, "all seven pgflow tables are still there");
}

fn echo_flow(slug: &str) -> Flow<Value> {
    let echo = step_fn("echo")
        .handler(|input: Value, _ctx: StepContext| async move { Ok::<_, StepError>(input) });
    Flow::new(slug).step(echo).build()
}

#[tokio::test]
async fn invalid_and_reserved_slugs_are_refused_before_any_sql() {
    let (db, client) = client().await;
    let cases: [(&str, &str); 5] = [
        (
            "run",
            "invalid flow slug \"run\": `run` is reserved: it is the key under which steps receive the flow input",
        ),
        ("", "invalid flow slug \"\": a slug cannot be empty"),
        (
            "2fast",
            "invalid flow slug \"2fast\": a slug starts with an ASCII letter or `_`, not '2'",
        ),
        (
            "with-dash",
            "invalid flow slug \"with-dash\": a slug contains only ASCII letters, digits and `_`, not '-'",
        ),
        (
            INJECTION,
            "invalid flow slug \"x'); DROP TABLE pgflow.runs; --\": a slug contains only ASCII letters, digits and `_`, not '\\''",
        ),
    ];
    for (slug, message) in cases {
        let flow = echo_flow(slug);
        assert_eq!(flow.to_sql().expect_err(slug).to_string(), message);
        let error = client.compile(&flow).await.expect_err(slug);
        assert!(matches!(error, Error::Flow(_)), "{error:?}");
        assert_eq!(error.to_string(), message);
    }
    let long = "a".repeat(129);
    let error = client.compile(&echo_flow(&long)).await.expect_err("long");
    assert!(
        error
            .to_string()
            .ends_with("a slug has at most 128 characters, this one has 129"),
        "{error}"
    );

    // A step slug too, reserved or crafted.
    for (slug, problem) in [
        ("run", "`run` is reserved"),
        ("a b", "not ' '"),
        ("s'; DELETE FROM pgflow.flows; --", "not '\\''"),
    ] {
        let step =
            step_fn(slug).handler(|n: u32, _ctx: StepContext| async move { Ok::<_, StepError>(n) });
        let flow: Flow<u32> = Flow::new("fine").step(step).build();
        let error = client.compile(&flow).await.expect_err(slug);
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("invalid step slug {slug:?} in flow `fine`"))
                && text.contains(problem),
            "{text}"
        );
    }
    // Nothing reached the database.
    let flows: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.flows")
        .fetch_one(db.pool())
        .await
        .expect("flows");
    assert_eq!(flows, 0);
    tables_intact(db.pool()).await;
}

#[tokio::test]
async fn crafted_slugs_sent_straight_to_the_engine_are_bound_values_and_refused() {
    let (db, client) = client().await;
    let pool = db.pool();
    // The engine's own check, for callers that bypass the Rust validation.
    let error = sqlx::query("SELECT pgflow.create_flow($1)")
        .bind(INJECTION)
        .execute(pool)
        .await
        .expect_err("refused");
    let message = error
        .as_database_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("slug_is_valid"), "{message}");
    // Unknown flow, by a crafted name: a plain "not there".
    let error = client
        .start_json(INJECTION, json!({}), None)
        .await
        .expect_err("unknown");
    assert_eq!(
        error.to_string(),
        "flow `x'); DROP TABLE pgflow.runs; --` is not in the database (compile it first); flows there: []"
    );
    // A worker refuses a crafted slug before it sends anything.
    let error = Worker::builder(pool.clone())
        .handler(
            INJECTION,
            "echo",
            |input: Value, _ctx| async move { Ok(input) },
        )
        .spawn()
        .expect_err("refused");
    assert!(
        error
            .to_string()
            .starts_with("worker handler for flow `x'); DROP TABLE pgflow.runs; --`: invalid slug"),
        "{error}"
    );
    tables_intact(pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_crafted_to_inject_sql_round_trips_unchanged() {
    let (db, client) = client().await;
    let pool = db.pool();
    let flow = echo_flow("echo_json");
    client.compile(&flow).await.expect("compile");
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");
    let nasty = json!({
        "quote": "it's \"quoted\"",
        "drop": INJECTION,
        "dollars": "$$; DROP TABLE pgflow.runs; $$",
        "tagged": "$tag$ SELECT 1 $tag$",
        "backslash": "C:\\path\\'\\\\",
        "comment": "/* -- */",
        "unicode": "ünïcødé ✓ \u{1F600}",
        "nested": {"'); --": ["$$", "''", null, 1.5, true]},
    });
    let run = client
        .start_json("echo_json", nasty.clone(), None)
        .await
        .expect("start");
    let output = run
        .wait_timeout(Duration::from_secs(30))
        .await
        .expect("run");
    assert_eq!(output.output(), &json!({ "echo": nasty }));
    let stored: Value = sqlx::query_scalar("SELECT input FROM pgflow.runs WHERE run_id = $1")
        .bind(run.id())
        .fetch_one(pool)
        .await
        .expect("input");
    assert_eq!(stored, nasty);
    tables_intact(pool).await;
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_flows_and_steps_are_named_in_the_error() {
    let (db, client) = client().await;
    let pool = db.pool();
    client.compile(&echo_flow("known")).await.expect("compile");
    let error = client
        .start_json("unknown", json!(1), None)
        .await
        .expect_err("unknown flow");
    assert!(matches!(error, Error::UnknownFlow { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "flow `unknown` is not in the database (compile it first); flows there: [known]"
    );

    // The untyped door: a flow compiled in SQL, a handler for a step it does not have, and none
    // for a step it has.
    sqlx::raw_sql(
        "SELECT pgflow.create_flow('door', max_attempts => 1);\n\
         SELECT pgflow.add_step('door', 'there');\n",
    )
    .execute(pool)
    .await
    .expect("flow");
    let worker = Worker::builder(pool.clone())
        .handler("door", "elsewhere", |input: Value, _ctx| async move {
            Ok(input)
        })
        .spawn()
        .expect("worker");
    let run = start(pool, "door", json!({})).await;
    let (status, _) = finished_all(pool, &[run], Duration::from_secs(30)).await[0].clone();
    assert_eq!(status, "failed");
    assert_eq!(
        step_error(pool, run, "there").await.unwrap_or_default(),
        "no handler for step `there` of flow `door` is registered in this worker"
    );
    // A step the client asks an output of but the run does not have.
    let error = client
        .start_json("known", json!(2), None)
        .await
        .expect("start");
    let known_worker = Worker::builder(pool.clone())
        .flow(echo_flow("known"))
        .spawn()
        .expect("worker");
    let output = error
        .wait_timeout(Duration::from_secs(30))
        .await
        .expect("run");
    let missing = output.output_as::<Value>("nope").expect_err("no such step");
    assert_eq!(
        missing.to_string(),
        "no output for step `nope`; steps with outputs: [echo]"
    );
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
    known_worker.shutdown().await.expect("shutdown");
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u64,
    amount: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_that_does_not_decode_fails_its_task_with_the_reason_and_nothing_else() {
    let (db, client) = client().await;
    let pool = db.pool();
    let charge =
        step_fn("charge")
            .max_attempts(3)
            .handler(|order: Order, _ctx: StepContext| async move {
                Ok::<_, StepError>(order.amount * 2.0)
            });
    let flow: Flow<Order> = Flow::new("orders").step(charge).build();
    client.compile(&flow).await.expect("compile");
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");
    let good = client
        .start(&flow, &Order { id: 1, amount: 2.5 })
        .await
        .expect("start")
        .id();
    let bad = start(pool, "orders", json!({"id": "one", "amount": 2.5})).await;
    let missing = start(pool, "orders", json!({"amount": 2.5})).await;
    let results = finished_all(pool, &[good, bad, missing], Duration::from_secs(30)).await;
    assert_eq!(
        results[0],
        ("completed".to_owned(), Some(json!({"charge": 5.0})))
    );
    assert_eq!(results[1].0, "failed");
    assert_eq!(results[2].0, "failed");
    let order = std::any::type_name::<Order>();
    assert_eq!(
        step_error(pool, bad, "charge").await.unwrap_or_default(),
        format!(
            "cannot decode the flow input (`run`) as `{order}`: invalid type: string \"one\", \
             expected u64 (not retried: the handler marked the error as permanent)"
        )
    );
    assert_eq!(
        step_error(pool, missing, "charge")
            .await
            .unwrap_or_default(),
        format!(
            "cannot decode the flow input (`run`) as `{order}`: missing field `id` \
             (not retried: the handler marked the error as permanent)"
        )
    );
    // Not retried: a bad input stays bad.
    let attempts: i32 = sqlx::query_scalar(
        "SELECT attempts_count FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'charge'",
    )
    .bind(bad)
    .fetch_one(pool)
    .await
    .expect("attempts");
    assert_eq!(attempts, 1, "one attempt, and the task says so");
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_that_cannot_be_serialized_fails_its_task_with_the_serde_error() {
    let (db, client) = client().await;
    let pool = db.pool();
    // JSON object keys are strings: a map keyed by pairs has no JSON form.
    let pairs = step_fn("pairs").handler(|n: u32, _ctx: StepContext| async move {
        let mut map = HashMap::new();
        map.insert((n, n + 1), "pair".to_owned());
        Ok::<_, StepError>(map)
    });
    let flow: Flow<u32> = Flow::new("pairs").step(pairs).build();
    client.compile(&flow).await.expect("compile");
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");
    let run = client.start(&flow, &1).await.expect("start").id();
    let (status, _) = finished_all(pool, &[run], Duration::from_secs(30)).await[0].clone();
    assert_eq!(status, "failed");
    let error = step_error(pool, run, "pairs").await.unwrap_or_default();
    assert!(
        error.starts_with("cannot serialize the step output `std::collections::hash::map::HashMap<(u32, u32), alloc::string::String>`: key must be a string"),
        "{error}"
    );
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_root_map_refuses_an_input_that_is_not_an_array() {
    let (db, client) = client().await;
    let each = step_fn("each")
        .map_over_input()
        .handler(|n: u32, _ctx: StepContext| async move { Ok::<_, StepError>(n) });
    let flow: Flow<Vec<u32>> = Flow::new("mapped").step(each).build();
    client.compile(&flow).await.expect("compile");
    for (input, kind) in [
        (json!({"n": 1}), "object"),
        (json!(7), "number"),
        (json!("[1]"), "string"),
        (Value::Null, "null"),
    ] {
        let error = client
            .start_json("mapped", input.clone(), None)
            .await
            .expect_err("refused");
        assert!(matches!(error, Error::InvalidInput { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            format!(
                "cannot start flow `mapped`: Flow mapped has root map steps but input is not an \
                 array (got {kind})"
            ),
            "{input}"
        );
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(db.pool())
        .await
        .expect("runs");
    assert_eq!(runs, 0, "no run was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_and_outputs_of_several_megabytes_go_through() {
    let (db, client) = client().await;
    let pool = db.pool();
    // ~5 MB in, ~5 MB out of each step, and a map over three ~1 MB elements.
    let upper = step_fn("upper").handler(|text: Vec<String>, _ctx: StepContext| async move {
        Ok::<_, StepError>(text.concat().to_uppercase())
    });
    let split = step_fn("split").depends_on(&upper).handler(
        |_text: Vec<String>, upper: String, _ctx: StepContext| async move {
            let third = upper.len() / 3;
            Ok::<_, StepError>(vec![
                upper[..third].to_owned(),
                upper[third..2 * third].to_owned(),
                upper[2 * third..].to_owned(),
            ])
        },
    );
    let measure = step_fn("measure")
        .map_over(&split)
        .handler(|part: String, _ctx: StepContext| async move { Ok::<_, StepError>(part.len()) });
    let flow: Flow<Vec<String>> = Flow::new("large")
        .step(upper)
        .step(split)
        .step(measure)
        .build();
    client.compile(&flow).await.expect("compile");
    let worker = Worker::builder(pool.clone())
        .flow(flow.clone())
        .spawn()
        .expect("worker");
    let chunk = "abcdefghij".repeat(100_000); // 1 MB
    let input: Vec<String> = (0..5).map(|_| chunk.clone()).collect();
    let run = client.start(&flow, &input).await.expect("start");
    let output = run
        .wait_timeout(Duration::from_secs(60))
        .await
        .expect("run");
    let lengths: Vec<usize> = output.output_as("measure").expect("measure");
    assert_eq!(lengths.iter().sum::<usize>(), 5_000_000);
    let upper: String = sqlx::query_scalar(
        "SELECT output #>> '{}' FROM pgflow.step_tasks WHERE run_id = $1 AND step_slug = 'upper'",
    )
    .bind(run.id())
    .fetch_one(pool)
    .await
    .expect("upper");
    assert_eq!(upper.len(), 5_000_000);
    assert_eq!(upper, chunk.to_uppercase().repeat(5));
    assert_consistent(pool).await;
    worker.shutdown().await.expect("shutdown");
}
