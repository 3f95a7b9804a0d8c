use pgflow_client::Client;

use crate::{CliResult, print_json};

pub(crate) async fn install(client: &Client, json: bool) -> CliResult {
    let report = client.install().await.map_err(|err| err.to_string())?;
    if json {
        return print_json(&serde_json::json!({
            "pgmq": report.pgmq,
            "applied": report.applied,
            "schema_version": report.schema_version,
        }));
    }
    let pgmq = match report.pgmq {
        "existing" => "pgmq was already installed",
        "extension" => "installed pgmq (extension)",
        _ => "installed pgmq (SQL-only)",
    };
    println!("{pgmq}");
    if report.applied.is_empty() {
        println!(
            "pgflow schema is up to date (version {})",
            report.schema_version
        );
    } else {
        println!(
            "applied pgflow migrations {:?}; schema version {}",
            report.applied, report.schema_version
        );
    }
    Ok(())
}
