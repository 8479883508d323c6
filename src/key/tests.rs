use proptest::prelude::*;

use super::*;

#[test]
fn mastodon_keys_pass_through() {
    for k in [
        "media_attachments/files/109/383/759/229/326/700/original/x.png",
        "cache/accounts/avatars/109/383/759/229/326/700/original/a.jpg",
        "custom_emojis/images/000/000/001/static/blobcat.png",
        "site_uploads/files/000/000/001/@1x/logo.png",
        "a b/c+d.png",
    ] {
        let encoded: String = k.replace(' ', "%20");
        assert_eq!(parse(&format!("/{encoded}"), "").unwrap().as_str(), k);
    }
}

#[test]
fn refusals() {
    let cases: &[(&str, KeyError)] = &[
        ("/", KeyError::NotFound),
        ("", KeyError::NotFound),
        ("/a/", KeyError::NotFound),
        ("/a%2F", KeyError::NotFound),
        ("/../etc/passwd", KeyError::BadSegment),
        ("/a/%2e%2e/b", KeyError::BadSegment),
        ("/a/./b", KeyError::BadSegment),
        ("/a//b", KeyError::BadSegment),
        ("/a%2f%2fb", KeyError::BadSegment),
        ("/a%00b", KeyError::BadCharacter),
        ("/a%5cb", KeyError::BadCharacter),
        ("/a\\b", KeyError::BadCharacter),
        ("/a%0d%0aSet-Cookie:x", KeyError::BadCharacter),
        ("/a%zz", KeyError::BadEncoding),
        ("/a%", KeyError::BadEncoding),
        ("/a%2", KeyError::BadEncoding),
        ("/%ff%fe", KeyError::BadEncoding),
    ];
    for (path, want) in cases {
        assert_eq!(parse(path, ""), Err(*want), "{path}");
    }
    assert_eq!(
        parse(&format!("/{}", "a".repeat(1025)), ""),
        Err(KeyError::TooLong)
    );
}

#[test]
fn prefix_is_stripped_exactly() {
    assert_eq!(
        parse("/storage/a/b.png", "/storage").unwrap().as_str(),
        "a/b.png"
    );
    assert_eq!(
        parse("/storagea/b.png", "/storage"),
        Err(KeyError::NotFound)
    );
    assert_eq!(parse("/a/b.png", "/storage"), Err(KeyError::NotFound));
    assert_eq!(parse("/storage", "/storage"), Err(KeyError::NotFound));
    assert_eq!(parse("/storage/", "/storage"), Err(KeyError::NotFound));
}

#[test]
fn statuses() {
    assert_eq!(KeyError::NotFound.status(), 404);
    assert_eq!(KeyError::BadSegment.status(), 400);
}

/// Resolving `key` lexically under `/root` never leaves it: the guarantee `local` relies on (the kernel
/// enforces the symlink half with RESOLVE_BENEATH).
fn stays_inside(key: &str) -> bool {
    let mut depth: i64 = 0;
    for seg in key.split('/') {
        match seg {
            ".." => depth -= 1,
            "." | "" => {}
            _ => depth += 1,
        }
        if depth < 0 {
            return false;
        }
    }
    !key.starts_with('/')
}

proptest! {
    #[test]
    fn accepted_keys_never_escape(path in "(/|[a-z]|\\.|%|2|e|E|f|F|5|c|0|\\\\){1,24}") {
        if let Ok(key) = parse(&path, "") {
            let k = key.as_str();
            prop_assert!(stays_inside(k), "{path:?} -> {k:?}");
            prop_assert!(!k.split('/').any(|s| s.is_empty() || s == "." || s == ".."));
            prop_assert!(!k.contains('\0') && !k.contains('\\'));
            prop_assert!(!k.ends_with('/'));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_escape(path in "\\PC{0,64}") {
        if let Ok(key) = parse(&format!("/{path}"), "/p") {
            prop_assert!(stays_inside(key.as_str()));
        }
        let _ = parse(&path, "");
    }

    #[test]
    fn the_byte_check_for_control_characters_is_char_is_control(s in "[\\x00-\\u{a0}\\u{2028}\\u{fffd}\\\\a/.]{0,24}|\\PC{0,24}|.{0,24}") {
        prop_assert_eq!(
            has_control_or_backslash(&s),
            s.chars().any(|c| c.is_control() || c == '\\'),
            "{:?}", s
        );
    }

    #[test]
    fn parsing_takes_the_same_decisions_as_decoding_every_path(path in "/(%|[0-9a-fA-F]|%[cC]2%[89]|[a-z./\\\\]|\\x7f|\\u{85}|\\u{e9}){0,24}") {
        prop_assert_eq!(parse(&path, ""), parse_by_decoding(&path), "{:?}", path);
    }

    #[test]
    fn encoding_round_trips(segs in proptest::collection::vec("[a-zA-Z0-9 _+@-]{1,12}", 1..8)) {
        let key = segs.join("/");
        let encoded = percent_encoding::utf8_percent_encode(&key, percent_encoding::NON_ALPHANUMERIC).to_string();
        // NON_ALPHANUMERIC also escapes `/`: a decoded %2F is a separator like any other.
        let parsed = parse(&format!("/{encoded}"), "").unwrap();
        prop_assert_eq!(parsed.as_str(), key.as_str());
    }
}

/// What [`parse`] did before it had a path for keys with nothing to decode and a check by bytes: every
/// path decoded, every character looked at as a `char`.
fn parse_by_decoding(path: &str) -> Result<Key, KeyError> {
    let encoded = path.strip_prefix('/').ok_or(KeyError::NotFound)?;
    if encoded.is_empty() || encoded.ends_with('/') {
        return Err(KeyError::NotFound);
    }
    if !valid_escapes(encoded) {
        return Err(KeyError::BadEncoding);
    }
    let decoded = percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| KeyError::BadEncoding)?;
    if decoded.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if decoded.ends_with('/') {
        return Err(KeyError::NotFound);
    }
    if decoded.chars().any(|c| c.is_control() || c == '\\') {
        return Err(KeyError::BadCharacter);
    }
    if decoded
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(KeyError::BadSegment);
    }
    Ok(Key(decoded.into_owned()))
}

#[test]
fn control_characters_are_refused_raw_or_encoded() {
    for path in [
        "/a/b\u{85}c.png",
        "/a/b%C2%85c.png",
        "/a/b\u{9f}.png",
        "/a/b%c2%9f.png",
        "/a/\u{7f}.png",
        "/a/%7F.png",
        "/a/\tb.png",
        "/a/%09b.png",
    ] {
        assert_eq!(parse(path, ""), Err(KeyError::BadCharacter), "{path:?}");
    }
    // Next to them, not control characters: U+00A0 (0xC2 0xA0) and U+0100 (0xC4 0x80).
    for path in ["/a/b\u{a0}c.png", "/a/b%C2%A0c.png", "/a/\u{100}.png"] {
        assert!(parse(path, "").is_ok(), "{path:?}");
    }
}

#[test]
fn allow_prefixes_serve_what_mastodon_publishes_only() {
    let mastodon: Vec<String> = [
        "media_attachments/",
        "accounts/",
        "custom_emojis/",
        "preview_cards/",
        "preview_card_providers/",
        "site_uploads/",
    ]
    .iter()
    .map(|p| p.to_string())
    .collect();
    let key = |k: &str| parse(&format!("/{k}"), "").unwrap();
    for allowed in [
        "media_attachments/files/109/383/759/229/326/700/original/x.png",
        "cache/media_attachments/files/109/383/759/229/326/700/small/x.png",
        "accounts/avatars/000/000/001/original/a.png",
        "cache/accounts/headers/000/000/001/original/h.png",
        "preview_card_providers/icons/000/000/001/original/i.png",
        "site_uploads/files/000/000/001/@1x/logo.png",
    ] {
        assert!(key(allowed).is_allowed(&mastodon), "{allowed}");
    }
    for refused in [
        "backups/dumps/000/000/001/original/archive-20261124-abc.zip",
        "imports/data/000/000/001/original/follows.csv",
        "cache/backups/dumps/000/000/001/original/a.zip",
        "cache/cache/media_attachments/files/1/original/x.png",
        "media_attachmentsX/files/1/original/x.png",
        "accounts",
        "robots.txt",
        "cache/x.png",
    ] {
        assert!(!key(refused).is_allowed(&mastodon), "{refused}");
    }
    assert!(key("anything/at/all.bin").is_allowed(&[String::new()]));
}
