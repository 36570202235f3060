//! The contract between rvmm and a workload, shared by the host binary and the guest's PID 1.
//!
//! [`RunSpec`] is what both isolations consume: a behaviour difference between them is a bug.

use serde::{Deserialize, Serialize};

/// Everything needed to start the workload, fully resolved (no image lookups left to do).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RunSpec {
    /// argv[0] is the program (resolved against PATH from `env` inside the rootfs when it has no '/').
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries, image env first, flags override.
    pub env: Vec<String>,
    /// Working directory inside the rootfs (absolute).
    pub cwd: String,
    /// Numeric identity, already resolved from the image's /etc/passwd and /etc/group.
    pub user: User,
    pub hostname: String,
    /// Allocate a pty for the workload (`-t`).
    pub tty: bool,
    /// Attach stdin (`-i`).
    pub stdin: bool,
    /// Root filesystem read-only (`--read-only`).
    pub read_only: bool,
    pub limits: Limits,
    pub network: Network,
    /// Mounts (`-v`, `--mount`, `--tmpfs`), in order.
    pub mounts: Vec<Mount>,
    /// Signal to stop the workload with (image StopSignal), as a number.
    pub stop_signal: i32,
    /// Privileges of the workload, decided once on the host before the isolation is chosen; the
    /// container child and rvmm-init apply exactly these.
    #[serde(default)]
    pub security: Security,
    /// Resource limits the workload starts with (both isolations set exactly these).
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    /// The contents of the workload's /etc/hostname, /etc/hosts and /etc/resolv.conf, written
    /// once on the host once the network is known.
    #[serde(default)]
    pub etc: EtcFiles,
    /// `--privileged`: beside the privileges in `security`, no masked or read-only paths, a
    /// writable /sys and every device of the kernel the workload runs on (the host's in a
    /// container, the guest's in a VM).
    #[serde(default)]
    pub privileged: bool,
    /// `--sysctl`: (key as `net.ipv4.ip_forward`, value), written under /proc/sys in the
    /// workload's namespaces (container) or the guest (VM) before it starts.
    #[serde(default)]
    pub sysctls: Vec<(String, String)>,
    /// `--shm-size`: the size of /dev/shm in bytes (None: 64 MiB, Docker's default).
    #[serde(default)]
    pub shm_size: Option<u64>,
    /// The image's labels with `--label` over them (shown by `inspect`, `ps --filter label=`).
    #[serde(default)]
    pub labels: Vec<(String, String)>,
    /// `--stop-timeout`: seconds `stop` waits after the stop signal before SIGKILL (None:
    /// Docker's 10).
    #[serde(default)]
    pub stop_timeout: Option<i32>,
    /// `--init`: a tiny init runs as the workload's PID 1, forwards signals to the program and
    /// reaps orphans (in a VM rvmm-init already does both, and the program is never PID 1).
    #[serde(default)]
    pub init: bool,
    /// `--cpuset-cpus`: the CPUs (of the kernel the workload runs on) it may run on, as an
    /// affinity mask set before exec. Empty: all.
    #[serde(default)]
    pub cpus_allowed: Vec<u32>,
    /// `--device`: host device nodes made in the workload's /dev (container isolation only).
    #[serde(default)]
    pub devices: Vec<DeviceNode>,
    /// VM isolation: the root is the first shared directory (share 0: an OCI bundle's rootfs,
    /// rvmm-oci), written in place, instead of the image disk under a tmpfs overlay; the
    /// mounts' shares follow it (1, 2, ...).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub root_shared: bool,
    /// VM isolation: where the host found argv[0] along PATH in the image (`runspec::exec_hint`).
    /// The guest execs it if it is there and executable, and otherwise walks PATH itself: a
    /// guest walking PATH over a cold disk reads every directory it misses in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_hint: Option<String>,
}

/// A device node for the workload's /dev.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceNode {
    /// Absolute path in the workload.
    pub path: String,
    /// 'c' or 'b'.
    pub kind: char,
    pub major: u32,
    pub minor: u32,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Docker's cgroup permissions: some of "rwm".
    pub access: String,
}

/// Docker's `--ulimit` names, indexed by Linux's RLIMIT_* numbers (x86_64 and the generic
/// numbering): `RLIMIT_NAMES[RLIMIT_NOFILE] == "nofile"`.
pub const RLIMIT_NAMES: [&str; 16] = [
    "cpu",
    "fsize",
    "data",
    "stack",
    "core",
    "rss",
    "nproc",
    "nofile",
    "memlock",
    "as",
    "locks",
    "sigpending",
    "msgqueue",
    "nice",
    "rtprio",
    "rttime",
];

/// One resource limit: `resource` is the RLIMIT_* number.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// The files a runtime puts over the image's /etc (bind mounts: the image keeps its own).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcFiles {
    pub hostname: String,
    pub hosts: String,
    pub resolv_conf: String,
}

impl EtcFiles {
    /// (name under /etc, content).
    pub fn entries(&self) -> [(&'static str, &str); 3] {
        [
            ("hostname", self.hostname.as_str()),
            ("hosts", self.hosts.as_str()),
            ("resolv.conf", self.resolv_conf.as_str()),
        ]
    }
}

/// What every workload's root holds, whichever isolation runs it: pure data, applied by the
/// `rvmm-workload` crate in the container child and in rvmm-init alike.
pub mod rootfs {
    /// The PATH a workload gets when its image sets none (Docker's).
    pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

    /// A character device in the workload's /dev.
    pub struct Device {
        pub name: &'static str,
        pub major: u32,
        pub minor: u32,
        pub mode: u32,
    }

    const fn dev(name: &'static str, major: u32, minor: u32) -> Device {
        Device {
            name,
            major,
            minor,
            mode: 0o666,
        }
    }

    /// Docker's default device nodes.
    pub const DEVICES: &[Device] = &[
        dev("null", 1, 3),
        dev("zero", 1, 5),
        dev("full", 1, 7),
        dev("random", 1, 8),
        dev("urandom", 1, 9),
        dev("tty", 5, 0),
    ];

    /// Symlinks in /dev: (target, link).
    pub const DEV_LINKS: &[(&str, &str)] = &[
        ("pts/ptmx", "/dev/ptmx"),
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
        ("/proc/kcore", "/dev/core"),
    ];

    /// Paths hidden from the workload (Docker's masked paths): an empty tmpfs over a directory,
    /// /dev/null over a file.
    pub const MASKED: &[&str] = &[
        "/proc/asound",
        "/proc/acpi",
        "/proc/interrupts",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/scsi",
        "/sys/firmware",
        "/sys/devices/virtual/powercap",
    ];

    /// Paths the workload sees read-only (Docker's read-only paths).
    pub const READONLY: &[&str] = &[
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ];

    /// /etc/hosts for `hostname` at `addr` (127.0.1.1 without a network address).
    pub fn hosts(hostname: &str, addr: Option<&str>) -> String {
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{hostname}\n",
            addr.unwrap_or("127.0.1.1")
        )
    }
}

/// Capabilities and seccomp, as a runtime applies them right before exec.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Security {
    /// Apply nothing (a spec from an older host): the workload keeps the guest's full root.
    pub enforce: bool,
    /// Bit n set: capability n stays in the bounding set (and, for uid 0, in the effective and
    /// permitted sets).
    pub caps: u64,
    /// A classic BPF seccomp program for x86_64, as (code, jt, jf, k) instructions. Empty: no
    /// filter. Installed while the process still has CAP_SYS_ADMIN (before the user and
    /// capabilities change, as runc and crun do), so it needs no no_new_privs.
    pub seccomp: Vec<(u16, u8, u8, u32)>,
    /// Set no_new_privs (`--security-opt no-new-privileges`): setuid and file capabilities of
    /// programs the workload executes grant nothing. Off by default, as in Docker.
    #[serde(default)]
    pub no_new_privs: bool,
    /// Bit n set: capability n is raised in the inheritable and ambient sets (and kept in the
    /// effective and permitted ones whatever the user), so a non-root workload keeps it across
    /// exec: OCI's `process.capabilities.ambient`. Only bits also in `caps`; Docker sets none.
    #[serde(default)]
    pub ambient: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// `--memory`, bytes.
    pub memory_bytes: Option<u64>,
    /// `--cpus`, fractional CPUs.
    pub cpus: Option<f64>,
    /// `--pids-limit`.
    pub pids: Option<u64>,
    /// `--cpu-shares`: relative CPU weight (cgroup v1 cpu.shares; v2 cpu.weight from it).
    #[serde(default)]
    pub cpu_shares: Option<u64>,
    /// `--memory-swap`: memory plus swap, bytes; `Some(u64::MAX)` is unlimited swap (-1).
    #[serde(default)]
    pub memory_swap: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Network {
    pub mode: NetworkMode,
    /// `-p` publications.
    pub ports: Vec<PortMapping>,
    /// Filled in at run time from the IPAM (bridge mode): address/prefix, gateway, DNS servers.
    pub address: Option<String>,
    pub gateway: Option<String>,
    /// `--dns` servers; when none are given, the host's (filled in at run time).
    pub dns: Vec<String>,
    /// `--dns-search` domains (`.` alone: none); empty: the host's search line.
    #[serde(default)]
    pub dns_search: Vec<String>,
    /// `--add-host`: (name, address) lines for /etc/hosts; the address `host-gateway` becomes
    /// the bridge's gateway at run time.
    #[serde(default)]
    pub extra_hosts: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    None,
    #[default]
    Bridge,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// A mount of the workload's root filesystem (`-v`, `--mount`, `--tmpfs`), in the order given.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// A host path (bind), a volume's name (empty: anonymous), or nothing (tmpfs).
    pub source: String,
    /// An absolute path in the workload's root.
    pub destination: String,
    pub read_only: bool,
    #[serde(default)]
    pub kind: MountKind,
    /// A tmpfs's options as mount(8) takes them (`size=64m,mode=1777,nosuid,...`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub options: String,
    /// A volume that is still empty is first filled with what the image has at `destination`,
    /// as Docker does (not with `nocopy`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub copy_up: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// `source` is a host directory or file.
    #[default]
    Bind,
    /// A volume of rvmm's store: `source` is its name (empty: a new anonymous volume) as the
    /// flags give it, and the volume's directory (bound as with `Bind`) once the run core has
    /// made it.
    Volume,
    /// A new tmpfs.
    Tmpfs,
}

/// What the host hands rvmm-init in `SPEC` frames: the run, and what makes this guest unique
/// even when many are restored from one snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Start {
    pub spec: RunSpec,
    /// Random bytes from the host, mixed into the guest's RNG (which is then reseeded) before
    /// anything of the workload runs.
    pub entropy: Vec<u8>,
    /// The host's CLOCK_REALTIME: seconds and nanoseconds. The guest steps its clock to it.
    pub realtime: (i64, u32),
    /// The MAC for eth0 (set before the link comes up), when the VM has a network device.
    pub mac: Option<[u8; 6]>,
    /// `spec.security` is left empty: apply the `Security` the initramfs carried at boot
    /// (`/rvmm/security.json`). It is the same for every run of a host, and ~20 KB less to send
    /// over the channel.
    #[serde(default)]
    pub boot_security: bool,
    /// A root-only `Start` (its `spec` is not the run's and is not used): rvmm-init builds the
    /// image's root (disk, overlay, /proc, /sys, /dev, the /etc mount points), says `ROOTED`, and
    /// waits for the run's own `Start`. The host snapshots the guest in between, so later runs
    /// of the image start there (docs/snapshots.md, image snapshots).
    #[serde(default)]
    pub pause_at_root: bool,
    /// With `pause_at_root`: files of the image (absolute, resolved in its root) to read into the
    /// page cache before ROOTED, so the image snapshot holds them: the program the run will exec
    /// (rvmm-init adds an ELF program's interpreter).
    #[serde(default)]
    pub prefetch: Vec<String>,
}

/// `rvmm exec` in a VM: what the guest needs to start the process, on top of the workload's own
/// spec (whose root, privileges and limits it shares).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// The whole environment (the workload's with the exec's `-e` on top).
    pub env: Vec<String>,
    /// `-u`, resolved by the host; the workload's user when absent.
    pub user: Option<User>,
    /// `-w`; the workload's working directory when absent.
    pub cwd: Option<String>,
    /// `-t`.
    pub tty: bool,
    /// `-i`.
    pub stdin: bool,
    /// The terminal's size with `-t`: rows, cols.
    pub winsize: Option<(u16, u16)>,
}

/// The ports of the host ↔ guest channel, a multiport virtio-console: the guest finds each one by
/// its name (/sys/class/virtio-ports/vport*/name). See docs/vm-channel.md.
pub mod port {
    /// Frames both ways (`frame`); the host never gets a frame before the output the guest wrote
    /// on the other ports before sending it.
    pub const CONTROL: &str = "rvmm.control";
    /// The workload's stdin (host → guest, raw bytes; the host closing it is EOF).
    pub const STDIN: &str = "rvmm.stdin";
    /// The workload's stdout (guest → host, raw bytes; with `-t` everything from the pty).
    pub const STDOUT: &str = "rvmm.stdout";
    /// The workload's stderr (guest → host, raw bytes).
    pub const STDERR: &str = "rvmm.stderr";
    /// In port order (port 0, 1, ...).
    pub const ALL: [&str; 4] = [CONTROL, STDIN, STDOUT, STDERR];
}

/// The frames of the channel's control port (a raw byte stream): `[kind u8][len u32 LE][payload]`.
/// See docs/vm-channel.md.
pub mod frame {
    /// Guest → host: workload stdout bytes (unused since the workload's output has ports of its
    /// own; accepted for compatibility).
    pub const STDOUT: u8 = 1;
    /// Guest → host: workload stderr bytes (unused, as `STDOUT`).
    pub const STDERR: u8 = 2;
    /// Guest → host: the workload's exit status, i32 LE (Docker numbering: 128+n for signal n).
    pub const EXIT: u8 = 3;
    /// Guest → host: the workload started. Payload (may be empty): guest uptime in ms, u32 LE, when
    /// PID 1 started, when the workload was exec'd, and (optional) when the `Start` arrived.
    pub const STARTED: u8 = 4;
    /// Guest → host: the workload could not start: u8 status (125/126/127) then a UTF-8 message.
    pub const FAILED: u8 = 5;
    /// Guest → host: PID 1 is up and waits for its `Start` (empty). A snapshot is taken here.
    pub const READY: u8 = 6;
    /// Host → guest: a piece of the JSON `Start`; pieces are concatenated until `SPEC_END`.
    pub const SPEC: u8 = 7;
    /// Host → guest: the `Start` is complete (empty).
    pub const SPEC_END: u8 = 8;
    /// Guest → host: the image's root is built, after a `Start` with `pause_at_root` (empty). An
    /// image snapshot is taken here; the guest then waits for the run's `Start`.
    pub const ROOTED: u8 = 9;
    /// Host → guest: stdin bytes (unused since stdin has a port of its own).
    pub const STDIN: u8 = 10;
    /// Host → guest: stdin reached EOF (unused: the host closes the stdin port).
    pub const STDIN_EOF: u8 = 11;
    /// Host → guest: deliver a signal to the workload, i32 LE.
    pub const SIGNAL: u8 = 12;
    /// Host → guest: terminal size, rows u16 LE then cols u16 LE.
    pub const WINSIZE: u8 = 13;

    // `rvmm exec` (docs/vm-channel.md). On the channel each exec frame's payload starts with the
    // exec's id (u32 LE, chosen by the host); between `rvmm exec` and the run's process (the
    // run directory's exec.sock) the same kinds go without it.
    /// Host → guest: start a process, JSON [`crate::ExecRequest`].
    pub const EXEC: u8 = 14;
    /// Host → guest: bytes for its stdin.
    pub const EXEC_STDIN: u8 = 15;
    /// Host → guest: its stdin ended (empty).
    pub const EXEC_STDIN_EOF: u8 = 16;
    /// Host → guest: deliver a signal to it, i32 LE.
    pub const EXEC_SIGNAL: u8 = 17;
    /// Host → guest: its terminal size, rows u16 LE then cols u16 LE.
    pub const EXEC_WINSIZE: u8 = 18;
    /// Guest → host: it started (empty).
    pub const EXEC_STARTED: u8 = 19;
    /// Guest → host: its stdout bytes (with a tty: everything).
    pub const EXEC_STDOUT: u8 = 20;
    /// Guest → host: its stderr bytes.
    pub const EXEC_STDERR: u8 = 21;
    /// Guest → host: its exit status, i32 LE (Docker numbering); the exec's last frame.
    pub const EXEC_EXIT: u8 = 22;
    /// Guest → host: it could not start: u8 status (125/126/127) then a UTF-8 message; the
    /// exec's last frame.
    pub const EXEC_FAILED: u8 = 23;

    /// Prefixes `payload` with an exec id.
    pub fn with_id(id: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + payload.len());
        v.extend_from_slice(&id.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Splits an exec frame's payload into its id and the rest.
    pub fn split_id(payload: &[u8]) -> Option<(u32, &[u8])> {
        let id = le32_at(payload, 0).map(u32::from_le_bytes)?;
        Some((id, &payload[4..]))
    }

    /// Largest payload either side sends or accepts.
    pub const MAX_PAYLOAD: usize = 64 * 1024;

    /// The little-endian 32-bit word at byte `at` of a payload, if the payload is that long.
    pub fn le32_at(payload: &[u8], at: usize) -> Option<[u8; 4]> {
        payload.get(at..at.checked_add(4)?)?.try_into().ok()
    }

    /// Encodes `payload` as frames of `kind` of at most [`MAX_PAYLOAD`] bytes each.
    pub fn encode_chunked(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(payload.len() + 5 * (1 + payload.len() / MAX_PAYLOAD));
        for c in payload.chunks(MAX_PAYLOAD) {
            v.extend(encode(kind, c));
        }
        v
    }

    /// Encodes one frame.
    pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(5 + payload.len());
        v.push(kind);
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Incremental decoder: feed bytes, take whole frames.
    #[derive(Default)]
    pub struct Decoder {
        buf: Vec<u8>,
        /// Where the next frame starts in `buf`: frames taken are dropped at the next `feed`,
        /// not one by one (which moved the rest of the buffer for every frame: quadratic in
        /// the number of small frames a read brings).
        pos: usize,
    }

    impl Decoder {
        pub fn feed(&mut self, bytes: &[u8]) {
            self.buf.drain(..self.pos);
            self.pos = 0;
            self.buf.extend_from_slice(bytes);
        }

        /// The next whole frame, or `Err` when the stream is corrupt (a length over the limit).
        #[allow(clippy::type_complexity)]
        pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, String> {
            let buf = &self.buf[self.pos..];
            if buf.len() < 5 {
                return Ok(None);
            }
            let len = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len > MAX_PAYLOAD {
                return Err(format!("channel frame of {len} bytes is over the limit"));
            }
            if buf.len() < 5 + len {
                return Ok(None);
            }
            let kind = buf[0];
            let payload = buf[5..5 + len].to_vec();
            self.pos += 5 + len;
            Ok(Some((kind, payload)))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn chunked_frames_reassemble() {
            let big: Vec<u8> = (0..MAX_PAYLOAD * 2 + 7).map(|i| i as u8).collect();
            let mut d = Decoder::default();
            d.feed(&encode_chunked(SPEC, &big));
            let mut got = Vec::new();
            let mut n = 0;
            while let Some((k, p)) = d.next_frame().expect("frame") {
                assert_eq!(k, SPEC);
                assert!(p.len() <= MAX_PAYLOAD);
                got.extend(p);
                n += 1;
            }
            assert_eq!((got, n), (big, 3));
            assert!(encode_chunked(SPEC, &[]).is_empty());
        }

        #[test]
        fn le32_words() {
            let p = [1, 0, 0, 0, 2, 0, 0];
            assert_eq!(le32_at(&p, 0).map(u32::from_le_bytes), Some(1));
            assert_eq!(le32_at(&p, 4), None);
            assert_eq!(le32_at(&p, usize::MAX), None);
        }

        #[test]
        fn round_trip_in_pieces() {
            let mut bytes = encode(STDOUT, b"hello");
            bytes.extend(encode(EXIT, &42i32.to_le_bytes()));
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for b in bytes {
                d.feed(&[b]);
                while let Some(f) = d.next_frame().expect("frame") {
                    got.push(f);
                }
            }
            assert_eq!(
                got,
                vec![
                    (STDOUT, b"hello".to_vec()),
                    (EXIT, 42i32.to_le_bytes().to_vec())
                ]
            );
            let mut d = Decoder::default();
            d.feed(&[1, 0xff, 0xff, 0xff, 0xff]);
            assert!(d.next_frame().is_err());
        }

        /// Many small frames in one read, then more bytes: every frame once, in order, and
        /// the taken ones are dropped when more bytes come.
        #[test]
        fn many_small_frames_then_more() {
            let mut bytes = Vec::new();
            for i in 0..10_000u32 {
                bytes.extend(encode(STDOUT, &i.to_le_bytes()[..(i % 5) as usize]));
            }
            let mut d = Decoder::default();
            d.feed(&bytes[..bytes.len() - 2]);
            let mut n = 0u32;
            while let Some((k, p)) = d.next_frame().expect("frame") {
                assert_eq!(
                    (k, p.as_slice()),
                    (STDOUT, &n.to_le_bytes()[..(n % 5) as usize])
                );
                n += 1;
            }
            assert_eq!(n, 9_999);
            d.feed(&bytes[bytes.len() - 2..]);
            assert_eq!(d.buf.len(), 5 + 9_999 % 5);
            assert!(d.next_frame().expect("frame").is_some());
            assert_eq!(d.next_frame(), Ok(None));
        }
    }
}
