//! The typed DSL's conditions against the real engine and a real worker: what the compiler
//! makes an `Option` is `None` exactly when the engine skipped the step, in the handlers of
//! dependents and in the run's outputs.

use std::time::Duration;

use pgflow::prelude::*;
use pgflow::{RunOutput, Worker, mode};
use serde_json::{Value, json};

use crate::support::client;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Customer {
    tier: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Signup {
    plan: String,
    customer: Customer,
}

fn signup(plan: &str, tier: &str) -> Signup {
    Signup {
        plan: plan.into(),
        customer: Customer { tier: tier.into() },
    }
}

/// Compiles `flow`, runs it once per input with a worker, and returns the outputs in order.
async fn run_all<I: Serialize + Send + Sync + 'static>(
    flow: Flow<I>,
    inputs: &[I],
) -> Vec<RunOutput> {
    let (db, client) = client().await;
    client.compile(&flow).await.unwrap();
    let worker = Worker::builder(db.pool().clone())
        .flow(flow.clone())
        .spawn()
        .unwrap();
    let mut outputs = Vec::new();
    for input in inputs {
        let run = client.start(&flow, input).await.unwrap();
        outputs.push(
            run.wait_timeout(Duration::from_secs(60))
                .await
                .expect("the run completes"),
        );
    }
    worker.shutdown().await.unwrap();
    outputs
}

#[tokio::test]
async fn a_nested_condition_on_the_flow_input_runs_or_skips_the_step_and_dependents_see_an_option()
{
    let perks = step_fn("perks")
        .if_input(pattern!(Signup {
            plan: "premium",
            customer: { tier: "gold" }
        }))
        .handler(|s: Signup, _: StepContext| async move {
            Ok::<_, StepError>(format!("{} perks", s.customer.tier))
        });
    let welcome = step_fn("welcome").depends_on(&perks).handler(
        |s: Signup, perks: Option<String>, _: StepContext| async move {
            Ok::<_, StepError>(format!("{}: {perks:?}", s.plan))
        },
    );
    let flow: Flow<Signup> = Flow::new("signups")
        .step(perks.clone())
        .step(welcome.clone())
        .build();
    let outputs = run_all(
        flow,
        &[
            signup("premium", "gold"),
            signup("premium", "silver"), // nested field differs: unmet
            signup("free", "gold"),
        ],
    )
    .await;
    let perks_of: Vec<Option<String>> = outputs
        .iter()
        .map(|o| o.output_of(&perks).unwrap())
        .collect();
    assert_eq!(perks_of, [Some("gold perks".to_owned()), None, None]);
    let welcomes: Vec<String> = outputs
        .iter()
        .map(|o| o.output_of(&welcome).unwrap())
        .collect();
    assert_eq!(
        welcomes,
        [
            "premium: Some(\"gold perks\")",
            "premium: None",
            "free: None"
        ]
    );
    // The run's output holds the completed leaves only.
    assert_eq!(outputs[1].output(), &json!({"welcome": "premium: None"}));
}

#[tokio::test]
async fn a_step_skipped_after_its_attempts_gives_its_map_dependent_no_tasks_and_cascades_end_in_none()
 {
    // `items` gives up; `each` maps over it (0 tasks, `[]`); `count` takes `each`'s `Vec`.
    let items = step_fn("items")
        .max_attempts(1)
        .when_exhausted(mode::Skip)
        .handler(|_: Value, _: StepContext| async move {
            Err::<Vec<u32>, _>(StepError::new("the item service is down"))
        });
    let each = step_fn("each")
        .map_over(&items)
        .handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n * 2) });
    let count =
        step_fn("count").depends_on(&each).handler(
            |_: Value, doubled: Vec<u32>, _: StepContext| async move {
                Ok::<_, StepError>(doubled.len())
            },
        );
    // `gate` skips itself and everything downstream when unmet: `after` never runs, and its
    // output, though `after` has no condition, is an `Option` for the run.
    let gate = step_fn("gate")
        .if_input(json!({"open": true}))
        .when_unmet(mode::SkipCascade)
        .handler(|_: Value, _: StepContext| async move { Ok::<_, StepError>(1_u8) });
    let after = step_fn("after").depends_on(&gate).handler(
        |_: Value, gate: Option<u8>, _: StepContext| async move { Ok::<_, StepError>(gate) },
    );
    let flow: Flow<Value> = Flow::new("skips")
        .step(items.clone())
        .step(each.clone())
        .step(count.clone())
        .step(gate.clone())
        .step(after.clone())
        .build();
    let outputs = run_all(flow, &[json!({"open": false}), json!({"open": true})]).await;

    for output in &outputs {
        let skipped: Option<Vec<u32>> = output.output_of(&items).unwrap();
        assert_eq!(skipped, None);
        let mapped: Vec<u32> = output.output_of(&each).unwrap();
        assert!(mapped.is_empty(), "a map over a skipped step has no tasks");
        assert_eq!(output.output_of(&count).unwrap(), 0);
    }
    let closed: (Option<u8>, Option<Option<u8>>) = (
        outputs[0].output_of(&gate).unwrap(),
        outputs[0].output_of(&after).unwrap(),
    );
    assert_eq!(closed, (None, None));
    assert_eq!(
        (
            outputs[1].output_of(&gate).unwrap(),
            outputs[1].output_of(&after).unwrap()
        ),
        (Some(1), Some(Some(1)))
    );
}

#[tokio::test]
async fn a_condition_on_a_dependency_output_reads_it_by_slug() {
    let score = step_fn("score").handler(|s: Signup, _: StepContext| async move {
        Ok::<_, StepError>(Customer {
            tier: if s.plan == "premium" { "gold" } else { "basic" }.into(),
        })
    });
    let vip = step_fn("vip")
        .depends_on(&score)
        .if_input(pattern!({ score: { tier: "gold" } }))
        .if_not(json!({"score": {"tier": "banned"}}))
        .handler(|_: Signup, score: Customer, _: StepContext| async move {
            Ok::<_, StepError>(score.tier)
        });
    let flow: Flow<Signup> = Flow::new("vips").step(score).step(vip.clone()).build();
    let outputs = run_all(flow, &[signup("premium", "x"), signup("free", "x")]).await;
    let vips: Vec<Option<String>> = outputs.iter().map(|o| o.output_of(&vip).unwrap()).collect();
    assert_eq!(vips, [Some("gold".to_owned()), None]);
}
