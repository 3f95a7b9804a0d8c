//! The quickstart: a three-step flow (validate → charge → fulfill) written as typed `async fn`s,
//! a worker embedded in this program's Tokio runtime, and a client that starts a run and waits
//! for its typed output.
//!
//! ```text
//! cargo run --features throwaway --example order_processing
//! ```
//!
//! With `DATABASE_URL` set it uses that database; without it, it starts a throwaway PostgreSQL
//! from the binaries on this machine and deletes it on exit.

use pgflow::prelude::*;
use pgflow::throwaway::LocalDatabase;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    order_id: u64,
    amount: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Validation {
    approved: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    charge_id: String,
    amount: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Shipment {
    tracking: String,
}

/// A root step: it takes the flow input.
#[step]
async fn validate(order: &Order) -> Result<Validation, StepError> {
    Ok(Validation {
        approved: order.amount > 0.0,
    })
}

/// Takes the flow input and `validate`'s output, by name; retried up to 5 times.
#[step(depends_on = [validate], max_attempts = 5, timeout = 30)]
async fn charge(order: &Order, validate: Validation) -> Result<Receipt, StepError> {
    if !validate.approved {
        return Err(StepError::new("order not approved").no_retry());
    }
    Ok(Receipt {
        charge_id: format!("ch_{}", order.order_id),
        amount: order.amount,
    })
}

/// Takes `charge`'s output and the task's context.
#[step(depends_on = [charge])]
async fn fulfill(charge: Receipt, ctx: &StepContext) -> Result<Shipment, StepError> {
    Ok(Shipment {
        tracking: format!(
            "{}-{}",
            charge.charge_id,
            &ctx.run_id().simple().to_string()[..8]
        ),
    })
}

fn order_processing() -> Flow<Order> {
    Flow::new("order_processing")
        .max_attempts(3)
        .base_delay(5)
        .timeout(60)
        .step(validate)
        .step(charge) // swapping this line with the next one does not compile
        .step(fulfill)
        .build()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();

    let db = LocalDatabase::connect().await?;
    let client = Client::new(db.pool().clone());
    client.install().await?; // pgmq + pgflow schema, idempotent
    client.compile(&order_processing()).await?; // create_flow + add_step, drift detected

    let worker = Worker::builder(db.pool().clone())
        .flow(order_processing())
        .concurrency(10)
        .spawn()?;

    let order = Order {
        order_id: 12345,
        amount: 99.99,
    };
    let run = client.start(&order_processing(), &order).await?;
    println!("started run {}", run.id());
    let output = run.wait_timeout(std::time::Duration::from_secs(60)).await?;
    let shipment: Shipment = output.output_of(fulfill)?; // typed by the step
    let receipt: Receipt = output.output_of(charge)?;
    println!(
        "order {} charged {:.2} ({}), shipped as {}",
        order.order_id, receipt.amount, receipt.charge_id, shipment.tracking
    );
    println!("run output: {}", output.output());

    worker.shutdown().await?; // stops polling, finishes in-flight tasks
    db.close().await;
    Ok(())
}
