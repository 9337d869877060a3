//! TLS for NBD_OPT_STARTTLS: the rustls server configuration, built once at start-up from the
//! `tls_*` keys, and the stream adapter the upgrade runs on.
//!
//! rustls with the `ring` provider: TLS 1.3 and 1.2 (the spec's MUST; 1.2 can be turned off with
//! `tls_min_version = "1.3"`), no older versions, no compression, no renegotiation. With `tls_ca`,
//! the client must present a certificate chaining to it (mutual TLS); that certificate is the only
//! client authentication NBD has.

pub use crate::nbd::handshake::TlsMode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

/// The TLS settings (the `tls_*` config keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    /// PEM certificate chain, server certificate first; required unless `mode` is off.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s): when set, clients must present a certificate signed by one of them.
    pub ca: Option<PathBuf>,
    pub min_version: TlsVersion,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsVersion {
    #[default]
    V1_2,
    V1_3,
}

/// A TLS file that cannot be used: the setting it came from (`tls_cert`, `tls_key`, `tls_ca`,
/// `tls_min_version`) and why.
#[derive(Debug)]
pub struct TlsError {
    pub key: &'static str,
    pub reason: String,
}

fn invalid(key: &'static str, reason: String) -> TlsError {
    TlsError { key, reason }
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(key, format!("{}: no PEM certificate (BEGIN CERTIFICATE) in the file", path.display())));
    }
    Ok(certs)
}

/// Reads the certificate, key and CA files and builds the acceptor; `None` when `tls` is off.
/// Every failure names the key whose file is at fault.
pub fn acceptor(cfg: &TlsSettings) -> Result<Option<TlsAcceptor>, TlsError> {
    if cfg.mode == TlsMode::Off {
        return Ok(None);
    }
    let (Some(cert_path), Some(key_path)) = (&cfg.cert, &cfg.key) else {
        return Err(invalid("tls_cert", "and `tls_key` are required when `tls` is on".into()));
    };
    let chain = certificates("tls_cert", cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| invalid("tls_key", format!("{}: {e}", key_path.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| invalid("tls_min_version", e.to_string()))?;
    let builder = match &cfg.ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates("tls_ca", ca_path)? {
                roots.add(c).map_err(|e| invalid("tls_ca", format!("{}: {e}", ca_path.display())))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid("tls_ca", format!("{}: {e}", ca_path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| {
        invalid(
            "tls_key",
            format!("{} cannot be used with the certificate in {}: {e}", key_path.display(), cert_path.display()),
        )
    })?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// A connection's two halves joined back into one stream for the TLS layer, with the bytes the
/// handshake's read buffer already held in front: a client may send its ClientHello right behind
/// STARTTLS without waiting for the ACK, and those bytes must reach rustls, not be dropped.
pub(crate) struct Joined<R, W> {
    prefix: Vec<u8>,
    pos: usize,
    reader: R,
    writer: W,
}

impl<R, W> Joined<R, W> {
    pub(crate) fn new(prefix: Vec<u8>, reader: R, writer: W) -> Self {
        Joined { prefix, pos: 0, reader, writer }
    }
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for Joined<R, W> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.reader).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for Joined<R, W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.writer.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn joined_reads_the_prefix_first() {
        let (client, server) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(server);
        let mut j = Joined::new(b"hello ".to_vec(), r, w);
        let (cr, mut cw) = tokio::io::split(client);
        tokio::io::AsyncWriteExt::write_all(&mut cw, b"world").await.unwrap();
        drop((cr, cw));
        let mut small = [0u8; 4];
        j.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hell");
        let mut rest = Vec::new();
        j.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"o world");
    }
}
