use super::*;

/// 13 bytes: no buffer size is a multiple of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct T {
    key: u64,
    tag: [u8; 5],
}

impl Record for T {
    const SIZE: usize = 13;
    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.key.to_be_bytes());
        out[8..].copy_from_slice(&self.tag);
    }
    fn decode(b: &[u8]) -> T {
        let mut key = [0; 8];
        key.copy_from_slice(&b[..8]);
        let mut tag = [0; 5];
        tag.copy_from_slice(&b[8..13]);
        T {
            key: u64::from_be_bytes(key),
            tag,
        }
    }
    fn key(&self) -> u64 {
        self.key
    }
}

/// `n` records with keys spread over the whole range, some repeated.
fn records(n: u64) -> Vec<T> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            T {
                key: if i % 5 == 0 { 42 } else { x },
                tag: [(i % 251) as u8, (i >> 8) as u8, 0, 1, (x >> 3) as u8],
            }
        })
        .collect()
}

/// Spills `input` with `estimate` and `budget`; returns the records read back (twice, to show
/// a second read gives the same) and the partition count.
fn round_trip(input: &[T], estimate: u64, budget: u64) -> (Vec<T>, usize) {
    let mut s = Spill::<T>::new("test", estimate, budget).unwrap();
    for r in input {
        s.push(r).unwrap();
    }
    assert_eq!(s.records(), input.len() as u64);
    let s = s.finish().unwrap();
    assert_eq!(s.records(), input.len() as u64);
    let out: Vec<T> = s.sorted().collect::<Result<_>>().unwrap();
    let again: Vec<T> = s.sorted().collect::<Result<_>>().unwrap();
    assert_eq!(out, again);
    (out, s.partitions())
}

fn sorted(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

#[test]
fn empty_input_reads_back_nothing() {
    let (out, p) = round_trip(&[], 0, DEFAULT_BUDGET);
    assert!(out.is_empty());
    assert_eq!(p, 1);
    let (out, p) = round_trip(&[], 1_000_000, 1);
    assert!(out.is_empty());
    assert_eq!(p, MAX_PARTITIONS);
}

#[test]
fn one_partition_within_budget_is_sorted() {
    let input = records(10_000);
    let (out, p) = round_trip(&input, 10_000, DEFAULT_BUDGET);
    assert_eq!(p, 1);
    assert_eq!(out, sorted(input));
}

#[test]
fn many_partitions_read_back_as_one_ascending_sequence() {
    // 100 records per partition: 10_000 records make 100 partitions, each within budget;
    // their writes cross the 4 KiB write buffers and the reads' record boundaries.
    let input = records(10_000);
    let budget = 100 * mem_size::<T>();
    let (out, p) = round_trip(&input, 10_000, budget);
    assert_eq!(p, 100);
    assert_eq!(out, sorted(input));
}

#[test]
fn partitions_over_budget_are_merged_from_runs() {
    // The estimate says nothing, so one partition holds all 50_000 records: merged from
    // runs of 7 records (7143 runs, one buffered record each).
    let input = records(50_000);
    let (out, p) = round_trip(&input, 0, 7 * mem_size::<T>());
    assert_eq!(p, 1);
    assert_eq!(out, sorted(input.clone()));
    // A low estimate: 8 partitions of about 6_000 records each, budget 1000 each.
    let (out, p) = round_trip(&input, 8_000, 1000 * mem_size::<T>());
    assert_eq!(p, 8);
    assert_eq!(out, sorted(input.clone()));
    // A budget under one record still works, one record at a time.
    let (out, _) = round_trip(&input[..3000], 100, 1);
    assert_eq!(out, sorted(input[..3000].to_vec()));
}

#[test]
fn records_of_one_key_share_a_partition() {
    assert_eq!(partition_of(0, 7), 0);
    assert_eq!(partition_of(u64::MAX, 7), 6);
    assert_eq!(partition_of(u64::MAX / 2, 2), 0);
    assert_eq!(partition_of(u64::MAX / 2 + 1, 2), 1);
    let mut s = Spill::<T>::new("test", 1000, 10 * mem_size::<T>()).unwrap();
    let p = s.parts.len();
    for r in records(1000) {
        s.push(&r).unwrap();
    }
    let hot = partition_of(42, p);
    // Every fifth record has key 42: all 200 are in its partition.
    assert!(s.parts[hot].records >= 200);
}

#[test]
fn the_budget_comes_from_the_environment() {
    // Only this test touches the variable.
    std::env::set_var(BUDGET_ENV, "4096");
    assert_eq!(budget().unwrap(), 4096);
    std::env::set_var(BUDGET_ENV, "0");
    let e = budget().unwrap_err().to_string();
    assert!(e.contains(BUDGET_ENV) && e.contains("hint:"), "{e}");
    std::env::set_var(BUDGET_ENV, "lots");
    assert!(budget().is_err());
    std::env::remove_var(BUDGET_ENV);
    assert_eq!(budget().unwrap(), DEFAULT_BUDGET);
}

#[test]
fn a_scratch_file_changed_behind_its_back_is_an_error_naming_the_directory() {
    let mut s = Spill::<T>::new("test", 10, DEFAULT_BUDGET).unwrap();
    for r in records(10) {
        s.push(&r).unwrap();
    }
    let s = s.finish().unwrap();
    s.parts[0].0.set_len(20).unwrap();
    let e = s.sorted().next_record().unwrap_err().to_string();
    assert!(
        e.contains(&scratch_dir()) && e.contains("TMPDIR") && e.contains("130"),
        "{e}"
    );
}
