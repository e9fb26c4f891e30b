//! `wal::parse_long_page_header` on arbitrary bytes.
//! Invariants: a parsed header holds exactly the bytes at the offsets FORMAT.md gives
//! (XLogLongPageHeaderData), its page magic is in 0xD000..=0xD1FF (known majors or not), and its segment size is a power of two in 1 MiB..=1 GiB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidemark_format::wal;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(h) = wal::parse_long_page_header(data) else {
        return;
    };
    assert!(data.len() >= 40);
    assert_eq!(h.magic, u16::from_le_bytes([data[0], data[1]]));
    assert_eq!(h.magic & 0xFE00, 0xD000);
    assert_ne!(u16::from_le_bytes([data[2], data[3]]) & 0x0002, 0);
    assert_eq!(h.timeline.0, le32(data, 4));
    assert_eq!(h.page_addr, le64(data, 8));
    assert_eq!(h.system_id.0, le64(data, 24));
    assert_eq!(h.seg_size, le32(data, 32));
    assert_eq!(h.block_size, le32(data, 36));
    assert!(h.seg_size.is_power_of_two() && (1 << 20..=1 << 30).contains(&h.seg_size));
    let name = wal::WalFileName::segment_of(
        h.timeline,
        tidemark_format::Lsn(h.page_addr),
        h.seg_size as u64,
    );
    assert_eq!(
        name.segment_number(h.seg_size as u64),
        Some(h.page_addr / h.seg_size as u64)
    );
});
