//! Keys from Mastodon's own PostgreSQL: every row that has a file, table by table, in keyset pages
//! (`id > last ORDER BY id LIMIT 1000`: never a table in memory, and resumable after any row, which
//! `--offset` arithmetic is not once rows are added or deleted between runs). Columns that older
//! schemas lack are found in `information_schema` and treated as absent.

use std::collections::{HashMap, HashSet};

use tokio_postgres::types::ToSql;

use super::mastodon::{keys_of, Attachment, Styles};
use super::{Entry, Item, Keys, KeysError, Mark};

const PAGE: i64 = 1000;

/// Where a record's remoteness (and so `cache/`) comes from.
#[derive(Clone, Copy)]
enum Remoteness {
    Never,
    Always,
    /// `domain IS NOT NULL` (accounts, custom emoji).
    Domain,
    /// `remote_url <> ''` (media attachments).
    Url,
}

/// One attachment of one table.
struct Spec {
    table: &'static str,
    /// Column prefix: `file`, `avatar`, …
    att: &'static str,
    stem: &'static str,
    styles: Styles,
    remote: Remoteness,
}

const SPECS: [Spec; 11] = [
    Spec {
        table: "media_attachments",
        att: "file",
        stem: "media_attachments/files",
        styles: Styles::MediaFile,
        remote: Remoteness::Url,
    },
    Spec {
        table: "media_attachments",
        att: "thumbnail",
        stem: "media_attachments/thumbnails",
        styles: Styles::Original,
        remote: Remoteness::Url,
    },
    Spec {
        table: "accounts",
        att: "avatar",
        stem: "accounts/avatars",
        styles: Styles::StaticIfGif,
        remote: Remoteness::Domain,
    },
    Spec {
        table: "accounts",
        att: "header",
        stem: "accounts/headers",
        styles: Styles::StaticIfGif,
        remote: Remoteness::Domain,
    },
    Spec {
        table: "custom_emojis",
        att: "image",
        stem: "custom_emojis/images",
        styles: Styles::Static,
        remote: Remoteness::Domain,
    },
    Spec {
        table: "preview_cards",
        att: "image",
        stem: "preview_cards/images",
        styles: Styles::Original,
        remote: Remoteness::Always,
    },
    Spec {
        table: "preview_card_providers",
        att: "icon",
        stem: "preview_card_providers/icons",
        styles: Styles::Static,
        remote: Remoteness::Never,
    },
    // site_uploads' styles depend on `var`; the spec's styles are replaced per row.
    Spec {
        table: "site_uploads",
        att: "file",
        stem: "site_uploads/files",
        styles: Styles::Original,
        remote: Remoteness::Never,
    },
    Spec {
        table: "backups",
        att: "dump",
        stem: "backups/dumps",
        styles: Styles::Original,
        remote: Remoteness::Never,
    },
    Spec {
        table: "imports",
        att: "data",
        stem: "imports/data",
        styles: Styles::Original,
        remote: Remoteness::Never,
    },
    // Kept last so the index of the others never moves in saved states.
    Spec {
        table: "",
        att: "",
        stem: "",
        styles: Styles::Original,
        remote: Remoteness::Never,
    },
];

/// How to reach the database.
#[derive(Clone)]
pub struct Db {
    pub config: tokio_postgres::Config,
    /// Only ids from `since` to `until` (inclusive), to split a migration across machines.
    pub since: Option<i64>,
    pub until: Option<i64>,
}

impl Db {
    /// Connects once, so an unreachable database is reported before any work starts.
    pub async fn check(&self) -> Result<(), String> {
        let (client, conn) = self
            .config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| error_text(&e))?;
        let task = tokio::spawn(conn);
        let r = client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| error_text(&e));
        drop(client);
        let _ = task.await;
        r.map(|_| ())
    }
}

fn error_text(e: &tokio_postgres::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Every stored key of every row with a file, after `resume`.
pub fn mastodon_db(db: Db, resume: Option<Mark>) -> Keys {
    let (tx, rx) = tokio::sync::mpsc::channel(2 * PAGE as usize);
    tokio::spawn(async move {
        let end = match produce(&db, resume, &tx).await {
            Ok(()) => Ok(None),
            Err(e) => Err(e),
        };
        let _ = tx.send(end).await;
    });
    super::received(rx, "the Mastodon database")
}

fn db_error(e: &tokio_postgres::Error) -> KeysError {
    KeysError::Listing {
        upstream: "the Mastodon database".into(),
        why: error_text(e),
    }
}

async fn produce(
    db: &Db,
    resume: Option<Mark>,
    tx: &tokio::sync::mpsc::Sender<Result<Option<Entry>, KeysError>>,
) -> Result<(), KeysError> {
    let (client, conn) = db
        .config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| db_error(&e))?;
    tokio::spawn(conn);
    let tables: Vec<&str> = SPECS
        .iter()
        .map(|s| s.table)
        .filter(|t| !t.is_empty())
        .collect();
    let rows = client
        .query(
            "SELECT table_name::text, column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = ANY($1)",
            &[&tables],
        )
        .await
        .map_err(|e| db_error(&e))?;
    let mut columns: HashMap<String, HashSet<String>> = HashMap::new();
    for r in rows {
        columns.entry(r.get(0)).or_default().insert(r.get(1));
    }
    let (start_spec, start_after) = match resume {
        Some(Mark::Db { spec, after }) => (spec, after),
        _ => (0, i64::MIN),
    };
    for (index, spec) in SPECS.iter().enumerate().skip(start_spec) {
        if spec.table.is_empty() {
            continue;
        }
        let Some(cols) = columns.get(spec.table) else {
            tracing::info!(
                table = spec.table,
                "table not in this schema (an older Mastodon): skipped"
            );
            continue;
        };
        let name_col = format!("{}_file_name", spec.att);
        if !cols.contains(&name_col) {
            continue;
        }
        if !cols.contains("id") {
            tracing::warn!(table = spec.table, "table without an id column: skipped");
            continue;
        }
        let opt = |c: String| {
            if cols.contains(&c) {
                c
            } else {
                "NULL".to_string()
            }
        };
        let ctype = opt(format!("{}_content_type", spec.att));
        let version = opt(format!("{}_storage_schema_version", spec.att));
        let remote = match spec.remote {
            Remoteness::Never => "false".to_string(),
            Remoteness::Always => "true".to_string(),
            Remoteness::Domain if cols.contains("domain") => "(domain IS NOT NULL)".to_string(),
            Remoteness::Url if cols.contains("remote_url") => {
                "(COALESCE(remote_url, '') <> '')".to_string()
            }
            _ => "false".to_string(),
        };
        let var = if spec.table == "site_uploads" && cols.contains("var") {
            "var::text"
        } else {
            "NULL::text"
        };
        let until = db
            .until
            .map_or(String::new(), |u| format!(" AND id <= {u}"));
        let sql = format!(
            "SELECT id::bigint, {name_col}::text, {ctype}::text, COALESCE({version}::int, 0), {remote}, {var} \
             FROM {table} WHERE id > $1::bigint AND COALESCE({name_col}, '') <> ''{until} ORDER BY id LIMIT {PAGE}",
            table = spec.table
        );
        let mut last = if index == start_spec {
            start_after
        } else {
            db.since.map_or(i64::MIN, |s| s.saturating_sub(1))
        };
        if let Some(s) = db.since {
            last = last.max(s.saturating_sub(1));
        }
        loop {
            let params: [&(dyn ToSql + Sync); 1] = [&last];
            let page = client
                .query(&sql, &params)
                .await
                .map_err(|e| db_error(&e))?;
            let n = page.len() as i64;
            for row in page {
                let id: i64 = row.get(0);
                let name: String = row.get(1);
                let content_type: Option<String> = row.get(2);
                let version: i32 = row.get(3);
                let remote: bool = row.get(4);
                let var: Option<String> = row.get(5);
                let styles = match (spec.table, var.as_deref()) {
                    ("site_uploads", Some("thumbnail")) => Styles::SiteThumbnail,
                    ("site_uploads", Some("favicon")) => Styles::SiteFavicon,
                    ("site_uploads", Some("app_icon")) => Styles::SiteAppIcon,
                    _ => spec.styles,
                };
                let att = Attachment {
                    stem: spec.stem,
                    id,
                    file_name: &name,
                    content_type: content_type.as_deref(),
                    cached: remote && version >= 1,
                    styles,
                };
                let keys = keys_of(&att);
                let count = keys.len();
                for (i, (key, _original)) in keys.into_iter().enumerate() {
                    // Only the row's last key says "this row is done": a run killed between two
                    // keys of one row does the whole row again (copies are idempotent).
                    let after = if i + 1 == count { id } else { id - 1 };
                    let item = Item {
                        key,
                        size: None,
                        mark: Mark::Db { spec: index, after },
                    };
                    if tx.send(Ok(Some(Entry::Key(item)))).await.is_err() {
                        return Ok(());
                    }
                }
                last = id;
            }
            if n < PAGE {
                break;
            }
        }
    }
    Ok(())
}
