// A map step maps over exactly one dependency.
use pgflow::prelude::*;

#[step]
async fn left(n: &u32) -> Result<Vec<u32>, StepError> {
    Ok(vec![*n])
}

#[step]
async fn right(n: &u32) -> Result<Vec<u32>, StepError> {
    Ok(vec![*n])
}

#[step(map, depends_on = [left, right])]
async fn both(n: u32) -> Result<u32, StepError> {
    Ok(n)
}

fn main() {
    let _: Flow<u32> = Flow::new("f").step(left).step(right).step(both).build();
}
