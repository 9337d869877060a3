//! The kernel's ublk ABI (`include/uapi/linux/ublk_cmd.h`), the part superdisk uses: written out
//! here rather than generated, so the build needs no libclang. Layouts are checked by the tests
//! below against the sizes the header gives.

#![allow(dead_code)]

/// `_IOC(dir, 'u', nr, size)`: the ioctl-style encoding of a command (`UBLK_F_CMD_IOCTL_ENCODE`,
/// every kernel since 6.0's backports; the legacy plain numbers are refused on newer kernels).
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_READ: u32 = 2;
const IOC_RW: u32 = 3;
const CTRL: usize = std::mem::size_of::<CtrlCmd>();
const IO: usize = std::mem::size_of::<IoCmd>();

pub const CMD_GET_DEV_INFO: u32 = ioc(IOC_READ, 0x02, CTRL);
pub const CMD_ADD_DEV: u32 = ioc(IOC_RW, 0x04, CTRL);
pub const CMD_DEL_DEV: u32 = ioc(IOC_RW, 0x05, CTRL);
pub const CMD_START_DEV: u32 = ioc(IOC_RW, 0x06, CTRL);
pub const CMD_STOP_DEV: u32 = ioc(IOC_RW, 0x07, CTRL);
pub const CMD_SET_PARAMS: u32 = ioc(IOC_RW, 0x08, CTRL);
pub const CMD_GET_PARAMS: u32 = ioc(IOC_READ, 0x09, CTRL);
pub const CMD_START_USER_RECOVERY: u32 = ioc(IOC_RW, 0x10, CTRL);
pub const CMD_END_USER_RECOVERY: u32 = ioc(IOC_RW, 0x11, CTRL);
pub const CMD_GET_FEATURES: u32 = ioc(IOC_READ, 0x13, CTRL);

pub const IO_FETCH_REQ: u32 = ioc(IOC_RW, 0x20, IO);
pub const IO_COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_RW, 0x21, IO);

/// A fetch or commit answered with this: the device is stopping (or the queue is being torn
/// down); the tag will not be used again.
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

/// Offset of queue `q`'s descriptor array in `/dev/ublkcN`: every queue gets room for the
/// largest depth, whatever the real one.
pub const MAX_QUEUE_DEPTH: u32 = 4096;
pub const MAX_NR_QUEUES: u32 = 4096;

pub const F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
pub const F_USER_RECOVERY: u64 = 1 << 3;
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const F_USER_COPY: u64 = 1 << 7;
pub const F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
pub const F_AUTO_BUF_REG: u64 = 1 << 11;
pub const F_QUIESCE: u64 = 1 << 12;

pub const S_DEV_DEAD: u16 = 0;
pub const S_DEV_LIVE: u16 = 1;
pub const S_DEV_QUIESCED: u16 = 2;
pub const S_DEV_FAIL_IO: u16 = 3;

pub const IO_OP_READ: u8 = 0;
pub const IO_OP_WRITE: u8 = 1;
pub const IO_OP_FLUSH: u8 = 2;
pub const IO_OP_DISCARD: u8 = 3;
pub const IO_OP_WRITE_ZEROES: u8 = 5;
/// `op_flags` bits (above the op's 8).
pub const IO_F_FUA: u32 = 1 << 13;
pub const IO_F_NOUNMAP: u32 = 1 << 15;

pub const ATTR_READ_ONLY: u32 = 1 << 0;
pub const ATTR_ROTATIONAL: u32 = 1 << 1;
pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
pub const ATTR_FUA: u32 = 1 << 3;
pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;

/// `struct ublksrv_ctrl_cmd`: the 32 bytes in a control SQE's command area.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtrlCmd {
    pub dev_id: u32,
    /// `u16::MAX` when the command is not for a queue.
    pub queue_id: u16,
    pub len: u16,
    pub addr: u64,
    pub data: u64,
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    pub flags: u64,
    /// Ours to use, kept by the kernel for the device's life: superdisk's cookie.
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublksrv_io_desc`: one per tag, in the read-only array mapped from `/dev/ublkcN`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoDesc {
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

/// `struct ublksrv_io_cmd`: the 16 bytes in a queue SQE's command area.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    pub result: i32,
    pub addr: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// `struct ublk_params` up to `zoned` (6.0's layout; `len` tells a newer kernel where it ends).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Params {
    pub len: u32,
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
    pub devt: [u32; 4],
    pub zoned: [u32; 8],
}

/// The bytes of a command struct as the SQE carries them.
pub fn as_bytes<T: Copy, const N: usize>(v: &T) -> [u8; N] {
    assert!(std::mem::size_of::<T>() <= N);
    let mut out = [0u8; N];
    // SAFETY: T is a plain repr(C) struct of integers (Copy, no padding that matters to the
    // kernel: it reads only the named fields), at most N bytes, copied into a local array.
    unsafe { std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), out.as_mut_ptr(), std::mem::size_of::<T>()) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn layouts_match_the_kernel_header() {
        assert_eq!(size_of::<CtrlCmd>(), 32);
        assert_eq!(size_of::<DevInfo>(), 64);
        assert_eq!(size_of::<IoDesc>(), 24);
        assert_eq!(size_of::<IoCmd>(), 16);
        assert_eq!(size_of::<ParamBasic>(), 32);
        assert_eq!(size_of::<ParamDiscard>(), 20);
        assert_eq!(size_of::<Params>(), 112);
    }

    #[test]
    fn commands_are_ioctl_encoded_as_the_header_does() {
        // Values from the header's _IOR/_IOWR macros on x86_64 and arm64.
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }
}
