//! Retries with exponential backoff, and errors that are not worth retrying.
//!
//! The first run has a flaky step that fails on its first two attempts and succeeds on the third.
//! The engine retries a failed attempt after `base_delay * 2^attempts` seconds: with
//! `base_delay(1)`, 2 s after the first failure and 4 s after the second. The timestamps of the
//! attempts show it.
//!
//! The second run has a step that gives up at once with `StepError::new(..).no_retry()`: the run
//! fails after one attempt, and waiting for it returns `Error::RunFailed`, which names the step,
//! the task and the message.
//!
//! ```text
//! cargo run --features throwaway --example retries
//! ```
//!
//! With `DATABASE_URL` set it uses that database; without it, it starts a throwaway PostgreSQL
//! from the binaries on this machine and deletes it on exit.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgflow::prelude::*;
use pgflow::throwaway::LocalDatabase;

/// When the program started, for the timestamps.
fn elapsed() -> String {
    static START: OnceLock<Instant> = OnceLock::new();
    let secs = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    format!("[{secs:>5.2} s]")
}

#[derive(Debug, Serialize, Deserialize)]
struct Payment {
    invoice: String,
    amount_cents: u64,
}

/// Fails on attempts 1 and 2 (say, the payment provider times out), succeeds on attempt 3.
/// `ctx.attempt()` counts from 1.
#[step(max_attempts = 3)]
async fn charge(payment: &Payment, ctx: &StepContext) -> Result<String, StepError> {
    let attempt = ctx.attempt();
    if attempt < 3 {
        println!("{} charge: attempt {attempt} fails", elapsed());
        return Err(StepError::new(format!(
            "payment provider timed out (attempt {attempt})"
        )));
    }
    println!("{} charge: attempt {attempt} succeeds", elapsed());
    Ok(format!(
        "charged {} cents for {}",
        payment.amount_cents, payment.invoice
    ))
}

fn payments() -> Flow<Payment> {
    Flow::new("retries_payments")
        .max_attempts(5)
        .base_delay(1) // retry n waits 1 * 2^n seconds: 2 s, then 4 s
        .step(charge)
        .build()
}

/// Refuses a negative amount: no later attempt would do better, so the error is marked
/// `no_retry()` and the task fails at once, whatever `max_attempts` says.
#[step]
async fn refund(amount_cents: i64, ctx: &StepContext) -> Result<u64, StepError> {
    println!("{} refund: attempt {}", elapsed(), ctx.attempt());
    u64::try_from(amount_cents).map_err(|_| {
        StepError::new(format!("cannot refund a negative amount ({amount_cents})")).no_retry()
    })
}

fn refunds() -> Flow<i64> {
    Flow::new("retries_refunds")
        .max_attempts(5)
        .base_delay(1)
        .step(refund)
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The worker logs each failed attempt at ERROR level; this example prints
                // them itself.
                .unwrap_or_else(|_| "warn,pgflow_client=off".into()),
        )
        .init();

    let db = LocalDatabase::connect().await?;
    let client = Client::new(db.pool().clone());
    client.install().await?;
    client.compile(&payments()).await?;
    client.compile(&refunds()).await?;

    let worker = Worker::builder(db.pool().clone())
        .flow(payments())
        .flow(refunds())
        .spawn()?;

    // 1. A flaky step: two failures, two growing waits, then success.
    let payment = Payment {
        invoice: "INV-1001".into(),
        amount_cents: 4_200,
    };
    println!("{} starting a payment run", elapsed());
    let run = client.start(&payments(), &payment).await?;
    let output = run.wait_timeout(Duration::from_secs(30)).await?;
    println!("{} run completed: {}", elapsed(), output.output_of(charge)?);

    // How the engine recorded it: one task, three attempts, the last error kept until success.
    let state = run.state().await?;
    for task in &state.tasks {
        println!(
            "  task {}[{}]: {} after {} attempt(s)",
            task.step_slug, task.task_index, task.status, task.attempts_count
        );
    }

    // 2. A permanent error: the run fails after a single attempt.
    println!("{} starting a refund run with a negative amount", elapsed());
    let run = client.start(&refunds(), &-500).await?;
    match run.wait_timeout(Duration::from_secs(30)).await {
        Err(pgflow::Error::RunFailed(failure)) => {
            println!("{} run failed: {failure}", elapsed());
            // `attempts` is the step's max_attempts, not 1: a no_retry error fails the task by
            // raising its attempt count to the limit, so the engine stops retrying it.
            println!(
                "  failed step: {}, task {:?}, attempts counted: {}",
                failure.step_slug, failure.task_index, failure.attempts
            );
            println!("  message: {}", failure.error_message);
        }
        Err(other) => return Err(other.into()),
        Ok(output) => return Err(format!("expected a failure, got {}", output.output()).into()),
    }

    worker.shutdown().await?;
    db.close().await;
    Ok(())
}
