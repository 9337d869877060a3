//! The handover's bytes on the socketpair between the running daemon and its successor: one
//! length-prefixed JSON header naming every descriptor's role, then the descriptors themselves
//! (`SCM_RIGHTS`), in batches the kernel accepts. The successor answers with text lines
//! (`standby …`, `serving …`, `error …`).

use super::Inherited;
use crate::device::OpenFile;
use crate::nbd::Session;
use crate::server::handover::{ParkedConnection, SocketKind};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Descriptors per `sendmsg`: the kernel's limit (SCM_MAX_FD) is 253.
const FDS_PER_MESSAGE: usize = 200;
/// A header larger than this is not one of ours.
const MAX_HEADER_BYTES: u32 = 64 << 20;

#[derive(Serialize, Deserialize)]
struct Header {
    handover_version: u32,
    backing: PathBuf,
    /// None: no cache set attached (or none configured).
    caches: Option<Vec<PathBuf>>,
    nbd_tcp: bool,
    nbd_unix: bool,
    admin: bool,
    metrics: bool,
    connections: Vec<ConnHeader>,
    fd_count: usize,
}

#[derive(Serialize, Deserialize)]
struct ConnHeader {
    kind: SocketKind,
    session: Session,
    unread: Vec<u8>,
}

/// Sends `state` (the descriptors stay open here too: the sender keeps serving if the successor
/// fails).
pub fn send(sock: &mut UnixStream, state: &Inherited) -> io::Result<()> {
    let mut fds: Vec<RawFd> = vec![state.backing.fd.as_raw_fd()];
    fds.extend(state.caches.iter().flatten().map(|c| c.fd.as_raw_fd()));
    for fd in [&state.nbd_tcp, &state.nbd_unix, &state.admin, &state.metrics].into_iter().flatten() {
        fds.push(fd.as_raw_fd());
    }
    fds.extend(state.connections.iter().map(|c| c.fd.as_raw_fd()));
    let header = Header {
        handover_version: super::HANDOVER_VERSION,
        backing: state.backing.path.clone(),
        caches: state.caches.as_ref().map(|c| c.iter().map(|f| f.path.clone()).collect()),
        nbd_tcp: state.nbd_tcp.is_some(),
        nbd_unix: state.nbd_unix.is_some(),
        admin: state.admin.is_some(),
        metrics: state.metrics.is_some(),
        connections: state
            .connections
            .iter()
            .map(|c| ConnHeader { kind: c.kind, session: c.session.clone(), unread: c.unread.clone() })
            .collect(),
        fd_count: fds.len(),
    };
    let json = serde_json::to_vec(&header).map_err(io::Error::other)?;
    let len = u32::try_from(json.len()).map_err(|_| io::Error::other("handover header too large"))?;
    sock.write_all(&len.to_le_bytes())?;
    sock.write_all(&json)?;
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        send_fds(sock, chunk)?;
    }
    Ok(())
}

/// Receives what [`send`] sent.
pub fn receive(sock: &mut UnixStream) -> io::Result<Inherited> {
    let mut len = [0u8; 4];
    sock.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("handover header of {len} bytes")));
    }
    let mut json = vec![0u8; len as usize];
    sock.read_exact(&mut json)?;
    let h: Header = serde_json::from_slice(&json)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("handover header: {e}")))?;
    if h.handover_version != super::HANDOVER_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("handover version {} (this build speaks {})", h.handover_version, super::HANDOVER_VERSION),
        ));
    }
    let mut fds = Vec::with_capacity(h.fd_count);
    while fds.len() < h.fd_count {
        let got = recv_fds(sock, h.fd_count - fds.len())?;
        if got.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the handover ended before every descriptor"));
        }
        fds.extend(got);
    }
    assemble(h, fds)
}

fn assemble(h: Header, fds: Vec<OwnedFd>) -> io::Result<Inherited> {
    let mut fds = fds.into_iter();
    let mut next = || fds.next().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "too few descriptors"));
    let backing = OpenFile { path: h.backing, fd: next()? };
    let caches = match h.caches {
        Some(paths) => {
            Some(paths.into_iter().map(|path| Ok(OpenFile { path, fd: next()? })).collect::<io::Result<_>>()?)
        }
        None => None,
    };
    let mut opt = |present: bool| if present { next().map(Some) } else { Ok(None) };
    let (nbd_tcp, nbd_unix, admin, metrics) = (opt(h.nbd_tcp)?, opt(h.nbd_unix)?, opt(h.admin)?, opt(h.metrics)?);
    let connections = h
        .connections
        .into_iter()
        .map(|c| Ok(ParkedConnection { fd: next()?, kind: c.kind, session: c.session, unread: c.unread }))
        .collect::<io::Result<_>>()?;
    Ok(Inherited { backing, caches, nbd_tcp, nbd_unix, admin, metrics, connections })
}

/// One byte of data carrying `fds` as SCM_RIGHTS.
fn send_fds(sock: &UnixStream, fds: &[RawFd]) -> io::Result<()> {
    let payload = [0u8; 1];
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    // u64 elements: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: 1 };
    // SAFETY: a zeroed msghdr is a valid "no name, no data" value; the fields set below point at
    // live buffers that outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes, enough for one header and `fds` (CMSG_SPACE),
    // so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for fd_bytes.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
    }
    // SAFETY: msg is fully initialised and its buffers are live for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message's descriptors (at most `max`), close-on-exec.
fn recv_fds(sock: &UnixStream, max: usize) -> io::Result<Vec<OwnedFd>> {
    let want = max.min(FDS_PER_MESSAGE);
    let fd_bytes = want * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut payload = [0u8; 1];
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: as in send_fds; the buffers outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg is initialised and points at live buffers.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "handover descriptors truncated"));
    }
    let mut out = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of cmsg records; each
    // SCM_RIGHTS record holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors that are now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = bytes / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    out.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn a_state_with_many_connections_crosses_the_socketpair_whole() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"backing").unwrap();
        let session = Session {
            structured_replies: true,
            base_allocation: true,
            transmission_flags: 7,
            block_size_agreed: false,
        };
        // More connections than one message carries.
        let connections = (0..300)
            .map(|i| {
                let (s, _peer) = UnixStream::pair().unwrap();
                std::mem::forget(_peer);
                ParkedConnection {
                    fd: s.into(),
                    kind: SocketKind::Unix,
                    session: session.clone(),
                    unread: vec![i as u8; i % 5],
                }
            })
            .collect();
        let state = Inherited {
            backing: OpenFile { path: "/x/backing".into(), fd: file.try_clone().unwrap().into() },
            caches: Some(vec![]),
            nbd_tcp: None,
            nbd_unix: None,
            admin: None,
            metrics: None,
            connections,
        };
        let sender = std::thread::spawn(move || send(&mut a, &state).map(|()| state));
        let got = receive(&mut b).unwrap();
        sender.join().unwrap().unwrap();
        assert_eq!(got.connections.len(), 300);
        assert_eq!(got.connections[7].unread, vec![7u8; 2]);
        assert_eq!(got.connections[7].session, session);
        assert_eq!(got.caches.as_ref().map(Vec::len), Some(0));
        let mut f = std::fs::File::from(got.backing.fd);
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "backing", "the descriptor is the same open file");
    }
}
