// A map step over a dependency's `Vec<T>` takes one `T`, under any name (even the
// dependency's); its dependents see a `Vec` of its outputs.
use pgflow::prelude::*;

#[derive(Serialize, Deserialize)]
struct Page {
    url: String,
    size: usize,
}

#[step]
async fn urls(site: &String) -> Result<Vec<String>, StepError> {
    Ok(vec![format!("{site}/a")])
}

#[step(map, depends_on = [urls])]
async fn fetch(urls: String) -> Result<Page, StepError> {
    Ok(Page {
        size: urls.len(),
        url: urls,
    })
}

#[step(depends_on = [fetch, urls])]
async fn report(fetch: Vec<Page>, urls: Vec<String>, site: String) -> Result<String, StepError> {
    Ok(format!("{site}: {} of {}", fetch.len(), urls.len()))
}

fn main() {
    let flow: Flow<String> = Flow::new("crawl")
        .step(urls)
        .step(fetch)
        .step(report)
        .build();
    assert_eq!(flow.find_step("fetch").unwrap().kind(), StepKind::Map);
    let _ = |p: Page| p.url;
}

use pgflow::StepKind;
