// `perks` may be skipped (its condition's `when_unmet` is the default, `skip`), and `report`
// (`when_exhausted = skip`) too: a dependent takes their outputs as `Option`s, not as they are.
use pgflow::prelude::*;

#[derive(Serialize, Deserialize)]
struct Order {
    plan: String,
}

#[step(if_input = Order { plan: "premium" })]
async fn perks(order: &Order) -> Result<u32, StepError> {
    Ok(order.plan.len() as u32)
}

#[step(when_exhausted = skip)]
async fn report(order: &Order) -> Result<String, StepError> {
    Ok(order.plan.clone())
}

#[step(depends_on = [perks, report])]
async fn thank(perks: u32, report: Option<String>) -> Result<String, StepError> {
    Ok(format!("{perks} {report:?}"))
}

#[step(depends_on = [report])]
async fn archive(report: &String) -> Result<(), StepError> {
    let _ = report;
    Ok(())
}

fn main() {}
