//! ublk spike on libublk 0.4.8: a file-backed target with user recovery, to prove that a 6.12
//! guest serves a ublk device and resumes it after SIGKILL. Not superdisk code.
//!
//!   spike features                      driver features (GET_FEATURES), decoded
//!   spike add FILE [ID] [zc]            add /dev/ublkbN over FILE, serve in the foreground
//!   spike recover ID FILE               START_USER_RECOVERY on ID, serve FILE again
//!   spike info ID | del ID              device state / delete
//!   spike errors                        how libublk reports EEXIST, EPERM/EACCES, ENOENT
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkIORes};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

const FEATURES: &[(u64, &str)] = &[
    (sys::UBLK_F_SUPPORT_ZERO_COPY as u64, "SUPPORT_ZERO_COPY"),
    (sys::UBLK_F_URING_CMD_COMP_IN_TASK as u64, "URING_CMD_COMP_IN_TASK"),
    (sys::UBLK_F_NEED_GET_DATA as u64, "NEED_GET_DATA"),
    (sys::UBLK_F_USER_RECOVERY as u64, "USER_RECOVERY"),
    (sys::UBLK_F_USER_RECOVERY_REISSUE as u64, "USER_RECOVERY_REISSUE"),
    (sys::UBLK_F_UNPRIVILEGED_DEV as u64, "UNPRIVILEGED_DEV"),
    (sys::UBLK_F_CMD_IOCTL_ENCODE as u64, "CMD_IOCTL_ENCODE"),
    (sys::UBLK_F_USER_COPY as u64, "USER_COPY"),
    (sys::UBLK_F_ZONED as u64, "ZONED"),
    (sys::UBLK_F_USER_RECOVERY_FAIL_IO as u64, "USER_RECOVERY_FAIL_IO"),
    (sys::UBLK_F_UPDATE_SIZE as u64, "UPDATE_SIZE"),
    (sys::UBLK_F_AUTO_BUF_REG as u64, "AUTO_BUF_REG"),
    (sys::UBLK_F_QUIESCE as u64, "QUIESCE"),
    (sys::UBLK_F_PER_IO_DAEMON as u64, "PER_IO_DAEMON"),
    (sys::UBLK_F_BUF_REG_OFF_DAEMON as u64, "BUF_REG_OFF_DAEMON"),
    (sys::UBLK_F_BATCH_IO as u64, "BATCH_IO"),
];

fn decode(flags: u64) -> String {
    let mut v: Vec<&str> = FEATURES.iter().filter(|(b, _)| flags & b != 0).map(|(_, n)| *n).collect();
    let known: u64 = FEATURES.iter().map(|(b, _)| b).sum();
    let rest = flags & !known;
    let extra = format!("0x{rest:x}");
    if rest != 0 {
        v.push(&extra);
    }
    v.join(" ")
}

/// What libublk's error says, both ways: Display (what `{}` prints) and Debug (carries errno).
fn show(e: &UblkError) -> String {
    format!("display=\"{e}\" debug={e:?}")
}

static SEEN: [AtomicU32; 8] = [const { AtomicU32::new(0) }; 8];
static FUA_SEEN: AtomicU32 = AtomicU32::new(0);

fn errno() -> i32 {
    -std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// One request, synchronously, against the file: the result the kernel gets (bytes or -errno).
fn handle(fd: i32, iod: &sys::ublksrv_io_desc, buf: *mut u8) -> i32 {
    let op = iod.op_flags & 0xff;
    let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
    let off = (iod.start_sector << 9) as i64;
    let len = (iod.nr_sectors as usize) << 9;
    if (op as usize) < SEEN.len() && SEEN[op as usize].fetch_add(1, Ordering::Relaxed) == 0 {
        eprintln!("spike: first request of op {op} (fua={fua}, {len} bytes at {off})");
    }
    if fua && FUA_SEEN.fetch_add(1, Ordering::Relaxed) == 0 {
        eprintln!("spike: first FUA request: op {op}, {len} bytes at {off}");
    }
    // SAFETY: buf is this tag's io buffer, max_io_buf_bytes long; the kernel never sends more.
    unsafe {
        match op {
            sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE => {
                let mut done = 0usize;
                while done < len {
                    let p = buf.add(done);
                    let r = if op == sys::UBLK_IO_OP_READ {
                        libc::pread(fd, p.cast(), len - done, off + done as i64)
                    } else {
                        libc::pwrite(fd, p.cast(), len - done, off + done as i64)
                    };
                    if r < 0 {
                        return errno();
                    }
                    if r == 0 {
                        // Past the file's end: reads see zeroes.
                        std::ptr::write_bytes(p, 0, len - done);
                        break;
                    }
                    done += r as usize;
                }
                if op == sys::UBLK_IO_OP_WRITE && fua && libc::fdatasync(fd) < 0 {
                    return errno();
                }
                len as i32
            }
            sys::UBLK_IO_OP_FLUSH => {
                if libc::fdatasync(fd) < 0 { errno() } else { 0 }
            }
            sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
                let mode = if op == sys::UBLK_IO_OP_WRITE_ZEROES && iod.op_flags & sys::UBLK_IO_F_NOUNMAP != 0 {
                    libc::FALLOC_FL_ZERO_RANGE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                if libc::fallocate(fd, mode, off, len as i64) < 0 {
                    let e = errno();
                    if e != -libc::EOPNOTSUPP {
                        return e;
                    }
                    // tmpfs has no ZERO_RANGE: write the zeroes.
                    let z = vec![0u8; 1 << 20];
                    let mut done = 0usize;
                    while done < len {
                        let n = (len - done).min(z.len());
                        if libc::pwrite(fd, z.as_ptr().cast(), n, off + done as i64) < 0 {
                            return errno();
                        }
                        done += n;
                    }
                }
                if fua && libc::fdatasync(fd) < 0 {
                    return errno();
                }
                0
            }
            _ => -libc::EINVAL,
        }
    }
}

fn queue_fn(qid: u16, dev: &UblkDev, file: Arc<File>) {
    let bufs = Rc::new(dev.alloc_queue_io_bufs());
    let bufs2 = bufs.clone();
    let fd = file.as_raw_fd();
    let handler = move |q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
        let iod = *q.get_iod(tag);
        let buf = &bufs2[tag as usize];
        let res = handle(fd, &iod, buf.as_mut_ptr());
        if let Err(e) = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf.as_slice()), Ok(UblkIORes::Result(res))) {
            eprintln!("spike: complete tag {tag}: {}", show(&e));
        }
    };
    match UblkQueue::new(qid, dev).and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs)))) {
        Ok(q) => q.wait_and_handle_io(handler),
        Err(e) => eprintln!("spike: queue {qid}: {}", show(&e)),
    }
    eprintln!("spike: queue {qid} thread ends");
}

/// The same requests, but each handled by a task on a shared multi-thread tokio runtime (as
/// superdisk's Volume would be); the task hands its result back through a queue-local list and an
/// eventfd whose read is an SQE on the queue's own ring, and the queue thread commits it (ublk
/// wants every COMMIT_AND_FETCH from the queue's own thread before 6.16's PER_IO_DAEMON).
fn queue_fn_tokio(qid: u16, dev: &UblkDev, file: Arc<File>, rt: tokio::runtime::Handle) {
    use io_uring::{opcode, types};
    use std::sync::Mutex;
    let depth = dev.dev_info.queue_depth;
    let bufs = Rc::new(dev.alloc_queue_io_bufs());
    let bufs2 = bufs.clone();
    let fd = file.as_raw_fd();
    // SAFETY: plain syscall.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(efd >= 0);
    let done: Arc<Mutex<Vec<(u16, i32)>>> = Arc::new(Mutex::new(Vec::new()));
    let done2 = done.clone();
    let mut counter = Box::new(0u64);
    let cptr: *mut u64 = &mut *counter;
    let arm = move |q: &UblkQueue| {
        let sqe = opcode::Read::new(types::Fd(efd), cptr.cast(), 8)
            .build()
            .user_data(libublk::io::UblkIOCtx::build_user_data(depth, 0, 0, true));
        q.ublk_submit_sqe_sync(sqe).unwrap();
    };
    let handler = move |q: &UblkQueue, tag: u16, io: &UblkIOCtx| {
        if io.is_tgt_io() {
            // The eventfd fired: commit what the runtime finished, then re-arm.
            let list = std::mem::take(&mut *done2.lock().unwrap());
            for (t, res) in list {
                let buf = &bufs2[t as usize];
                if let Err(e) = q.complete_io_cmd_unified(t, BufDesc::Slice(buf.as_slice()), Ok(UblkIORes::Result(res))) {
                    eprintln!("spike: complete tag {t}: {}", show(&e));
                }
            }
            if io.result() >= 0 {
                arm(q);
            }
            return;
        }
        let iod = *q.get_iod(tag);
        let bufp = bufs2[tag as usize].as_mut_ptr() as usize;
        let done3 = done2.clone();
        rt.spawn(async move {
            tokio::task::yield_now().await;
            let res = handle(fd, &iod, bufp as *mut u8);
            done3.lock().unwrap().push((tag, res));
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64.
            unsafe { libc::write(efd, (&one as *const u64).cast(), 8) };
        });
    };
    match UblkQueue::new(qid, dev).and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs)))) {
        Ok(q) => {
            arm(&q);
            q.wait_and_handle_io(handler)
        }
        Err(e) => eprintln!("spike: queue {qid}: {}", show(&e)),
    }
    drop(counter);
    eprintln!("spike: queue {qid} thread ends");
}

fn serve(ctrl: UblkCtrl, path: &str) -> Result<(), UblkError> {
    let file = Arc::new(OpenOptions::new().read(true).write(true).open(path)?);
    let size = file.metadata()?.len();
    let info = ctrl.dev_info();
    eprintln!(
        "spike: dev {} state {} queues {} depth {} flags 0x{:x} [{}]",
        info.dev_id, info.state, info.nr_hw_queues, info.queue_depth, info.flags, decode(info.flags)
    );
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        // One extra tag per queue: the eventfd read of SPIKE_TOKIO mode.
        dev.tgt.extra_ios = 1;
        let p = &mut dev.tgt.params;
        p.basic.attrs |= sys::UBLK_ATTR_FUA;
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_granularity: 4096,
            max_discard_sectors: 1 << 16,
            max_write_zeroes_sectors: 1 << 16,
            max_discard_segments: 1,
            ..Default::default()
        };
        Ok(())
    };
    let f = file.clone();
    let ready = |c: &UblkCtrl| {
        let i = c.dev_info();
        println!("READY {} id={} state={} pid={}", c.get_bdev_path(), i.dev_id, i.state, std::process::id());
        let _ = std::io::stdout().flush();
    };
    if std::env::var_os("SPIKE_TOKIO").is_some() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let h = rt.handle().clone();
        eprintln!("spike: requests handled on a tokio multi-thread runtime (SPIKE_TOKIO)");
        ctrl.run_target(tgt_init, move |qid: u16, dev: &UblkDev| queue_fn_tokio(qid, dev, f.clone(), h.clone()), ready)?;
    } else {
        ctrl.run_target(tgt_init, move |qid: u16, dev: &UblkDev| queue_fn(qid, dev, f.clone()), ready)?;
    }
    Ok(())
}

fn builder<'a>(id: i32, extra_flags: u64, dev_flags: UblkFlags) -> UblkCtrlBuilder<'a> {
    UblkCtrlBuilder::default()
        .name("spike")
        .id(id)
        .nr_queues(2)
        .depth(64)
        .io_buf_bytes(512 << 10)
        .ctrl_flags((sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64 | extra_flags)
        .dev_flags(dev_flags)
}

fn run() -> Result<(), UblkError> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    match arg(1) {
        Some("features") => match UblkCtrl::get_features() {
            Some(f) => println!("ublk features 0x{f:x}: {}", decode(f)),
            None => {
                println!("ublk features: unavailable (GET_FEATURES failed or no /dev/ublk-control)");
                // What the constructor itself says, for the record.
                if let Err(e) = UblkCtrl::new(None, -1, 0, 0, 0, 0, 0, UblkFlags::empty()) {
                    println!("UblkCtrl::new: {}", show(&e));
                }
            }
        },
        Some("add") => {
            let path = arg(2).expect("add FILE [ID] [zc]");
            let id = arg(3).map(|s| s.parse().unwrap()).unwrap_or(-1);
            let zc = if arg(4) == Some("zc") { sys::UBLK_F_AUTO_BUF_REG as u64 } else { 0 };
            let ctrl = builder(id, zc, UblkFlags::UBLK_DEV_F_ADD_DEV).build()?;
            serve(ctrl, path)?;
        }
        Some("recover") => {
            let id: i32 = arg(2).expect("recover ID FILE").parse().unwrap();
            let path = arg(3).expect("recover ID FILE");
            let t0 = std::time::Instant::now();
            UblkCtrl::new_simple(id)?.start_user_recover()?;
            eprintln!("spike: START_USER_RECOVERY accepted after {:?}", t0.elapsed());
            let ctrl = builder(id, 0, UblkFlags::UBLK_DEV_F_RECOVER_DEV).build()?;
            serve(ctrl, path)?;
        }
        Some("info") => {
            let c = UblkCtrl::new_simple(arg(2).expect("info ID").parse().unwrap())?;
            let i = c.dev_info();
            println!(
                "dev {} state {} (0 dead, 1 live, 2 quiesced, 3 fail-io) pid {} flags 0x{:x} [{}]",
                i.dev_id, i.state, i.ublksrv_pid, i.flags, decode(i.flags)
            );
        }
        Some("del") => {
            UblkCtrl::new_simple(arg(2).expect("del ID").parse().unwrap())?.del_dev()?;
        }
        Some("errors") => {
            // A device id in use: add id 0 twice (the first is left un-started, then deleted).
            let a = builder(0, 0, UblkFlags::UBLK_DEV_F_ADD_DEV).build();
            println!("add id 0: {}", a.as_ref().map(|_| "ok".to_string()).unwrap_or_else(show));
            let b = builder(0, 0, UblkFlags::UBLK_DEV_F_ADD_DEV).build();
            println!("add id 0 again: {}", b.as_ref().map(|_| "ok".to_string()).unwrap_or_else(show));
            if let Ok(a) = a {
                println!("del id 0: {:?}", a.del_dev().map_err(|e| show(&e)));
            }
            // An unknown id.
            let c = UblkCtrl::new_simple(77);
            println!("open id 77: {}", c.as_ref().map(|_| "ok".to_string()).unwrap_or_else(show));
            // No permission: drop root and try again.
            // SAFETY: plain syscalls.
            unsafe {
                libc::setgid(65534);
                libc::setuid(65534);
            }
            let d = builder(-1, 0, UblkFlags::UBLK_DEV_F_ADD_DEV).build();
            println!("add as uid 65534: {}", d.as_ref().map(|_| "ok".to_string()).unwrap_or_else(show));
        }
        _ => {
            eprintln!("usage: spike features | add FILE [ID] [zc] | recover ID FILE | info ID | del ID | errors");
            std::process::exit(2);
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("spike: error: {}", show(&e));
        std::process::exit(1);
    }
}
