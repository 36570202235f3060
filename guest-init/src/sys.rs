//! Thin syscall helpers for PID 1.

pub use rvmm_workload::{c, write_all};

fn err() -> String {
    std::io::Error::last_os_error().to_string()
}

use std::sync::atomic::{AtomicI32, Ordering};

/// /dev/urandom, opened before the snapshot (see [`preopen`]).
static URANDOM: AtomicI32 = AtomicI32::new(-1);
/// /sys/block/vda/size, opened before the snapshot (see [`preopen`]).
static VDA_SIZE: AtomicI32 = AtomicI32::new(-1);

/// Opens, before the snapshot, the files every run uses after it: /dev/urandom (its entropy)
/// and the image disk's size in sysfs (the disk's slot is there, empty). A first open of a device
/// or sysfs file is thousands of emulated guest-kernel instructions on kvm_pvm. Close-on-exec;
/// after the zygote has forked, so it holds neither. Best effort: a run opens what is missing.
pub fn preopen() {
    for (slot, path, flags) in [
        (&URANDOM, "/dev/urandom", libc::O_RDWR),
        (&VDA_SIZE, "/sys/block/vda/size", libc::O_RDONLY),
    ] {
        // SAFETY: NUL-terminated path.
        let fd = unsafe { libc::open(c(path).as_ptr(), flags | libc::O_CLOEXEC) };
        slot.store(fd, Ordering::Relaxed);
    }
}

/// Opens the virtio-console ports named `names` (in that order, each with its open flags), waiting
/// up to `timeout` for the host to name them: the driver adds ports asynchronously after boot.
pub fn open_ports(
    names: &[(&str, libc::c_int)],
    timeout: std::time::Duration,
) -> Result<Vec<libc::c_int>, String> {
    let t0 = std::time::Instant::now();
    let mut found: Vec<Option<String>> = vec![None; names.len()];
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in rd.flatten() {
                let dev = e.file_name().to_string_lossy().into_owned();
                let Ok(name) = std::fs::read_to_string(e.path().join("name")) else {
                    continue;
                };
                if let Some(i) = names.iter().position(|(n, _)| *n == name.trim()) {
                    found[i] = Some(dev);
                }
            }
        }
        if found.iter().all(Option::is_some) {
            break;
        }
        if t0.elapsed() > timeout {
            let missing: Vec<&str> = names
                .iter()
                .zip(&found)
                .filter(|(_, f)| f.is_none())
                .map(|((n, _), _)| *n)
                .collect();
            return Err(format!(
                "channel ports {} did not appear",
                missing.join(", ")
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let mut fds = Vec::new();
    for ((name, flags), dev) in names.iter().zip(found.into_iter().flatten()) {
        let path = format!("/dev/{dev}");
        // The node appears in devtmpfs with the port; give it a moment too.
        let fd = loop {
            // SAFETY: NUL-terminated path.
            let fd = unsafe { libc::open(c(&path).as_ptr(), flags | libc::O_CLOEXEC) };
            if fd >= 0 || t0.elapsed() > timeout {
                break fd;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        if fd < 0 {
            return Err(format!("opening channel port {name} ({path}): {}", err()));
        }
        fds.push(fd);
    }
    Ok(fds)
}

pub fn set_hostname(h: &str) -> Result<(), String> {
    // SAFETY: pointer and length of a valid buffer.
    if unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) } != 0 {
        return Err(format!("sethostname: {}", err()));
    }
    Ok(())
}

pub fn power_off() -> ! {
    // SAFETY: reboot(2) ends the machine; with reboot=k the kernel resets through the i8042,
    // which the VMM turns into a clean exit.
    unsafe {
        libc::reboot(libc::RB_POWER_OFF);
        libc::_exit(1)
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in name.bytes().take(15).enumerate() {
        ifr.ifr_name[i] = b as libc::c_char;
    }
    ifr
}

fn sockaddr(ip: [u8; 4]) -> libc::sockaddr {
    // SAFETY: sockaddr_in is plain data and fits in sockaddr.
    unsafe {
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(ip);
        std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin)
    }
}

fn set_up(sock: libc::c_int, name: &str) -> Result<(), String> {
    let mut ifr = ifreq(name);
    // SAFETY: flag ioctls with an ifreq naming the interface.
    unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            return Err(format!("{name}: {}", err()));
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr) != 0 {
            return Err(format!("{name} up: {}", err()));
        }
    }
    Ok(())
}

fn socket() -> libc::c_int {
    // SAFETY: plain socket creation.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) }
}

/// `ADDR/PREFIX` on eth0, up, default route via `gw` (ioctls, no ip binary needed).
pub fn configure_eth0(addr: &str, gw: &str) -> Result<(), String> {
    let (ip, mask) = rvmm_guest_init::parse_cidr(addr)?;
    let gw = rvmm_guest_init::parse_ipv4(gw).ok_or("bad gateway")?;
    let s = socket();
    let r = (|| {
        let mut ifr = ifreq("eth0");
        ifr.ifr_ifru.ifru_addr = sockaddr(ip);
        // SAFETY: address ioctls with a filled ifreq.
        unsafe {
            if libc::ioctl(s, libc::SIOCSIFADDR, &ifr) != 0 {
                return Err(format!("address: {}", err()));
            }
            ifr.ifr_ifru.ifru_netmask = sockaddr(mask);
            if libc::ioctl(s, libc::SIOCSIFNETMASK, &ifr) != 0 {
                return Err(format!("netmask: {}", err()));
            }
        }
        set_up(s, "eth0")?;
        // SAFETY: rtentry is plain data; the route ioctl reads it.
        unsafe {
            let mut rt: libc::rtentry = std::mem::zeroed();
            rt.rt_dst = sockaddr([0, 0, 0, 0]);
            rt.rt_genmask = sockaddr([0, 0, 0, 0]);
            rt.rt_gateway = sockaddr(gw);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            if libc::ioctl(s, libc::SIOCADDRT, &rt) != 0 {
                return Err(format!("default route: {}", err()));
            }
        }
        Ok(())
    })();
    // SAFETY: closing our socket.
    unsafe { libc::close(s) };
    r
}

/// A pidfd of child `pid` (close-on-exec; readable once it has exited, zombie or not), or -1
/// where the kernel has none: the caller then polls on a short timeout instead.
pub fn pidfd_open(pid: libc::pid_t) -> libc::c_int {
    // SAFETY: pidfd_open with no flags returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        -1
    } else {
        fd as libc::c_int
    }
}

/// How long the relay loop may sleep in poll(2): until the nearest of `deadlines` (ms left,
/// already clamped at 0), else `idle` ms.
pub fn poll_timeout(idle: i32, deadlines: impl IntoIterator<Item = u128>) -> i32 {
    deadlines
        .into_iter()
        .map(|ms| ms.min(i32::MAX as u128) as i32)
        .fold(idle, i32::min)
}

/// Milliseconds since the guest booted (CLOCK_BOOTTIME).
pub fn uptime_ms() -> u32 {
    // SAFETY: clock_gettime fills a timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32
}

/// Grows this process's heap by `heap` bytes and its stack by `stack` bytes, touching every page,
/// and keeps the heap's pages from then on (no trimming back to the kernel). Before [`prefault`],
/// before the snapshot: a run's allocations after a restore then find their pages mapped, where
/// each new page would be a page fault and a page clear (thousands of emulated guest-kernel
/// instructions on kvm_pvm).
pub fn warm(heap: usize, stack: usize) {
    // Below glibc's mmap threshold, so these come from the heap.
    const CHUNK: usize = 64 << 10;
    // SAFETY: mallopt only changes glibc's allocation policy.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) };
    let chunks: Vec<Vec<u8>> = (0..heap.div_ceil(CHUNK))
        .map(|_| vec![1u8; CHUNK])
        .collect();
    std::hint::black_box(&chunks);
    drop(chunks);
    warm_stack(stack);
}

/// Touches `bytes` of stack below the caller's frame, 64 KiB per call.
#[inline(never)]
fn warm_stack(bytes: usize) {
    let mut frame = [0u8; 64 << 10];
    std::hint::black_box(&mut frame);
    if bytes > frame.len() {
        warm_stack(bytes - frame.len());
    }
}

/// Writes every page of the first `len` bytes at `p` in place (a fresh mapping's pages get
/// allocated).
pub fn touch_pages(p: *mut u8, len: usize) {
    for off in (0..len).step_by(4096) {
        // SAFETY: the caller's memory, `len` bytes from `p`; a byte is rewritten with itself.
        unsafe { p.add(off).write_volatile(p.add(off).read_volatile()) };
    }
}

/// Maps, before a snapshot, what this process will touch after the restore, so that it does not
/// take those page faults on every warm start (each is thousands of emulated guest-kernel
/// instructions on kvm_pvm): every page of its file mappings (a fork gets none of them), and a
/// private copy of every resident page of its writable mappings (which a fork shares
/// copy-on-write with its parent). Pages it never touched stay unallocated. Best effort.
pub fn prefault() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let mut resident = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let name = f.nth(3).unwrap_or("");
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        else {
            continue;
        };
        let p = perms.as_bytes();
        if end <= start || p.len() < 4 || p[0] != b'r' || name.starts_with("[v") {
            continue; // unreadable, or the kernel's [vvar], [vdso] and [vsyscall]
        }
        let len = end - start;
        if p[1] == b'w' && p[3] == b'p' {
            // A private writable mapping: a private copy of each resident page, no new ones.
            resident.clear();
            resident.resize(len.div_ceil(page), 0u8);
            // SAFETY: mincore fills one byte per page of a range of our own mappings.
            if unsafe { libc::mincore(start as *mut _, len, resident.as_mut_ptr()) } != 0 {
                continue;
            }
            let mut i = 0;
            while i < resident.len() {
                let j = (i..resident.len())
                    .find(|&j| resident[j] & 1 == 0)
                    .unwrap_or(resident.len());
                if j > i {
                    // SAFETY: populating (writing in place) resident pages of our own mapping.
                    unsafe {
                        libc::madvise(
                            (start + i * page) as *mut _,
                            (j - i) * page,
                            libc::MADV_POPULATE_WRITE,
                        )
                    };
                }
                i = j + 1;
            }
        } else if p[1] != b'w' {
            // SAFETY: populating page tables of our own read-only mapping.
            unsafe { libc::madvise(start as *mut _, len, libc::MADV_POPULATE_READ) };
        }
    }
}

/// Mixes `bytes` into the kernel's RNG, credited as entropy, and forces the CRNG to reseed, so
/// guests restored from one snapshot stop sharing their random state.
pub fn add_entropy(bytes: &[u8]) -> Result<(), String> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(info.len().next_multiple_of(4), 0);
    // SAFETY: NUL-terminated path; the ioctls read a rand_pool_info of the size it declares.
    unsafe {
        let kept = URANDOM.swap(-1, Ordering::Relaxed);
        let fd = if kept >= 0 {
            kept
        } else {
            libc::open(c("/dev/urandom").as_ptr(), libc::O_RDWR | libc::O_CLOEXEC)
        };
        if fd < 0 {
            return Err(format!("/dev/urandom: {}", err()));
        }
        let r = if libc::ioctl(fd, RNDADDENTROPY, info.as_ptr()) != 0 {
            Err(format!("RNDADDENTROPY: {}", err()))
        } else if libc::ioctl(fd, RNDRESEEDCRNG) != 0 {
            Err(format!("RNDRESEEDCRNG: {}", err()))
        } else {
            Ok(())
        };
        libc::close(fd);
        r
    }
}

/// Steps CLOCK_REALTIME to the host's time.
pub fn set_realtime(secs: i64, nsecs: u32) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: i64::from(nsecs.min(999_999_999)),
    };
    // SAFETY: clock_settime reads a timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!("clock_settime: {}", err()));
    }
    Ok(())
}

/// Sets eth0's MAC (the link must be down).
pub fn set_mac(mac: [u8; 6]) -> Result<(), String> {
    let s = socket();
    let mut ifr = ifreq("eth0");
    // SAFETY: a hardware-address ioctl with a filled ifreq; the union member is plain data.
    let r = unsafe {
        ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, b) in ifr.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *d = b as libc::c_char;
        }
        libc::ioctl(s, libc::SIOCSIFHWADDR, &ifr)
    };
    let e = err();
    // SAFETY: closing our socket.
    unsafe { libc::close(s) };
    if r != 0 {
        return Err(format!("eth0 MAC: {e}"));
    }
    Ok(())
}

/// Waits until the host has attached the image disk (the virtio-blk slot starts empty and gets
/// its capacity with a configuration-change interrupt), then drops any cached block of the empty
/// device.
pub fn wait_for_disk(name: &str, timeout: std::time::Duration) -> Result<(), String> {
    let size = format!("/sys/block/{name}/size");
    let fd = if name == "vda" {
        VDA_SIZE.load(Ordering::Relaxed)
    } else {
        -1
    };
    let read = || {
        if fd < 0 {
            return std::fs::read_to_string(&size).ok();
        }
        let mut b = [0u8; 32];
        // SAFETY: a read into a stack buffer, at most its length; sysfs makes the value anew
        // for a read at offset 0.
        let n = unsafe { libc::pread(fd, b.as_mut_ptr().cast(), b.len(), 0) };
        (n > 0).then(|| String::from_utf8_lossy(&b[..n as usize]).into_owned())
    };
    let t0 = std::time::Instant::now();
    loop {
        let sectors: u64 = read().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        if sectors > 0 {
            break;
        }
        if t0.elapsed() > timeout {
            return Err(format!("the image disk /dev/{name} did not appear"));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    // SAFETY: NUL-terminated path; BLKFLSBUF takes no argument.
    unsafe {
        let fd = libc::open(
            c(&format!("/dev/{name}")).as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::ioctl(fd, BLKFLSBUF, 0);
            libc::close(fd);
        }
    }
    Ok(())
}

static TRACE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// With `rvmm.trace` on the kernel command line, [`trace`] writes timestamped steps to the
/// console (the run directory's console.log): where a start spends its time.
pub fn trace_init() {
    let on = std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == "rvmm.trace"))
        .unwrap_or(false);
    if on {
        // SAFETY: NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c("/dev/ttyS0").as_ptr(),
                libc::O_WRONLY | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        TRACE_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One trace line: guest monotonic time in µs, then `what` (nothing without `rvmm.trace`).
pub fn trace(what: &str) {
    let fd = TRACE_FD.load(std::sync::atomic::Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    // SAFETY: clock_gettime fills a timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let us = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
    write_all(fd, format!("rvmm-init {us} {what}\r\n").as_bytes());
}

/// A msghdr for one buffer and a control buffer.
fn msghdr(iov: &mut libc::iovec, control: &mut [u64], control_len: usize) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control_len;
    msg
}

/// Sends `data` and `fds` (SCM_RIGHTS) as one message on a SOCK_SEQPACKET socket.
pub fn send_with_fds(sock: libc::c_int, data: &[u8], fds: &[libc::c_int]) -> Result<(), String> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let msg = msghdr(&mut iov, &mut cbuf, space);
    // SAFETY: every pointer in `msg` refers to a live local buffer, and the control message is
    // written inside `cbuf` as CMSG_FIRSTHDR lays it out.
    unsafe {
        let cm = libc::CMSG_FIRSTHDR(&msg);
        (*cm).cmsg_level = libc::SOL_SOCKET;
        (*cm).cmsg_type = libc::SCM_RIGHTS;
        (*cm).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cm).cast(), fds.len());
        if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(format!("sendmsg: {}", err()));
        }
    }
    Ok(())
}

/// Receives one message and up to 16 fds sent by [`send_with_fds`]. `None` when the peer closed
/// the socket or the message is not whole.
pub fn recv_with_fds(sock: libc::c_int, buf: &mut [u8]) -> Option<(usize, Vec<libc::c_int>)> {
    const MAX_FDS: usize = 16;
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut msg = msghdr(&mut iov, &mut cbuf, space);
    // SAFETY: as in send_with_fds; the kernel fills `cbuf` and the walk stays inside it.
    unsafe {
        let n = loop {
            let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break n;
            }
        };
        if n <= 0 || msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return None;
        }
        let mut fds = Vec::new();
        let mut cm = libc::CMSG_FIRSTHDR(&msg);
        while !cm.is_null() {
            if (*cm).cmsg_level == libc::SOL_SOCKET && (*cm).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cm).cast::<libc::c_int>();
                let count = ((*cm).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(std::ptr::read_unaligned(data.add(i)));
                }
            }
            cm = libc::CMSG_NXTHDR(&msg, cm);
        }
        Some((n as usize, fds))
    }
}

/// Reads `paths` (absolute, resolved inside `root` as if it were /) and, for an ELF program, its
/// interpreter, into the page cache: whole files, at most `max` bytes in all, synchronously (no
/// read is in flight when this returns). Best effort: what cannot be read is skipped.
pub fn prefetch(root: &str, paths: &[String], max: u64) {
    // SAFETY: NUL-terminated path; the fd is ours.
    let dir = unsafe {
        libc::open(
            c(root).as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir < 0 {
        return;
    }
    let mut left = max;
    let mut buf = vec![0u8; 128 << 10];
    let mut queue: Vec<String> = paths.to_vec();
    let mut done: Vec<String> = Vec::new();
    while let Some(p) = queue.pop() {
        if done.contains(&p) || done.len() >= 8 {
            continue;
        }
        done.push(p.clone());
        let fd = open_in_root(dir, &p);
        if fd < 0 {
            continue;
        }
        let mut head = Vec::new();
        let mut off: u64 = 0;
        loop {
            if left == 0 {
                break;
            }
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            // SAFETY: reading into our buffer, at most its length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), want) };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            if off == 0 {
                head.extend_from_slice(&buf[..n]);
            }
            off += n as u64;
            left = left.saturating_sub(n as u64);
        }
        if let Some(interp) = elf_interpreter(fd, &head) {
            queue.push(interp);
        }
        // SAFETY: closing our fd.
        unsafe { libc::close(fd) };
    }
    // SAFETY: closing our fd.
    unsafe { libc::close(dir) };
}

/// Opens `path` for reading, resolved inside the directory `dir` as its root (its symlinks
/// cannot lead out); a regular file only, else -1.
fn open_in_root(dir: libc::c_int, path: &str) -> libc::c_int {
    // struct open_how: flags, mode, resolve.
    let how: [u64; 3] = [
        (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK) as u64,
        0,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    ];
    let Ok(cp) = std::ffi::CString::new(path) else {
        return -1;
    };
    // SAFETY: openat2 with a valid dirfd, NUL-terminated path and a filled open_how.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            cp.as_ptr(),
            how.as_ptr(),
            std::mem::size_of_val(&how),
        )
    } as libc::c_int;
    if fd < 0 {
        return -1;
    }
    // SAFETY: fstat into a zeroed stat of our own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on our fd.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
        // SAFETY: closing our fd.
        unsafe { libc::close(fd) };
        return -1;
    }
    fd
}

/// The interpreter (PT_INTERP) of a 64-bit little-endian ELF file whose first bytes are `head`
/// (read from `fd` past them when needed). None for anything else, malformed ones included.
pub fn elf_interpreter(fd: libc::c_int, head: &[u8]) -> Option<String> {
    let bytes = |o: usize, n: usize| head.get(o..o.checked_add(n)?);
    let u16_at = |o| Some(u16::from_le_bytes(bytes(o, 2)?.try_into().ok()?));
    let u32_at = |o| Some(u32::from_le_bytes(bytes(o, 4)?.try_into().ok()?));
    let u64_at = |o| Some(u64::from_le_bytes(bytes(o, 8)?.try_into().ok()?));
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let (phentsize, phnum) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    for i in 0..phnum.min(64) {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != 3 {
            continue; // not PT_INTERP
        }
        let (off, size) = (u64_at(ph.checked_add(8)?)?, u64_at(ph.checked_add(32)?)?);
        if size == 0 || size > 4096 {
            return None;
        }
        let mut b = vec![0u8; size as usize];
        // SAFETY: reading into our buffer, at most its length.
        let n = unsafe { libc::pread(fd, b.as_mut_ptr().cast(), b.len(), off as libc::off_t) };
        if n != size as isize {
            return None;
        }
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        let p = std::str::from_utf8(&b[..end]).ok()?;
        return p.starts_with('/').then(|| p.to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    /// A dynamic program's interpreter is found (this test binary's); a static one, another file
    /// or a damaged header has none, and nothing panics.
    #[test]
    fn elf_interpreters() {
        use std::os::fd::AsRawFd;
        let exe = std::fs::File::open("/proc/self/exe").expect("exe");
        let mut head = vec![0u8; 4096];
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::pread(exe.as_raw_fd(), head.as_mut_ptr().cast(), head.len(), 0) };
        head.truncate(n.max(0) as usize);
        let interp = super::elf_interpreter(exe.as_raw_fd(), &head);
        assert!(
            interp.as_deref().is_some_and(|p| p.starts_with("/lib")),
            "{interp:?}"
        );
        assert_eq!(super::elf_interpreter(exe.as_raw_fd(), &head[..40]), None);
        assert_eq!(
            super::elf_interpreter(exe.as_raw_fd(), b"#!/bin/sh\n"),
            None
        );
        let mut bad = head.clone();
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(super::elf_interpreter(exe.as_raw_fd(), &bad), None);
        bad[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        bad[0x36..0x38].copy_from_slice(&u16::MAX.to_le_bytes());
        bad[0x38..0x3a].copy_from_slice(&u16::MAX.to_le_bytes());
        let _ = super::elf_interpreter(exe.as_raw_fd(), &bad);
    }

    /// The `/proc/self/smaps` fields (in kB) of the mapping that holds `addr`.
    fn smaps_of(addr: usize) -> std::collections::HashMap<String, u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let mut fields = std::collections::HashMap::new();
        let mut inside = false;
        for line in smaps.lines() {
            let head = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = head.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some((k, v)) = line.split_once(':') {
                    let kb = v.split_whitespace().next().and_then(|n| n.parse().ok());
                    if let Some(kb) = kb {
                        fields.insert(k.to_string(), kb);
                    }
                }
            }
        }
        fields
    }

    #[test]
    fn prefault_maps_the_code_and_unshares_written_pages_in_place() {
        let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        // SAFETY: fork in a test; the child checks, then leaves with its verdict.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // No panic here: it would unwind into a second test harness in this child.
            let field = |addr: usize, k: &str| smaps_of(addr).get(k).copied();
            let heap = data.as_ptr() as usize;
            let code = smaps_of as *const () as usize;
            let shared_before = field(heap, "Shared_Dirty").unwrap_or(0);
            super::prefault();
            let shared_after = field(heap, "Shared_Dirty");
            let (rss, size) = (field(code, "Rss"), field(code, "Size"));
            let intact = data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8);
            let verdict = if !intact {
                1 // contents changed
            } else if shared_before == 0 || shared_after != Some(0) {
                2 // the pages were not shared with the parent before, or still are
            } else if rss.is_none() || rss != size {
                3 // code left unmapped
            } else {
                0
            };
            // SAFETY: leaving the child.
            unsafe { libc::_exit(verdict) };
        }
        let mut st = 0;
        // SAFETY: reaping our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
        assert_eq!(libc::WEXITSTATUS(st), 0, "see the verdicts in the child");
    }

    #[test]
    fn the_relay_sleeps_until_its_nearest_deadline() {
        assert_eq!(super::poll_timeout(5000, []), 5000);
        assert_eq!(super::poll_timeout(5000, [120, 7, 499]), 7);
        assert_eq!(super::poll_timeout(50, [500]), 50);
        assert_eq!(super::poll_timeout(5000, [0]), 0);
        assert_eq!(super::poll_timeout(5000, [u128::MAX]), 5000);
    }

    #[test]
    fn a_pidfd_is_readable_once_its_child_has_exited() {
        // SAFETY: fork in a test; the child only exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: leaving the child at once.
            unsafe { libc::_exit(3) };
        }
        let fd = super::pidfd_open(pid);
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one valid pollfd, then reaping our child and closing our fd.
        unsafe {
            assert_eq!(libc::poll(&mut p, 1, 10_000), 1);
            let mut st = 0;
            assert_eq!(libc::waitpid(pid, &mut st, 0), pid);
            assert_eq!(libc::WEXITSTATUS(st), 3);
            libc::close(fd);
        }
    }
}
