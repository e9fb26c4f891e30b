//! The value the server of a data directory takes for a setting, read from its files as
//! PostgreSQL reads them (for `wal-fetch`'s promotion guard, [`super::promote`]):
//! 1. the configuration file: the postmaster's `config_file` (`-c config_file=...` in
//!    `postmaster.opts`, Debian's `/etc/postgresql/<major>/<cluster>/postgresql.conf`), else the
//!    data directory's `postgresql.conf`, with the files it includes (`include`,
//!    `include_if_exists`, `include_dir`, nested up to PostgreSQL's depth of 10), in order;
//! 2. the data directory's `postgresql.auto.conf` (`ALTER SYSTEM`);
//! 3. the postmaster's command line in `postmaster.opts` (`-c name=value`, `--name=value`), which
//!    outranks every file.
//!
//! Within the files the last assignment wins. A relative `config_file` is taken as relative to
//! the data directory (the postmaster's working directory is not recorded anywhere). A missing
//! file is skipped (PostgreSQL refuses to start or reload with a missing `include`, so such a
//! file set nothing); a file larger than 16 MiB, or more than 1,000 files, is an error.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Largest configuration file read.
const MAX_FILE: u64 = 16 << 20;
/// Largest `postmaster.opts` read.
const MAX_OPTS: u64 = 64 << 10;
/// PostgreSQL's `CONF_FILE_MAX_DEPTH`.
const MAX_DEPTH: usize = 10;
/// Most files read for one setting.
const MAX_FILES: usize = 1000;

/// A setting's value and where it was given (a file's path, or "the postmaster's command line").
#[derive(Debug, PartialEq, Eq)]
pub struct Setting {
    pub value: String,
    pub source: String,
}

/// The value the server of `data` takes for `name` (lower case), if any of its files sets it.
pub fn effective(data: &Path, name: &str) -> Result<Option<Setting>> {
    let argv = command_line(data)?;
    if let Some(v) = last_option(&argv, name) {
        return Ok(Some(Setting {
            value: v,
            source: "the postmaster's command line (postmaster.opts)".into(),
        }));
    }
    let config_file = match last_option(&argv, "config_file") {
        Some(f) => data.join(f),
        None => data.join("postgresql.conf"),
    };
    let (mut files, mut found) = (0, None);
    read_file(&config_file, name, 0, &mut files, &mut found)?;
    read_file(
        &data.join("postgresql.auto.conf"),
        name,
        0,
        &mut files,
        &mut found,
    )?;
    Ok(found)
}

/// The postmaster's arguments after its program, from `postmaster.opts` (the program, then each
/// argument in double quotes, unescaped); none when the file is absent.
fn command_line(data: &Path) -> Result<Vec<String>> {
    let path = data.join("postmaster.opts");
    let Some(text) = read_capped(&path, MAX_OPTS)? else {
        return Ok(Vec::new());
    };
    let text = text.trim_end_matches(['\n', '\r']);
    let Some(start) = text.find(" \"") else {
        return Ok(Vec::new());
    };
    let quoted = &text[start + 1..];
    let Some(inner) = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')) else {
        bail!(
            "{} is not a postmaster's command line (arguments in double quotes)",
            path.display()
        );
    };
    Ok(inner.split("\" \"").map(str::to_string).collect())
}

/// The value of the last `-c name=value`, `-cname=value` or `--name=value` for `name` in `argv`
/// (names compared as PostgreSQL does: case-insensitive, `-` read as `_`).
fn last_option(argv: &[String], name: &str) -> Option<String> {
    let mut found = None;
    let mut args = argv.iter();
    while let Some(a) = args.next() {
        let assignment = if a == "-c" {
            args.next().map(String::as_str)
        } else if let Some(long) = a.strip_prefix("--") {
            Some(long)
        } else {
            a.strip_prefix("-c")
        };
        let Some((key, value)) = assignment.and_then(|s| s.split_once('=')) else {
            continue;
        };
        if key.replace('-', "_").eq_ignore_ascii_case(name) {
            found = Some(value.to_string());
        }
    }
    found
}

/// Reads the assignments of `path` in order into `found` (the last for `name` wins), following
/// its include directives.
fn read_file(
    path: &Path,
    name: &str,
    depth: usize,
    files: &mut usize,
    found: &mut Option<Setting>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!(
            "{} is included more than {MAX_DEPTH} levels deep (a loop of include directives?)",
            path.display()
        );
    }
    *files += 1;
    if *files > MAX_FILES {
        bail!(
            "more than {MAX_FILES} configuration files to read at {}",
            path.display()
        );
    }
    let Some(text) = read_capped(path, MAX_FILE)? else {
        return Ok(());
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    for (key, value) in assignments(&text) {
        if key.eq_ignore_ascii_case("include") || key.eq_ignore_ascii_case("include_if_exists") {
            read_file(&dir.join(&value), name, depth + 1, files, found)?;
        } else if key.eq_ignore_ascii_case("include_dir") {
            for f in conf_files_in(&dir.join(&value))? {
                read_file(&f, name, depth + 1, files, found)?;
            }
        } else if key.eq_ignore_ascii_case(name) {
            *found = Some(Setting {
                value,
                source: path.display().to_string(),
            });
        }
    }
    Ok(())
}

/// The files `include_dir` reads: names ending in `.conf` not starting with `.`, in name order.
fn conf_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut names = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".conf") && !n.starts_with('.') {
            names.push(n);
            if names.len() > MAX_FILES {
                bail!("{} holds more than {MAX_FILES} .conf files", dir.display());
            }
        }
    }
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// The assignments of configuration text in order: `name = value` or `name value`, a value
/// quoted with `'` (`''` or a backslash escape inside) or a bare word, `#` comments.
fn assignments(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    text.lines().filter_map(|line| {
        let line = line.trim_start();
        let key_end = line
            .find(|c: char| c.is_whitespace() || c == '=')
            .unwrap_or(line.len());
        let key = &line[..key_end];
        if key.is_empty() || key.starts_with('#') {
            return None;
        }
        let rest = line[key_end..].trim_start();
        let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
        let value = match rest.strip_prefix('\'') {
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
        };
        Some((key.to_string(), value))
    })
}

/// The text of `path` if it exists, refused above `max` bytes before it is read whole.
pub(super) fn read_capped(path: &Path, max: u64) -> Result<Option<String>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let mut bytes = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{} is larger than {max} bytes", path.display());
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn last(text: &str, name: &str) -> Option<String> {
        assignments(text)
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .last()
            .map(|(_, v)| v)
    }

    #[test]
    fn assignments_are_read_as_postgresql_writes_them() {
        assert_eq!(
            last("a = 1\nprimary_conninfo = ''\n", "primary_conninfo"),
            Some(String::new())
        );
        assert_eq!(
            last(
                "primary_conninfo='host=x'\n#primary_conninfo = ''\n",
                "primary_conninfo"
            ),
            Some("host=x".into())
        );
        assert_eq!(
            last(
                "PRIMARY_CONNINFO 'a=''b''' # c\nprimary_slot_name = 's'",
                "primary_conninfo"
            ),
            Some("a='b'".into())
        );
        assert_eq!(last("x = 'it\\'s'", "x"), Some("it's".into()));
        assert_eq!(last("primary_conninfo_x = 'y'", "primary_conninfo"), None);
    }

    #[test]
    fn files_are_read_in_postgresqls_order_and_the_command_line_outranks_them() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let etc = d.path().join("etc");
        std::fs::create_dir_all(data.join("conf.d")).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        let get = || effective(&data, "primary_conninfo").unwrap();
        assert_eq!(get(), None, "no files");
        // An include_dir (CloudNativePG and others keep their settings in included files).
        std::fs::write(
            data.join("postgresql.conf"),
            "primary_conninfo = 'host=a'\ninclude_dir 'conf.d'\ninclude_if_exists 'missing.conf'\n",
        )
        .unwrap();
        std::fs::write(data.join("conf.d/10.conf"), "primary_conninfo = 'host=b'\n").unwrap();
        std::fs::write(data.join("conf.d/20.conf"), "include '../override.conf'\n").unwrap();
        std::fs::write(
            data.join("conf.d/.30.conf"),
            "primary_conninfo = 'host=hidden'\n",
        )
        .unwrap();
        std::fs::write(
            data.join("conf.d/40.conf.bak"),
            "primary_conninfo = 'host=bak'\n",
        )
        .unwrap();
        std::fs::write(data.join("override.conf"), "primary_conninfo = 'host=c'\n").unwrap();
        let s = get().unwrap();
        assert_eq!(s.value, "host=c");
        assert!(s.source.ends_with("override.conf"), "{}", s.source);
        // postgresql.auto.conf is read after the configuration file.
        std::fs::write(data.join("postgresql.auto.conf"), "primary_conninfo = ''\n").unwrap();
        assert_eq!(get().unwrap().value, "");
        // Debian's layout: config_file on the postmaster's command line.
        std::fs::remove_file(data.join("postgresql.auto.conf")).unwrap();
        std::fs::write(etc.join("postgresql.conf"), "primary_conninfo 'host=etc'\n").unwrap();
        let opts = format!(
            "/usr/lib/postgresql/15/bin/postgres \"-D\" \"{}\" \"-c\" \"config_file={}\"\n",
            data.display(),
            etc.join("postgresql.conf").display()
        );
        std::fs::write(data.join("postmaster.opts"), &opts).unwrap();
        assert_eq!(get().unwrap().value, "host=etc");
        // A setting on the command line outranks every file; -c, -cname=, --name= alike.
        for arg in [
            "\"-c\" \"primary_conninfo=host=cl\"",
            "\"-cprimary_conninfo=host=cl\"",
            "\"--primary-conninfo=host=cl\"",
        ] {
            std::fs::write(
                data.join("postmaster.opts"),
                format!("{} {arg}\n", opts.trim_end()),
            )
            .unwrap();
            let s = get().unwrap();
            assert_eq!(s.value, "host=cl", "{arg}");
            assert!(s.source.contains("command line"));
        }
    }

    #[test]
    fn an_include_loop_or_an_oversized_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("postgresql.conf"),
            "include 'postgresql.conf'\n",
        )
        .unwrap();
        let e = format!("{:#}", effective(d.path(), "x").unwrap_err());
        assert!(e.contains("postgresql.conf") && e.contains("levels"), "{e}");
        let big = std::fs::File::create(d.path().join("postgresql.conf")).unwrap();
        big.set_len(MAX_FILE + 1).unwrap();
        let e = format!("{:#}", effective(d.path(), "x").unwrap_err());
        assert!(e.contains("larger than"), "{e}");
        std::fs::write(d.path().join("postgresql.conf"), "").unwrap();
        std::fs::write(d.path().join("postmaster.opts"), "/bin/postgres \"-D\n").unwrap();
        let e = format!("{:#}", effective(d.path(), "x").unwrap_err());
        assert!(e.contains("postmaster.opts"), "{e}");
    }
}
