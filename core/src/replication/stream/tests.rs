//! Tests of the BASE_BACKUP stream adapter: each major's exchange, and hostile or cut-short
//! sequences.

use super::*;
use bytes::Bytes;

/// A CopyData frame.
fn frame(tag: u8, body: &[u8]) -> Frame {
    Frame {
        tag,
        body: Bytes::copy_from_slice(body),
    }
}

fn row(v: &[Option<&str>]) -> Vec<Option<String>> {
    v.iter().map(|s| s.map(str::to_string)).collect()
}

fn pg14_list() -> Vec<Tablespace> {
    parse_tablespaces(&[
        row(&[Some("16384"), Some("/srv/ts1"), Some("8")]),
        row(&[Some("16390"), Some("/srv/ts2"), None]),
        row(&[None, None, Some("30000")]),
    ])
    .expect("valid list")
}

/// Feeds frames until Done or an error; returns the events.
fn run(s: &mut BackupStream, frames: &[Frame]) -> Result<Vec<BackupData>, StreamError> {
    let mut out: Vec<BackupData> = s.take_pending().into_iter().collect();
    for f in frames {
        match s.on_frame(f.clone())? {
            Step::Event(e) => out.push(e),
            Step::Next => {}
            Step::Done => return Ok(out),
        }
    }
    Err(StreamError::OutOfOrder {
        what: "(test) the end of the frames",
        when: s.position(),
    })
}

fn pg14_frames() -> Vec<Frame> {
    // The first CopyOutResponse was read by start_base_backup.
    vec![
        frame(b'd', b"ts1-tar"),
        frame(b'c', b""),
        frame(b'H', &[0, 0, 0]),
        frame(b'c', b""),
        frame(b'H', &[0, 0, 0]),
        frame(b'd', b"base-1"),
        frame(b'd', b"base-2"),
        frame(b'c', b""),
        frame(b'H', &[0, 0, 0]),
        frame(b'd', b"{manifest}"),
        frame(b'c', b""),
    ]
}

#[test]
fn commands_per_major() {
    assert_eq!(Protocol::for_major(14), Protocol::PerArchiveCopy);
    for m in 15..=19 {
        assert_eq!(Protocol::for_major(m), Protocol::Typed);
    }
    let old = Protocol::PerArchiveCopy.command(Some(100));
    assert_eq!(
        old,
        "BASE_BACKUP LABEL 'tidemark' PROGRESS FAST NOWAIT TABLESPACE_MAP MAX_RATE 100 \
         MANIFEST 'yes' MANIFEST_CHECKSUMS 'SHA256'"
    );
    assert!(!old.contains(['(', ',']));
    let new = Protocol::Typed.command(None);
    assert!(new.starts_with("BASE_BACKUP ( LABEL 'tidemark', ") && new.ends_with(" )"));
    assert!(!new.contains("MAX_RATE"));
}

#[test]
fn pg14_copies_become_15_style_events() {
    let mut s = BackupStream::new(Protocol::PerArchiveCopy, &pg14_list()).unwrap();
    let got = run(&mut s, &pg14_frames()).unwrap();
    let data = |b: &'static [u8]| BackupData::Data(Bytes::from_static(b));
    assert_eq!(
        got,
        [
            BackupData::NewArchive {
                name: "16384.tar".into(),
                tablespace: "/srv/ts1".into()
            },
            data(b"ts1-tar"),
            BackupData::NewArchive {
                name: "16390.tar".into(),
                tablespace: "/srv/ts2".into()
            },
            BackupData::NewArchive {
                name: "base.tar".into(),
                tablespace: String::new()
            },
            data(b"base-1"),
            data(b"base-2"),
            BackupData::Manifest,
            data(b"{manifest}"),
        ]
    );
    assert!(s.is_done());
}

#[test]
fn pg15_typed_copy_data() {
    let mut s = BackupStream::new(Protocol::Typed, &pg14_list()).unwrap();
    assert_eq!(s.take_pending(), None);
    let got = run(
        &mut s,
        &[
            frame(b'd', b"nbase.tar\0\0"),
            frame(b'd', b"dxyz"),
            frame(b'd', b"m"),
            frame(b'c', b""),
        ],
    )
    .unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[2], BackupData::Manifest);
    let mut s = BackupStream::new(Protocol::Typed, &[]).unwrap();
    let e = run(&mut s, &[frame(b'd', b"x")]).unwrap_err();
    assert!(matches!(e, StreamError::Protocol(_)), "{e}");
    let mut s = BackupStream::new(Protocol::Typed, &[]).unwrap();
    let e = run(&mut s, &[frame(b'H', &[0, 0, 0])]).unwrap_err();
    assert!(
        e.to_string().contains("CopyOutResponse inside the COPY"),
        "{e}"
    );
}

#[test]
fn pg14_truncated_streams_name_what_is_missing() {
    let all = pg14_frames();
    // Cut after each CopyDone and follow with the end-position result set.
    for cut in [2, 4, 8] {
        let mut frames = all[..cut].to_vec();
        frames.push(frame(b'T', b""));
        let mut s = BackupStream::new(Protocol::PerArchiveCopy, &pg14_list()).unwrap();
        let e = run(&mut s, &frames).unwrap_err();
        let msg = e.to_string();
        if cut < 8 {
            assert!(
                matches!(e, StreamError::MissingArchives { want: 3, .. }),
                "cut {cut}: {msg}"
            );
            assert!(
                msg.contains("after 1 of its 3 archives") || cut > 2,
                "{msg}"
            );
        } else {
            assert_eq!(e, StreamError::MissingManifest, "cut {cut}");
        }
    }
    // Cut anywhere else: the stream never reports Done.
    for cut in 0..all.len() {
        let mut s = BackupStream::new(Protocol::PerArchiveCopy, &pg14_list()).unwrap();
        assert!(run(&mut s, &all[..cut]).is_err(), "cut {cut}");
        assert!(!s.is_done());
    }
}

#[test]
fn pg14_hostile_sequences_are_errors() {
    let hdr = || frame(b'H', &[0, 0, 0]);
    let cases: Vec<(Vec<Frame>, &str)> = vec![
        // A CopyOutResponse inside a COPY.
        (vec![hdr()], "CopyOutResponse inside archive 1 of 3"),
        // CopyData between two COPYs.
        (
            vec![frame(b'c', b""), frame(b'd', b"x")],
            "CopyData after 1 of 4 COPY streams",
        ),
        // CopyDone twice.
        (
            vec![frame(b'c', b""), frame(b'c', b"")],
            "CopyDone after 1 of 4",
        ),
        // A message that has no place in a COPY.
        (vec![frame(b'G', b"")], "unexpected message 'G'"),
        (
            vec![frame(b'c', b""), frame(b'I', b"")],
            "unexpected message 'I'",
        ),
    ];
    for (frames, want) in cases {
        let mut s = BackupStream::new(Protocol::PerArchiveCopy, &pg14_list()).unwrap();
        let e = run(&mut s, &frames).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
    }
    // Once the manifest COPY ended nothing more is taken (the caller then reads the end
    // position, where a further COPY is an unexpected message).
    let mut s = BackupStream::new(Protocol::PerArchiveCopy, &pg14_list()).unwrap();
    run(&mut s, &pg14_frames()).unwrap();
    let e = s.on_frame(hdr()).unwrap_err().to_string();
    assert!(e.contains("CopyOutResponse after the end"), "{e}");
    // After an error the stream stays failed: no later frame makes it end cleanly.
    assert!(!s.is_done());
    let e = s.on_frame(frame(b'c', b"")).unwrap_err().to_string();
    assert!(e.contains("after an earlier error"), "{e}");
}

#[test]
fn tablespace_lists_are_validated() {
    let ok = parse_tablespaces(&[row(&[None, None, None])]).unwrap();
    assert_eq!(ok[0].oid, None);
    let bad: Vec<(Vec<Vec<Option<String>>>, &str)> = vec![
        (vec![row(&[Some("x1"), Some("/a"), None])], "not a number"),
        (vec![row(&[Some("-1"), Some("/a"), None])], "not a number"),
        (vec![row(&[Some("0"), Some("/a"), None])], "not a number"),
        (
            vec![row(&[Some("99999999999"), Some("/a"), None])],
            "not a number",
        ),
        (vec![row(&[Some("+5"), Some("/a"), None])], "not a number"),
        (vec![row(&[Some("5"), None, None])], "has no location"),
        (vec![row(&[Some("5"), Some(""), None])], "empty location"),
        (
            vec![row(&[None, Some("/a"), None])],
            "without a tablespace oid",
        ),
        (vec![row(&[None, None, Some("lots")])], "not a number of kB"),
        (
            vec![row(&[None, None, None]), row(&[None, None, None])],
            "data directory is listed twice",
        ),
        (
            vec![
                row(&[Some("5"), Some("/a"), None]),
                row(&[Some("5"), Some("/b"), None]),
            ],
            "tablespace 5 is listed twice",
        ),
        (
            vec![
                row(&[Some("5"), Some("/a"), None]),
                row(&[Some("6"), Some("/a"), None]),
            ],
            "two tablespaces are listed at \"/a\"",
        ),
    ];
    for (rows, want) in bad {
        let e = parse_tablespaces(&rows).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
        assert!(e.contains("tablespace list"), "{e}");
    }
    let many = vec![row(&[None, None, None]); MAX_TABLESPACES + 1];
    assert!(parse_tablespaces(&many)
        .unwrap_err()
        .to_string()
        .contains("more than 65536"));
    // Short rows (fewer columns than expected) are not a panic.
    assert_eq!(parse_tablespaces(&[vec![]]).unwrap()[0].oid, None);
    // PostgreSQL 14 needs the data directory's row to know its archives.
    let only_ts = parse_tablespaces(&[row(&[Some("5"), Some("/a"), None])]).unwrap();
    let e = BackupStream::new(Protocol::PerArchiveCopy, &only_ts).unwrap_err();
    assert!(
        e.to_string().contains("no row for the data directory"),
        "{e}"
    );
    assert!(BackupStream::new(Protocol::Typed, &only_ts).is_ok());
}
