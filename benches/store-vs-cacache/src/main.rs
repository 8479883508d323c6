//! Why mediaproxy's cache store is not cacache: the read path of cacache 13.1 (index lookup, then the
//! content read with its SHA-256 integrity check) against the read path of mediaproxy's entry format
//! (one file per entry: body, JSON metadata, CRC32C trailer; see src/cache/store.rs), on 10,000 entries
//! of 30-80 KB with the page cache warm, one thread. Run: `cargo run --release` in this directory
//! (a separate crate so the proxy's build and CI do not compile cacache).
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::time::Instant;

fn xs(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn path_of(root: &std::path::Path, key: &str) -> std::path::PathBuf {
    let d = Sha256::digest(key.as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    root.join(&hex[..2]).join(&hex[2..3]).join(&hex) // the v2 layout
}

fn read_own(root: &std::path::Path, key: &str) -> usize {
    let p = path_of(root, key);
    let mut f = fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let mut buf = Vec::with_capacity(len);
    f.read_to_end(&mut buf).unwrap();
    let t = &buf[len - 16..];
    assert_eq!(&t[8..], b"MPCACHE2");
    let ml = u32::from_le_bytes(t[0..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(t[4..8].try_into().unwrap());
    let body_len = len - 16 - ml;
    let meta: serde_json::Value = serde_json::from_slice(&buf[body_len..body_len + ml]).unwrap();
    assert_eq!(meta["key"].as_str().unwrap(), key);
    assert_eq!(crc_fast::crc32_iscsi(&buf[..body_len + ml]), crc);
    body_len
}

fn main() {
    let base = std::env::temp_dir().join(format!("store-vs-cacache-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    let (a, b) = (base.join("cacache"), base.join("own"));
    let mut x = 42u64;
    let mut keys = Vec::new();
    let mut total = 0usize;
    for i in 0..10_000 {
        let key = format!(
            "cache/media_attachments/files/{:03}/{:03}/original/{:016x}.jpg",
            i / 1000,
            i % 1000,
            xs(&mut x)
        );
        let len = 30_000 + (xs(&mut x) % 50_001) as usize;
        let body: Vec<u8> = (0..len).map(|_| xs(&mut x) as u8).collect();
        total += len;
        cacache::write_sync(&a, &key, &body).unwrap();
        let meta = serde_json::json!({"key": key, "status": 200, "len": len, "content_type": "image/jpeg", "etag": "\"abc\"", "last_modified": 1700000000u64, "stored_at_ms": 1700000000000u64});
        let json = serde_json::to_vec(&meta).unwrap();
        let mut file = body.clone();
        file.extend_from_slice(&json);
        let crc = crc_fast::crc32_iscsi(&file);
        file.extend_from_slice(&(json.len() as u32).to_le_bytes());
        file.extend_from_slice(&crc.to_le_bytes());
        file.extend_from_slice(b"MPCACHE2");
        let p = path_of(&b, &key);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, file).unwrap();
        keys.push(key);
    }
    // shuffle
    for i in (1..keys.len()).rev() {
        let j = (xs(&mut x) % (i as u64 + 1)) as usize;
        keys.swap(i, j);
    }
    // warm
    for k in &keys {
        cacache::read_sync(&a, k).unwrap();
        read_own(&b, k);
    }
    println!("cacache 13.1.0 (default-features off, mmap), 10,000 entries, {} MB, page cache warm, one thread", total / 1_000_000);
    for round in 1..=3 {
        let t = Instant::now();
        for k in &keys {
            std::hint::black_box(cacache::read_sync(&a, k).unwrap());
        }
        let ca = t.elapsed().as_secs_f64() * 1e6 / keys.len() as f64;
        let t = Instant::now();
        for k in &keys {
            std::hint::black_box(cacache::metadata_sync(&a, k).unwrap());
        }
        let cm = t.elapsed().as_secs_f64() * 1e6 / keys.len() as f64;
        let t = Instant::now();
        for k in &keys {
            std::hint::black_box(read_own(&b, k));
        }
        let own = t.elapsed().as_secs_f64() * 1e6 / keys.len() as f64;
        println!("round {round}: cacache read_sync {ca:.1} us/op ({:.0}/s), of which index lookup (metadata_sync) {cm:.1} us | own store {own:.1} us/op ({:.0}/s) | cacache/own {:.2}x", 1e6 / ca, 1e6 / own, ca / own);
    }
    let _ = fs::remove_dir_all(&base);
}
