//! A Rust worker for a flow that was not written in Rust: the flow is compiled from SQL text,
//! as `npx pgflow compile` produces it for TypeScript users, and the worker serves it with
//! untyped handlers, by flow slug and step slug, over JSON.
//!
//! ```text
//! cargo run --features throwaway --example untyped_worker
//! ```
//!
//! With `DATABASE_URL` set it uses that database; without it, it starts a throwaway PostgreSQL
//! from the binaries on this machine and deletes it on exit.

use std::time::Duration;

use pgflow::prelude::*;
use pgflow::throwaway::LocalDatabase;
use serde_json::{Value, json};

/// The flow's definition, as a TypeScript project keeps it in a migration. `create_flow` and
/// `add_step` do nothing for a flow or step that already exists, so running this twice is
/// harmless (but it does not notice a definition that changed: `Client::compile` does, for
/// flows written in Rust).
const GREET_USER_SQL: &str = "
SELECT pgflow.create_flow('greet_user', max_attempts => 3, base_delay => 1, timeout => 10);
SELECT pgflow.add_step('greet_user', 'full_name');
SELECT pgflow.add_step('greet_user', 'languages');
SELECT pgflow.add_step('greet_user', 'salutation', ARRAY['languages'], step_type => 'map');
SELECT pgflow.add_step('greet_user', 'message', ARRAY['full_name', 'salutation']);
";

/// The run's result, read back as a typed value.
#[derive(Debug, Deserialize)]
struct Message {
    text: String,
    greetings: usize,
}

/// Reads a string field of a JSON object, or fails the task for good: a malformed input will
/// not get better on a later attempt.
fn string_at<'a>(value: &'a Value, pointer: &str) -> Result<&'a str, StepError> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .ok_or_else(|| StepError::new(format!("input has no string at {pointer}")).no_retry())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let db = LocalDatabase::connect().await?;
    let client = Client::new(db.pool().clone());
    client.install().await?;
    sqlx::raw_sql(GREET_USER_SQL).execute(db.pool()).await?;

    // What the database now holds, as the client reads it back.
    if let Some(shape) = client.flow_shape("greet_user").await? {
        for step in &shape.steps {
            println!(
                "step {:<10} {:?}, depends on {:?}",
                step.slug, step.kind, step.dependencies
            );
        }
    }

    // One handler per step; a step without one would fail its tasks with a message saying so.
    // A single step receives `{"run": <flow input>, "<dependency>": <its output>, ...}`;
    // a map step receives one element of its dependency's array.
    let worker = Worker::builder(db.pool().clone())
        .handler("greet_user", "full_name", |input: Value, _ctx| async move {
            let first = string_at(&input, "/run/first_name")?;
            let last = string_at(&input, "/run/last_name")?;
            Ok(json!(format!("{first} {last}")))
        })
        .handler("greet_user", "languages", |input: Value, _ctx| async move {
            Ok(input["run"]["languages"].clone())
        })
        .handler(
            "greet_user",
            "salutation",
            |language: Value, ctx| async move {
                let word = match language.as_str() {
                    Some("en") => "Hello",
                    Some("fr") => "Bonjour",
                    Some("de") => "Hallo",
                    Some("es") => "Hola",
                    other => {
                        return Err(
                            StepError::new(format!("unknown language {other:?}")).no_retry()
                        );
                    }
                };
                println!("  salutation task {} -> {word}", ctx.task_index());
                Ok(json!(word))
            },
        )
        .handler("greet_user", "message", |input: Value, _ctx| async move {
            let name = string_at(&input, "/full_name")?;
            let words: Vec<String> = serde_json::from_value(input["salutation"].clone())?;
            Ok(json!({
                "text": format!("{}, {name}!", words.join(" / ")),
                "greetings": words.len(),
            }))
        })
        .spawn()?;

    // No typed `Flow` value here: the run is started by slug, with a JSON input.
    let input = json!({
        "first_name": "Ada",
        "last_name": "Lovelace",
        "languages": ["en", "fr", "de", "es"],
    });
    let run = client.start_json("greet_user", input, None).await?;
    println!("started run {}", run.id());
    let output = run.wait_timeout(Duration::from_secs(30)).await?;

    let message: Message = output.output_as("message")?;
    let salutations: Vec<String> = output.output_as("salutation")?;
    println!("salutations, in element order: {salutations:?}");
    println!(
        "message: {} ({} greetings)",
        message.text, message.greetings
    );
    println!("run output as stored: {}", output.output());

    worker.shutdown().await?;
    db.close().await;
    Ok(())
}
