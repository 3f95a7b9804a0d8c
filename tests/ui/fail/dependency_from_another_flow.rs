// `report` depends on `count`, a step of another flow.
use pgflow::prelude::*;

#[step]
async fn count(text: &String) -> Result<usize, StepError> {
    Ok(text.len())
}

#[step(depends_on = [count])]
async fn report(count: usize) -> Result<String, StepError> {
    Ok(count.to_string())
}

fn main() {
    let _counting: Flow<String> = Flow::new("counting").step(count).build();
    let _reporting: Flow<String> = Flow::new("reporting").step(report).build();
}
