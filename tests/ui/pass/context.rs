// The context is taken by reference or by value, in any position; a step that does not take
// the flow input fits flows of any input type.
use pgflow::prelude::*;

#[step]
async fn first(ctx: &StepContext, n: u32) -> Result<String, StepError> {
    Ok(format!("{} {n}", ctx.step_slug()))
}

#[step(depends_on = [first])]
async fn second(first: String, ctx: StepContext) -> Result<String, StepError> {
    Ok(format!("{first} {}", ctx.attempt()))
}

#[step]
async fn only_context(ctx: &StepContext) -> Result<bool, StepError> {
    Ok(ctx.is_cancelled())
}

fn main() {
    let _: Flow<u32> = Flow::new("a")
        .step(first)
        .step(second)
        .step(only_context)
        .build();
    let _: Flow<String> = Flow::new("b").step(only_context).build();
}
