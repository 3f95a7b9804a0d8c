// `#[step]` goes on an `async fn` returning `Result`.
use pgflow::prelude::*;

#[step]
fn validate(amount: &f64) -> Result<bool, StepError> {
    Ok(*amount > 0.0)
}

fn main() {}
