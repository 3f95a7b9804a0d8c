// Literal option values are checked at compile time against the lower bounds the builder
// shares with pgflow's TypeScript DSL, each refused at the literal with the builder's sentence.
use pgflow::prelude::*;

#[step(timeout = 2, max_attempts = 1, base_delay = 1)]
async fn quick(n: u32) -> Result<u32, StepError> {
    Ok(n)
}

#[step(depends_on = [quick], max_attempts = 0, base_delay = 0, start_delay = 0)]
async fn eager(quick: u32) -> Result<u32, StepError> {
    Ok(quick)
}

fn main() {}
