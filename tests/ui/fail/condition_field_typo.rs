// A misspelt field in a condition pattern does not compile: in `#[step]`, in a nested object,
// in `pattern!`, and in a pattern on a dependency's output.
use pgflow::prelude::*;

#[derive(Serialize, Deserialize)]
struct Customer {
    tier: String,
}

#[derive(Serialize, Deserialize)]
struct Order {
    plan: String,
    customer: Customer,
}

#[step(if_input = Order { plna: "premium" })]
async fn perks(order: &Order) -> Result<usize, StepError> {
    Ok(order.plan.len())
}

#[step(if_not = Order { customer: { teir: "blocked" } })]
async fn welcome(order: &Order) -> Result<String, StepError> {
    Ok(order.customer.tier.clone())
}

#[step]
async fn lookup(order: &Order) -> Result<Customer, StepError> {
    Ok(Customer {
        tier: order.customer.tier.clone(),
    })
}

#[step(depends_on = [lookup], if_input = { lookup: { tire: "gold" } })]
async fn upgrade(lookup: Customer) -> Result<bool, StepError> {
    Ok(lookup.tier.is_empty())
}

fn main() {
    let _ = pattern!(Order { customer: { tierr: "gold" } });
}
