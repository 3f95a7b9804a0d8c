// Every option, a slug override, options from constants, times as whole seconds or as a
// `Duration` (rounded up), and `crate = ".."` for a renamed dependency.
use pgflow as renamed;
use pgflow::prelude::*;

const RETRIES: u32 = 4;

#[step(
    slug = "first_step",
    max_attempts = RETRIES,
    base_delay = 2,
    timeout = 30,
    start_delay = 10
)]
async fn first(n: u8) -> Result<u8, StepError> {
    Ok(n)
}

#[step(depends_on = [first], crate = "renamed")]
async fn r#second(first: u8) -> Result<u8, renamed::StepError> {
    Ok(first)
}

fn main() {
    let flow: Flow<u8> = Flow::new("opts")
        .max_attempts(1)
        .timeout(std::time::Duration::from_millis(2500))
        .step(first)
        .step(r#second)
        .build();
    assert_eq!(
        flow.statements().unwrap(),
        [
            "SELECT pgflow.create_flow('opts', max_attempts => 1, timeout => 3);",
            "SELECT pgflow.add_step('opts', 'first_step', max_attempts => 4, base_delay => 2, timeout => 30, start_delay => 10);",
            "SELECT pgflow.add_step('opts', 'second', ARRAY['first_step']);",
        ]
    );
    assert_eq!(first::SLUG, "first_step");
}
