// A literal `max_delay` is checked at compile time like the other times: refused at the
// literal, with the builder's sentence, above one day or below one second. `jitter` takes a
// `bool`.
use pgflow::prelude::*;

#[step(base_delay = 10, max_delay = 86_401)]
async fn patient(n: u32) -> Result<u32, StepError> {
    Ok(n)
}

#[step(depends_on = [patient], max_delay = 0, jitter = true)]
async fn eager(patient: u32) -> Result<u32, StepError> {
    Ok(patient)
}

#[step(jitter = 1)]
async fn numeric(n: u32) -> Result<u32, StepError> {
    Ok(n)
}

fn main() {}
