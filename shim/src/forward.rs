//! Published ports (`-p`): the listening sockets rvmm bound before the workload started, proxied
//! to the workload's address once it runs. One thread per listener and per TCP connection.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};

/// Starts the proxy threads (they live until the process exits): each listener's traffic goes
/// to `target` at its container port.
pub fn start(tcp: Vec<(TcpListener, u16)>, udp: Vec<(UdpSocket, u16)>, target: Ipv4Addr) {
    for (l, port) in tcp {
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { continue };
                std::thread::spawn(move || {
                    let Ok(upstream) = TcpStream::connect((target, port)) else {
                        return;
                    };
                    splice_streams(client, upstream);
                });
            }
        });
    }
    for (sock, port) in udp {
        std::thread::spawn(move || {
            let Ok(up) = UdpSocket::bind("0.0.0.0:0") else {
                return;
            };
            let Ok(up2) = up.try_clone() else { return };
            let Ok(sock2) = sock.try_clone() else { return };
            let last = std::sync::Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
            let last2 = last.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = up2.recv(&mut buf) {
                    if let Some(a) = *last2.lock().unwrap_or_else(|e| e.into_inner()) {
                        let _ = sock2.send_to(&buf[..n], a);
                    }
                }
            });
            let _ = up.connect((target, port));
            let mut buf = [0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                let _ = up.send(&buf[..n]);
            }
        });
    }
}

fn splice_streams(a: TcpStream, b: TcpStream) {
    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let t = std::thread::spawn(move || {
        let mut a = a;
        let mut b = b;
        let _ = io::copy(&mut a, &mut b);
        let _ = b.shutdown(std::net::Shutdown::Write);
    });
    let _ = io::copy(&mut b2, &mut a2);
    let _ = a2.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}
