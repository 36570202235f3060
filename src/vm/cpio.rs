//! A minimal `newc` cpio writer, for the guest's initramfs.

use std::io::{self, Write};

pub struct Writer<W: Write> {
    w: W,
    ino: u32,
}

impl<W: Write> Writer<W> {
    pub fn new(w: W) -> Self {
        Writer { w, ino: 1 }
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> io::Result<()> {
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            namesize,
            0
        );
        self.ino += 1;
        self.w.write_all(header.as_bytes())?;
        self.w.write_all(name.as_bytes())?;
        self.w.write_all(&[0])?;
        self.pad(110 + namesize)?;
        self.w.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, n: usize) -> io::Result<()> {
        let p = (4 - n % 4) % 4;
        self.w.write_all(&[0u8; 3][..p])
    }

    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, 0o040755, 2, &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100000 | perm, 1, data)
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, &[])?;
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_lists_with_the_real_tool() {
        let mut w = Writer::new(Vec::new());
        w.dir("rvmm").expect("dir");
        w.file("rvmm/spec.json", 0o600, b"{}").expect("file");
        w.file("init", 0o755, b"#!/bin/sh\n").expect("file");
        let bytes = w.finish().expect("finish");
        assert_eq!(bytes.len() % 4, 0);
        if let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(&bytes)
                .expect("write");
            let out = child.wait_with_output().expect("cpio");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "rvmm\nrvmm/spec.json\ninit\n"
            );
        }
    }
}
