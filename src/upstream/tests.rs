use super::read::content_range;
use super::*;
use crate::config::{Config, Secret};
use http::{HeaderMap, HeaderValue};
use std::path::Path;

fn upstream(toml: &str) -> Upstream {
    let cfg = Config::parse(toml, Path::new(".")).unwrap();
    Upstream::new(&cfg.upstreams[0]).unwrap()
}

fn key(s: &str) -> Key {
    crate::key::parse(&format!("/{s}"), "").unwrap()
}

#[test]
fn s3_urls_path_and_virtual_host_style_with_prefix() {
    let base = "[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"https://s3.example.org\"\nbucket = \"media\"\nregion = \"fr-par\"\naccess_key_id = \"AK\"\nsecret_access_key = \"SK\"\n";
    let path = upstream(&format!("{base}prefix = \"/mastodon/\"\n"));
    let url = path.url(Method::Get, &key("accounts/a b.png"));
    assert_eq!(url.host_str(), Some("s3.example.org"));
    assert_eq!(url.path(), "/media/mastodon/accounts/a%20b.png");
    assert!(url.query().unwrap().contains("X-Amz-Signature="));
    assert!(url.query().unwrap().contains("fr-par"));
    assert!(!url.as_str().contains("SK"));

    let vhost = upstream(&format!("{base}path_style = false\n"));
    let url = vhost.url(Method::Head, &key("x/y.png"));
    assert_eq!(url.host_str(), Some("media.s3.example.org"));
    assert_eq!(url.path(), "/x/y.png");
    assert_eq!(vhost.authority(), ("media.s3.example.org".to_string(), 443));
}

#[test]
fn s3_urls_as_rusty_s3_0_8_built_them() {
    let base = "[[upstream]]\nname = \"s\"\ntype = \"s3\"\nregion = \"fr-par\"\naccess_key_id = \"AK\"\nsecret_access_key = \"SK\"\n";
    let at = |endpoint: &str, bucket: &str, path_style: bool| {
        let up = upstream(&format!(
            "{base}endpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\npath_style = {path_style}\n"
        ));
        let url = up.url(Method::Get, &key("x/y.png"));
        format!("{}{}", url.host_str().unwrap(), url.path())
    };
    // An endpoint's path is a base: its last segment goes unless it ends in '/'.
    let path = |e| at(e, "media", true);
    assert_eq!(
        path("https://s3.example.org/s3/"),
        "s3.example.org/s3/media/x/y.png"
    );
    assert_eq!(
        path("https://s3.example.org/s3"),
        "s3.example.org/media/x/y.png"
    );
    assert_eq!(
        path("https://s3.example.org/a/b"),
        "s3.example.org/a/media/x/y.png"
    );
    assert_eq!(
        at("https://s3.example.org/s3", "media", false),
        "media.s3.example.org/x/y.png"
    );
    // A host is lowercase; a path keeps the name's case.
    assert_eq!(
        at("https://s3.example.org", "Media", false),
        "media.s3.example.org/x/y.png"
    );
    assert_eq!(
        at("https://s3.example.org", "Media", true),
        "s3.example.org/Media/x/y.png"
    );
}

#[test]
fn http_urls_escape_the_key_once() {
    let up = upstream(
        "[[upstream]]\nname = \"h\"\ntype = \"http\"\nurl = \"https://cdn.example.org/bucket\"\n",
    );
    let url = up.url(Method::Get, &key("cache/a%3Fb c#d.png"));
    assert_eq!(
        url.as_str(),
        "https://cdn.example.org/bucket/cache/a%3Fb%20c%23d.png"
    );
}

#[test]
fn header_parsing() {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_RANGE,
        HeaderValue::from_static("bytes 10-19/100"),
    );
    assert_eq!(content_range(&h), Some((10, 19, Some(100))));
    h.insert(
        http::header::CONTENT_RANGE,
        HeaderValue::from_static("bytes 10-19/*"),
    );
    assert_eq!(content_range(&h), Some((10, 19, None)));
    h.insert(
        http::header::CONTENT_RANGE,
        HeaderValue::from_static("bytes 19-10/100"),
    );
    assert_eq!(content_range(&h), None);
    let body = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>m</Message></Error>";
    assert_eq!(
        xml_tag(body, "Code").as_deref(),
        Some("SignatureDoesNotMatch")
    );
    assert_eq!(xml_tag("<Error/>", "Code"), None);
}

#[test]
fn debug_hides_credentials() {
    let up = upstream("[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"https://s3.example.org\"\nbucket = \"media\"\naccess_key_id = \"AK\"\nsecret_access_key = \"very-secret\"\n");
    assert!(!format!("{up:?}").contains("very-secret"));
    assert_eq!(format!("{:?}", Secret::from_test("x")), "Secret(***)");
}

#[test]
fn clients_build_with_ring_and_the_bundled_roots() {
    // reqwest has no provider of its own: a builder not from `http_client` would panic on build.
    http_client().build().unwrap();
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}

#[test]
fn a_read_asks_for_the_path_and_query_of_the_url_it_would_sign_or_join() {
    let http = "[[upstream]]\nname = \"h\"\ntype = \"http\"\nurl = \"https://cdn.example.org/media\"\nprefix = \"m\"\n";
    let s3 = "[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"https://s3.example.org\"\nbucket = \"media\"\naccess_key_id = \"AK\"\nsecret_access_key = \"SK\"\n";
    for toml in [http, s3] {
        let up = upstream(toml);
        for k in [
            "accounts/a b.png",
            "x/%C3%A9:%3F%23.png",
            "cache/1/original/x.jpg",
        ] {
            let url = up.url(Method::Get, &key(k));
            let target = up.target(Method::Get, &key(k));
            let path = &url[url::Position::BeforePath..url::Position::AfterPath];
            assert!(target.starts_with(path), "{target} / {url}");
            if toml == http {
                assert_eq!(target, path);
            } else {
                assert!(target.contains("X-Amz-Signature="), "{target}");
            }
        }
    }
}
