// Conditions in #[step] and in the builder: typed patterns on the flow input and on
// dependencies, raw JSON patterns, modes by name; a skippable dependency is taken as an
// `Option`, and is `None` when the engine left it out of the task input.
use pgflow::prelude::*;
use pgflow::{SkipMode, StepShape};
use serde_json::json;

#[derive(Serialize, Deserialize)]
struct Customer {
    tier: String,
}

#[derive(Serialize, Deserialize)]
enum Plan {
    #[serde(rename = "free")]
    Free,
    #[serde(rename = "premium")]
    Premium,
}

#[derive(Serialize, Deserialize)]
struct Order {
    plan: Plan,
    customer: Customer,
    r#type: String,
}

#[derive(Serialize, Deserialize)]
struct Receipt {
    status: String,
}

/// Runs for premium gold orders only; skipped otherwise.
#[step(if_input = Order { plan: Plan::Premium, customer: { tier: "gold" } })]
async fn perks(order: &Order) -> Result<u32, StepError> {
    Ok(order.customer.tier.len() as u32)
}

/// Skips itself and everything after it when its attempts run out.
#[step(when_exhausted = skip_cascade, max_attempts = 2)]
async fn charge(_order: &Order) -> Result<Receipt, StepError> {
    Ok(Receipt {
        status: "paid".into(),
    })
}

/// A condition on a dependency's output; fails the run when unmet.
#[step(
    depends_on = [charge, perks],
    if_input = { charge: { status: "paid" } },
    if_not = json!({"perks": 0}),
    when_unmet = fail,
)]
async fn ship(charge: Option<Receipt>, perks: Option<u32>) -> Result<String, StepError> {
    Ok(format!("{:?} {:?}", charge.map(|r| r.status), perks))
}

/// A root step without an input parameter: its condition's type is its flow input.
#[step(if_not = Order { r#type: "gift" }, when_unmet = "skip-cascade")]
async fn invoice() -> Result<(), StepError> {
    Ok(())
}

fn main() {
    let note = step_fn("note")
        .depends_on(&perks)
        .if_input(pattern!({ perks: 3 }))
        .when_unmet(mode::Skip)
        .handler(|_: Order, perks: Option<u32>, _: StepContext| async move {
            Ok::<_, StepError>(perks.unwrap_or_default())
        });
    let last = step_fn("last").depends_on(&note).handler(
        |_: Order, note: Option<u32>, _: StepContext| async move { Ok::<_, StepError>(note) },
    );
    let flow: Flow<Order> = Flow::new("orders")
        .step(perks)
        .step(charge)
        .step(ship)
        .step(invoice)
        .step(note)
        .step(last)
        .build();
    assert_eq!(
        flow.statements().unwrap(),
        [
            "SELECT pgflow.create_flow('orders');",
            r#"SELECT pgflow.add_step('orders', 'perks', required_input_pattern => '{"customer":{"tier":"gold"},"plan":"premium"}');"#,
            "SELECT pgflow.add_step('orders', 'charge', max_attempts => 2, when_exhausted => 'skip-cascade');",
            r#"SELECT pgflow.add_step('orders', 'ship', ARRAY['charge', 'perks'], required_input_pattern => '{"charge":{"status":"paid"}}', forbidden_input_pattern => '{"perks":0}', when_unmet => 'fail');"#,
            r#"SELECT pgflow.add_step('orders', 'invoice', forbidden_input_pattern => '{"type":"gift"}', when_unmet => 'skip-cascade');"#,
            r#"SELECT pgflow.add_step('orders', 'note', ARRAY['perks'], required_input_pattern => '{"perks":3}');"#,
            "SELECT pgflow.add_step('orders', 'last', ARRAY['note']);",
        ]
    );
    let ship_shape: &StepShape = &flow.shape().steps[2];
    assert_eq!(ship_shape.when_unmet, SkipMode::Fail);
    assert!(!ship_shape.skippable());

    // A skipped dependency is absent from the task input: `None`.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let ship = flow.find_step("ship").unwrap();
    let output = runtime
        .block_on(ship.call(
            json!({"run": {}, "charge": {"status": "paid"}}),
            StepContext::for_test(),
        ))
        .unwrap();
    assert_eq!(output, json!("Some(\"paid\") None"));
    let last = flow.find_step("last").unwrap();
    let output = runtime
        .block_on(last.call(
            json!({"run": {"plan": "free", "customer": {"tier": "x"}, "type": "t"}}),
            StepContext::for_test(),
        ))
        .unwrap();
    assert_eq!(output, json!(null));
    let _ = Plan::Free;
}
