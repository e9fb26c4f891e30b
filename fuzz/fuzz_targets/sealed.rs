//! Sealed objects (FORMAT.md 17.2) and keyring entries (17.3) on arbitrary bytes: `seal::open`
//! and every range read never panic or allocate beyond their input, and nothing opens that was
//! not sealed with the key; a keyring entry that decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::keyring::KeyringEntry;
use tidemark_format::seal::{self, DataKeys};

fuzz_target!(|data: &[u8]| {
    let keys = DataKeys::derive(&[7; 32]);
    let opened = seal::open(&keys, "config", data);
    assert!(opened.is_err(), "random bytes opened as a sealed object");
    if data.len() >= 4 {
        let a = u16::from_le_bytes([data[0], data[1]]) as u64 * 7;
        let b = a + 1 + data[2] as u64 * 300;
        let read = seal::range_read(a..b);
        let start = (read.stored.start as usize).min(data.len());
        let end = (read.stored.end as usize).min(data.len());
        assert!(read.open(&keys, "config", &data[start..end]).is_err());
    }
    // A real envelope of these bytes opens to them, whole and by range.
    let sealed = seal::seal_with(&keys, "packs/00/x", data, |s| s.fill(data.len() as u8));
    assert_eq!(
        seal::open(&keys, "packs/00/x", &sealed).as_deref(),
        Ok(data)
    );
    assert_eq!(seal::plain_len(sealed.len() as u64), Ok(data.len() as u64));
    if let Ok(e) = KeyringEntry::decode(data) {
        assert_eq!(e.encode(), data);
    }
});
