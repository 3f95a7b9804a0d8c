// A map subflow step starts one child run per element: the child flow's input type must be
// the element type of its dependency's `Vec`.
use pgflow::prelude::*;

#[step]
async fn double(n: u64) -> Result<u64, StepError> {
    Ok(n * 2)
}

#[step]
async fn names(n: u64) -> Result<Vec<String>, StepError> {
    Ok(vec![n.to_string()])
}

fn main() {
    let doubling: Flow<u64> = Flow::new("doubling").step(double).build();
    // `names` outputs `Vec<String>`; `doubling` takes `u64`.
    let each = step_fn("each").map_over(names).subflow(&doubling, double);
    let _: Flow<u64> = Flow::new("f").step(names).step(each).build();
}
