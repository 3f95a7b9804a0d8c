use std::io::Write;

use std::fmt::Write as _;

use pgflow_client::Client;
use pgflow_core::FlowOptions;

use crate::CliResult;
use crate::output::print_json;

pub(crate) async fn flows(client: &Client, json: bool, out: &mut impl Write) -> CliResult {
    let flows = client.flows().await?;
    if json {
        return print_json(out, &flows);
    }
    if flows.is_empty() {
        writeln!(out, "no flows")?;
    }
    for flow in flows {
        let o = flow.options;
        writeln!(
            out,
            "{}  (max_attempts {}, base_delay {}s, timeout {}s)",
            flow.slug,
            o.max_attempts.unwrap_or(FlowOptions::DEFAULT_MAX_ATTEMPTS),
            o.base_delay.unwrap_or(FlowOptions::DEFAULT_BASE_DELAY),
            o.timeout.unwrap_or(FlowOptions::DEFAULT_TIMEOUT)
        )?;
        for step in &flow.steps {
            let mut line = format!("  {} [{}]", step.slug, step.kind);
            if !step.dependencies.is_empty() {
                let _ = write!(line, " <- {}", step.dependencies.join(", "));
            }
            let so = &step.options;
            for (name, value) in [
                ("max_attempts", so.max_attempts),
                ("base_delay", so.base_delay),
                ("timeout", so.timeout),
                ("start_delay", so.start_delay),
            ] {
                if let Some(value) = value {
                    let _ = write!(line, " {name}={value}");
                }
            }
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}
