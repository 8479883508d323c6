use super::*;

fn entry(store: &Store, key: &str, len: usize) -> KeyHash {
    let meta = store::EntryMeta {
        key: key.into(),
        status: 200,
        len: len as u64,
        content_type: None,
        etag: None,
        last_modified: None,
        stored_at_ms: crate::unix_time::now_ms(),
        origin: None,
        cache_control: None,
        content_disposition: None,
    };
    let mut w = store.writer().unwrap();
    w.write(&vec![1u8; len]).unwrap();
    w.commit(store, &meta).unwrap();
    store::hash_key(key)
}

#[test]
fn evicts_least_recently_used_beyond_max_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let index = Index::new(store.clone(), 10_000, Duration::from_secs(3600), 16);
    // Each entry takes one 4 KiB block: two fit under 10,000 bytes, a third evicts one.
    let a = entry(&store, "a", 4000);
    index.insert(a, 4000, false);
    let b = entry(&store, "b", 4000);
    index.insert(b, 4000, false);
    index.touch(a, 4000, None); // a is now more recent than b
    let c = entry(&store, "c", 4000);
    index.insert(c, 4000, false);
    assert!(store.path(a).exists(), "recently read survives");
    assert!(!store.path(b).exists(), "least recently used is evicted");
    assert!(store.path(c).exists());
    assert_eq!(index.usage(), (8192, 2));
}

#[test]
fn an_entry_published_again_after_being_chosen_for_eviction_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let index = Index::new(store.clone(), 1 << 20, Duration::from_secs(3600), 16);
    let a = entry(&store, "a", 100);
    index.insert(a, 100, false);
    // An eviction picks `a` (idle, seen from two hours on)...
    let victims = index.victims(&mut index.lock(), crate::unix_time::now() + 7200);
    assert_eq!(victims, vec![a]);
    // ...and before it deletes the file, a fill publishes a fresh copy of the same key.
    let mut w = store.writer().unwrap();
    w.write(&[2u8; 100]).unwrap();
    let meta = store::EntryMeta {
        key: "a".into(),
        status: 200,
        len: 100,
        content_type: None,
        etag: None,
        last_modified: None,
        stored_at_ms: crate::unix_time::now_ms(),
        origin: None,
        cache_control: None,
        content_disposition: None,
    };
    index
        .publish(a, w.seal(&store, &meta).unwrap(), false, || false)
        .unwrap();
    index.delete(victims);
    assert!(store.path(a).exists(), "the fresh entry survives");
    assert_eq!(index.usage().1, 1, "and is counted");
    // A lookup that found no file a moment before the publish does not un-count it either.
    index.forget(a);
    assert_eq!(index.usage().1, 1);
}

#[test]
fn drops_inactive_entries_and_reloads_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let index = Index::new(store.clone(), u64::MAX, Duration::from_secs(3600), 16);
    let old = entry(&store, "old", 10);
    index.admit_cold(old, 100, crate::unix_time::now() - 7200);
    let fresh = entry(&store, "fresh", 10);
    index.insert(fresh, 100, false);
    assert!(!store.path(old).exists(), "idle past `inactive`");
    assert!(store.path(fresh).exists());

    let reloaded = Index::new(store.clone(), u64::MAX, Duration::from_secs(3600), 16);
    reloaded.load_in_background();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reloaded.usage().1 != 1 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn restart_drops_entries_idle_past_inactive_whatever_the_directory_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut old = Vec::new();
    for i in 0..20 {
        let h = entry(&store, &format!("k{i}"), 10);
        if i % 2 == 0 {
            let f = std::fs::File::options()
                .write(true)
                .open(store.path(h))
                .unwrap();
            // Stored and last read two hours ago.
            let then = std::time::SystemTime::now() - Duration::from_secs(7200);
            f.set_times(
                std::fs::FileTimes::new()
                    .set_accessed(then)
                    .set_modified(then),
            )
            .unwrap();
            old.push(h);
        }
    }
    let index = Index::new(store.clone(), u64::MAX, Duration::from_secs(3600), 16);
    index.load_in_background();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while index.usage().1 != 10 {
        assert!(std::time::Instant::now() < deadline, "{:?}", index.usage());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(old.iter().all(|h| !store.path(*h).exists()));
}

#[test]
fn a_flood_of_404s_evicts_its_own_entries_not_media() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // 80 blocks in all; negative entries may take 10 of them.
    let index = Index::new(store.clone(), 80 * 4096, Duration::from_secs(3600), 16);
    let media: Vec<_> = (0..40)
        .map(|i| {
            let h = entry(&store, &format!("media{i}"), 4000);
            index.insert(h, 4000, false);
            h
        })
        .collect();
    for i in 0..1000 {
        let h = entry(&store, &format!("random{i}"), 0);
        index.insert(h, 0, true);
    }
    assert!(
        media.iter().all(|h| store.path(*h).exists()),
        "media survives the flood"
    );
    let (bytes, entries) = index.usage();
    assert_eq!(entries, 40 + 10, "ten negative entries left");
    assert_eq!(bytes, 50 * 4096);
    // The newest 404s are the ones kept.
    assert!(store.path(store::hash_key("random999")).exists());
    assert!(!store.path(store::hash_key("random0")).exists());
}

#[test]
fn a_running_fill_reserves_its_length_against_max_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let index = Index::new(store.clone(), 10_000, Duration::from_secs(3600), 16);
    let a = entry(&store, "a", 4000);
    index.insert(a, 4000, false);
    let b = entry(&store, "b", 4000);
    index.insert(b, 4000, false);
    // A fill of 4 KB starts: the oldest entry makes room for it before a byte is written.
    let reserved = index.try_reserve(4000).expect("room for one fill");
    assert!(!store.path(a).exists() && store.path(b).exists());
    assert_eq!(index.usage().0, 8192);
    drop(reserved);
    assert_eq!(index.usage().0, 4096);
}

#[test]
fn fills_in_flight_hold_at_most_half_of_max_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let index = Index::new(store.clone(), 16 * 4096, Duration::from_secs(3600), 16);
    let first = index.try_reserve(5 * 4096).expect("5 of 8 blocks");
    assert!(
        index.try_reserve(4 * 4096).is_none(),
        "9 blocks in flight would be over half of 16"
    );
    let second = index.try_reserve(3 * 4096).expect("8 of 8 blocks");
    drop(first);
    assert!(index.try_reserve(4 * 4096).is_some(), "room again");
    drop(second);
}
