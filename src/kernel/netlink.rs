//! The kernel's generic netlink family `nbd` (include/uapi/linux/nbd-netlink.h): connect a device
//! to sockets, give it fresh ones after a link died, disconnect it, ask its status, and hear of
//! dead links on the `nbd_mc_group` multicast group. The framing is rust-netlink's
//! (`netlink-packet-*`, `netlink-sys`); the family's commands and attributes are here.

use netlink_packet_core::{
    DecodeError, Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NlaBuffer, NlasIterator,
    ParseableParametrized, NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::{GenlCtrlAttrs, McastGrpAttrs};
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

const FAMILY: &str = "nbd";
const VERSION: u8 = 1;
const MCAST_GROUP: &str = "nbd_mc_group";

const CMD_CONNECT: u8 = 1;
const CMD_DISCONNECT: u8 = 2;
const CMD_RECONFIGURE: u8 = 3;
pub const CMD_LINK_DEAD: u8 = 4;
const CMD_STATUS: u8 = 5;

const ATTR_INDEX: u16 = 1;
const ATTR_SIZE_BYTES: u16 = 2;
const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const ATTR_TIMEOUT: u16 = 4;
const ATTR_SERVER_FLAGS: u16 = 5;
const ATTR_CLIENT_FLAGS: u16 = 6;
const ATTR_SOCKETS: u16 = 7;
const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const ATTR_DEVICE_LIST: u16 = 9;
/// Linux 5.19+; older kernels ignore it (the family does not validate strictly).
const ATTR_BACKEND_IDENTIFIER: u16 = 10;
const SOCK_ITEM: u16 = 1;
const SOCK_FD: u16 = 1;
const DEVICE_ITEM: u16 = 1;
const DEVICE_INDEX: u16 = 1;
const DEVICE_CONNECTED: u16 = 2;

/// One attribute of the `nbd` family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    Index(u32),
    SizeBytes(u64),
    BlockSizeBytes(u64),
    TimeoutSecs(u64),
    ServerFlags(u64),
    ClientFlags(u64),
    Sockets(Vec<RawFd>),
    DeadConnTimeoutSecs(u64),
    BackendIdentifier(String),
    /// (index, connected) per device, from STATUS.
    Devices(Vec<(u32, bool)>),
    Other(u16),
}

/// A nested attribute holding one attribute: the socket list's items.
struct SockItem(RawFd);

impl Nla for SockItem {
    fn value_len(&self) -> usize {
        8 // one NBD_SOCK_FD: 4-byte header + u32
    }
    fn kind(&self) -> u16 {
        SOCK_ITEM | NLA_F_NESTED
    }
    fn emit_value(&self, buf: &mut [u8]) {
        buf[0..2].copy_from_slice(&8u16.to_ne_bytes());
        buf[2..4].copy_from_slice(&SOCK_FD.to_ne_bytes());
        // A descriptor is never negative; the kernel reads it as u32.
        buf[4..8].copy_from_slice(&u32::try_from(self.0).unwrap_or(u32::MAX).to_ne_bytes());
    }
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        match self {
            Attr::Index(_) => 4,
            Attr::SizeBytes(_)
            | Attr::BlockSizeBytes(_)
            | Attr::TimeoutSecs(_)
            | Attr::ServerFlags(_)
            | Attr::ClientFlags(_)
            | Attr::DeadConnTimeoutSecs(_) => 8,
            Attr::Sockets(fds) => fds.iter().map(|&fd| SockItem(fd).buffer_len()).sum(),
            Attr::BackendIdentifier(s) => s.len() + 1,
            Attr::Devices(_) | Attr::Other(_) => 0,
        }
    }
    fn kind(&self) -> u16 {
        match self {
            Attr::Index(_) => ATTR_INDEX,
            Attr::SizeBytes(_) => ATTR_SIZE_BYTES,
            Attr::BlockSizeBytes(_) => ATTR_BLOCK_SIZE_BYTES,
            Attr::TimeoutSecs(_) => ATTR_TIMEOUT,
            Attr::ServerFlags(_) => ATTR_SERVER_FLAGS,
            Attr::ClientFlags(_) => ATTR_CLIENT_FLAGS,
            Attr::Sockets(_) => ATTR_SOCKETS | NLA_F_NESTED,
            Attr::DeadConnTimeoutSecs(_) => ATTR_DEAD_CONN_TIMEOUT,
            Attr::BackendIdentifier(_) => ATTR_BACKEND_IDENTIFIER,
            Attr::Devices(_) => ATTR_DEVICE_LIST | NLA_F_NESTED,
            Attr::Other(k) => *k,
        }
    }
    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Attr::Index(v) => buf.copy_from_slice(&v.to_ne_bytes()),
            Attr::SizeBytes(v)
            | Attr::BlockSizeBytes(v)
            | Attr::TimeoutSecs(v)
            | Attr::ServerFlags(v)
            | Attr::ClientFlags(v)
            | Attr::DeadConnTimeoutSecs(v) => buf.copy_from_slice(&v.to_ne_bytes()),
            Attr::Sockets(fds) => {
                let items: Vec<SockItem> = fds.iter().map(|&fd| SockItem(fd)).collect();
                items.as_slice().emit(buf);
            }
            Attr::BackendIdentifier(s) => {
                buf[..s.len()].copy_from_slice(s.as_bytes());
                buf[s.len()] = 0;
            }
            Attr::Devices(_) | Attr::Other(_) => {}
        }
    }
}

fn parse_attr(nla: &NlaBuffer<&[u8]>) -> Result<Attr, DecodeError> {
    let v = nla.value();
    let u32_at = |b: &[u8]| b.get(..4).map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    Ok(match nla.kind() & !NLA_F_NESTED {
        ATTR_INDEX => Attr::Index(u32_at(v).ok_or("short NBD_ATTR_INDEX")?),
        ATTR_DEVICE_LIST => Attr::Devices(parse_devices(v)?),
        k => Attr::Other(k),
    })
}

fn parse_devices(v: &[u8]) -> Result<Vec<(u32, bool)>, DecodeError> {
    let mut out = Vec::new();
    for item in NlasIterator::new(v) {
        let item = item?;
        if item.kind() & !NLA_F_NESTED != DEVICE_ITEM {
            continue;
        }
        let (mut index, mut connected) = (None, false);
        for a in NlasIterator::new(item.value()) {
            let a = a?;
            match a.kind() {
                DEVICE_INDEX => index = a.value().get(..4).map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes"))),
                DEVICE_CONNECTED => connected = a.value().first().is_some_and(|&b| b != 0),
                _ => {}
            }
        }
        if let Some(i) = index {
            out.push((i, connected));
        }
    }
    Ok(out)
}

/// A message of the `nbd` family: a command and its attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdMsg {
    pub cmd: u8,
    pub attrs: Vec<Attr>,
}

impl GenlFamily for NbdMsg {
    fn family_name() -> &'static str {
        FAMILY
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        VERSION
    }
}

impl Emitable for NbdMsg {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buf: &mut [u8]) {
        self.attrs.as_slice().emit(buf)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NbdMsg {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf).map(|n| parse_attr(&n?)).collect::<Result<_, _>>()?;
        Ok(NbdMsg { cmd: header.cmd, attrs })
    }
}

/// The parameters of a connect.
pub struct Connect<'a> {
    /// None: the kernel picks a free device (or makes one).
    pub index: Option<u32>,
    pub size_bytes: u64,
    pub block_size_bytes: u64,
    pub server_flags: u16,
    pub io_timeout_secs: u64,
    pub dead_conn_timeout_secs: u64,
    pub sockets: &'a [RawFd],
    pub backend: &'a str,
}

/// Netlink sockets for the `nbd` family: one for commands, and once subscribed, one that only
/// hears dead-link events. Apart, so that no event is read (and lost) while a command waits for
/// its answer.
pub struct NbdNetlink {
    sock: Socket,
    events: Option<Socket>,
    family_id: u16,
    mcast_group: Option<u32>,
    seq: u32,
}

impl NbdNetlink {
    /// Resolves the family; `Ok(None)` when the kernel has no `nbd` family (module not loaded).
    pub fn open() -> io::Result<Option<NbdNetlink>> {
        let mut sock = Socket::new(NETLINK_GENERIC)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        let mut nl = NbdNetlink { sock, events: None, family_id: 0, mcast_group: None, seq: 0 };
        let mut req = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY.to_owned())],
        });
        req.finalize();
        let replies = match nl.request(req) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        for reply in replies {
            for attr in reply.payload.nlas {
                match attr {
                    GenlCtrlAttrs::FamilyId(id) => nl.family_id = id,
                    GenlCtrlAttrs::McastGroups(groups) => nl.mcast_group = mcast_id(&groups),
                    _ => {}
                }
            }
        }
        if nl.family_id == 0 {
            return Ok(None);
        }
        Ok(Some(nl))
    }

    /// Sends `msg` and collects the replies up to the kernel's ACK (or its error).
    fn request<F>(&mut self, msg: GenlMessage<F>) -> io::Result<Vec<GenlMessage<F>>>
    where
        F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = self.seq;
        let mut nlmsg = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nlmsg.finalize();
        let mut buf = vec![0u8; nlmsg.buffer_len()];
        nlmsg.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut at = 0;
            while at < data.len() {
                let m = NetlinkMessage::<GenlMessage<F>>::deserialize(&data[at..]).map_err(io::Error::other)?;
                at += m.header.length as usize;
                if m.header.sequence_number != self.seq {
                    continue; // a multicast event or a stale answer
                }
                match m.payload {
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
                if m.header.length == 0 {
                    break;
                }
            }
        }
    }

    fn nbd(&mut self, cmd: u8, attrs: Vec<Attr>) -> io::Result<Vec<NbdMsg>> {
        let mut msg = GenlMessage::from_payload(NbdMsg { cmd, attrs });
        msg.set_resolved_family_id(self.family_id);
        Ok(self.request(msg)?.into_iter().map(|m| m.payload).collect())
    }

    /// Connects a device to `c.sockets`; the device's index.
    pub fn connect(&mut self, c: &Connect<'_>) -> io::Result<u32> {
        let mut attrs = vec![
            Attr::SizeBytes(c.size_bytes),
            Attr::BlockSizeBytes(c.block_size_bytes),
            Attr::ServerFlags(u64::from(c.server_flags)),
            Attr::TimeoutSecs(c.io_timeout_secs),
            Attr::DeadConnTimeoutSecs(c.dead_conn_timeout_secs),
            Attr::Sockets(c.sockets.to_vec()),
            Attr::BackendIdentifier(c.backend.to_owned()),
        ];
        if let Some(i) = c.index {
            attrs.insert(0, Attr::Index(i));
        }
        let replies = self.nbd(CMD_CONNECT, attrs)?;
        replies
            .iter()
            .flat_map(|m| &m.attrs)
            .find_map(|a| if let Attr::Index(i) = a { Some(*i) } else { None })
            .or(c.index)
            .ok_or_else(|| io::Error::other("the kernel did not say which device it connected"))
    }

    /// Replaces dead sockets of device `index` with `sockets`. The kernel takes a socket only in
    /// place of one it has already marked dead, and silently drops the rest (see `supervisor`).
    /// `backend` must be the identifier the device was connected with: kernels that know the
    /// attribute refuse a reconfigure without it ("must specify backend").
    pub fn reconfigure(&mut self, index: u32, sockets: &[RawFd], backend: &str) -> io::Result<()> {
        let attrs =
            vec![Attr::Index(index), Attr::BackendIdentifier(backend.to_owned()), Attr::Sockets(sockets.to_vec())];
        self.nbd(CMD_RECONFIGURE, attrs).map(|_| ())
    }

    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        self.nbd(CMD_DISCONNECT, vec![Attr::Index(index)]).map(|_| ())
    }

    /// Whether device `index` is connected; None if the kernel does not know it.
    pub fn connected(&mut self, index: u32) -> io::Result<Option<bool>> {
        let replies = self.nbd(CMD_STATUS, vec![Attr::Index(index)])?;
        for m in replies {
            for a in m.attrs {
                if let Attr::Devices(list) = a {
                    return Ok(list.into_iter().find(|(i, _)| *i == index).map(|(_, c)| c));
                }
            }
        }
        Ok(None)
    }

    /// Joins the dead-link multicast group; afterwards [`Self::next_events`] reports dead links.
    pub fn subscribe(&mut self) -> io::Result<()> {
        let group =
            self.mcast_group.ok_or_else(|| io::Error::other("the kernel's nbd family has no multicast group"))?;
        let mut events = Socket::new(NETLINK_GENERIC)?;
        events.bind_auto()?;
        events.add_membership(group)?;
        // Events are a few dozen bytes; a roomy buffer makes an overrun (lost events) unlikely.
        events.set_rx_buf_sz(1 << 20)?;
        self.events = Some(events);
        Ok(())
    }

    /// The devices whose links died (one entry per dead link), from what arrives within `wait`.
    /// `Err` with ENOBUFS means events were lost: the caller must check its devices itself.
    pub fn next_events(&mut self, wait: Duration) -> io::Result<Vec<u32>> {
        let Some(events) = &self.events else { return Err(io::Error::other("not subscribed")) };
        let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(events), events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll on one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(Vec::new()) } else { Err(e) };
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let (data, _) = events.recv_from_full()?;
        let mut dead = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let m = NetlinkMessage::<GenlMessage<NbdMsg>>::deserialize(&data[at..]).map_err(io::Error::other)?;
            let len = m.header.length as usize;
            if let NetlinkPayload::InnerMessage(g) = m.payload {
                if g.payload.cmd == CMD_LINK_DEAD {
                    dead.extend(
                        g.payload.attrs.iter().find_map(|a| if let Attr::Index(i) = a { Some(*i) } else { None }),
                    );
                }
            }
            if len == 0 {
                break;
            }
            at += len;
        }
        Ok(dead)
    }
}

fn mcast_id(groups: &[Vec<McastGrpAttrs>]) -> Option<u32> {
    groups.iter().find_map(|g| {
        let named = g.iter().any(|a| matches!(a, McastGrpAttrs::Name(n) if n == MCAST_GROUP));
        if named {
            g.iter().find_map(|a| if let McastGrpAttrs::Id(id) = a { Some(*id) } else { None })
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the kernel parses for NBD_ATTR_SOCKETS with two descriptors, as laid out in
    /// nbd-netlink.h: [SOCKETS [SOCK_ITEM [SOCK_FD u32]] [SOCK_ITEM [SOCK_FD u32]]].
    #[test]
    fn the_socket_list_nests_one_item_per_descriptor() {
        let a = Attr::Sockets(vec![5, 7]);
        let mut buf = vec![0u8; a.buffer_len()];
        a.emit(&mut buf);
        let mut want = Vec::new();
        want.extend_from_slice(&28u16.to_ne_bytes()); // 4 + 2 × 12
        want.extend_from_slice(&(7u16 | NLA_F_NESTED).to_ne_bytes());
        for fd in [5u32, 7] {
            want.extend_from_slice(&12u16.to_ne_bytes());
            want.extend_from_slice(&(1u16 | NLA_F_NESTED).to_ne_bytes());
            want.extend_from_slice(&8u16.to_ne_bytes());
            want.extend_from_slice(&1u16.to_ne_bytes());
            want.extend_from_slice(&fd.to_ne_bytes());
        }
        assert_eq!(buf, want);
    }

    #[test]
    fn a_status_reply_lists_devices_and_a_link_dead_event_names_its_device() {
        // NBD_ATTR_DEVICE_LIST [NBD_DEVICE_ITEM [INDEX 3] [CONNECTED 1]]
        let mut item = Vec::new();
        item.extend_from_slice(&8u16.to_ne_bytes());
        item.extend_from_slice(&DEVICE_INDEX.to_ne_bytes());
        item.extend_from_slice(&3u32.to_ne_bytes());
        item.extend_from_slice(&5u16.to_ne_bytes());
        item.extend_from_slice(&DEVICE_CONNECTED.to_ne_bytes());
        item.extend_from_slice(&[1, 0, 0, 0]);
        let mut list = Vec::new();
        list.extend_from_slice(&((4 + item.len()) as u16).to_ne_bytes());
        list.extend_from_slice(&(DEVICE_ITEM | NLA_F_NESTED).to_ne_bytes());
        list.extend_from_slice(&item);
        let mut attr = Vec::new();
        attr.extend_from_slice(&((4 + list.len()) as u16).to_ne_bytes());
        attr.extend_from_slice(&(ATTR_DEVICE_LIST | NLA_F_NESTED).to_ne_bytes());
        attr.extend_from_slice(&list);
        let m = NbdMsg::parse_with_param(&attr, GenlHeader { cmd: CMD_STATUS, version: 1 }).unwrap();
        assert_eq!(m.attrs, vec![Attr::Devices(vec![(3, true)])]);
        let mut dead = vec![0u8; 8];
        Attr::Index(9).emit(&mut dead);
        let m = NbdMsg::parse_with_param(&dead, GenlHeader { cmd: CMD_LINK_DEAD, version: 1 }).unwrap();
        assert_eq!(m.attrs, vec![Attr::Index(9)]);
    }
}
