//! A flow on a cron schedule, and a run that starts later.
//!
//! The worker fires `every-2s` every two seconds (a six-field expression: seconds first), with
//! an input computed from the tick's time; each tick starts exactly one run, whose id is derived
//! from the schedule's name and the tick. Then a run is started to begin two seconds from now
//! (`Client::start_at`): it exists at once, scheduled, and its step runs at that time. Finally
//! the schedule is paused, as an operator would with `pgflow schedules pause every-2s`.
//!
//! ```text
//! cargo run --features throwaway --example schedule
//! ```
//!
//! With `DATABASE_URL` set it uses that database; without it, it starts a throwaway PostgreSQL
//! from the binaries on this machine and deletes it on exit.

use std::time::Duration;

use chrono::{DateTime, Utc};
use pgflow::prelude::*;
use pgflow::throwaway::LocalDatabase;
use pgflow::{Missed, Schedule};

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    /// The tick that asked for it.
    tick: DateTime<Utc>,
}

#[step]
async fn render(report: &Report) -> Result<String, StepError> {
    Ok(format!("report of {}", report.tick.format("%H:%M:%S")))
}

fn reports() -> Flow<Report> {
    Flow::new("schedule_reports").step(render).build()
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
    client.compile(&reports()).await?;

    let every_two_seconds =
        Schedule::with_input_fn("*/2 * * * * *", &reports(), |tick| Report { tick })
            .name("every-2s")
            .missed(Missed::CatchUp(3));
    let worker = Worker::builder(db.pool().clone())
        .flow(reports())
        .add_schedule(every_two_seconds)
        .spawn()?;

    // A few ticks.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    for schedule in client.schedules().await? {
        println!(
            "schedule {} ({} in {}): last tick {:?}, next {:?}, fired by a worker: {}",
            schedule.schedule_name,
            schedule.cron,
            schedule.timezone,
            schedule.last_fired_tick,
            schedule.next_tick(Utc::now()),
            schedule.firing
        );
    }
    let runs = client
        .recent_runs(Some("schedule_reports"), None, 10)
        .await?;
    println!("{} runs so far", runs.len());

    // A run two seconds from now: listed at once, as scheduled, and run then.
    let at = Utc::now() + chrono::Duration::seconds(2);
    let later = client
        .start_at(at, &reports(), &Report { tick: at })
        .await?;
    let state = later.state().await?;
    println!(
        "run {} is {}, scheduled for {:?}",
        later.id(),
        state.run.status,
        state.run.scheduled_for
    );
    let output = later.wait_timeout(Duration::from_secs(30)).await?;
    println!("it ran: {}", output.output_of(render)?);

    // An operator pauses the schedule: no tick fires until it is resumed.
    client.pause_schedule("every-2s").await?;
    println!("schedule every-2s paused");

    worker.shutdown().await?;
    db.close().await;
    Ok(())
}
