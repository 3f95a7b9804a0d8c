// A map step over a map step: the first's outputs form the `Vec` the second maps over.
use pgflow::prelude::*;

#[step(map)]
async fn parse(text: String) -> Result<u32, StepError> {
    Ok(text.parse()?)
}

#[step(map, depends_on = [parse])]
async fn double(n: u32) -> Result<u64, StepError> {
    Ok(u64::from(n) * 2)
}

#[step(depends_on = [double])]
async fn total(double: Vec<u64>) -> Result<u64, StepError> {
    Ok(double.into_iter().sum())
}

fn main() {
    let flow: Flow<Vec<String>> = Flow::new("numbers")
        .step(parse)
        .step(double)
        .step(total)
        .build();
    assert_eq!(
        flow.statements().unwrap()[2],
        "SELECT pgflow.add_step('numbers', 'double', ARRAY['parse'], step_type => 'map');"
    );
}
