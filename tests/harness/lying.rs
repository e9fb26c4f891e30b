//! A lying HTTP/1.1 proxy in front of an S3-compatible server (moto) on loopback: a store that
//! answers with success but did not do what it said.
//!
//! On command it (a) answers `200 OK` to a PUT without forwarding it (the object is never
//! stored), (b) forwards a PUT with its body cut to a prefix (Content-Length adjusted, so the
//! server stores a short object) and passes on the server's `200`, (c) answers a GET with a
//! short or empty body (status 200, or 206 to a range read, Content-Length matching the short
//! body), (d) hides from
//! ListObjectsV2 answers the objects PUT through it less than N seconds ago (a LIST lagging
//! behind PUT). Each lie applies to requests whose path contains a filter string, for a number
//! of requests or until turned off, and is counted so a test can assert it was told.
//!
//! Invariants:
//! - Every request is parsed (head capped at [`MAX_HEAD`], body by Content-Length or chunked)
//!   and forwarded on a fresh upstream connection with `Connection: close`; the answer is read
//!   whole and written back with a Content-Length, so client connections stay keep-alive.
//! - HEAD answers and answers without a body are passed on unchanged.
//! - With no lie set, requests and answers pass through byte for byte (bodies and headers;
//!   only the framing headers are rewritten).

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Largest request or response head accepted.
pub const MAX_HEAD: usize = 64 << 10;

/// What to do to a PUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutLie {
    /// Answer 200 without forwarding: the object is never stored.
    Drop,
    /// Forward only the first `keep` bytes of the body.
    Truncate { keep: usize },
}

#[derive(Clone, Debug)]
struct Rule<T> {
    what: T,
    filter: String,
    remaining: u64,
}

#[derive(Default)]
struct Rules {
    put: Option<Rule<PutLie>>,
    /// Bytes kept of a GET body.
    get: Option<Rule<usize>>,
    list_lag: Option<Duration>,
    /// When each key (the request path) was last PUT through the proxy.
    written: HashMap<String, Instant>,
    counts: Counts,
}

/// How many lies of each kind were told.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub puts_dropped: u64,
    pub puts_truncated: u64,
    pub gets_cut: u64,
    pub list_hidden: u64,
}

pub struct LyingProxy {
    pub endpoint: String,
    rules: Arc<Mutex<Rules>>,
    task: tokio::task::JoinHandle<()>,
}

impl LyingProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<LyingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the lying proxy")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let rules = Arc::new(Mutex::new(Rules::default()));
        let upstream = upstream.to_string();
        let r = rules.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (up, r) = (upstream.clone(), r.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, &up, &r).await {
                        eprintln!("lying proxy: connection ended: {e:#}");
                    }
                });
            }
        });
        Ok(LyingProxy {
            endpoint,
            rules,
            task,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Rules) -> T) -> T {
        f(&mut self.rules.lock().expect("lying proxy rules poisoned"))
    }

    /// Lies to the next `times` PUTs whose path contains `filter` (`u64::MAX`: until
    /// [`LyingProxy::truth`]).
    pub fn lie_to_puts(&self, lie: PutLie, filter: &str, times: u64) {
        self.with(|r| {
            r.put = Some(Rule {
                what: lie,
                filter: filter.into(),
                remaining: times,
            })
        });
    }

    /// Cuts the bodies of the next `times` GETs whose path contains `filter` to `keep` bytes.
    pub fn cut_gets(&self, keep: usize, filter: &str, times: u64) {
        self.with(|r| {
            r.get = Some(Rule {
                what: keep,
                filter: filter.into(),
                remaining: times,
            })
        });
    }

    /// Hides from LIST answers the objects PUT through the proxy less than `lag` ago (`None`:
    /// LIST tells the truth).
    pub fn lag_lists(&self, lag: Option<Duration>) {
        self.with(|r| r.list_lag = lag);
    }

    /// Stops every PUT and GET lie (the LIST lag stays as set).
    pub fn truth(&self) {
        self.with(|r| {
            r.put = None;
            r.get = None;
        });
    }

    pub fn counts(&self) -> Counts {
        self.with(|r| r.counts)
    }
}

impl Drop for LyingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes one use of `rule` if `path` matches it.
fn take<T: Copy>(rule: &mut Option<Rule<T>>, path: &str) -> Option<T> {
    let r = rule.as_mut()?;
    if r.remaining == 0 || !path.contains(&r.filter) {
        return None;
    }
    r.remaining -= 1;
    Some(r.what)
}

struct Head {
    /// The first line (request line or status line).
    line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn is_chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> Result<Option<usize>> {
        self.get("content-length")
            .map(|v| v.trim().parse().context("bad Content-Length"))
            .transpose()
    }

    /// The head with framing headers replaced: `Content-Length: len` (when `len` is given)
    /// and `Connection: connection`.
    fn encode(&self, len: Option<usize>, connection: &str) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.line);
        for (k, v) in &self.headers {
            let skip = ["connection", "transfer-encoding", "keep-alive"]
                .iter()
                .any(|h| k.eq_ignore_ascii_case(h))
                || (len.is_some() && k.eq_ignore_ascii_case("content-length"));
            if !skip {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        if let Some(n) = len {
            out.push_str(&format!("Content-Length: {n}\r\n"));
        }
        out.push_str(&format!("Connection: {connection}\r\n\r\n"));
        out.into_bytes()
    }
}

/// Reads a head; `None` at a clean end of stream before any byte.
async fn read_head<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Option<Head>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).await?;
        if n == 0 {
            if lines.is_empty() {
                return Ok(None);
            }
            bail!("connection closed inside a head");
        }
        total += n;
        if total > MAX_HEAD {
            bail!("head longer than {MAX_HEAD} bytes");
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            if lines.is_empty() {
                continue;
            }
            break;
        }
        lines.push(line);
    }
    let line = lines.remove(0);
    let headers = lines
        .into_iter()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Ok(Some(Head { line, headers }))
}

/// Reads a body: chunked, by Content-Length, or (`to_eof`) to the end of the stream.
async fn read_body<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    head: &Head,
    to_eof: bool,
) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.is_chunked() {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await?;
            let hex = size.trim().split(';').next().unwrap_or("");
            let n = usize::from_str_radix(hex, 16)
                .with_context(|| format!("bad chunk size {size:?}"))?;
            if n == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut t = String::new();
                    if r.read_line(&mut t).await? == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let at = body.len();
            body.resize(at + n, 0);
            r.read_exact(&mut body[at..]).await?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).await?;
        }
    } else if let Some(n) = head.content_length()? {
        body.resize(n, 0);
        r.read_exact(&mut body).await?;
    } else if to_eof {
        r.read_to_end(&mut body).await?;
    }
    Ok(body)
}

async fn serve(conn: TcpStream, upstream: &str, rules: &Mutex<Rules>) -> Result<()> {
    let (rd, mut wr) = conn.into_split();
    let mut rd = BufReader::new(rd);
    while let Some(req) = read_head(&mut rd).await? {
        let body = read_body(&mut rd, &req, false).await?;
        let mut parts = req.line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let path = target.split('?').next().unwrap_or("").to_string();
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let is_list = method == "GET" && query.split('&').any(|p| p == "list-type=2");
        let (put_lie, get_cut, lag) = {
            let mut r = rules.lock().expect("lying proxy rules poisoned");
            let put_lie = (method == "PUT").then(|| take(&mut r.put, &path)).flatten();
            let get_cut = (method == "GET" && !is_list)
                .then(|| take(&mut r.get, &path))
                .flatten();
            if method == "PUT" && put_lie != Some(PutLie::Drop) {
                r.written.insert(path.clone(), Instant::now());
            }
            (put_lie, get_cut, r.list_lag)
        };
        let reply = match put_lie {
            Some(PutLie::Drop) => {
                rules.lock().expect("poisoned").counts.puts_dropped += 1;
                let etag = format!("\"{:032x}\"", body.len() as u128 * 7919);
                format!("HTTP/1.1 200 OK\r\nETag: {etag}\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n").into_bytes()
            }
            lie => {
                let mut body = body;
                if let Some(PutLie::Truncate { keep }) = lie {
                    body.truncate(keep.min(body.len()));
                    rules.lock().expect("poisoned").counts.puts_truncated += 1;
                }
                let (head, mut rbody) = forward(upstream, &req, &body).await?;
                let status: u16 = head
                    .line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if method == "HEAD" || status == 204 || status == 304 {
                    let mut out = head.encode(None, "keep-alive");
                    out.extend_from_slice(&rbody);
                    out
                } else {
                    if status == 200 || status == 206 {
                        if let Some(keep) = get_cut {
                            rbody.truncate(keep.min(rbody.len()));
                            rules.lock().expect("poisoned").counts.gets_cut += 1;
                        }
                        if let (true, Some(lag)) = (is_list, lag) {
                            rbody = hide_recent(rules, &path, rbody, lag);
                        }
                    }
                    let mut out = head.encode(Some(rbody.len()), "keep-alive");
                    out.extend_from_slice(&rbody);
                    out
                }
            }
        };
        wr.write_all(&reply).await?;
        wr.flush().await?;
    }
    Ok(())
}

/// Sends one request upstream on a fresh connection and reads its whole answer.
async fn forward(upstream: &str, req: &Head, body: &[u8]) -> Result<(Head, Vec<u8>)> {
    let up = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("cannot reach {upstream}"))?;
    let (rd, mut wr) = up.into_split();
    let has_body = !body.is_empty() || req.content_length()?.is_some() || req.is_chunked();
    let mut out = req.encode(has_body.then_some(body.len()), "close");
    out.extend_from_slice(body);
    wr.write_all(&out).await?;
    wr.flush().await?;
    let mut rd = BufReader::new(rd);
    let mut head = read_head(&mut rd)
        .await?
        .context("upstream closed without answering")?;
    // A 100 Continue is followed by the real answer.
    while head.line.split_whitespace().nth(1) == Some("100") {
        head = read_head(&mut rd)
            .await?
            .context("upstream closed after 100")?;
    }
    let method = req.line.split_whitespace().next().unwrap_or("");
    let body = if method == "HEAD" {
        Vec::new()
    } else {
        read_body(&mut rd, &head, true).await?
    };
    Ok((head, body))
}

/// Removes from a ListObjectsV2 answer (`<Contents>` elements) the objects PUT through the proxy
/// less than `lag` ago. `path` is the bucket's path (`/bucket`); listed keys are below it.
fn hide_recent(rules: &Mutex<Rules>, path: &str, body: Vec<u8>, lag: Duration) -> Vec<u8> {
    let Ok(text) = String::from_utf8(body.clone()) else {
        return body;
    };
    let bucket = path.trim_end_matches('/');
    let mut r = rules.lock().expect("poisoned");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    let mut hidden = 0;
    while let Some(start) = rest.find("<Contents>") {
        let Some(len) = rest[start..].find("</Contents>") else {
            break;
        };
        let end = start + len + "</Contents>".len();
        let elem = &rest[start..end];
        let key = elem
            .split_once("<Key>")
            .and_then(|(_, k)| k.split_once("</Key>"))
            .map(|(k, _)| k.replace("&amp;", "&"))
            .unwrap_or_default();
        let recent = r
            .written
            .get(&format!("{bucket}/{key}"))
            .is_some_and(|t| t.elapsed() < lag);
        out.push_str(&rest[..start]);
        if recent {
            hidden += 1;
        } else {
            out.push_str(elem);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    if hidden > 0 {
        r.counts.list_hidden += hidden;
        // The answer's KeyCount no longer matches; clients go by the elements.
    }
    out.into_bytes()
}
