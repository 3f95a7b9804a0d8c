//! The dashboard's errors, and the page each one answers with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::html;

/// Why a page or an action could not be served.
///
/// Each answers with an HTML page and a status that says whose fault it is: 400 for a bad
/// query parameter, 403 for an action the embedding app did not enable (or a cross-site form
/// post), 404 for an unknown page, run or flow, 409 for an action the run's status refuses,
/// 500 (the details logged, not shown) for a database failure.
///
/// ```
/// use pgflow_dashboard::Error;
///
/// let error = Error::BadRequest("`status`: `done` is not a run status".into());
/// assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST);
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A query parameter or form field that cannot be used; the text says which and why.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No such page, run or flow.
    #[error("not found: {0}")]
    NotFound(String),
    /// Cancel and retry are off ([`Dashboard::allow_actions`](crate::Dashboard::allow_actions)).
    #[error("actions are disabled: this dashboard is read-only")]
    ActionsDisabled,
    /// A form post from another site (its `Origin` or `Sec-Fetch-Site` says so).
    #[error("refused: the request comes from another site ({0})")]
    CrossSite(String),
    /// The run's status does not allow the action (e.g. retrying a completed run).
    #[error("conflict: {0}")]
    Conflict(String),
    /// What the client library reported.
    #[error(transparent)]
    Client(#[from] pgflow_client::Error),
    /// A query of the dashboard's own failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl Error {
    /// The HTTP status the error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) | Self::Client(pgflow_client::Error::UnknownRun(_)) => {
                StatusCode::NOT_FOUND
            }
            Self::Client(pgflow_client::Error::UnknownFlow { .. }) => StatusCode::NOT_FOUND,
            Self::ActionsDisabled | Self::CrossSite(_) => StatusCode::FORBIDDEN,
            Self::Conflict(_) | Self::Client(pgflow_client::Error::NotRetryable { .. }) => {
                StatusCode::CONFLICT
            }
            Self::Client(_) | Self::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        // A server-side failure's text may name tables, roles or hosts: it goes to the log,
        // the page says only that it happened.
        let shown = if status.is_server_error() {
            tracing::error!(error = %self, "dashboard request failed");
            "the database query failed; the server's log has the details".to_owned()
        } else {
            tracing::debug!(error = %self, "dashboard request refused");
            self.to_string()
        };
        let title = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        let body = html! {
            (maud::DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { "pgflow: " (title) }
                    style { (maud::PreEscaped(crate::pages::layout::CSS)) }
                }
                body {
                    main {
                        h1 { (title) }
                        p.error-text { (shown) }
                    }
                }
            }
        };
        (status, body).into_response()
    }
}
