//! A web service with an embedded worker: an axum 0.8 app and a pgflow worker share one
//! `PgPool`, one Tokio runtime and one shutdown token.
//!
//! - `POST /orders` takes an order as JSON, starts a run, and answers `202 {"run_id": ...}`;
//! - `GET /runs/{id}` answers the run's full state as JSON (404 for an unknown run);
//! - `GET /runs/{id}/events` streams the run's progress as server-sent events: first a
//!   `snapshot` event with the state at the time of the request, then one event per engine event
//!   (`step:started`, `step:completed`, ...), ending with `run:completed` or `run:failed`.
//!
//! ```text
//! cargo run --features throwaway --example axum_service             # serves on a free port, plays one order, exits
//! cargo run --features throwaway --example axum_service -- --serve  # serves on 127.0.0.1:3000 until Ctrl-C
//! ```
//!
//! With `--serve`, try it with curl:
//!
//! ```text
//! curl -s -X POST localhost:3000/orders -H 'content-type: application/json' \
//!      -d '{"customer": "ada", "items": [{"sku": "tea", "quantity": 2, "unit_cents": 450}]}'
//! curl -sN localhost:3000/runs/<run_id>/events
//! curl -s localhost:3000/runs/<run_id>
//! ```
//!
//! With `DATABASE_URL` set it uses that database; without it, it starts a throwaway PostgreSQL
//! from the binaries on this machine and deletes it on exit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use pgflow::prelude::*;
use pgflow::throwaway::LocalDatabase;
use pgflow::{CancellationToken, RunState, Uuid};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// The flow
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    customer: String,
    items: Vec<Item>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    sku: String,
    quantity: u32,
    unit_cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Priced {
    total_cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Charged {
    charge_id: String,
    total_cents: u64,
}

#[step]
async fn price(order: &Order) -> Result<Priced, StepError> {
    if order.items.is_empty() {
        return Err(StepError::new("an order needs at least one item").no_retry());
    }
    Ok(Priced {
        total_cents: order
            .items
            .iter()
            .map(|item| u64::from(item.quantity) * item.unit_cents)
            .sum(),
    })
}

#[step(depends_on = [price])]
async fn charge(price: Priced, ctx: &StepContext) -> Result<Charged, StepError> {
    tokio::time::sleep(Duration::from_millis(300)).await; // the payment provider
    Ok(Charged {
        charge_id: format!("ch_{}", &ctx.run_id().simple().to_string()[..8]),
        total_cents: price.total_cents,
    })
}

#[step(depends_on = [charge])]
async fn ship(order: &Order, charge: Charged) -> Result<String, StepError> {
    tokio::time::sleep(Duration::from_millis(300)).await; // the warehouse
    Ok(format!(
        "{} item(s) for {}, paid by {}",
        order.items.len(),
        order.customer,
        charge.charge_id
    ))
}

fn order_flow() -> Flow<Order> {
    Flow::new("axum_orders")
        .timeout(30)
        .step(price)
        .step(charge)
        .step(ship)
        .build()
}

// ---------------------------------------------------------------------------------------------
// The HTTP side
// ---------------------------------------------------------------------------------------------

/// What every handler gets: the pgflow client (a pool inside, cheap to clone), and the
/// application's shutdown token, which ends open event streams when the server stops.
#[derive(Clone)]
struct App {
    client: Client,
    shutdown: CancellationToken,
}

fn router(app: App) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/runs/{id}", get(run_state))
        .route("/runs/{id}/events", get(run_events))
        .with_state(app)
}

/// `POST /orders`: the JSON body is the flow's typed input.
async fn create_order(
    State(app): State<App>,
    Json(order): Json<Order>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let run = app.client.start(&order_flow(), &order).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "run_id": run.id() }))))
}

/// `GET /runs/{id}`: the run, its step states and tasks (`RunState` is `Serialize`).
async fn run_state(
    State(app): State<App>,
    Path(run_id): Path<Uuid>,
) -> Result<Json<RunState>, ApiError> {
    Ok(Json(app.client.run_state(run_id).await?))
}

/// `GET /runs/{id}/events`: a snapshot, then the run's events until it ends.
async fn run_events(
    State(app): State<App>,
    Path(run_id): Path<Uuid>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let run = app.client.run(run_id);
    // Subscribe first, then read the state: whatever happens after the snapshot is in the
    // stream (a step may show up in both, which is harmless). For a run that has already ended,
    // `events()` yields just its final event. An unknown run is an error here, hence a 404.
    let events = run.events().await?;
    let snapshot = run.state().await?;

    let first = sse_event("snapshot", &snapshot);
    let live = events.map(|event| match event {
        Ok(event) => sse_event(event.kind.as_str(), &event),
        Err(error) => Event::default().event("error").data(error.to_string()),
    });
    let stream = futures_util::stream::once(std::future::ready(first))
        .chain(live)
        .map(Ok)
        // A graceful shutdown waits for open responses: end the stream when the server stops.
        .take_until(app.shutdown.cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// A server-sent event named `name` with `data` as JSON.
fn sse_event(name: &str, data: &impl Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|error| Event::default().event("error").data(error.to_string()))
}

/// pgflow's errors as HTTP responses.
struct ApiError(pgflow::Error);

impl From<pgflow::Error> for ApiError {
    fn from(error: pgflow::Error) -> Self {
        Self(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            pgflow::Error::UnknownRun(_) => StatusCode::NOT_FOUND,
            pgflow::Error::InvalidInput { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({ "error": self.0.to_string() }))).into_response()
    }
}

// ---------------------------------------------------------------------------------------------
// Start together, stop together
// ---------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let serve = std::env::args().any(|arg| arg == "--serve");

    let db = LocalDatabase::connect().await?;
    let pool = db.pool().clone();
    let client = Client::new(pool.clone());
    client.install().await?;
    client.compile(&order_flow()).await?;

    // One token stops everything: the worker (it stops reading, finishes its running tasks and
    // deregisters) and the server (it stops accepting, and finishes open responses).
    let shutdown = CancellationToken::new();
    let worker = Worker::builder(pool.clone())
        .flow(order_flow())
        .shutdown_token(shutdown.clone())
        .spawn()?;

    let addr: SocketAddr = if serve {
        ([127, 0, 0, 1], 3000).into()
    } else {
        ([127, 0, 0, 1], 0).into() // any free port
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let app = router(App {
        client,
        shutdown: shutdown.clone(),
    });
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );
    println!("listening on http://{addr}");

    if serve {
        tokio::signal::ctrl_c().await?;
        println!("Ctrl-C: shutting down");
    } else {
        demo::play_one_order(addr).await?;
    }
    shutdown.cancel();

    server.await??;
    worker.wait().await?;
    println!("server and worker stopped");
    db.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The demo client
// ---------------------------------------------------------------------------------------------

/// Without `--serve`, the example is its own client so that it finishes by itself. Plain
/// HTTP/1.1 over a `TcpStream`, to need no HTTP client library; in an application's tests, use
/// the HTTP client you already have.
mod demo {
    use std::net::SocketAddr;

    use serde_json::{Value, json};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    pub(super) async fn play_one_order(addr: SocketAddr) -> Result<()> {
        let order = json!({
            "customer": "ada",
            "items": [
                {"sku": "tea", "quantity": 2, "unit_cents": 450},
                {"sku": "scone", "quantity": 3, "unit_cents": 275},
            ],
        });
        let (status, body) = request(addr, "POST", "/orders", Some(&order)).await?;
        println!("POST /orders -> {status} {body}");
        let run_id = serde_json::from_str::<Value>(&body)?["run_id"]
            .as_str()
            .ok_or("no run_id in the response")?
            .to_owned();

        let path = format!("/runs/{run_id}/events");
        println!("GET {path}");
        let events = server_sent_events(addr, &path).await?;
        println!("  (stream ended after {events} events)");

        let (status, body) = request(addr, "GET", &format!("/runs/{run_id}"), None).await?;
        let state: Value = serde_json::from_str(&body)?;
        println!(
            "GET /runs/{run_id} -> {status}: status {}, output {}",
            state["run"]["status"], state["run"]["output"]
        );

        let unknown = format!("/runs/{}", pgflow::Uuid::nil());
        let (status, body) = request(addr, "GET", &unknown, None).await?;
        println!("GET /runs/<unknown> -> {status} {body}");
        Ok(())
    }

    /// Sends one request and reads the whole response: its status code and body.
    async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String)> {
        let mut reader = send(addr, method, path, body).await?;
        let (status, chunked) = read_head(&mut reader).await?;
        let mut body = Vec::new();
        if chunked {
            while let Some(chunk) = read_chunk(&mut reader).await? {
                body.extend(chunk);
            }
        } else {
            reader.read_to_end(&mut body).await?;
        }
        Ok((status, String::from_utf8(body)?))
    }

    /// Reads an event stream to its end, printing each event as it arrives; returns how many.
    async fn server_sent_events(addr: SocketAddr, path: &str) -> Result<usize> {
        let mut reader = send(addr, "GET", path, None).await?;
        let (status, chunked) = read_head(&mut reader).await?;
        if status != 200 || !chunked {
            return Err(format!("unexpected response: {status}, chunked: {chunked}").into());
        }
        let mut pending = String::new();
        let mut count = 0;
        while let Some(chunk) = read_chunk(&mut reader).await? {
            pending.push_str(&String::from_utf8(chunk)?);
            // Events are separated by a blank line; each has `event:` and `data:` fields.
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                let mut name = "message";
                let mut data = "";
                for line in event.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = value.trim();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data = value.trim();
                    }
                }
                count += 1;
                print_event(name, data)?;
            }
        }
        Ok(count)
    }

    fn print_event(name: &str, data: &str) -> Result<()> {
        let data: Value = serde_json::from_str(data).unwrap_or_else(|_| json!(data));
        if name == "snapshot" {
            let steps: Vec<String> = data["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|step| format!("{}={}", step["step_slug"], step["status"]).replace('"', ""))
                .collect();
            println!(
                "  event: snapshot (run {}; {})",
                data["run"]["status"].as_str().unwrap_or("?"),
                steps.join(", ")
            );
        } else {
            let step = data["step_slug"].as_str().unwrap_or("-");
            println!("  event: {name:<15} step: {step}");
        }
        Ok(())
    }

    async fn send(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<BufReader<TcpStream>> {
        let mut stream = TcpStream::connect(addr).await?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        Ok(BufReader::new(stream))
    }

    /// Reads the status line and headers; returns the status and whether the body is chunked.
    async fn read_head(reader: &mut BufReader<TcpStream>) -> Result<(u16, bool)> {
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        let status = line
            .split_whitespace()
            .nth(1)
            .ok_or("no status line")?
            .parse()?;
        let mut chunked = false;
        loop {
            line.clear();
            reader.read_line(&mut line).await?;
            let header = line.trim_end().to_ascii_lowercase();
            if header.is_empty() {
                return Ok((status, chunked));
            }
            chunked |= header == "transfer-encoding: chunked";
        }
    }

    /// Reads one chunk of a chunked body; `None` after the last one.
    async fn read_chunk(reader: &mut BufReader<TcpStream>) -> Result<Option<Vec<u8>>> {
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        let size = usize::from_str_radix(line.trim(), 16)?;
        let mut chunk = vec![0; size + 2]; // the data and its CRLF
        reader.read_exact(&mut chunk).await?;
        chunk.truncate(size);
        Ok((size > 0).then_some(chunk))
    }
}
