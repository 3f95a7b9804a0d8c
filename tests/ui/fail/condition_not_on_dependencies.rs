// A dependent step's condition is matched against its dependencies' outputs: it cannot name a
// step that is not a dependency, nor be a pattern on the flow input; a root step's condition
// is on the flow input, of the step's input type.
use pgflow::prelude::*;

#[derive(Serialize, Deserialize)]
struct Order {
    plan: String,
}

#[derive(Serialize, Deserialize)]
struct Refund {
    reason: String,
}

#[step]
async fn validate(order: &Order) -> Result<bool, StepError> {
    Ok(!order.plan.is_empty())
}

#[step]
async fn price(order: &Order) -> Result<f64, StepError> {
    Ok(order.plan.len() as f64)
}

#[step(depends_on = [validate], if_input = { price: 1.0 })]
async fn charge(validate: Option<bool>) -> Result<bool, StepError> {
    Ok(validate.unwrap_or_default())
}

#[step(depends_on = [validate], if_input = Order { plan: "premium" })]
async fn perks(validate: Option<bool>) -> Result<bool, StepError> {
    Ok(validate.unwrap_or_default())
}

#[step(if_input = Refund { reason: "fraud" })]
async fn flag(order: &Order) -> Result<bool, StepError> {
    Ok(order.plan.is_empty())
}

fn main() {
    let first = step_fn("first")
        .handler(|order: Order, _: StepContext| async move { Ok::<_, StepError>(order.plan) });
    let other = step_fn("other")
        .handler(|order: Order, _: StepContext| async move { Ok::<_, StepError>(order.plan) });
    let _second = step_fn("second")
        .depends_on(&first)
        .if_input(pattern!({ other: "x" }))
        .handler(
            |_: Order, first: String, _: StepContext| async move { Ok::<_, StepError>(first) },
        );
    let _third = step_fn("third")
        .depends_on(&first)
        .if_not(pattern!(Order { plan: "free" }))
        .handler(
            |_: Order, first: String, _: StepContext| async move { Ok::<_, StepError>(first) },
        );
    let _ = other;
}
