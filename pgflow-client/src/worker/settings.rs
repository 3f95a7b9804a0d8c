//! The worker's settings: their defaults, and the ranges [`WorkerBuilder::spawn`] holds them to.
//!
//! [`WorkerBuilder::spawn`]: super::WorkerBuilder::spawn

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::requeue::{DEFAULT_REQUEUE_EVERY, MIN_REQUEUE_EVERY};
use crate::{Error, Result};

/// How often a worker heartbeats unless [`WorkerBuilder::heartbeat_interval`] says otherwise.
/// [`crate::check`] counts a worker as live from it.
///
/// [`WorkerBuilder::heartbeat_interval`]: super::WorkerBuilder::heartbeat_interval
pub(crate) const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// The worker's settings, with their defaults.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) concurrency: usize,
    pub(crate) batch_size: usize,
    pub(crate) visibility_timeout: Duration,
    pub(crate) max_poll_wait: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) notifications: bool,
    pub(crate) shutdown_on_signal: bool,
    pub(crate) shutdown_token: Option<CancellationToken>,
    /// Whether the stalled-task timer runs, and its period.
    pub(crate) requeue_stalled: bool,
    pub(crate) requeue_every: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 10,
            batch_size: 10,
            visibility_timeout: Duration::from_secs(2),
            max_poll_wait: Duration::from_secs(5),
            poll_interval: Duration::from_millis(100),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            shutdown_timeout: Duration::from_secs(30),
            notifications: true,
            shutdown_on_signal: false,
            shutdown_token: None,
            requeue_stalled: true,
            requeue_every: DEFAULT_REQUEUE_EVERY,
        }
    }
}

/// Refuses a setting out of its range, naming it, its value and what it must be.
pub(crate) fn check_settings(settings: &Settings) -> Result<()> {
    let setting = |setting: &'static str, value: String, requirement: &'static str| {
        Err(Error::WorkerSetting {
            setting,
            value,
            requirement,
        })
    };
    // Permits and read sizes end up as PostgreSQL integers and tokio semaphore counts.
    const MAX_TASKS: usize = 1 << 20;
    if settings.concurrency == 0 || settings.concurrency > MAX_TASKS {
        return setting(
            "concurrency",
            settings.concurrency.to_string(),
            "must be between 1 and 1048576",
        );
    }
    if settings.batch_size == 0 || settings.batch_size > MAX_TASKS {
        return setting(
            "batch_size",
            settings.batch_size.to_string(),
            "must be between 1 and 1048576",
        );
    }
    let positive = [
        ("visibility_timeout", settings.visibility_timeout),
        ("max_poll_wait", settings.max_poll_wait),
        ("poll_interval", settings.poll_interval),
        ("heartbeat_interval", settings.heartbeat_interval),
    ];
    for (name, value) in positive {
        if value.is_zero() {
            return setting(name, format!("{value:?}"), "must be greater than zero");
        }
    }
    if settings.visibility_timeout > Duration::from_secs(86_400) {
        return setting(
            "visibility_timeout",
            format!("{:?}", settings.visibility_timeout),
            "must be at most one day",
        );
    }
    // The engine refuses periods under a second; a day is far past any useful sweep.
    if settings.requeue_stalled
        && (settings.requeue_every < MIN_REQUEUE_EVERY
            || settings.requeue_every > Duration::from_secs(86_400))
    {
        return setting(
            "requeue_stalled_every",
            format!("{:?}", settings.requeue_every),
            "must be between 1 second and one day",
        );
    }
    Ok(())
}
