// Subflow steps: a root one takes the flow input, a dependent one its dependency's output, a
// map one an element; each outputs the child's output step's type, which dependents take.
use pgflow::prelude::*;

#[step]
async fn double(n: u64) -> Result<u64, StepError> {
    Ok(n * 2)
}

#[step]
async fn range(n: &u64) -> Result<Vec<u64>, StepError> {
    Ok((0..*n).collect())
}

fn main() {
    let doubling: Flow<u64> = Flow::new("doubling").step(double).build();
    let first = step_fn("first").subflow(&doubling, double);
    let second = step_fn("second").depends_on(&first).subflow(&doubling, double);
    let each = step_fn("each").map_over(range).subflow(&doubling, double);
    let total = step_fn("total")
        .depends_on(&second)
        .depends_on(&each)
        .handler(|_: u64, second: u64, each: Vec<u64>, _: StepContext| async move {
            Ok::<_, StepError>(second + each.iter().sum::<u64>())
        });
    let flow: Flow<u64> = Flow::new("twice")
        .step(range)
        .step(first)
        .step(second)
        .step(each)
        .step(total)
        .build();
    assert_eq!(flow.statements().unwrap().len(), 9);
}
