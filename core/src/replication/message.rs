//! Backend messages of the PostgreSQL frontend/backend protocol (version 3) as a replication
//! client sees them, and the payloads of BASE_BACKUP's CopyData stream. Pure: bytes in, values
//! out, no I/O, so it is unit-tested and fuzzed on its own.
//!
//! Invariants:
//! - A message length is checked against [`MAX_MESSAGE`] before any buffer is allocated for it;
//!   a longer or negative length is a protocol error, never an allocation.
//! - Every field read is bounds-checked: truncated or garbage input is an error, never a panic.

use bytes::{Buf, Bytes, BytesMut};
use std::fmt;

/// Largest backend message accepted (a CopyData of BASE_BACKUP is at most 32 KiB; error texts,
/// row values and the server's backup manifest arrive in far smaller pieces).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Largest number of columns or rows in a result set a replication client expects.
const MAX_FIELDS: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("postgresql sent a message of {len} bytes (tag {tag:?}); the limit is {MAX_MESSAGE}")]
    TooLong { tag: char, len: i64 },
    #[error("postgresql sent a malformed {what} message: {why}")]
    Malformed {
        what: &'static str,
        why: &'static str,
    },
    #[error("postgresql sent an unexpected message {tag:?} {during}")]
    Unexpected { tag: char, during: &'static str },
}

fn bad(what: &'static str, why: &'static str) -> ProtocolError {
    ProtocolError::Malformed { what, why }
}

/// One framed backend message: its tag and its body (without tag and length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// Takes one complete message from the front of `buf`, or `None` if more bytes are needed.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as i64;
    if !(4..=MAX_MESSAGE as i64).contains(&len) {
        return Err(ProtocolError::TooLong {
            tag: tag as char,
            len,
        });
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut m = buf.split_to(total);
    m.advance(5);
    Ok(Some(Frame {
        tag,
        body: m.freeze(),
    }))
}

/// The fields of an ErrorResponse or NoticeResponse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerNotice {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ServerNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (server hint: {h})")?;
        }
        Ok(())
    }
}

/// A cursor over a message body.
struct Rd<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Rd<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Rd { b, what }
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        let (&v, rest) = self.b.split_first().ok_or(bad(self.what, "truncated"))?;
        self.b = rest;
        Ok(v)
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.b.len() < n {
            return Err(bad(self.what, "truncated"));
        }
        let (v, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(v)
    }
    fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Result<i64, ProtocolError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }
    /// A NUL-terminated string.
    fn cstr(&mut self) -> Result<String, ProtocolError> {
        let end = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or(bad(self.what, "string without terminator"))?;
        let s = String::from_utf8_lossy(&self.b[..end]).into_owned();
        self.b = &self.b[end + 1..];
        Ok(s)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(bad(self.what, "trailing bytes"))
        }
    }
}

/// Parses an ErrorResponse ('E') or NoticeResponse ('N') body.
pub fn parse_notice(body: &[u8]) -> Result<ServerNotice, ProtocolError> {
    let mut r = Rd::new(body, "error/notice");
    let mut n = ServerNotice::default();
    loop {
        let code = r.u8()?;
        if code == 0 {
            break;
        }
        let v = r.cstr()?;
        match code {
            b'V' => n.severity = v,
            b'S' if n.severity.is_empty() => n.severity = v,
            b'C' => n.code = v,
            b'M' => n.message = v,
            b'D' => n.detail = Some(v),
            b'H' => n.hint = Some(v),
            _ => {}
        }
    }
    r.end()?;
    Ok(n)
}

/// Authentication requests ('R').
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    Ok,
    Cleartext,
    Md5([u8; 4]),
    Sasl(Vec<String>),
    SaslContinue(Vec<u8>),
    SaslFinal(Vec<u8>),
    Other(i32),
}

pub fn parse_auth(body: &[u8]) -> Result<Auth, ProtocolError> {
    let mut r = Rd::new(body, "authentication");
    Ok(match r.i32()? {
        0 => Auth::Ok,
        3 => Auth::Cleartext,
        5 => {
            let s = r.bytes(4)?;
            Auth::Md5([s[0], s[1], s[2], s[3]])
        }
        10 => {
            let mut mechs = Vec::new();
            loop {
                let m = r.cstr()?;
                if m.is_empty() {
                    break;
                }
                if mechs.len() >= MAX_FIELDS {
                    return Err(bad("authentication", "too many SASL mechanisms"));
                }
                mechs.push(m);
            }
            Auth::Sasl(mechs)
        }
        11 => Auth::SaslContinue(r.rest().to_vec()),
        12 => Auth::SaslFinal(r.rest().to_vec()),
        n => Auth::Other(n),
    })
}

/// A RowDescription ('T'): the column names.
pub fn parse_row_description(body: &[u8]) -> Result<Vec<String>, ProtocolError> {
    let mut r = Rd::new(body, "RowDescription");
    let n = r.i16()?;
    if n < 0 || n as usize > MAX_FIELDS {
        return Err(bad("RowDescription", "bad column count"));
    }
    let mut cols = Vec::with_capacity((n as usize).min(body.len() / 19 + 1));
    for _ in 0..n {
        cols.push(r.cstr()?);
        r.bytes(18)?; // table oid, attnum, type oid, typlen, typmod, format
    }
    r.end()?;
    Ok(cols)
}

/// A DataRow ('D'): each value as text (`None` for NULL).
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ProtocolError> {
    let mut r = Rd::new(body, "DataRow");
    let n = r.i16()?;
    if n < 0 || n as usize > MAX_FIELDS {
        return Err(bad("DataRow", "bad column count"));
    }
    let mut vals = Vec::with_capacity((n as usize).min(body.len() / 4 + 1));
    for _ in 0..n {
        let len = r.i32()?;
        if len == -1 {
            vals.push(None);
        } else if len < 0 {
            return Err(bad("DataRow", "negative value length"));
        } else {
            let v = r.bytes(len as usize)?;
            vals.push(Some(String::from_utf8_lossy(v).into_owned()));
        }
    }
    r.end()?;
    Ok(vals)
}

/// The payload of one CopyData message of a BASE_BACKUP stream (PostgreSQL 15+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupData {
    /// 'n': a new tar archive starts; `tablespace` is empty for the main data directory.
    NewArchive { name: String, tablespace: String },
    /// 'm': the backup manifest follows in the next Data messages.
    Manifest,
    /// 'd': bytes of the current archive or of the manifest.
    Data(Bytes),
    /// 'p': bytes of the current tablespace done so far.
    Progress(u64),
}

pub fn parse_backup_data(body: Bytes) -> Result<BackupData, ProtocolError> {
    const W: &str = "BASE_BACKUP CopyData";
    let Some(&kind) = body.first() else {
        return Err(bad(W, "empty"));
    };
    match kind {
        b'd' => Ok(BackupData::Data(body.slice(1..))),
        b'n' => {
            let mut r = Rd::new(&body[1..], W);
            let name = r.cstr()?;
            let tablespace = r.cstr()?;
            r.end()?;
            Ok(BackupData::NewArchive { name, tablespace })
        }
        b'm' => {
            if body.len() != 1 {
                return Err(bad(W, "trailing bytes after 'm'"));
            }
            Ok(BackupData::Manifest)
        }
        b'p' => {
            let mut r = Rd::new(&body[1..], W);
            let v = r.i64()?;
            r.end()?;
            Ok(BackupData::Progress(v.max(0) as u64))
        }
        _ => Err(bad(W, "unknown kind byte")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_split_anywhere() {
        let mut all = msg(b'Z', b"I");
        all.extend(msg(b'd', b"dhello"));
        for cut in 0..all.len() {
            let mut buf = BytesMut::from(&all[..cut]);
            let mut got = Vec::new();
            while let Some(f) = take_frame(&mut buf).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&all[cut..]);
            while let Some(f) = take_frame(&mut buf).unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].tag, b'Z');
            assert_eq!(&got[1].body[..], b"dhello");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn refuses_huge_or_negative_length_before_allocating() {
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            take_frame(&mut buf),
            Err(ProtocolError::TooLong { .. })
        ));
        let mut buf = BytesMut::from(&[b'd', 0xff, 0xff, 0xff, 0xfe][..]);
        assert!(take_frame(&mut buf).is_err());
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(take_frame(&mut buf).is_err());
    }

    #[test]
    fn parses_error_fields() {
        let body = b"SERROR\0VERROR\0C42501\0Mmust be superuser\0Hgrant it\0\0";
        let n = parse_notice(body).unwrap();
        assert_eq!(n.severity, "ERROR");
        assert_eq!(n.code, "42501");
        assert_eq!(n.message, "must be superuser");
        assert_eq!(n.hint.as_deref(), Some("grant it"));
        assert!(parse_notice(b"SERROR").is_err());
        assert!(parse_notice(b"").is_err());
    }

    #[test]
    fn parses_auth_requests() {
        assert_eq!(parse_auth(&0i32.to_be_bytes()).unwrap(), Auth::Ok);
        let mut md5 = 5i32.to_be_bytes().to_vec();
        md5.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(parse_auth(&md5).unwrap(), Auth::Md5([1, 2, 3, 4]));
        let mut sasl = 10i32.to_be_bytes().to_vec();
        sasl.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(
            parse_auth(&sasl).unwrap(),
            Auth::Sasl(vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()])
        );
        assert!(parse_auth(&[0, 0, 0, 5, 1]).is_err());
        assert!(parse_auth(&[0, 0]).is_err());
    }

    #[test]
    fn parses_rows() {
        let mut t = 2i16.to_be_bytes().to_vec();
        for name in ["recptr", "tli"] {
            t.extend_from_slice(name.as_bytes());
            t.push(0);
            t.extend_from_slice(&[0; 18]);
        }
        assert_eq!(parse_row_description(&t).unwrap(), ["recptr", "tli"]);
        assert!(parse_row_description(&t[..t.len() - 1]).is_err());
        let mut d = 2i16.to_be_bytes().to_vec();
        d.extend_from_slice(&9i32.to_be_bytes());
        d.extend_from_slice(b"0/2000028");
        d.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            parse_data_row(&d).unwrap(),
            [Some("0/2000028".to_string()), None]
        );
        let mut huge = 1i16.to_be_bytes().to_vec();
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(parse_data_row(&huge).is_err());
    }

    #[test]
    fn parses_backup_payloads() {
        assert_eq!(
            parse_backup_data(Bytes::from_static(b"nbase.tar\0\0")).unwrap(),
            BackupData::NewArchive {
                name: "base.tar".into(),
                tablespace: String::new()
            }
        );
        assert_eq!(
            parse_backup_data(Bytes::from_static(b"dxyz")).unwrap(),
            BackupData::Data(Bytes::from_static(b"xyz"))
        );
        let mut p = b"p".to_vec();
        p.extend_from_slice(&1234i64.to_be_bytes());
        assert_eq!(
            parse_backup_data(Bytes::from(p)).unwrap(),
            BackupData::Progress(1234)
        );
        assert_eq!(
            parse_backup_data(Bytes::from_static(b"m")).unwrap(),
            BackupData::Manifest
        );
        for garbage in [&b""[..], b"x", b"nbase.tar", b"p123", b"m1"] {
            assert!(parse_backup_data(Bytes::copy_from_slice(garbage)).is_err());
        }
    }
}
