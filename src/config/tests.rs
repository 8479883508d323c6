use std::path::Path;

use super::*;

fn err(text: &str) -> String {
    Config::parse(text, Path::new("/nonexistent"))
        .unwrap_err()
        .to_string()
}

#[test]
fn embedded_default_matches_the_interface() {
    let c = Config::embedded_default();
    assert_eq!(c.server.listen, vec!["127.0.0.1:8080".parse().unwrap()]);
    assert_eq!(c.local.roots, vec![PathBuf::from("./public/system")]);
    assert_eq!(c.cache.dir, PathBuf::from("./cache"));
    assert!(c.upstreams.is_empty());
}

#[test]
fn example_file_parses() {
    let text = include_str!("../../proxy.example.toml");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("new.secret"), "s3cr3t\n").unwrap();
    let text = text.replace("/etc/mediaproxy/new.secret", "new.secret");
    let c = Config::parse(&text, dir.path()).unwrap();
    assert_eq!(c.upstreams.len(), 2);
    assert_eq!(c.upstreams[0].name, "new");
    assert!(c.upstreams[0].copy_missing);
    assert_eq!(c.cache.max_size, 20 << 30);
    assert_eq!(c.cache.ttl_error, Duration::from_secs(300));
    assert_eq!(c.cache.inactive, Duration::from_secs(90 * 86400));
    match &c.upstreams[0].kind {
        UpstreamKind::S3 {
            credentials: Some((_, secret)),
            ..
        } => assert_eq!(secret.expose(), "s3cr3t"),
        _ => panic!("expected s3 with credentials"),
    }
}

#[test]
fn secrets_are_hidden_from_debug() {
    let text = "[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"https://s3.example.org\"\nbucket = \"media\"\naccess_key_id = \"AK\"\nsecret_access_key = \"topsecret\"\n";
    let c = Config::parse(text, Path::new(".")).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("topsecret"), "{dbg}");
    assert!(dbg.contains("Secret(***)"));
}

#[test]
fn errors_name_keys() {
    assert!(err("[cache]\nttl_error = \"5 fortnights\"\n").contains("`cache.ttl_error`"));
    assert!(err("[cache]\nopen_files = -1\n").contains("`cache.open_files`"));
    assert!(
        err("[server]\nlisten = [\"127.0.0.1:1\"]\n[server.tls]\ncert = 5\n")
            .contains("`server.tls.cert`")
    );
    assert!(err(
        "[[upstream]]\nname = \"a\"\ntype = \"http\"\nurl = \"http://x\"\n[[upstream]]\nname = \"b\"\nnope = 1\n"
    )
    .contains("`upstream[2].nope`"));
    assert!(err("[local]\nroot = []\n").contains("`root`"));
    assert!(err("[[upstream]]\nname = \"x\"\n").contains("upstream[1].type"));
    assert!(
        err("[[upstream]]\nname = \"local\"\ntype = \"http\"\nurl = \"http://x\"\n")
            .contains("upstream[1].name")
    );
    assert!(err(
        "[[upstream]]\nname = \"h\"\ntype = \"http\"\nurl = \"http://x\"\nbucket = \"b\"\n"
    )
    .contains("upstream[1].bucket"));
    assert!(
        err("[[upstream]]\nname = \"h\"\ntype = \"http\"\nurl = \"ftp://x\"\n")
            .contains("upstream[1].url")
    );
    assert!(err("[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"http://x\"\nbucket = \"b\"\nsecret_access_key = \"k\"\n").contains("access_key_id"));
    assert!(err("[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"http://x\"\nbucket = \"b\"\nprefix = \"a/../b\"\n").contains("prefix"));
}

#[test]
fn sizes_and_durations() {
    let c = Config::parse(
        "[cache]\nmax_size = \"256MiB\"\nttl_ok = \"1h 30m\"\ninactive = \"7d\"\n",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(c.cache.max_size, 256 << 20);
    assert_eq!(c.cache.ttl_ok, Duration::from_secs(5400));
    assert_eq!(c.cache.inactive, Duration::from_secs(7 * 86400));
    let c = Config::parse("[cache]\nmax_size = 1000\n", Path::new(".")).unwrap();
    assert_eq!(c.cache.max_size, 1000);
}

#[test]
fn credentials_in_urls_are_refused_without_echoing_them() {
    let e = err("[[upstream]]\nname = \"h\"\ntype = \"http\"\nurl = \"https://bob:hunter2@cdn.example.org\"\n");
    assert!(e.contains("upstream[1].url"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
    let e = err("[[upstream]]\nname = \"h\"\ntype = \"http\"\nurl = \"ht!tp://bob:hunter2@x\"\n");
    assert!(!e.contains("hunter2"), "{e}");
}

#[test]
fn privacy_keys_default_to_mastodon_and_name_themselves_when_wrong() {
    let c = Config::embedded_default();
    assert!(c
        .server
        .allow_prefixes
        .contains(&"media_attachments/".to_string()));
    assert!(!c
        .server
        .allow_prefixes
        .iter()
        .any(|p| p.starts_with("backups")));
    assert!(c.server.cache_buster.is_none());
    assert_eq!(c.cache.tombstone_ttl, Duration::from_secs(180 * 86400));

    let ok = Config::parse(
        "[server]\nallow_prefixes = [\"/media_attachments\", \"accounts/\", \"/\"]\n",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(
        ok.server.allow_prefixes,
        ["media_attachments/", "accounts/", ""]
    );
    assert!(err("[server]\nallow_prefixes = []\n").contains("`server.allow_prefixes`"));
    assert!(err("[server]\nallow_prefixes = [\"\"]\n").contains("`server.allow_prefixes`"));
    assert!(err("[server]\nallow_prefixes = [\"a/../b\"]\n").contains("`server.allow_prefixes`"));

    let s3 = "[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"http://x\"\nbucket = \"b\"\n";
    assert!(err(&format!("{s3}reads = \"public\"\n")).contains("`upstream[1].reads`"));
    assert!(err(
        "[[upstream]]\nname = \"h\"\ntype = \"http\"\nurl = \"http://x\"\nreads = \"anonymous\"\n"
    )
    .contains("`upstream[1].reads`"));
    let anon = Config::parse(&format!("{s3}reads = \"anonymous\"\n"), Path::new(".")).unwrap();
    assert!(matches!(
        anon.upstreams[0].kind,
        UpstreamKind::S3 {
            reads: Reads::Anonymous,
            ..
        }
    ));

    assert!(err("[server]\ncache_buster_header = \"X-Bust\"\n")
        .contains("`server.cache_buster_secret_file`"));
    assert!(err("[server]\ncache_buster_secret_file = \"s\"\n")
        .contains("`server.cache_buster_header`"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bust"), "  hunter2\n").unwrap();
    let bad_name =
        "[server]\ncache_buster_header = \"X Bust\"\ncache_buster_secret_file = \"bust\"\n";
    let e = Config::parse(bad_name, dir.path()).unwrap_err().to_string();
    assert!(e.contains("`server.cache_buster_header`"), "{e}");
    let good = "[server]\ncache_buster_header = \"X-Bust\"\ncache_buster_secret_file = \"bust\"\n";
    let c = Config::parse(good, dir.path()).unwrap();
    let b = c.server.cache_buster.unwrap();
    assert_eq!(
        (b.header.as_str(), b.secret.expose()),
        ("x-bust", "hunter2")
    );
    assert!(!format!("{b:?}").contains("hunter2"));
    assert!(err(
        "[server]\ncache_buster_header = \"X-Bust\"\ncache_buster_secret_file = \"missing\"\n"
    )
    .contains("`server.cache_buster_secret_file`"));
}
