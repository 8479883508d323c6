use super::*;

const DAY: Duration = Duration::from_secs(86400);

#[test]
fn survive_reopen_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let t = KeySet::open(dir.path(), "tombstones", DAY, usize::MAX).unwrap();
    assert!(!t.contains(1, DAY));
    t.add(1, DAY).unwrap();
    t.add(u64::MAX, DAY).unwrap();
    assert!(t.contains(1, DAY) && t.contains(u64::MAX, DAY));
    assert!(!t.contains(2, DAY));
    drop(t);
    let t = KeySet::open(dir.path(), "tombstones", DAY, usize::MAX).unwrap();
    assert!(t.contains(1, DAY) && t.contains(u64::MAX, DAY));
    // A zero TTL: every tombstone has expired.
    assert!(!t.contains(1, Duration::ZERO));
}

#[test]
fn torn_and_corrupt_records_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let t = KeySet::open(dir.path(), "tombstones", DAY, usize::MAX).unwrap();
    for id in 1..=3 {
        t.add(id, DAY).unwrap();
    }
    drop(t);
    let path = dir.path().join("tombstones");
    let mut bytes = fs::read(&path).unwrap();
    bytes[MAGIC.len() + RECORD + 3] ^= 0xff; // record 2's id
    bytes.extend_from_slice(&[7; 5]); // a torn append
    fs::write(&path, &bytes).unwrap();
    let t = KeySet::open(dir.path(), "tombstones", DAY, usize::MAX).unwrap();
    assert!(t.contains(1, DAY) && !t.contains(2, DAY) && t.contains(3, DAY));
    // Appends after a torn tail line up again.
    t.add(4, DAY).unwrap();
    drop(t);
    let t = KeySet::open(dir.path(), "tombstones", DAY, usize::MAX).unwrap();
    assert!(t.contains(4, DAY) && t.contains(3, DAY));
}

#[test]
fn a_file_emptied_by_a_crash_before_its_header_was_synced_opens_empty() {
    for content in [&b""[..], &MAGIC[..3]] {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("tombstones"), content).unwrap();
        let t = KeySet::open(dir.path(), "tombstones", DAY, usize::MAX).unwrap();
        t.add(9, DAY).unwrap();
        drop(t);
        let t = KeySet::open(dir.path(), "tombstones", DAY, usize::MAX).unwrap();
        assert!(t.contains(9, DAY));
    }
}

#[test]
fn foreign_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("tombstones"), b"hello").unwrap();
    let e = KeySet::open(dir.path(), "tombstones", DAY, usize::MAX)
        .err()
        .unwrap();
    assert!(e.to_string().contains("not a mediaproxy key set"), "{e}");
}

#[test]
fn a_million_tombstones_take_about_12_bytes_each() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tombstones");
    let now = unix_now();
    let mut bytes = MAGIC.to_vec();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..1_000_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&record(x, now));
    }
    fs::write(&path, &bytes).unwrap();
    let t = KeySet::open(dir.path(), "tombstones", DAY, usize::MAX).unwrap();
    assert_eq!(t.count(), 1_000_000);
    assert!(t.contains(x, DAY));
    let heap = t.heap_bytes();
    assert!(heap <= 13_000_000, "{heap} bytes for a million tombstones");
}

#[test]
fn file_is_compacted_when_mostly_dead() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tombstones");
    let mut bytes = MAGIC.to_vec();
    for id in 0..10_000u64 {
        bytes.extend_from_slice(&record(id, 1_000)); // 1970: long expired
    }
    bytes.extend_from_slice(&record(42_424_242, unix_now()));
    fs::write(&path, &bytes).unwrap();
    let t = KeySet::open(dir.path(), "tombstones", DAY, usize::MAX).unwrap();
    assert_eq!(t.count(), 1);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        (MAGIC.len() + RECORD) as u64
    );
    assert!(t.contains(42_424_242, DAY) && !t.contains(5, DAY));
}

#[test]
fn past_max_the_oldest_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let t = KeySet::open(dir.path(), "copied", DAY, 5_000).unwrap();
    {
        let mut m = t.memory.lock().unwrap();
        for id in 0..6_000u64 {
            m.insert(id, 1_000_000 + id as u32, DAY, 1_000_000 + 6_000, 5_000);
        }
        m.merge(DAY, 1_006_000);
        m.bound(5_000);
        assert_eq!(m.len(), 5_000);
        assert_eq!(m.get(0), None, "the oldest went first");
        assert!(m.get(5_999).is_some());
    }
}

#[test]
fn merges_keep_the_newest_time_and_the_order() {
    let mut m = Memory::default();
    let ttl = Duration::from_secs(100);
    for id in (0..(MERGE_AT as u64 * 3)).rev() {
        m.insert(id * 7, 1_000, ttl, 1_000, usize::MAX);
    }
    m.insert(7, 1_050, ttl, 1_050, usize::MAX);
    m.merge(ttl, 1_050);
    assert!(m.ids().windows(2).all(|w| w[0] < w[1]));
    assert_eq!(m.get(7), Some(1_050));
    assert_eq!(m.get(14), Some(1_000));
    assert_eq!(m.get(8), None);
    // Past the TTL, a merge drops all but the re-busted key.
    m.merge(ttl, 1_120);
    assert_eq!(m.len(), 1);
}
