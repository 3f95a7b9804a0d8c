// `charge` is added to the flow twice.
use pgflow::prelude::*;

#[step]
async fn validate(amount: &f64) -> Result<bool, StepError> {
    Ok(*amount > 0.0)
}

#[step(depends_on = [validate])]
async fn charge(validate: bool) -> Result<String, StepError> {
    Ok(validate.to_string())
}

fn main() {
    let _: Flow<f64> = Flow::new("order")
        .step(validate)
        .step(charge)
        .step(charge)
        .build();
}
