//! Tests of the replication connection against a scripted server: the BASE_BACKUP exchange of
//! each major, notices in the middle of a COPY, errors and streams cut short.

use super::*;
use crate::replication::stream::{parse_tablespaces, Protocol};

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A result set of one row without NULLs.
fn result_set(cols: &[&str], row: &[&str]) -> Vec<u8> {
    let row: Vec<Option<&str>> = row.iter().copied().map(Some).collect();
    rows_set(cols, &[&row])
}

/// The whole BASE_BACKUP response as PostgreSQL 15 sends it, with a NoticeResponse and a
/// ParameterStatus in the middle of the COPY, written in small pieces.
#[tokio::test]
async fn base_backup_exchange_with_notices_mid_copy() {
    let mut server = result_set(&["recptr", "tli"], &["0/2000028", "1"]);
    server.extend(result_set(
        &["spcoid", "spclocation", "size"],
        &["16384", "/srv/ts", "8"],
    ));
    server.extend(msg(b'H', &[0, 0, 0]));
    server.extend(msg(b'd', b"nbase.tar\0\0"));
    server.extend(msg(b'd', b"dTARBYTES"));
    server.extend(msg(b'N', b"SWARNING\0C01000\0Mslow disk\0\0"));
    server.extend(msg(b'S', b"application_name\0x\0"));
    let mut p = b"p".to_vec();
    p.extend_from_slice(&4096i64.to_be_bytes());
    server.extend(msg(b'd', &p));
    server.extend(msg(b'd', b"m"));
    server.extend(msg(b'd', b"d{}"));
    server.extend(msg(b'c', b""));
    server.extend(result_set(&["recptr", "tli"], &["0/2000100", "1"]));
    server.extend(msg(b'Z', b"I"));
    let (client, mut srv) = tokio::io::duplex(64);
    let writer = tokio::spawn(async move {
        let mut query = vec![0u8; 5];
        srv.read_exact(&mut query).await.unwrap();
        let len = i32::from_be_bytes([query[1], query[2], query[3], query[4]]) as usize;
        let mut rest = vec![0u8; len - 4];
        srv.read_exact(&mut rest).await.unwrap();
        assert_eq!(query[0], b'Q');
        for piece in server.chunks(7) {
            srv.write_all(piece).await.unwrap();
        }
        String::from_utf8_lossy(&rest).into_owned()
    });
    let mut c = ReplConn::over(Box::new(client));
    let sets = c
        .start_base_backup("BASE_BACKUP ( LABEL 'x' )")
        .await
        .unwrap();
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0].rows[0][0].as_deref(), Some("0/2000028"));
    assert_eq!(sets[1].rows[0][1].as_deref(), Some("/srv/ts"));
    let mut bs = BackupStream::new(Protocol::Typed, &[]).unwrap();
    let mut got = Vec::new();
    while let Some(d) = c.next_backup_data(&mut bs).await.unwrap() {
        got.push(d);
    }
    assert_eq!(
        got,
        [
            BackupData::NewArchive {
                name: "base.tar".into(),
                tablespace: String::new()
            },
            BackupData::Data(bytes::Bytes::from_static(b"TARBYTES")),
            BackupData::Progress(4096),
            BackupData::Manifest,
            BackupData::Data(bytes::Bytes::from_static(b"{}")),
        ]
    );
    let end = c.finish_base_backup().await.unwrap();
    assert_eq!(end[0].rows[0][0].as_deref(), Some("0/2000100"));
    assert!(writer
        .await
        .unwrap()
        .starts_with("BASE_BACKUP ( LABEL 'x' )"));
}

/// An ErrorResponse in the middle of the COPY ends the stream with the server's message;
/// a connection that closes ends it with a hint.
#[tokio::test]
async fn errors_and_eof_mid_copy() {
    let mut server = msg(b'H', &[0, 0, 0]);
    server.extend(msg(
        b'E',
        b"SERROR\0C57P01\0Mterminating connection due to administrator command\0\0",
    ));
    let (client, mut srv) = tokio::io::duplex(4096);
    srv.write_all(&server).await.unwrap();
    let mut c = ReplConn::over(Box::new(client));
    let sets = c.start_base_backup("BASE_BACKUP").await.unwrap();
    assert!(sets.is_empty());
    let mut bs = BackupStream::new(Protocol::Typed, &[]).unwrap();
    let e = c.next_backup_data(&mut bs).await.unwrap_err();
    assert!(format!("{e:#}").contains("57P01"), "{e:#}");
    drop(srv);
    let e = c.next_backup_data(&mut bs).await.unwrap_err();
    assert!(format!("{e:#}").contains("closed the connection"), "{e:#}");
}

/// Serves `server` (after reading one query) in 7-byte pieces; returns the query text.
fn serve(server: Vec<u8>) -> (ReplConn, tokio::task::JoinHandle<String>) {
    let (client, mut srv) = tokio::io::duplex(64);
    let writer = tokio::spawn(async move {
        let mut query = vec![0u8; 5];
        srv.read_exact(&mut query).await.unwrap();
        let len = i32::from_be_bytes([query[1], query[2], query[3], query[4]]) as usize;
        let mut rest = vec![0u8; len - 4];
        srv.read_exact(&mut rest).await.unwrap();
        for piece in server.chunks(7) {
            if srv.write_all(piece).await.is_err() {
                break;
            }
        }
        String::from_utf8_lossy(&rest).into_owned()
    });
    (ReplConn::over(Box::new(client)), writer)
}

/// A result set with any number of rows, NULLs included.
fn rows_set(cols: &[&str], rows: &[&[Option<&str>]]) -> Vec<u8> {
    let mut t = (cols.len() as i16).to_be_bytes().to_vec();
    for c in cols {
        t.extend_from_slice(c.as_bytes());
        t.push(0);
        t.extend_from_slice(&[0; 18]);
    }
    let mut out = msg(b'T', &t);
    for r in rows {
        let mut d = (r.len() as i16).to_be_bytes().to_vec();
        for v in r.iter() {
            match v {
                Some(v) => {
                    d.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    d.extend_from_slice(v.as_bytes());
                }
                None => d.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out.extend(msg(b'D', &d));
    }
    out.extend(msg(b'C', b"SELECT\0"));
    out
}

/// The whole BASE_BACKUP response as PostgreSQL 14 sends it: a COPY per tablespace row
/// (here the tablespace first, the data directory last), a COPY with the manifest, the end
/// position; with a NoticeResponse between two COPYs.
#[tokio::test]
async fn pg14_base_backup_exchange() {
    let mut server = result_set(&["recptr", "tli"], &["0/2000028", "1"]);
    server.extend(rows_set(
        &["spcoid", "spclocation", "size"],
        &[
            &[Some("16384"), Some("/srv/ts"), Some("8")],
            &[None, None, Some("30000")],
        ],
    ));
    server.extend(msg(b'H', &[0, 0, 0]));
    server.extend(msg(b'd', b"TS-TAR"));
    server.extend(msg(b'c', b""));
    server.extend(msg(b'N', b"SWARNING\0C01000\0Mslow disk\0\0"));
    server.extend(msg(b'H', &[0, 0, 0]));
    server.extend(msg(b'd', b"BASE-TAR"));
    server.extend(msg(b'c', b""));
    server.extend(msg(b'H', &[0, 0, 0]));
    server.extend(msg(b'd', b"{}"));
    server.extend(msg(b'c', b""));
    server.extend(result_set(&["recptr", "tli"], &["0/2000100", "1"]));
    server.extend(msg(b'C', b"BASE_BACKUP\0"));
    server.extend(msg(b'Z', b"I"));
    let (mut c, writer) = serve(server);
    let sets = c
        .start_base_backup(&Protocol::PerArchiveCopy.command(None))
        .await
        .unwrap();
    assert_eq!(sets.len(), 2);
    let spcs = parse_tablespaces(&sets[1].rows).unwrap();
    assert_eq!(spcs[0].oid, Some(16384));
    assert_eq!(spcs[1].oid, None);
    let mut bs = BackupStream::new(Protocol::PerArchiveCopy, &spcs).unwrap();
    let mut got = Vec::new();
    while let Some(d) = c.next_backup_data(&mut bs).await.unwrap() {
        got.push(d);
    }
    let data = |b: &'static [u8]| BackupData::Data(bytes::Bytes::from_static(b));
    assert_eq!(
        got,
        [
            BackupData::NewArchive {
                name: "16384.tar".into(),
                tablespace: "/srv/ts".into()
            },
            data(b"TS-TAR"),
            BackupData::NewArchive {
                name: "base.tar".into(),
                tablespace: String::new()
            },
            data(b"BASE-TAR"),
            BackupData::Manifest,
            data(b"{}"),
        ]
    );
    assert_eq!(c.next_backup_data(&mut bs).await.unwrap(), None);
    let end = c.finish_base_backup().await.unwrap();
    assert_eq!(end[0].rows[0][0].as_deref(), Some("0/2000100"));
    assert!(writer
        .await
        .unwrap()
        .starts_with("BASE_BACKUP LABEL 'tidemark' PROGRESS FAST"));
}

/// A PostgreSQL 14 server that stops after the first archive: an error naming what is
/// missing, not a shorter backup; a server that hangs up mid-archive: the connection error.
#[tokio::test]
async fn pg14_stream_cut_short() {
    let spcs = parse_tablespaces(&[
        vec![Some("16384".into()), Some("/srv/ts".into()), None],
        vec![None, None, None],
    ])
    .unwrap();
    let mut server = msg(b'H', &[0, 0, 0]);
    server.extend(msg(b'd', b"TS-TAR"));
    server.extend(msg(b'c', b""));
    server.extend(result_set(&["recptr", "tli"], &["0/2000100", "1"]));
    let (mut c, _w) = serve(server);
    c.start_base_backup("BASE_BACKUP").await.unwrap();
    let mut bs = BackupStream::new(Protocol::PerArchiveCopy, &spcs).unwrap();
    let e = loop {
        match c.next_backup_data(&mut bs).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("a cut stream ended cleanly"),
            Err(e) => break e,
        }
    };
    assert!(
        format!("{e:#}").contains("after 1 of its 2 archives"),
        "{e:#}"
    );

    let mut server = msg(b'H', &[0, 0, 0]);
    server.extend(msg(b'd', b"TS-TAR"));
    let (mut c, w) = serve(server);
    c.start_base_backup("BASE_BACKUP").await.unwrap();
    w.await.unwrap();
    let mut bs = BackupStream::new(Protocol::PerArchiveCopy, &spcs).unwrap();
    let e = loop {
        match c.next_backup_data(&mut bs).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("a dropped connection ended cleanly"),
            Err(e) => break e,
        }
    };
    assert!(format!("{e:#}").contains("closed the connection"), "{e:#}");
}
