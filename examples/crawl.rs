//! Fan-out and fan-in: one step lists pages, a map step fetches each page in parallel, and a
//! reduce step sums the results. Progress is printed while the tasks complete, from the
//! engine's events and from the run's state.
//!
//! ```text
//! cargo run --features throwaway --example crawl
//! ```
//!
//! With `DATABASE_URL` set it uses that database; without it, it starts a throwaway PostgreSQL
//! from the binaries on this machine and deletes it on exit.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pgflow::TaskStatus;
use pgflow::prelude::*;
use pgflow::throwaway::LocalDatabase;

/// The flow input: which site to crawl, and how many pages it has.
#[derive(Debug, Serialize, Deserialize)]
struct Site {
    base_url: String,
    pages: usize,
}

/// What fetching one page found.
#[derive(Debug, Serialize, Deserialize)]
struct Page {
    url: String,
    bytes: usize,
    links: usize,
}

/// What the whole crawl found.
#[derive(Debug, Serialize, Deserialize)]
struct Summary {
    pages: usize,
    bytes: usize,
    links: usize,
    largest: String,
}

/// An "array" step: an ordinary step whose output is a `Vec`, which a map step can fan out over.
#[step]
async fn urls(site: &Site) -> Result<Vec<String>, StepError> {
    Ok((1..=site.pages)
        .map(|page| format!("{}/page/{page}", site.base_url))
        .collect())
}

/// A map step: one task per URL, run in parallel (up to the worker's concurrency). Each task
/// takes one element of `urls`' output; `max_attempts = 2` applies to each task separately.
#[step(map, depends_on = [urls], max_attempts = 2, timeout = 10)]
async fn fetch(url: String) -> Result<Page, StepError> {
    // Simulated network work: a sleep whose length depends on the URL.
    let digits: usize = url
        .chars()
        .filter_map(|c| c.to_digit(10))
        .map(|d| d as usize)
        .sum();
    tokio::time::sleep(Duration::from_millis(150 + 40 * (digits as u64 % 7))).await;
    Ok(Page {
        bytes: 1_000 + 137 * digits,
        links: digits % 5,
        url,
    })
}

/// The reduce step: it takes the map step's outputs as a `Vec`, in the order of the URLs
/// (whatever order the tasks finished in).
#[step(depends_on = [fetch])]
async fn total(fetch: Vec<Page>) -> Result<Summary, StepError> {
    let largest = fetch
        .iter()
        .max_by_key(|page| page.bytes)
        .map(|page| page.url.clone())
        .unwrap_or_default();
    Ok(Summary {
        pages: fetch.len(),
        bytes: fetch.iter().map(|page| page.bytes).sum(),
        links: fetch.iter().map(|page| page.links).sum(),
        largest,
    })
}

fn crawl() -> Flow<Site> {
    Flow::new("crawl")
        .timeout(30)
        .step(urls)
        .step(fetch)
        .step(total)
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let db = LocalDatabase::connect().await?;
    let client = Client::new(db.pool().clone());
    client.install().await?;
    client.compile(&crawl()).await?;

    // Four handlers at a time: twelve pages are fetched in about three waves.
    let worker = Worker::builder(db.pool().clone())
        .flow(crawl())
        .concurrency(4)
        .spawn()?;

    // Subscribe before starting, so that no event of the run is missed.
    let subscription = client.subscribe().await?;
    let site = Site {
        base_url: "https://example.com".into(),
        pages: 12,
    };
    let started = Instant::now();
    let run = client.start(&crawl(), &site).await?;
    println!("started run {} over {} pages", run.id(), site.pages);

    // Events are per run and per step (a map step has one `step:started` and one
    // `step:completed`); the progress of its tasks is in the run's state, polled here.
    let mut events = subscription.run_events(run.id());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut fetched_before = 0;
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                let event = event?;
                println!("[{:>5} ms] event {event}", started.elapsed().as_millis());
                if event.kind.ends_run() {
                    break;
                }
            }
            _ = tick.tick() => {
                let state = run.state().await?;
                let fetch_tasks: Vec<_> =
                    state.tasks.iter().filter(|task| task.step_slug == "fetch").collect();
                let fetched = fetch_tasks.iter().filter(|task| task.status == TaskStatus::Completed).count();
                if fetched != fetched_before {
                    fetched_before = fetched;
                    println!(
                        "[{:>5} ms] fetched {fetched}/{} pages",
                        started.elapsed().as_millis(),
                        fetch_tasks.len()
                    );
                }
            }
        }
    }

    // The run has ended: `wait` returns at once with its outputs (or its failure as an error).
    let output = run.wait().await?;
    let pages: Vec<Page> = output.output_of(fetch)?;
    let summary: Summary = output.output_of(total)?;
    println!(
        "first page: {} ({} bytes); last page: {} ({} bytes)",
        pages[0].url,
        pages[0].bytes,
        pages[pages.len() - 1].url,
        pages[pages.len() - 1].bytes
    );
    println!(
        "crawled {} pages, {} bytes, {} links; largest: {} (in {} ms)",
        summary.pages,
        summary.bytes,
        summary.links,
        summary.largest,
        started.elapsed().as_millis()
    );

    worker.shutdown().await?;
    db.close().await;
    Ok(())
}
