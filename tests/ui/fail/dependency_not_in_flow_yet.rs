// `fulfill` depends on `charge`, which is added after it.
use pgflow::prelude::*;

#[step]
async fn validate(amount: &f64) -> Result<bool, StepError> {
    Ok(*amount > 0.0)
}

#[step(depends_on = [validate])]
async fn charge(validate: bool) -> Result<String, StepError> {
    Ok(validate.to_string())
}

#[step(depends_on = [charge])]
async fn fulfill(charge: String) -> Result<String, StepError> {
    Ok(charge)
}

fn main() {
    let _: Flow<f64> = Flow::new("order")
        .step(validate)
        .step(fulfill)
        .step(charge)
        .build();
}
