//! The local admin socket: a Unix stream socket (mode 0600: root only by default) taking one
//! command per connection and answering with lines, the last of which starts with `ok` or
//! `error`. Long commands (`verify … wait`) stream progress lines before that.
//!
//! A command is one line: a JSON array of strings (`["cache","add","/dev/nvme1n1"]`, so paths
//! with spaces survive), or words separated by spaces for people typing at `socat`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the daemon exposes to the admin socket: runs `args`, sending reply lines to `out`; the
/// last line starts with `ok` or `error`.
pub trait AdminOps: Send + Sync + 'static {
    fn handle(self: Arc<Self>, args: Vec<String>, out: mpsc::UnboundedSender<String>) -> BoxFuture<()>;
}

const MAX_COMMAND_BYTES: u64 = 64 * 1024;

/// Binds the socket (replacing a stale one) with owner-only permissions. Must run inside the
/// runtime; done before READY=1 so a client that sees the daemon ready can reach it.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("admin socket {}: {e}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "admin socket ready");
    Ok(listener)
}

/// Admin connections being answered right now: a daemon that hands over waits for its `upgrade`
/// answer to be written before it exits.
static OPEN_CONNECTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn open_connections() -> usize {
    OPEN_CONNECTIONS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Serves admin commands until `shutdown`; then removes the socket's path unless `handover` says
/// the next process keeps serving it.
pub async fn serve_admin<A: AdminOps>(
    listener: UnixListener,
    path: PathBuf,
    ops: Arc<A>,
    mut shutdown: watch::Receiver<bool>,
    handover: Arc<crate::server::handover::Handover>,
) -> io::Result<()> {
    loop {
        let stream = tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let ops = ops.clone();
        OPEN_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            if let Err(e) = handle(stream, ops).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
            OPEN_CONNECTIONS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    if !handover.requested() {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

/// Splits a command line: a JSON array of strings, or whitespace-separated words.
pub fn parse_command(line: &str) -> Result<Vec<String>, String> {
    let t = line.trim();
    if t.starts_with('[') {
        serde_json::from_str::<Vec<String>>(t).map_err(|e| format!("bad command {t:?}: {e}"))
    } else {
        Ok(t.split_whitespace().map(str::to_owned).collect())
    }
}

async fn handle<A: AdminOps>(stream: UnixStream, ops: Arc<A>) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    // A bounded read: the socket is root-only, but a stuck or hostile client must not grow memory.
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        BufReader::new(r.take(MAX_COMMAND_BYTES)).read_line(&mut line),
    )
    .await;
    if !matches!(read, Ok(Ok(_))) {
        return w.write_all(b"error no command received\n").await;
    }
    let args = match parse_command(&line) {
        Ok(a) => a,
        Err(e) => return w.write_all(format!("error {e}\n").as_bytes()).await,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(ops.handle(args, tx));
    while let Some(l) = rx.recv().await {
        w.write_all(l.as_bytes()).await?;
        w.write_all(b"\n").await?;
    }
    w.shutdown().await
}

/// Client side: sends `args`, calls `on_line` for each reply line as it arrives, and returns the
/// last one (which starts with `ok` or `error`).
pub async fn request(path: &Path, args: &[String], mut on_line: impl FnMut(&str)) -> io::Result<String> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        io::Error::new(e.kind(), format!("cannot reach the daemon's admin socket {}: {e}", path.display()))
    })?;
    let (r, mut w) = stream.into_split();
    let mut cmd = serde_json::to_string(args).map_err(io::Error::other)?;
    cmd.push('\n');
    w.write_all(cmd.as_bytes()).await?;
    let mut last = String::new();
    let mut reader = BufReader::new(r).lines();
    while let Some(l) = reader.next_line().await? {
        on_line(&l);
        last = l;
    }
    if !(last.starts_with("ok") || last.starts_with("error")) {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the daemon closed the admin connection mid-reply"));
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::parse_command;

    #[test]
    fn commands_parse_as_json_or_words() {
        assert_eq!(parse_command("status\n").unwrap(), vec!["status"]);
        assert_eq!(parse_command(" rebuild  rate 10M ").unwrap(), vec!["rebuild", "rate", "10M"]);
        assert_eq!(parse_command(r#"["cache","add","/tmp/a b"]"#).unwrap(), vec!["cache", "add", "/tmp/a b"]);
        assert!(parse_command(r#"["cache", 1]"#).is_err());
    }
}
