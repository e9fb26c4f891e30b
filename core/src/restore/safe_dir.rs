//! A directory a restore writes into, opened once. Every path below it is reached component by
//! component from that open descriptor (openat, mkdirat, symlinkat, unlinkat), so what a
//! restore creates cannot end up anywhere else, whatever a manifest says or whatever changed on
//! disk meanwhile.
//!
//! Invariants:
//! - Every directory on the way to a path is opened with `O_DIRECTORY | O_NOFOLLOW`: a symlink
//!   (or anything that is not a directory) in the middle of a path is an error naming it, never
//!   followed. Checking and using are one system call, so there is no window to race.
//! - Files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`: an existing file or symlink at the
//!   path is an error, never truncated, overwritten or written through.
//! - Files are only ever opened again with `O_NOFOLLOW`.
//! - Paths are manifest paths: relative, `/`-separated, no empty, `.` or `..` component; any
//!   other path is refused here too.
//! - The directory itself is the operator's (`--pgdata`, a tablespace location): it is opened
//!   following symlinks, like any path an operator types.

use anyhow::{bail, Context, Result};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// What an entry is, as `lstat` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A device, socket or fifo.
    Other,
}

/// An open directory and the name it is shown by in messages.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    shown: PathBuf,
}

/// The parent directory of a path being worked on: the root itself or one opened below it.
struct Parent<'a> {
    root: &'a SafeDir,
    opened: Option<OwnedFd>,
}

impl Parent<'_> {
    fn fd(&self) -> BorrowedFd<'_> {
        match &self.opened {
            Some(fd) => fd.as_fd(),
            None => self.root.fd.as_fd(),
        }
    }
}

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

impl SafeDir {
    /// Opens the directory `path` (following symlinks in it: the operator chose it).
    pub fn open(path: &Path) -> Result<SafeDir> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)
        .with_context(|| format!("cannot open directory {}", path.display()))?;
        Ok(SafeDir {
            fd,
            shown: path.to_path_buf(),
        })
    }

    /// The path this directory is shown by.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Opens every directory of `rel` but the last component, without following symlinks, and
    /// returns it with that last component.
    fn parent<'a, 'r>(&'a self, rel: &'r str) -> Result<(Parent<'a>, &'r str)> {
        let bad = rel.is_empty()
            || rel.contains('\0')
            || rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..");
        if bad {
            bail!(
                "{rel:?} is not a plain relative path below {}",
                self.shown.display()
            );
        }
        let (dirs, leaf) = match rel.rsplit_once('/') {
            Some((d, l)) => (Some(d), l),
            None => (None, rel),
        };
        let mut p = Parent {
            root: self,
            opened: None,
        };
        if let Some(dirs) = dirs {
            let mut walked = 0;
            for comp in dirs.split('/') {
                walked += comp.len() + usize::from(walked > 0);
                let next = rustix::fs::openat(p.fd(), comp, DIR_FLAGS, Mode::empty());
                match next {
                    Ok(fd) => p.opened = Some(fd),
                    Err(e) if e == Errno::LOOP || e == Errno::NOTDIR => bail!(
                        "refusing to write {rel} in {}: {} is a symlink or not a directory\nhint: a restore never writes through a symlink; the directory was changed while the restore ran, or the backup is damaged",
                        self.shown.display(),
                        &dirs[..walked]
                    ),
                    Err(e) => {
                        return Err(io(e)).with_context(|| {
                            format!(
                                "cannot open directory {} in {}",
                                &dirs[..walked],
                                self.shown.display()
                            )
                        })
                    }
                }
            }
        }
        Ok((p, leaf))
    }

    /// Creates the directory `rel` (its parent must exist) with `mode` (less the umask).
    pub fn mkdir(&self, rel: &str, mode: u32) -> Result<()> {
        let (p, leaf) = self.parent(rel)?;
        rustix::fs::mkdirat(p.fd(), leaf, Mode::from_raw_mode(mode))
            .map_err(io)
            .with_context(|| format!("cannot create directory {rel} in {}", self.shown.display()))
    }

    /// Creates the new file `rel` for writing, mode 0600; an existing entry of any kind there
    /// (a symlink included) is an error.
    pub fn create_file(&self, rel: &str) -> Result<File> {
        let (p, leaf) = self.parent(rel)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(p.fd(), leaf, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => Ok(File::from(fd)),
            Err(e) if e == Errno::EXIST => bail!(
                "cannot create {rel} in {}: something is already there\nhint: a restore creates every file new and never overwrites one; restore into an empty directory",
                self.shown.display()
            ),
            Err(e) => Err(io(e))
                .with_context(|| format!("cannot create {rel} in {}", self.shown.display())),
        }
    }

    /// Opens the file `rel` this restore created for writing with O_DIRECT (writes that go to
    /// the device without a copy into the page cache); `None` where the filesystem refuses
    /// O_DIRECT (EINVAL).
    pub fn open_direct(&self, rel: &str) -> Result<Option<File>> {
        let (p, leaf) = self.parent(rel)?;
        let flags = OFlags::WRONLY | OFlags::DIRECT | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(p.fd(), leaf, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(e) if e == Errno::INVAL => Ok(None),
            Err(e) => {
                Err(io(e)).with_context(|| format!("cannot open {rel} in {}", self.shown.display()))
            }
        }
    }

    /// Opens the directory `rel` below this one without following symlinks.
    pub fn open_dir(&self, rel: &str) -> Result<SafeDir> {
        let (p, leaf) = self.parent(rel)?;
        let fd = rustix::fs::openat(p.fd(), leaf, DIR_FLAGS, Mode::empty())
            .map_err(io)
            .with_context(|| {
                format!(
                    "cannot open directory {rel} in {} (a symlink is never followed)",
                    self.shown.display()
                )
            })?;
        Ok(SafeDir {
            fd,
            shown: self.shown.join(rel),
        })
    }

    /// Opens the existing regular file `rel` without following a symlink.
    fn open_file(&self, rel: &str, flags: OFlags) -> Result<File> {
        let (p, leaf) = self.parent(rel)?;
        let fd = rustix::fs::openat(
            p.fd(),
            leaf,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            if e == Errno::LOOP {
                anyhow::anyhow!(
                    "{rel} in {} is a symlink\nhint: tidemark never reads or writes through a symlink in a restored directory",
                    self.shown.display()
                )
            } else {
                anyhow::Error::from(io(e))
                    .context(format!("cannot open {rel} in {}", self.shown.display()))
            }
        })?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            bail!("{rel} in {} is not a regular file", self.shown.display());
        }
        Ok(file)
    }

    /// Reads the regular file `rel` (not through a symlink), at most `max` bytes.
    pub fn read_file(&self, rel: &str, max: u64) -> Result<Vec<u8>> {
        let f = self.open_file(rel, OFlags::RDONLY)?;
        let mut buf = Vec::new();
        f.take(max + 1)
            .read_to_end(&mut buf)
            .with_context(|| format!("cannot read {rel} in {}", self.shown.display()))?;
        if buf.len() as u64 > max {
            bail!(
                "{rel} in {} is larger than {max} bytes",
                self.shown.display()
            );
        }
        Ok(buf)
    }

    /// Appends `data` to the existing regular file `rel` (not through a symlink) and fsyncs it.
    pub fn append(&self, rel: &str, data: &[u8]) -> Result<()> {
        let mut f = self.open_file(rel, OFlags::WRONLY | OFlags::APPEND)?;
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot append to {rel} in {}", self.shown.display()))
    }

    /// Removes the non-directory entry `rel` (a symlink itself, never its target); returns
    /// whether there was one.
    pub fn remove_file(&self, rel: &str) -> Result<bool> {
        let (p, leaf) = self.parent(rel)?;
        match rustix::fs::unlinkat(p.fd(), leaf, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(e) if e == Errno::NOENT => Ok(false),
            Err(e) => Err(io(e))
                .with_context(|| format!("cannot remove {rel} in {}", self.shown.display())),
        }
    }

    /// Creates the symlink `rel` pointing to `target`.
    pub fn symlink(&self, rel: &str, target: &Path) -> Result<()> {
        let (p, leaf) = self.parent(rel)?;
        rustix::fs::symlinkat(target, p.fd(), leaf)
            .map_err(io)
            .with_context(|| {
                format!(
                    "cannot create symlink {rel} -> {} in {}",
                    target.display(),
                    self.shown.display()
                )
            })
    }

    /// Opens the existing regular file `rel` for reading and writing (never through a
    /// symlink): a delta restore patches it in place.
    pub fn open_rw(&self, rel: &str) -> Result<File> {
        self.open_file(rel, OFlags::RDWR)
    }

    /// The entries of this directory (never `.` or `..`), each with its kind as `lstat` sees
    /// it: a symlink is [`Kind::Symlink`], whatever it points to.
    pub fn list(&self) -> Result<Vec<(String, Kind)>> {
        let mut dir = rustix::fs::Dir::read_from(&self.fd)
            .map_err(io)
            .with_context(|| format!("cannot list directory {}", self.shown.display()))?;
        let mut out = Vec::new();
        while let Some(e) = dir.read() {
            let e = e
                .map_err(io)
                .with_context(|| format!("cannot list directory {}", self.shown.display()))?;
            let raw = e.file_name().to_bytes();
            if raw == b"." || raw == b".." {
                continue;
            }
            let Ok(name) = std::str::from_utf8(raw) else {
                bail!(
                    "{} holds an entry whose name is not UTF-8 ({:?})\nhint: PostgreSQL never creates one; move it out of the data directory and run the restore again",
                    self.shown.display(),
                    String::from_utf8_lossy(raw)
                );
            };
            let st = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io)
                .with_context(|| format!("cannot stat {name} in {}", self.shown.display()))?;
            let kind = match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                rustix::fs::FileType::Directory => Kind::Dir,
                rustix::fs::FileType::RegularFile => Kind::File,
                rustix::fs::FileType::Symlink => Kind::Symlink,
                _ => Kind::Other,
            };
            out.push((name.to_string(), kind));
        }
        out.sort();
        Ok(out)
    }

    /// Removes `rel` whatever it is: a directory with everything below it (walked through
    /// open descriptors, never following a symlink), or any other entry itself.
    pub fn remove_all(&self, rel: &str) -> Result<()> {
        let (p, leaf) = self.parent(rel)?;
        match rustix::fs::unlinkat(p.fd(), leaf, AtFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(e) if e == Errno::NOENT => return Ok(()),
            Err(e) if e == Errno::ISDIR || e == Errno::PERM => {}
            Err(e) => {
                return Err(io(e))
                    .with_context(|| format!("cannot remove {rel} in {}", self.shown.display()))
            }
        }
        let dir = self.open_dir(rel)?;
        for (name, _) in dir.list()? {
            dir.remove_all(&name)?;
        }
        rustix::fs::unlinkat(p.fd(), leaf, AtFlags::REMOVEDIR)
            .map_err(io)
            .with_context(|| format!("cannot remove directory {rel} in {}", self.shown.display()))
    }

    /// fsyncs the directory (its entries become durable).
    pub fn sync(&self) -> Result<()> {
        rustix::fs::fsync(&self.fd)
            .map_err(io)
            .with_context(|| format!("cannot fsync directory {}", self.shown.display()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A target directory and, next to it, an `outside` directory with one file.
    fn setup() -> (tempfile::TempDir, SafeDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&target).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"keep").unwrap();
        let d = SafeDir::open(&target).unwrap();
        (tmp, d, outside)
    }

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let data = std::fs::read(&p).unwrap_or_default();
                (p.file_name().unwrap().to_string_lossy().into_owned(), data)
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_below_the_directory() {
        let (_tmp, d, _) = setup();
        d.mkdir("base", 0o700).unwrap();
        d.mkdir("base/1", 0o700).unwrap();
        d.create_file("base/1/2").unwrap().write_all(b"x").unwrap();
        d.append("base/1/2", b"y").unwrap();
        assert_eq!(d.read_file("base/1/2", 10).unwrap(), b"xy");
        assert!(d.read_file("base/1/2", 1).is_err());
        d.open_dir("base/1").unwrap().sync().unwrap();
        assert!(d.remove_file("base/1/2").unwrap());
        assert!(!d.remove_file("base/1/2").unwrap());
        d.symlink("link", Path::new("/nowhere")).unwrap();
        assert_eq!(
            std::fs::read_link(d.path().join("link")).unwrap(),
            Path::new("/nowhere")
        );
    }

    #[test]
    fn never_writes_through_a_symlink() {
        let (_tmp, d, outside) = setup();
        let before = listing(&outside);
        std::os::unix::fs::symlink(&outside, d.path().join("evil")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), d.path().join("conf")).unwrap();
        // Below a symlinked directory: refused, naming the component.
        let e = d.create_file("evil/new").unwrap_err().to_string();
        assert!(
            e.contains("evil is a symlink") && e.contains("hint:"),
            "{e}"
        );
        assert!(d.mkdir("evil/dir", 0o700).is_err());
        assert!(d.open_dir("evil").is_err());
        assert!(d.symlink("evil/l", Path::new("/x")).is_err());
        // At a symlink: refused, the target untouched.
        let e = d.create_file("conf").unwrap_err().to_string();
        assert!(e.contains("already there"), "{e}");
        let e = d.append("conf", b"archive_command = 'evil'").unwrap_err();
        assert!(format!("{e:#}").contains("is a symlink"), "{e:#}");
        assert!(d.read_file("conf", 100).is_err());
        // Removing the symlink removes the link, not its target.
        assert!(d.remove_file("conf").unwrap());
        d.create_file("conf").unwrap().write_all(b"fresh").unwrap();
        assert_eq!(listing(&outside), before);
    }

    #[test]
    fn refuses_paths_that_are_not_plain_relative_paths() {
        let (_tmp, d, _) = setup();
        for p in ["", "/etc/x", "../x", "a/../b", "a//b", "./a", "a/", "a\0b"] {
            assert!(d.create_file(p).is_err(), "{p:?}");
            assert!(d.mkdir(p, 0o700).is_err(), "{p:?}");
        }
    }

    #[test]
    fn lists_and_removes_without_following_symlinks() {
        let (_tmp, d, outside) = setup();
        let before = listing(&outside);
        d.mkdir("a", 0o700).unwrap();
        d.mkdir("a/b", 0o700).unwrap();
        d.create_file("a/b/f").unwrap().write_all(b"x").unwrap();
        d.create_file("g").unwrap().write_all(b"old").unwrap();
        std::os::unix::fs::symlink(&outside, d.path().join("a/out")).unwrap();
        std::os::unix::fs::symlink(&outside, d.path().join("l")).unwrap();
        assert_eq!(
            d.list().unwrap(),
            vec![
                ("a".to_string(), Kind::Dir),
                ("g".to_string(), Kind::File),
                ("l".to_string(), Kind::Symlink)
            ]
        );
        let mut f = d.open_rw("g").unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(d.read_file("g", 10).unwrap(), b"new");
        assert!(d.open_rw("l").is_err());
        d.remove_all("a").unwrap();
        d.remove_all("l").unwrap();
        d.remove_all("missing").unwrap();
        assert_eq!(d.list().unwrap(), vec![("g".to_string(), Kind::File)]);
        assert_eq!(listing(&outside), before);
    }
}
