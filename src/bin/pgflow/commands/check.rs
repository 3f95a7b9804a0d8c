use pgflow_client::Client;

use crate::{CliResult, print_json};

pub(crate) async fn check(client: &Client, json: bool) -> CliResult {
    let violations = client.check().await.map_err(|err| err.to_string())?;
    if json {
        print_json(&violations)?;
    } else if violations.is_empty() {
        println!("every run is consistent");
    } else {
        for violation in &violations {
            println!("{violation}");
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(format!("{} inconsistencies found", violations.len()))
    }
}
