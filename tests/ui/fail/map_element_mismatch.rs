// `fetch` takes `u64` elements, but `urls` outputs `Vec<String>`.
use pgflow::prelude::*;

#[step]
async fn urls(site: &String) -> Result<Vec<String>, StepError> {
    Ok(vec![site.clone()])
}

#[step(map, depends_on = [urls])]
async fn fetch(url: u64) -> Result<u64, StepError> {
    Ok(url)
}

fn main() {}
