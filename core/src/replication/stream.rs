//! BASE_BACKUP as each PostgreSQL major speaks it, reduced to one sequence of [`BackupData`]
//! events so that everything after the network (demux, tar reader, chunk pipeline, the check
//! against the server's manifest) is the same for every major. Pure: frames in, events out.
//!
//! - PostgreSQL 15 and later ([`Protocol::Typed`]): `BASE_BACKUP ( LABEL '...', ... )`, then one
//!   COPY whose CopyData messages start with a type byte ('n' new archive, 'd' data, 'p'
//!   progress, 'm' manifest), parsed by [`message::parse_backup_data`].
//! - PostgreSQL 14 ([`Protocol::PerArchiveCopy`]): `BASE_BACKUP LABEL '...' PROGRESS FAST ...`
//!   (no parentheses, no commas), then one COPY per row of the tablespace list, in that order,
//!   each a raw tar stream without the two trailing zero blocks, then one more COPY with the
//!   backup manifest. [`BackupStream`] announces each of these COPYs as the 15+ stream would:
//!   `NewArchive` with the tablespace's location for an archive, `Manifest` for the manifest.
//!
//! Invariants:
//! - Data is passed on in the CopyData bodies it arrived in (each capped by
//!   [`message::MAX_MESSAGE`] before allocation); nothing is buffered here.
//! - A PostgreSQL 14 stream ends cleanly only after exactly one COPY per tablespace row and the
//!   manifest COPY: fewer, more, or a COPY at the wrong moment is an error naming what was
//!   expected, never a shorter backup.
//! - The tablespace list is validated (numeric oids, a location for every tablespace, one row for
//!   the data directory, at most [`MAX_TABLESPACES`] rows) before anything is streamed.

use super::message::{self, BackupData, Frame, ProtocolError};
use std::collections::VecDeque;

/// Most rows accepted in BASE_BACKUP's tablespace list.
pub const MAX_TABLESPACES: usize = 1 << 16;

/// The shape of the BASE_BACKUP exchange, chosen by the server's major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// PostgreSQL 14: old option syntax, one COPY per tablespace plus one for the manifest.
    PerArchiveCopy,
    /// PostgreSQL 15 and later: parenthesised options, one COPY with typed CopyData.
    Typed,
}

impl Protocol {
    /// The protocol of a server major (as returned by `pgversion::check_backup_server`).
    pub fn for_major(major: u32) -> Protocol {
        if major <= 14 {
            Protocol::PerArchiveCopy
        } else {
            Protocol::Typed
        }
    }

    /// The BASE_BACKUP command: a fast checkpoint, no wait for WAL archiving (tidemark waits for
    /// the repository itself), a tablespace map, and a backup manifest with SHA-256 checksums.
    /// `max_rate_kb` must already be in PostgreSQL's range (32..=1048576).
    pub fn command(self, max_rate_kb: Option<u32>) -> String {
        match self {
            Protocol::PerArchiveCopy => {
                let rate = max_rate_kb
                    .map(|r| format!(" MAX_RATE {r}"))
                    .unwrap_or_default();
                format!(
                    "BASE_BACKUP LABEL 'tidemark' PROGRESS FAST NOWAIT TABLESPACE_MAP{rate} \
                     MANIFEST 'yes' MANIFEST_CHECKSUMS 'SHA256'"
                )
            }
            Protocol::Typed => {
                let rate = max_rate_kb
                    .map(|r| format!(", MAX_RATE {r}"))
                    .unwrap_or_default();
                format!(
                    "BASE_BACKUP ( LABEL 'tidemark', PROGRESS, CHECKPOINT 'fast', WAIT false, \
                     MANIFEST 'yes', MANIFEST_CHECKSUMS 'SHA256', TABLESPACE_MAP{rate} )"
                )
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("postgresql sent an invalid BASE_BACKUP tablespace list: {0}")]
    Tablespaces(String),
    #[error("postgresql sent {what} {when} in the BASE_BACKUP data")]
    OutOfOrder { what: &'static str, when: String },
    #[error("postgresql ended the BASE_BACKUP data after {got} of its {want} archives (one per tablespace)\nhint: the server log says why; rerun the backup")]
    MissingArchives { got: usize, want: usize },
    #[error("postgresql ended the BASE_BACKUP data without the backup manifest\nhint: the server log says why; rerun the backup")]
    MissingManifest,
}

/// One row of BASE_BACKUP's tablespace list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tablespace {
    /// `None` for the data directory itself.
    pub oid: Option<u32>,
    /// Where the tablespace lives on the server; `None` for the data directory.
    pub location: Option<String>,
    /// Estimated size in kB (with PROGRESS).
    pub size_kb: Option<u64>,
}

/// Parses the tablespace list (columns spcoid, spclocation, size) in the server's row order.
pub fn parse_tablespaces(rows: &[Vec<Option<String>>]) -> Result<Vec<Tablespace>, StreamError> {
    let bad = |m: String| StreamError::Tablespaces(m);
    if rows.len() > MAX_TABLESPACES {
        return Err(bad(format!(
            "{} rows, more than {MAX_TABLESPACES}",
            rows.len()
        )));
    }
    let mut out = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let field = |k: usize| r.get(k).and_then(|v| v.as_deref());
        let oid = match field(0) {
            None => None,
            Some(s) => Some(
                s.parse::<u32>()
                    .ok()
                    .filter(|o| *o != 0 && s.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| bad(format!("row {i}: tablespace oid {s:?} is not a number")))?,
            ),
        };
        let location = field(1).map(str::to_string);
        match (oid, &location) {
            (Some(o), None) => return Err(bad(format!("row {i}: tablespace {o} has no location"))),
            (Some(o), Some(l)) if l.is_empty() => {
                return Err(bad(format!(
                    "row {i}: tablespace {o} has an empty location"
                )))
            }
            (None, Some(l)) => {
                return Err(bad(format!(
                    "row {i}: a location {l:?} without a tablespace oid"
                )))
            }
            _ => {}
        }
        if let Some(o) = oid {
            if out.iter().any(|t: &Tablespace| t.oid == oid) {
                return Err(bad(format!("tablespace {o} is listed twice")));
            }
            if out.iter().any(|t: &Tablespace| t.location == location) {
                return Err(bad(format!(
                    "two tablespaces are listed at {:?}",
                    location.as_deref().unwrap_or_default()
                )));
            }
        } else if out.iter().any(|t: &Tablespace| t.oid.is_none()) {
            return Err(bad("the data directory is listed twice".into()));
        }
        let size_kb = match field(2) {
            None => None,
            Some(s) => Some(
                s.parse::<u64>()
                    .map_err(|_| bad(format!("row {i}: size {s:?} is not a number of kB")))?,
            ),
        };
        out.push(Tablespace {
            oid,
            location,
            size_kb,
        });
    }
    Ok(out)
}

/// What the caller does after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// An event for the pipeline.
    Event(BackupData),
    /// Nothing to pass on; read the next frame.
    Next,
    /// The backup data is complete; the end-position result set follows.
    Done,
}

#[derive(Debug, PartialEq, Eq)]
enum Copy {
    Archive,
    Manifest,
}

#[derive(Debug)]
enum State {
    /// PostgreSQL 15+: inside the single COPY.
    Typed,
    /// PostgreSQL 14: inside one COPY.
    InCopy(Copy),
    /// PostgreSQL 14: a COPY ended; the next must start.
    Between,
    Done,
    /// An error was returned; the stream never ends cleanly after it.
    Failed,
}

/// Turns the CopyOut messages of BASE_BACKUP into [`BackupData`] events, for either protocol.
/// Created once the first CopyOutResponse has arrived (`ReplConn::start_base_backup`).
#[derive(Debug)]
pub struct BackupStream {
    state: State,
    /// PostgreSQL 14: the archives still to come, as (name, location or "").
    archives: VecDeque<(String, String)>,
    want_archives: usize,
    manifest_sent: bool,
    /// An event due before the next frame is read (the first archive of PostgreSQL 14).
    pending: Option<BackupData>,
}

fn archive_of(t: &Tablespace) -> (String, String) {
    match (t.oid, &t.location) {
        (Some(oid), Some(loc)) => (format!("{oid}.tar"), loc.clone()),
        _ => ("base.tar".to_string(), String::new()),
    }
}

impl BackupStream {
    /// A stream whose first CopyOutResponse has just been read. For PostgreSQL 14 the
    /// tablespace list says which archives come, in order; it must hold the data directory.
    pub fn new(protocol: Protocol, tablespaces: &[Tablespace]) -> Result<Self, StreamError> {
        let mut s = BackupStream {
            state: State::Typed,
            archives: VecDeque::new(),
            want_archives: 0,
            manifest_sent: false,
            pending: None,
        };
        if protocol == Protocol::Typed {
            return Ok(s);
        }
        if !tablespaces.iter().any(|t| t.oid.is_none()) {
            return Err(StreamError::Tablespaces(
                "no row for the data directory".into(),
            ));
        }
        s.archives = tablespaces.iter().map(archive_of).collect();
        s.want_archives = s.archives.len();
        s.state = State::Between;
        s.pending = Some(s.open_copy()?);
        Ok(s)
    }

    /// The event due without reading a frame, if any.
    pub fn take_pending(&mut self) -> Option<BackupData> {
        self.pending.take()
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn got_archives(&self) -> usize {
        self.want_archives - self.archives.len()
    }

    fn position(&self) -> String {
        match &self.state {
            State::Typed => "inside the COPY".into(),
            State::InCopy(Copy::Archive) => {
                format!(
                    "inside archive {} of {}",
                    self.got_archives(),
                    self.want_archives
                )
            }
            State::InCopy(Copy::Manifest) => "inside the manifest COPY".into(),
            State::Between => format!(
                "after {} of {} COPY streams",
                self.got_archives() + usize::from(self.manifest_sent),
                self.want_archives + 1
            ),
            State::Done => "after the end".into(),
            State::Failed => "after an earlier error".into(),
        }
    }

    /// A CopyOutResponse arrived between COPYs (PostgreSQL 14): the next archive or the manifest.
    fn open_copy(&mut self) -> Result<BackupData, StreamError> {
        if let Some((name, tablespace)) = self.archives.pop_front() {
            self.state = State::InCopy(Copy::Archive);
            return Ok(BackupData::NewArchive { name, tablespace });
        }
        if !self.manifest_sent {
            self.manifest_sent = true;
            self.state = State::InCopy(Copy::Manifest);
            return Ok(BackupData::Manifest);
        }
        Err(StreamError::OutOfOrder {
            what: "a CopyOutResponse",
            when: format!("after all {} archives and the manifest", self.want_archives),
        })
    }

    /// The next frame of the exchange (ErrorResponse is the caller's; NoticeResponse and
    /// ParameterStatus never reach here). After an error every further frame is one too.
    pub fn on_frame(&mut self, f: Frame) -> Result<Step, StreamError> {
        let r = self.step(f);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    fn step(&mut self, f: Frame) -> Result<Step, StreamError> {
        let out_of_order = |s: &Self, what| StreamError::OutOfOrder {
            what,
            when: s.position(),
        };
        match (&self.state, f.tag) {
            (State::Typed, b'd') => Ok(Step::Event(message::parse_backup_data(f.body)?)),
            (State::InCopy(_), b'd') => Ok(Step::Event(BackupData::Data(f.body))),
            (State::Typed, b'c') | (State::InCopy(Copy::Manifest), b'c') => {
                self.state = State::Done;
                Ok(Step::Done)
            }
            (State::InCopy(Copy::Archive), b'c') => {
                self.state = State::Between;
                Ok(Step::Next)
            }
            (State::Between, b'H') => Ok(Step::Event(self.open_copy()?)),
            (State::Between, b'T' | b'D' | b'C' | b'Z') => {
                if !self.archives.is_empty() {
                    Err(StreamError::MissingArchives {
                        got: self.got_archives(),
                        want: self.want_archives,
                    })
                } else {
                    Err(StreamError::MissingManifest)
                }
            }
            (_, b'd') => Err(out_of_order(self, "CopyData")),
            (_, b'c') => Err(out_of_order(self, "CopyDone")),
            (_, b'H') => Err(out_of_order(self, "a CopyOutResponse")),
            (_, tag) => Err(ProtocolError::Unexpected {
                tag: tag as char,
                during: "in the BASE_BACKUP data",
            }
            .into()),
        }
    }
}

#[cfg(test)]
mod tests;
