//! `cancel` and `retry`: run control, one run or a flow's runs in batches.

use std::io::Write;

use chrono::{DateTime, Utc};
use pgflow_client::{Cancelled, Client, Error};
use uuid::Uuid;

use crate::CliResult;
use crate::failure::Failure;
use crate::output::print_json;
use crate::time::timestamp;

/// Exit status of `retry` for a run that is started or completed (`args::RETRY_EXIT_STATUS`).
const NOT_RETRYABLE: u8 = 3;

/// What `cancel` and `retry` act on: one run, or the runs of a flow.
#[derive(Debug)]
pub(crate) enum Target {
    /// One run.
    Run(Uuid),
    /// The runs of a flow, those of a time range when given.
    Flow(String, Option<DateTime<Utc>>),
}

impl Target {
    /// The target of the command line's arguments (clap makes sure one of the two is given).
    pub(crate) fn new(
        run_id: Option<Uuid>,
        flow: Option<String>,
        time: Option<DateTime<Utc>>,
    ) -> Result<Self, Failure> {
        match (run_id, flow) {
            (Some(run_id), None) => Ok(Self::Run(run_id)),
            (None, Some(flow)) => Ok(Self::Flow(flow, time)),
            _ => Err(Failure::with_status(2, "give a run id or --flow, not both")),
        }
    }
}

/// `n run` or `n runs`.
fn runs(n: u64) -> String {
    format!("{n} run{}", if n == 1 { "" } else { "s" })
}

pub(crate) async fn cancel(
    client: &Client,
    target: Target,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    match target {
        Target::Run(run_id) => {
            let outcome = client.cancel(run_id).await.map_err(denied("cancel"))?;
            if json {
                return print_json(
                    out,
                    &serde_json::json!({
                        "run_id": run_id,
                        "cancelled": outcome == Cancelled::Now,
                        "status": outcome.status(),
                    }),
                );
            }
            match outcome {
                Cancelled::Now => writeln!(out, "cancelled run {run_id}")?,
                other => writeln!(
                    out,
                    "run {run_id} is already {}: nothing to cancel",
                    other.status()
                )?,
            }
        }
        Target::Flow(flow, started_before) => {
            let cancelled = client
                .cancel_all(&flow, started_before)
                .await
                .map_err(denied("cancel"))?;
            if json {
                return print_json(
                    out,
                    &serde_json::json!({"flow_slug": flow, "cancelled": cancelled}),
                );
            }
            let before = started_before
                .map(|at| format!(" started before {}", timestamp(at)))
                .unwrap_or_default();
            writeln!(out, "cancelled {} of flow {flow}{before}", runs(cancelled))?;
        }
    }
    Ok(())
}

pub(crate) async fn retry(
    client: &Client,
    target: Target,
    json: bool,
    out: &mut impl Write,
) -> CliResult {
    match target {
        Target::Run(run_id) => {
            let retry_count = match client.retry(run_id).await {
                Ok(count) => count,
                Err(err @ Error::NotRetryable { .. }) => {
                    return Err(Failure::with_status(
                        NOT_RETRYABLE,
                        format!("{err}; nothing changed"),
                    ));
                }
                Err(err) => return Err(denied("retry")(err)),
            };
            if json {
                return print_json(
                    out,
                    &serde_json::json!({"run_id": run_id, "retry_count": retry_count}),
                );
            }
            writeln!(
                out,
                "retried run {run_id} (retry {retry_count}): its unfinished steps start again"
            )?;
        }
        Target::Flow(flow, failed_since) => {
            let retried = client
                .retry_all(&flow, failed_since)
                .await
                .map_err(denied("retry"))?;
            if json {
                return print_json(
                    out,
                    &serde_json::json!({"flow_slug": flow, "retried": retried}),
                );
            }
            let since = failed_since
                .map(|at| format!(" since {}", timestamp(at)))
                .unwrap_or_default();
            writeln!(
                out,
                "retried {} of flow {flow} that failed{since}",
                runs(retried)
            )?;
        }
    }
    Ok(())
}

/// An error as the command's failure; a role without the right to `action` is told who grants
/// it (docs/security.md).
fn denied(action: &'static str) -> impl Fn(Error) -> Failure {
    move |err| match &err {
        Error::Database(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {
            Failure::error(format!(
                "{db}: the role may not {action} runs; the schema's owner grants it \
                 (docs/security.md: the run-control grants of pgflow_app)"
            ))
        }
        _ => Failure::from(err),
    }
}
