//! `unpack::unpack` on an arbitrary (uncompressed) tar stream.
//!
//! Each input is unpacked twice into fresh directories: with `UnpackOptions::for_current_user()`
//! (privileged when the fuzzer runs as root) and unprivileged with a lower layer (so hardlinks to
//! lower-layer files are copied). The layout of one iteration is
//!
//! ```text
//! BASE/l1/l2/l3/run/{dest, canary, lower/etc/passwd}
//! ```
//!
//! Invariants, whatever `unpack` returns (it must never panic):
//! - nothing was created outside `dest`: `run` holds exactly `dest`, `canary`, `lower`; `l3`, `l2`,
//!   `l1` and `BASE` hold only their one child (catches `..` escapes up to five levels);
//! - the canary and the lower layer's file keep their content and have a single link (not
//!   hard-linked into `dest`, not written through a link), and the lower layer gained nothing;
//! - `run`, the canary and every entry of the lower layer keep their mode, owner and mtime.
//!
//! BASE is created in `$RVMM_FUZZ_TMPDIR`, else `/dev/shm`, else the temp dir. Writes are capped
//! with RLIMIT_FSIZE (a GNU sparse header can declare gigabytes of zeros).
#![no_main]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rvmm::image::unpack::{unpack, UnpackOptions};

const CANARY: &[u8] = b"canary: must not change\n";
const LOWER: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n";
/// Largest file an iteration may write.
const MAX_FILE: u64 = 16 << 20;

struct Base {
    dir: PathBuf,
    /// BASE/l1/l2/l3
    deep: PathBuf,
    chain: Vec<(PathBuf, &'static str)>,
}

static BASE: OnceLock<Base> = OnceLock::new();

fn base() -> &'static Base {
    BASE.get_or_init(|| {
        // SAFETY: plain libc calls with valid arguments; ignoring SIGXFSZ makes an over-limit
        // write fail with EFBIG instead of killing the process.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: MAX_FILE,
                rlim_max: MAX_FILE,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
        // tmpfs by default: on a disk, the per-iteration mkdir/rm is I/O-bound (30x slower).
        let parent = std::env::var_os("RVMM_FUZZ_TMPDIR")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("rvmm-fuzz-unpack.")
            .tempdir_in(parent)
            .expect("tempdir")
            .keep();
        // SAFETY: `cleanup` is an `extern "C" fn()` that stays valid for the life of the process.
        unsafe { libc::atexit(cleanup) };
        let deep = dir.join("l1/l2/l3");
        fs::create_dir_all(&deep).expect("mkdir");
        let chain = vec![
            (dir.clone(), "l1"),
            (dir.join("l1"), "l2"),
            (dir.join("l1/l2"), "l3"),
            (deep.clone(), "run"),
        ];
        Base { dir, deep, chain }
    })
}

/// Removes BASE when libFuzzer exits (statics are never dropped).
extern "C" fn cleanup() {
    if let Some(b) = BASE.get() {
        unlock(&b.dir);
        let _ = fs::remove_dir_all(&b.dir);
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            e.expect("dirent")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// What must not change on the entries next to `dest`: mode, owner, mtime, link count.
fn meta(p: &Path) -> (u32, u32, u32, i64, i64, u64) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{} is gone: {e}", p.display()));
    (
        m.mode(),
        m.uid(),
        m.gid(),
        m.mtime(),
        m.mtime_nsec(),
        m.nlink(),
    )
}

fn check_file(p: &Path, want: &[u8]) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{} is gone: {e}", p.display()));
    assert!(m.is_file(), "{} is no longer a regular file", p.display());
    assert_eq!(m.nlink(), 1, "{} was hard-linked", p.display());
    assert_eq!(fs::read(p).expect("read"), want, "{} changed", p.display());
}

/// Makes every directory writable and searchable again (layers may carry mode 000 dirs), without
/// following symlinks, so the run directory can be removed.
fn unlock(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                unlock(&e.path());
            }
        }
    }
}

/// Which options an iteration unpacks with.
#[derive(Clone, Copy)]
enum Mode {
    /// `UnpackOptions::for_current_user()`.
    CurrentUser,
    /// Unprivileged, with `run/lower` as the layer below.
    WithLower,
}

fn one(data: &[u8], mode: Mode) {
    let b = base();
    let run = b.deep.join("run");
    let dest = run.join("dest");
    let canary = run.join("canary");
    let lower = run.join("lower");
    fs::create_dir_all(&dest).expect("mkdir dest");
    fs::create_dir_all(lower.join("etc")).expect("mkdir lower");
    fs::write(&canary, CANARY).expect("canary");
    fs::write(lower.join("etc/passwd"), LOWER).expect("lower file");
    let lowers = [lower.clone()];
    let watched = [
        run.clone(),
        canary.clone(),
        lower.clone(),
        lower.join("etc"),
        lower.join("etc/passwd"),
    ];
    let before: Vec<_> = watched.iter().map(|p| meta(p)).collect();

    let opts = match mode {
        Mode::CurrentUser => UnpackOptions::for_current_user(),
        Mode::WithLower => UnpackOptions {
            privileged: false,
            lowers: &lowers,
        },
    };
    let _ = unpack(data, &dest, opts);

    assert_eq!(names(&run), ["canary", "dest", "lower"]);
    for (dir, child) in &b.chain {
        assert_eq!(
            names(dir),
            [*child],
            "something was created in {}",
            dir.display()
        );
    }
    check_file(&canary, CANARY);
    check_file(&lower.join("etc/passwd"), LOWER);
    assert_eq!(names(&lower), ["etc"]);
    assert_eq!(names(&lower.join("etc")), ["passwd"]);
    for (p, b) in watched.iter().zip(&before) {
        assert_eq!(&meta(p), b, "metadata of {} changed", p.display());
    }

    unlock(&run);
    fs::remove_dir_all(&run).expect("cleanup");
}

fuzz_target!(|data: &[u8]| {
    one(data, Mode::CurrentUser);
    one(data, Mode::WithLower);
});
