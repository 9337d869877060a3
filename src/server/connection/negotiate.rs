//! Greeting, option haggling and, when the client asks for it, the TLS upgrade in the middle
//! (the sans-IO `nbd::handshake` decides; this drives it over the socket).

use super::{protocol_error, ConnLimits, Negotiated, READ_BUFFER_BYTES, WRITE_BUFFER_BYTES};
use crate::nbd::consts::*;
use crate::nbd::handshake::{self, Handshake, Next, MAX_OPTION_DATA_BYTES};
use crate::nbd::Session;
use crate::server::tls::Joined;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::watch;

/// Greeting, option haggling and, when the client asks for it, the TLS upgrade in the middle.
/// Ok(None): the client aborted.
pub(super) async fn handshake<R, W>(
    mut reader: BufReader<R>,
    mut writer: BufWriter<W>,
    limits: &ConnLimits,
    shutdown: watch::Receiver<bool>,
) -> io::Result<Option<Negotiated<R, W>>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&handshake::greeting()).await?;
    writer.flush().await?;
    let flags = reader.read_u32().await?;
    let no_zeroes = handshake::client_flags(flags).map_err(|e| protocol_error(e.to_string()))?;
    let mut hs = Handshake::new(&limits.export, no_zeroes).with_tls(limits.tls_mode);
    match options(&mut reader, &mut writer, &mut hs, &shutdown).await? {
        Haggled::Session(s) => return Ok(Some(Negotiated::Plain(s, reader, writer))),
        Haggled::Closed => {
            let _ = writer.shutdown().await;
            return Ok(None);
        }
        Haggled::StartTls => {}
    }
    let acceptor = limits.tls.clone().ok_or_else(|| io::Error::other("STARTTLS acknowledged without a TLS setup"))?;
    // `options` flushed the ACK; whatever the read buffer holds already is the client's first TLS
    // bytes.
    let early = reader.buffer().to_vec();
    let joined = Joined::new(early, reader.into_inner(), writer.into_inner());
    let tls =
        acceptor.accept(joined).await.map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
    {
        let (_, conn) = tls.get_ref();
        tracing::debug!(
            version = ?conn.protocol_version(),
            cipher = ?conn.negotiated_cipher_suite().map(|c| c.suite()),
            client_certificate = conn.peer_certificates().is_some_and(|c| !c.is_empty()),
            "TLS established"
        );
    }
    let (r, w) = tokio::io::split(tls);
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, r);
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, w);
    match options(&mut reader, &mut writer, &mut hs, &shutdown).await? {
        Haggled::Session(s) => Ok(Some(Negotiated::Tls(s, reader, writer))),
        Haggled::Closed => {
            // close_notify, so the client sees a clean TLS end rather than a truncation.
            let _ = writer.shutdown().await;
            Ok(None)
        }
        Haggled::StartTls => Err(protocol_error("a second TLS upgrade was acknowledged")),
    }
}

enum Haggled {
    Session(Session),
    Closed,
    StartTls,
}

/// Runs option haggling until transmission, an abort, or an acknowledged STARTTLS.
async fn options<R, W>(
    reader: &mut R,
    writer: &mut W,
    hs: &mut Handshake<'_>,
    shutdown: &watch::Receiver<bool>,
) -> io::Result<Haggled>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    loop {
        let mut hdr = [0u8; OPTION_HEADER_BYTES];
        reader.read_exact(&mut hdr).await?;
        let (option, len) =
            handshake::decode_option_header(&hdr).map_err(|m| protocol_error(format!("bad option magic {m:#x}")))?;
        if len > MAX_OPTION_DATA_BYTES {
            return Err(protocol_error(format!(
                "option {option} claims {len} bytes of data; limit is {MAX_OPTION_DATA_BYTES}"
            )));
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data).await?;
        if *shutdown.borrow() {
            hs.shutting_down();
        }
        out.clear();
        let next = hs.option(option, &data, &mut out);
        writer.write_all(&out).await?;
        writer.flush().await?;
        match next {
            Next::Continue if hs.take_tls_upgrade() => return Ok(Haggled::StartTls),
            Next::Continue => {}
            Next::Transmission(s) => return Ok(Haggled::Session(s)),
            Next::Close => return Ok(Haggled::Closed),
            Next::HardDisconnect(why) => return Err(protocol_error(why)),
        }
    }
}
