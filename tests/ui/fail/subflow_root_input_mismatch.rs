// A root subflow step starts its child run with the flow input: the child flow's input type
// must be the parent flow's.
use pgflow::prelude::*;

#[step]
async fn double(n: u64) -> Result<u64, StepError> {
    Ok(n * 2)
}

fn main() {
    let doubling: Flow<u64> = Flow::new("doubling").step(double).build();
    let run = step_fn("run").subflow(&doubling, double);
    // The parent's input is a `String`.
    let _: Flow<String> = Flow::new("f").step(run).build();
}
