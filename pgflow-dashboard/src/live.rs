//! Live updates of a run page, as server-sent events.
//!
//! One `LISTEN` connection (a [`Subscription`] of the client library) serves every open run
//! page: a task forwards which run each engine event concerns to a broadcast channel, and each
//! page's stream answers an event of its run with a fresh snapshot of the run's step statuses
//! (`state` events). The snapshot is read from the tables rather than built from the events,
//! so a page never drifts from the database: an event lost while the connection was down, or
//! a map task's completion (which raises no event), shows at the next snapshot, which is also
//! taken every few seconds. The task ends, closing its connection, once no page listens.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::Path;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use pgflow_client::Subscription;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::pages::run::parse_run_id;
use crate::queries::run::snapshot;
use crate::{Error, Shared};

/// How often an open run page gets a fresh snapshot without any event: map progress, and
/// anything missed while the listening connection was down.
const REFRESH: Duration = Duration::from_secs(3);
/// How often the listening task checks whether anyone still listens.
const IDLE_CHECK: Duration = Duration::from_secs(15);
/// Wait before connecting again after the listening connection failed.
const RECONNECT: Duration = Duration::from_secs(1);
/// Events a slow page may fall behind by before it simply takes a fresh snapshot.
const CHANNEL_CAPACITY: usize = 1024;

/// What the listening task tells the pages.
#[derive(Debug, Clone, Copy)]
enum Signal {
    /// An event of this run.
    Run(Uuid),
    /// Events may have been missed (the connection was lost, or has just been made): every
    /// page takes a snapshot.
    Resync,
}

/// The shared listener: started by the first page that subscribes, stopped after the last.
#[derive(Debug)]
pub(crate) struct Live {
    pool: PgPool,
    sender: Arc<Mutex<Option<broadcast::Sender<Signal>>>>,
}

impl Live {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            sender: Arc::new(Mutex::new(None)),
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Signal> {
        let mut slot = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = slot.as_ref() {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(CHANNEL_CAPACITY);
        *slot = Some(sender.clone());
        let task = tokio::spawn(listen(self.pool.clone(), sender, Arc::clone(&self.sender)));
        // A task that panicked leaves its sender in the slot: empty it, so that the next page
        // starts another (until then, pages follow their runs by their periodic snapshots).
        let slot = Arc::clone(&self.sender);
        tokio::spawn(async move {
            if task.await.is_err() {
                tracing::error!("dashboard: the run events task panicked");
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
            }
        });
        receiver
    }
}

/// The listening task: forwards events until no page listens.
async fn listen(
    pool: PgPool,
    sender: broadcast::Sender<Signal>,
    slot: Arc<Mutex<Option<broadcast::Sender<Signal>>>>,
) {
    let mut idle = tokio::time::interval(IDLE_CHECK);
    let mut subscription: Option<Subscription> = None;
    loop {
        let Some(listening) = subscription.as_mut() else {
            match Subscription::listen(&pool).await {
                Ok(made) => {
                    subscription = Some(made);
                    let _ = sender.send(Signal::Resync);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "dashboard: cannot listen for run events; retrying");
                    tokio::time::sleep(RECONNECT).await;
                }
            }
            if nobody_listens(&sender, &slot) {
                break;
            }
            continue;
        };
        tokio::select! {
            event = listening.next_event() => match event {
                Ok(event) => {
                    let _ = sender.send(Signal::Run(event.run_id));
                }
                Err(err) => {
                    tracing::warn!(error = %err, "dashboard: lost the run events connection");
                    let _ = sender.send(Signal::Resync);
                    if let Some(lost) = subscription.take() {
                        lost.close().await;
                    }
                }
            },
            _ = idle.tick() => {
                if nobody_listens(&sender, &slot) {
                    break;
                }
            }
        }
    }
    if let Some(subscription) = subscription {
        subscription.close().await;
    }
    tracing::debug!("dashboard: no page listens any more; stopped listening");
}

/// Whether every page has gone; if so, the slot is emptied under its lock, so that the next
/// page starts a new task rather than subscribing to this ending one.
fn nobody_listens(
    sender: &broadcast::Sender<Signal>,
    slot: &Mutex<Option<broadcast::Sender<Signal>>>,
) -> bool {
    let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if sender.receiver_count() == 0 {
        *slot = None;
        return true;
    }
    false
}

/// What a page's stream holds between events.
struct Follow {
    state: Arc<crate::State>,
    receiver: broadcast::Receiver<Signal>,
    run_id: Uuid,
    last: Value,
    first: Option<Value>,
    refresh: tokio::time::Interval,
}

/// `GET /runs/{run_id}/live`: the run's `state` snapshots, the first at once, then one after
/// each change.
pub(crate) async fn run_updates(
    axum::extract::State(state): Shared,
    Path(run_id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Error> {
    let run_id = parse_run_id(&run_id)?;
    let receiver = state.live.subscribe();
    let first = snapshot(state.client.pool(), run_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no run {run_id}")))?;
    let follow = Follow {
        receiver,
        run_id,
        last: first.clone(),
        first: Some(first),
        refresh: tokio::time::interval(REFRESH),
        state,
    };
    let stream = futures_util::stream::unfold(follow, |mut follow| async move {
        if let Some(first) = follow.first.take() {
            return Some((Ok(state_event(&first)), follow));
        }
        loop {
            let look = tokio::select! {
                signal = follow.receiver.recv() => match signal {
                    Ok(Signal::Run(id)) => id == follow.run_id,
                    Ok(Signal::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                    Err(broadcast::error::RecvError::Closed) => {
                        // The listening task panicked and its sender is gone: start another,
                        // after a pause, so that a task failing at once is not a busy loop.
                        tokio::time::sleep(RECONNECT).await;
                        follow.receiver = follow.state.live.subscribe();
                        true
                    }
                },
                _ = follow.refresh.tick() => true,
            };
            if !look {
                continue;
            }
            match snapshot(follow.state.client.pool(), follow.run_id).await {
                Ok(Some(now)) if now != follow.last => {
                    follow.last = now;
                    let event = state_event(&follow.last);
                    return Some((Ok(event), follow));
                }
                Ok(Some(_)) => {}
                // The run was deleted (pruned): nothing more to follow.
                Ok(None) => return None,
                Err(err) => tracing::warn!(error = %err, "dashboard: cannot read a run's state"),
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn state_event(snapshot: &Value) -> Event {
    Event::default().event("state").data(snapshot.to_string())
}
