//! The local admin socket: a Unix stream socket (mode 0600: root only by default) speaking one
//! text command per connection, answered with text lines and closed. It is how `superdisk verify
//! --socket` runs the cache check inside a running daemon, and the place later control commands
//! (status, rebuild pause/resume, cache add/remove) attach to.
//!
//! Protocol: the client sends one line (`verify`, `verify repair`, `status`); the server answers
//! with lines, the last of which starts with `ok` or `error`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the daemon exposes to the admin socket.
pub trait AdminOps: Send + Sync + 'static {
    /// One line describing the daemon's state.
    fn status(&self) -> String;
    /// Compares cache and backing over every valid region; `Err` when there is no cache.
    fn verify(&self, repair: bool) -> BoxFuture<io::Result<Vec<(u64, u64)>>>;
}

const MAX_COMMAND_BYTES: u64 = 1024;

/// Binds the socket (replacing a stale one) with owner-only permissions. Must run inside the
/// runtime; done before READY=1 so a client that sees the daemon ready can reach it.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("admin socket {}: {e}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %path.display(), "admin socket ready");
    Ok(listener)
}

pub async fn serve_admin(
    listener: UnixListener,
    path: PathBuf,
    ops: Arc<dyn AdminOps>,
    mut shutdown: watch::Receiver<bool>,
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
        tokio::spawn(async move {
            if let Err(e) = handle(stream, ops).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(stream: UnixStream, ops: Arc<dyn AdminOps>) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    // A bounded read: the socket is root-only, but a stuck or hostile client must not grow memory.
    use tokio::io::AsyncReadExt;
    BufReader::new(r.take(MAX_COMMAND_BYTES)).read_line(&mut line).await?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let reply = match words.as_slice() {
        ["status"] => format!("{}\nok\n", ops.status()),
        ["verify"] | ["verify", "repair"] => {
            let repair = words.len() == 2;
            tracing::info!(repair, "verify requested on the admin socket");
            match ops.verify(repair).await {
                Ok(m) => {
                    let mut out = String::new();
                    for (offset, length) in &m {
                        out.push_str(&format!(
                            "mismatch offset={offset} length={length}{}\n",
                            if repair { " (repaired)" } else { "" }
                        ));
                    }
                    out.push_str(&format!("ok {} mismatches\n", m.len()));
                    out
                }
                Err(e) => format!("error {e}\n"),
            }
        }
        _ => format!("error unknown command {:?}: expected status, verify or verify repair\n", line.trim()),
    };
    w.write_all(reply.as_bytes()).await?;
    w.shutdown().await
}

/// Client side: sends `command`, returns the reply lines.
pub async fn request(path: &Path, command: &str) -> io::Result<Vec<String>> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        io::Error::new(e.kind(), format!("cannot reach the daemon's admin socket {}: {e}", path.display()))
    })?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{command}\n").as_bytes()).await?;
    w.shutdown().await?;
    let mut lines = Vec::new();
    let mut reader = BufReader::new(r).lines();
    while let Some(l) = reader.next_line().await? {
        lines.push(l);
    }
    Ok(lines)
}
