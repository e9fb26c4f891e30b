//! Fast promotion at the end of a restore's recovery: at its target, or at the end of the
//! archive for `--target latest`.
//!
//! Archive recovery (`recovery.signal`) ends with a checkpoint PostgreSQL waits for before it
//! accepts writes: every buffer the replay dirtied is written and synced first (lab, realistic
//! nightly with 1,200 MiB of WAL and 1 GiB of shared_buffers: 0.70 s of the 3.7 s from start
//! to promotion; minutes with a large shared_buffers). A standby that is promoted writes an
//! end-of-recovery record instead and leaves that checkpoint to the checkpointer. So a restore
//! that is to promote (not `--standby`, not a target whose action is pause or shutdown) starts
//! the server in standby mode (`standby.signal`) with [`MARKER`] beside it, a target's action
//! written as `pause` (with `hot_standby = on`), and `wal-fetch` ([`request`]) requests its
//! promotion the way `pg_ctl promote` does (a `promote` file, SIGUSR1 to the postmaster) on the
//! first request of the startup process.
//!
//! Invariants:
//! - PostgreSQL acts on a promotion request only where archive recovery would end: where it
//!   pauses at the target (the same stop: `recoveryStopsBefore`/`After`), or once the archive
//!   and `pg_wal` have no more WAL, on every timeline it follows. A recovery that runs out of
//!   WAL before its target still ends FATAL ("recovery ended before configured recovery target
//!   was reached"), and one that runs out before the backup's consistency point FATAL too:
//!   nothing is promoted early. Where hot standby is not active at the target, PostgreSQL does
//!   not pause and promotes with the checkpoint, as archive recovery.
//! - Only with the marker, `standby.signal` and a `postmaster.pid` in the data directory, and
//!   never for a server given `primary_conninfo` (the marker is then removed).
//! - Once per postmaster: the marker records the postmaster asked (process id and start time,
//!   from `postmaster.pid`). The postmaster deletes `promote` when it starts, so a server
//!   stopped, restarted or crashed before it promoted is asked again by the first request of its
//!   next start. When the startup process of the postmaster asked, its `promote` file consumed,
//!   asks for a timeline history file (PostgreSQL looks for its next timeline as it promotes),
//!   [`after_history_request`] removes the marker: a server later made a standby of anything
//!   never finds it. Backups never record the marker and a restore refuses one that does.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Written beside `standby.signal` by a restore to the end of the archive; removed once the
/// server it asked to promote promotes ([`after_history_request`]).
pub const MARKER: &str = ".tidemark-promote-at-end";

/// The marker's text, for whoever finds it.
pub(super) const MARKER_TEXT: &[u8] =
    b"Written by tidemark-restore: this server recovers in standby mode, and tidemark-restore\n\
wal-fetch asks it to promote, which it does at its recovery target or when the archive has no\n\
next WAL segment. Removed once it is promoted.\n";

/// The line of the marker naming the postmaster asked to promote.
const REQUESTED: &str = "requested of postmaster ";

/// Largest `postmaster.pid` or marker read (a few lines each).
const MAX_SMALL_FILE: u64 = 64 << 10;

/// The data directory of the server whose restore_command writes to `dest`: the parent of the
/// destination's `pg_wal/`, else the working directory (PostgreSQL runs restore_command there).
pub fn data_dir_of(dest: &Path) -> &Path {
    dest.parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "pg_wal"))
        .and_then(|p| p.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Whether data directory `data` holds a restore's request to promote at the end of the
/// archive (it is then not a standby, whatever its `standby.signal` says).
pub fn wanted(data: &Path) -> bool {
    data.join(MARKER).is_file()
}

/// Called on every request of the startup process of the server of `data`, before the file is
/// fetched: requests its promotion if its restore asked for it and this postmaster has not been
/// asked yet (see the module). Returns whether it did.
pub fn request(data: &Path) -> Result<bool> {
    let marker = data.join(MARKER);
    let (Ok(m), Ok(signal)) = (
        std::fs::metadata(&marker),
        std::fs::metadata(data.join("standby.signal")),
    ) else {
        return Ok(false);
    };
    if !m.is_file() || !signal.is_file() {
        return Ok(false);
    }
    // Made a standby by hand after the restore: never promoted by wal-fetch. The restore
    // writes standby.signal before the marker, and a request rewrites the marker; nothing
    // rewrites standby.signal during recovery, so one newer than the marker was written later
    // (a marker left behind by a server that promoted with the checkpoint, where PostgreSQL
    // did not pause at its target).
    let made_a_standby = match streams_from_a_primary(data)? {
        Some(conf) => Some(format!("{conf} sets primary_conninfo")),
        None => match (signal.modified(), m.modified()) {
            (Ok(s), Ok(m)) if s > m => {
                Some("standby.signal was written after the restore's recovery".to_string())
            }
            _ => None,
        },
    };
    if let Some(why) = made_a_standby {
        std::fs::remove_file(&marker)
            .with_context(|| format!("cannot remove {}", marker.display()))?;
        tracing::warn!(data = %data.display(), "{why}: this server was made a standby after its restore, so wal-fetch does not promote it (and {MARKER} is removed)");
        return Ok(false);
    }
    let asked = Postmaster::of(data)?;
    let promote = data.join("promote");
    let recorded = requested_of(&read_capped(&marker)?) == Some(asked.record().trim_end());
    if recorded && !promote.exists() {
        // Consumed by the startup process: the server is promoting.
        return Ok(false);
    }
    // As pg_ctl promote: the request file, then SIGUSR1 to the postmaster, which passes it on
    // to the startup process. A request already made of this postmaster is signalled again:
    // a startup process started anew after a crash of another process (the postmaster stays,
    // `promote` stays) does not know of it.
    if !recorded {
        std::fs::write(&promote, b"")
            .with_context(|| format!("cannot write {}", promote.display()))?;
    }
    if let Err(e) = rustix::process::kill_process(asked.pid, rustix::process::Signal::USR1) {
        if !recorded {
            // As pg_ctl: no request left behind that a later signal could act on.
            let _ = std::fs::remove_file(&promote);
        }
        return Err(std::io::Error::from(e)).with_context(|| {
            format!(
                "cannot signal the postmaster (process {})",
                asked.pid.as_raw_pid()
            )
        });
    }
    if recorded {
        return Ok(false);
    }
    // Requested: the marker names the postmaster asked, so that its promotion removes it. A
    // marker that cannot say so is removed now (the request stands; a restart before the
    // promotion then leaves the server in standby mode), or reported if even that fails.
    let record = [MARKER_TEXT, asked.record().as_bytes()].concat();
    if let Err(e) = std::fs::write(&marker, record) {
        tracing::warn!(marker = %marker.display(), error = %e, "promotion requested, but the marker could not record it: removing the marker");
        if let Err(e) = std::fs::remove_file(&marker) {
            tracing::warn!(marker = %marker.display(), error = %e, "the marker could not be removed either\nhint: remove it by hand once the server is promoted, before this data directory is ever made a standby");
        }
    }
    Ok(true)
}

/// Called when the startup process of the server of `data` asks for a timeline history file,
/// found or not: if the marker records a request of this same postmaster and its `promote` file
/// is gone (the startup process consumed it), the server is promoting (PostgreSQL looks for its
/// next timeline then), and the marker is removed. Returns whether it was.
pub fn after_history_request(data: &Path) -> Result<bool> {
    let marker = data.join(MARKER);
    if !marker.is_file() {
        return Ok(false);
    }
    let text = read_capped(&marker)?;
    let Some(asked) = requested_of(&text) else {
        return Ok(false);
    };
    if data.join("promote").exists() || Postmaster::of(data)?.record().trim_end() != asked {
        return Ok(false);
    }
    std::fs::remove_file(&marker).with_context(|| format!("cannot remove {}", marker.display()))?;
    Ok(true)
}

/// The marker's line naming the postmaster asked to promote, if any.
fn requested_of(marker: &str) -> Option<&str> {
    marker.lines().find(|l| l.starts_with(REQUESTED))
}

/// The running postmaster of a data directory, as its `postmaster.pid` names it.
struct Postmaster {
    pid: rustix::process::Pid,
    /// The start time (line 3, seconds since the epoch): a restarted server in a container
    /// often gets the same process id.
    start: String,
}

impl Postmaster {
    fn of(data: &Path) -> Result<Postmaster> {
        let pid_file = data.join("postmaster.pid");
        let text = read_capped(&pid_file)?;
        let mut lines = text.lines();
        let pid = lines
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
            .with_context(|| format!("{} does not start with a process id", pid_file.display()))?;
        let start = lines.nth(1).unwrap_or("").trim().to_string();
        Ok(Postmaster { pid, start })
    }

    /// The marker's line naming this postmaster.
    fn record(&self) -> String {
        format!(
            "{REQUESTED}{} started {}\n",
            self.pid.as_raw_pid(),
            self.start
        )
    }
}

/// Largest configuration file read for `primary_conninfo`.
const MAX_CONF: u64 = 16 << 20;

/// The configuration file of `data` that gives `primary_conninfo` a non-empty value, if any
/// (`postgresql.auto.conf` read after `postgresql.conf`, the last assignment winning as in
/// PostgreSQL; included files and command-line settings are not seen).
fn streams_from_a_primary(data: &Path) -> Result<Option<&'static str>> {
    let mut set = None;
    for name in ["postgresql.conf", "postgresql.auto.conf"] {
        let path = data.join(name);
        let text = match std::fs::metadata(&path) {
            Ok(m) if m.len() > MAX_CONF => {
                bail!("{} is larger than {MAX_CONF} bytes", path.display())
            }
            Ok(_) => {
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        if let Some(v) = last_setting(&String::from_utf8_lossy(&text), "primary_conninfo") {
            set = (!v.is_empty()).then_some(name);
        }
    }
    Ok(set)
}

/// The value of the last assignment of `name` in configuration text (`name = value` or
/// `name value`, a value quoted with `'` (`''` or `\'` inside) or a bare word, `#` comments).
fn last_setting(text: &str, name: &str) -> Option<String> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim_start();
        let key_end = line
            .find(|c: char| c.is_whitespace() || c == '=')
            .unwrap_or(line.len());
        if !line[..key_end].eq_ignore_ascii_case(name) {
            continue;
        }
        let rest = line[key_end..].trim_start();
        let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
        found = Some(match rest.strip_prefix('\'') {
            Some(quoted) => {
                let mut v = String::new();
                let mut chars = quoted.chars().peekable();
                while let Some(c) = chars.next() {
                    match c {
                        '\'' if chars.peek() == Some(&'\'') => {
                            chars.next();
                            v.push('\'');
                        }
                        '\'' => break,
                        '\\' => v.extend(chars.next()),
                        c => v.push(c),
                    }
                }
                v
            }
            None => rest
                .split(|c: char| c.is_whitespace() || c == '#')
                .next()
                .unwrap_or("")
                .to_string(),
        });
    }
    found
}

fn read_capped(path: &Path) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_SMALL_FILE)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if text.len() as u64 >= MAX_SMALL_FILE {
        bail!("{} is larger than {MAX_SMALL_FILE} bytes", path.display());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_data_directory_is_the_parent_of_pg_wal_else_the_working_directory() {
        assert_eq!(
            data_dir_of(Path::new("/d/pg_wal/RECOVERYXLOG")),
            Path::new("/d")
        );
        assert_eq!(
            data_dir_of(Path::new("pg_wal/RECOVERYXLOG")),
            Path::new(".")
        );
        assert_eq!(
            data_dir_of(Path::new("/x/y/000000010000000000000001")),
            Path::new(".")
        );
    }

    #[test]
    fn nothing_is_requested_without_the_marker_and_standby_signal() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("postmaster.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert!(!request(d.path()).unwrap());
        std::fs::write(d.path().join(MARKER), MARKER_TEXT).unwrap();
        assert!(!request(d.path()).unwrap(), "no standby.signal");
        assert!(!d.path().join("promote").exists());
    }

    /// A child that stands for the postmaster (SIGUSR1's default action ends it), named by
    /// `d`'s postmaster.pid with start time `start`.
    fn stand_in_postmaster(d: &Path, start: &str) -> std::process::Child {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(
            d.join("postmaster.pid"),
            format!("{}\n/d\n{start}\n5432\n", child.id()),
        )
        .unwrap();
        child
    }

    fn signalled(mut child: std::process::Child) -> bool {
        let status = child.wait().unwrap();
        std::os::unix::process::ExitStatusExt::signal(&status)
            == Some(rustix::process::Signal::USR1.as_raw())
    }

    #[test]
    fn a_request_signals_the_postmaster_and_its_promotion_removes_the_marker() {
        let d = tempfile::tempdir().unwrap();
        let child = stand_in_postmaster(d.path(), "1700000000");
        std::fs::write(d.path().join("standby.signal"), b"").unwrap();
        std::fs::write(d.path().join(MARKER), MARKER_TEXT).unwrap();
        // Before any request, a history file asked for (the server starting) changes nothing.
        assert!(!after_history_request(d.path()).unwrap());
        assert!(request(d.path()).unwrap());
        assert!(d.path().join("promote").is_file());
        assert!(signalled(child));
        assert!(wanted(d.path()), "the marker stays until the promotion");
        // Once per postmaster: its next requests only signal again (here the stand-in is gone).
        assert!(request(d.path()).is_err());
        assert!(d.path().join("promote").is_file(), "the request stays");
        // The startup process has not consumed the request yet (it rescans timelines in the
        // meantime): the marker stays.
        assert!(!after_history_request(d.path()).unwrap());
        assert!(wanted(d.path()));
        // Consumed, then the next timeline's history asked for: promoted, the marker removed.
        std::fs::remove_file(d.path().join("promote")).unwrap();
        assert!(after_history_request(d.path()).unwrap());
        assert!(!wanted(d.path()));
        assert!(!after_history_request(d.path()).unwrap());
    }

    #[test]
    fn a_server_restarted_before_its_promotion_is_asked_again() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("standby.signal"), b"").unwrap();
        std::fs::write(d.path().join(MARKER), MARKER_TEXT).unwrap();
        let first = stand_in_postmaster(d.path(), "1700000000");
        let first_id = first.id();
        assert!(request(d.path()).unwrap());
        assert!(signalled(first));
        // Restarted: the new postmaster deleted promote; its startup process asks for history
        // files as it starts. Another process, or the same id started later (a container's
        // restart), is not the postmaster that was asked.
        std::fs::remove_file(d.path().join("promote")).unwrap();
        let second = stand_in_postmaster(d.path(), "1700000100");
        assert!(!after_history_request(d.path()).unwrap());
        assert!(wanted(d.path()));
        let pid_file = d.path().join("postmaster.pid");
        let second_pid_file = std::fs::read(&pid_file).unwrap();
        std::fs::write(&pid_file, format!("{first_id}\n/d\n1700000100\n")).unwrap();
        assert!(!after_history_request(d.path()).unwrap());
        assert!(wanted(d.path()));
        std::fs::write(&pid_file, second_pid_file).unwrap();
        // The new postmaster's first request asks again, and its promotion removes the marker.
        assert!(request(d.path()).unwrap());
        assert!(signalled(second));
        std::fs::remove_file(d.path().join("promote")).unwrap();
        assert!(after_history_request(d.path()).unwrap());
        assert!(!wanted(d.path()));
        assert!(!request(d.path()).unwrap(), "no marker, no request");
    }

    #[test]
    fn a_pending_request_is_signalled_again_for_a_restarted_startup_process() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("standby.signal"), b"").unwrap();
        std::fs::write(d.path().join(MARKER), MARKER_TEXT).unwrap();
        // A stand-in postmaster that counts its SIGUSR1s in a file.
        let count = d.path().join("usr1");
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("trap 'echo >> \"$0\"' USR1; : > \"$0.ready\"; while sleep 0.02; do :; done")
            .arg(&count)
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while !d.path().join("usr1.ready").exists() {
            assert!(
                started.elapsed().as_secs() < 10,
                "the stand-in did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::write(
            d.path().join("postmaster.pid"),
            format!("{}\n/d\n1700000000\n", child.id()),
        )
        .unwrap();
        let signals = |n: usize| {
            let started = std::time::Instant::now();
            while std::fs::read_to_string(&count)
                .unwrap_or_default()
                .lines()
                .count()
                < n
            {
                assert!(started.elapsed().as_secs() < 10, "no signal {n}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };
        assert!(request(d.path()).unwrap());
        signals(1);
        // The same postmaster: not a new request, but signalled again while `promote` stays.
        assert!(!request(d.path()).unwrap());
        signals(2);
        // Consumed: nothing more.
        std::fs::remove_file(d.path().join("promote")).unwrap();
        assert!(!request(d.path()).unwrap());
        assert!(!d.path().join("promote").exists());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_standby_signal_newer_than_the_marker_is_a_standby_made_later() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(MARKER), MARKER_TEXT).unwrap();
        let signal = d.path().join("standby.signal");
        std::fs::write(&signal, b"").unwrap();
        let marker_time = std::fs::metadata(d.path().join(MARKER))
            .unwrap()
            .modified()
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(&signal)
            .unwrap()
            .set_modified(marker_time + std::time::Duration::from_secs(60))
            .unwrap();
        assert!(!request(d.path()).unwrap());
        assert!(!wanted(d.path()), "the marker is removed");
        assert!(!d.path().join("promote").exists());
    }

    #[test]
    fn a_server_made_a_standby_by_hand_is_not_promoted() {
        assert_eq!(
            last_setting("a = 1\nprimary_conninfo = ''\n", "primary_conninfo"),
            Some(String::new())
        );
        assert_eq!(
            last_setting(
                "primary_conninfo='host=x'\n#primary_conninfo = ''\n",
                "primary_conninfo"
            ),
            Some("host=x".into())
        );
        assert_eq!(
            last_setting(
                "PRIMARY_CONNINFO 'a=''b''' # c\nprimary_slot_name = 's'",
                "primary_conninfo"
            ),
            Some("a='b'".into())
        );
        assert_eq!(
            last_setting("primary_conninfo_x = 'y'", "primary_conninfo"),
            None
        );
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(d.path().join("postmaster.pid"), format!("{}\n", child.id())).unwrap();
        std::fs::write(d.path().join("standby.signal"), b"").unwrap();
        std::fs::write(d.path().join(MARKER), MARKER_TEXT).unwrap();
        std::fs::write(
            d.path().join("postgresql.conf"),
            b"primary_conninfo = 'host=primary'\n",
        )
        .unwrap();
        // The restore's own postgresql.auto.conf clears it; a line appended later sets it again.
        std::fs::write(
            d.path().join("postgresql.auto.conf"),
            b"primary_conninfo = ''\nprimary_conninfo = 'host=p2 user=r'\n",
        )
        .unwrap();
        assert!(!request(d.path()).unwrap());
        assert!(!d.path().join("promote").exists());
        assert!(
            !wanted(d.path()),
            "the marker is removed: never promoted later"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_pid_file_without_a_process_id_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("standby.signal"), b"").unwrap();
        std::fs::write(d.path().join(MARKER), MARKER_TEXT).unwrap();
        std::fs::write(d.path().join("postmaster.pid"), b"x\n").unwrap();
        let e = format!("{:#}", request(d.path()).unwrap_err());
        assert!(e.contains("postmaster.pid"), "{e}");
        assert!(wanted(d.path()), "the marker stays for the next request");
    }
}
