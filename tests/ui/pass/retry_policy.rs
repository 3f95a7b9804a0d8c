// `max_delay` and `jitter` in `#[step]`: literals, constants, a `Duration`, a `bool`
// expression; a cap below `base_delay` is accepted (every retry then waits `max_delay`).
use std::time::Duration;

use pgflow::prelude::*;

const SPREAD: bool = true;

#[step(base_delay = 1, max_delay = 30, jitter = true)]
async fn capped(n: u8) -> Result<u8, StepError> {
    Ok(n)
}

#[step(depends_on = [capped], max_delay = Duration::from_secs(90), jitter = !SPREAD)]
async fn steady(capped: u8) -> Result<u8, StepError> {
    Ok(capped)
}

#[step(depends_on = [steady], base_delay = 60, max_delay = 5)]
async fn constant(steady: u8) -> Result<u8, StepError> {
    Ok(steady)
}

fn main() {
    let flow: Flow<u8> = Flow::new("policy")
        .max_delay(600)
        .jitter(SPREAD)
        .step(capped)
        .step(steady)
        .step(constant)
        .build();
    assert_eq!(
        flow.statements().unwrap(),
        [
            "SELECT pgflow.create_flow('policy');",
            "SELECT pgflow.add_step('policy', 'capped', base_delay => 1);",
            "SELECT pgflow.add_step('policy', 'steady', ARRAY['capped']);",
            "SELECT pgflow.add_step('policy', 'constant', ARRAY['steady'], base_delay => 60);",
            "SELECT pgflow.set_retry_policy('policy', NULL, 600, true);",
            "SELECT pgflow.set_retry_policy('policy', 'capped', 30, true);",
            "SELECT pgflow.set_retry_policy('policy', 'steady', 90, false);",
            "SELECT pgflow.set_retry_policy('policy', 'constant', 5, NULL);",
        ]
    );
}
