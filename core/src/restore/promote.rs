//! Fast promotion at the end of a restore's recovery: at its target, or at the end of the
//! archive for `--target latest`.
//!
//! Archive recovery ends with a checkpoint PostgreSQL waits for before it accepts writes: every
//! buffer the replay dirtied is written and synced first (lab, realistic nightly with 1,200 MiB
//! of WAL and 1 GiB of shared_buffers: 0.70 s of the 3.7 s from start to promotion; minutes
//! with a large shared_buffers). A server whose promotion was requested (`pg_ctl promote`)
//! writes an end-of-recovery record instead and leaves that checkpoint to the checkpointer. So a
//! restore that is to promote (not `--standby`, not a target whose action is pause or shutdown)
//! writes [`MARKER`] and, in its signal file, the same random token, and `wal-fetch`
//! ([`request`]) requests the promotion as `pg_ctl promote` does (a `promote` file, SIGUSR1 to
//! the postmaster) from the first request of the startup process on. PostgreSQL acts on it:
//! - for a target (`recovery.signal`, the action written as `pause`, `hot_standby = on`): where it
//!   pauses at the target, the same stop archive recovery makes. Archive recovery looks at the
//!   request only in pauses (and `recovery_min_apply_delay`'s wait): WAL that runs out before the
//!   target ends recovery FATAL as always ("recovery ended before configured recovery target was
//!   reached"). Where hot standby is not active at the target, PostgreSQL does not pause and
//!   promotes with the checkpoint, as without the request.
//! - for the end of the archive (`standby.signal`, `primary_conninfo` and `primary_slot_name`
//!   cleared): where the archive and `pg_wal` have no more WAL on any timeline it follows, where
//!   archive recovery would end. A request before the backup's consistency point ends FATAL as
//!   archive recovery does there, nothing promoted.
//!
//! Invariants:
//! - A request only while the signal file holds the marker's token. PostgreSQL deletes the signal
//!   file as it promotes, with or without the checkpoint, and a signal file written by anyone
//!   else (`pg_basebackup -R`, `touch`, an operator) has no token: a marker left behind in a data
//!   directory is inert, and backups never record it (a restore refuses a manifest that does).
//! - A standby made by hand from the restored server (`primary_conninfo` set under the restore's
//!   `standby.signal`: in the configuration file, a file it includes, `postgresql.auto.conf` or
//!   the postmaster's command line, read as PostgreSQL reads them, see [`server_conf`]) is never
//!   promoted: its pending request is withdrawn and the marker removed. Where the files cannot be
//!   read, a pending request is withdrawn too and the next request decides again.
//! - Once per postmaster: the marker records the postmaster asked (process id and start time,
//!   from `postmaster.pid`). The postmaster deletes `promote` when it starts, so a server stopped,
//!   restarted or crashed before it promoted is asked again by the first request of its next
//!   start; a startup process restarted by the same postmaster is signalled again while the
//!   request is pending; a request consumed is not made again.
//! - Never a signal to a process id below 2 (`kill(-1)` would reach every process of the user).

use super::server_conf;
use anyhow::{Context, Result};
use std::path::Path;

/// Written beside the signal file by a restore that promotes fast; holds [`TOKEN`] as the
/// signal file does. Inert once PostgreSQL removed the signal file.
pub const MARKER: &str = ".tidemark-promote-at-end";

/// The marker's text before its token, for whoever finds it.
const MARKER_TEXT: &str = "Written by tidemark-restore: while the signal file beside it holds the token below, tidemark-restore\n\
wal-fetch asks this server to promote, which PostgreSQL does at its recovery target or where the\n\
archive has no next WAL segment, without the end-of-recovery checkpoint. Inert afterwards.\n";

/// The line of the marker and of the signal file naming the restore's token.
const TOKEN: &str = "tidemark-restore promotion token ";

/// The line of the marker naming the postmaster asked to promote.
const REQUESTED: &str = "requested of postmaster ";

/// Largest `postmaster.pid`, marker or signal file read (a few lines each).
const MAX_SMALL_FILE: u64 = 64 << 10;

/// A new restore's token line: 128 random bits.
pub(super) fn new_token() -> Result<String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system's random number generator failed"))?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("{TOKEN}{hex}\n"))
}

/// The marker's content for a restore whose signal file holds `token` (a [`new_token`] line).
pub(super) fn marker_text(token: &str) -> String {
    format!("{MARKER_TEXT}{token}")
}

/// The data directory of the server whose restore_command writes to `dest`: the parent of the
/// destination's `pg_wal/`, else the working directory (PostgreSQL runs restore_command there).
pub fn data_dir_of(dest: &Path) -> &Path {
    dest.parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "pg_wal"))
        .and_then(|p| p.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A restore's request to promote that is live in data directory `data`: the marker's text and
/// whether the signal file holding its token is `standby.signal` (PostgreSQL's choice when both
/// exist).
fn live(data: &Path) -> Result<Option<(String, bool)>> {
    let marker = data.join(MARKER);
    if !marker.is_file() {
        return Ok(None);
    }
    let text = read_capped(&marker)?;
    let Some(token) = text.lines().find(|l| l.starts_with(TOKEN)) else {
        return Ok(None);
    };
    let standby = data.join("standby.signal");
    let (signal, is_standby) = if standby.is_file() {
        (standby, true)
    } else {
        (data.join("recovery.signal"), false)
    };
    if !signal.is_file() || !read_capped(&signal)?.lines().any(|l| l == token) {
        return Ok(None);
    }
    Ok(Some((text, is_standby)))
}

/// Whether data directory `data` recovers under a live request to promote (see the module): a
/// server in standby mode with it is not a standby, whatever its `standby.signal` says, and
/// neither is one with a pending `promote` file.
pub fn wanted(data: &Path) -> bool {
    data.join("promote").exists() || live(data).ok().flatten().is_some()
}

/// Called on every request of the startup process of the server of `data`, before the file is
/// fetched: requests its promotion if its restore asked for it and this postmaster has not been
/// asked yet, signals it again while the request is pending (see the module). Returns whether a
/// new request was made.
pub fn request(data: &Path) -> Result<bool> {
    let Some((text, is_standby)) = live(data)? else {
        return Ok(false);
    };
    let marker = data.join(MARKER);
    let promote = data.join("promote");
    if is_standby {
        let streams = streams_from_a_primary(data).inspect_err(|_| {
            // Cannot tell whether it was made a standby: no request stays pending meanwhile,
            // and none is recorded, so the next request decides again and asks anew.
            let _ = std::fs::remove_file(&promote);
            let _ = std::fs::write(&marker, without_request(&text));
        })?;
        if let Some(conf) = streams {
            // Made a streaming standby by hand after the restore: the request is withdrawn
            // (PostgreSQL acts only on a `promote` file that exists) and never made again.
            match std::fs::remove_file(&promote) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot withdraw {}", promote.display()))
                }
                _ => {}
            }
            std::fs::remove_file(&marker)
                .with_context(|| format!("cannot remove {}", marker.display()))?;
            tracing::warn!(data = %data.display(), "{conf} sets primary_conninfo: this server was made a standby after its restore, so wal-fetch withdraws its promotion request and never makes it again ({MARKER} is removed)");
            return Ok(false);
        }
    }
    let asked = Postmaster::of(data)?;
    let recorded = text
        .lines()
        .find(|l| l.starts_with(REQUESTED))
        .map(str::trim_end)
        == Some(asked.record().as_str());
    if recorded && !promote.exists() {
        // Consumed by the startup process: the server is promoting.
        return Ok(false);
    }
    // As pg_ctl promote: the request file, then SIGUSR1 to the postmaster, which passes it on
    // to the startup process. A request already made of this postmaster is signalled again:
    // a startup process it started anew after another process crashed does not know of it.
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
    // Requested: the marker names the postmaster asked. If it cannot, the next request signals
    // again (harmless) and records it then.
    let kept = without_request(&text);
    if let Err(e) = std::fs::write(&marker, format!("{kept}{}\n", asked.record())) {
        tracing::warn!(marker = %marker.display(), error = %e, "promotion requested, but the marker could not record it: the next request signals again");
    }
    Ok(true)
}

/// The marker's text without the line naming the postmaster asked.
fn without_request(marker: &str) -> String {
    marker
        .lines()
        .filter(|l| !l.starts_with(REQUESTED))
        .map(|l| format!("{l}\n"))
        .collect()
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
        // Above 1: a negative id or -1 would signal process groups or every process.
        let pid = lines
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
            .filter(|&p| p > 1)
            .and_then(rustix::process::Pid::from_raw)
            .with_context(|| {
                format!(
                    "{} does not start with a postmaster's process id",
                    pid_file.display()
                )
            })?;
        let start = lines.nth(1).unwrap_or("").trim().to_string();
        Ok(Postmaster { pid, start })
    }

    /// The marker's line naming this postmaster (without its line end).
    fn record(&self) -> String {
        format!(
            "{REQUESTED}{} started {}",
            self.pid.as_raw_pid(),
            self.start
        )
    }
}

/// Where the server of `data` is given a non-empty `primary_conninfo`, if anywhere (its
/// configuration files and command line read as PostgreSQL reads them, see [`server_conf`]).
fn streams_from_a_primary(data: &Path) -> Result<Option<String>> {
    Ok(server_conf::effective(data, "primary_conninfo")?
        .filter(|s| !s.value.is_empty())
        .map(|s| s.source))
}

fn read_capped(path: &Path) -> Result<String> {
    server_conf::read_capped(path, MAX_SMALL_FILE)?
        .with_context(|| format!("{} does not exist", path.display()))
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

    /// A restore's request in `d`: the marker and `signal` holding one token.
    fn restored(d: &Path, signal: &str) {
        let token = new_token().unwrap();
        std::fs::write(d.join(MARKER), marker_text(&token)).unwrap();
        std::fs::write(d.join(signal), &token).unwrap();
    }

    /// A stand-in postmaster named by `d`'s postmaster.pid with start time `start`, counting the
    /// SIGUSR1s it gets in `d/usr1`.
    fn stand_in_postmaster(d: &Path, start: &str) -> StandIn {
        let count = d.join("usr1");
        let _ = std::fs::remove_file(d.join("usr1.ready"));
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg("trap 'echo >> \"$0\"' USR1; : > \"$0.ready\"; while sleep 0.02; do :; done")
            .arg(&count)
            .spawn()
            .unwrap();
        wait_until("start of the stand-in", || d.join("usr1.ready").exists());
        std::fs::write(
            d.join("postmaster.pid"),
            format!("{}\n/d\n{start}\n5432\n", child.id()),
        )
        .unwrap();
        StandIn(child)
    }

    /// Waits until `d`'s stand-in postmasters counted `n` SIGUSR1s in all.
    fn signals(d: &Path, n: usize) {
        wait_until(&format!("signal {n}"), || {
            std::fs::read_to_string(d.join("usr1"))
                .unwrap_or_default()
                .lines()
                .count()
                >= n
        });
    }

    /// Waits up to 10 s for `done`, failing the test naming `what` after that.
    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !done() {
            assert!(started.elapsed().as_secs() < 10, "no {what} within 10 s");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// A stand-in postmaster, killed when dropped (a failing test leaves none behind).
    struct StandIn(std::process::Child);

    impl Drop for StandIn {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn stop(child: StandIn) {
        drop(child);
    }

    #[test]
    fn nothing_is_requested_without_a_marker_and_a_signal_file_holding_its_token() {
        let d = tempfile::tempdir().unwrap();
        let child = stand_in_postmaster(d.path(), "1700000000");
        assert!(!request(d.path()).unwrap());
        restored(d.path(), "standby.signal");
        // A signal file written by someone else (pg_basebackup -R, touch): the marker is inert.
        std::fs::write(d.path().join("standby.signal"), b"").unwrap();
        assert!(!request(d.path()).unwrap());
        assert!(!wanted(d.path()));
        // PostgreSQL removed the signal file as it promoted: inert too.
        std::fs::remove_file(d.path().join("standby.signal")).unwrap();
        assert!(!request(d.path()).unwrap());
        assert!(!d.path().join("promote").exists());
        stop(child);
    }

    #[test]
    fn a_request_is_made_once_per_postmaster_and_signalled_again_while_pending() {
        for signal in ["recovery.signal", "standby.signal"] {
            let d = tempfile::tempdir().unwrap();
            restored(d.path(), signal);
            let child = stand_in_postmaster(d.path(), "1700000000");
            assert!(wanted(d.path()));
            assert!(request(d.path()).unwrap(), "{signal}");
            assert!(d.path().join("promote").is_file());
            signals(d.path(), 1);
            // The same postmaster: no new request, signalled again while `promote` stays (a
            // startup process it restarted after another process crashed).
            assert!(!request(d.path()).unwrap());
            signals(d.path(), 2);
            // Consumed by the startup process: nothing more.
            std::fs::remove_file(d.path().join("promote")).unwrap();
            assert!(!request(d.path()).unwrap());
            assert!(!d.path().join("promote").exists());
            stop(child);
        }
    }

    #[test]
    fn a_server_restarted_before_its_promotion_is_asked_again() {
        let d = tempfile::tempdir().unwrap();
        restored(d.path(), "standby.signal");
        let first = stand_in_postmaster(d.path(), "1700000000");
        assert!(request(d.path()).unwrap());
        signals(d.path(), 1);
        stop(first);
        // Restarted: the new postmaster deleted promote. The same process id started later (a
        // container's restart) is another postmaster as much as another id is.
        std::fs::remove_file(d.path().join("promote")).unwrap();
        let second = stand_in_postmaster(d.path(), "1700000100");
        assert!(request(d.path()).unwrap());
        assert!(d.path().join("promote").is_file());
        signals(d.path(), 2);
        stop(second);
    }

    #[test]
    fn a_pending_request_of_a_server_made_a_standby_by_hand_is_withdrawn() {
        let d = tempfile::tempdir().unwrap();
        restored(d.path(), "standby.signal");
        let child = stand_in_postmaster(d.path(), "1700000000");
        assert!(request(d.path()).unwrap());
        // ALTER SYSTEM SET primary_conninfo while it replays.
        std::fs::write(
            d.path().join("postgresql.auto.conf"),
            b"primary_conninfo = ''\nprimary_conninfo = 'host=p2 user=r'\n",
        )
        .unwrap();
        assert!(!request(d.path()).unwrap());
        assert!(
            !d.path().join("promote").exists(),
            "the request is withdrawn"
        );
        assert!(!d.path().join(MARKER).exists());
        assert!(!wanted(d.path()));
        stop(child);
    }

    #[test]
    fn a_server_made_a_standby_by_hand_is_not_promoted() {
        let d = tempfile::tempdir().unwrap();
        restored(d.path(), "standby.signal");
        let child = stand_in_postmaster(d.path(), "1700000000");
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
        stop(child);
        // Set in a file the configuration includes, and on the postmaster's command line, which
        // outranks the restore's `primary_conninfo = ''` in postgresql.auto.conf.
        for (conf, auto, opts) in [
            (
                "include 'override.conf'
",
                "",
                "",
            ),
            (
                "",
                "primary_conninfo = ''
",
                " \"-c\" \"primary_conninfo=host=p\"",
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            restored(d.path(), "standby.signal");
            let child = stand_in_postmaster(d.path(), "1700000000");
            assert!(
                request(d.path()).unwrap(),
                "requested before it was made a standby"
            );
            std::fs::write(d.path().join("postgresql.conf"), conf).unwrap();
            std::fs::write(
                d.path().join("override.conf"),
                "primary_conninfo = 'host=p'\n",
            )
            .unwrap();
            std::fs::write(d.path().join("postgresql.auto.conf"), auto).unwrap();
            std::fs::write(
                d.path().join("postmaster.opts"),
                format!("/usr/lib/postgresql/15/bin/postgres \"-D\" \"/d\"{opts}\n"),
            )
            .unwrap();
            assert!(!request(d.path()).unwrap(), "{conf:?} {opts:?}");
            assert!(!d.path().join("promote").exists(), "{conf:?} {opts:?}");
            assert!(!wanted(d.path()), "{conf:?} {opts:?}");
            stop(child);
        }
    }

    #[test]
    fn a_pending_request_is_withdrawn_while_the_configuration_cannot_be_read() {
        let d = tempfile::tempdir().unwrap();
        restored(d.path(), "standby.signal");
        let child = stand_in_postmaster(d.path(), "1700000000");
        assert!(request(d.path()).unwrap());
        signals(d.path(), 1);
        std::fs::write(
            d.path().join("postgresql.conf"),
            "include 'postgresql.conf'\n",
        )
        .unwrap();
        let e = format!("{:#}", request(d.path()).unwrap_err());
        assert!(e.contains("postgresql.conf"), "{e}");
        assert!(!d.path().join("promote").exists(), "withdrawn");
        assert!(
            wanted(d.path()),
            "the marker stays: the next request decides again"
        );
        // Readable again (the server was not made a standby): asked again.
        std::fs::write(d.path().join("postgresql.conf"), "").unwrap();
        assert!(request(d.path()).unwrap());
        assert!(d.path().join("promote").is_file());
        signals(d.path(), 2);
        stop(child);
    }

    #[test]
    fn a_pid_file_without_a_postmasters_process_id_is_an_error_naming_it() {
        for text in ["x\n", "-1\n", "-4242\n", "1\n", "0\n"] {
            let d = tempfile::tempdir().unwrap();
            restored(d.path(), "recovery.signal");
            std::fs::write(d.path().join("postmaster.pid"), text).unwrap();
            let e = format!("{:#}", request(d.path()).unwrap_err());
            assert!(e.contains("postmaster.pid"), "{text:?}: {e}");
            assert!(!d.path().join("promote").exists(), "{text:?}");
            assert!(wanted(d.path()), "the marker stays for the next request");
        }
    }
}
