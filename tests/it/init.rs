//! `mediaproxy init --mastodon-env`: a config from Mastodon's `.env.production` that serves exactly the
//! URLs Mastodon hands out, from where Mastodon writes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::common::*;

fn init(env: &Path, output: &Path, force: bool) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mediaproxy"));
    cmd.arg("init")
        .arg("--mastodon-env")
        .arg(env)
        .arg("--output")
        .arg(output);
    if force {
        cmd.arg("--force");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_storage_alias_with_a_key_prefix_serves_what_mastodon_links() {
    let s3 = S3Server::start(&["mastodata"], true).await;
    let key = "media_attachments/files/000/000/001/original/a.jpg";
    s3.put_with_acl(
        "mastodata",
        &format!("social/{key}"),
        b"jpeg".to_vec(),
        "image/jpeg",
        Some("public-read"),
    )
    .await;
    let live = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(live.path().join("public/system")).unwrap();
    let env = live.path().join(".env.production");
    std::fs::write(
        &env,
        format!(
            "# Mastodon\nLOCAL_DOMAIN=example.org\nS3_ENABLED=true\nexport S3_BUCKET=\"mastodata\"\n\
             S3_ENDPOINT='{}'\nS3_REGION=us-east-1\nAWS_ACCESS_KEY_ID={ACCESS_KEY}\n\
             AWS_SECRET_ACCESS_KEY=\"{SECRET_KEY}\"\nS3_ALIAS_HOST=example.org/storage # nginx location\n\
             S3_KEY_PREFIX=social\nCACHE_BUSTER_ENABLED=true\nCACHE_BUSTER_SECRET_HEADER=X-Bust\n\
             CACHE_BUSTER_SECRET=bust-secret\n",
            s3.endpoint()
        ),
    )
    .unwrap();
    let etc = tempfile::tempdir().unwrap();
    let output = etc.path().join("proxy.toml");
    let (code, stdout, stderr) = init(&env, &output, false);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("mediaproxy check --config"), "{stdout}");
    let text = std::fs::read_to_string(&output).unwrap();
    assert!(
        !text.contains(SECRET_KEY) && !text.contains("bust-secret"),
        "no secret in the config"
    );
    for (name, secret) in [
        ("s3.secret", SECRET_KEY),
        ("cache-buster.secret", "bust-secret"),
    ] {
        let path = etc.path().join(name);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), secret);
    }
    let cfg = mediaproxy::config::Config::load(&output).expect("the written config loads");
    assert_eq!(cfg.server.path_prefix, "/storage/social");
    assert_eq!(
        cfg.local.roots,
        vec![live.path().canonicalize().unwrap().join("public/system")]
    );
    assert!(cfg.server.cache_buster.is_some());
    let up = &cfg.upstreams[0];
    assert_eq!(up.name, "mastodata");

    // Served end to end (on a test port and cache dir): /storage/social/KEY is bucket key social/KEY,
    // read anonymously (Mastodon's default public-read).
    let body = text
        .replace("listen = [\"127.0.0.1:8080\"]", "")
        .replace("admin_listen = \"127.0.0.1:9901\"", "")
        .replace("dir = \"/var/cache/mediaproxy\"", "dir = \"{dir}/cache\"")
        .replace("[server]\n", "");
    let proxy = Proxy::start_with_server(&body, "");
    let r = client()
        .get(proxy.url(&format!("/storage/social/{key}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.bytes().await.unwrap()[..], b"jpeg");
}

#[test]
fn a_host_alias_without_endpoint_maps_like_paperclip() {
    let live = tempfile::tempdir().unwrap();
    let env = live.path().join(".env.production");
    std::fs::write(
        &env,
        "S3_ENABLED=true\nS3_BUCKET=files-example\nS3_REGION=eu-west-3\nAWS_ACCESS_KEY_ID=AKIA1\n\
         AWS_SECRET_ACCESS_KEY=s3cr3t\nS3_ALIAS_HOST=files.example.org\nS3_PERMISSION=\n",
    )
    .unwrap();
    let etc = tempfile::tempdir().unwrap();
    let output = etc.path().join("proxy.toml");
    let (code, out, err) = init(&env, &output, false);
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(&output).unwrap();
    for line in [
        "endpoint = \"https://s3.eu-west-3.amazonaws.com\"",
        "path_style = false",
        "region = \"eu-west-3\"",
        "path_prefix = \"\"",
        "reads = \"signed\"",
        // No public/system beside the env file: media went to S3 from the start.
        "roots = []",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    assert!(
        !text.contains("\nacl ="),
        "an empty S3_PERMISSION sends no ACL:\n{text}"
    );
    mediaproxy::config::Config::load(&output).expect("loads");
}

#[test]
fn a_missing_variable_is_named_and_an_existing_config_is_kept() {
    let live = tempfile::tempdir().unwrap();
    let env = live.path().join(".env.production");
    std::fs::write(&env, "S3_ENABLED=true\nS3_BUCKET=b\n").unwrap();
    let etc = tempfile::tempdir().unwrap();
    let output = etc.path().join("proxy.toml");
    let (code, _, err) = init(&env, &output, false);
    assert_eq!(code, 2);
    assert!(
        err.contains("AWS_ACCESS_KEY_ID") && err.contains("AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );
    assert!(!output.exists());

    std::fs::write(
        &env,
        "S3_ENABLED=true\nS3_BUCKET=b\nAWS_ACCESS_KEY_ID=a\nAWS_SECRET_ACCESS_KEY=new-secret\n",
    )
    .unwrap();
    std::fs::write(&output, "# mine\n").unwrap();
    let (code, _, err) = init(&env, &output, false);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "# mine\n");
    assert!(
        !etc.path().join("s3.secret").exists(),
        "no secret file written either"
    );
    let (code, _, err) = init(&env, &output, true);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read_to_string(&output)
        .unwrap()
        .contains("bucket = \"b\""));

    std::fs::write(&env, "S3_ENABLED=false\n").unwrap();
    let (code, _, err) = init(&env, &etc.path().join("other.toml"), false);
    assert_eq!(code, 2);
    assert!(err.contains("S3_ENABLED"), "{err}");
}

#[test]
fn a_private_acl_means_signed_reads() {
    let live = tempfile::tempdir().unwrap();
    let env = live.path().join(".env.production");
    std::fs::write(
        &env,
        "S3_ENABLED=true\nS3_BUCKET=b\nAWS_ACCESS_KEY_ID=a\nAWS_SECRET_ACCESS_KEY=s\nS3_PERMISSION=private\n",
    )
    .unwrap();
    let etc = tempfile::tempdir().unwrap();
    let output = etc.path().join("proxy.toml");
    assert_eq!(init(&env, &output, false).0, 0);
    let text = std::fs::read_to_string(&output).unwrap();
    assert!(text.contains("acl = \"private\""), "{text}");
    assert!(
        text.contains("reads = \"signed\""),
        "anonymous reads of private objects would find nothing:\n{text}"
    );
}
