// Root steps take the flow input, by reference or by value.
use pgflow::prelude::*;

#[derive(Serialize, Deserialize)]
struct Order {
    amount: f64,
}

#[step]
async fn by_ref(order: &Order) -> Result<f64, StepError> {
    Ok(order.amount)
}

#[step]
async fn by_value(order: Order) -> Result<bool, StepError> {
    Ok(order.amount > 0.0)
}

/// A root step may also ignore the flow input.
#[step]
async fn constant() -> Result<u8, StepError> {
    Ok(7)
}

fn main() {
    let flow: Flow<Order> = Flow::new("roots")
        .step(by_ref)
        .step(by_value)
        .step(constant)
        .build();
    assert_eq!(flow.steps().len(), 3);
    assert_eq!(by_ref::SLUG, "by_ref");
}
