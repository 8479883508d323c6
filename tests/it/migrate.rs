//! `mediaproxy migrate` and `verify` through the real binary, against real S3 servers (one per bucket).

use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::common::*;

/// A config with `new` (s3, empty) and `old` upstreams, the cache (and so the state) under `dir`.
fn config(dir: &TempDir, upstreams: &str) -> std::path::PathBuf {
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "[local]\nroots = [\"{}/local\"]\n\n[cache]\ndir = \"{}/cache\"\n\n{upstreams}",
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    path
}

/// `new` then `old`, as upstreams of those names.
fn new_and_old(new: &S3Server, old: &S3Server) -> String {
    format!(
        "{}{}",
        new.s3_upstream("new", "new"),
        old.s3_upstream("old", "old")
    )
}

fn key(i: usize) -> String {
    format!(
        "media_attachments/files/109/{:03}/{:03}/original/{i}.jpg",
        i / 1000,
        i % 1000
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listing_is_copied_once_a_second_run_writes_nothing_and_verify_agrees() {
    let (new, old) = two_buckets().await;
    // Over 1,000 keys: the listing takes two pages.
    for i in 0..1_050 {
        old.put("old", &key(i), pattern(300 + i, i as u64), "image/jpeg")
            .await;
    }
    // One is there already, with other bytes: never overwritten.
    new.put("new", &key(7), b"newer".to_vec(), "image/jpeg")
        .await;
    let dir = TempDir::new().unwrap();
    let cfg = config(&dir, &new_and_old(&new, &old));
    new.reset_counts();
    let (code, out, err) = mediaproxy(&cfg, &["migrate", "--from", "old", "--to", "new"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("1050 keys: copied 1049, already there 1"),
        "{out}"
    );
    assert_eq!(new.count("PUT"), 1_049);
    assert_eq!(
        new.object("new", &key(1_049)).await.unwrap().0,
        pattern(1_349, 1_049)
    );
    assert_eq!(new.object("new", &key(7)).await.unwrap().0, b"newer");

    // A second run reads no body from the old bucket and writes nothing.
    new.reset_counts();
    old.reset_counts();
    let (code, out, _) = mediaproxy(&cfg, &["migrate", "--from", "old", "--to", "new"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("copied 0, already there 1050"), "{out}");
    assert_eq!(
        (new.count("PUT"), old.count("GET")),
        (0, 3),
        "the start-up probe and two listing pages, no body"
    );

    // verify: complete but for the key with other bytes.
    let (code, out, _) =
        mediaproxy(&cfg, &["verify", "--upstream", "new", "--against", "old"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("differs {}", key(7))), "{out}");
    new.put("new", &key(7), pattern(307, 7), "image/jpeg").await;
    let (code, out, _) =
        mediaproxy(&cfg, &["verify", "--upstream", "new", "--against", "old"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1050 keys: 1050 present, 0 missing, 0 differ"),
        "{out}"
    );
    // A deleted and an altered object are found.
    new.delete("new", &key(3)).await;
    new.put("new", &key(4), b"altered".to_vec(), "image/jpeg")
        .await;
    let (code, out, _) =
        mediaproxy(&cfg, &["verify", "--upstream", "new", "--against", "old"]).await;
    assert_eq!(code, 1);
    assert!(out.contains(&format!("missing {}", key(3))), "{out}");
    assert!(out.contains(&format!("differs {}", key(4))), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_from_a_file_take_comments_urls_and_report_bad_lines() {
    let new = S3Server::start(&["new"], true).await;
    let public = S3Server::start(&["old"], false).await;
    for i in 0..3 {
        public
            .put("old", &key(i), pattern(100, i as u64), "image/jpeg")
            .await;
    }
    let dir = TempDir::new().unwrap();
    let cfg = config(
        &dir,
        &format!(
            "{}{}",
            new.s3_upstream("new", "new"),
            public.http_upstream("old", "old")
        ),
    );
    // An http upstream has no listing.
    let (code, _, err) = mediaproxy(&cfg, &["migrate", "--from", "old", "--to", "new"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--keys-from"), "{err}");
    let list = dir.path().join("keys.txt");
    std::fs::write(
        &list,
        format!(
            "# media to move\n\n{}\nhttps://files.example.org/{}?v=1\n/{}\n../../etc/passwd\n",
            key(0),
            key(1),
            key(2)
        ),
    )
    .unwrap();
    let (code, out, err) = mediaproxy(
        &cfg,
        &[
            "migrate",
            "--from",
            "old",
            "--to",
            "new",
            "--keys-from",
            list.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "an invalid line alone is no failure: {out}\n{err}");
    assert!(out.contains("3 keys: copied 3"), "{out}");
    assert!(
        err.contains("line 6") && err.contains("../../etc/passwd"),
        "{err}"
    );
    for i in 0..3 {
        assert_eq!(
            new.object("new", &key(i)).await.unwrap().0,
            pattern(100, i as u64)
        );
    }
    // A key nobody has: an `original` is a failure (exit 1), listed in the file the summary names.
    std::fs::write(&list, format!("{}\n", key(99))).unwrap();
    let (code, out, _) = mediaproxy(
        &cfg,
        &[
            "migrate",
            "--from",
            "old",
            "--to",
            "new",
            "--keys-from",
            list.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    let listed = out
        .lines()
        .find_map(|l| l.strip_prefix("failed and missing keys: "))
        .unwrap();
    assert!(std::fs::read_to_string(listed).unwrap().contains(&key(99)));
}

#[tokio::test(flavor = "multi_thread")]
async fn from_local_uploads_exactly_the_files_only_the_server_holds() {
    let new = S3Server::start(&["new"], true).await;
    let dir = TempDir::new().unwrap();
    let local = dir.path().join("local");
    write_file(
        &local,
        "accounts/avatars/000/000/001/original/a.png",
        b"avatar",
    );
    write_file(
        &local,
        "site_uploads/files/000/000/001/original/logo.svg",
        b"<svg/>",
    );
    write_file(
        &local,
        "media_attachments/files/000/000/002/original/b.png",
        b"both",
    );
    new.put(
        "new",
        "media_attachments/files/000/000/002/original/b.png",
        b"both".to_vec(),
        "image/png",
    )
    .await;
    let cfg = config(&dir, &new.s3_upstream("new", "new"));
    new.reset_counts();
    let (code, out, err) = mediaproxy(&cfg, &["migrate", "--from", "local", "--to", "new"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("3 keys: copied 2, already there 1"), "{out}");
    assert_eq!(new.count("PUT"), 2);
    let (body, ctype) = new
        .object("new", "site_uploads/files/000/000/001/original/logo.svg")
        .await
        .unwrap();
    assert_eq!(
        (body.as_slice(), ctype.as_str()),
        (&b"<svg/>"[..], "image/svg+xml")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_migrate_resumes_where_it_stopped() {
    let (new, old) = two_buckets().await;
    for i in 0..200 {
        old.put("old", &key(i), pattern(500, i as u64), "image/jpeg")
            .await;
    }
    let dir = TempDir::new().unwrap();
    let cfg = config(&dir, &new_and_old(&new, &old));
    new.reset_counts();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mediaproxy"))
        .args([
            "migrate",
            "--from",
            "old",
            "--to",
            "new",
            "--concurrency",
            "2",
            "--max-rps",
            "50",
        ])
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = new.count("PUT");
    assert!(
        before > 20 && before < 200,
        "killed midway: {before} copied"
    );
    let (code, out, err) = mediaproxy(&cfg, &["migrate", "--from", "old", "--to", "new"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("resuming after"), "{err}");
    let seen: u64 = out
        .split(" keys:")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(
        seen < 200,
        "the second run skipped what the first finished: {out}"
    );
    assert!(
        new.count("PUT") <= 202,
        "no key written twice (but the two in flight): {}",
        new.count("PUT")
    );
    for i in 0..200 {
        assert!(new.object("new", &key(i)).await.is_some(), "{}", key(i));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_usage_exits_2_naming_the_value() {
    let new = S3Server::start(&["new"], true).await;
    let public = S3Server::start(&["old"], false).await;
    let dir = TempDir::new().unwrap();
    let cfg = config(
        &dir,
        &format!(
            "{}{}",
            new.s3_upstream("new", "new"),
            public.http_upstream("old", "old")
        ),
    );
    for (args, expected) in [
        (vec!["migrate", "--from", "nope", "--to", "new"], "\"nope\""),
        (
            vec!["migrate", "--from", "new", "--to", "old"],
            "--to \"old\" is not of type \"s3\"",
        ),
        (vec!["verify", "--upstream", "gone"], "\"gone\""),
        (vec!["verify", "--upstream", "new"], "--keys-from"),
    ] {
        let (code, _, err) = mediaproxy(&cfg, &args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_that_answers_503_part_of_the_time_still_completes() {
    let (new, old) = two_buckets().await;
    for i in 0..20 {
        old.put("old", &key(i), pattern(1_000, i as u64), "image/jpeg")
            .await;
    }
    old.slow_down_every(3);
    let dir = TempDir::new().unwrap();
    let cfg = config(&dir, &new_and_old(&new, &old));
    let (code, out, err) = mediaproxy(&cfg, &["migrate", "--from", "old", "--to", "new"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("20 keys: copied 20"), "{out}");
    for i in 0..20 {
        assert_eq!(
            new.object("new", &key(i)).await.unwrap().0,
            pattern(1_000, i as u64)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_is_a_live_line_on_a_terminal_and_plain_lines_otherwise() {
    let (new, old) = two_buckets().await;
    for i in 0..300 {
        old.put("old", &key(i), pattern(200, i as u64), "image/jpeg")
            .await;
    }
    let dir = TempDir::new().unwrap();
    // Two names for one bucket: the two runs below copy into it at once, which is safe (If-None-Match).
    let cfg = config(
        &dir,
        &format!(
            "{}{}{}",
            new.s3_upstream("new", "new"),
            new.s3_upstream("other", "new"),
            old.s3_upstream("old", "old")
        ),
    );
    let bin = env!("CARGO_BIN_EXE_mediaproxy");
    let args = |state: &str| {
        format!(
            "{bin} migrate --from old --to new --max-rps 50 --state {} --config {}",
            dir.path().join(state).display(),
            cfg.display()
        )
    };
    // Under a pseudo-terminal (util-linux `script`), and through a pipe, at once: about 6 s each.
    let tty_cmd = args("tty.state");
    let tty = tokio::task::spawn_blocking(move || {
        Command::new("script")
            .args(["-qfec", &tty_cmd, "/dev/null"])
            .output()
            .unwrap()
    });
    let pipe = mediaproxy(
        &cfg,
        &[
            "migrate",
            "--from",
            "old",
            "--to",
            "other",
            "--max-rps",
            "50",
        ],
    );
    let (code, out, err) = pipe.await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("migrate: ") && l.contains(" keys: copied ")),
        "plain lines: {err}"
    );
    let tty = tty.await.unwrap();
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{screen}");
    assert!(
        screen.contains("migrate: ") && screen.contains('\r'),
        "a redrawn line: {screen:?}"
    );
    assert!(screen.contains("300 keys: copied"), "{screen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_keys_are_listed_for_keys_from_and_a_rerun_tries_them_again() {
    let (new, old) = two_buckets().await;
    for i in 0..10 {
        old.put("old", &key(i), pattern(100, i as u64), "image/jpeg")
            .await;
    }
    let dir = TempDir::new().unwrap();
    let cfg = config(&dir, &new_and_old(&new, &old));
    new.set_read_only(true); // a key without write permission
    let (code, out, _) = mediaproxy(&cfg, &["migrate", "--from", "old", "--to", "new"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("10 keys: copied 0, already there 0, missing 0, failed 10"),
        "{out}"
    );
    let listed = out
        .lines()
        .find_map(|l| l.strip_prefix("failed and missing keys: "))
        .unwrap()
        .to_string();
    new.set_read_only(false);
    // The list feeds straight back in...
    let (code, out, err) = mediaproxy(
        &cfg,
        &[
            "migrate",
            "--from",
            "old",
            "--to",
            "new",
            "--keys-from",
            &listed,
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("10 keys: copied 10"), "{out}");
    // ...and a plain rerun walks everything again (no state left to skip the failed part).
    let (code, out, _) = mediaproxy(&cfg, &["migrate", "--from", "old", "--to", "new"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("10 keys: copied 0, already there 10"), "{out}");
}
