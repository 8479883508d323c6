//! `mediaproxy check` and config errors, as an admin sees them on the terminal.

use std::process::Command;

use crate::common::*;

fn check(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    // The local side too (at the end, so line numbers in errors stay the test's).
    let mut config = config.to_string();
    if !config.contains("[local]") {
        config.push_str(
            "
[local]
roots = []
",
        );
    }
    if !config.contains("[cache]") {
        config.push_str(&format!(
            "
[cache]
dir = \"{}/cache\"\n",
            dir.path().display()
        ));
    }
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mediaproxy"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn config_mistakes_name_the_key_and_line() {
    let cases: &[(&str, &[&str])] = &[
        ("[server]\nlisten = [\"127.0.0.1:1\"]\nlisen = 1\n", &["lisen", "line 3"]),
        ("[cache]\nttl_ok = \"ninety days\"\n", &["ttl_ok", "line 2", "duration"]),
        ("[cache]\nmax_size = \"20 bananas\"\n", &["max_size", "line 2", "size"]),
        ("[[upstream]]\ntype = \"http\"\nurl = \"http://127.0.0.1:1\"\n", &["upstream[1].name", "required"]),
        (
            "[[upstream]]\nname = \"a\"\ntype = \"http\"\nurl = \"http://127.0.0.1:1\"\n\n[[upstream]]\nname = \"a\"\ntype = \"http\"\nurl = \"http://127.0.0.1:2\"\n",
            &["upstream[2].name", "duplicate", "line 7"],
        ),
        (
            "[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"b\"\naccess_key_id = \"AK\"\nsecret_access_key_file = \"/nonexistent/secret\"\n",
            &["upstream[1].secret_access_key_file", "/nonexistent/secret"],
        ),
        ("[[upstream]]\nname = \"s\"\ntype = \"ftp\"\n", &["upstream[1].type", "ftp"]),
        ("[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"not a url\"\nbucket = \"b\"\n", &["upstream[1].endpoint"]),
        ("[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"http://x\"\n", &["upstream[1].bucket", "required"]),
        ("[[upstream]]\nname = \"s\"\ntype = \"http\"\nurl = \"http://x\"\ncopy_mising = true\n", &["copy_mising", "line 5"]),
        ("[server]\npath_prefix = \"storage/\"\n", &["server.path_prefix"]),
        ("[server]\nlisten = [\"localhost\"]\n", &["listen", "line 2"]),
        ("[server\n", &["line 1"]),
    ];
    for (config, expected) in cases {
        let (code, text) = check(config);
        assert_eq!(code, 1, "{config}\n{text}");
        for e in *expected {
            assert!(
                text.contains(e),
                "expected {e:?} in:\n{text}\nfor config:\n{config}"
            );
        }
    }
}

/// A config as admins write them (comments, blank lines, several upstreams): each mistake is reported
/// on the line of the key at fault, not on the table's first line or the blank line before it.
#[test]
fn validation_errors_name_the_line_of_the_key() {
    let base = r#"# mediaproxy for files.example.org
[server]
listen = ["127.0.0.1:1"]
path_prefix = ""

[cache]
max_size = "1GiB"
# bigger objects stream through
max_object_size = "100MiB"

[[upstream]]
name = "new"
type = "s3"
endpoint = "http://127.0.0.1:1"
bucket = "media"
# the secret
access_key_id = "AK"
secret_access_key = "x"
copy_missing = true

[[upstream]]
# the old bucket
name = "old"
type = "http"
url = "http://127.0.0.1:2"
"#;
    // (what to change, the line it ends up on, what the message must say)
    let cases: &[(&str, &str, &str)] = &[
        (
            "secret_access_key = \"x\"",
            "secret_access_key_file = \"/nonexistent/new.secret\"",
            "upstream[1].secret_access_key_file",
        ),
        ("name = \"old\"", "name = \"new\"", "upstream[2].name"),
        (
            "max_object_size = \"100MiB\"",
            "max_object_size = \"900MiB\"",
            "cache.max_object_size",
        ),
        (
            "path_prefix = \"\"",
            "path_prefix = \"storage/\"",
            "server.path_prefix",
        ),
        (
            "url = \"http://127.0.0.1:2\"",
            "url = \"http://127.0.0.1:2\"\nbucket = \"b\"",
            "upstream[2].bucket",
        ),
        (
            "url = \"http://127.0.0.1:2\"",
            "url = \"ftp://127.0.0.1:2\"",
            "upstream[2].url",
        ),
    ];
    for (from, to, key) in cases {
        assert!(base.contains(from), "{from}");
        let config = base.replacen(from, to, 1);
        // The mistake is on the first line that differs from the good file.
        let at = (0..)
            .find(|&i| config.lines().nth(i) != base.lines().nth(i))
            .expect("a changed line")
            + 1;
        let (code, text) = check(&config);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains(&format!("line {at}: `{key}`")),
            "expected line {at} for {key} in:\n{text}"
        );
    }
}

#[test]
fn secrets_never_appear_in_errors() {
    let config = "[[upstream]]\nname = \"s\"\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"b\"\naccess_key_id = \"AK\"\nsecret_access_key = \"hunter2-very-secret\"\nbogus = 1\n";
    let (code, text) = check(config);
    assert_eq!(code, 1);
    assert!(!text.contains("hunter2-very-secret"), "{text}");
    let (_, text) = check(&config.replace("bogus = 1\n", "connect_timeout = \"1s\"\n"));
    assert!(!text.contains("hunter2-very-secret"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_probes_every_upstream() {
    let s3 = S3Server::start(&["media"], true).await;
    let public = S3Server::start(&["pub"], false).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("b.secret");
    std::fs::write(&secret_file, format!("{SECRET_KEY}\n")).unwrap();
    let good = s3.s3_upstream("good", "media").replace(
        &format!("secret_access_key = \"{SECRET_KEY}\""),
        &format!("secret_access_key_file = \"{}\"", secret_file.display()),
    );
    let config = format!("{good}{}", public.http_upstream("public", "pub"));
    let (code, text) = tokio::task::spawn_blocking(move || check(&config))
        .await
        .unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("OK   good") && text.contains("OK   public"),
        "{text}"
    );
    assert!(!text.contains(SECRET_KEY));

    let bad_secret = s3
        .s3_upstream("badkey", "media")
        .replace(SECRET_KEY, "nope");
    let dead = format!(
        "[[upstream]]\nname = \"dead\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{}\"\n",
        refused_port()
    );
    let nxdomain =
        "[[upstream]]\nname = \"nx\"\ntype = \"http\"\nurl = \"http://bucket.invalid\"\n";
    let config = format!(
        "{}{bad_secret}{dead}{nxdomain}",
        s3.s3_upstream("good", "media")
    );
    let (code, text) = tokio::task::spawn_blocking(move || check(&config))
        .await
        .unwrap();
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("OK   good"), "{text}");
    assert!(
        text.contains("FAIL badkey") && text.contains("SignatureDoesNotMatch"),
        "{text}"
    );
    assert!(
        text.contains("FAIL dead") && text.contains("connect"),
        "{text}"
    );
    assert!(text.contains("FAIL nx") && text.contains("DNS"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_tells_whether_the_copy_target_takes_writes_and_conditional_puts() {
    let s3 = S3Server::start(&["media", "sloppy"], true).await;
    let target = |bucket: &str| s3.s3_target("new", bucket, "");
    let config = target("media");
    let (code, text) = tokio::task::spawn_blocking(move || check(&config))
        .await
        .unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("OK   new") && text.contains("writable"),
        "{text}"
    );
    assert!(text.contains("honours If-None-Match"), "{text}");
    let left: Vec<_> = std::fs::read_dir(s3.root.path().join("media"))
        .unwrap()
        .flatten()
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .collect();
    assert!(left.is_empty(), "the probe object was deleted: {left:?}");

    // An access key that may read but not write: reads look fine, every copy would fail.
    s3.set_read_only(true);
    let config = target("media");
    let (code, text) = tokio::task::spawn_blocking(move || check(&config))
        .await
        .unwrap();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("FAIL new")
            && text.contains("refuses writes")
            && text.contains("AccessDenied"),
        "{text}"
    );

    s3.set_read_only(false);
    s3.ignore_conditional_puts();
    let config = target("sloppy");
    let (code, text) = tokio::task::spawn_blocking(move || check(&config))
        .await
        .unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("IGNORES If-None-Match"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_fails_a_bucket_that_does_not_exist() {
    let s3 = S3Server::start(&["media"], true).await;
    let config = s3.s3_upstream("typo", "medai");
    let (code, text) = tokio::task::spawn_blocking(move || check(&config))
        .await
        .unwrap();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("FAIL typo") && text.contains("NoSuchBucket"),
        "{text}"
    );
}

/// `check` names what the bucket said about the credentials and permissions, rather than "ok" for a key
/// that could never read a thing.
#[tokio::test(flavor = "multi_thread")]
async fn check_names_credential_and_permission_refusals() {
    let s3 = S3Server::start(&["media"], true).await;
    let run = |config: String| async move {
        tokio::task::spawn_blocking(move || check(&config))
            .await
            .unwrap()
    };
    // An access key the provider does not know (this server says NotSignedUp; AWS, InvalidAccessKeyId).
    let (code, text) = run(s3
        .s3_upstream("wrongkey", "media")
        .replace(ACCESS_KEY, "AKIANOBODY"))
    .await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("FAIL wrongkey") && text.contains("NotSignedUp"),
        "{text}"
    );
    assert!(!text.contains(SECRET_KEY), "{text}");

    // May list the bucket but not read objects: every media request would be a 403.
    s3.set_no_reads(true);
    let (code, text) = run(s3.s3_upstream("noread", "media")).await;
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("FAIL noread")
            && text.contains("AccessDenied")
            && text.contains("s3:GetObject"),
        "{text}"
    );
    s3.set_no_reads(false);

    // May read but not list: a missing key answers AccessDenied, which is how S3 says "not found" to
    // such a key. Reads work, so this passes, and says why.
    s3.set_no_list(true);
    let (code, text) = run(s3.s3_upstream("nolist", "media")).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("OK   nolist") && text.contains("s3:ListBucket"),
        "{text}"
    );
}

#[test]
fn check_offline_validates_the_local_side_without_the_network() {
    let root = mastodon_root();
    let etc = tempfile::tempdir().unwrap();
    let secret = etc.path().join("s3.secret");
    std::fs::write(&secret, "shh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let upstream = format!(
        "[[upstream]]\nname = \"far\"\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:{}\"\nbucket = \"b\"\nregion = \"us-east-1\"\naccess_key_id = \"AKIA\"\nsecret_access_key_file = \"{}\"\n",
        refused_port(),
        secret.display()
    );
    let good = format!(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\nadmin_listen = \"127.0.0.1:9901\"\n\n[local]\nroots = [\"{}\"]\n\n{upstream}",
        root.path().display()
    );
    let run_with = |config: &str, offline: bool, cache: bool| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        let config = if cache {
            format!(
                "{config}\n[cache]\ndir = \"{}/cache\"\n",
                dir.path().display()
            )
        } else {
            config.to_string()
        };
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mediaproxy"));
        cmd.args(["check", "--config"]).arg(&path);
        if offline {
            cmd.arg("--offline");
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    };
    let run = |config: &str, offline: bool| run_with(config, offline, true);
    let run_as_is = |config: &str| run_with(config, true, false);
    // The bucket is unreachable, but --offline does not ask it.
    let (code, text) = run(&good, true);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("OK   root"), "{text}");
    assert!(!text.contains("far"), "no upstream probed offline:\n{text}");
    assert!(
        text.contains("readable by every user"),
        "a world-readable secret is a warning:\n{text}"
    );
    // Without --offline the same file fails on the bucket.
    assert_eq!(run(&good, false).0, 1);
    // A root that does not exist, colliding listeners, a broken file.
    let missing = good.replace(
        &root.path().display().to_string(),
        "/nonexistent/public/system",
    );
    let (code, text) = run(&missing, true);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("local.roots"), "{text}");
    // A cache dir that cannot be written (nobody may create files in /proc, root included), or whose
    // parent is a file.
    let file = etc.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    for dir in [
        "/proc/mediaproxy-cache".to_string(),
        format!("{}/cache", file.display()),
    ] {
        let unwritable = format!("{good}\n[cache]\ndir = \"{dir}\"\n");
        let (code, text) = run_as_is(&unwritable);
        assert_eq!(code, 1, "{text}");
        assert!(
            text.contains("FAIL cache") && text.contains("cache.dir"),
            "{text}"
        );
    }
    let clash = good.replace("127.0.0.1:9901", "127.0.0.1:8080");
    let (code, text) = run(&clash, true);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("collides"), "{text}");
    let (code, _) = run(&good.replace("[local]", "[local"), true);
    assert_ne!(
        code, 0,
        "a broken file fails the check, so a reload after it does not happen"
    );
}

#[test]
fn cache_stats_on_a_directory_that_does_not_exist_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[local]\nroots = []\n[cache]\ndir = \"/nonexistent/mediaproxy-cache\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mediaproxy"))
        .args(["cache", "stats", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/nonexistent/mediaproxy-cache") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn a_port_in_use_is_said_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"{addr}\"]\n[local]\nroots = []\n[cache]\ndir = \"{}/cache\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mediaproxy"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains(&addr.to_string()), "{err}");
    assert_eq!(last.matches("in use").count(), 1, "said once: {last}");
}

#[test]
fn an_address_error_shows_the_value_and_the_form_expected() {
    let (code, text) = check("[server]\nlisten = [\":8080\"]\n");
    assert_ne!(code, 0);
    assert!(
        text.contains("line 2") && text.contains("\":8080\"") && text.contains("127.0.0.1:8080"),
        "{text}"
    );
    let (_, text) = check("[server]\nadmin_listen = \"localhost:9901\"\n");
    assert!(
        text.contains("server.admin_listen") && text.contains("\"localhost:9901\""),
        "{text}"
    );
}

#[test]
fn cache_commands_need_no_upstream_secret() {
    // The secret file is not readable here (it does not even exist): `cache stats` works anyway.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cache")).unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[local]\nroots = []\n[cache]\ndir = \"{}/cache\"\n\n[[upstream]]\nname = \"b\"\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"b\"\nregion = \"us-east-1\"\naccess_key_id = \"AKIA\"\nsecret_access_key_file = \"/root-only/s3.secret\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mediaproxy"))
        .args(["cache", "stats", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("entries  0"), "{text}");
}
