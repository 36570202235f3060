//! Micro-benchmarks: the split virtqueue itself (pop a chain, walk it, return it), and virtio-blk
//! request handling through a real queue (virtio-queue's mock lays the rings out in guest memory).
#![allow(clippy::unwrap_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rvmm::devices::virtio::block::{Block, T_IN, T_OUT};
use rvmm::devices::virtio::{Mem, VirtioDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
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

fn bench_queue(c: &mut Criterion) {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let mut g = c.benchmark_group("virtqueue");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pop-walk-add-used-3-descs", |b| {
        let vq = MockSplitQueue::new(&mem, 256);
        let mut q: Queue = vq.create_queue().unwrap();
        let descs = [
            RawDescriptor::from(Descriptor::new(0x10_0000, 16, F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(0x20_0000, 4096, F_WRITE | F_NEXT, 2)),
            RawDescriptor::from(Descriptor::new(0x10_1000, 1, F_WRITE, 0)),
        ];
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        let mut i: u16 = 0;
        b.iter(|| {
            vq.avail()
                .ring()
                .ref_at(usize::from(i % 256))
                .unwrap()
                .store(0);
            i = i.wrapping_add(1);
            vq.avail().idx().store(i);
            let chain = q.pop_descriptor_chain(&mem).unwrap();
            let head = chain.head_index();
            let total: u32 = chain.map(|d| d.len()).sum();
            q.add_used(&mem, head, total).unwrap();
            std::hint::black_box(q.needs_notification(&mem).unwrap());
        });
    });
    g.finish();
}

criterion_group!(benches, bench_queue, bench_blk);
criterion_main!(benches);
