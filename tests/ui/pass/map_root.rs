// A map step without dependencies maps over the flow input, which is a `Vec` of its element.
use pgflow::prelude::*;

#[step(map)]
async fn square(n: i64, ctx: &StepContext) -> Result<i64, StepError> {
    let _ = ctx.task_index();
    Ok(n * n)
}

#[step(depends_on = [square])]
async fn sum(square: Vec<i64>) -> Result<i64, StepError> {
    Ok(square.iter().sum())
}

fn main() {
    let flow: Flow<Vec<i64>> = Flow::new("squares").step(square).step(sum).build();
    assert_eq!(
        flow.statements().unwrap()[1],
        "SELECT pgflow.add_step('squares', 'square', step_type => 'map');"
    );
}
