// The handlers that `#[step]` generates decode the engine's task input: `run` and dependency
// outputs for a single step, one element for a map step; and report decoding failures.
use pgflow::prelude::*;
use serde_json::json;

#[derive(Serialize, Deserialize)]
struct Order {
    amount: f64,
}

#[step]
async fn validate(order: &Order) -> Result<bool, StepError> {
    Ok(order.amount > 0.0)
}

#[step]
async fn price(order: &Order) -> Result<f64, StepError> {
    Ok(order.amount * 2.0)
}

#[step(depends_on = [validate, price])]
async fn charge(
    order: Order,
    price: f64,
    validate: bool,
    ctx: &StepContext,
) -> Result<String, StepError> {
    Ok(format!(
        "{} {price} {validate} {}",
        order.amount,
        ctx.step_slug()
    ))
}

#[step(depends_on = [charge])]
async fn chars(charge: &String) -> Result<Vec<char>, StepError> {
    Ok(charge.chars().collect())
}

#[step(map, depends_on = [chars])]
async fn letters(c: char) -> Result<u32, StepError> {
    Ok(c as u32)
}

fn main() {
    // The function itself, called directly.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert!(rt.block_on(validate::call(&Order { amount: 1.0 })).unwrap());

    let flow: Flow<Order> = Flow::new("f")
        .step(validate)
        .step(price)
        .step(charge)
        .step(chars)
        .step(letters)
        .build();
    rt.block_on(async {
        let ctx = StepContext::builder(pgflow::Uuid::nil(), "f", "charge").build();
        let charge = flow.find_step("charge").unwrap();
        let out = charge
            .call(json!({"run": {"amount": 1.5}, "validate": true, "price": 3.0}), ctx.clone())
            .await
            .unwrap();
        assert_eq!(out, json!("1.5 3 true charge"));

        let err = charge
            .call(json!({"run": {"amount": 1.5}, "validate": "yes", "price": 3.0}), ctx.clone())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot decode the output of dependency `validate` as `bool`: invalid type: string \"yes\", expected a boolean"
        );

        // A local variable may be named like a step.
        let letters = flow.find_step("letters").unwrap();
        assert_eq!(letters.call(json!("a"), ctx.clone()).await.unwrap(), json!(97));
        assert!(letters.call(json!(1), ctx).await.is_err());
    });
}
