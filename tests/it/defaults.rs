//! Where the config comes from when `--config` is not given: `$MEDIAPROXY_CONFIG`, then
//! `/etc/mediaproxy/proxy.toml`, then (for `serve` only) the embedded default.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn mediaproxy() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mediaproxy"));
    cmd.env_remove("MEDIAPROXY_CONFIG");
    cmd
}

/// The first line of `child`'s stderr containing `needle`, within `within`.
fn wait_line(child: &mut std::process::Child, needle: &str, within: Duration) -> Option<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&needle) {
                let _ = tx.send(line);
                return;
            }
        }
    });
    rx.recv_timeout(within).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_and_check_find_the_config_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let root = mastodon_root();
    write_file(root.path(), "media_attachments/a.png", b"png");
    let port = closed_port();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\n[local]\nroots = [\"{}\"]\n\n[cache]\ndir = \"{}/cache\"\n",
            root.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();

    let out = mediaproxy()
        .arg("check")
        .env("MEDIAPROXY_CONFIG", &config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("config {}: ok", config.display())),
        "{text}"
    );

    let empty = tempfile::tempdir().unwrap();
    let mut child = mediaproxy()
        .arg("serve")
        .current_dir(empty.path())
        .env("MEDIAPROXY_CONFIG", &config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let said = wait_line(&mut child, "loading the config", Duration::from_secs(10));
    let started = Instant::now();
    let mut served = None;
    while served.is_none() && started.elapsed() < Duration::from_secs(10) {
        if let Ok(r) = client()
            .get(format!("http://127.0.0.1:{port}/media_attachments/a.png"))
            .send()
            .await
        {
            served = Some(r.status().as_u16());
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let said = said.expect("serve says which file it loads");
    assert!(said.contains(&config.display().to_string()), "{said}");
    assert_eq!(served, Some(200), "serves with that file's local root");
}

#[test]
fn without_any_config_check_says_where_it_looked_and_serve_warns_of_a_missing_root() {
    if std::path::Path::new("/etc/mediaproxy/proxy.toml").exists() {
        eprintln!("skipped: this machine has /etc/mediaproxy/proxy.toml");
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let out = mediaproxy()
        .args(["cache", "stats"])
        .current_dir(empty.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("/etc/mediaproxy/proxy.toml") && text.contains("MEDIAPROXY_CONFIG"),
        "{text}"
    );

    // The embedded default: it says so, and that ./public/system is not there. (It may or may not
    // bind 127.0.0.1:8080 on this machine; the warning comes first either way.)
    let mut child = mediaproxy()
        .arg("serve")
        .current_dir(empty.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let warned = wait_line(&mut child, "public/system", Duration::from_secs(10));
    let _ = child.kill();
    let _ = child.wait();
    let warned = warned.expect("a warning naming ./public/system");
    assert!(warned.contains("does not exist"), "{warned}");
}
