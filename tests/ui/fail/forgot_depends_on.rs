// `charge` takes `validate`'s output, but does not list it in `depends_on`.
use pgflow::prelude::*;

#[step]
async fn validate(amount: &f64) -> Result<bool, StepError> {
    Ok(*amount > 0.0)
}

#[step]
async fn charge(amount: &f64, validate: bool) -> Result<f64, StepError> {
    Ok(if validate { *amount } else { 0.0 })
}

fn main() {}
