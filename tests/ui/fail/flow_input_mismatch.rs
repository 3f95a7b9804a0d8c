// `validate` takes an `f64` flow input; this flow's input is a `String`.
use pgflow::prelude::*;

#[step]
async fn validate(amount: &f64) -> Result<bool, StepError> {
    Ok(*amount > 0.0)
}

fn main() {
    let _: Flow<String> = Flow::new("f").step(validate).build();
}
