//! Micro-benchmark: unpacking an image layer (an in-memory tar shaped like a small distribution
//! layer: directories, many small files, a few large ones, symlinks) with the confined unpacker.
#![allow(clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rvmm::image::unpack::{unpack, UnpackOptions};

fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, path, std::io::empty()).unwrap();
    };
    for d in 0..20 {
        dir(&mut b, &format!("usr/share/d{d}"));
        for f in 0..40 {
            let body = vec![b'x'; 512 + (f * 97) % 3000];
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(body.len() as u64);
            b.append_data(&mut h, format!("usr/share/d{d}/f{f}"), &body[..])
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, format!("usr/share/d{d}/link"), "f0")
            .unwrap();
    }
    for f in 0..4 {
        let body = vec![0u8; 1 << 20];
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(body.len() as u64);
        b.append_data(&mut h, format!("usr/bin/big{f}"), &body[..])
            .unwrap();
    }
    b.into_inner().unwrap()
}

fn bench_unpack(c: &mut Criterion) {
    let tar = layer();
    let mut g = c.benchmark_group("unpack");
    g.throughput(Throughput::Bytes(tar.len() as u64));
    g.sample_size(20);
    g.bench_function("layer-820-files-5mb", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| {
                unpack(&tar[..], dir.path(), UnpackOptions::for_current_user()).unwrap();
                dir
            },
            criterion::BatchSize::PerIteration,
        );
    });
    g.finish();
}

criterion_group!(benches, bench_unpack);
criterion_main!(benches);
