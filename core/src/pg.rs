//! Connecting to PostgreSQL from `--pg-url` or the standard PG* environment variables (PGHOST,
//! PGPORT, PGUSER, PGPASSWORD, PGDATABASE), as libpq would.
//!
//! Invariants:
//! - The password never reaches a log or an error: a connection string is held as a
//!   [`ConnString`], whose `Debug` and `Display` print it through [`redact_conninfo`]; only
//!   [`ConnString::expose`] gives the text, to hand it to the connection code.

use anyhow::{Context, Result};
use std::fmt;
use tokio_postgres::{Client, Config, NoTls};

/// What a redacted password is printed as.
const REDACTED: &str = "<redacted>";

/// A PostgreSQL connection string (`--pg-url`, `TIDEMARK_PG_URL`): a `postgresql://` URL or
/// libpq `key=value` pairs. It may hold a password, so it prints redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnString(String);

impl ConnString {
    /// The connection string itself, for the code that connects; never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for ConnString {
    fn from(s: String) -> ConnString {
        ConnString(s)
    }
}

impl fmt::Display for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_conninfo(&self.0))
    }
}

impl fmt::Debug for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnString({:?})", redact_conninfo(&self.0))
    }
}

/// `conninfo` with its passwords replaced by `<redacted>`: the `user:password@` of a
/// `postgresql://` (or `postgres://`) URL and its `password=` query parameter, and the
/// `password=` value of the `key=value` form, quoted or not. A `key=value` string it cannot
/// follow is redacted from that point on.
pub fn redact_conninfo(conninfo: &str) -> String {
    match ["postgresql://", "postgres://"]
        .iter()
        .find(|p| conninfo.starts_with(*p))
    {
        Some(scheme) => redact_url(scheme, &conninfo[scheme.len()..]),
        None => redact_pairs(conninfo),
    }
}

fn redact_url(scheme: &str, rest: &str) -> String {
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => format!("{}:{REDACTED}{}", &authority[..colon], &authority[at..]),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| {
                    let key = kv.split('=').next().unwrap_or("");
                    if key.eq_ignore_ascii_case("password") {
                        format!("{key}={REDACTED}")
                    } else {
                        kv.to_string()
                    }
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}{authority}{tail}")
}

/// libpq's `key = value` grammar: values are bare words or single-quoted with `\'` and `\\`
/// escapes.
fn redact_pairs(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let ws = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..ws]);
        rest = &rest[ws..];
        if rest.is_empty() {
            return out;
        }
        let key_len = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..key_len];
        let after_key = &rest[key_len..];
        let eq = after_key.len() - after_key.trim_start().len();
        if key.is_empty() || !after_key[eq..].starts_with('=') {
            // Not `key=value`: libpq refuses it, and what follows may be a password.
            out.push_str(REDACTED);
            return out;
        }
        let after_eq = &after_key[eq + 1..];
        let sp = after_eq.len() - after_eq.trim_start().len();
        let value = &after_eq[sp..];
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            let close = quoted.char_indices().find_map(|(i, c)| {
                let end = !escaped && c == '\'';
                escaped = !escaped && c == '\\';
                end.then_some(i + 2)
            });
            match close {
                Some(n) => n,
                None => {
                    out.push_str(&rest[..key_len + eq + 1 + sp]);
                    out.push_str(REDACTED);
                    return out;
                }
            }
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out.push_str(&rest[..key_len + eq + 1 + sp]);
        if key.eq_ignore_ascii_case("password") {
            out.push_str(REDACTED);
        } else {
            out.push_str(&value[..value_len]);
        }
        rest = &value[value_len..];
    }
}

/// Builds a connection config: `url` when given (a `postgresql://` URL or a key=value string),
/// otherwise from the PG* environment with libpq's defaults.
pub fn config(url: Option<&str>) -> Result<Config> {
    if let Some(u) = url {
        return u.parse::<Config>().context("--pg-url is not a valid PostgreSQL connection string\nhint: postgresql://user@host:port/db or 'host=/run/postgresql port=5432 user=postgres'");
    }
    let mut c = Config::new();
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    for host in env("PGHOST")
        .unwrap_or_else(|| "/var/run/postgresql".into())
        .split(',')
    {
        c.host(host);
    }
    let port = match env("PGPORT") {
        Some(p) => p
            .parse::<u16>()
            .with_context(|| format!("PGPORT={p:?} is not a port number"))?,
        None => 5432,
    };
    c.port(port);
    let user = env("PGUSER")
        .or_else(|| env("USER"))
        .unwrap_or_else(|| "postgres".into());
    c.user(&user);
    c.dbname(env("PGDATABASE").unwrap_or_else(|| user.clone()));
    if let Some(pw) = env("PGPASSWORD") {
        c.password(pw);
    }
    c.application_name(env("PGAPPNAME").unwrap_or_else(|| "tidemark".into()));
    Ok(c)
}

/// Connects and drives the connection on a background task.
pub async fn connect(url: Option<&str>) -> Result<Client> {
    let cfg = config(url)?;
    let (client, conn) = cfg.connect(NoTls).await.context(
        "cannot connect to PostgreSQL\nhint: set --pg-url or PGHOST/PGPORT/PGUSER/PGDATABASE",
    )?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            // tokio-postgres prints only "db error"; the server's message is in the source.
            let mut why = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                why = format!("{why}: {c}");
                cause = c.source();
            }
            tracing::warn!(error = %why, "postgresql connection ended");
        }
    });
    Ok(client)
}

/// Quotes a string for postgresql.conf: single quotes, embedded quotes and backslashes doubled
/// and line breaks escaped (the configuration lexer reads `\\`, `\n` and `\r` escapes inside a
/// quoted value and allows no raw line break there).
pub fn conf_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_values_cannot_end_their_string_or_add_a_line() {
        assert_eq!(conf_quote("it's"), "'it''s'");
        assert_eq!(conf_quote("a\\b\nport=1' x\r"), "'a\\\\b\\nport=1'' x\\r'");
        assert!(!conf_quote("x\narchive_command = 'evil'").contains('\n'));
    }

    #[test]
    fn passwords_are_redacted_in_every_form() {
        for (given, shown) in [
            (
                "postgresql://backup:S3cr3t-Pw@db.example:5432/postgres?sslmode=require",
                "postgresql://backup:<redacted>@db.example:5432/postgres?sslmode=require",
            ),
            (
                "postgres://backup:p%40ss@h1:5432,h2:5433/db",
                "postgres://backup:<redacted>@h1:5432,h2:5433/db",
            ),
            (
                "postgresql://backup@db/postgres?password=S3cr3t-Pw&application_name=x",
                "postgresql://backup@db/postgres?password=<redacted>&application_name=x",
            ),
            (
                "postgresql://backup:pw@with@at@db",
                "postgresql://backup:<redacted>@db",
            ),
            (
                "postgresql:///postgres?host=/run/pg",
                "postgresql:///postgres?host=/run/pg",
            ),
            (
                "host=db port=5432 user=backup password=S3cr3t-Pw dbname=postgres",
                "host=db port=5432 user=backup password=<redacted> dbname=postgres",
            ),
            (
                "host=db password = 'S3cr3t Pw with \\' quote' user=backup",
                "host=db password = <redacted> user=backup",
            ),
            ("  PASSWORD=S3cr3t-Pw", "  PASSWORD=<redacted>"),
            (
                "host=db password='unterminated S3cr3t",
                "host=db password=<redacted>",
            ),
            ("host=db password S3cr3t-Pw", "host=db <redacted>"),
            ("user=backup", "user=backup"),
            ("", ""),
        ] {
            assert_eq!(redact_conninfo(given), shown, "{given}");
        }
    }

    #[test]
    fn conn_string_prints_redacted_but_connects_with_the_password() {
        let c = ConnString::from("postgresql://u:S3cr3t-Pw@h/db".to_string());
        assert_eq!(c.to_string(), "postgresql://u:<redacted>@h/db");
        assert!(!format!("{c:?}").contains("S3cr3t"));
        assert!(!format!("{:?}", Some(c.clone())).contains("S3cr3t"));
        assert_eq!(c.expose(), "postgresql://u:S3cr3t-Pw@h/db");
        let cfg = config(Some(c.expose())).expect("a valid url");
        assert_eq!(cfg.get_password(), Some(&b"S3cr3t-Pw"[..]));
    }
}
