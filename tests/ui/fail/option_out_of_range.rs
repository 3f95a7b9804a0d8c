// Literal option values are checked at compile time against the bounds the builder and the
// engine enforce: a timeout the engine's integer arithmetic would overflow on is refused at
// the literal, naming the option and the bound; values within bounds compile.
use pgflow::prelude::*;

#[step(timeout = 2147483646, max_attempts = 3)]
async fn slow(n: u32) -> Result<u32, StepError> {
    Ok(n)
}

#[step(depends_on = [slow], start_delay = 31_536_001, base_delay = 86_400)]
async fn later(slow: u32) -> Result<u32, StepError> {
    Ok(slow)
}

fn main() {}
