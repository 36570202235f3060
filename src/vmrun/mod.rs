//! VM isolation: the image's root disk, guest-init delivery (initramfs), the host-guest channel,
//! running a RunSpec in a microVM with the same flags, output and exit status as a container.
//!
//! The guest gets: the kernel from guest-kernel/, an initramfs holding rvmm-init as /init and the
//! RunSpec as /rvmm/spec.json, the image's erofs disk read-only as /dev/vda, COM1 for kernel
//! messages (to the run dir's console.log, never mixed with output), COM2 as the channel
//! (docs/vm-channel.md), and with `--network bridge` a virtio-net device on a TAP in `rvmm0`.

mod cpio;

use std::io::{Read, Write};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rvmm_proto::frame;

use crate::container::state::{self, RunState};
use crate::container::{pipe, Cleanup, RunOptions};
use crate::image::ResolvedImage;
use crate::runspec::{NetworkMode, RunSpec};
use crate::vmm::{Channel, Console, DiskConfig, NetConfig, TapSource, Vm, VmConfig, VmExit};

/// Guest RAM when `--memory` is not given.
pub const DEFAULT_MEM_MIB: u32 = 256;

/// Where rvmm-init is: `RVMM_GUEST_INIT`, next to the rvmm binary, or the static build of this
/// workspace (`target/x86_64-unknown-linux-gnu/release/rvmm-init`).
pub fn guest_init_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("RVMM_GUEST_INIT").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating rvmm")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join("rvmm-init"),
        dir.join("../x86_64-unknown-linux-gnu/release/rvmm-init"),
        dir.join("../../x86_64-unknown-linux-gnu/release/rvmm-init"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .context("rvmm-init (the guest's PID 1) is not built: run scripts/setup.sh, or RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p rvmm-guest-init --target x86_64-unknown-linux-gnu")
}

/// The guest kernel's command line: quiet console, reset on reboot and panic, no PCI or modules,
/// rvmm-init as PID 1. `RVMM_GUEST_CMDLINE_APPEND` adds to it (for debugging, e.g. `loglevel=7`).
fn guest_cmdline() -> String {
    let mut c = String::from(
        "console=ttyS0 quiet loglevel=1 reboot=k panic=-1 pci=off nomodule rdinit=/init",
    );
    if let Some(extra) = std::env::var_os("RVMM_GUEST_CMDLINE_APPEND") {
        c.push(' ');
        c.push_str(&extra.to_string_lossy());
    }
    c
}

static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
static STOPS: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
    if sig == libc::SIGINT || sig == libc::SIGTERM {
        STOPS.fetch_add(1, Ordering::SeqCst);
    }
}

/// What the guest reported over the channel.
#[derive(Default)]
struct GuestReport {
    exit: Option<i32>,
    /// Guest uptime (ms) when PID 1 started and when the workload started.
    guest_times: Option<(u32, u32)>,
    /// The workload could not start: status (125/126/127) and message.
    failure: Option<(u8, String)>,
}

impl GuestReport {
    /// Applies one guest frame: output goes to our stdout/stderr, status is recorded.
    /// Returns true for STARTED.
    fn apply(&mut self, kind: u8, payload: &[u8]) -> bool {
        match kind {
            frame::STDOUT => {
                let mut out = std::io::stdout();
                let _ = out.write_all(payload);
                let _ = out.flush();
            }
            frame::STDERR => {
                let _ = std::io::stderr().write_all(payload);
            }
            frame::STARTED => {
                let at = |i| frame::le32_at(payload, i).map(u32::from_le_bytes);
                if let (Some(init), Some(exec)) = (at(0), at(4)) {
                    self.guest_times = Some((init, exec));
                }
                return true;
            }
            frame::FAILED if !payload.is_empty() => {
                self.failure = Some((
                    payload[0],
                    String::from_utf8_lossy(&payload[1..]).into_owned(),
                ));
            }
            frame::EXIT if payload.len() == 4 => {
                self.exit = frame::le32_at(payload, 0).map(i32::from_le_bytes);
            }
            _ => {}
        }
        false
    }
}

/// Runs the spec in a microVM; returns the workload's exit status.
pub fn run(spec: &RunSpec, image: &ResolvedImage, opts: &RunOptions) -> anyhow::Result<u8> {
    if !spec.mounts.is_empty() {
        bail!("-v is not supported with --isolation=vm yet");
    }
    let t0 = Instant::now();
    let kernel = crate::kernel::cached_vmlinux().map_err(|e| anyhow::anyhow!("{e}"))?;
    let init = guest_init_path()?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context(
            "VM isolation needs /dev/kvm (read-write); use --isolation=container to run without it",
        )?;
    state::gc(&opts.root);
    if state::list(&opts.root)?.iter().any(|s| s.name == opts.name) {
        bail!("the name {:?} is already in use", opts.name);
    }
    let store = crate::image::Store::open(&opts.root)?;
    let _layers_in_use = store.use_layers()?;
    let disk = crate::image::disk::image_disk(&opts.root, image)?;
    let t_disk = t0.elapsed();

    let dir = state::container_dir(&opts.root, &opts.id);
    std::fs::create_dir_all(&dir)?;
    let mut cleanup = Cleanup {
        state: RunState::new(opts, spec, "vm", &dir),
        lease: None,
    };
    cleanup.state.save()?;

    let mut spec = spec.clone();
    // The same privileges a container gets, applied by guest-init inside the guest.
    spec.security = crate::container::security::for_guest()?;
    let mut net = Vec::new();
    let mut publisher = None;
    if spec.network.mode == NetworkMode::Bridge {
        let (lease, p) = crate::net::attach_run(&mut spec.network, &opts.id)?;
        cleanup.lease = Some(lease);
        publisher = Some(p);
        spec.network.dns = crate::net::host_resolv_conf()
            .lines()
            .filter_map(|l| l.strip_prefix("nameserver").map(|a| a.trim().to_string()))
            .collect();
        let tap = crate::net::create_tap(&opts.id)?;
        cleanup.state.taps.push(tap.clone());
        cleanup.state.save()?;
        // A locally administered MAC from the run ID.
        let id = hex::decode(opts.id.get(..10).unwrap_or_default()).unwrap_or_default();
        let mut mac = [0x02, 0, 0, 0, 0, 0];
        for (m, b) in mac[1..].iter_mut().zip(&id) {
            *m = *b;
        }
        net.push(NetConfig {
            tap: TapSource::Name(tap),
            mac,
        });
    } else if !spec.network.ports.is_empty() {
        bail!("-p needs --network bridge");
    }

    // The initramfs: rvmm-init and the spec.
    let initrd = dir.join("initrd.cpio");
    {
        let init_bytes =
            std::fs::read(&init).with_context(|| format!("reading {}", init.display()))?;
        let mut w = cpio::Writer::new(std::io::BufWriter::new(std::fs::File::create(&initrd)?));
        for d in ["dev", "proc", "sys", "rvmm"] {
            w.dir(d)?;
        }
        w.file("init", 0o755, &init_bytes)?;
        w.file("rvmm/spec.json", 0o600, &serde_json::to_vec(&spec)?)?;
        w.finish()?;
    }

    let mem_mib = spec
        .limits
        .memory_bytes
        .map(|b| (b >> 20).max(64) as u32)
        .unwrap_or(DEFAULT_MEM_MIB);
    let vcpus = spec
        .limits
        .cpus
        .map(|c| c.ceil().clamp(1.0, 32.0) as u8)
        .unwrap_or(1);
    let (to_guest_r, to_guest_w) = pipe()?;
    let (from_guest_r, from_guest_w) = pipe()?;
    let cfg = VmConfig {
        kernel,
        initrd: Some(initrd),
        cmdline: guest_cmdline(),
        vcpus,
        mem_mib,
        disks: vec![DiskConfig {
            path: Some(disk),
            read_only: true,
        }],
        console: Console::File(dir.join("console.log")),
        channel: Some(Channel {
            input: to_guest_r,
            output: from_guest_w,
        }),
        net,
    };
    let vm = Vm::new(cfg).context("creating the microVM")?;
    let stop = vm.stop_handle();
    let t_setup = t0.elapsed();
    let vm_thread = std::thread::spawn(move || vm.run());
    crate::container::install_handler(on_signal, crate::container::RELAYED_SIGNALS);
    let _raw = if spec.tty {
        crate::container::install_handler(on_signal, &[libc::SIGWINCH]);
        spec.stdin.then(crate::container::RawMode::stdin)
    } else {
        None
    };
    let send_winsize = |to_guest: &mut std::fs::File| {
        if let Some(ws) = crate::container::winsize() {
            let mut p = ws.ws_row.to_le_bytes().to_vec();
            p.extend_from_slice(&ws.ws_col.to_le_bytes());
            let _ = to_guest.write_all(&frame::encode(frame::WINSIZE, &p));
        }
    };

    let mut to_guest = std::fs::File::from(to_guest_w);
    // stdin → guest, once the guest listens: bytes sent before rvmm-init has put its end of the
    // channel in raw mode would be echoed back by the tty layer and corrupt the stream.
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    if spec.stdin {
        let mut tg = to_guest.try_clone()?;
        std::thread::spawn(move || {
            if started_rx.recv().is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match std::io::stdin().read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tg.write_all(&frame::encode(frame::STDIN_EOF, &[]));
                        return;
                    }
                    Ok(n) => {
                        if tg
                            .write_all(&frame::encode(frame::STDIN, &buf[..n]))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    }

    // guest → host, on its own thread so the main one can watch signals.
    let (tx, rx) = std::sync::mpsc::channel::<Result<(u8, Vec<u8>), String>>();
    let mut from_guest = std::fs::File::from(from_guest_r);
    std::thread::spawn(move || {
        let mut dec = frame::Decoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_guest.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    dec.feed(&buf[..n]);
                    loop {
                        match dec.next_frame() {
                            Ok(Some(f)) => {
                                if tx.send(Ok(f)).is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                }
            }
        }
    });

    let mut report = GuestReport::default();
    let mut started_at = None;
    let mut killed: Option<i32> = None;
    loop {
        let sig = STOP_SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            if STOPS.load(Ordering::SeqCst) >= 2 {
                // Second Ctrl-C/TERM: the VM goes, as `docker kill` would.
                stop.stop();
                killed = Some(libc::SIGKILL);
            } else if sig == libc::SIGWINCH {
                if started_at.is_some() {
                    send_winsize(&mut to_guest);
                }
            } else if started_at.is_none() {
                // Nothing to forward to yet: Ctrl-C or TERM during the boot stops the VM.
                if sig == libc::SIGINT || sig == libc::SIGTERM {
                    stop.stop();
                    killed = Some(sig);
                }
            } else {
                let _ = to_guest.write_all(&frame::encode(frame::SIGNAL, &sig.to_le_bytes()));
            }
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok((kind, payload))) => {
                if report.apply(kind, &payload) {
                    started_at = Some(t0.elapsed());
                    let _ = started_tx.send(());
                    if spec.tty {
                        send_winsize(&mut to_guest);
                    }
                    if let (Some(p), Some(l)) = (publisher.take(), &cleanup.lease) {
                        p.start(l.addr);
                    }
                }
            }
            Ok(Err(e)) => {
                log::warn!("channel: {e}");
                stop.stop();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if vm_thread.is_finished() {
                    // Drain what is left, then stop.
                    while let Ok(Ok((kind, payload))) = rx.recv_timeout(Duration::from_millis(20)) {
                        report.apply(kind, &payload);
                    }
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if vm_thread.is_finished() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if report.exit.is_some() {
            // The guest powers off right after; don't wait on a stuck one.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !vm_thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !vm_thread.is_finished() {
                stop.stop();
            }
            break;
        }
    }
    let _ = std::io::stdout().flush();
    let vm_result = vm_thread.join();
    let total = t0.elapsed();
    log::info!(
        "vm run: disk ready {:?}, vmm set up {:?}, workload started {:?}, exit {:?}",
        t_disk,
        t_setup,
        started_at,
        total
    );
    if std::env::var_os("RVMM_TIMINGS").is_some() {
        let (init, exec) = report.guest_times.unwrap_or((0, 0));
        eprintln!(
            "rvmm-timings disk_ms={} setup_ms={} guest_init_uptime_ms={init} guest_exec_uptime_ms={exec} started_ms={} exit_ms={}",
            t_disk.as_millis(),
            t_setup.as_millis(),
            started_at.map(|d| d.as_millis() as i64).unwrap_or(-1),
            total.as_millis()
        );
    }
    let code = match (report.failure, report.exit, killed) {
        (Some((125, msg)), _, _) => {
            cleanup.state.finish(125, opts.remove);
            bail!("starting the workload in the VM: {msg}");
        }
        (Some((code, msg)), _, _) => {
            eprintln!("rvmm: {msg}");
            code as i32
        }
        (None, Some(c), _) => c,
        (None, None, Some(sig)) => 128 + sig,
        (None, None, None) => {
            let why = match vm_result {
                Ok(Ok(VmExit::Stopped)) => "it was stopped".to_string(),
                Ok(Ok(e)) => format!("it ended ({e:?})"),
                Ok(Err(e)) => format!("{:#}", anyhow::Error::from(e)),
                Err(_) => "the VMM thread panicked".into(),
            };
            cleanup.state.finish(125, opts.remove);
            bail!(
                "the microVM stopped without reporting an exit status: {why} (kernel log: {})",
                dir.join("console.log").display()
            );
        }
    };
    cleanup.state.finish(code, opts.remove);
    Ok(code.clamp(0, 255) as u8)
}
