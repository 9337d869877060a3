//! The client side of the handshake, sans I/O: what `superdisk attach` says to a server before it
//! hands the socket to the kernel. Fixed newstyle, `NBD_OPT_GO` with the export name, no
//! structured replies (the kernel's client speaks simple replies only) and no TLS (the kernel
//! cannot carry a TLS session).

use super::consts::*;

/// What the server said about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    /// (minimum, preferred, maximum) block sizes, when the server sent them.
    pub block_sizes: Option<(u32, u32, u32)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("not an NBD server (its greeting starts {0:02x?})")]
    NotNbd(Vec<u8>),
    #[error("the server speaks only the old handshake, without options")]
    NotFixedNewstyle,
    #[error("the server refused export {export:?}: {reason}")]
    Refused { export: String, reason: String },
    #[error("the server sent a malformed reply: {0}")]
    Malformed(String),
}

/// Bytes of the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Bytes of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Option reply payloads larger than this are not ones we asked for.
pub const MAX_REPLY_DATA_BYTES: u32 = 64 << 10;

/// Checks the greeting; the client flags to send back.
pub fn answer_greeting(g: &[u8; GREETING_BYTES]) -> Result<u32, ClientError> {
    let magic = u64::from_be_bytes(g[0..8].try_into().expect("8 bytes"));
    let opt = u64::from_be_bytes(g[8..16].try_into().expect("8 bytes"));
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(ClientError::NotNbd(g[..8].to_vec()));
    }
    let flags = u16::from_be_bytes([g[16], g[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle);
    }
    let mut client = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client |= FLAG_C_NO_ZEROES;
    }
    Ok(client)
}

/// `NBD_OPT_GO` for `export`, asking for the block sizes too.
pub fn opt_go(export: &str) -> Vec<u8> {
    let name = export.as_bytes();
    let mut data = Vec::with_capacity(4 + name.len() + 4);
    // Export names are at most MAX_STRING_BYTES long (the spec); a longer one is cut there and
    // the server says it does not know it.
    let name = &name[..name.len().min(MAX_STRING_BYTES)];
    data.extend_from_slice(&u32::try_from(name.len()).expect("at most 4096").to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    let mut out = Vec::with_capacity(OPTION_HEADER_BYTES + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).expect("under 4 GiB").to_be_bytes());
    out.extend_from_slice(&data);
    out
}

/// `NBD_OPT_ABORT`, to leave politely after a refusal.
pub fn opt_abort() -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_BYTES);
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_ABORT.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}

/// An option reply header: (reply type, data length).
pub fn reply_header(h: &[u8; OPTION_REPLY_HEADER_BYTES]) -> Result<(u32, u32), ClientError> {
    let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
    let option = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientError::Malformed(format!("option reply magic {magic:#x}")));
    }
    if option != OPT_GO {
        return Err(ClientError::Malformed(format!("a reply to option {option}, not to GO")));
    }
    if len > MAX_REPLY_DATA_BYTES {
        return Err(ClientError::Malformed(format!("an option reply of {len} bytes")));
    }
    Ok((kind, len))
}

/// Collects the replies to `NBD_OPT_GO` until the server's ACK (or refusal).
#[derive(Default)]
pub struct GoReplies {
    export: String,
    size_and_flags: Option<(u64, u16)>,
    block_sizes: Option<(u32, u32, u32)>,
}

impl GoReplies {
    pub fn new(export: &str) -> Self {
        GoReplies { export: export.to_owned(), ..Default::default() }
    }

    /// One reply; `Some` once the server acknowledged GO.
    pub fn take(&mut self, kind: u32, data: &[u8]) -> Result<Option<ExportInfo>, ClientError> {
        match kind {
            REP_INFO => self.info(data).map(|()| None),
            REP_ACK => match self.size_and_flags {
                Some((size_bytes, transmission_flags)) => {
                    Ok(Some(ExportInfo { size_bytes, transmission_flags, block_sizes: self.block_sizes }))
                }
                None => Err(ClientError::Malformed("GO acknowledged without NBD_INFO_EXPORT".into())),
            },
            k if k & (1 << 31) != 0 => {
                Err(ClientError::Refused { export: self.export.clone(), reason: refusal(k, data) })
            }
            k => Err(ClientError::Malformed(format!("reply type {k} to GO"))),
        }
    }

    fn info(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let short = || ClientError::Malformed("a short NBD_REP_INFO".into());
        let info = u16::from_be_bytes(data.get(0..2).ok_or_else(short)?.try_into().expect("2 bytes"));
        let be32 = |at: usize| -> Result<u32, ClientError> {
            Ok(u32::from_be_bytes(data.get(at..at + 4).ok_or_else(short)?.try_into().expect("4 bytes")))
        };
        match info {
            INFO_EXPORT if data.len() == 12 => {
                let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                let flags = u16::from_be_bytes([data[10], data[11]]);
                self.size_and_flags = Some((size, flags));
            }
            INFO_EXPORT => return Err(short()),
            INFO_BLOCK_SIZE => self.block_sizes = Some((be32(2)?, be32(6)?, be32(10)?)),
            _ => {} // name, description, or something newer: not needed
        }
        Ok(())
    }
}

/// The error reply's meaning, with the server's message when it sent one.
fn refusal(kind: u32, data: &[u8]) -> String {
    let what = match kind {
        REP_ERR_UNKNOWN => "no such export",
        REP_ERR_POLICY => "forbidden by the server's policy",
        REP_ERR_TLS_REQD => "the server requires TLS, which the kernel client cannot do",
        REP_ERR_UNSUP => "the server does not support NBD_OPT_GO",
        REP_ERR_SHUTDOWN => "the server is shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation",
        REP_ERR_INVALID => "invalid request",
        REP_ERR_PLATFORM => "not supported on the server's platform",
        _ => "refused",
    };
    let msg = String::from_utf8_lossy(data);
    if msg.trim().is_empty() || msg.trim() == what {
        what.to_owned()
    } else {
        format!("{what} ({})", msg.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::handshake::{self, Handshake, Next};
    use crate::nbd::ExportParams;

    fn export() -> ExportParams {
        ExportParams {
            name: "disk".into(),
            description: String::new(),
            size_bytes: 1 << 30,
            read_only: false,
            fast_zero: true,
            rotational: false,
            min_block_bytes: 1,
            preferred_block_bytes: 4096,
            max_payload_bytes: 32 << 20,
        }
    }

    /// Runs the client's GO through our own server's handshake state machine.
    fn go_against_our_server(name: &str) -> Result<ExportInfo, ClientError> {
        let greeting = handshake::greeting();
        let flags = answer_greeting(&greeting)?;
        let no_zeroes = handshake::client_flags(flags).unwrap();
        let e = export();
        let mut hs = Handshake::new(&e, no_zeroes);
        let go = opt_go(name);
        let (option, _) = handshake::decode_option_header(go[..OPTION_HEADER_BYTES].try_into().unwrap()).unwrap();
        let mut out = Vec::new();
        let next = hs.option(option, &go[OPTION_HEADER_BYTES..], &mut out);
        let mut replies = GoReplies::new(name);
        let mut at = 0;
        while at < out.len() {
            let (kind, len) = reply_header(out[at..at + OPTION_REPLY_HEADER_BYTES].try_into().unwrap())?;
            at += OPTION_REPLY_HEADER_BYTES;
            let data = &out[at..at + len as usize];
            at += len as usize;
            if let Some(info) = replies.take(kind, data)? {
                assert!(matches!(next, Next::Transmission(_)), "{next:?}");
                return Ok(info);
            }
        }
        Err(ClientError::Malformed("no ACK".into()))
    }

    #[test]
    fn go_against_our_own_server_gives_size_flags_and_block_sizes() {
        let info = go_against_our_server("disk").unwrap();
        assert_eq!(info.size_bytes, 1 << 30);
        assert_ne!(info.transmission_flags & FLAG_CAN_MULTI_CONN, 0);
        assert_eq!(info.block_sizes, Some((1, 4096, 32 << 20)));
    }

    #[test]
    fn a_wrong_export_name_is_refused_by_name() {
        let e = go_against_our_server("nope").unwrap_err();
        assert!(e.to_string().contains("\"nope\"") && e.to_string().contains("no such export"), "{e}");
    }

    #[test]
    fn a_greeting_that_is_not_nbd_is_named() {
        let g: [u8; GREETING_BYTES] = *b"SSH-2.0-OpenSSH_9\n";
        assert!(matches!(answer_greeting(&g), Err(ClientError::NotNbd(_))));
    }
}
