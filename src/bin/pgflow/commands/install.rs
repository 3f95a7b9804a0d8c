use std::io::Write;

use pgflow_client::Client;

use crate::CliResult;
use crate::output::print_json;

pub(crate) async fn install(client: &Client, json: bool, out: &mut impl Write) -> CliResult {
    let report = client.install().await?;
    if json {
        return print_json(
            out,
            &serde_json::json!({
                "pgmq": report.pgmq,
                "applied": report.applied,
                "schema_version": report.schema_version,
            }),
        );
    }
    let pgmq = match report.pgmq {
        "existing" => "pgmq was already installed",
        "extension" => "installed pgmq (extension)",
        _ => "installed pgmq (SQL-only)",
    };
    writeln!(out, "{pgmq}")?;
    if report.applied.is_empty() {
        writeln!(
            out,
            "pgflow schema is up to date (version {})",
            report.schema_version
        )?;
    } else {
        writeln!(
            out,
            "applied pgflow migrations {:?}; schema version {}",
            report.applied, report.schema_version
        )?;
    }
    Ok(())
}
