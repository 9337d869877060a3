//! `/dev/ublk-control`: adding, starting, recovering, stopping and deleting devices. Each command
//! is one 128-byte SQE on a private ring, waited for synchronously (they are rare, and START and
//! END_USER_RECOVERY block in the kernel until every queue has fetched, so callers run them on a
//! thread of their own while the queue threads start).

use super::sys::{self, CtrlCmd, DevInfo, Params};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

pub const CONTROL_PATH: &str = "/dev/ublk-control";
/// A control command the kernel has not answered in this long is given up on: a kernel bug (an
/// ADD_DEV that never completes has been seen on one distribution kernel), not a busy device.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the control device cannot be used, as the operator should read it.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "ublk requested, but the kernel has no ublk driver: {CONTROL_PATH} is missing (`modprobe ublk_drv`; \
         ublk needs Linux 6.0+ built with CONFIG_BLK_DEV_UBLK, e.g. Debian 13's or bookworm-backports' 6.12{0})"
    )]
    NoDriver(String),
    #[error(
        "ublk requested, but {CONTROL_PATH} cannot be opened: {0} (ublk needs root with CAP_SYS_ADMIN; under \
         systemd the unit needs DeviceAllow=/dev/ublk-control rw, see docs/OPERATIONS.md)"
    )]
    Permission(io::Error),
    #[error("ublk: {what}: {err}")]
    Command { what: String, err: io::Error },
}

impl ControlError {
    pub fn command(what: impl Into<String>, err: io::Error) -> Self {
        ControlError::Command { what: what.into(), err }
    }
    /// The kernel's errno, when a command failed.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ControlError::Command { err, .. } => err.raw_os_error(),
            _ => None,
        }
    }
}

pub struct Control {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
}

impl Control {
    /// Opens the control device, loading `ublk_drv` first if it exists but is not loaded.
    pub fn open() -> Result<Self, ControlError> {
        let file =
            match File::options().read(true).write(true).open(CONTROL_PATH) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let why = crate::kernel::modprobe("ublk_drv");
                    File::options().read(true).write(true).open(CONTROL_PATH).map_err(|_| {
                        ControlError::NoDriver(why.map(|w| format!("; modprobe: {w}")).unwrap_or_default())
                    })?
                }
                Err(e) => return Err(ControlError::Permission(e)),
            };
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(|e| ControlError::command("creating the control ring (is io_uring disabled?)", e))?;
        Ok(Control { ring, file })
    }

    /// Sends one command and waits for its answer. `buf` (if any) is what `addr` points at.
    fn run(&mut self, op: u32, mut cmd: CtrlCmd, buf: Option<(&mut [u8], bool)>) -> io::Result<i32> {
        // The kernel may still write into the buffer after a timeout: it then gets a leaked copy.
        let mut owned: Option<Box<[u8]>> = None;
        if let Some((b, _)) = &buf {
            let copy: Box<[u8]> = b.to_vec().into_boxed_slice();
            cmd.addr = copy.as_ptr() as u64;
            cmd.len = copy.len() as u16;
            owned = Some(copy);
        }
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op).cmd(sys::as_bytes(&cmd)).build();
        // SAFETY: the command's buffer (`owned`) lives until its completion is reaped below, or
        // is leaked if the kernel never answers.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("control ring full"))?;
        let ts = types::Timespec::from(COMMAND_TIMEOUT);
        let args = types::SubmitArgs::new().timespec(&ts);
        loop {
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                    std::mem::forget(owned);
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the kernel did not answer in 30 s"));
                }
                Err(e) => return Err(e),
            }
            if let Some(cqe) = self.ring.completion().next() {
                if let (Some((b, true)), Some(o)) = (buf, owned.as_ref()) {
                    b.copy_from_slice(o);
                }
                let res = cqe.result();
                return if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res) };
            }
        }
    }

    fn dev_cmd(dev_id: u32) -> CtrlCmd {
        CtrlCmd { dev_id, queue_id: u16::MAX, ..Default::default() }
    }

    /// The `UBLK_F_*` features this kernel's driver offers.
    pub fn features(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.run(sys::CMD_GET_FEATURES, Self::dev_cmd(u32::MAX), Some((&mut b, true)))?;
        Ok(u64::from_ne_bytes(b))
    }

    /// Adds a device (`info.dev_id` u32::MAX: the kernel picks); returns it as the kernel made it
    /// (id, and the flags it kept: unknown ones are dropped, not refused).
    pub fn add(&mut self, info: &DevInfo) -> io::Result<DevInfo> {
        let mut b: [u8; 64] = sys::as_bytes(info);
        self.run(sys::CMD_ADD_DEV, Self::dev_cmd(info.dev_id), Some((&mut b, true)))?;
        Ok(from_bytes(&b))
    }

    pub fn info(&mut self, dev_id: u32) -> io::Result<DevInfo> {
        let mut b = [0u8; 64];
        self.run(sys::CMD_GET_DEV_INFO, Self::dev_cmd(dev_id), Some((&mut b, true)))?;
        Ok(from_bytes(&b))
    }

    pub fn set_params(&mut self, dev_id: u32, p: &Params) -> io::Result<()> {
        let mut b: [u8; 112] = sys::as_bytes(p);
        self.run(sys::CMD_SET_PARAMS, Self::dev_cmd(dev_id), Some((&mut b, false))).map(drop)
    }

    pub fn params(&mut self, dev_id: u32) -> io::Result<Params> {
        let p = Params { len: std::mem::size_of::<Params>() as u32, ..Default::default() };
        let mut b: [u8; 112] = sys::as_bytes(&p);
        self.run(sys::CMD_GET_PARAMS, Self::dev_cmd(dev_id), Some((&mut b, true)))?;
        Ok(from_bytes(&b))
    }

    /// Blocks until every queue has fetched, then the disk appears.
    pub fn start(&mut self, dev_id: u32) -> io::Result<()> {
        let cmd = CtrlCmd { data: std::process::id() as u64, ..Self::dev_cmd(dev_id) };
        self.run(sys::CMD_START_DEV, cmd, None).map(drop)
    }

    pub fn stop(&mut self, dev_id: u32) -> io::Result<()> {
        self.run(sys::CMD_STOP_DEV, Self::dev_cmd(dev_id), None).map(drop)
    }

    /// Returns once the kernel has released the device's number (its char device closed).
    pub fn delete(&mut self, dev_id: u32) -> io::Result<()> {
        self.run(sys::CMD_DEL_DEV, Self::dev_cmd(dev_id), None).map(drop)
    }

    /// EBUSY while the previous server still holds `/dev/ublkcN` (it is still exiting).
    pub fn start_recovery(&mut self, dev_id: u32) -> io::Result<()> {
        self.run(sys::CMD_START_USER_RECOVERY, Self::dev_cmd(dev_id), None).map(drop)
    }

    /// Blocks until every queue has fetched; then the requests that waited are delivered.
    pub fn end_recovery(&mut self, dev_id: u32) -> io::Result<()> {
        let cmd = CtrlCmd { data: std::process::id() as u64, ..Self::dev_cmd(dev_id) };
        self.run(sys::CMD_END_USER_RECOVERY, cmd, None).map(drop)
    }
}

/// Reads a repr(C) integer struct back from the bytes the kernel filled in.
fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    assert!(b.len() >= std::mem::size_of::<T>());
    let mut v = T::default();
    // SAFETY: T is a plain repr(C) struct of integers, every bit pattern valid; b holds at
    // least size_of::<T>() bytes.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), std::mem::size_of::<T>()) };
    v
}

/// The ids of the ublk devices that exist now (`/sys/class/ublk-char/ublkcN`).
pub fn existing_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}
