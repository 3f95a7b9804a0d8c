// A step's output is stored as JSON: `Receipt` must be `Serialize` and `Deserialize`.
use pgflow::prelude::*;

struct Receipt {
    amount: f64,
}

#[step]
async fn charge(amount: &f64) -> Result<Receipt, StepError> {
    Ok(Receipt { amount: *amount })
}

fn main() {}
