use super::*;
use crate::object::read_at;
use std::os::unix::fs::FileExt;

fn meta(key: &str, len: u64) -> EntryMeta {
    EntryMeta {
        key: key.into(),
        status: 200,
        len,
        content_type: Some("image/png".into()),
        etag: Some("\"e\"".into()),
        last_modified: Some(1_700_000_000),
        stored_at_ms: crate::unix_time::now_ms(),
        origin: None,
        cache_control: None,
        content_disposition: None,
    }
}

#[test]
fn relative_path_is_hex_fanned_out() {
    let h: KeyHash = 0xabcd_0123_4567_89ab_cdef_0011_2233_4455;
    assert_eq!(
        relative_path(Layout::V2, h).as_str(),
        "ab/c/abcd0123456789abcdef001122334455"
    );
    assert_eq!(
        relative_path(Layout::V1, h).as_str(),
        "ab/cd/abcd0123456789abcdef001122334455"
    );
    assert_eq!(
        format!("{h:032x}"),
        &relative_path(Layout::V2, h).as_str()[5..]
    );
}

#[test]
fn a_new_cache_uses_v2_and_one_with_v1_entries_keeps_v1() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.layout(), Layout::V2);
    let key = "media_attachments/files/1/original/a.png";
    let mut w = store.writer().unwrap();
    w.write(b"abc").unwrap();
    w.commit(&store, &meta(key, 3)).unwrap();
    let hex = format!("{:032x}", hash_key(key));
    assert!(dir
        .path()
        .join("v2")
        .join(&hex[..2])
        .join(&hex[2..3])
        .join(&hex)
        .is_file());
    assert!(
        !dir.path().join("v1").exists(),
        "no v1/ made for a new cache"
    );
    assert_eq!(
        Store::open(dir.path()).unwrap().layout(),
        Layout::V2,
        "kept on reopen"
    );

    // A cache an earlier release made: an entry under v1/ab/cd/.
    let old = tempfile::tempdir().unwrap();
    let v1 = old.path().join("v1").join(&hex[..2]).join(&hex[2..4]);
    fs::create_dir_all(&v1).unwrap();
    fs::copy(store.path(hash_key(key)), v1.join(&hex)).unwrap();
    let store = Store::open(old.path()).unwrap();
    assert_eq!(store.layout(), Layout::V1);
    assert!(
        store.load(key).unwrap().is_some(),
        "the earlier release's entry is served"
    );
    assert!(!old.path().join("v2").exists());
    assert_eq!(
        Store::attach(old.path()).unwrap().layout(),
        Layout::V1,
        "the offline tools agree"
    );
}

/// After going back to an earlier release (which fills `v1/`) and forward again, `v2/` is stale: it
/// may hold entries purged meanwhile, so it is moved away at once and deleted.
#[test]
fn a_stale_v2_beside_a_used_v1_is_moved_away_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = "media_attachments/files/1/original/purged.png";
    let mut w = store.writer().unwrap();
    w.write(b"abc").unwrap();
    w.commit(&store, &meta(key, 3)).unwrap();
    // The earlier release's own entries; what a crash left half-deleted; a directory of the admin's.
    fs::create_dir_all(dir.path().join("v1/00/00")).unwrap();
    fs::create_dir_all(dir.path().join("stale-v2-123/ab/c")).unwrap();
    fs::create_dir_all(dir.path().join("stale-notes")).unwrap();
    drop(store);

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.layout(), Layout::V1);
    assert!(!dir.path().join("v2").exists(), "moved away at once");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs::read_dir(dir.path()).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("stale-v2-")
    }) {
        assert!(std::time::Instant::now() < deadline, "never deleted");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        dir.path().join("stale-notes").is_dir(),
        "only its own names"
    );
    assert_eq!(Store::open(dir.path()).unwrap().layout(), Layout::V1);
    // Were the layout in use ever v2 again, the purged entry must not be there.
    fs::remove_dir_all(dir.path().join("v1")).unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.layout(), Layout::V2);
    assert!(store.load(key).unwrap().is_none());
}

#[test]
fn an_unreadable_v1_is_an_error_not_an_empty_cache() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("v1"), b"not a directory").unwrap();
    assert!(Store::open(dir.path()).is_err());
    assert!(Store::attach(dir.path()).is_err());
}

#[test]
fn write_commit_load_small_and_large() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for (key, len) in [
        ("a/small.png", 1000usize),
        ("a/large.mp4", 3 << 20),
        ("a/empty", 0),
    ] {
        let body: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let mut w = store.writer().unwrap();
        for c in body.chunks(70_000) {
            w.write(c).unwrap();
        }
        w.commit(&store, &meta(key, len as u64)).unwrap();
        match store.load(key).unwrap().unwrap() {
            Loaded::Bytes(m, b, _) => {
                assert_eq!(m, meta(key, len as u64).clone_with_stored(m.stored_at_ms));
                assert_eq!(&b[..], &body[..]);
            }
            Loaded::File(m, f) => {
                assert_eq!(m.len, len as u64);
                assert_eq!(&read_at(&f, 0, len).unwrap()[..], &body[..]);
            }
        }
    }
    assert!(store.load("a/other").unwrap().is_none());
    assert_eq!(
        fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0,
        "no temp files left"
    );
}

#[test]
fn corruption_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for len in [5000usize, 2 << 20] {
        let key = format!("k{len}");
        let mut w = store.writer().unwrap();
        w.write(&vec![7u8; len]).unwrap();
        w.commit(&store, &meta(&key, len as u64)).unwrap();
        let path = store.path(hash_key(&key));
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", 100).unwrap();
        assert!(matches!(store.load(&key), Err(StoreError::Corrupt(_))));
        // Truncated.
        f.set_len(50).unwrap();
        assert!(store.load(&key).is_err());
    }
}

#[test]
fn corrupt_metadata_is_detected_even_when_it_still_parses() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for len in [5000usize, 2 << 20] {
        let key = format!("m{len}");
        let mut w = store.writer().unwrap();
        w.write(&vec![7u8; len]).unwrap();
        w.commit(&store, &meta(&key, len as u64)).unwrap();
        let path = store.path(hash_key(&key));
        let bytes = fs::read(&path).unwrap();
        let at = len + find(&bytes[len..], b"image/png").unwrap() + 8;
        // `image/png` becomes `image/pnh`: valid JSON, wrong Content-Type.
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"h", at as u64).unwrap();
        assert!(matches!(store.load(&key), Err(StoreError::Corrupt(_))));
    }
}

#[test]
fn entries_of_the_first_format_are_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = "v1/entry";
    let body = vec![3u8; 3000];
    let json = serde_json::to_vec(&meta(key, body.len() as u64)).unwrap();
    let mut file = body.clone();
    file.extend_from_slice(&json);
    file.extend_from_slice(&(json.len() as u32).to_le_bytes());
    file.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    file.extend_from_slice(b"MPCACHE1");
    let path = store.path(hash_key(key));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, file).unwrap();
    match store.load(key).unwrap().unwrap() {
        Loaded::Bytes(m, b, _) => {
            assert_eq!(&b[..], &body[..]);
            assert_eq!(m.content_type.as_deref(), Some("image/png"));
        }
        Loaded::File(..) => panic!("small entries load into memory"),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn abandoned_writer_leaves_nothing_and_restart_cleans_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.writer().unwrap();
    w.write(b"partial").unwrap();
    drop(w);
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    let w = store.writer().unwrap();
    std::mem::forget(w); // as after kill -9
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
    Store::open(dir.path()).unwrap();
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn length_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.writer().unwrap();
    w.write(b"abc").unwrap();
    assert!(w.commit(&store, &meta("k", 10)).is_err());
    assert!(store.load("k").unwrap().is_none());
}

impl EntryMeta {
    fn clone_with_stored(&self, stored_at: u64) -> EntryMeta {
        EntryMeta {
            stored_at_ms: stored_at,
            origin: None,
            cache_control: None,
            content_disposition: None,
            ..self.clone()
        }
    }
}
