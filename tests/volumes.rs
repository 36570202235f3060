//! Shared directories and volumes (issue 19), container isolation: `-v` binds, named and
//! anonymous volumes (seeded from the image), `--tmpfs`, `--mount`, `rvmm volume`, and mount
//! points that an image's symlinks cannot aim at the host. The same in VMs (virtio-fs) is
//! tests/vm_run.rs's (one snapshot for all its VM runs).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use common::run::{rvmm, Out, RunEnv};

static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> Option<RunEnv> {
    if !common::have_root() || !common::have_tools(&["umoci", "skopeo", "ip", "iptables"]) {
        return None;
    }
    Some(RunEnv::new(&SERIAL, &["busybox", "multi", "links"]))
}

/// `rvmm run --isolation=container --network=none FLAGS IMAGE sh -c SCRIPT`.
fn run(root: &Path, flags: &[&str], image: &str, script: &str) -> Out {
    let mut a = vec!["run", "--isolation=container", "--network=none"];
    a.extend_from_slice(flags);
    a.extend_from_slice(&[image, "sh", "-c", script]);
    rvmm(root, &a, None)
}

const BB: &str = "localhost/busybox";

fn volumes(root: &Path) -> Vec<String> {
    let o = rvmm(root, &["volume", "ls", "-q"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    o.stdout.lines().map(str::to_string).collect()
}

/// A host directory bound in: read, written as uid 1000 (owner, mode and mtime as the workload
/// set them, seen on the host), `:ro` and `readonly` refused with EROFS even after a remount
/// attempt, a symlink in the share resolved in the container's view only, 10,000 files listed.
#[test]
fn host_directories_keep_content_owner_mode_and_times() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let host = tempfile::tempdir().expect("tmp");
    let h = host.path();
    std::fs::set_permissions(h, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    std::fs::write(h.join("in"), "from host\n").expect("write");
    // A file only the host has, and a symlink to it inside the share.
    let secret = tempfile::tempdir().expect("tmp");
    std::fs::write(secret.path().join("secret"), "HOST ONLY\n").expect("write");
    std::os::unix::fs::symlink(secret.path().join("secret"), h.join("link")).expect("symlink");
    let many = h.join("many");
    std::fs::create_dir(&many).expect("mkdir");
    for i in 0..10_000 {
        std::fs::write(many.join(format!("f{i:05}")), "").expect("write");
    }

    let v = format!("{}:/h", h.display());
    let o = run(
        root,
        &["--rm", "-u", "1000", "-v", &v],
        BB,
        "cat /h/in; cat /h/link 2>/dev/null || echo link-does-not-resolve; \
         echo written > /h/new; chmod 640 /h/new; touch -d '2020-01-02 03:04:05' /h/new; \
         ls /h/many | wc -l; find /h/many -type f | wc -l",
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout.split_whitespace().collect::<Vec<_>>(),
        ["from", "host", "link-does-not-resolve", "10000", "10000"],
        "{}",
        o.stderr
    );
    let m = std::fs::metadata(h.join("new")).expect("new");
    assert_eq!(
        std::fs::read_to_string(h.join("new")).expect("new"),
        "written\n"
    );
    assert_eq!((m.uid(), m.gid()), (1000, 1000), "owner on the host");
    assert_eq!(m.mode() & 0o7777, 0o640, "mode on the host");
    assert_eq!(
        m.mtime(),
        1_577_934_245,
        "mtime on the host (2020-01-02 03:04:05 UTC)"
    );

    // Read-only, both spellings: EROFS, and the workload cannot remount it writable.
    let mnt = format!("type=bind,source={},target=/h,readonly", h.display());
    let ro = format!("{}:/h:ro", h.display());
    for flags in [["-v", ro.as_str()], ["--mount", mnt.as_str()]] {
        let mut f = vec!["--rm"];
        f.extend(flags);
        let o = run(
            root,
            &f,
            BB,
            "mount -o remount,rw /h 2>/dev/null && echo remounted; \
             echo x > /h/ro-write; cat /h/in",
        );
        assert!(!o.stdout.contains("remounted"), "{flags:?}: {}", o.stdout);
        assert!(
            o.stderr.contains("Read-only file system"),
            "{flags:?}: {}",
            o.stderr
        );
        assert_eq!(o.stdout, "from host\n", "{flags:?}");
        assert!(
            !h.join("ro-write").exists(),
            "{flags:?}: written through :ro"
        );
    }

    // `-v` makes a missing host directory (Docker's rule); `--mount` refuses one, in one line.
    let made = h.join("made/by/run");
    let o = run(
        root,
        &["--rm", "-v", &format!("{}:/m", made.display())],
        BB,
        "touch /m/x",
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(made.join("x").exists());
    let o = run(
        root,
        &[
            "--rm",
            "--mount",
            "type=bind,source=/nonexistent-rvmm,target=/m",
        ],
        BB,
        "true",
    );
    assert_eq!(o.code, 125);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("bind source path does not exist"),
        "{}",
        o.stderr
    );
}

/// Named volumes (made on first use, seeded from the image with owners and modes, surviving
/// runs), `nocopy`, anonymous volumes (gone with `--rm` or `rm -v`, refused removal while a run
/// uses them), `--tmpfs` with its size limit and modes, `--mount` forms, and the `volume`
/// subcommands (`create`, `ls`, `inspect`, `rm`, `prune`).
#[test]
fn named_anonymous_and_tmpfs_volumes() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let _cleanup = common::run::RemoveRuns {
        root,
        names: &["keep"],
    };
    let multi = "localhost/multi";

    // Seeded from the image's /data (the multi image: an opaque dir, a file of app's, 0600).
    let o = run(
        root,
        // As root: the volume's /data is root's 0755, as the image has it (multi runs as app).
        &["--rm", "-u", "0", "-v", "seeded:/data"],
        multi,
        "ls /data | tr '\\n' ' '; stat -c '%U %a' /data/owned; cat /data/soft; echo more > /data/added",
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout, "dir hard owned script soft app 600\nz\n",
        "{}",
        o.stderr
    );
    let data = root.join("volumes/seeded/_data");
    let m = std::fs::metadata(data.join("owned")).expect("seeded file");
    assert_eq!((m.uid(), m.mode() & 0o777), (1000, 0o600));
    assert_eq!(
        std::fs::read_link(data.join("soft")).expect("symlink copied as a symlink"),
        Path::new("/data/dir/z")
    );
    // A second run sees what the first wrote; an existing volume is not seeded again.
    let o = run(
        root,
        &["--rm", "--mount", "type=volume,source=seeded,target=/data"],
        multi,
        "cat /data/added; ls /data | wc -l",
    );
    assert_eq!(o.stdout, "more\n6\n", "{}", o.stderr);
    // nocopy: a new volume stays empty.
    let o = run(
        root,
        &["--rm", "-v", "bare:/data:nocopy"],
        multi,
        "ls -A /data | wc -l",
    );
    assert_eq!(o.stdout.trim(), "0", "{}", o.stderr);

    // Anonymous volumes: --rm takes its own along; a kept run holds its one until `rm -v`.
    let before = volumes(root);
    let o = run(root, &["--rm", "-v", "/scratch"], BB, "echo x > /scratch/x");
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        volumes(root),
        before,
        "an anonymous volume outlived its --rm run"
    );
    let o = run(
        root,
        &["--name", "keep", "-v", "/scratch"],
        BB,
        "echo x > /scratch/x",
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let anon: Vec<String> = volumes(root)
        .into_iter()
        .filter(|v| !before.contains(v))
        .collect();
    assert_eq!(anon.len(), 1, "{anon:?}");
    assert_eq!(anon[0].len(), 64);
    let o = rvmm(root, &["volume", "rm", &anon[0]], None);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("in use"), "{}", o.stderr);
    let i = rvmm(root, &["inspect", "keep"], None);
    let v: serde_json::Value = serde_json::from_str(&i.stdout).expect("inspect json");
    assert_eq!(v[0]["Mounts"][0]["Type"], "volume");
    assert_eq!(v[0]["Mounts"][0]["Name"], anon[0].as_str());
    assert_eq!(v[0]["Mounts"][0]["Destination"], "/scratch");
    let o = rvmm(root, &["rm", "-v", "keep"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(volumes(root), before, "rm -v left the anonymous volume");

    // tmpfs: its size limit, Docker's default flags, a mode.
    let o = run(
        root,
        &[
            "--rm",
            "--tmpfs",
            "/t:size=1m",
            "--mount",
            "type=tmpfs,target=/t2,tmpfs-mode=1777",
        ],
        BB,
        "mount | grep ' /t '; stat -c %a /t2; dd if=/dev/zero of=/t/big bs=1k count=2048",
    );
    assert_ne!(o.code, 0);
    assert!(
        o.stdout.contains("nosuid,nodev,noexec") && o.stdout.contains("size=1024k"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.ends_with("1777\n"), "{}", o.stdout);
    assert!(o.stderr.contains("No space left on device"), "{}", o.stderr);

    // The volume subcommands.
    let o = rvmm(
        root,
        &["volume", "create", "--label", "team=db", "made"],
        None,
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "made\n"), "{}", o.stderr);
    let o = rvmm(root, &["volume", "inspect", "made"], None);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("volume inspect json");
    assert_eq!(v[0]["Name"], "made");
    assert_eq!(v[0]["Driver"], "local");
    assert_eq!(v[0]["Labels"]["team"], "db");
    assert_eq!(
        v[0]["Mountpoint"],
        root.join("volumes/made/_data").display().to_string()
    );
    let o = rvmm(
        root,
        &["volume", "ls", "--filter", "label=team=db", "-q"],
        None,
    );
    assert_eq!(o.stdout, "made\n");
    let o = rvmm(root, &["volume", "inspect", "nope"], None);
    assert_eq!(o.code, 1);
    let o = rvmm(root, &["volume", "create", "bad/name"], None);
    assert_eq!(o.code, 125);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    let o = rvmm(root, &["volume", "rm", "bare"], None);
    assert_eq!((o.code, o.stdout.as_str()), (0, "bare\n"), "{}", o.stderr);
    assert!(!root.join("volumes/bare").exists());
    assert_eq!(rvmm(root, &["volume", "rm", "bare"], None).code, 1);
    assert_eq!(rvmm(root, &["volume", "rm", "-f", "bare"], None).code, 0);
    // prune: anonymous ones only, unless -a.
    let o = run(root, &["--name", "keep", "-v", "/scratch"], BB, "true");
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(rvmm(root, &["rm", "keep"], None).code, 0);
    let o = rvmm(root, &["volume", "prune", "-f"], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("Deleted Volumes:\n"), "{}", o.stdout);
    assert_eq!(volumes(root), ["made", "seeded"]);
    let o = rvmm(root, &["volume", "prune", "-a", "-f"], None);
    assert!(o.stdout.contains("Total reclaimed space"), "{}", o.stdout);
    assert!(volumes(root).is_empty());

    // Bad flags: one line, status 125, nothing made.
    for flags in [
        vec!["-v", "bad name:/x"],
        vec!["-v", "db:relative"],
        vec!["--tmpfs", "/t:size=lots"],
        vec!["--mount", "type=nfs,target=/x"],
        vec!["-v", "a:/same", "--tmpfs", "/same"],
    ] {
        let mut f = vec!["--rm"];
        f.extend(flags.iter().copied());
        let o = run(root, &f, BB, "true");
        assert_eq!(o.code, 125, "{flags:?}");
        assert_eq!(o.stderr.lines().count(), 1, "{flags:?}: {}", o.stderr);
    }
    assert!(volumes(root).is_empty(), "a refused run made a volume");
}

/// An image whose symlinks aim at the host's root as the container runtime sees it while it
/// mounts (`/.rvmm-old/...`) or up out of the root: a mount point or a volume's copy-up through
/// them never touches the host; they resolve inside the container's root, where the missing
/// directories are made (Docker's securejoin).
#[test]
fn image_symlinks_cannot_aim_mounts_at_the_host() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let target = Path::new("/tmp/rvmm-escape-test");
    assert!(Path::new("/tmp").is_dir());
    let _ = std::fs::remove_dir_all(target);
    let host = tempfile::tempdir().expect("tmp");
    let links = "localhost/links";
    let inner = "rvmm-escape-test";
    for (flags, works) in [
        (
            vec![
                "-v".to_string(),
                format!("{}:/mnt/escape/{inner}", host.path().display()),
            ],
            true,
        ),
        (
            vec!["-v".to_string(), format!("esc:/mnt/escape/{inner}")],
            true,
        ),
        (
            vec!["--tmpfs".to_string(), format!("/mnt/escape/{inner}")],
            true,
        ),
        // Copy-up from the symlink's target: nothing of the host's /tmp may land in the volume.
        (vec!["-v".to_string(), "esc2:/mnt/escape".to_string()], true),
        // Up and out resolves to the container's own /tmp.
        (
            vec!["--tmpfs".to_string(), format!("/mnt/up/{inner}")],
            true,
        ),
    ] {
        let mut f = vec!["--rm"];
        f.extend(flags.iter().map(String::as_str));
        let o = run(
            root,
            &f,
            links,
            &format!("mount | grep -cE '{inner}|rvmm-old'"),
        );
        assert!(
            !target.exists(),
            "{flags:?} made {} on the host: {}",
            target.display(),
            o.stderr
        );
        assert_eq!(o.code == 0, works, "{flags:?}: {}{}", o.stdout, o.stderr);
        if !works {
            assert_eq!(o.stderr.lines().count(), 1, "{flags:?}: {}", o.stderr);
        }
    }
    let copied = std::fs::read_dir(root.join("volumes/esc2/_data"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(copied, 0, "the host's /tmp was copied into a volume");
    let _ = rvmm(root, &["volume", "prune", "-a", "-f"], None);
}

/// The image's `VOLUME /var/lib/seeded` becomes an anonymous volume filled from the image (gone
/// with `--rm`, kept until `rm -v` otherwise, not made when a flag mounts something there), and a
/// mount on a dangling symlink (`/srv/dangling -> /srv/real/data`) lands on its target, made
/// inside the root, as with Docker.
#[test]
fn image_volumes_and_mounts_on_dangling_symlinks() {
    let Some(env) = setup() else { return };
    let root = env.store.path();
    let links = "localhost/links";
    let seeded = "cat /var/lib/seeded/seed; mount | grep -c ' /var/lib/seeded '";
    let o = run(root, &["--rm"], links, seeded);
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "seeded\n1\n"),
        "{}",
        o.stderr
    );
    assert!(volumes(root).is_empty(), "--rm left the image's volume");

    let o = run(
        root,
        &["--name", "iv"],
        links,
        "echo more > /var/lib/seeded/more",
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = volumes(root);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].len(), 64, "not an anonymous volume: {v:?}");
    let data = root.join("volumes").join(&v[0]).join("_data");
    assert_eq!(
        std::fs::read_to_string(data.join("seed")).expect("seed"),
        "seeded\n"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("more")).expect("more"),
        "more\n"
    );
    let i = rvmm(root, &["inspect", "iv"], None);
    assert!(i.stdout.contains("/var/lib/seeded"), "{}", i.stdout);
    assert_eq!(rvmm(root, &["rm", "-v", "iv"], None).code, 0);
    assert!(volumes(root).is_empty(), "rm -v left the image's volume");

    // A flag's mount on the volume's path replaces it.
    let host = tempfile::tempdir().expect("tmp");
    let o = run(
        root,
        &[
            "--name",
            "iv2",
            "-v",
            &format!("{}:/var/lib/seeded", host.path().display()),
        ],
        links,
        "ls /var/lib/seeded | wc -l",
    );
    assert_eq!((o.code, o.stdout.trim()), (0, "0"), "{}", o.stderr);
    assert!(
        volumes(root).is_empty(),
        "a bind on the image's volume still made one"
    );
    assert_eq!(rvmm(root, &["rm", "-v", "iv2"], None).code, 0);

    // Mounts on a dangling symlink: the target is made in the root.
    let o = run(
        root,
        &["--rm", "-v", "dv:/srv/dangling"],
        links,
        "echo hi > /srv/dangling/f && cat /srv/real/data/f",
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "hi\n"), "{}", o.stderr);
    let f = root.join("volumes/dv/_data/f");
    assert_eq!(std::fs::read_to_string(f).expect("dv"), "hi\n");
    let o = run(
        root,
        &["--rm", "--tmpfs", "/srv/dangling"],
        links,
        "mount | grep -c ' /srv/real/data '",
    );
    assert_eq!((o.code, o.stdout.trim()), (0, "1"), "{}", o.stderr);
    let _ = rvmm(root, &["volume", "prune", "-a", "-f"], None);
}
