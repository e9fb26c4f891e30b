//! A replication connection to PostgreSQL over TCP or a Unix socket: startup with
//! `replication=database` (replication commands and plain SQL on one session), cleartext, MD5 or
//! SCRAM-SHA-256 password authentication, simple queries, and the BASE_BACKUP exchange.
//!
//! Invariants:
//! - Every message is framed by [`message::take_frame`], which caps its length before allocating.
//! - The password is only ever written to the socket; it never appears in an error or a log.
//! - An ErrorResponse anywhere ends the operation with the server's message; NoticeResponses
//!   (which may arrive in the middle of a COPY) are logged and skipped.

use super::message::{self, Auth, BackupData, Frame, ServerNotice};
use super::stream::{BackupStream, Step};
use super::tls::{self, Stream, TlsMode};
use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::Host;

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ConnParams {
    pub hosts: Vec<Host>,
    pub ports: Vec<u16>,
    pub user: String,
    pub dbname: String,
    password: Option<Vec<u8>>,
    pub application_name: String,
    pub tls: TlsMode,
    /// Limit for connecting and authenticating to one host (`PGCONNECT_TIMEOUT`, default 30 s).
    pub connect_timeout: std::time::Duration,
}

impl std::fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnParams")
            .field("hosts", &self.hosts)
            .field("ports", &self.ports)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl ConnParams {
    /// From `--pg-url` or the PG* environment (see [`crate::pg::config`]), plus `PGSSLMODE` and
    /// `PGSSLROOTCERT` (or `sslmode=`/`sslrootcert=` in the URL).
    pub fn from_url_or_env(url: Option<&str>) -> Result<ConnParams> {
        let cleaned = url.map(|u| tls::split_ssl_options(u).0);
        let cfg = crate::pg::config(cleaned.as_deref())?;
        let user = cfg
            .get_user()
            .ok_or_else(|| {
                anyhow!("no PostgreSQL user given\nhint: set PGUSER or user= in --pg-url")
            })?
            .to_string();
        let tls = TlsMode::from_url_or_env(url)?;
        let connect_timeout = match cfg.get_connect_timeout() {
            Some(t) => *t,
            None => match std::env::var("PGCONNECT_TIMEOUT")
                .ok()
                .filter(|v| !v.is_empty())
            {
                Some(v) => std::time::Duration::from_secs(
                    v.parse::<u64>()
                        .with_context(|| {
                            format!("PGCONNECT_TIMEOUT={v:?} is not a number of seconds")
                        })?
                        .max(2),
                ),
                None => std::time::Duration::from_secs(30),
            },
        };
        Ok(ConnParams {
            hosts: cfg.get_hosts().to_vec(),
            ports: cfg.get_ports().to_vec(),
            dbname: cfg.get_dbname().unwrap_or(&user).to_string(),
            user,
            password: cfg.get_password().map(<[u8]>::to_vec),
            application_name: cfg.get_application_name().unwrap_or("tidemark").to_string(),
            tls,
            connect_timeout,
        })
    }
}

/// One result set of a simple query or of BASE_BACKUP: column names and text rows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

pub struct ReplConn {
    stream: Box<dyn Stream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

fn server_error(n: &ServerNotice) -> anyhow::Error {
    let hint = match n.code.as_str() {
        "28P01" | "28000" => "\nhint: check PGUSER/PGPASSWORD and that pg_hba.conf allows this host, user and database (a replication=database connection matches the database name, not the `replication` keyword)",
        "42501" => "\nhint: the role needs the REPLICATION attribute (ALTER ROLE ... REPLICATION)",
        "53300" => "\nhint: raise max_wal_senders on the server",
        "3D000" => "\nhint: set PGDATABASE (or dbname= in --pg-url) to a database that exists, e.g. postgres",
        _ => "",
    };
    anyhow!("postgresql refused: {n}{hint}")
}

impl ReplConn {
    /// Connects to the first host that answers and authenticates.
    pub async fn connect(p: &ConnParams) -> Result<ReplConn> {
        let mut last = None;
        for (i, host) in p.hosts.iter().enumerate() {
            let port = p
                .ports
                .get(i)
                .or_else(|| p.ports.first())
                .copied()
                .unwrap_or(5432);
            let attempt = async {
                let (stream, name): (Box<dyn Stream>, String) = match host {
                    Host::Tcp(h) => {
                        let s = tokio::net::TcpStream::connect((h.as_str(), port))
                            .await
                            .with_context(|| format!("cannot connect to {h}:{port}"))?;
                        s.set_nodelay(true).ok();
                        let s = tls::negotiate(s, h, &p.tls).await?;
                        (s, format!("{h}:{port}"))
                    }
                    Host::Unix(dir) => {
                        let path = dir.join(format!(".s.PGSQL.{port}"));
                        let s = tokio::net::UnixStream::connect(&path)
                            .await
                            .with_context(|| format!("cannot connect to {}", path.display()))?;
                        if p.tls.required() {
                            bail!("sslmode requires TLS but {} is a Unix socket\nhint: connect over TCP or use sslmode=prefer", path.display());
                        }
                        (Box::new(s) as Box<dyn Stream>, path.display().to_string())
                    }
                };
                let mut c = ReplConn {
                    stream,
                    rbuf: BytesMut::with_capacity(64 * 1024),
                    wbuf: BytesMut::new(),
                };
                c.startup(p)
                    .await
                    .with_context(|| format!("replication connection to {name} failed"))?;
                Ok::<_, anyhow::Error>(c)
            };
            match tokio::time::timeout(p.connect_timeout, attempt).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(anyhow!(
                        "connecting to PostgreSQL on {host:?} port {port} took longer than {}s\nhint: check PGHOST/PGPORT and the network; PGCONNECT_TIMEOUT sets the limit",
                        p.connect_timeout.as_secs()
                    ))
                }
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow!("no PostgreSQL host given\nhint: set PGHOST or --pg-url")))
    }

    async fn flush(&mut self) -> Result<()> {
        let b = self.wbuf.split();
        self.stream
            .write_all(&b)
            .await
            .context("cannot write to the PostgreSQL connection")?;
        self.stream
            .flush()
            .await
            .context("cannot write to the PostgreSQL connection")
    }

    /// The next message; NoticeResponse and ParameterStatus are handled here.
    pub async fn next(&mut self) -> Result<Frame> {
        loop {
            if let Some(f) = message::take_frame(&mut self.rbuf)? {
                match f.tag {
                    b'N' => {
                        let n = message::parse_notice(&f.body)?;
                        tracing::info!(notice = %n, "postgresql notice");
                    }
                    b'S' => {}
                    _ => return Ok(f),
                }
                continue;
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .context("cannot read from the PostgreSQL connection")?;
            if n == 0 {
                bail!("postgresql closed the connection\nhint: the server log says why (a terminated walsender, a restart, a timeout)");
            }
        }
    }

    async fn startup(&mut self, p: &ConnParams) -> Result<()> {
        let params = [
            ("user", p.user.as_str()),
            ("database", p.dbname.as_str()),
            ("replication", "database"),
            ("application_name", p.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)?;
        self.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = self.next().await?;
            match f.tag {
                b'R' => match message::parse_auth(&f.body)? {
                    Auth::Ok => {}
                    Auth::Cleartext => {
                        let pw = self.password(p)?;
                        frontend::password_message(&pw, &mut self.wbuf)?;
                        self.flush().await?;
                    }
                    Auth::Md5(salt) => {
                        let pw = self.password(p)?;
                        let h = postgres_protocol::authentication::md5_hash(
                            p.user.as_bytes(),
                            &pw,
                            salt,
                        );
                        frontend::password_message(h.as_bytes(), &mut self.wbuf)?;
                        self.flush().await?;
                    }
                    Auth::Sasl(mechs) => {
                        if !mechs.iter().any(|m| m == SCRAM_SHA_256) {
                            bail!("postgresql offers SASL mechanisms {mechs:?}, none of which tidemark supports\nhint: use scram-sha-256 or md5 in pg_hba.conf");
                        }
                        let pw = self.password(p)?;
                        let s = ScramSha256::new(&pw, ChannelBinding::unsupported());
                        frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)?;
                        self.flush().await?;
                        scram = Some(s);
                    }
                    Auth::SaslContinue(data) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| anyhow!("postgresql sent SASLContinue before SASL"))?;
                        s.update(&data).context("SCRAM authentication failed")?;
                        frontend::sasl_response(s.message(), &mut self.wbuf)?;
                        self.flush().await?;
                    }
                    Auth::SaslFinal(data) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| anyhow!("postgresql sent SASLFinal before SASL"))?;
                        s.finish(&data)
                            .context("SCRAM authentication failed: the server's proof is wrong")?;
                    }
                    Auth::Other(n) => bail!("postgresql asks for authentication method {n}, which tidemark does not support\nhint: use scram-sha-256, md5, password or trust in pg_hba.conf"),
                },
                b'K' => {}
                b'Z' => return Ok(()),
                b'E' => return Err(server_error(&message::parse_notice(&f.body)?)),
                t => {
                    return Err(message::ProtocolError::Unexpected {
                        tag: t as char,
                        during: "during startup",
                    }
                    .into())
                }
            }
        }
    }

    fn password(&self, p: &ConnParams) -> Result<Vec<u8>> {
        p.password
            .clone()
            .ok_or_else(|| anyhow!("postgresql asks for a password and none is set\nhint: set PGPASSWORD or password= in --pg-url"))
    }

    /// Sends a simple query; returns its result sets once the server is ready again.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<ResultSet>> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut sets = Vec::new();
        let mut err = None;
        loop {
            let f = self.next().await?;
            if self.result_message(&f, &mut sets)? {
                continue;
            }
            match f.tag {
                b'E' => err = Some(server_error(&message::parse_notice(&f.body)?)),
                b'Z' => break,
                b'I' => {}
                t => {
                    return Err(message::ProtocolError::Unexpected {
                        tag: t as char,
                        during: "in a query result",
                    }
                    .into())
                }
            }
        }
        match err {
            Some(e) => Err(e.context(format!("query {sql:?} failed"))),
            None => Ok(sets),
        }
    }

    /// Handles RowDescription, DataRow and CommandComplete; `true` if `f` was one of them.
    fn result_message(&self, f: &Frame, sets: &mut Vec<ResultSet>) -> Result<bool> {
        match f.tag {
            b'T' => sets.push(ResultSet {
                columns: message::parse_row_description(&f.body)?,
                rows: Vec::new(),
            }),
            b'D' => {
                let row = message::parse_data_row(&f.body)?;
                let set = sets
                    .last_mut()
                    .ok_or_else(|| anyhow!("postgresql sent a DataRow without a RowDescription"))?;
                if set.rows.len() >= 1 << 20 {
                    bail!("postgresql sent more than 1048576 rows to a replication client");
                }
                set.rows.push(row);
            }
            b'C' => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Sends BASE_BACKUP and reads up to the CopyOutResponse: returns the start-position and
    /// tablespace result sets.
    pub async fn start_base_backup(&mut self, cmd: &str) -> Result<Vec<ResultSet>> {
        frontend::query(cmd, &mut self.wbuf)?;
        self.flush().await?;
        let mut sets = Vec::new();
        loop {
            let f = self.next().await?;
            if self.result_message(&f, &mut sets)? {
                continue;
            }
            match f.tag {
                b'H' => return Ok(sets),
                b'E' => {
                    return Err(server_error(&message::parse_notice(&f.body)?)
                        .context("BASE_BACKUP failed"))
                }
                t => {
                    return Err(message::ProtocolError::Unexpected {
                        tag: t as char,
                        during: "before the BASE_BACKUP data",
                    }
                    .into())
                }
            }
        }
    }

    /// The next payload of the BASE_BACKUP stream, in the 15+ shape whatever the server's
    /// major ([`BackupStream`]); `None` once the last COPY has ended.
    pub async fn next_backup_data(&mut self, s: &mut BackupStream) -> Result<Option<BackupData>> {
        loop {
            if let Some(d) = s.take_pending() {
                return Ok(Some(d));
            }
            if s.is_done() {
                return Ok(None);
            }
            let f = self.next().await?;
            if f.tag == b'E' {
                return Err(server_error(&message::parse_notice(&f.body)?)
                    .context("BASE_BACKUP failed while streaming"));
            }
            match s.on_frame(f)? {
                Step::Event(d) => return Ok(Some(d)),
                Step::Next => {}
                Step::Done => return Ok(None),
            }
        }
    }

    /// After CopyDone: reads the end-position result set and waits until the server is ready.
    pub async fn finish_base_backup(&mut self) -> Result<Vec<ResultSet>> {
        let mut sets = Vec::new();
        let mut err = None;
        loop {
            let f = self.next().await?;
            if self.result_message(&f, &mut sets)? {
                continue;
            }
            match f.tag {
                b'E' => err = Some(server_error(&message::parse_notice(&f.body)?)),
                b'Z' => break,
                t => {
                    return Err(message::ProtocolError::Unexpected {
                        tag: t as char,
                        during: "after the BASE_BACKUP data",
                    }
                    .into())
                }
            }
        }
        match err {
            Some(e) => Err(e.context("BASE_BACKUP failed at its end")),
            None => Ok(sets),
        }
    }

    /// A connection over an already established, authenticated stream (tests).
    #[cfg(test)]
    fn over(stream: Box<dyn Stream>) -> ReplConn {
        ReplConn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        }
    }

    /// Sends Terminate and closes the socket.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests;
