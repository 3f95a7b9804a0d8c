// A step takes the outputs of its dependencies by name, in any order, by value or reference,
// with or without the flow input; it may depend on a step without taking its output.
use pgflow::prelude::*;

#[derive(Serialize, Deserialize)]
struct Order {
    amount: f64,
}

#[derive(Serialize, Deserialize)]
struct Validation {
    ok: bool,
}

#[step]
async fn validate(order: &Order) -> Result<Validation, StepError> {
    Ok(Validation {
        ok: order.amount > 0.0,
    })
}

#[step]
pub(crate) async fn price(order: &Order) -> Result<f64, StepError> {
    Ok(order.amount * 1.2)
}

#[step(depends_on = [validate, price])]
async fn charge(price: f64, order: &Order, validate: &Validation) -> Result<String, StepError> {
    Ok(format!("{} {} {}", validate.ok, price, order.amount))
}

#[step(depends_on = [charge, validate])]
async fn notify(charge: String) -> Result<(), StepError> {
    let _ = charge;
    Ok(())
}

mod nested {
    use pgflow::prelude::*;

    #[step(depends_on = [super::price])]
    pub(crate) async fn rounded(price: f64) -> Result<i64, StepError> {
        Ok(price.round() as i64)
    }
}

fn main() {
    {
        // Locals may be named like steps (and then shadow them, as for any function).
        let charge = 1;
        let _ = charge;
    }
    let flow: Flow<Order> = Flow::new("deps")
        .step(validate)
        .step(price)
        .step(charge)
        .step(notify)
        .step(nested::rounded)
        .build();
    assert_eq!(
        flow.statements().unwrap()[3..],
        [
            "SELECT pgflow.add_step('deps', 'charge', ARRAY['validate', 'price']);",
            "SELECT pgflow.add_step('deps', 'notify', ARRAY['charge', 'validate']);",
            "SELECT pgflow.add_step('deps', 'rounded', ARRAY['price']);",
        ]
    );
}
