//! Connecting to the database: a first connection under a time limit, so that a server that
//! is down or a wrong port says why at once. sqlx's pool alone would retry for its 30 s and
//! then say only "pool timed out while waiting for an open connection".

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::failure::Failure;

/// A pool on `url`, once one connection has been made within `timeout`.
pub(crate) async fn connect(url: &str, timeout: Duration) -> Result<PgPool, Failure> {
    let shown = masked(url);
    let options = PgConnectOptions::from_str(url)
        .map_err(|err| format!("{shown} is not a database URL: {err}"))?;
    match tokio::time::timeout(timeout, PgConnection::connect_with(&options)).await {
        Err(_) => {
            return Err(Failure::error(format!(
                "cannot connect to {shown}: no answer within {}s (on a slow network, raise \
                 --connect-timeout)",
                timeout.as_secs()
            )));
        }
        Ok(Err(err)) => {
            return Err(Failure::error(format!("cannot connect to {shown}: {err}")));
        }
        // The pool makes its own; this one only proved that the server answers.
        Ok(Ok(probe)) => drop(probe.close().await),
    }
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(timeout)
        .connect_lazy_with(options))
}

/// `url` fit to print: its password, in the user part or as a `password=` parameter, is
/// replaced by `***`.
fn masked(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The host starts after the last `@`: a password may hold `/`, `?` or `#` unencoded, and
    // cutting the authority at the first of them would print the rest of the password.
    let host_start = rest.rfind('@').map_or(0, |at| at + 1);
    let authority_end = rest[host_start..]
        .find(['/', '?', '#'])
        .map_or(rest.len(), |end| host_start + end);
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::masked;

    #[test]
    fn passwords_are_masked_wherever_the_url_holds_them() {
        for (url, shown) in [
            (
                "postgres://app:s3cret@db.example:5432/orders",
                "postgres://app:***@db.example:5432/orders",
            ),
            ("postgres://app@db/orders", "postgres://app@db/orders"),
            ("postgres://db/orders", "postgres://db/orders"),
            ("postgresql://a:p@ss@h/d", "postgresql://a:***@h/d"),
            (
                "postgres://a:p/ss?w#rd@h:5432/d",
                "postgres://a:***@h:5432/d",
            ),
            (
                "postgres:///orders?host=/run/pg&password=s3cret&sslmode=off",
                "postgres:///orders?host=/run/pg&password=***&sslmode=off",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(masked(url), shown, "{url}");
        }
    }
}
