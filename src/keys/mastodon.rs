//! From Mastodon's database rows to every object key Mastodon stored for them (FIELD-NOTES, "From a
//! database row to its keys", checked against Mastodon 4.6's source and kt-paperclip):
//! `[cache/]<class>/<attachment>/<id_partition>/<style>/<filename>`.
//!
//! This file is the pure part (a row in, keys out), so every rule is unit-tested; `keys::mastodon_db`
//! reads the rows.

use crate::key::{self, Key};

/// One attachment of one row, as read from the database.
#[derive(Debug, Clone)]
pub struct Attachment<'a> {
    /// `media_attachments/files`, `accounts/avatars`, …
    pub stem: &'a str,
    pub id: i64,
    pub file_name: &'a str,
    pub content_type: Option<&'a str>,
    /// A remote record whose `<attachment>_storage_schema_version >= 1`: stored under `cache/`.
    pub cached: bool,
    /// Extra styles beyond `original`, by the table's rules.
    pub styles: Styles,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Styles {
    /// `original` only (thumbnails, preview cards, backups, imports).
    Original,
    /// media_attachments.file: `small` by content type.
    MediaFile,
    /// accounts avatar/header: `static/<base>.png` for a GIF.
    StaticIfGif,
    /// custom_emojis, preview_card_providers: always `static/<base>.png`.
    Static,
    /// site_uploads, by `var`.
    SiteThumbnail,
    SiteFavicon,
    SiteAppIcon,
}

/// kt-paperclip's `:id_partition`: `%09d` below 1e9, else `%012d`, then `scan(/\d{3}/)` joined by `/`:
/// groups of three from the left, a shorter rest dropped (`1` → `000/000/001`; an 18-digit snowflake
/// gives six groups).
pub fn id_partition(id: i64) -> String {
    let digits = if id < 1_000_000_000 {
        format!("{id:09}")
    } else {
        format!("{id:012}")
    };
    digits
        .as_bytes()
        .chunks_exact(3)
        .map(|c| std::str::from_utf8(c).expect("ascii digits"))
        .collect::<Vec<_>>()
        .join("/")
}

/// The file name without its extension, as Paperclip's `:basename`.
fn base(file_name: &str) -> &str {
    match file_name.rfind('.') {
        Some(dot) if dot > 0 => &file_name[..dot],
        _ => file_name,
    }
}

const APP_ICON_SIZES: [&str; 18] = [
    "57", "60", "72", "76", "114", "120", "144", "152", "167", "180", "1024", "36", "48", "96",
    "192", "256", "384", "512",
];

/// Every key stored for `a`, with whether it is the `original` (a missing original is a lost file; a
/// missing derived style may never have existed).
pub fn keys_of(a: &Attachment<'_>) -> Vec<(Key, bool)> {
    if a.file_name.is_empty() || a.id < 0 {
        return Vec::new();
    }
    let prefix = format!(
        "{}{}/{}",
        if a.cached { "cache/" } else { "" },
        a.stem,
        id_partition(a.id)
    );
    let png = format!("{}.png", base(a.file_name));
    let mut styles: Vec<(String, String)> = vec![("original".into(), a.file_name.to_string())];
    match a.styles {
        Styles::Original => {}
        Styles::MediaFile => match a.content_type.unwrap_or("") {
            "image/jpeg" | "image/png" | "image/webp" => {
                styles.push(("small".into(), a.file_name.to_string()))
            }
            "image/heic" | "image/heif" | "image/avif" => {
                styles.push(("small".into(), format!("{}.jpeg", base(a.file_name))))
            }
            "image/gif" | "video/mp4" | "video/webm" | "video/quicktime" | "video/ogg" => {
                styles.push(("small".into(), png.clone()))
            }
            _ => {}
        },
        Styles::StaticIfGif => {
            if a.content_type == Some("image/gif") {
                styles.push(("static".into(), png.clone()));
            }
        }
        Styles::Static => styles.push(("static".into(), png.clone())),
        Styles::SiteThumbnail => {
            for s in ["@1x", "@2x"] {
                styles.push((s.into(), png.clone()));
            }
        }
        Styles::SiteFavicon => {
            for s in ["16", "32", "48"] {
                styles.push((s.into(), png.clone()));
            }
        }
        Styles::SiteAppIcon => {
            for s in APP_ICON_SIZES {
                styles.push((s.into(), png.clone()));
            }
        }
    }
    styles
        .into_iter()
        .filter_map(|(style, name)| {
            let original = style == "original";
            // A file name no request could ask for (a `/` in it, say) is no key.
            key::from_raw(&format!("{prefix}/{style}/{name}"))
                .ok()
                .map(|k| (k, original))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(
        stem: &'static str,
        id: i64,
        name: &'static str,
        ctype: Option<&'static str>,
        cached: bool,
        styles: Styles,
    ) -> Attachment<'static> {
        Attachment {
            stem,
            id,
            file_name: name,
            content_type: ctype,
            cached,
            styles,
        }
    }

    fn strings(a: &Attachment<'_>) -> Vec<String> {
        keys_of(a)
            .into_iter()
            .map(|(k, _)| k.as_str().to_string())
            .collect()
    }

    #[test]
    fn id_partitions() {
        assert_eq!(id_partition(1), "000/000/001");
        assert_eq!(id_partition(123_456_789), "123/456/789");
        assert_eq!(id_partition(1_000_000_000), "001/000/000/000");
        assert_eq!(
            id_partition(109_372_749_281_530_624),
            "109/372/749/281/530/624"
        );
        // Ruby's scan(/\d{3}/) drops a shorter rest.
        assert_eq!(id_partition(1_234_567_890_123), "123/456/789/012");
    }

    #[test]
    fn media_attachments_by_content_type_and_remoteness() {
        let snowflake = 109_383_759_229_326_700;
        assert_eq!(
            strings(&att(
                "media_attachments/files",
                snowflake,
                "x.png",
                Some("image/png"),
                false,
                Styles::MediaFile
            )),
            [
                "media_attachments/files/109/383/759/229/326/700/original/x.png",
                "media_attachments/files/109/383/759/229/326/700/small/x.png"
            ]
        );
        assert_eq!(
            strings(&att(
                "media_attachments/files",
                5,
                "v.mp4",
                Some("video/mp4"),
                true,
                Styles::MediaFile
            )),
            [
                "cache/media_attachments/files/000/000/005/original/v.mp4",
                "cache/media_attachments/files/000/000/005/small/v.png"
            ]
        );
        assert_eq!(
            strings(&att(
                "media_attachments/files",
                5,
                "p.heic",
                Some("image/heic"),
                false,
                Styles::MediaFile
            ))[1],
            "media_attachments/files/000/000/005/small/p.jpeg"
        );
        assert_eq!(
            strings(&att(
                "media_attachments/files",
                5,
                "a.mp3",
                Some("audio/mpeg"),
                false,
                Styles::MediaFile
            ))
            .len(),
            1,
            "no small for audio"
        );
        assert!(keys_of(&att(
            "media_attachments/files",
            5,
            "",
            None,
            false,
            Styles::MediaFile
        ))
        .is_empty());
        assert!(keys_of(&att(
            "accounts/avatars",
            -99,
            "a.png",
            None,
            false,
            Styles::StaticIfGif
        ))
        .is_empty());
    }

    #[test]
    fn avatars_emoji_and_site_uploads() {
        assert_eq!(
            strings(&att(
                "accounts/avatars",
                1,
                "a.gif",
                Some("image/gif"),
                false,
                Styles::StaticIfGif
            )),
            [
                "accounts/avatars/000/000/001/original/a.gif",
                "accounts/avatars/000/000/001/static/a.png"
            ]
        );
        assert_eq!(
            strings(&att(
                "accounts/headers",
                1,
                "h.jpg",
                Some("image/jpeg"),
                false,
                Styles::StaticIfGif
            ))
            .len(),
            1
        );
        assert_eq!(
            strings(&att(
                "custom_emojis/images",
                7,
                "blob.png",
                Some("image/png"),
                true,
                Styles::Static
            )),
            [
                "cache/custom_emojis/images/000/000/007/original/blob.png",
                "cache/custom_emojis/images/000/000/007/static/blob.png"
            ]
        );
        let thumb = strings(&att(
            "site_uploads/files",
            1,
            "t.jpg",
            None,
            false,
            Styles::SiteThumbnail,
        ));
        assert_eq!(
            thumb[1..],
            [
                "site_uploads/files/000/000/001/@1x/t.png",
                "site_uploads/files/000/000/001/@2x/t.png"
            ]
        );
        assert_eq!(
            strings(&att(
                "site_uploads/files",
                1,
                "f.ico",
                None,
                false,
                Styles::SiteFavicon
            ))
            .len(),
            4
        );
        assert_eq!(
            strings(&att(
                "site_uploads/files",
                1,
                "i.png",
                None,
                false,
                Styles::SiteAppIcon
            ))
            .len(),
            19
        );
        let originals: Vec<bool> = keys_of(&att(
            "custom_emojis/images",
            7,
            "b.png",
            None,
            false,
            Styles::Static,
        ))
        .into_iter()
        .map(|(_, o)| o)
        .collect();
        assert_eq!(originals, [true, false]);
    }
}
