// `fetch` maps over `url`, whose output is a `String`, not a `Vec`.
use pgflow::prelude::*;

#[step]
async fn url(site: &String) -> Result<String, StepError> {
    Ok(site.clone())
}

#[step(map, depends_on = [url])]
async fn fetch(url: char) -> Result<u32, StepError> {
    Ok(url as u32)
}

fn main() {}
