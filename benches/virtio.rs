//! Micro-benchmarks: virtio-blk request handling through a real split virtqueue (virtio-queue's mock
//! lays the rings out in guest memory).
#![allow(clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rvmm::devices::virtio::block::{Block, T_IN, T_OUT};
use rvmm::devices::virtio::{Mem, VirtioDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn bench_blk(c: &mut Criterion) {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(64 << 20).unwrap();
    let mut blk = Block::open(file.path(), false, "bench").unwrap();
    let mut g = c.benchmark_group("virtio-blk");
    for (name, rtype, size) in [
        ("read-4k", T_IN, 4096u32),
        ("write-4k", T_OUT, 4096),
        ("read-64k", T_IN, 65536),
    ] {
        g.throughput(Throughput::Bytes(u64::from(size)));
        g.bench_function(name, |b| {
            let vq = MockSplitQueue::new(&mem, 256);
            let mut q: Queue = vq.create_queue().unwrap();
            mem.write_obj(rtype, GuestAddress(0x10_0000)).unwrap();
            mem.write_obj(8u64, GuestAddress(0x10_0008)).unwrap();
            let data_flags = if rtype == T_IN { F_WRITE } else { 0 };
            let descs = [
                RawDescriptor::from(Descriptor::new(0x10_0000, 16, F_NEXT, 1)),
                RawDescriptor::from(Descriptor::new(0x20_0000, size, data_flags | F_NEXT, 2)),
                RawDescriptor::from(Descriptor::new(0x10_1000, 1, F_WRITE, 0)),
            ];
            let mut i: u16 = 0;
            b.iter(|| {
                // Re-publish the same chain and let the device process it.
                vq.desc_table().store(0, descs[0]).unwrap();
                vq.desc_table().store(1, descs[1]).unwrap();
                vq.desc_table().store(2, descs[2]).unwrap();
                vq.avail()
                    .ring()
                    .ref_at(usize::from(i % 256))
                    .unwrap()
                    .store(0);
                i = i.wrapping_add(1);
                vq.avail().idx().store(i);
                assert!(blk.process_queue(0, &mut q, &mem));
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench_blk);
criterion_main!(benches);
