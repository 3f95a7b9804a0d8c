// A subflow step starts its child run with its dependency's output: the child flow's input
// type must be that output type.
use pgflow::prelude::*;

#[step]
async fn echo(text: String) -> Result<String, StepError> {
    Ok(text)
}

#[step]
async fn count(n: u32) -> Result<u32, StepError> {
    Ok(n)
}

fn main() {
    let echoing: Flow<String> = Flow::new("echoing").step(echo).build();
    // `count` outputs `u32`; `echoing` takes `String`.
    let run = step_fn("run").depends_on(count).subflow(&echoing, echo);
    let _: Flow<u32> = Flow::new("f").step(count).step(run).build();
}
