// Literal slugs are checked at compile time: `run` is reserved, and slugs have no dashes.
use pgflow::prelude::*;

#[step]
async fn run(n: &u32) -> Result<u32, StepError> {
    Ok(*n)
}

#[step(slug = "send-email", timeout = 0)]
async fn send_email(n: &u32) -> Result<u32, StepError> {
    Ok(*n)
}

fn main() {}
