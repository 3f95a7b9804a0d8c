//! The client: compiling flows with drift detection, starting runs idempotently, waiting for
//! them, their outputs and their events. Tasks are driven through the SQL API here, so these
//! tests do not depend on the worker.

use std::collections::HashMap;
use std::pin::pin;
use std::time::Duration;

use futures_util::StreamExt;
use pgflow_client::{Client, Compiled, Difference, Error, EventKind, Replace};
use pgflow_core::{Flow, StepContext, StepError, StepKind, step_fn};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{client, set_engine_options};

fn chain(timeout: u32) -> Flow<Value> {
    let validate = step_fn("validate")
        .handler(|order: Value, _ctx: StepContext| async move { Ok::<_, StepError>(order) });
    let charge = step_fn("charge")
        .depends_on(&validate)
        .max_attempts(5)
        .handler(|_: Value, v: Value, _ctx| async move { Ok::<_, StepError>(v) });
    let fulfill = step_fn("fulfill")
        .depends_on(&charge)
        .handler(|_: Value, c: Value, _ctx| async move { Ok::<_, StepError>(c) });
    Flow::new("order_processing")
        .timeout(timeout)
        .step(validate)
        .step(charge)
        .step(fulfill)
        .build()
}

/// Plays worker through the SQL API: starts whatever is queued and reports what `handle`
/// returns (`Err` fails the task), until the run ends.
async fn drive(
    client: &Client,
    flow: &str,
    run_id: Uuid,
    handle: impl Fn(&str, &Value) -> Result<Value, String>,
) {
    let pool = client.pool();
    let worker = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) VALUES ($1, $2, 'test')",
    )
    .bind(worker)
    .bind(flow)
    .execute(pool)
    .await
    .unwrap();
    for _ in 0..200 {
        let status: String = sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE run_id = $1")
            .bind(run_id)
            .fetch_one(pool)
            .await
            .unwrap();
        if status != "started" {
            let violations = client.check().await.unwrap();
            assert!(violations.is_empty(), "{violations:?}");
            return;
        }
        let ids: Vec<i64> =
            sqlx::query_scalar("SELECT msg_id FROM pgmq.read_with_poll($1, 30, 100, 1, 20)")
                .bind(flow)
                .fetch_all(pool)
                .await
                .unwrap();
        let tasks: Vec<(String, i32, Value)> = sqlx::query_as(
            "SELECT step_slug, task_index, input FROM pgflow.start_tasks($1, $2, $3)",
        )
        .bind(flow)
        .bind(&ids)
        .bind(worker)
        .fetch_all(pool)
        .await
        .unwrap();
        for (step, index, input) in tasks {
            match handle(&step, &input) {
                Ok(output) => {
                    sqlx::query("SELECT pgflow.complete_task($1, $2, $3, $4)")
                        .bind(run_id)
                        .bind(&step)
                        .bind(index)
                        .bind(output)
                        .execute(pool)
                        .await
                        .unwrap();
                }
                Err(message) => {
                    sqlx::query("SELECT pgflow.fail_task($1, $2, $3, $4)")
                        .bind(run_id)
                        .bind(&step)
                        .bind(index)
                        .bind(message)
                        .execute(pool)
                        .await
                        .unwrap();
                }
            }
        }
    }
    panic!("run {run_id} did not end");
}

#[tokio::test]
async fn compiling_creates_then_is_a_no_op() {
    let (_db, client) = client().await;
    let flow = chain(60);
    assert_eq!(client.compile(&flow).await.unwrap(), Compiled::Created);
    assert_eq!(client.compile(&flow).await.unwrap(), Compiled::Unchanged);
    let stored = client
        .flow_shape("order_processing")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        pgflow_client::differences(&stored, flow.shape()),
        Vec::<Difference>::new()
    );
    let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.steps")
        .fetch_one(client.pool())
        .await
        .unwrap();
    assert_eq!(steps, 3);
}

#[tokio::test]
async fn drift_is_reported_for_each_kind_of_change() {
    let (_db, client) = client().await;
    client.compile(&chain(60)).await.unwrap();

    // Options changed, a step added, one removed, one reordered, deps and kind changed.
    let validate = step_fn("validate")
        .handler(|order: Value, _ctx: StepContext| async move { Ok::<_, StepError>(vec![order]) });
    let fulfill = step_fn("fulfill")
        .map_over(&validate)
        .handler(|v: Value, _ctx| async move { Ok::<_, StepError>(v) });
    let notify = step_fn("notify")
        .depends_on(&validate)
        .max_attempts(9)
        .handler(|_: Value, v: Vec<Value>, _ctx| async move { Ok::<_, StepError>(v) });
    let changed: Flow<Value> = Flow::new("order_processing")
        .timeout(30)
        .step(validate)
        .step(fulfill)
        .step(notify)
        .build();
    let err = client.compile(&changed).await.unwrap_err();
    let Error::FlowDrift { flow, differences } = &err else {
        panic!("expected drift, got {err}");
    };
    assert_eq!(flow, "order_processing");
    let text: Vec<String> = differences.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "flow option timeout is 30 instead of 60",
            "step `fulfill` moved from position 2 to position 1",
            "step `fulfill` changed from a single step to a map step",
            "step `fulfill` depends on [validate] instead of [charge]",
            "step `notify` is new",
            "step `charge` is no longer in the flow",
        ]
    );
    let message = err.to_string();
    assert!(message.contains("  - step `notify` is new"), "{message}");

    // Nothing was changed by the refused compile.
    let stored = client
        .flow_shape("order_processing")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.steps.len(), 3);
    assert_eq!(stored.steps[1].slug, "charge");
    assert_eq!(stored.steps[1].kind, StepKind::Single);
}

#[tokio::test]
async fn replacing_needs_no_runs_or_an_explicit_opt_in() {
    let (_db, client) = client().await;
    client.compile(&chain(60)).await.unwrap();
    // No runs yet: replace is allowed.
    assert_eq!(
        client
            .compile_replacing(&chain(10), Replace::IfNoRuns)
            .await
            .unwrap(),
        Compiled::Replaced { deleted_runs: 0 }
    );
    let run = client
        .start_json("order_processing", json!({"id": 1}), None)
        .await
        .unwrap();
    let err = client
        .compile_replacing(&chain(20), Replace::IfNoRuns)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FlowHasRuns { runs: 1, .. }), "{err}");
    assert_eq!(
        client
            .compile_replacing(&chain(20), Replace::DeletingRuns)
            .await
            .unwrap(),
        Compiled::Replaced { deleted_runs: 1 }
    );
    assert!(matches!(run.state().await, Err(Error::UnknownRun(_))));
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM pgmq.q_order_processing")
        .fetch_one(client.pool())
        .await
        .unwrap();
    assert_eq!(queued, 0, "the deleted run's messages are gone too");
    let timeout = client
        .flow_shape("order_processing")
        .await
        .unwrap()
        .unwrap()
        .options
        .timeout;
    assert_eq!(timeout, Some(20));
}

#[tokio::test]
async fn invalid_flows_are_refused_before_any_sql() {
    let (_db, client) = client().await;
    let bad =
        step_fn("run").handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) });
    let flow: Flow<Value> = Flow::new("fine").step(bad).build();
    let err = client.compile(&flow).await.unwrap_err();
    assert!(matches!(err, Error::Flow(_)), "{err}");
    assert!(err.to_string().contains("run"), "{err}");
    let flows: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.flows")
        .fetch_one(client.pool())
        .await
        .unwrap();
    assert_eq!(flows, 0);
}

#[tokio::test]
async fn starting_an_unknown_flow_names_the_known_ones() {
    let (_db, client) = client().await;
    client.compile(&chain(60)).await.unwrap();
    let err = client
        .start_json("order_procesing", json!({}), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownFlow { .. }));
    assert_eq!(
        err.to_string(),
        "flow `order_procesing` is not in the database (compile it first); flows there: [order_processing]"
    );
}

#[tokio::test]
async fn starting_twice_with_one_run_id_returns_the_same_run() {
    let (_db, client) = client().await;
    let flow = chain(60);
    client.compile(&flow).await.unwrap();
    let id = Uuid::new_v4();
    let first = client
        .start_with_id(&flow, &json!({"n": 1}), id)
        .await
        .unwrap();
    let second = client
        .start_with_id(&flow, &json!({"n": 2}), id)
        .await
        .unwrap();
    assert_eq!((first.id(), second.id()), (id, id));
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(client.pool())
        .await
        .unwrap();
    assert_eq!(runs, 1);
    assert_eq!(first.state().await.unwrap().run.input, json!({"n": 1}));
}

#[tokio::test]
async fn concurrent_starts_with_one_run_id_make_one_run() {
    let (_db, client) = client().await;
    let flow = chain(60);
    client.compile(&flow).await.unwrap();
    let id = Uuid::new_v4();
    let starts = (0..8).map(|n| {
        let (client, flow) = (client.clone(), flow.clone());
        tokio::spawn(async move { client.start_with_id(&flow, &json!({ "n": n }), id).await })
    });
    for start in futures_util::future::join_all(starts).await {
        assert_eq!(start.unwrap().unwrap().id(), id);
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(client.pool())
        .await
        .unwrap();
    assert_eq!(runs, 1);
}

#[tokio::test]
async fn a_root_map_over_a_non_array_is_refused_clearly() {
    let (_db, client) = client().await;
    let each = step_fn("each")
        .map_over_input()
        .handler(|n: i64, _ctx: StepContext| async move { Ok::<_, StepError>(n * 2) });
    let flow: Flow<Vec<i64>> = Flow::new("doubles").step(each).build();
    client.compile(&flow).await.unwrap();
    let err = client
        .start_json("doubles", json!({"not": "an array"}), None)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot start flow `doubles`: Flow doubles has root map steps but input is not an array (got object)"
    );
}

#[tokio::test]
async fn waiting_on_a_run_that_completes_gives_typed_outputs() {
    let (_db, client) = client().await;
    let urls = step_fn("urls").handler(|n: u32, _ctx: StepContext| async move {
        Ok::<_, StepError>((0..n).map(|i| format!("u{i}")).collect::<Vec<_>>())
    });
    let fetch = step_fn("fetch")
        .map_over(&urls)
        .handler(|url: String, _ctx| async move { Ok::<_, StepError>(url.len()) });
    let flow: Flow<u32> = Flow::new("crawl").step(urls).step(fetch.clone()).build();
    client.compile(&flow).await.unwrap();
    let run = client.start(&flow, &3).await.unwrap();
    let waiter = {
        let run = run.clone();
        tokio::spawn(async move { run.wait_timeout(Duration::from_secs(30)).await })
    };
    drive(&client, "crawl", run.id(), |step, input| match step {
        "urls" => Ok(json!(
            ["a", "bb", "ccc"]
                .iter()
                .take(input["run"].as_u64().unwrap() as usize)
                .collect::<Vec<_>>()
        )),
        "fetch" => Ok(json!(input.as_str().unwrap().len())),
        _ => Err("unknown".into()),
    })
    .await;
    let output = waiter.await.unwrap().unwrap();
    let lengths: Vec<usize> = output.output_of(fetch).unwrap();
    assert_eq!(lengths, vec![1, 2, 3]);
    let typed: Vec<usize> = output.output_as("fetch").unwrap();
    assert_eq!(typed, vec![1, 2, 3]);
    assert_eq!(output.output(), &json!({"fetch": [1, 2, 3]}));
    let err = output.output_as::<Vec<String>>("fetch").unwrap_err();
    assert!(matches!(err, Error::OutputType { .. }), "{err}");
}

#[tokio::test]
async fn waiting_on_a_run_that_fails_after_retries_says_where_and_why() {
    let (_db, client) = client().await;
    let validate = step_fn("validate")
        .max_attempts(2)
        .handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) });
    let flow: Flow<Value> = Flow::new("flaky").step(validate).build();
    client.compile(&flow).await.unwrap();
    set_engine_options(client.pool(), "flaky", None, &[("base_delay", 0)]).await;
    let run = client.start(&flow, &json!(1)).await.unwrap();
    drive(&client, "flaky", run.id(), |_, _| {
        Err("card declined".into())
    })
    .await;
    let err = run.wait_timeout(Duration::from_secs(10)).await.unwrap_err();
    let Error::RunFailed(failure) = &err else {
        panic!("expected a failed run, got {err}");
    };
    assert_eq!(failure.step_slug, "validate");
    assert_eq!(failure.task_index, Some(0));
    assert_eq!(failure.attempts, 2);
    assert_eq!(failure.error_message, "card declined");
    assert_eq!(
        err.to_string(),
        format!(
            "run {} of flow `flaky` failed in step `validate`, task 0 after 2 attempts: card declined",
            run.id()
        )
    );
}

#[tokio::test]
async fn waiting_with_a_timeout_gives_up_and_leaves_the_run_alone() {
    let (_db, client) = client().await;
    let flow = chain(60);
    client.compile(&flow).await.unwrap();
    let run = client.start(&flow, &json!({})).await.unwrap();
    let err = run
        .wait_timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WaitTimedOut { .. }), "{err}");
    assert_eq!(
        run.state().await.unwrap().run.status,
        pgflow_client::RunStatus::Started
    );
}

#[tokio::test]
async fn the_events_of_a_diamond_arrive_in_order_and_end_with_the_run() {
    let (_db, client) = client().await;
    let a =
        step_fn("a").handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) });
    let b = step_fn("b")
        .depends_on(&a)
        .handler(|_: Value, v: Value, _ctx| async move { Ok::<_, StepError>(v) });
    let c = step_fn("c")
        .depends_on(&a)
        .handler(|_: Value, v: Value, _ctx| async move { Ok::<_, StepError>(v) });
    let d = step_fn("d")
        .depends_on(&b)
        .depends_on(&c)
        .handler(|_: Value, b: Value, _c: Value, _ctx| async move { Ok::<_, StepError>(b) });
    let flow: Flow<Value> = Flow::new("diamond").step(a).step(b).step(c).step(d).build();
    client.compile(&flow).await.unwrap();

    let subscription = client.subscribe().await.unwrap();
    let run = client.start(&flow, &json!(7)).await.unwrap();
    let collector = tokio::spawn({
        let id = run.id();
        async move {
            let mut events = pin!(subscription.run_events(id));
            let mut seen = Vec::new();
            while let Some(event) = events.next().await {
                let event = event.unwrap();
                seen.push(format!(
                    "{}{}",
                    event.kind,
                    event.step_slug.map(|s| format!(" {s}")).unwrap_or_default()
                ));
            }
            seen
        }
    });
    drive(&client, "diamond", run.id(), |_, input| {
        Ok(input.get("run").cloned().unwrap_or(json!(0)))
    })
    .await;
    let seen = tokio::time::timeout(Duration::from_secs(10), collector)
        .await
        .unwrap()
        .unwrap();
    let position = |e: &str| {
        seen.iter()
            .position(|s| s == e)
            .unwrap_or_else(|| panic!("{e} missing: {seen:?}"))
    };
    assert_eq!(seen.first().map(String::as_str), Some("run:started"));
    assert_eq!(seen.last().map(String::as_str), Some("run:completed"));
    assert_eq!(seen.len(), 10, "{seen:?}");
    assert!(position("step:completed a") < position("step:started b"));
    assert!(position("step:completed a") < position("step:started c"));
    assert!(position("step:completed b") < position("step:started d"));
    assert!(position("step:completed c") < position("step:started d"));
    assert!(position("step:completed d") < position("run:completed"));

    // After the end, a run's event stream is just its final event.
    let after: Vec<_> = run.events().await.unwrap().collect().await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].as_ref().unwrap().kind, EventKind::RunCompleted);
}

#[tokio::test]
async fn a_run_state_has_every_step_and_task() {
    let (_db, client) = client().await;
    let flow = chain(60);
    client.compile(&flow).await.unwrap();
    let run = client.start(&flow, &json!({"order": 5})).await.unwrap();
    let outputs = HashMap::from([("validate", json!("ok"))]);
    drive(&client, "order_processing", run.id(), |step, _| {
        Ok(outputs.get(step).cloned().unwrap_or(Value::Null))
    })
    .await;
    let state = client.run_state(run.id()).await.unwrap();
    assert_eq!(state.run.status, pgflow_client::RunStatus::Completed);
    assert_eq!(
        state
            .steps
            .iter()
            .map(|s| (s.step_slug.as_str(), s.status.as_str()))
            .collect::<Vec<_>>(),
        [
            ("validate", "completed"),
            ("charge", "completed"),
            ("fulfill", "completed")
        ]
    );
    assert_eq!(state.tasks.len(), 3);
    assert!(state.tasks.iter().all(|t| t.attempts_count == 1));
}

/// A flow of one step, `work`.
fn one_step(slug: &str) -> Flow<Value> {
    let work =
        step_fn("work").handler(|v: Value, _ctx: StepContext| async move { Ok::<_, StepError>(v) });
    Flow::new(slug).step(work).build()
}

#[tokio::test]
async fn a_flow_whose_slug_differs_only_in_case_is_refused_naming_both() {
    let (_db, client) = client().await;
    client.compile(&one_step("Twin")).await.unwrap();
    client.start_json("Twin", json!({}), None).await.unwrap();
    let queued = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pgmq.q_twin")
            .fetch_one(client.pool())
            .await
            .unwrap()
    };
    assert_eq!(queued().await, 1);

    let err = client.compile(&one_step("twin")).await.unwrap_err();
    let Error::FlowSlugCollision { flow, existing } = &err else {
        panic!("expected a collision, got {err}");
    };
    assert_eq!((flow.as_str(), existing.as_str()), ("twin", "Twin"));
    assert_eq!(
        err.to_string(),
        "flow `twin` collides with flow `Twin`: their slugs differ only in case, and pgmq \
         lowercases queue names, so both would share queue pgmq.q_twin; give the new flow another \
         slug"
    );
    // Replacing is refused the same way, before it purges the shared queue.
    let err = client
        .compile_replacing(&one_step("twin"), Replace::DeletingRuns)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FlowSlugCollision { .. }), "{err}");

    assert_eq!(queued().await, 1, "Twin's message is still there");
    let slugs: Vec<String> = client
        .flows()
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.slug)
        .collect();
    assert_eq!(slugs, ["Twin"]);
}

#[tokio::test]
async fn check_reads_the_queue_of_a_flow_named_with_capitals() {
    let (_db, client) = client().await;
    client.compile(&one_step("MyFlow")).await.unwrap();
    let run = client.start_json("MyFlow", json!({}), None).await.unwrap();
    // A live worker serves it: the run is not stuck for want of one.
    sqlx::query(
        "INSERT INTO pgflow.workers (worker_id, queue_name, function_name) \
         VALUES ($1, 'MyFlow', 'test')",
    )
    .bind(Uuid::new_v4())
    .execute(client.pool())
    .await
    .unwrap();
    assert_eq!(client.check().await.unwrap(), []);

    // The queue it reads is pgmq's own, pgmq.q_myflow: a lost message is seen there.
    sqlx::query("DELETE FROM pgmq.q_myflow")
        .execute(client.pool())
        .await
        .unwrap();
    let violations = client.check().await.unwrap();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].rule, "queued_task_message");
    assert_eq!(violations[0].run_id, run.id());
}

#[tokio::test]
async fn a_flow_slug_too_long_for_a_queue_is_refused_before_any_sql() {
    let (_db, client) = client().await;
    let err = client
        .compile(&one_step(&"a".repeat(48)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Flow(pgflow_core::Error::InvalidFlowSlug {
                problem: pgflow_core::SlugProblem::FlowTooLong { len: 48 },
                ..
            })
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("pgmq refuses queue names of more than 47"),
        "{err}"
    );
    assert_eq!(client.flows().await.unwrap().len(), 0);

    let longest = "a".repeat(47);
    assert_eq!(
        client.compile(&one_step(&longest)).await.unwrap(),
        Compiled::Created
    );
    client.start_json(&longest, json!({}), None).await.unwrap();
}

#[tokio::test]
async fn option_values_past_their_bounds_are_refused_before_any_sql() {
    let (_db, client) = client().await;
    let err = client.compile(&chain(2_147_483_646)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Flow(pgflow_core::Error::InvalidFlowOption {
                option: "timeout",
                value: 2_147_483_646,
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(client.flows().await.unwrap().len(), 0);
}
