//! The replication client's parsers on arbitrary bytes: backend message framing
//! (`take_frame`), every message body parser, BASE_BACKUP CopyData payloads, and the streaming
//! tar reader fed with the 'd' payloads in the pieces they arrived in.
//! The parsers are the pure modules of tidemark-core, compiled here on their own (they need only
//! `bytes` and `thiserror`) so that this target does not build the whole core crate.
//! Invariants: no panic; no frame longer than MAX_MESSAGE; a tar file's data events add up to
//! at most its declared size, and exactly to it when its end is reported.
#![no_main]

#[path = "../../core/src/replication/message.rs"]
#[allow(dead_code)]
mod message;
#[path = "../../core/src/backup/replication/tar.rs"]
#[allow(dead_code)]
mod tar;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses how the input is split into reads.
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = (step as usize % 64) + 1;
    let mut buf = BytesMut::new();
    let mut reader = tar::TarReader::new();
    let mut declared: Option<u64> = None;
    let mut seen = 0u64;
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            let f = match message::take_frame(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return,
            };
            assert!(f.body.len() <= message::MAX_MESSAGE);
            let _ = message::parse_notice(&f.body);
            let _ = message::parse_auth(&f.body);
            let _ = message::parse_row_description(&f.body);
            let _ = message::parse_data_row(&f.body);
            if let Ok(message::BackupData::Data(d)) = message::parse_backup_data(f.body.clone()) {
                let r = reader.feed(
                    &d,
                    &mut |ev: tar::TarEvent<'_>| -> Result<(), tar::TarError> {
                        match ev {
                            tar::TarEvent::Entry(e) => {
                                assert!(!e.path.is_empty() && !e.path.ends_with('/'));
                                assert_eq!(e.mode & !0o7777, 0);
                                declared = match e.kind {
                                    tar::TarKind::File { size } => Some(size),
                                    _ => None,
                                };
                                seen = 0;
                            }
                            tar::TarEvent::Data(d) => {
                                seen += d.len() as u64;
                                assert!(declared.is_some_and(|s| seen <= s));
                            }
                            tar::TarEvent::EntryEnd => assert_eq!(declared, Some(seen)),
                        }
                        Ok(())
                    },
                );
                if r.is_err() {
                    return;
                }
            }
        }
    }
    let _ = reader.finish();
});
