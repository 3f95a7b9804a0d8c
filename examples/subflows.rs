//! Subflows: a nightly flow whose map step runs a `payment` flow as a child run per order, and
//! a step after it that takes the children's receipts, typed as the child step's output.
//! The child run's input is the element: `payment` takes an `Order`, which the compiler checks.
//!
//! ```text
//! cargo run --features throwaway --example subflows
//! ```
//!
//! With `DATABASE_URL` set it uses that database; without it, it starts a throwaway PostgreSQL
//! from the binaries on this machine and deletes it on exit.

use std::time::Duration;

use pgflow::prelude::*;
use pgflow::throwaway::LocalDatabase;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    order_id: u64,
    cents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Receipt {
    order_id: u64,
    charged: u64,
}

/// The child flow's one step: charges an order (here, a tenth of it is the fee).
#[step]
async fn charge(order: &Order) -> Result<Receipt, StepError> {
    Ok(Receipt {
        order_id: order.order_id,
        charged: order.cents + order.cents / 10,
    })
}

/// The child flow: one run per order, served by any worker of `payment`.
fn payment() -> Flow<Order> {
    Flow::new("payment").step(charge).build()
}

/// The parent's first step: the orders of the night.
#[step]
async fn orders(count: &u64) -> Result<Vec<Order>, StepError> {
    Ok((1..=*count)
        .map(|order_id| Order {
            order_id,
            cents: order_id * 100,
        })
        .collect())
}

/// The parent: `pay_all` runs `payment` once per order and outputs `charge`'s receipts in
/// order; `total` takes them as `Vec<Receipt>`.
fn nightly() -> Flow<u64> {
    let pay_all = step_fn("pay_all")
        .map_over(orders)
        .subflow(&payment(), charge);
    let total = step_fn("total").depends_on(&pay_all).handler(
        |_: u64, receipts: Vec<Receipt>, _: StepContext| async move {
            Ok::<_, StepError>(receipts.iter().map(|r| r.charged).sum::<u64>())
        },
    );
    Flow::new("nightly")
        .step(orders)
        .step(pay_all)
        .step(total)
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

    println!("{}", nightly().to_sql()?);

    let db = LocalDatabase::connect().await?;
    let client = Client::new(db.pool().clone());
    client.install().await?;
    // The child first: the engine refuses a subflow step whose child flow does not exist.
    client.compile(&payment()).await?;
    client.compile(&nightly()).await?;
    let worker = Worker::builder(db.pool().clone())
        .flow(nightly())
        .flow(payment())
        .spawn()?;

    let run = client.start(&nightly(), &5).await?;
    let output = run.wait_timeout(Duration::from_secs(60)).await?;
    // `total` is a leaf: its output is in the run's output under its slug.
    let total = output.output()["total"]
        .as_u64()
        .ok_or("total is not a number")?;
    let children = client.children(run.id()).await?;
    println!("nightly run {}: total {total} cents", run.id());
    for child in &children {
        println!(
            "  {}[{}] -> {} run {} ({})",
            child.step_slug, child.task_index, child.flow_slug, child.run_id, child.status
        );
    }
    assert_eq!(total, (1..=5).map(|n| n * 110).sum::<u64>());
    assert_eq!(children.len(), 5);

    worker.shutdown().await?;
    db.close().await;
    Ok(())
}
