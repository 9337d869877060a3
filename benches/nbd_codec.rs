//! NBD protocol codec: what the connection loop pays per request for decoding and validating the
//! 28-byte header and encoding the reply header, and what one client handshake costs in option
//! parsing. Everything here is sans-I/O (src/nbd), so the figures are pure CPU.
//!
//! Run: `cargo bench --bench nbd_codec`. Results and their meaning: docs/PERFORMANCE.md.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;
use std::time::Duration;
use superdisk::nbd::consts::*;
use superdisk::nbd::handshake::{self, Handshake, Next};
use superdisk::nbd::request::{self, RequestHeader};
use superdisk::nbd::{reply, ExportParams, Session};

fn export() -> ExportParams {
    ExportParams {
        name: "superdisk".into(),
        description: "bench disk".into(),
        size_bytes: 1 << 40,
        read_only: false,
        fast_zero: true,
        rotational: false,
        min_block_bytes: 1,
        preferred_block_bytes: 4096,
        max_payload_bytes: 32 << 20,
    }
}

/// The session libnbd (fio's nbd engine, nbdinfo, nbdcopy) negotiates: structured replies and
/// base:allocation, block sizes asked for with GO.
fn session() -> Session {
    Session {
        structured_replies: true,
        base_allocation: true,
        transmission_flags: export().transmission_flags(true),
        block_size_agreed: true,
    }
}

fn header_bytes(command: u16, flags: u16, offset: u64, length: u32) -> [u8; REQUEST_HEADER_BYTES] {
    request::encode_header(&RequestHeader { flags, command, cookie: 0x1234_5678, offset, length })
}

fn requests(c: &mut Criterion) {
    let (e, s) = (export(), session());
    let read_4k = header_bytes(CMD_READ, 0, 123 * 4096, 4096);
    let write_4k_fua = header_bytes(CMD_WRITE, CMD_FLAG_FUA, 456 * 4096, 4096);
    let mut g = c.benchmark_group("request");
    g.bench_function("decode_header", |b| b.iter(|| request::decode_header(black_box(&read_4k))));
    g.bench_function("decode_and_validate_read_4k", |b| {
        b.iter(|| {
            let h = request::decode_header(black_box(&read_4k)).expect("magic");
            request::validate(&h, black_box(&e), black_box(&s))
        })
    });
    g.bench_function("decode_and_validate_write_4k_fua", |b| {
        b.iter(|| {
            let h = request::decode_header(black_box(&write_4k_fua)).expect("magic");
            request::validate(&h, black_box(&e), black_box(&s))
        })
    });
    // A rejected request (out of bounds) takes the slow branch: shows validation is not the cost
    // even when it fails.
    let bad = header_bytes(CMD_READ, 0, u64::MAX - 10, 4096);
    g.bench_function("decode_and_validate_rejected", |b| {
        b.iter(|| {
            let h = request::decode_header(black_box(&bad)).expect("magic");
            request::validate(&h, black_box(&e), black_box(&s))
        })
    });
    g.finish();
}

fn replies(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply");
    // Encoding into a buffer that is reused, as a batching writer could.
    let mut out = Vec::with_capacity(64);
    g.bench_function("simple_reused_buf", |b| {
        b.iter(|| {
            out.clear();
            reply::simple(&mut out, black_box(42), None);
            black_box(out.len())
        })
    });
    g.bench_function("offset_data_header_reused_buf", |b| {
        b.iter(|| {
            out.clear();
            reply::offset_data_header(&mut out, black_box(42), black_box(4096 * 7), 4096, true);
            black_box(out.len())
        })
    });
    // What the connection does today for every read reply: a fresh 64-byte Vec per request, then
    // the structured OFFSET_DATA header into it (src/server/connection.rs, execute_op).
    g.bench_function("offset_data_header_fresh_vec", |b| {
        b.iter(|| {
            let mut head = Vec::with_capacity(64);
            reply::offset_data_header(&mut head, black_box(42), black_box(4096 * 7), 4096, true);
            head
        })
    });
    g.bench_function("error_chunk_with_message", |b| {
        b.iter(|| {
            out.clear();
            reply::error(
                &mut out,
                black_box(42),
                true,
                superdisk::nbd::NbdError::Io,
                "read failed: input/output error",
            );
            black_box(out.len())
        })
    });
    g.finish();
}

/// The option data libnbd sends, in its order: STRUCTURED_REPLY, SET_META_CONTEXT base:allocation,
/// GO asking for name, description and block size.
fn libnbd_options(export_name: &str) -> Vec<(u32, Vec<u8>)> {
    let name = export_name.as_bytes();
    let mut meta = Vec::new();
    meta.extend_from_slice(&(name.len() as u32).to_be_bytes());
    meta.extend_from_slice(name);
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
    meta.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
    let mut go = Vec::new();
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&3u16.to_be_bytes());
    for info in [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE] {
        go.extend_from_slice(&info.to_be_bytes());
    }
    vec![(OPT_STRUCTURED_REPLY, Vec::new()), (OPT_SET_META_CONTEXT, meta), (OPT_GO, go)]
}

fn handshakes(c: &mut Criterion) {
    let e = export();
    let opts = libnbd_options(&e.name);
    let mut hdr = [0u8; OPTION_HEADER_BYTES];
    hdr[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hdr[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
    hdr[12..16].copy_from_slice(&(opts[2].1.len() as u32).to_be_bytes());
    let mut g = c.benchmark_group("handshake");
    g.bench_function("decode_option_header", |b| b.iter(|| handshake::decode_option_header(black_box(&hdr))));
    g.bench_function("libnbd_negotiation", |b| {
        b.iter_batched_ref(
            || Vec::with_capacity(512),
            |out| {
                let flags = handshake::client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).expect("known flags");
                let mut hs = Handshake::new(&e, flags);
                let mut last = Next::Continue;
                for (opt, data) in &opts {
                    out.clear();
                    last = hs.option(*opt, black_box(data), out);
                }
                assert!(matches!(last, Next::Transmission(_)));
                last
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn config() -> Criterion {
    // Short runs: the whole `cargo bench` should finish in minutes on a 2-CPU machine. These
    // functions take nanoseconds, so 3 s still means hundreds of millions of iterations.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = requests, replies, handshakes }
criterion_main!(benches);
