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

/// `url` fit to print: its password, in the user part or as a `password` parameter (in a URL's
/// query or a `key=value` string, its name percent-encoded or not), is replaced by `***`.
///
/// Parameters go first: a parameter's value may hold `@`, which would otherwise be taken for
/// the end of the user part.
fn masked(url: &str) -> String {
    let url = masked_parameters(url);
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url.as_str()),
    };
    // The host starts after the last `@`: a password may hold `/`, `?` or `#` unencoded, and
    // cutting the authority at the first of them would print the rest of the password.
    let rest = match rest.rsplit_once('@') {
        Some((userinfo, after)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{after}"),
            None => format!("{userinfo}@{after}"),
        },
        None => rest.to_owned(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{rest}"),
        None => rest,
    }
}

/// `text` with the value of every `password=` parameter replaced by `***`; parameters are
/// separated by `?`, `&` or white space, and a name is compared percent-decoded.
fn masked_parameters(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let name_start = rest[..eq]
            .rfind(|c: char| c == '?' || c == '&' || c.is_whitespace())
            .map_or(0, |at| at + 1);
        let is_password = percent_decoded(&rest[name_start..eq]).eq_ignore_ascii_case("password");
        out.push_str(&rest[..=eq]);
        rest = &rest[eq + 1..];
        if is_password {
            let end = rest
                .find(|c: char| c == '&' || c.is_whitespace())
                .unwrap_or(rest.len());
            out.push_str("***");
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// `text` with its `%XX` escapes decoded (bytes that are not UTF-8 become U+FFFD).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
            (
                "postgres://h:1/d?password=hun@ter2",
                "postgres://h:1/d?password=***",
            ),
            (
                "postgres://h/d?sslmode=x&password=a#b@c",
                "postgres://h/d?sslmode=x&password=***",
            ),
            (
                "postgres://h/d?pass%77ord=x&%70assword=y",
                "postgres://h/d?pass%77ord=***&%70assword=***",
            ),
            (
                "host=x password=hunter2 dbname=d",
                "host=x password=*** dbname=d",
            ),
            ("u:secret@localhost/db", "u:***@localhost/db"),
            (
                "postgres:/h:1/d?password=hunter2",
                "postgres:/h:1/d?password=***",
            ),
        ] {
            assert_eq!(masked(url), shown, "{url}");
        }
    }
}
