//! Coalescing chunk fetches into range reads: used by restore (a file's chunks) and by expire's
//! repack (a pack's live chunks).
//!
//! Invariant: every item lands in exactly one read; a read covers one pack, spans at most
//! [`READ_MAX`] stored bytes unless a single item is larger, and joins two items only when the
//! unwanted bytes between them are at most [`READ_GAP`].

/// Stored bytes fetched per range request at most.
pub const READ_MAX: u64 = 8 << 20;
/// Unreferenced stored bytes between two wanted chunks that one read may span rather than
/// issuing a second request (a request costs about as much as reading this much more).
pub const READ_GAP: u64 = 256 << 10;

/// Where an item's stored bytes are: (pack, offset, length).
pub type Loc = (u32, u64, u32);

/// One planned range read and the items it serves.
#[derive(Debug)]
pub struct Read<T> {
    pub pack: u32,
    pub start: u64,
    pub end: u64,
    pub items: Vec<T>,
}

/// Sorts `items` by (pack, offset) and groups neighbours into reads.
pub fn coalesce<T>(mut items: Vec<T>, loc: impl Fn(&T) -> Loc) -> Vec<Read<T>> {
    items.sort_by_key(|t| {
        let (p, o, _) = loc(t);
        (p, o)
    });
    let mut out: Vec<Read<T>> = Vec::new();
    for t in items {
        let (pack, offset, len) = loc(&t);
        let end = offset + u64::from(len);
        if let Some(r) = out.last_mut() {
            if r.pack == pack && offset <= r.end + READ_GAP && end.max(r.end) - r.start <= READ_MAX
            {
                r.end = r.end.max(end);
                r.items.push(t);
                continue;
            }
        }
        out.push(Read {
            pack,
            start: offset,
            end,
            items: vec![t],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_per_pack_whatever_the_input_order() {
        let reads = coalesce(
            vec![
                (0, 0, 100),
                (1, 0, 100),
                (0, 200, 100),
                (1, 100, 100),
                (0, 400, 100),
            ],
            |t| *t,
        );
        assert_eq!(reads.len(), 2, "{reads:?}");
        assert_eq!((reads[0].pack, reads[0].start, reads[0].end), (0, 0, 500));
        assert_eq!(reads[0].items.len(), 3);
        assert_eq!((reads[1].pack, reads[1].start, reads[1].end), (1, 0, 200));
        // Far apart in one pack: two reads; too long: split at READ_MAX.
        assert_eq!(
            coalesce(vec![(0, 0, 100), (0, READ_GAP + 1000, 100)], |t| *t).len(),
            2
        );
        let big = (READ_MAX / 2) as u32;
        let reads = coalesce(
            vec![
                (0, 0, big),
                (0, u64::from(big), big),
                (0, 2 * u64::from(big), big),
            ],
            |t| *t,
        );
        assert_eq!(reads.len(), 2);
        assert!(reads.iter().all(|r| r.end - r.start <= READ_MAX));
        // The same stored bytes wanted twice are read once and serve both.
        let reads = coalesce(vec![(0, 0, 100), (0, 0, 100)], |t| *t);
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].items.len(), 2);
        assert_eq!(reads[0].end, 100);
    }
}
