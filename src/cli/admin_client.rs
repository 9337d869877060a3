//! The client side of the admin socket: `superdisk status | rebuild | cache | verify --socket`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use superdisk::daemon::status::{render, Status};
use superdisk::daemon::AnyError;

/// Where systemd's `RuntimeDirectory=superdisk/%i` puts each instance's admin socket.
pub const RUN_DIR: &str = "/run/superdisk";

#[derive(clap::Args, Clone, Debug, Default)]
pub struct Target {
    /// The daemon's admin socket (its `admin_socket` setting).
    #[arg(long, global = true, env = "SUPERDISK_SOCKET", conflicts_with = "instance")]
    pub socket: Option<PathBuf>,
    /// The systemd instance NAME (superdisk@NAME): its socket is /run/superdisk/NAME/admin.sock.
    #[arg(long, short = 'i', global = true)]
    pub instance: Option<String>,
}

impl Target {
    /// The socket to talk to: the one named, or the only instance running.
    pub fn socket(&self) -> Result<PathBuf, AnyError> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(i) = &self.instance {
            return Ok(Path::new(RUN_DIR).join(i).join("admin.sock"));
        }
        let found: Vec<PathBuf> = std::fs::read_dir(RUN_DIR)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("admin.sock")).filter(|p| p.exists()).collect())
            .unwrap_or_default();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(format!(
                "no running superdisk found under {RUN_DIR}: give --socket PATH (the daemon's admin_socket) \
                 or --instance NAME"
            )
            .into()),
            many => Err(format!(
                "several superdisk instances are running ({}): pick one with --instance NAME",
                many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
            .into()),
        }
    }
}

/// Sends a command and returns the text after `ok`; `error …` becomes Err.
async fn call(target: &Target, args: &[&str], on_line: impl FnMut(&str)) -> Result<String, AnyError> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let last = superdisk::daemon::admin::request(&target.socket()?, &args, on_line).await?;
    match last.strip_prefix("error ") {
        Some(e) => Err(format!("daemon: {e}").into()),
        None => Ok(last.trim_start_matches("ok").trim().to_string()),
    }
}

pub async fn status(target: &Target, json: bool) -> Result<(), AnyError> {
    let mut body = None;
    call(target, &["status"], |l| {
        if l.starts_with('{') {
            body = Some(l.to_string());
        }
    })
    .await?;
    let body = body.ok_or("the daemon sent no status")?;
    if json {
        println!("{body}");
    } else {
        let s: Status = serde_json::from_str(&body)?;
        print!("{}", render(&s));
    }
    Ok(())
}

/// `superdisk upgrade`: the daemon answers once the new binary serves (or with why not). If the
/// answer is lost because the old process exited first, the new one is asked who it is.
pub async fn upgrade(target: &Target, binary: Option<&Path>) -> Result<(), AnyError> {
    let binary = match binary {
        Some(b) => std::path::absolute(b)?,
        None => std::env::current_exe()?,
    };
    let before = status_of(target).await.ok();
    match call(target, &["upgrade", &binary.display().to_string()], |_| {}).await {
        Ok(msg) => {
            println!("{msg}");
            Ok(())
        }
        Err(e) if e.to_string().contains("mid-reply") => {
            let now = status_of(target).await?;
            match before {
                Some(b) if b.pid == now.pid => {
                    Err("the daemon closed the connection without an answer; it still runs the old binary".into())
                }
                _ => {
                    println!("upgraded: superdisk {} (build {}) serves, pid {}", now.version, now.build, now.pid);
                    Ok(())
                }
            }
        }
        Err(e) => Err(e),
    }
}

async fn status_of(target: &Target) -> Result<Status, AnyError> {
    let mut body = None;
    call(target, &["status"], |l| {
        if l.starts_with('{') {
            body = Some(l.to_string());
        }
    })
    .await?;
    Ok(serde_json::from_str(&body.ok_or("the daemon sent no status")?)?)
}

/// Runs a command that answers with one line and prints it.
pub async fn simple(target: &Target, args: &[&str]) -> Result<(), AnyError> {
    println!("{}", call(target, args, |_| {}).await?);
    Ok(())
}

pub async fn verify(target: &Target, repair: bool, wait: bool) -> Result<(), AnyError> {
    let mut args = vec!["verify"];
    if repair {
        args.push("repair");
    }
    if wait {
        args.push("wait");
    }
    let tty = std::io::stderr().is_terminal();
    let mut mismatches = 0u64;
    let mut last_pct: Option<u64> = None;
    let result = call(target, &args, |l| {
        if let Some(rest) = l.strip_prefix("progress ") {
            let mut it = rest.split_whitespace().filter_map(|n| n.parse::<u64>().ok());
            let (done, total) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
            if total == 0 {
                return; // not started yet
            }
            let pct = done * 100 / total;
            if tty {
                let filled = (pct / 4) as usize;
                eprint!(
                    "\rverify [{}{}] {pct:>3}% {done}/{total} regions",
                    "#".repeat(filled),
                    "-".repeat(25 - filled)
                );
                let _ = std::io::stderr().flush();
            } else if last_pct != Some(pct) {
                // Plain lines for logs and pipes: one per percent, not a line every half second.
                eprintln!("verify: {done}/{total} regions ({pct}%)");
            }
            last_pct = Some(pct);
        } else if l.starts_with("mismatch") {
            mismatches += 1;
            if tty && last_pct.is_some() {
                eprintln!();
                last_pct = None;
            }
            println!("{l}");
        }
    })
    .await;
    if tty && last_pct.is_some() {
        eprintln!();
    }
    let msg = result?;
    if !wait {
        println!("{msg}");
        return Ok(());
    }
    println!("verify: {mismatches} mismatches (checked by the running daemon)");
    if mismatches > 0 && !repair {
        return Err(format!("{mismatches} mismatching ranges between cache and backing (rerun with --repair)").into());
    }
    Ok(())
}
