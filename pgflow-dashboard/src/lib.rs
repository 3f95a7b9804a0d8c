//! A web dashboard for pgflow: flows with their DAG, runs (filtered, counted, paged by key), a
//! run with its steps coloured by status and updated live, workers, schedules and stuck runs.
//!
//! It is an axum [`Router`] to mount in your own service, behind your own authentication; the
//! pages are server-rendered HTML that works without JavaScript, except for the live updates
//! of a run page (server-sent events fed by the engine's `NOTIFY` events).
//!
//! Read-only by default: [`router`] never changes anything. [`Dashboard::allow_actions`] adds
//! the buttons that cancel and retry runs, for an app that has checked who is asking.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> std::io::Result<()> {
//! // Read-only, mounted under /pgflow of the app.
//! let app = axum::Router::new().nest("/pgflow", pgflow_dashboard::router(pool.clone()));
//!
//! // With the cancel and retry buttons (put your auth layer in front of it).
//! let admin = pgflow_dashboard::Dashboard::new(pool).allow_actions(true).router();
//! let app = app.nest("/admin/pgflow", admin);
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await
//! # }
//! ```
//!
//! | feature | what it adds |
//! |---|---|
//! | `prometheus` | [`Dashboard::prometheus`]: a `/metrics` route serving the app's Prometheus recorder |

#![deny(missing_docs)]

mod actions;
mod dag;
mod error;
mod live;
mod pages;
mod params;
mod queries;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use pgflow_client::Client;
use sqlx::PgPool;

pub use error::Error;
pub use queries::runs_page_plans;

/// The dashboard's configuration; [`Dashboard::router`] turns it into a [`Router`].
///
/// ```no_run
/// # fn demo(pool: sqlx::PgPool) {
/// let router = pgflow_dashboard::Dashboard::new(pool)
///     .allow_actions(true) // cancel and retry buttons
///     .router();
/// # let _: axum::Router = router;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Dashboard {
    pool: PgPool,
    allow_actions: bool,
    #[cfg(feature = "prometheus")]
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Dashboard {
    /// A read-only dashboard on `pool`.
    ///
    /// Each page makes a few short queries on the pool; a run page open in a browser holds no
    /// connection of it between updates. The live updates of every open run page share one
    /// `LISTEN` connection of their own, opened with the first and closed after the last.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            allow_actions: false,
            #[cfg(feature = "prometheus")]
            prometheus: None,
        }
    }

    /// Whether the pages offer to cancel started runs and retry failed or cancelled ones
    /// (`POST …/runs/{id}/cancel` and `…/retry`); off by default, and the action routes then
    /// answer 403 Forbidden. Whoever reaches the router can then act: mount it behind the
    /// app's authentication. Cross-site form posts are refused either way (the `Origin` and
    /// `Sec-Fetch-Site` headers must name this site).
    pub fn allow_actions(mut self, allow: bool) -> Self {
        self.allow_actions = allow;
        self
    }

    /// Serves `handle`'s rendering of the app's metrics at `/metrics` (Prometheus text format).
    /// The app installs the recorder; the dashboard only renders it.
    ///
    /// ```no_run
    /// # fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    /// let router = pgflow_dashboard::Dashboard::new(pool).prometheus(handle).router();
    /// # let _: axum::Router = router;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "prometheus")]
    pub fn prometheus(mut self, handle: metrics_exporter_prometheus::PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }

    /// The routes, relative to wherever the app mounts them (`Router::nest`): links in the
    /// pages follow the mount point.
    pub fn router(self) -> Router {
        let state = Arc::new(State {
            live: live::Live::new(self.pool.clone()),
            client: Client::new(self.pool),
            allow_actions: self.allow_actions,
        });
        let router = Router::new()
            .route("/", get(pages::runs::page))
            .route("/runs", get(pages::runs::page))
            .route("/runs/{run_id}", get(pages::run::page))
            .route("/runs/{run_id}/live", get(live::run_updates))
            .route("/runs/{run_id}/cancel", post(actions::cancel))
            .route("/runs/{run_id}/retry", post(actions::retry))
            .route("/flows", get(pages::flows::list))
            .route("/flows/{flow_slug}", get(pages::flows::one))
            .route("/workers", get(pages::workers::page))
            .route("/schedules", get(pages::schedules::page))
            .route("/stuck", get(pages::stuck::page));
        #[cfg(feature = "prometheus")]
        let router = match self.prometheus {
            Some(handle) => router.route("/metrics", get(move || async move { handle.render() })),
            None => router,
        };
        router
            .fallback(|| async { Error::NotFound("no such page".to_owned()) })
            .with_state(state)
    }
}

impl Dashboard {
    /// Serves the dashboard alone on `listener` until `shutdown` completes, then gives open
    /// pages [`SHUTDOWN_GRACE`] to go (a live page's event stream never ends by itself).
    /// What `pgflow dashboard` runs; an app that has a server of its own mounts
    /// [`Dashboard::router`] instead.
    ///
    /// ```no_run
    /// # async fn demo(pool: sqlx::PgPool) -> std::io::Result<()> {
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    /// let ctrl_c = async { drop(tokio::signal::ctrl_c().await) };
    /// pgflow_dashboard::Dashboard::new(pool).serve(listener, ctrl_c).await
    /// # }
    /// ```
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stopping, mut stopped) = tokio::sync::watch::channel(false);
        let server = axum::serve(listener, self.router()).with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stopping.send(true);
        });
        tokio::select! {
            served = server => served,
            () = async {
                let _ = stopped.wait_for(|stop| *stop).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => Ok(()),
        }
    }
}

/// How long [`Dashboard::serve`] waits for open connections after its shutdown signal.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A read-only dashboard on `pool`: `Dashboard::new(pool).router()`.
///
/// ```no_run
/// # fn demo(pool: sqlx::PgPool) {
/// let app: axum::Router = axum::Router::new().nest("/pgflow", pgflow_dashboard::router(pool));
/// # }
/// ```
pub fn router(pool: PgPool) -> Router {
    Dashboard::new(pool).router()
}

/// What every handler shares.
#[derive(Debug)]
struct State {
    client: Client,
    allow_actions: bool,
    live: live::Live,
}

type Shared = axum::extract::State<Arc<State>>;

#[cfg(all(test, feature = "prometheus"))]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use tower::ServiceExt;

    /// A pool that is never used: `/metrics` reads the recorder, not the database.
    fn idle_pool() -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool")
    }

    async fn get(router: axum::Router, path: &str) -> (StatusCode, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn metrics_serves_what_the_app_recorded() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("dashboard_test_total", "flow" => "orders").increment(3);
        });
        let router = super::Dashboard::new(idle_pool())
            .prometheus(handle)
            .router();
        let (status, text) = get(router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.contains("dashboard_test_total{flow=\"orders\"} 3"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn without_a_handle_there_is_no_metrics_route() {
        let (status, _) = get(super::router(idle_pool()), "/metrics").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
