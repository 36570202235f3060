//! rvmm-init: PID 1 inside an rvmm microVM. Built static (`-C target-feature=+crt-static`).

fn main() {
    eprintln!("rvmm-init: not implemented yet");
    std::process::exit(1);
}
