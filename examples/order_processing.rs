//! The quickstart: connect (or start a throwaway PostgreSQL), install pgmq and the engine.
//!
//! ```text
//! cargo run --example order_processing
//! ```
//!
//! With `DATABASE_URL` set it uses that database; without it, it starts a throwaway server from
//! the PostgreSQL binaries on this machine and deletes it on exit.

use pgflow_client::throwaway::ThrowawayServer;
use sqlx::postgres::PgPoolOptions;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    // Kept alive until the end of main: dropping it stops the server.
    let mut _server = None;
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => {
            let server = ThrowawayServer::start()?;
            let url = server.url("postgres");
            _server = Some(server);
            url
        }
    };
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect(&url)
        .await?;
    let report = pgflow_client::install(&pool).await?;
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&pool)
        .await?;
    println!("connected to {version}");
    println!(
        "pgmq: {}; pgflow schema version {} (applied now: {:?})",
        report.pgmq, report.schema_version, report.applied
    );
    pool.close().await;
    Ok(())
}
