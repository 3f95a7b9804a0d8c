// Modes are `fail`, `skip` and `skip_cascade` (or the engine's names, in a string).
use pgflow::prelude::*;

#[step(when_unmet = skip-cascade)]
async fn first(n: &u32) -> Result<u32, StepError> {
    Ok(*n)
}

#[step(when_exhausted = retry)]
async fn second(n: &u32) -> Result<u32, StepError> {
    Ok(*n)
}

#[step(when_exhausted = "skip_cascade")]
async fn third(n: &u32) -> Result<u32, StepError> {
    Ok(*n)
}

fn main() {
    // The builder takes the mode as a type, not as a `SkipMode` value.
    let _ = step_fn("fourth")
        .when_exhausted(pgflow::SkipMode::Skip)
        .handler(|n: u32, _: StepContext| async move { Ok::<_, StepError>(n) });
}
