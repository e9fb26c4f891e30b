//! A loopback HTTP proxy in front of moto that answers refused requests the way AWS S3 does,
//! where moto does not: a 403 error document gets the `<AWSAccessKeyId>` and the
//! `<SignatureProvided>` of the request's Authorization header, as S3 puts them in its
//! InvalidAccessKeyId and SignatureDoesNotMatch bodies. A client that prints error bodies whole
//! therefore prints the access key id, as it would against AWS.
//!
//! Invariants:
//! - One request per connection: the request goes upstream with `Connection: close`, the
//!   response comes back with `Connection: close` (and a corrected Content-Length when its body
//!   was changed). Everything else passes unchanged, so signatures over the request still hold.
//! - Dropping an [`S3Echo`] stops accepting connections.

use anyhow::{bail, Context, Result};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request or response head read.
const MAX_HEAD: usize = 64 << 10;
/// Longest wait for one side to send.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

pub struct S3Echo {
    pub endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

impl S3Echo {
    /// Listens on a free loopback port and forwards to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> Result<S3Echo> {
        let upstream = upstream
            .strip_prefix("http://")
            .with_context(|| {
                format!("the S3 echo proxy needs an http:// upstream, not {upstream}")
            })?
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the S3 echo proxy")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let up = upstream.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, &up).await {
                        eprintln!("harness: s3 echo proxy: {e:#}");
                    }
                });
            }
        });
        Ok(S3Echo { endpoint, task })
    }
}

impl Drop for S3Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut client: TcpStream, upstream: &str) -> Result<()> {
    let (head, mut rest) = read_head(&mut client).await?;
    let head_text = String::from_utf8_lossy(&head).into_owned();
    if header(&head_text, "transfer-encoding").is_some() {
        bail!("chunked request bodies are not supported");
    }
    let len: usize = header(&head_text, "content-length")
        .map(|v| v.parse().context("bad Content-Length"))
        .transpose()?
        .unwrap_or(0);
    while rest.len() < len {
        let mut buf = vec![0u8; 64 << 10];
        let n = timed(client.read(&mut buf)).await?;
        if n == 0 {
            bail!("the client closed the connection inside the request body");
        }
        rest.extend_from_slice(&buf[..n]);
    }
    let authorization = header(&head_text, "authorization").unwrap_or_default();
    let is_head = head_text.starts_with("HEAD ");

    let mut up = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("cannot connect to {upstream}"))?;
    up.write_all(with_connection_close(&head_text).as_bytes())
        .await?;
    up.write_all(&rest).await?;
    let mut response = Vec::new();
    timed(up.read_to_end(&mut response)).await?;

    let response = if is_head {
        response
    } else {
        echo_credentials(response, &authorization)
    };
    client.write_all(&response).await?;
    client.shutdown().await?;
    Ok(())
}

/// A 403 S3 error document with the request's access key id and signature added after its
/// `</Message>`, as AWS S3 answers; any other response unchanged.
fn echo_credentials(response: Vec<u8>, authorization: &str) -> Vec<u8> {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return response;
    };
    let head = String::from_utf8_lossy(&response[..end]).into_owned();
    let body = String::from_utf8_lossy(&response[end + 4..]).into_owned();
    let status_403 = head.split_whitespace().nth(1) == Some("403");
    let key_id = authorization
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .unwrap_or("");
    let signature = authorization
        .split("Signature=")
        .nth(1)
        .map(|s| s.trim())
        .unwrap_or("");
    if !status_403 || key_id.is_empty() || header(&head, "transfer-encoding").is_some() {
        return response;
    }
    let Some(at) = body.find("</Message>") else {
        return response;
    };
    let at = at + "</Message>".len();
    let body = format!(
        "{}<AWSAccessKeyId>{key_id}</AWSAccessKeyId><SignatureProvided>{signature}</SignatureProvided>{}",
        &body[..at],
        &body[at..]
    );
    let mut out = String::new();
    for line in with_connection_close(&head).trim_end().lines() {
        if !line.to_ascii_lowercase().starts_with("content-length:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

/// The head with any Connection header replaced by `Connection: close`, ending in an empty line.
fn with_connection_close(head: &str) -> String {
    let mut out = String::new();
    for line in head.trim_end().lines() {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// The value of header `name` (case-insensitive) in a message head.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Reads a message head: (head without its final empty line, body bytes read with it).
async fn read_head(conn: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = data.split_off(end + 4);
            data.truncate(end + 2);
            return Ok((data, rest));
        }
        if data.len() > MAX_HEAD {
            bail!("a request head longer than {MAX_HEAD} bytes");
        }
        let n = timed(conn.read(&mut buf)).await?;
        if n == 0 {
            bail!("the client closed the connection before the end of the request head");
        }
        data.extend_from_slice(&buf[..n]);
    }
}

async fn timed<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T> {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .context("the S3 echo proxy timed out")?
        .context("S3 echo proxy i/o")
}
