//! Which line of the file an error is about. The TOML parser knows the line of what it could not parse;
//! the checks after it know only the key (`upstream[2].secret_access_key_file`), so the key is looked
//! up in the text: the line that sets it, or the header of its table when the key is missing.

use super::ConfigError;

pub(super) fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let msg = e.message().to_string();
    // serde names the field for unknown keys; for type errors the span points at the value, so take
    // the key from the text of that line.
    let key = msg
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next())
        .map(str::to_string)
        .or_else(|| {
            let l = text.lines().nth(line? - 1)?;
            let k = l.split('=').next()?.trim();
            (!k.is_empty() && !k.starts_with('[')).then(|| k.to_string())
        })
        .unwrap_or_else(|| "(syntax)".into());
    let key = match (key.as_str(), line.and_then(|l| table_at(text, l))) {
        ("(syntax)", _) | (_, None) => key,
        (_, Some(table)) => format!("{table}.{key}"),
    };
    ConfigError::invalid(key, line, msg)
}

/// The table that line `line` (1-based) belongs to, as the other errors name it: `cache`,
/// `server.tls`, `upstream[2]` (the second `[[upstream]]`).
fn table_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().take(line).collect();
    let (at, header) = lines
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, l)| l.trim_start().starts_with('[').then_some((i, l.trim())))?;
    let header = header.split('#').next().unwrap_or(header).trim();
    if let Some(name) = header.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
        let name = name.trim();
        let nth = lines[..=at]
            .iter()
            .filter(|l| {
                l.trim()
                    .strip_prefix("[[")
                    .and_then(|h| h.split("]]").next())
                    .is_some_and(|h| h.trim() == name)
            })
            .count();
        return Some(format!("{name}[{nth}]"));
    }
    let name = header.strip_prefix('[')?.split(']').next()?.trim();
    Some(name.to_string())
}

/// The line (1-based) that sets `key` (`cache.max_size`, `upstream[2].bucket`, `server.tls.cert`), or
/// the header of its table when the key is not in the file; `None` when the table is not either.
pub(super) fn locate(text: &str, key: &str) -> Option<usize> {
    let (table, leaf) = key.rsplit_once('.')?;
    let (name, nth) = match table.strip_suffix(']').and_then(|t| t.split_once('[')) {
        Some((name, n)) => (name, Some(n.parse::<usize>().ok()?)),
        None => (table, None),
    };
    let mut seen = 0;
    let mut inside = false;
    let mut header = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.split('#').next().unwrap_or("").trim();
        if let Some(after) = t.strip_prefix('[') {
            let (array, inner) = match after.strip_prefix('[') {
                Some(rest) => (true, rest.split("]]").next()),
                None => (false, after.split(']').next()),
            };
            let inner = inner.unwrap_or("").trim();
            inside = inner == name
                && match nth {
                    Some(n) => {
                        seen += usize::from(array);
                        array && seen == n
                    }
                    None => !array,
                };
            if inside {
                header = Some(i + 1);
            }
            continue;
        }
        if !inside {
            continue;
        }
        let Some((k, _)) = t.split_once('=') else {
            continue;
        };
        if k.trim().trim_matches('"') == leaf {
            return Some(i + 1);
        }
    }
    header
}

#[cfg(test)]
mod tests {
    use super::locate;

    #[test]
    fn finds_the_line_that_sets_a_key_or_its_table() {
        let text = "# comment\n[server]\nlisten = [\"127.0.0.1:1\"]\n\n[[upstream]]\nname = \"a\"\n\n[[upstream]] # second\nname = \"b\"\n  \"bucket\" = \"x\"\n[server.tls]\ncert = \"c\"\n";
        assert_eq!(locate(text, "server.listen"), Some(3));
        assert_eq!(locate(text, "upstream[1].name"), Some(6));
        assert_eq!(locate(text, "upstream[2].name"), Some(9));
        assert_eq!(locate(text, "upstream[2].bucket"), Some(10));
        assert_eq!(
            locate(text, "upstream[1].bucket"),
            Some(5),
            "missing: its table's header"
        );
        assert_eq!(locate(text, "server.tls.cert"), Some(12));
        assert_eq!(locate(text, "cache.max_size"), None);
        assert_eq!(locate(text, "upstream[3].name"), None);
    }
}
