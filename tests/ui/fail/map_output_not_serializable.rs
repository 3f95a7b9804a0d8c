// The same check for a map step, whose dependents receive a `Vec` of its outputs.
use pgflow::prelude::*;

struct Page {
    size: usize,
}

#[step(map)]
async fn fetch(url: String) -> Result<Page, StepError> {
    Ok(Page { size: url.len() })
}

fn main() {}
