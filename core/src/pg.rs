//! Connecting to PostgreSQL from `--pg-url` or the standard PG* environment variables (PGHOST,
//! PGPORT, PGUSER, PGPASSWORD, PGDATABASE), as libpq would. The password never reaches a log.

use anyhow::{Context, Result};
use tokio_postgres::{Client, Config, NoTls};

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
            tracing::warn!(error = %e, "postgresql connection ended");
        }
    });
    Ok(client)
}
