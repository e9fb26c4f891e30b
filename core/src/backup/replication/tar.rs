//! A streaming (push) reader of the ustar archives BASE_BACKUP sends: bytes are fed in pieces
//! of any size as they arrive from the network and come out as entry headers and file data,
//! without staging anything on disk and holding at most one 512-byte header in memory.
//!
//! Invariants:
//! - Every header's checksum is verified; a bad checksum, a size that is not a number, or an
//!   entry type other than file, directory or symlink is an error naming the entry.
//! - File data is passed through in the pieces it arrived in; padding is consumed, never passed.
//! - `finish` fails unless the archive ended on an entry boundary.

/// Size of a tar block.
const BLOCK: usize = 512;
/// Largest file accepted in an archive (PostgreSQL segments are at most 1 GiB; the base-256
/// size encoding allows more, which is refused rather than trusted).
pub const MAX_ENTRY: u64 = 1 << 40;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarError {
    #[error("tar header of {name:?} has a bad checksum")]
    Checksum { name: String },
    #[error("tar header of {name:?} is invalid: {why}")]
    Header { name: String, why: &'static str },
    #[error("tar entry {name:?} has unsupported type {kind:?}")]
    Type { name: String, kind: char },
    #[error("tar archive ended in the middle of {what}")]
    Truncated { what: String },
    #[error("tar archive has data after its end marker")]
    AfterEnd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TarKind {
    Dir,
    File { size: u64 },
    Symlink(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// The path, without a leading `./` and without a trailing `/`.
    pub path: String,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub kind: TarKind,
}

pub enum TarEvent<'a> {
    Entry(TarEntry),
    Data(&'a [u8]),
    /// The current file's data is complete.
    EntryEnd,
}

enum State {
    Header,
    Data {
        left: u64,
        pad: usize,
    },
    Pad {
        left: usize,
    },
    /// A zero block was seen: the archive is over; only zero bytes may follow.
    End,
}

pub struct TarReader {
    state: State,
    hdr: Vec<u8>,
}

impl Default for TarReader {
    fn default() -> Self {
        Self::new()
    }
}

impl TarReader {
    pub fn new() -> Self {
        TarReader {
            state: State::Header,
            hdr: Vec::with_capacity(BLOCK),
        }
    }

    /// Feeds the next bytes of the archive; `on` receives the events they complete.
    pub fn feed<E: From<TarError>>(
        &mut self,
        mut data: &[u8],
        on: &mut impl FnMut(TarEvent<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            match &mut self.state {
                State::Header => {
                    let take = (BLOCK - self.hdr.len()).min(data.len());
                    self.hdr.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.hdr.len() < BLOCK {
                        continue;
                    }
                    let parsed = parse_header(&self.hdr)?;
                    self.hdr.clear();
                    match parsed {
                        None => self.state = State::End,
                        Some(e) => {
                            let size = match e.kind {
                                TarKind::File { size } => size,
                                _ => 0,
                            };
                            on(TarEvent::Entry(e.clone()))?;
                            if matches!(e.kind, TarKind::File { .. }) {
                                let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
                                if size == 0 {
                                    on(TarEvent::EntryEnd)?;
                                } else {
                                    self.state = State::Data { left: size, pad };
                                }
                            }
                        }
                    }
                }
                State::Data { left, pad } => {
                    let take = (*left).min(data.len() as u64) as usize;
                    let pad = *pad;
                    *left -= take as u64;
                    let done = *left == 0;
                    on(TarEvent::Data(&data[..take]))?;
                    data = &data[take..];
                    if done {
                        on(TarEvent::EntryEnd)?;
                        self.state = if pad > 0 {
                            State::Pad { left: pad }
                        } else {
                            State::Header
                        };
                    }
                }
                State::Pad { left } => {
                    let take = (*left).min(data.len());
                    *left -= take;
                    data = &data[take..];
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
                State::End => {
                    if data.iter().any(|&b| b != 0) {
                        return Err(TarError::AfterEnd.into());
                    }
                    data = &[];
                }
            }
        }
        Ok(())
    }

    /// The archive's bytes are all fed: fails if it stopped inside a header or a file.
    pub fn finish(&self) -> Result<(), TarError> {
        match &self.state {
            State::Header if self.hdr.is_empty() => Ok(()),
            State::End | State::Pad { .. } => Ok(()),
            State::Header => Err(TarError::Truncated {
                what: "a header".into(),
            }),
            State::Data { left, .. } => Err(TarError::Truncated {
                what: format!("a file ({left} bytes missing)"),
            }),
        }
    }
}

fn field_str(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

fn octal(b: &[u8], name: &str, what: &'static str) -> Result<u64, TarError> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        // Base-256 (GNU) encoding of large numbers.
        let mut v: u64 = (b[0] & 0x7f) as u64;
        for &c in &b[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(c as u64))
                .ok_or(TarError::Header {
                    name: name.into(),
                    why: what,
                })?;
        }
        return Ok(v);
    }
    let s = field_str(b);
    let s = std::str::from_utf8(s).map_err(|_| TarError::Header {
        name: name.into(),
        why: what,
    })?;
    let s = s.trim_matches(|c| c == ' ');
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| TarError::Header {
        name: name.into(),
        why: what,
    })
}

/// Parses one header block; `None` for a zero block (end of archive).
fn parse_header(h: &[u8]) -> Result<Option<TarEntry>, TarError> {
    if h.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let raw_name = field_str(&h[0..100]);
    let prefix = if &h[257..262] == b"ustar" {
        field_str(&h[345..500])
    } else {
        &[]
    };
    let mut name = String::new();
    if !prefix.is_empty() {
        name.push_str(&String::from_utf8_lossy(prefix));
        name.push('/');
    }
    name.push_str(&String::from_utf8_lossy(raw_name));
    let want = octal(&h[148..156], &name, "checksum is not a number")?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    if sum != want {
        return Err(TarError::Checksum { name });
    }
    let mode = octal(&h[100..108], &name, "mode is not a number")? as u32 & 0o7777;
    let size = octal(&h[124..136], &name, "size is not a number")?;
    let mut path = name.as_str();
    while let Some(p) = path.strip_prefix("./") {
        path = p;
    }
    let path = path.trim_end_matches('/').to_string();
    if path.is_empty() || path == "." {
        return Err(TarError::Header {
            name,
            why: "empty path",
        });
    }
    let kind = match h[156] {
        b'0' | 0 => {
            if size > MAX_ENTRY {
                return Err(TarError::Header {
                    name,
                    why: "file larger than 1 TiB",
                });
            }
            TarKind::File { size }
        }
        b'5' => TarKind::Dir,
        b'2' => TarKind::Symlink(String::from_utf8_lossy(field_str(&h[157..257])).into_owned()),
        k => {
            return Err(TarError::Type {
                name,
                kind: k as char,
            })
        }
    };
    Ok(Some(TarEntry { path, mode, kind }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a ustar header (as PostgreSQL's tarCreateHeader does).
    pub(crate) fn header(name: &str, mode: u32, kind: u8, size: u64, link: &str) -> Vec<u8> {
        let mut h = vec![0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(format!("{mode:07o}").as_bytes());
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    pub(crate) fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut a = header("global", 0o700, b'5', 0, "");
        for (name, data) in files {
            a.extend(header(name, 0o600, b'0', data.len() as u64, ""));
            a.extend_from_slice(data);
            a.resize(a.len().div_ceil(BLOCK) * BLOCK, 0);
        }
        a.extend(header("pg_tblspc/16384", 0o777, b'2', 0, "/srv/ts"));
        a.extend(vec![0u8; 2 * BLOCK]);
        a
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Ev {
        E(TarEntry),
        D(Vec<u8>),
        End,
    }

    fn collect(pieces: &[&[u8]]) -> Result<Vec<Ev>, TarError> {
        let mut r = TarReader::new();
        let mut out: Vec<Ev> = Vec::new();
        for p in pieces {
            r.feed(p, &mut |e: TarEvent<'_>| -> Result<(), TarError> {
                match e {
                    TarEvent::Entry(e) => out.push(Ev::E(e)),
                    TarEvent::Data(d) => match out.last_mut() {
                        Some(Ev::D(v)) => v.extend_from_slice(d),
                        _ => out.push(Ev::D(d.to_vec())),
                    },
                    TarEvent::EntryEnd => out.push(Ev::End),
                }
                Ok(())
            })?;
        }
        r.finish()?;
        Ok(out)
    }

    #[test]
    fn reads_entries_whatever_the_piece_size() {
        let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let a = archive(&[
            ("./PG_VERSION", b"15\n"),
            ("base/1/1259", &big),
            ("empty", b""),
        ]);
        let want = collect(&[&a]).unwrap();
        assert_eq!(want.len(), 10, "{want:?}");
        assert_eq!(
            want[1],
            Ev::E(TarEntry {
                path: "PG_VERSION".into(),
                mode: 0o600,
                kind: TarKind::File { size: 3 }
            })
        );
        assert_eq!(want[5], Ev::D(big.clone()));
        assert_eq!(
            want[9],
            Ev::E(TarEntry {
                path: "pg_tblspc/16384".into(),
                mode: 0o777,
                kind: TarKind::Symlink("/srv/ts".into())
            })
        );
        for step in [1, 7, 511, 512, 513, 4096] {
            let pieces: Vec<&[u8]> = a.chunks(step).collect();
            assert_eq!(collect(&pieces).unwrap(), want, "piece size {step}");
        }
    }

    #[test]
    fn refuses_truncation_bad_checksums_and_types() {
        let a = archive(&[("base/1/1259", &[7u8; 1000])]);
        // Layout: dir header 0..512, file header 512..1024, data 1024..2024 + padding,
        // symlink header 2048..2560, end marker.
        for cut in [100, 700, 1536, 2048 + 100] {
            assert!(collect(&[&a[..cut]]).is_err(), "cut at {cut}");
        }
        // An archive may end on an entry boundary without the end marker (the server's
        // manifest, not the tar stream, proves that every file arrived).
        assert!(collect(&[&a[..512]]).is_ok());
        let mut bad = a.clone();
        bad[600] ^= 1; // inside the second header's name
        assert!(matches!(collect(&[&bad]), Err(TarError::Checksum { .. })));
        let hl = header("x", 0o600, b'1', 0, "y");
        assert!(matches!(collect(&[&hl]), Err(TarError::Type { .. })));
        let mut after = archive(&[]);
        after.push(1);
        assert_eq!(collect(&[&after]), Err(TarError::AfterEnd));
    }
}
