//! The image store with real material: OCI layouts and archives built by umoci/skopeo from
//! busybox-static, and Debian's docker-registry on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use common::images::{rvmm, rvmm_ok, store, test_images, tree, Registry};

fn tools() -> bool {
    common::have_tools(&["umoci", "skopeo", "python3", "docker-registry", "htpasswd"])
}

fn layer_dirs(root: &Path) -> Vec<std::path::PathBuf> {
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).expect("index"))
            .expect("json");
    idx["images"][0]["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            root.join("layers")
                .join(&l["diff_id"].as_str().expect("diff_id")[7..])
        })
        .collect()
}

#[test]
fn layouts_archives_and_store_commands() {
    if !tools() {
        return;
    }
    let imgs = test_images();
    let s = store();
    let root = s.path();

    // An OCI layout with whiteouts, an opaque directory, a cross-layer hardlink and a symlink.
    let id = rvmm_ok(
        root,
        &[
            "pull",
            "-q",
            &format!("oci:{}", imgs.join("multi").display()),
        ],
    );
    assert!(id.trim().starts_with("sha256:"), "{id}");
    let layers = layer_dirs(root);
    assert_eq!(layers.len(), 4);
    use std::os::unix::fs::FileTypeExt;
    if nix::unistd::geteuid().is_root() {
        let wh = std::fs::symlink_metadata(layers[2].join("etc/motd")).expect("whiteout");
        assert!(
            wh.file_type().is_char_device(),
            "whiteout is an overlay char device"
        );
        let opq = xattr(&layers[2].join("data/dir"), "trusted.overlay.opaque");
        assert_eq!(opq.as_deref(), Some(&b"y"[..]));
    }
    assert_eq!(
        std::fs::read(layers[3].join("data/hard")).expect("hard"),
        b"#!/bin/sh\necho script-ran\n"
    );
    assert_eq!(
        std::fs::read_link(layers[3].join("data/soft")).expect("soft"),
        Path::new("/data/dir/z")
    );
    // The store never lets layer content out.
    assert!(!Path::new("/data/dir/z").exists());

    let inspect = rvmm_ok(root, &["image", "inspect", "localhost/multi"]);
    let v: serde_json::Value = serde_json::from_str(&inspect).expect("inspect json");
    assert_eq!(v["Config"]["WorkingDir"], "/data");
    assert_eq!(v["Config"]["User"], "app");
    assert_eq!(v["Config"]["Cmd"][0], "sh");
    assert_eq!(v["Config"]["StopSignal"], "SIGTERM");
    assert_eq!(v["Id"], id.trim());

    // Every other kind of local material, all the same busybox image.
    let bb = rvmm_ok(
        root,
        &[
            "pull",
            "-q",
            &format!("oci:{}:latest", imgs.join("busybox").display()),
        ],
    );
    for src in [
        format!("oci:{}", imgs.join("zstd").display()),
        format!("oci:{}", imgs.join("index").display()),
        format!(
            "docker-archive:{}",
            imgs.join("busybox.docker.tar").display()
        ),
        format!("oci-archive:{}", imgs.join("busybox.oci.tar").display()),
    ] {
        assert_eq!(rvmm_ok(root, &["pull", "-q", &src]), bb, "{src}");
    }
    let loaded = rvmm_ok(
        root,
        &[
            "load",
            "-q",
            "-i",
            imgs.join("busybox.docker.tar").to_str().expect("utf8"),
        ],
    );
    assert_eq!(
        loaded.trim(),
        "Loaded image: docker.io/library/busybox:latest"
    );

    let list = rvmm_ok(root, &["images"]);
    let header = list.lines().next().expect("header");
    for col in ["REPOSITORY", "TAG", "IMAGE ID", "DIGEST", "CREATED", "SIZE"] {
        assert!(header.contains(col), "{header}");
    }
    for name in [
        "localhost/multi",
        "localhost/busybox",
        "localhost/zstd",
        "docker.io/library/busybox",
    ] {
        assert!(list.contains(name), "{name} missing from\n{list}");
    }

    // rmi: a name goes, then the image, then its layers and blobs.
    rvmm_ok(root, &["rmi", "localhost/zstd"]);
    assert!(!rvmm_ok(root, &["images"]).contains("localhost/zstd"));
    let ids = rvmm_ok(root, &["images", "-q", "--no-trunc"]);
    assert_eq!(ids.lines().count(), 2, "{ids}");
    rvmm_ok(root, &["rmi", id.trim()]);
    rvmm_ok(root, &["rmi", bb.trim()]);
    assert_eq!(rvmm_ok(root, &["images", "-q"]), "");
    assert_eq!(
        std::fs::read_dir(root.join("layers"))
            .expect("layers")
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(root.join("blobs/sha256"))
            .expect("blobs")
            .count(),
        0
    );
    let (code, _, err) = rvmm(root, &["rmi", "busybox"]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: valid C strings and a buffer of the stated length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

#[test]
fn registry_pulls_every_manifest_kind() {
    if !tools() {
        return;
    }
    let imgs = test_images();
    let reg = Registry::start(None);
    let oci = |n: &str| format!("oci:{}:latest", imgs.join(n).display());
    reg.push(&oci("busybox"), "t/busybox:latest", &[], None);
    reg.push(&oci("multi"), "t/multi:v2s2", &["--format", "v2s2"], None);
    reg.push(&oci("index"), "t/index:latest", &["--all"], None);
    reg.push(&oci("zstd"), "t/zstd:latest", &[], None);

    let s = store();
    let root = s.path();
    let h = reg.host();
    let bb = rvmm_ok(root, &["pull", "-q", &format!("{h}/t/busybox")]);
    let digest =
        serde_json::from_str::<serde_json::Value>(&rvmm_ok(root, &["image", "inspect", bb.trim()]))
            .expect("json")["Digest"]
            .as_str()
            .expect("digest")
            .to_string();
    assert_eq!(rvmm_ok(root, &["pull", "-q", &format!("{h}/t/index")]), bb);
    assert_eq!(rvmm_ok(root, &["pull", "-q", &format!("{h}/t/zstd")]), bb);
    let multi = rvmm_ok(root, &["pull", "-q", &format!("{h}/t/multi:v2s2")]);
    assert_ne!(multi, bb);
    // The stored manifest is the Docker v2s2 one, as the registry served it.
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            root.join("blobs/sha256").join(
                &serde_json::from_str::<serde_json::Value>(&rvmm_ok(
                    root,
                    &["image", "inspect", multi.trim()],
                ))
                .expect("json")["Digest"]
                    .as_str()
                    .expect("digest")[7..],
            ),
        )
        .expect("manifest"),
    )
    .expect("json");
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );

    // Saved as an OCI archive, the v2s2 manifest gets OCI media types over the same blobs, and
    // the image loads back with its ID.
    let archive = tempfile::tempdir().expect("tempdir");
    let oci = archive.path().join("multi.tar");
    let oci = oci.to_str().expect("utf8");
    rvmm_ok(
        root,
        &["save", "--format", "oci-archive", "-o", oci, multi.trim()],
    );
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", &format!("oci-archive:{oci}")])
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        raw["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let want: Vec<serde_json::Value> = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            let mut l = l.clone();
            l["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
            l
        })
        .collect();
    assert_eq!(raw["layers"], serde_json::Value::from(want));
    let s2 = store();
    let loaded = rvmm_ok(s2.path(), &["pull", "-q", &format!("oci-archive:{oci}")]);
    assert_eq!(loaded, multi);

    // By digest, warm: nothing new is written.
    let before = tree(root);
    rvmm_ok(root, &["pull", "-q", &format!("{h}/t/busybox@{digest}")]);
    let v: serde_json::Value =
        serde_json::from_str(&rvmm_ok(root, &["image", "inspect", bb.trim()])).expect("json");
    assert!(v["RepoDigests"]
        .as_array()
        .expect("repo digests")
        .iter()
        .any(|d| d.as_str() == Some(&format!("{h}/t/busybox@{digest}"))));
    assert_eq!(
        before
            .iter()
            .filter(|(p, _)| p.starts_with("layers/"))
            .count(),
        tree(root)
            .iter()
            .filter(|(p, _)| p.starts_with("layers/"))
            .count()
    );

    // An image that does not exist: one line, non-zero, store untouched.
    let before = tree(root);
    let (code, _, err) = rvmm(root, &["pull", "-q", &format!("{h}/t/nothere:latest")]);
    assert_ne!(code, 0);
    assert!(err.contains("no such image"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let after = tree(root);
    assert_eq!(
        before
            .iter()
            .filter(|(p, _)| !p.starts_with("tmp/"))
            .collect::<Vec<_>>(),
        after
            .iter()
            .filter(|(p, _)| !p.starts_with("tmp/"))
            .collect::<Vec<_>>()
    );

    // A reference that does not parse.
    let (code, _, err) = rvmm(root, &["pull", "Not_Valid:::x"]);
    assert_ne!(code, 0);
    assert!(err.contains("invalid image reference"), "{err}");
}

#[test]
fn registry_basic_auth() {
    if !tools() {
        return;
    }
    let imgs = test_images();
    let reg = Registry::start(Some(("alice", "s3cret")));
    reg.push(
        &format!("oci:{}:latest", imgs.join("busybox").display()),
        "private/busybox:latest",
        &[],
        Some("alice:s3cret"),
    );
    let s = store();
    let root = s.path();
    let r = format!("{}/private/busybox", reg.host());
    let (code, _, err) = rvmm(root, &["pull", "-q", &r]);
    assert_ne!(code, 0);
    assert!(err.contains("authentication"), "{err}");
    let (code, _, err) = rvmm(root, &["pull", "-q", "--creds", "alice:wrong", &r]);
    assert_ne!(code, 0, "{err}");
    rvmm_ok(root, &["pull", "-q", "--creds", "alice:s3cret", &r]);
    rvmm_ok(root, &["rmi", &r]);
    // ~/.docker/config.json, through DOCKER_CONFIG.
    let cfgdir = tempfile::tempdir().expect("tempdir");
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    std::fs::write(
        cfgdir.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host()),
    )
    .expect("write");
    let out = std::process::Command::new(common::rvmm_bin())
        .env("DOCKER_CONFIG", cfgdir.path())
        .args(["--root", root.to_str().expect("utf8"), "pull", "-q", &r])
        .output()
        .expect("rvmm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies a layout, then lets `edit` damage it.
fn damaged_layout(name: &str, edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(test_images().join(name))
        .arg(d.path().join("img"))
        .status()
        .expect("cp");
    assert!(st.success());
    edit(&d.path().join("img"));
    d
}

/// The layout's (only) manifest path and JSON.
fn manifest_of(layout: &Path) -> (std::path::PathBuf, serde_json::Value) {
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("json");
    let d = idx["manifests"][0]["digest"].as_str().expect("digest");
    let p = layout.join("blobs/sha256").join(&d[7..]);
    let m = serde_json::from_slice(&std::fs::read(&p).expect("manifest")).expect("json");
    (p, m)
}

/// Rewrites the manifest (and index.json to point at its new digest).
fn rewrite_manifest(layout: &Path, m: &serde_json::Value) {
    use sha2::Digest;
    let body = serde_json::to_vec(m).expect("json");
    let hex = hex::encode(sha2::Sha256::digest(&body));
    std::fs::write(layout.join("blobs/sha256").join(&hex), &body).expect("write");
    let mut idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("json");
    idx["manifests"][0]["digest"] = format!("sha256:{hex}").into();
    idx["manifests"][0]["size"] = body.len().into();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&idx).expect("json"),
    )
    .expect("write");
}

fn layer_blob(layout: &Path, i: usize) -> std::path::PathBuf {
    let (_, m) = manifest_of(layout);
    layout
        .join("blobs/sha256")
        .join(&m["layers"][i]["digest"].as_str().expect("digest")[7..])
}

#[test]
fn bad_images_leave_the_store_as_it_was() {
    if !tools() {
        return;
    }
    let s = store();
    let root = s.path();
    // Something already in the store, so "as it was" is not just "empty".
    rvmm_ok(
        root,
        &[
            "pull",
            "-q",
            &format!("oci:{}", test_images().join("busybox").display()),
        ],
    );
    let before = tree(root);

    let cases: Vec<(&str, tempfile::TempDir, &str)> = vec![
        (
            "tampered blob",
            damaged_layout("multi", |l| {
                let p = layer_blob(l, 1);
                let mut b = std::fs::read(&p).expect("read");
                let n = b.len();
                b[n / 2] ^= 0xff;
                std::fs::write(&p, b).expect("write");
            }),
            "digest mismatch",
        ),
        (
            "truncated blob",
            damaged_layout("multi", |l| {
                let p = layer_blob(l, 2);
                let b = std::fs::read(&p).expect("read");
                std::fs::write(&p, &b[..b.len() / 2]).expect("write");
            }),
            "truncated",
        ),
        (
            "size lie",
            damaged_layout("multi", |l| {
                let (_, mut m) = manifest_of(l);
                let sz = m["layers"][3]["size"].as_u64().expect("size");
                m["layers"][3]["size"] = (sz - 10).into();
                rewrite_manifest(l, &m);
            }),
            "larger than",
        ),
        (
            "unknown media type",
            damaged_layout("multi", |l| {
                let (_, mut m) = manifest_of(l);
                m["layers"][1]["mediaType"] = "application/x-rar".into();
                rewrite_manifest(l, &m);
            }),
            "unsupported layer media type",
        ),
        (
            "traversal",
            damaged_layout("multi", |l| {
                // Replace the last layer with one whose entry climbs out; fix digests so only the
                // content is wrong.
                let mut tar = Vec::new();
                let mut h = [0u8; 512];
                let name = b"../../../../tmp/rvmm-traversal-pwned";
                h[..name.len()].copy_from_slice(name);
                h[100..108].copy_from_slice(b"0000644\0");
                h[124..136].copy_from_slice(b"00000000003\0");
                h[156] = b'0';
                h[257..263].copy_from_slice(b"ustar\0");
                h[263..265].copy_from_slice(b"00");
                h[148..156].copy_from_slice(b"        ");
                let sum: u32 = h.iter().map(|&b| b as u32).sum();
                h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
                tar.extend_from_slice(&h);
                let mut data = [0u8; 512];
                data[..3].copy_from_slice(b"hi\n");
                tar.extend_from_slice(&data);
                tar.extend_from_slice(&[0u8; 1024]);
                use sha2::Digest;
                let hex = hex::encode(sha2::Sha256::digest(&tar));
                std::fs::write(l.join("blobs/sha256").join(&hex), &tar).expect("write");
                let (_, mut m) = manifest_of(l);
                let cfg_digest = m["config"]["digest"].as_str().expect("cfg")[7..].to_string();
                let mut cfg: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(l.join("blobs/sha256").join(&cfg_digest)).expect("cfg"),
                )
                .expect("json");
                cfg["rootfs"]["diff_ids"][3] = format!("sha256:{hex}").into();
                let cbody = serde_json::to_vec(&cfg).expect("json");
                let chex = hex::encode(sha2::Sha256::digest(&cbody));
                std::fs::write(l.join("blobs/sha256").join(&chex), &cbody).expect("write");
                m["config"]["digest"] = format!("sha256:{chex}").into();
                m["config"]["size"] = cbody.len().into();
                m["layers"][3] = serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{hex}"), "size": tar.len()});
                rewrite_manifest(l, &m);
            }),
            "escapes the layer",
        ),
    ];
    for (what, dir, expect) in cases {
        let (code, _, err) = rvmm(
            root,
            &[
                "pull",
                "-q",
                &format!("oci:{}", dir.path().join("img").display()),
            ],
        );
        assert_ne!(code, 0, "{what}: pull should fail");
        assert!(err.contains(expect), "{what}: expected {expect:?} in {err}");
        assert_eq!(err.trim().lines().count(), 1, "{what}: {err}");
        let after = tree(root);
        let strip = |t: &[(String, u64)]| {
            t.iter()
                .filter(|(p, _)| !p.starts_with("tmp/"))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&before), strip(&after), "{what}: the store changed");
        assert!(!Path::new("/tmp/rvmm-traversal-pwned").exists());
    }
    let (code, _, err) = rvmm(root, &["pull", "oci:/nonexistent/layout"]);
    assert_ne!(code, 0);
    assert!(err.contains("not an OCI image layout"), "{err}");
    let junk = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(junk.path(), b"this is not a tar").expect("write");
    let (code, _, err) = rvmm(root, &["load", "-i", junk.path().to_str().expect("utf8")]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A registry that serves the manifest and config, then drops the connection halfway through the
/// layer: the pull fails cleanly and leaves nothing behind.
#[test]
fn registry_that_goes_away_mid_pull() {
    if !tools() {
        return;
    }
    let layout = test_images().join("busybox");
    let (mpath, m) = manifest_of(&layout);
    let manifest = std::fs::read(&mpath).expect("manifest");
    let cfg_digest = m["config"]["digest"].as_str().expect("cfg").to_string();
    let config = std::fs::read(layout.join("blobs/sha256").join(&cfg_digest[7..])).expect("config");
    let layer_digest = m["layers"][0]["digest"]
        .as_str()
        .expect("layer")
        .to_string();
    let layer = std::fs::read(layout.join("blobs/sha256").join(&layer_digest[7..])).expect("layer");

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&req)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            let path = line.split(' ').nth(1).unwrap_or("");
            let (ctype, body, cut): (&str, &[u8], bool) = if path == "/v2/" {
                ("application/json", b"{}", false)
            } else if path.contains("/manifests/") {
                (
                    "application/vnd.oci.image.manifest.v1+json",
                    &manifest,
                    false,
                )
            } else if path.ends_with(&cfg_digest) {
                ("application/octet-stream", &config, false)
            } else if path.ends_with(&layer_digest) {
                ("application/octet-stream", &layer, true)
            } else {
                ("text/plain", b"not found", false)
            };
            let status = if body == b"not found" {
                "404 Not Found"
            } else {
                "200 OK"
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(head.as_bytes());
            let n = if cut { body.len() / 2 } else { body.len() };
            let _ = c.write_all(&body[..n]);
            let _ = c.flush();
            drop(c);
        }
    });
    let s = store();
    let root = s.path();
    let (code, _, err) = rvmm(
        root,
        &["pull", "-q", &format!("127.0.0.1:{port}/t/busybox")],
    );
    assert_ne!(code, 0, "pull from a dying registry should fail");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let left: Vec<_> = tree(root)
        .into_iter()
        .filter(|(p, _)| !p.ends_with('/'))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Two rvmm processes pulling the same image at once both succeed and agree.
#[test]
fn concurrent_pulls() {
    if !tools() {
        return;
    }
    let src = format!("oci:{}", test_images().join("multi").display());
    let s = store();
    let root = s.path().to_path_buf();
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (root, src) = (root.clone(), src.clone());
            std::thread::spawn(move || rvmm(&root, &["pull", "-q", &src]))
        })
        .collect();
    let outs: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    for (code, out, err) in &outs {
        assert_eq!(*code, 0, "{err}");
        assert_eq!(out, &outs[0].1);
    }
    assert_eq!(rvmm_ok(&root, &["images", "-q"]).lines().count(), 1);
}

/// `rvmm` with a private `DOCKER_CONFIG` (never the real ~/.docker) and stdin from `input`.
fn rvmm_cfg(root: &Path, cfg: &Path, args: &[&str], input: Option<&str>) -> (i32, String, String) {
    use std::process::{Command, Stdio};
    let mut c = Command::new(common::rvmm_bin());
    c.env("DOCKER_CONFIG", cfg)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("run rvmm");
    if let Some(i) = input {
        // rvmm may end without reading its stdin (a refused flag): a closed pipe is not an error.
        match child.stdin.take().expect("stdin").write_all(i.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            r => r.expect("write stdin"),
        }
    }
    let out = child.wait_with_output().expect("wait rvmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn inspect(root: &Path, image: &str) -> serde_json::Value {
    serde_json::from_str(&rvmm_ok(root, &["image", "inspect", image])).expect("inspect json")
}

/// `skopeo inspect TRANSPORT:FILE[:REF]` succeeds and reports these layers (diff_ids for a
/// docker-archive, blob digests for an OCI archive).
fn skopeo_layers(src: &str) -> Vec<String> {
    let out = std::process::Command::new("skopeo")
        .args(["inspect", src])
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "skopeo inspect {src}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("skopeo json");
    v["Layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l.as_str().expect("layer").to_string())
        .collect()
}

#[test]
fn tag_save_and_load_round_trip() {
    if !tools() {
        return;
    }
    let imgs = test_images();
    let s = store();
    let root = s.path();
    let bb = rvmm_ok(
        root,
        &[
            "pull",
            "-q",
            &format!("oci:{}", imgs.join("busybox").display()),
        ],
    );
    let bb = bb.trim();
    let multi = rvmm_ok(
        root,
        &[
            "pull",
            "-q",
            &format!("oci:{}", imgs.join("multi").display()),
        ],
    );
    let multi = multi.trim();
    let layers_of = |root: &Path, image: &str| inspect(root, image)["Layers"].clone();
    let bb_layers = layers_of(root, bb);
    let multi_layers = layers_of(root, multi);

    // tag: by name and by ID prefix; the new names resolve to the same image.
    rvmm_ok(
        root,
        &["tag", "localhost/busybox", "127.0.0.1:5000/team/bb:v1"],
    );
    rvmm_ok(root, &["image", "tag", &bb[7..19], "mine"]);
    for name in [
        "127.0.0.1:5000/team/bb:v1",
        "mine",
        "docker.io/library/mine:latest",
    ] {
        assert_eq!(inspect(root, name)["Id"], bb, "{name}");
    }
    let list = rvmm_ok(root, &["images"]);
    assert!(list.contains("127.0.0.1:5000/team/bb") && list.contains("docker.io/library/mine"));
    // A name moves: tagging another image with it takes it from the first.
    rvmm_ok(root, &["tag", multi, "mine"]);
    assert_eq!(inspect(root, "mine")["Id"], multi);
    rvmm_ok(root, &["tag", bb, "mine"]);
    if common::have_root() {
        let out = rvmm_ok(
            root,
            &[
                "run",
                "--isolation=container",
                "--rm",
                "--network=none",
                "-q",
                "127.0.0.1:5000/team/bb:v1",
                "sh",
                "-c",
                "echo $RVMM_IMAGE",
            ],
        );
        assert_eq!(out.trim(), "busybox");
    }

    // save: a docker-archive with two images and three names, an OCI archive, and stdout.
    let out = tempfile::tempdir().expect("tempdir");
    let docker = out.path().join("images.tar");
    let oci = out.path().join("images.oci.tar");
    rvmm_ok(
        root,
        &[
            "save",
            "-o",
            docker.to_str().expect("utf8"),
            "127.0.0.1:5000/team/bb:v1",
            "mine",
            "localhost/multi",
        ],
    );
    rvmm_ok(
        root,
        &[
            "image",
            "save",
            "--format",
            "oci-archive",
            "-o",
            oci.to_str().expect("utf8"),
            "localhost/multi",
            "mine",
        ],
    );
    let piped = std::process::Command::new(common::rvmm_bin())
        .args([
            "--root",
            root.to_str().expect("utf8"),
            "save",
            "localhost/busybox",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("rvmm save to stdout");
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    let stdout_tar = out.path().join("stdout.tar");
    std::fs::write(&stdout_tar, &piped.stdout).expect("write");
    // Only the archives: no temp files left beside them.
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["images.oci.tar", "images.tar", "stdout.tar"]);

    // skopeo reads both formats; each image's layers are the ones rvmm holds.
    let d = docker.display();
    assert_eq!(
        serde_json::Value::from(skopeo_layers(&format!(
            "docker-archive:{d}:127.0.0.1:5000/team/bb:v1"
        ))),
        bb_layers
    );
    assert_eq!(
        serde_json::Value::from(skopeo_layers(&format!(
            "docker-archive:{d}:localhost/multi:latest"
        ))),
        multi_layers
    );
    let o = oci.display();
    assert_eq!(
        skopeo_layers(&format!("oci-archive:{o}:localhost/multi:latest")).len(),
        4
    );
    assert_eq!(
        skopeo_layers(&format!("oci-archive:{o}:docker.io/library/mine:latest")).len(),
        1
    );
    let manifest: serde_json::Value = {
        let mut a = tar::Archive::new(std::fs::File::open(&docker).expect("open"));
        let mut m = None;
        for e in a.entries().expect("entries") {
            let mut e = e.expect("entry");
            if e.path().expect("path").to_str() == Some("manifest.json") {
                let mut b = Vec::new();
                e.read_to_end(&mut b).expect("read");
                m = Some(serde_json::from_slice(&b).expect("json"));
            }
        }
        m.expect("manifest.json")
    };
    assert_eq!(manifest.as_array().expect("entries").len(), 2);
    assert_eq!(
        manifest[0]["RepoTags"],
        serde_json::json!(["127.0.0.1:5000/team/bb:v1", "mine:latest"])
    );

    // rmi everything, then load: same IDs, same layers, same names.
    for img in [bb, multi] {
        rvmm_ok(root, &["rmi", img]);
    }
    assert_eq!(rvmm_ok(root, &["images", "-q"]), "");
    let loaded = rvmm_ok(root, &["load", "-q", "-i", docker.to_str().expect("utf8")]);
    assert!(
        loaded.contains("Loaded image: 127.0.0.1:5000/team/bb:v1"),
        "{loaded}"
    );
    assert!(
        loaded.contains("Loaded image: docker.io/library/mine:latest"),
        "{loaded}"
    );
    assert_eq!(inspect(root, "mine")["Id"], bb);
    assert_eq!(layers_of(root, "mine"), bb_layers);
    assert_eq!(inspect(root, "localhost/multi")["Id"], multi);
    assert_eq!(layers_of(root, "localhost/multi"), multi_layers);

    // The OCI archive and the stdout one load into fresh stores the same way.
    let s2 = store();
    rvmm_ok(
        s2.path(),
        &["load", "-q", "-i", oci.to_str().expect("utf8")],
    );
    assert_eq!(inspect(s2.path(), "localhost/multi")["Id"], multi);
    assert_eq!(layers_of(s2.path(), "mine"), bb_layers);
    let s3 = store();
    rvmm_ok(
        s3.path(),
        &["load", "-q", "-i", stdout_tar.to_str().expect("utf8")],
    );
    assert_eq!(inspect(s3.path(), "localhost/busybox")["Id"], bb);
    // pull with a name from a multi-image archive.
    let s4 = store();
    let id = rvmm_ok(
        s4.path(),
        &[
            "pull",
            "-q",
            &format!("docker-archive:{d}:localhost/multi:latest"),
        ],
    );
    assert_eq!(id.trim(), multi);
    let id = rvmm_ok(
        s4.path(),
        &[
            "pull",
            "-q",
            &format!("oci-archive:{o}:docker.io/library/mine:latest"),
        ],
    );
    assert_eq!(id.trim(), bb);
}

#[test]
fn save_and_tag_refuse_bad_input() {
    if !tools() {
        return;
    }
    let s = store();
    let root = s.path();
    rvmm_ok(
        root,
        &[
            "pull",
            "-q",
            &format!("oci:{}", test_images().join("multi").display()),
        ],
    );
    let out = tempfile::tempdir().expect("tempdir");
    let file = out.path().join("x.tar");
    let f = file.to_str().expect("utf8");
    let one_line_failure = |args: &[&str], expect: &str| {
        let (code, stdout, err) = rvmm(root, args);
        assert_ne!(code, 0, "{args:?} should fail");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
    };
    one_line_failure(
        &["save", "-o", f, "localhost/multi", "nothere"],
        "no such image: nothere",
    );
    one_line_failure(
        &["save", "-o", "/nonexistent/dir/x.tar", "localhost/multi"],
        "cannot write /nonexistent/dir/x.tar",
    );
    one_line_failure(
        &["save", "--format", "tar", "-o", f, "localhost/multi"],
        "unknown archive format \"tar\"",
    );
    one_line_failure(&["tag", "nothere", "x"], "no such image: nothere");
    one_line_failure(
        &["tag", "localhost/multi", "Bad::Name"],
        "invalid image reference",
    );
    one_line_failure(
        &[
            "tag",
            "localhost/multi",
            &format!("x@sha256:{}", "a".repeat(64)),
        ],
        "digest reference",
    );
    // stdout a terminal: refused, as docker does.
    let tty = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, pty, sys; sys.exit(os.waitstatus_to_exitcode(pty.spawn(sys.argv[1:])))",
        ])
        .arg(common::rvmm_bin())
        .args([
            "--root",
            root.to_str().expect("utf8"),
            "save",
            "localhost/multi",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("python3 pty");
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert_ne!(tty.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains("refusing to write an image archive to a terminal"),
        "{shown}"
    );

    // A save killed half way (blocked on a store blob that is a FIFO, after the archive's first
    // entry) leaves nothing beside -o FILE.
    {
        let idx: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join("index.json")).expect("index"))
                .expect("json");
        let cfg = root
            .join("blobs/sha256")
            .join(&idx["images"][0]["id"].as_str().expect("id")[7..]);
        let saved = std::fs::read(&cfg).expect("config");
        std::fs::remove_file(&cfg).expect("rm");
        nix::unistd::mkfifo(&cfg, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        let mut child = std::process::Command::new(common::rvmm_bin())
            .args([
                "--root",
                root.to_str().expect("utf8"),
                "save",
                "--format",
                "oci-archive",
            ])
            .args(["-o", f, "localhost/multi"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("rvmm save");
        // Opening the FIFO for writing returns once rvmm has opened it to read.
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(&cfg)
            .expect("open fifo");
        child.kill().expect("kill");
        child.wait().expect("wait");
        drop(w);
        std::fs::remove_file(&cfg).expect("rm fifo");
        std::fs::write(&cfg, saved).expect("restore config");
        assert_eq!(
            std::fs::read_dir(out.path()).expect("readdir").count(),
            0,
            "a killed save left a file"
        );
    }
    rvmm_ok(root, &["save", "-o", f, "localhost/multi"]);
    std::fs::remove_file(&file).expect("rm");

    // A store blob that went bad half way through the archive: the save fails and no file appears.
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).expect("index"))
            .expect("json");
    let last = idx["images"][0]["layers"][3]["digest"]
        .as_str()
        .expect("digest");
    let blob = root.join("blobs/sha256").join(&last[7..]);
    let mut b = std::fs::read(&blob).expect("blob");
    let n = b.len();
    b[n - 1] ^= 0xff;
    std::fs::write(&blob, b).expect("write");
    one_line_failure(
        &[
            "save",
            "--format",
            "oci-archive",
            "-o",
            f,
            "localhost/multi",
        ],
        "does not match its digest",
    );
    one_line_failure(&["save", "-o", f, "localhost/multi"], "blob");
    assert_eq!(
        std::fs::read_dir(out.path()).expect("readdir").count(),
        0,
        "a partial file was left"
    );
}

#[test]
fn login_logout_and_pull() {
    if !tools() {
        return;
    }
    let imgs = test_images();
    let reg = Registry::start(Some(("alice", "s3cret")));
    reg.push(
        &format!("oci:{}:latest", imgs.join("busybox").display()),
        "private/busybox:latest",
        &[],
        Some("alice:s3cret"),
    );
    let s = store();
    let root = s.path();
    let cfg = tempfile::tempdir().expect("tempdir");
    let cfgdir = cfg.path().join("docker");
    let cfgfile = cfgdir.join("config.json");
    let r = format!("{}/private/busybox", reg.host());
    let h = reg.host();

    // A wrong password: one line, status 1, nothing written.
    let (code, out, err) = rvmm_cfg(
        root,
        &cfgdir,
        &["login", "-u", "alice", "--password-stdin", &h],
        Some("wrong\n"),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("incorrect username or password"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(out.is_empty());
    assert!(
        !cfgdir.exists(),
        "a failed login wrote {}",
        cfgdir.display()
    );

    // Without credentials the pull is refused.
    let (code, _, err) = rvmm_cfg(root, &cfgdir, &["pull", "-q", &r], None);
    assert_ne!(code, 0);
    assert!(err.contains("authentication"), "{err}");

    // The right password: stored in Docker's format, mode 0600, other settings kept.
    std::fs::create_dir_all(&cfgdir).expect("mkdir");
    std::fs::write(
        &cfgfile,
        r#"{"auths":{"other.example:5000":{"auth":"eDp5"}},"detachKeys":"ctrl-p,ctrl-q"}"#,
    )
    .expect("write");
    let (code, out, err) = rvmm_cfg(
        root,
        &cfgdir,
        &[
            "login",
            "--username",
            "alice",
            "--password-stdin",
            &format!("http://{h}/"),
        ],
        Some("s3cret\n"),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "Login Succeeded");
    assert!(!err.contains("WARNING"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cfgfile)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfgfile).expect("read")).expect("json");
    use base64::Engine;
    assert_eq!(
        v["auths"][&h]["auth"],
        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
    );
    assert_eq!(v["auths"]["other.example:5000"]["auth"], "eDp5");
    assert_eq!(v["detachKeys"], "ctrl-p,ctrl-q");

    // pull uses it, without --creds.
    let (code, _, err) = rvmm_cfg(root, &cfgdir, &["pull", "-q", &r], None);
    assert_eq!(code, 0, "{err}");
    rvmm_ok(root, &["rmi", &r]);

    // -p works too, with docker's warning.
    let (code, _, err) = rvmm_cfg(
        root,
        &cfgdir,
        &["login", "-u", "alice", "-p", "s3cret", &h],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("WARNING! Using --password via the CLI is insecure"),
        "{err}"
    );

    // logout removes exactly that entry; the pull is refused again.
    let (code, out, err) = rvmm_cfg(root, &cfgdir, &["logout", &h], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("Removing login credentials for {h}")),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfgfile).expect("read")).expect("json");
    assert!(v["auths"].get(&h).is_none(), "{v}");
    assert_eq!(v["auths"]["other.example:5000"]["auth"], "eDp5");
    assert_eq!(v["detachKeys"], "ctrl-p,ctrl-q");
    let (code, _, err) = rvmm_cfg(root, &cfgdir, &["pull", "-q", &r], None);
    assert_ne!(code, 0);
    assert!(err.contains("authentication"), "{err}");
    let (code, _, err) = rvmm_cfg(root, &cfgdir, &["logout", &h], None);
    assert_eq!(code, 0);
    assert!(err.contains("Not logged in"), "{err}");

    // Bad input: one line, status 1.
    for (args, input, expect) in [
        (
            vec!["login", "--password-stdin", h.as_str()],
            Some("x\n"),
            "--password-stdin needs --username",
        ),
        (
            vec![
                "login",
                "-u",
                "alice",
                "-p",
                "x",
                "--password-stdin",
                h.as_str(),
            ],
            Some("x\n"),
            "mutually exclusive",
        ),
        (
            vec!["login", "-u", "alice", h.as_str()],
            None,
            "not a terminal",
        ),
        (
            vec!["login", "-u", "alice", "-p", "x", "bad host"],
            None,
            "invalid registry",
        ),
        (
            vec!["login", "-u", "alice", "--password-stdin", "127.0.0.1:1"],
            Some("x\n"),
            "cannot reach",
        ),
    ] {
        let (code, _, err) = rvmm_cfg(root, &cfgdir, &args, input);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
        assert_eq!(
            err.lines().filter(|l| !l.starts_with("WARNING")).count(),
            1,
            "{args:?}: {err}"
        );
    }
}

/// `rvmm login` against a registry that asks for a bearer token (as Docker Hub, GHCR and
/// Harbor do): a small token service on 127.0.0.1 stands in for one, since Debian's
/// docker-registry needs an external token server and certificates for that.
#[test]
fn login_with_a_token_service() {
    if !tools() {
        return;
    }
    use base64::Engine;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let good = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("bob:hunter2")
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req).to_string();
            let path = text
                .lines()
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .unwrap_or("")
                .to_string();
            let authz = text
                .lines()
                .find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                        .map(|(_, v)| v.trim().to_string())
                })
                .unwrap_or_default();
            log.lock().expect("lock").push(path.clone());
            let (status, extra, body) = if path == "/v2/" && authz == "Bearer tok-123" {
                ("200 OK", String::new(), "{}".to_string())
            } else if path == "/v2/" {
                (
                    "401 Unauthorized",
                    format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"test-registry\"\r\n"),
                    "{}".to_string(),
                )
            } else if path.starts_with("/token?") && authz == good {
                (
                    "200 OK",
                    String::new(),
                    r#"{"token":"tok-123"}"#.to_string(),
                )
            } else {
                ("401 Unauthorized", String::new(), "{}".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = c.write_all(head.as_bytes());
            let _ = c.write_all(body.as_bytes());
        }
    });
    let s = store();
    let cfg = tempfile::tempdir().expect("tempdir");
    let h = format!("127.0.0.1:{port}");
    let (code, _, err) = rvmm_cfg(
        s.path(),
        cfg.path(),
        &["login", "-u", "bob", "--password-stdin", &h],
        Some("wrong"),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("incorrect username or password"), "{err}");
    assert!(!cfg.path().join("config.json").exists());
    let (code, out, err) = rvmm_cfg(
        s.path(),
        cfg.path(),
        &["login", "-u", "bob", "--password-stdin", &h],
        Some("hunter2"),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "Login Succeeded");
    let paths = seen.lock().expect("lock").clone();
    let token = paths
        .iter()
        .find(|p| p.starts_with("/token?"))
        .expect("a token request");
    assert!(token.contains("service=test-registry"), "{token}");
    assert!(token.contains("account=bob"), "{token}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg.path().join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(
        v["auths"][&h]["auth"],
        base64::engine::general_purpose::STANDARD.encode("bob:hunter2")
    );
}
