//! Conditional steps: a step that runs only for premium orders (its condition checked by the
//! engine, its field names by the compiler), a step that gives up without failing the run, and
//! a dependent that receives both as `Option`s. Two runs: one where the condition holds, one
//! where it does not.
//!
//! ```text
//! cargo run --features throwaway --example conditions
//! ```
//!
//! With `DATABASE_URL` set it uses that database; without it, it starts a throwaway PostgreSQL
//! from the binaries on this machine and deletes it on exit.

use std::time::Duration;

use pgflow::prelude::*;
use pgflow::throwaway::LocalDatabase;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Plan {
    #[serde(rename = "free")]
    Free,
    #[serde(rename = "premium")]
    Premium,
}

#[derive(Debug, Serialize, Deserialize)]
struct Customer {
    tier: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    order_id: u64,
    plan: Plan,
    customer: Customer,
}

/// Runs only when the order is premium; skipped otherwise (`when_unmet` is `skip` unless set).
/// `Order { plan: .. }` is checked against the `Order` type: `plna` would not compile.
#[step(if_input = Order { plan: Plan::Premium })]
async fn perks(order: &Order) -> Result<String, StepError> {
    Ok(format!("{} lounge pass", order.customer.tier))
}

/// A flaky service that is allowed to give up: after its one attempt it is skipped, and the
/// run goes on.
#[step(max_attempts = 1, when_exhausted = skip)]
async fn recommend(order: &Order) -> Result<Vec<String>, StepError> {
    Err(StepError::new(format!(
        "recommendations for order {} are unavailable",
        order.order_id
    )))
}

/// Always runs. `perks` and `recommend` may be skipped, so their outputs are `Option`s here:
/// taking `String` for `perks` would not compile.
#[step(depends_on = [perks, recommend])]
async fn receipt(
    order: &Order,
    perks: Option<String>,
    recommend: Option<Vec<String>>,
) -> Result<String, StepError> {
    Ok(format!(
        "order {}: {}, {} recommendations",
        order.order_id,
        perks.as_deref().unwrap_or("no perks"),
        recommend.map_or(0, |r| r.len())
    ))
}

/// Runs only when `perks` produced a lounge pass for a gold customer: a condition on a
/// dependency's output, keyed by its slug.
#[step(depends_on = [perks], if_input = { perks: "gold lounge pass" })]
async fn concierge(perks: Option<String>) -> Result<String, StepError> {
    Ok(format!(
        "concierge booked with {}",
        perks.unwrap_or_default()
    ))
}

fn orders() -> Flow<Order> {
    Flow::new("conditional_orders")
        .base_delay(1)
        .step(perks)
        .step(recommend)
        .step(receipt)
        .step(concierge)
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

    println!("{}", orders().to_sql()?);

    let db = LocalDatabase::connect().await?;
    let client = Client::new(db.pool().clone());
    client.install().await?;
    client.compile(&orders()).await?;
    let worker = Worker::builder(db.pool().clone()).flow(orders()).spawn()?;

    for (order_id, plan) in [(1, Plan::Premium), (2, Plan::Free)] {
        let order = Order {
            order_id,
            plan,
            customer: Customer {
                tier: "gold".into(),
            },
        };
        let run = client.start(&orders(), &order).await?;
        let output = run.wait_timeout(Duration::from_secs(60)).await?;
        // Steps that may be skipped have `Option` outputs: `None` when they were.
        let perks: Option<String> = output.output_of(perks)?;
        let recommend: Option<Vec<String>> = output.output_of(recommend)?;
        let concierge: Option<String> = output.output_of(concierge)?;
        let receipt: String = output.output_of(receipt)?;
        println!("{plan:?} order: {receipt}");
        println!("  perks: {perks:?}, recommendations: {recommend:?}, concierge: {concierge:?}");
        assert_eq!(recommend, None, "recommend gives up and is skipped");
        match plan {
            Plan::Premium => {
                assert_eq!(perks.as_deref(), Some("gold lounge pass"));
                assert!(concierge.is_some());
            }
            Plan::Free => {
                assert_eq!((perks, concierge), (None, None));
            }
        }
    }

    worker.shutdown().await?;
    db.close().await;
    Ok(())
}
