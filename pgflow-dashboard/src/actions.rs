//! Cancel and retry, for dashboards the app lets act: `POST /runs/{id}/cancel` and
//! `POST /runs/{id}/retry`, through the client library's `Client::cancel` and `Client::retry`.
//! Each answers with a redirect back to the run page, which says what happened.

use axum::extract::Path;
use axum::http::{HeaderMap, header};
use axum::response::Redirect;
use pgflow_client::Cancelled;

use crate::pages::layout::Base;
use crate::pages::run::parse_run_id;
use crate::{Error, Shared};

pub(crate) async fn cancel(
    state: Shared,
    base: Base,
    headers: HeaderMap,
    Path(run_id): Path<String>,
) -> Result<Redirect, Error> {
    allowed(&state, &headers)?;
    let run_id = parse_run_id(&run_id)?;
    let done = match state.client.cancel(run_id).await? {
        Cancelled::Now => "cancelled",
        _ => "ended",
    };
    tracing::info!(%run_id, done, "dashboard: cancel");
    Ok(Redirect::to(
        &base.to(&format!("/runs/{run_id}?done={done}")),
    ))
}

pub(crate) async fn retry(
    state: Shared,
    base: Base,
    headers: HeaderMap,
    Path(run_id): Path<String>,
) -> Result<Redirect, Error> {
    allowed(&state, &headers)?;
    let run_id = parse_run_id(&run_id)?;
    let count = state.client.retry(run_id).await?;
    tracing::info!(%run_id, retry_count = count, "dashboard: retry");
    Ok(Redirect::to(
        &base.to(&format!("/runs/{run_id}?done=retried")),
    ))
}

/// Refuses unless the app enabled actions, and refuses a post that a browser says comes from
/// another site: a page elsewhere must not make a logged-in operator's browser cancel runs
/// (cross-site request forgery). Browsers send `Sec-Fetch-Site` and, on a POST, `Origin`; a
/// client that sends neither (curl, a script) is not a browser carrying someone's cookies.
fn allowed(state: &crate::State, headers: &HeaderMap) -> Result<(), Error> {
    if !state.allow_actions {
        return Err(Error::ActionsDisabled);
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("?");
        if site != "same-origin" && site != "none" {
            return Err(Error::CrossSite(format!("Sec-Fetch-Site: {site}")));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("?");
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
        if host.is_empty() || !origin_host.eq_ignore_ascii_case(host) {
            return Err(Error::CrossSite(format!("Origin: {origin}, Host: {host}")));
        }
    }
    Ok(())
}
