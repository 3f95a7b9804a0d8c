//! A worker that loses its connection while reporting a completion, in both ways that can go:
//!
//! - before the report was applied: the worker's `complete_tasks` waits on a lock the test holds,
//!   and the test terminates that backend;
//! - after it was applied: a TCP proxy between worker and server lets the report commit, then
//!   swallows the reply and closes the connection;
//!
//! and, bluntly, every connection of the workers terminated again and again during many runs.
//! Either way the run completes, each task is completed once, and no handler runs again for a
//! report that was merely unacknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgflow_client::WorkerHandle;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{Executions, assert_squares_completed, compile_squares, squares, worker};
use crate::support::{database, finished_all, start, tasks_of};

/// The `application_name` of worker connections, to find (and terminate) them.
const WORKER_APP: &str = "reliability_worker";

/// A pool for a worker, whose connections are named [`WORKER_APP`].
async fn worker_pool(url: &str) -> PgPool {
    let options: PgConnectOptions = url.parse().expect("url");
    PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options.application_name(WORKER_APP))
        .await
        .expect("worker pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_before_the_completion_landed_is_reported_again() {
    let db = database().await;
    let pool = db.pool();
    let executions = Executions::default();
    let flow = squares("cut_before", Duration::from_millis(300), &executions);
    compile_squares(pool, &flow).await;
    let worker_pool = worker_pool(db.url()).await;
    let worker = worker(&worker_pool, &flow, 4);
    let run = start(pool, "cut_before", json!(1)).await;

    // Hold the run row while the only map task runs: its completion has to wait for it.
    let mut blocker = PgConnection::connect(db.url()).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let started: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pgflow.step_tasks WHERE run_id = $1 \
                             AND step_slug = 'square' AND status = 'started')",
        )
        .bind(run)
        .fetch_one(pool)
        .await
        .expect("square task");
        if started {
            break;
        }
        assert!(Instant::now() < deadline, "square never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sqlx::query("BEGIN")
        .execute(&mut blocker)
        .await
        .expect("begin");
    sqlx::query("SELECT 1 FROM pgflow.runs WHERE run_id = $1 FOR UPDATE")
        .bind(run)
        .execute(&mut blocker)
        .await
        .expect("lock the run");

    // The worker's report now waits on the lock: cut that connection.
    let deadline = Instant::now() + Duration::from_secs(20);
    let terminated = loop {
        let terminated: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
              WHERE datname = current_database() AND application_name = $1 \
                AND wait_event_type = 'Lock' AND query LIKE '%complete_tasks%'",
        )
        .bind(WORKER_APP)
        .fetch_all(pool)
        .await
        .expect("terminate");
        if !terminated.is_empty() {
            break terminated;
        }
        assert!(
            Instant::now() < deadline,
            "the completion never waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(terminated, [true]);
    sqlx::query("ROLLBACK")
        .execute(&mut blocker)
        .await
        .expect("release");

    assert_squares_completed(pool, &[run], &[1], &executions, Duration::from_secs(30)).await;
    // Reported again, not run again.
    for task in tasks_of(pool, &[run]).await {
        let (step, index) = (&task.step_slug, task.task_index);
        assert_eq!(task.attempts_count, 1, "{step}/{index}");
        let index = u32::try_from(index).unwrap_or_default();
        assert_eq!(executions.of(task.run_id, step, index), 1, "{step}/{index}");
    }
    settled(&worker, 3).await;
    worker.shutdown().await.expect("shutdown");
}

/// Waits until the worker has settled every report: `completed` of them, none failed.
async fn settled(worker: &WorkerHandle, completed: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = worker.stats();
        if stats.in_flight == 0 {
            assert_eq!((stats.completed, stats.failed), (completed, 0), "{stats:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reports never settled: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TCP proxy in front of PostgreSQL that, for the first `cuts` connections that send a
/// `complete_tasks` call, lets the call run and commit (the server's `CommandComplete` then
/// `ReadyForQuery`), drops the reply and closes the connection.
struct CuttingProxy {
    port: u16,
    left: Arc<AtomicUsize>,
    cut: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl CuttingProxy {
    async fn start(server_port: u16, cuts: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let left = Arc::new(AtomicUsize::new(cuts));
        let cut = Arc::new(AtomicUsize::new(0));
        let (l, c) = (Arc::clone(&left), Arc::clone(&cut));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (l, c) = (Arc::clone(&l), Arc::clone(&c));
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)).await {
                        relay(client, server, l, c).await;
                    }
                });
            }
        });
        Self {
            port,
            left,
            cut,
            accept,
        }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies bytes both ways; the server's side is read message by message (type byte, length)
/// so that the cut comes exactly after the `ReadyForQuery` that follows the commit.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    left: Arc<AtomicUsize>,
    cut: Arc<AtomicUsize>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let armed = Arc::new(AtomicBool::new(false));
    let armed_up = Arc::clone(&armed);
    let up = async move {
        let mut buffer = vec![0_u8; 64 * 1024];
        let mut window: Vec<u8> = Vec::new();
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            window.extend_from_slice(&buffer[..n]);
            if window.windows(14).any(|w| w == b"complete_tasks") {
                armed_up.store(true, Ordering::SeqCst);
            }
            let keep = window.len().saturating_sub(13);
            window.drain(..keep);
            if server_write.write_all(&buffer[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut swallowing = false;
        loop {
            let mut head = [0_u8; 5];
            if server_read.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            let mut body = vec![0_u8; usize::try_from(len).unwrap_or(4).saturating_sub(4)];
            if server_read.read_exact(&mut body).await.is_err() {
                return;
            }
            if head[0] == b'C' && armed.swap(false, Ordering::SeqCst) {
                swallowing = left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            }
            if swallowing {
                if head[0] == b'Z' {
                    // Committed: the server is ready for the next query. Hang up.
                    cut.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                continue;
            }
            if client_write.write_all(&head).await.is_err()
                || client_write.write_all(&body).await.is_err()
            {
                return;
            }
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_after_the_completion_landed_is_not_applied_twice() {
    let db = database().await;
    let pool = db.pool();
    let executions = Executions::default();
    let flow = squares("cut_after", Duration::from_millis(20), &executions);
    compile_squares(pool, &flow).await;
    let options: PgConnectOptions = db.url().parse().expect("url");
    let proxy = CuttingProxy::start(options.get_port(), 3).await;
    let proxied = format!(
        "postgres://postgres@127.0.0.1:{}/{}?sslmode=disable",
        proxy.port,
        db.name()
    );
    let worker_pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&proxied)
        .await
        .expect("pool through the proxy");
    let worker = worker(&worker_pool, &flow, 4);

    let inputs = [4_u64, 2, 3];
    let mut runs = Vec::new();
    for n in inputs {
        runs.push(start(pool, "cut_after", json!(n)).await);
        // One run at a time, so that reports come one by one and several get cut.
        finished_all(pool, &runs, Duration::from_secs(30)).await;
    }
    assert_eq!(proxy.cut.load(Ordering::SeqCst), 3, "three replies cut");
    assert_eq!(proxy.left.load(Ordering::SeqCst), 0);
    assert_squares_completed(pool, &runs, &inputs, &executions, Duration::from_secs(30)).await;
    for task in tasks_of(pool, &runs).await {
        let (step, index) = (&task.step_slug, task.task_index);
        assert_eq!(task.attempts_count, 1, "{step}/{index}");
        let index = u32::try_from(index).unwrap_or_default();
        assert_eq!(executions.of(task.run_id, step, index), 1, "{step}/{index}");
    }
    // The worker settles a cut report once it has seen that it landed: counted once.
    let tasks: u64 = inputs.iter().map(|n| n + 2).sum();
    settled(&worker, tasks).await;
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_complete_while_worker_connections_are_terminated_again_and_again() {
    let db = database().await;
    let pool = db.pool();
    let executions = Executions::default();
    let flow = squares("terminated", Duration::from_millis(30), &executions);
    compile_squares(pool, &flow).await;
    let worker_pool = worker_pool(db.url()).await;
    let worker = worker(&worker_pool, &flow, 8);
    let inputs: Vec<u64> = (0..30).map(|i| 2 + i % 4).collect();
    let mut runs = Vec::new();
    for n in &inputs {
        runs.push(start(pool, "terminated", json!(n)).await);
    }

    // Every 150 ms, every connection of the worker goes, until the runs are done.
    let done = Arc::new(AtomicBool::new(false));
    let killer = {
        let pool = pool.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut terminated = 0_usize;
            while !done.load(Ordering::SeqCst) {
                let cut: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                      WHERE datname = current_database() AND application_name = $1",
                )
                .bind(WORKER_APP)
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
                terminated += cut.len();
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            terminated
        })
    };
    finished_all(pool, &runs, Duration::from_secs(90)).await;
    done.store(true, Ordering::SeqCst);
    let terminated = killer.await.expect("killer");
    assert!(terminated >= 5, "only {terminated} connections terminated");
    assert_squares_completed(pool, &runs, &inputs, &executions, Duration::from_secs(5)).await;
    assert!(!worker.is_finished());
    worker.shutdown().await.expect("shutdown");
}
