//! `pgflow dashboard`: the web dashboard on an address of its own, until Ctrl-C.

use std::io::Write;
use std::net::SocketAddr;

use pgflow_client::Client;
use pgflow_dashboard::Dashboard;
use sqlx::postgres::PgPoolOptions;

use crate::CliResult;

/// Connections of the dashboard's pool: pages read a few at once; the CLI's own pool holds two.
const CONNECTIONS: u32 = 8;

pub(crate) async fn serve(
    client: &Client,
    listen: SocketAddr,
    allow_actions: bool,
    out: &mut impl Write,
) -> CliResult {
    let options = client.pool().connect_options().as_ref().clone();
    let pool = PgPoolOptions::new()
        .max_connections(CONNECTIONS)
        .connect_lazy_with(options);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|err| format!("cannot listen on {listen}: {err}"))?;
    let address = listener.local_addr()?;
    let mode = if allow_actions {
        "cancel and retry enabled"
    } else {
        "read-only"
    };
    writeln!(
        out,
        "dashboard on http://{address}/ ({mode}); Ctrl-C stops it"
    )?;
    out.flush()?;
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    Dashboard::new(pool.clone())
        .allow_actions(allow_actions)
        .serve(listener, ctrl_c)
        .await?;
    pool.close().await;
    Ok(())
}
