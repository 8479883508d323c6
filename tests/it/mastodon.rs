//! `migrate --mastodon-db` and `verify --mastodon-db` against a real PostgreSQL holding Mastodon-shaped
//! rows, and real S3 servers: exactly the keys Mastodon would have written are copied, nothing else.

use std::collections::BTreeSet;
use std::path::Path;

use tempfile::TempDir;

use crate::common::pg::Postgres;
use crate::common::*;

/// Mastodon 4.6's columns that `migrate` reads (no `imports` or `preview_card_providers` table: an
/// older schema, which must be skipped), and rows of every kind.
const SCHEMA: &str = "
CREATE TABLE media_attachments (id bigint PRIMARY KEY, file_file_name varchar, file_content_type varchar,
  file_storage_schema_version int, remote_url varchar NOT NULL DEFAULT '', thumbnail_file_name varchar,
  thumbnail_content_type varchar, thumbnail_storage_schema_version int);
CREATE TABLE accounts (id bigint PRIMARY KEY, domain varchar, avatar_file_name varchar,
  avatar_content_type varchar, avatar_storage_schema_version int, header_file_name varchar,
  header_content_type varchar, header_storage_schema_version int);
CREATE TABLE custom_emojis (id bigint PRIMARY KEY, domain varchar, image_file_name varchar,
  image_content_type varchar, image_storage_schema_version int);
CREATE TABLE preview_cards (id bigint PRIMARY KEY, image_file_name varchar, image_storage_schema_version int);
CREATE TABLE site_uploads (id bigint PRIMARY KEY, var varchar, file_file_name varchar);
CREATE TABLE backups (id bigint PRIMARY KEY, dump_file_name varchar);

INSERT INTO media_attachments VALUES
  (7, 'old.png', 'image/png', NULL, '', NULL, NULL, NULL),
  (109383759229326700, 'clip.mp4', 'video/mp4', 1, 'https://remote.example/clip.mp4', 'poster.jpg', 'image/jpeg', 1),
  (109383759229326701, 'pic.jpeg', 'image/jpeg', NULL, 'https://remote.example/pic.jpeg', NULL, NULL, NULL),
  (109383759229326702, NULL, NULL, 1, 'https://remote.example/never-fetched.png', NULL, NULL, NULL),
  (109383759229326703, 'song.mp3', 'audio/mpeg', NULL, '', NULL, NULL, NULL);
INSERT INTO accounts VALUES
  (-99, NULL, 'instance.png', 'image/png', NULL, NULL, NULL, NULL),
  (1, NULL, 'me.gif', 'image/gif', NULL, 'banner.jpg', 'image/jpeg', NULL),
  (109000000000000001, 'remote.example', 'them.jpg', 'image/jpeg', 1, NULL, NULL, NULL);
INSERT INTO custom_emojis VALUES (3, 'remote.example', 'blob.png', 'image/png', 1), (4, NULL, 'ours.png', 'image/png', NULL);
INSERT INTO preview_cards VALUES (5, 'card.jpg', 1), (6, 'oldcard.jpg', 0);
INSERT INTO site_uploads VALUES (1, 'thumbnail', 'thumb.jpg'), (2, 'mascot', 'mascot.svg');
INSERT INTO backups VALUES (9, 'archive-20261124.zip');
";

/// Every key those rows stand for, as Mastodon writes them.
fn expected() -> BTreeSet<String> {
    [
        "media_attachments/files/000/000/007/original/old.png",
        "media_attachments/files/000/000/007/small/old.png",
        "cache/media_attachments/files/109/383/759/229/326/700/original/clip.mp4",
        "cache/media_attachments/files/109/383/759/229/326/700/small/clip.png",
        // thumbnail_storage_schema_version exists here (4.6): cache/ for a remote record.
        "cache/media_attachments/thumbnails/109/383/759/229/326/700/original/poster.jpg",
        "media_attachments/files/109/383/759/229/326/701/original/pic.jpeg",
        "media_attachments/files/109/383/759/229/326/701/small/pic.jpeg",
        "media_attachments/files/109/383/759/229/326/703/original/song.mp3",
        "accounts/avatars/000/000/001/original/me.gif",
        "accounts/avatars/000/000/001/static/me.png",
        "accounts/headers/000/000/001/original/banner.jpg",
        "cache/accounts/avatars/109/000/000/000/000/001/original/them.jpg",
        "cache/custom_emojis/images/000/000/003/original/blob.png",
        "cache/custom_emojis/images/000/000/003/static/blob.png",
        "custom_emojis/images/000/000/004/original/ours.png",
        "custom_emojis/images/000/000/004/static/ours.png",
        "cache/preview_cards/images/000/000/005/original/card.jpg",
        "preview_cards/images/000/000/006/original/oldcard.jpg",
        "site_uploads/files/000/000/001/original/thumb.jpg",
        "site_uploads/files/000/000/001/@1x/thumb.png",
        "site_uploads/files/000/000/001/@2x/thumb.png",
        "site_uploads/files/000/000/002/original/mascot.svg",
        "backups/dumps/000/000/009/original/archive-20261124.zip",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The keys a bucket of the test S3 server holds, from its directory (s3s-fs keeps sidecar files
/// of its own apart).
fn bucket_keys(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
                if !rel.starts_with(".") && !rel.contains("/.") {
                    out.insert(rel);
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_copies_exactly_what_mastodon_references() {
    let Some(pg) = tokio::task::spawn_blocking(Postgres::start).await.unwrap() else {
        return;
    };
    pg.exec(SCHEMA).await;
    let (new, old) = two_buckets().await;
    // The old bucket holds every referenced file but one derived style (a video whose `small` was
    // never made), plus what Mastodon no longer references: an orphan and a deleted record's files.
    let mut in_old = expected();
    in_old.remove("cache/media_attachments/files/109/383/759/229/326/700/small/clip.png");
    for k in &in_old {
        old.put("old", k, k.as_bytes().to_vec(), "application/octet-stream")
            .await;
    }
    for orphan in [
        "media_attachments/files/000/000/008/original/orphan.png",
        "accounts/avatars/000/000/099/original/deleted.png",
    ] {
        old.put("old", orphan, b"orphan".to_vec(), "image/png")
            .await;
    }
    let dir = TempDir::new().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cache]\ndir = \"{}/cache\"\n\n{}{}",
            dir.path().display(),
            new.s3_upstream("new", "new")
                .replacen("\n\n", "\nacl = \"public-read\"\n\n", 1),
            old.s3_upstream("old", "old")
        ),
    )
    .unwrap();
    let url = pg.url();
    let (code, out, err) = mediaproxy(
        &cfg,
        &[
            "migrate",
            "--from",
            "old",
            "--to",
            "new",
            "--mastodon-db",
            &url,
        ],
    )
    .await;
    assert_eq!(
        code, 0,
        "a missing derived style is no failure: {out}\n{err}"
    );
    assert!(
        out.contains("copied 22, already there 0, missing 1, failed 0"),
        "{out}"
    );
    assert_eq!(
        bucket_keys(&new.root.path().join("new")),
        in_old,
        "exactly the referenced keys"
    );
    // User archives stay private whatever `acl` says; media get it.
    assert_eq!(
        new.acl(
            "new",
            "backups/dumps/000/000/009/original/archive-20261124.zip"
        )
        .as_deref(),
        Some("private")
    );
    assert_eq!(
        new.acl(
            "new",
            "media_attachments/files/000/000/007/original/old.png"
        )
        .as_deref(),
        Some("public-read")
    );

    // --since/--until split the work by id: only the rows in range.
    let url = pg.url();
    let (code, out, _) = mediaproxy(
        &cfg,
        &[
            "migrate",
            "--from",
            "old",
            "--to",
            "new",
            "--mastodon-db",
            &url,
            "--since",
            "3",
            "--until",
            "5",
            "--dry-run",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    // Emoji 3 and 4 (two keys each), card 5: all there already.
    assert!(out.contains("5 keys: copied 0, already there 5"), "{out}");

    // verify against the old bucket: everything the database references and the old bucket had.
    let url = pg.url();
    let (code, out, _) = mediaproxy(
        &cfg,
        &[
            "verify",
            "--upstream",
            "new",
            "--against",
            "old",
            "--mastodon-db",
            &url,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("23 keys: 22 present, 0 missing"), "{out}");

    // An unreachable database is bad usage (exit 2), named.
    let dead = format!("postgres://postgres@127.0.0.1:{}/postgres", closed_port());
    let (code, _, err) = mediaproxy(
        &cfg,
        &[
            "migrate",
            "--from",
            "old",
            "--to",
            "new",
            "--mastodon-db",
            &dead,
        ],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot reach Mastodon's database"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keyset_pages_cover_every_row() {
    let Some(pg) = tokio::task::spawn_blocking(Postgres::start).await.unwrap() else {
        return;
    };
    // 2,500 emoji rows (three pages), two keys each; a NULL file name in the middle counts for none.
    pg.exec(
        "CREATE TABLE custom_emojis (id bigint PRIMARY KEY, domain varchar, image_file_name varchar,
           image_content_type varchar);
         INSERT INTO custom_emojis SELECT g, NULL, 'e' || g || '.png', 'image/png' FROM generate_series(1, 2500) g;
         UPDATE custom_emojis SET image_file_name = NULL WHERE id = 1234;",
    )
    .await;
    let new = S3Server::start(&["new"], true).await;
    let dir = TempDir::new().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[local]\nroots = []\n\n[cache]\ndir = \"{}/cache\"\n\n{}",
            dir.path().display(),
            new.s3_upstream("new", "new")
        ),
    )
    .unwrap();
    let url = pg.url();
    let (code, out, err) = mediaproxy(
        &cfg,
        &[
            "verify",
            "--upstream",
            "new",
            "--mastodon-db",
            &url,
            "--concurrency",
            "32",
        ],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    // Originals are missing; derived styles (which a record may never have had) are counted apart.
    let tail = &out[out.len().saturating_sub(300)..];
    assert!(
        out.contains("4998 keys: 0 present, 2499 missing, 0 differ, 2499 absent"),
        "{tail}"
    );
    assert!(out.contains("missing custom_emojis/images/000/002/500/original/e2500.png"));
    assert!(out.contains("absent custom_emojis/images/000/002/500/static/e2500.png"));
    assert!(!out.contains("e1234.png"));
}
