// The same check for steps built from closures.
use pgflow::prelude::*;

fn main() {
    let first = step_fn("first").handler(|n: u64, _: StepContext| async move { Ok(n) });
    let second = step_fn("second")
        .depends_on(&first)
        .handler(|_: u64, first: u64, _: StepContext| async move { Ok(first + 1) });
    let _: Flow<u64> = Flow::new("f").step(second).step(first).build();
}
