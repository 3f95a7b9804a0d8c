// `charge` takes `validate`'s output as `String`, but `validate` outputs `bool`.
use pgflow::prelude::*;

#[step]
async fn validate(amount: &f64) -> Result<bool, StepError> {
    Ok(*amount > 0.0)
}

#[step(depends_on = [validate])]
async fn charge(validate: String) -> Result<String, StepError> {
    Ok(validate)
}

fn main() {}
