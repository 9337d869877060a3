//! The new binary's half of an in-place upgrade: say it is ready to take over, receive the
//! state, and say when it serves it.

use super::{wire, BuildInfo, Inherited};
use std::io::{self, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

/// The socket to the daemon this process takes over from (`serve --takeover-fd FD`).
pub struct Takeover {
    sock: UnixStream,
}

impl Takeover {
    /// Claims `fd`, which must be the socket the predecessor passed.
    pub fn from_fd(fd: RawFd) -> io::Result<Self> {
        // SAFETY: fstat into a zeroed stat buffer we own; any fd number is safe to ask about.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--takeover-fd {fd}: not a socket (this flag is for `superdisk upgrade` only)"),
            ));
        }
        // SAFETY: fd is an open socket passed to this process for this purpose and used nowhere
        // else; from here on the UnixStream owns it.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        // SAFETY: F_SETFD on the descriptor we now own: later children must not inherit it.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(Takeover { sock })
    }

    /// Configuration parsed and checked: ready for the state.
    pub fn standby(&mut self) -> io::Result<()> {
        let info = serde_json::to_string(&BuildInfo::this()).map_err(io::Error::other)?;
        writeln!(self.sock, "standby {info}")
    }

    pub fn receive(&mut self) -> io::Result<Inherited> {
        wire::receive(&mut self.sock)
    }

    /// Serving the inherited state: the predecessor may go.
    pub fn serving(mut self) {
        if let Err(e) = writeln!(self.sock, "serving {}", std::process::id()) {
            tracing::warn!(error = %e, "could not tell the previous daemon that this one serves");
        }
    }

    /// The state could not be taken over; the predecessor resumes.
    pub fn refuse(mut self, why: &str) {
        let _ = writeln!(self.sock, "error {}", why.replace('\n', " "));
    }
}
