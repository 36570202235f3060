//! Test images (built by scripts/make-test-images.sh from busybox-static) and a real registry
//! (Debian's docker-registry) on 127.0.0.1.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The directory of test images, built once per version of the script (cached under target/).
pub fn test_images() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("scripts/make-test-images.sh");
    let body = std::fs::read(&script).expect("read make-test-images.sh");
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        body.hash(&mut h);
        h.finish()
    };
    let out = root.join(format!("target/test-images/{hash:016x}"));
    if !out.join(".done").exists() {
        let st = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .status()
            .expect("run make-test-images.sh");
        assert!(st.success(), "make-test-images.sh failed");
    }
    out
}

/// The Debian minbase test image (scripts/make-debian-image.sh): an OCI layout at the returned
/// path, tag latest, built once per version of the script (cached under target/).
pub fn debian_image() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("scripts/make-debian-image.sh");
    let body = std::fs::read(&script).expect("read make-debian-image.sh");
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        body.hash(&mut h);
        h.finish()
    };
    let out = root.join(format!("target/test-images/debian-{hash:016x}"));
    if !out.join(".done").exists() {
        let st = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .status()
            .expect("run make-debian-image.sh");
        assert!(st.success(), "make-debian-image.sh failed");
    }
    out.join("debian")
}

/// A fresh store directory for one test.
pub fn store() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rvmm-store-")
        .tempdir()
        .expect("tempdir")
}

/// Runs `rvmm --root ROOT args…`, returning (status code, stdout, stderr).
pub fn rvmm(root: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(super::rvmm_bin())
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run rvmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Like [`rvmm`] but asserts success and returns stdout.
pub fn rvmm_ok(root: &Path, args: &[&str]) -> String {
    let (code, out, err) = rvmm(root, args);
    assert_eq!(code, 0, "rvmm {args:?} failed: {err}");
    out
}

/// Every file under `dir` with its size (a snapshot to compare a store before and after).
pub fn tree(dir: &Path) -> Vec<(String, u64)> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<(String, u64)>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).expect("stat");
            let rel = p.strip_prefix(base).expect("prefix").display().to_string();
            if rel.ends_with("lock") {
                continue;
            }
            if m.is_dir() {
                out.push((rel + "/", 0));
                walk(base, &p, out);
            } else {
                out.push((rel, m.len()));
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Debian's docker-registry on 127.0.0.1:PORT with filesystem storage in a temp dir.
pub struct Registry {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// `htpasswd`: Some((user, pass)) turns on basic auth.
    pub fn start(htpasswd: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut auth = String::new();
        if let Some((u, p)) = htpasswd {
            let file = dir.path().join("htpasswd");
            let st = Command::new("htpasswd")
                .args(["-Bbc"])
                .arg(&file)
                .args([u, p])
                .stderr(Stdio::null())
                .status()
                .expect("htpasswd");
            assert!(st.success());
            auth = format!(
                "auth:\n  htpasswd:\n    realm: rvmm-test\n    path: {}\n",
                file.display()
            );
        }
        let cfg = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("data").display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).expect("write config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            port,
            child,
            _dir: dir,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `skopeo copy [extra] SRC docker://127.0.0.1:PORT/DEST`.
    pub fn push(&self, src: &str, dest: &str, extra: &[&str], creds: Option<&str>) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "-q", "--dest-tls-verify=false"])
            .args(extra);
        if let Some(cr) = creds {
            c.arg("--dest-creds").arg(cr);
        }
        let st = c
            .arg(src)
            .arg(format!("docker://{}/{dest}", self.host()))
            .status()
            .expect("skopeo");
        assert!(st.success(), "skopeo copy {src} failed");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
