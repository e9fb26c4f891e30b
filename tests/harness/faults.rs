//! A fault-injecting TCP proxy for an HTTP object store (moto) on loopback.
//!
//! While faults are on, one new connection in `every` gets the next fault in turn: an S3
//! `503 SlowDown` reply, a stall (the request is read and never answered, so the client's timeout
//! fires), a response cut short after a few bytes (the request may still have taken effect
//! upstream: the client sees a failure for a write that happened), or a pass-through cut after a
//! short time; the other connections pass through but live at most HEALTHY_LIFE, so the client
//! keeps opening new ones. Changing the fault setting closes every open connection, so pooled
//! keep-alive connections cannot dodge it. While faults are off, connections pass through.

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The faults, in the order connections receive them.
pub const FAULTS: [&str; 4] = ["503", "stall", "truncated", "cut"];
/// How long a stalled connection is held (longer than the client timeout the tests set).
const STALL: Duration = Duration::from_secs(15);
/// How long a "cut" pass-through connection lives.
const CUT_AFTER: Duration = Duration::from_millis(700);
/// How long a healthy connection lives while faults are on.
const HEALTHY_LIFE: Duration = Duration::from_secs(2);
/// Largest request head read before answering 503.
const MAX_HEAD: usize = 64 << 10;

pub struct FaultProxy {
    pub endpoint: String,
    every: Arc<AtomicU64>,
    counts: Arc<[AtomicU64; 4]>,
    epoch: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the fault proxy")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let every = Arc::new(AtomicU64::new(0));
        let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let (epoch, epoch_rx) = watch::channel(0u64);
        let upstream = upstream.to_string();
        let (ev, c) = (every.clone(), counts.clone());
        let (mut conns, mut faults) = (0u64, 0u64);
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let every = ev.load(Ordering::SeqCst);
                conns += 1;
                let fault = if every == 0 {
                    Fault::Off
                } else if conns % every == 0 {
                    let k = (faults % FAULTS.len() as u64) as usize;
                    faults += 1;
                    c[k].fetch_add(1, Ordering::SeqCst);
                    Fault::Inject(k)
                } else {
                    Fault::Healthy
                };
                // A clone starts from the original's last seen version: mark the current
                // one seen, so only a later toggle closes this connection.
                let mut rx = epoch_rx.clone();
                rx.borrow_and_update();
                let up = upstream.clone();
                tokio::spawn(async move {
                    let _ = serve(conn, &up, fault, rx).await;
                });
            }
        });
        Ok(FaultProxy {
            endpoint,
            every,
            counts,
            epoch,
            task,
        })
    }

    /// Faults on one new connection in `every` (0: off; 1: every connection), and closes every
    /// open connection.
    pub fn set_faults(&self, every: u64) {
        self.every.store(every, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    /// How many connections received each fault, in FAULTS order.
    pub fn counts(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::SeqCst))
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Fault {
    Off,
    Healthy,
    Inject(usize),
}

async fn serve(
    mut conn: TcpStream,
    upstream: &str,
    fault: Fault,
    mut epoch: watch::Receiver<u64>,
) -> Result<()> {
    let closed = async move {
        let _ = epoch.changed().await;
    };
    match fault {
        Fault::Inject(0) => {
            read_head(&mut conn).await?;
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>injected by the tidemark fault proxy</Message></Error>";
            let reply = format!(
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(reply.as_bytes()).await?;
            conn.shutdown().await?;
        }
        Fault::Inject(1) => {
            tokio::select! {
                _ = async {
                    let mut buf = vec![0u8; 64 << 10];
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                } => {}
                _ = tokio::time::sleep(STALL) => {}
                _ = closed => {}
            }
        }
        Fault::Inject(2) => {
            let mut up = TcpStream::connect(upstream).await?;
            let (mut cr, mut cw) = conn.split();
            let (mut ur, mut uw) = up.split();
            let forward = tokio::io::copy(&mut cr, &mut uw);
            let truncated = async {
                // Pass the first few bytes of the response, then hang up.
                let mut buf = [0u8; 24];
                let n = ur.read(&mut buf).await?;
                cw.write_all(&buf[..n]).await?;
                Ok::<_, std::io::Error>(())
            };
            tokio::select! {
                _ = forward => {}
                _ = truncated => {}
                _ = closed => {}
            }
        }
        Fault::Inject(_) | Fault::Healthy => {
            let life = if matches!(fault, Fault::Healthy) {
                HEALTHY_LIFE
            } else {
                CUT_AFTER
            };
            let mut up = TcpStream::connect(upstream).await?;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
                _ = tokio::time::sleep(life) => {}
                _ = closed => {}
            }
        }
        Fault::Off => {
            let mut up = TcpStream::connect(upstream).await?;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut conn, &mut up) => {}
                _ = closed => {}
            }
        }
    }
    Ok(())
}

/// Reads up to the end of the request head (and whatever body bytes arrive with it).
async fn read_head(conn: &mut TcpStream) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(())
}
