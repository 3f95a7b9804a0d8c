use std::io::Write;

use pgflow_client::Client;

use crate::CliResult;
use crate::output::print_json;

pub(crate) async fn check(client: &Client, json: bool, out: &mut impl Write) -> CliResult {
    let violations = client.check().await?;
    if json {
        print_json(out, &violations)?;
    } else if violations.is_empty() {
        writeln!(out, "every run is consistent")?;
    } else {
        for violation in &violations {
            writeln!(out, "{violation}")?;
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(format!("{} inconsistencies found", violations.len()).into())
    }
}
