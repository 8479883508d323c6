//! Mastodon's `.env.production`, read as dotenv reads it: `KEY=value` lines, `export KEY=value`,
//! `#` comments (whole lines, or after an unquoted value), values in single quotes (taken literally)
//! or double quotes (`\n`, `\"` and `\\` unescaped). Used by `init` and by `--mastodon-env`.

use std::collections::HashMap;
use std::path::Path;

pub fn read(path: &Path) -> std::io::Result<HashMap<String, String>> {
    Ok(parse(&std::fs::read_to_string(path)?))
}

pub fn parse(text: &str) -> HashMap<String, String> {
    let mut vars = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            continue;
        }
        vars.insert(key.to_string(), value(raw.trim()));
    }
    vars
}

fn value(raw: &str) -> String {
    if let Some(rest) = raw.strip_prefix('\'') {
        return rest.split('\'').next().unwrap_or_default().to_string();
    }
    if let Some(rest) = raw.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(other) => out.push(other),
                    None => break,
                },
                c => out.push(c),
            }
        }
        return out;
    }
    // Unquoted: a ` #` starts a comment.
    let end = raw.find(" #").unwrap_or(raw.len());
    raw[..end].trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_forms_dotenv_accepts() {
        let vars = parse(
            "# comment\nS3_ENABLED=true\nexport S3_BUCKET=\"files.example\"\nS3_REGION='eu-west-1'\n\
             AWS_SECRET_ACCESS_KEY=\"a\\\"b\\\\c\"\nS3_ALIAS_HOST=files.example.org # the CDN\nEMPTY=\n  SPACED = v \n",
        );
        assert_eq!(vars["S3_ENABLED"], "true");
        assert_eq!(vars["S3_BUCKET"], "files.example");
        assert_eq!(vars["S3_REGION"], "eu-west-1");
        assert_eq!(vars["AWS_SECRET_ACCESS_KEY"], "a\"b\\c");
        assert_eq!(vars["S3_ALIAS_HOST"], "files.example.org");
        assert_eq!(vars["EMPTY"], "");
        assert_eq!(vars["SPACED"], "v");
        assert!(!vars.contains_key("# comment"));
    }
}
