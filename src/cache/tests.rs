use super::*;

fn cache(dir: &std::path::Path) -> Arc<Cache> {
    let text = format!("[cache]\ndir = \"{}\"\n", dir.display());
    let cfg = crate::config::Config::parse(&text, dir).unwrap();
    Cache::open(&cfg.cache, 16, CacheCounters::default()).unwrap()
}

fn policy() -> Policy {
    Policy {
        ttl_ok: Duration::from_secs(3600),
        ttl_error: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn a_leader_looks_again_after_taking_the_lead() {
    // A request looked the key up (a miss), then another request's fill committed before this one
    // took the lead: it must serve the entry rather than fetch the object a second time.
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let key = "media_attachments/files/1/original/a.mp4";
    assert!(matches!(
        cache.lookup(key, policy(), false).await,
        Lookup::Miss
    ));
    let meta = EntryMeta {
        key: key.into(),
        status: 200,
        len: 5,
        content_type: None,
        etag: None,
        last_modified: None,
        stored_at_ms: crate::unix_time::now_ms(),
        origin: None,
        cache_control: None,
        content_disposition: None,
    };
    // Committed as a fill of this process commits: sealed, then published through the index.
    let mut w = cache.store().writer().unwrap();
    w.write(b"hello").unwrap();
    let sealed = w.seal(cache.store(), &meta).unwrap();
    cache
        .index
        .publish(hash_key(key), sealed, false, || false)
        .unwrap();
    match cache.lead(key, policy()).await {
        Flight::Cached(Cached::Found(obj)) => assert_eq!(obj.meta.len, Some(5)),
        Flight::Cached(Cached::NotFound) => panic!("a negative entry?"),
        Flight::Leader(_) => panic!("led a second fill of a cached key"),
        Flight::Follower(_) => panic!("no fill was running"),
    }
}
