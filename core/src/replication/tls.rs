//! TLS for the replication connection, with libpq's `sslmode` semantics (rustls, ring):
//! `disable` never, `prefer` (the default) if the server offers it, `require` always but without
//! verifying the certificate, `verify-full` always with the certificate verified against
//! `sslrootcert` (default `~/.postgresql/root.crt`) and the host name.
//!
//! Invariants:
//! - `require` and `verify-full` never fall back to plain text.
//! - Under `verify-full` a certificate that does not chain to the root file or does not name
//!   the host fails the connection.

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The byte stream a connection runs over: a Unix socket, plain TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyFull { root_cert: PathBuf },
}

impl TlsMode {
    pub fn required(&self) -> bool {
        matches!(self, TlsMode::Require | TlsMode::VerifyFull { .. })
    }

    /// From `sslmode`/`sslrootcert` in `--pg-url` (already extracted by [`split_ssl_options`])
    /// or `PGSSLMODE`/`PGSSLROOTCERT`.
    pub fn from_url_or_env(url: Option<&str>) -> Result<TlsMode> {
        let (_, mode, root) = match url {
            Some(u) => split_ssl_options(u),
            None => (String::new(), None, None),
        };
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mode = mode.or_else(|| env("PGSSLMODE"));
        let root = root.or_else(|| env("PGSSLROOTCERT"));
        Self::parse(mode.as_deref(), root)
    }

    fn parse(mode: Option<&str>, root: Option<String>) -> Result<TlsMode> {
        Ok(match mode.unwrap_or("prefer") {
            "disable" => TlsMode::Disable,
            "allow" | "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-full" => TlsMode::VerifyFull {
                root_cert: match root {
                    Some(r) => PathBuf::from(r),
                    None => std::env::var_os("HOME")
                        .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
                        .ok_or_else(|| anyhow!("sslmode=verify-full needs a root certificate\nhint: set PGSSLROOTCERT"))?,
                },
            },
            "verify-ca" => bail!("sslmode=verify-ca is not supported\nhint: use sslmode=verify-full (also checks the host name) or require"),
            other => bail!("sslmode {other:?} is not a valid SSL mode\nhint: use disable, prefer, require or verify-full"),
        })
    }
}

/// Removes `sslmode` and `sslrootcert` from a connection string (key=value or URL form) and
/// returns them: the rest is parsed by tokio-postgres, which does not know every libpq mode.
pub fn split_ssl_options(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    let mut take = |kv: &str| -> bool {
        if let Some(v) = kv.strip_prefix("sslmode=") {
            mode = Some(v.to_string());
            true
        } else if let Some(v) = kv.strip_prefix("sslrootcert=") {
            root = Some(v.to_string());
            true
        } else {
            false
        }
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, q)) => {
                let kept: Vec<&str> = q.split('&').filter(|kv| !take(kv)).collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_string(),
        }
    } else {
        url.split_whitespace()
            .filter(|kv| !take(kv))
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, mode, root)
}

/// Sends SSLRequest if the mode asks for TLS and wraps the socket.
pub async fn negotiate(mut s: TcpStream, host: &str, mode: &TlsMode) -> Result<Box<dyn Stream>> {
    if *mode == TlsMode::Disable {
        return Ok(Box::new(s));
    }
    let mut req = bytes::BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut req);
    s.write_all(&req).await.context("cannot send SSLRequest")?;
    let answer = s.read_u8().await.context("no answer to SSLRequest")?;
    match answer {
        b'S' => {}
        b'N' if !mode.required() => return Ok(Box::new(s)),
        b'N' => bail!("the server does not accept TLS connections, and sslmode requires TLS\nhint: enable ssl on the server or use sslmode=prefer"),
        other => bail!("unexpected answer {other:#x} to SSLRequest"),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?;
    let config = match mode {
        TlsMode::VerifyFull { root_cert } => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(root_cert)
                .with_context(|| format!("cannot read root certificate {}\nhint: set PGSSLROOTCERT to the CA file that signed the server certificate", root_cert.display()))?;
            for c in certs {
                let c = c.with_context(|| {
                    format!("{} holds an invalid certificate", root_cert.display())
                })?;
                roots.add(c).with_context(|| {
                    format!("{} holds an unusable certificate", root_cert.display())
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
    };
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| anyhow!("{host:?} is not a valid TLS server name"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, s)
        .await
        .with_context(|| format!("TLS handshake with {host} failed"))?;
    Ok(Box::new(tls))
}

/// `sslmode=require`/`prefer`: encrypt, but accept any certificate (libpq's behaviour).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_options_are_split_from_both_forms() {
        let (rest, m, r) =
            split_ssl_options("host=db port=5432 sslmode=verify-full sslrootcert=/ca.pem user=x");
        assert_eq!(rest, "host=db port=5432 user=x");
        assert_eq!(m.as_deref(), Some("verify-full"));
        assert_eq!(r.as_deref(), Some("/ca.pem"));
        let (rest, m, _) =
            split_ssl_options("postgresql://u@db:5/x?sslmode=require&application_name=a");
        assert_eq!(rest, "postgresql://u@db:5/x?application_name=a");
        assert_eq!(m.as_deref(), Some("require"));
        let (rest, m, _) = split_ssl_options("postgresql://u@db/x?sslmode=disable");
        assert_eq!(rest, "postgresql://u@db/x");
        assert_eq!(m.as_deref(), Some("disable"));
    }

    #[test]
    fn modes_parse_like_libpq() {
        assert_eq!(TlsMode::parse(None, None).unwrap(), TlsMode::Prefer);
        assert_eq!(
            TlsMode::parse(Some("disable"), None).unwrap(),
            TlsMode::Disable
        );
        assert_eq!(
            TlsMode::parse(Some("verify-full"), Some("/ca".into())).unwrap(),
            TlsMode::VerifyFull {
                root_cert: "/ca".into()
            }
        );
        assert!(TlsMode::parse(Some("verify-ca"), None).is_err());
        assert!(TlsMode::parse(Some("bogus"), None).is_err());
    }
}
