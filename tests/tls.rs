//! TLS (NBD_OPT_STARTTLS) against clients that bring their own TLS stack: libnbd's GnuTLS
//! (nbdinfo, python3-libnbd, fio's nbd engine) and qemu's (qemu-io), plus a rustls client and a raw
//! socket for what no real client does on purpose (a ClientHello sent before the ACK, garbage
//! instead of a ClientHello, options before the upgrade).
//!
//! Certificates are made per test with `openssl` in the layout libnbd and qemu read from a
//! directory: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem.

mod common;
mod raw_client;

use common::*;
use raw_client::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use superdisk::nbd::consts::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const TOOL_LIMIT: Duration = Duration::from_secs(120);

/// The certificate directories of one test.
struct Pki {
    /// ca-cert.pem, server-*.pem, client-*.pem, all from one CA: what a legitimate client has.
    good: PathBuf,
    /// Only ca-cert.pem: a client that can check the server but has no certificate of its own.
    nocert: PathBuf,
    /// The right ca-cert.pem, but client-*.pem issued by another CA.
    rogue: PathBuf,
}

fn openssl(args: &[&str], cwd: &Path) {
    require_tool("openssl");
    run_ok(Command::new("openssl").args(args).current_dir(cwd));
}

/// An EC P-256 key and a certificate for `cn` signed by the CA in `ca_dir`, with `ext` (an
/// openssl extension section body) as its X.509v3 extensions.
fn issue(dir: &Path, ca_dir: &Path, name: &str, cn: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    let key = format!("{name}-key.pem");
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &key], dir);
    openssl(&["req", "-new", "-key", &key, "-subj", &format!("/CN={cn}"), "-out", &format!("{name}.csr")], dir);
    let ca_cert = ca_dir.join("ca-cert.pem");
    let ca_key = ca_dir.join("ca-key.pem");
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            ca_cert.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-set_serial",
            &format!("{}", std::process::id() as u64 * 1000 + name.len() as u64),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}-cert.pem"),
        ],
        dir,
    );
}

fn make_ca(dir: &Path, cn: &str) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca-key.pem"], dir);
    openssl(
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca-key.pem",
            "-subj",
            &format!("/CN={cn}"),
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca-cert.pem",
        ],
        dir,
    );
}

const SERVER_EXT: &str = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                          extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n";
const CLIENT_EXT: &str = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                          extendedKeyUsage=clientAuth\n";

fn make_pki(root: &Path) -> Pki {
    let good = root.join("pki");
    make_ca(&good, "superdisk test CA");
    issue(&good, &good, "server", "localhost", SERVER_EXT);
    issue(&good, &good, "client", "client", CLIENT_EXT);
    let nocert = root.join("pki-nocert");
    std::fs::create_dir_all(&nocert).unwrap();
    std::fs::copy(good.join("ca-cert.pem"), nocert.join("ca-cert.pem")).unwrap();
    let other_ca = root.join("pki-other-ca");
    make_ca(&other_ca, "some other CA");
    let rogue = root.join("pki-rogue");
    std::fs::create_dir_all(&rogue).unwrap();
    issue(&rogue, &other_ca, "client", "client", CLIENT_EXT);
    std::fs::copy(good.join("ca-cert.pem"), rogue.join("ca-cert.pem")).unwrap();
    Pki { good, nocert, rogue }
}

/// A daemon whose config file holds the TLS keys: the server certificate, plus `extra` lines.
fn tls_daemon(extra: &str, mtls: bool) -> (Daemon, Pki) {
    let mut d = Daemon::unstarted();
    d.create_with(SIZE, &[]);
    let pki = make_pki(d.dir.path());
    let mut toml = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n{extra}\n",
        pki.good.join("server-cert.pem").display(),
        pki.good.join("server-key.pem").display()
    );
    if mtls {
        toml.push_str(&format!("tls_ca = \"{}\"\n", pki.good.join("ca-cert.pem").display()));
    }
    let conf = d.path("superdisk.toml");
    std::fs::write(&conf, toml).unwrap();
    d.extra_args = vec!["--config".into(), conf.display().to_string()];
    d.spawn();
    (d, pki)
}

fn nbds_uri(d: &Daemon, certs: &Path) -> String {
    format!("nbds://127.0.0.1:{}/?tls-certificates={}", d.port, certs.display())
}

fn nbds_unix_uri(d: &Daemon, certs: &Path) -> String {
    format!("nbds+unix:///?socket={}&tls-certificates={}", d.unix.display(), certs.display())
}

/// nbdinfo's output; `ok` says whether it must succeed or fail. Returns stdout + stderr.
fn nbdinfo(args: &[&str], ok: bool) -> String {
    require_tool("nbdinfo");
    let out = output_within(Command::new("nbdinfo").args(args), TOOL_LIMIT);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.success(), ok, "nbdinfo {args:?} exited with {}:\n{text}", out.status);
    text
}

/// tests/py/tls_client.py against the daemon's TCP port or Unix socket with `args`; must succeed
/// (its own checks decide).
fn tls_client(d: &mut Daemon, unix: bool, args: &[&str]) -> String {
    let mut cmd = py_command("tls_client.py");
    if unix {
        cmd.arg("--unix").arg(&d.unix);
    } else {
        cmd.arg("--tcp").arg(format!("127.0.0.1:{}", d.port));
    }
    let out = output_within(cmd.args(args), TOOL_LIMIT);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "tls_client.py {args:?} failed:\n{text}\ndaemon log:\n{}", d.log());
    d.assert_alive();
    text
}

/// qemu-io with x509 credentials from `certs`, over TCP or the Unix socket; returns (success, output).
fn qemu_io(d: &Daemon, certs: &Path, unix: bool, commands: &[&str]) -> (bool, String) {
    require_tool("qemu-io");
    let target = if unix {
        // A Unix socket has no host name: tell qemu which name the server certificate must carry.
        format!("path={},tls-hostname=localhost", d.unix.display())
    } else {
        format!("host=127.0.0.1,port={}", d.port)
    };
    let mut cmd = Command::new("qemu-io");
    cmd.arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", certs.display()))
        .arg("--image-opts")
        .arg(format!("driver=nbd,{target},export=superdisk,tls-creds=tls0"));
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = output_within(&mut cmd, TOOL_LIMIT);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // qemu-io exits 0 even when a -c command fails; a failed command prints "failed".
    (out.status.success() && !text.contains("failed") && !text.contains("can't open"), text)
}

// ------------------------------------------------------------------------------------------------

#[test]
fn require_refuses_plain_clients_and_serves_tls_ones() {
    let (mut d, pki) = tls_daemon("tls = \"require\"", false);
    // libnbd's plain clients are refused with the reason.
    let out = nbdinfo(&["--size", &d.uri()], false);
    assert!(out.contains("requires TLS"), "nbdinfo on nbd:// should say TLS is required:\n{out}");
    let text = tls_client(&mut d, false, &["--tls", "disable", "--expect-fail", "requires TLS"]);
    assert!(text.contains("refused as expected"), "{text}");
    // The same daemon serves nbds:// over TCP and the Unix socket.
    let out = nbdinfo(&[&nbds_uri(&d, &pki.good)], true);
    assert!(out.contains("with TLS") && out.contains(&SIZE.to_string()), "{out}");
    let out = nbdinfo(&["--size", &nbds_unix_uri(&d, &pki.good)], true);
    assert_eq!(out.trim(), SIZE.to_string());

    // On the wire: every option before STARTTLS but ABORT gets TLS_REQD, and the session goes on.
    let mut s = connect(d.port);
    greet(&mut s);
    for (option, data) in [
        (OPT_LIST, vec![]),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_INFO, go_data("")),
        (OPT_GO, go_data("")),
        (0x4242, vec![1, 2, 3]),
    ] {
        send_option(&mut s, option, &data);
        let (kind, msg) = option_reply(&mut s, option);
        assert_eq!(kind, REP_ERR_TLS_REQD, "option {option:#x} before STARTTLS: {}", String::from_utf8_lossy(&msg));
    }
    // EXPORT_NAME cannot carry an error: the session ends without a byte.
    send_option(&mut s, OPT_EXPORT_NAME, b"");
    let rest = expect_closed(&mut s, Duration::from_secs(10), "EXPORT_NAME before STARTTLS");
    assert!(rest.is_empty(), "{} bytes answered EXPORT_NAME before STARTTLS", rest.len());
    // ABORT is still honoured.
    let mut s = connect(d.port);
    greet(&mut s);
    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(option_reply(&mut s, OPT_ABORT).0, REP_ACK);
    d.assert_alive();
    d.wait_log(0, "tls=true", Duration::from_secs(10));
}

#[test]
fn optional_tls_serves_plain_and_tls_clients() {
    let (mut d, pki) = tls_daemon("tls = \"on\"", false);
    let out = nbdinfo(&[&d.uri()], true);
    assert!(out.contains("without TLS"), "{out}");
    let out = nbdinfo(&[&nbds_uri(&d, &pki.good)], true);
    assert!(out.contains("with TLS"), "{out}");
    let out = nbdinfo(&[&d.unix_uri()], true);
    assert!(out.contains("without TLS"), "{out}");
    tls_client(&mut d, false, &["--tls", "disable", "--seed", "3"]);
    tls_client(&mut d, true, &["--certs", pki.good.to_str().unwrap(), "--seed", "4"]);
    let log = d.log();
    assert!(log.contains("tls=false") && log.contains("tls=true"), "{log}");
}

#[test]
fn mutual_tls_refuses_clients_without_a_trusted_certificate() {
    let (mut d, pki) = tls_daemon("tls = \"require\"", true);
    // The legitimate client, with each TLS stack.
    nbdinfo(&["--size", &nbds_uri(&d, &pki.good)], true);
    let (ok, out) = qemu_io(&d, &pki.good, false, &["read 0 64k"]);
    assert!(ok, "qemu-io with a client certificate:\n{out}");
    let mut tls = rustls_starttls(&d, &pki, TlsVersions::Default, Some(&pki.good)).expect("rustls with a client cert");
    assert_eq!(go(&mut tls), Ok(SIZE));
    Session::in_transmission(tls, SIZE).round_trip(MIB, 3);

    // No client certificate.
    let out = nbdinfo(&["--size", &nbds_uri(&d, &pki.nocert)], false);
    assert!(out.contains("gnutls"), "{out}");
    let (ok, out) = qemu_io(&d, &pki.nocert, false, &["read 0 64k"]);
    assert!(!ok, "qemu-io without a client certificate was served:\n{out}");
    tls_client(&mut d, false, &["--certs", pki.nocert.to_str().unwrap(), "--expect-fail", "gnutls"]);
    assert!(rustls_starttls(&d, &pki, TlsVersions::Default, None).and_then(|mut t| go_io(&mut t)).is_err());
    // The client sees the refusal before the server has logged it: wait for the line.
    d.wait_log(0, "peer sent no certificates", Duration::from_secs(10));

    // A certificate from another CA. GnuTLS clients (libnbd, qemu) do not even offer it, since it
    // does not chain to a CA the server names in its certificate request; they are refused as
    // certificate-less. The rustls client sends it anyway, so the server's own chain check is
    // what refuses it.
    nbdinfo(&["--size", &nbds_uri(&d, &pki.rogue)], false);
    nbdinfo(&["--size", &nbds_unix_uri(&d, &pki.rogue)], false);
    let (ok, out) = qemu_io(&d, &pki.rogue, true, &["read 0 64k"]);
    assert!(!ok, "qemu-io with a certificate from another CA was served:\n{out}");
    tls_client(&mut d, true, &["--certs", pki.rogue.to_str().unwrap(), "--expect-fail", "gnutls"]);
    let rogue = rustls_starttls(&d, &pki, TlsVersions::Default, Some(&pki.rogue));
    assert!(rogue.and_then(|mut t| go_io(&mut t)).is_err(), "a certificate from another CA was accepted");
    d.wait_log(0, "UnknownIssuer", Duration::from_secs(10));

    let log = d.log();
    assert!(!log.contains("tls=false"), "a plain session on a TLS-only server:\n{log}");
    // And the legitimate client is still served.
    let (ok, out) = qemu_io(&d, &pki.good, true, &["read 0 64k"]);
    assert!(ok, "{out}");
    d.assert_alive();
}

#[test]
fn data_round_trips_over_tls_with_every_client() {
    let (mut d, pki) = tls_daemon("tls = \"require\"", true);
    let good = pki.good.to_str().unwrap();
    // First, while the export is still all zeroes (its model assumes so): the seeded random
    // operation mix of the plain-text client tests (writes, FUA, zeroes, trims, block status,
    // cache, flush) over TLS.
    let out = output_within(
        py_command("with_local_files.py")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/roundtrip.py"))
            .args([&nbds_uri(&d, &pki.good), &SIZE.to_string(), "--seed", "5", "--ops", "600"]),
        TOOL_LIMIT,
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "roundtrip.py over TLS:\n{}{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    // qemu-io: patterns written, verified on read (-P), flushed, verified from a new connection.
    let (ok, out) = qemu_io(
        &d,
        &pki.good,
        false,
        &["write -P 0x5a 1M 3M", "write -P 0xa5 5000 7000", "flush", "read -P 0x5a 1M 3M", "read -P 0xa5 5000 7000"],
    );
    assert!(ok, "qemu-io over TCP+TLS:\n{out}");
    let (ok, out) = qemu_io(&d, &pki.good, true, &["read -P 0x5a 1M 3M", "read -P 0xa5 5000 7000"]);
    assert!(ok, "qemu-io over Unix+TLS:\n{out}");
    // python3-libnbd with set_tls(TLS_REQUIRE) + set_tls_certificates: 64 requests in flight,
    // 32 MiB requests, a second connection reading back; TCP and Unix.
    tls_client(&mut d, false, &["--certs", good, "--seed", "11"]);
    tls_client(&mut d, true, &["--certs", good, "--seed", "12"]);
    // fio's nbd engine with its crc32c verification. Its URI cannot name a certificate directory,
    // and libnbd run by root reads only /etc/pki/libnbd, so fio runs as `nobody`, whose libnbd
    // reads $HOME/.pki/libnbd.
    require_tool("fio");
    require_tool("setpriv");
    let home = d.path("fio-home");
    let certs = home.join(".pki/libnbd");
    std::fs::create_dir_all(&certs).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(pki.good.join(f), certs.join(f)).unwrap();
    }
    run_ok(Command::new("chown").args(["-R", "65534:65534"]).arg(&home));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = output_within(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "fio"])
            .env("HOME", &home)
            .current_dir(&home)
            .args(["--name=tls", "--ioengine=nbd", &format!("--uri=nbds://127.0.0.1:{}/", d.port)])
            .args(["--rw=randwrite", "--bs=4k,64k", "--iodepth=16", "--size=32M", "--verify=crc32c"])
            .args(["--verify_fatal=1", "--offset=16M"]),
        TOOL_LIMIT,
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("err= 0"), "fio over nbds://:\n{text}");
    d.assert_alive();
    assert!(!d.log().contains("tls=false"), "a plain session on a TLS-only server:\n{}", d.log());
}

#[test]
fn starttls_then_garbage_or_silence_is_cut_off_and_serving_continues() {
    let (mut d, pki) = tls_daemon("tls = \"on\"\nhandshake_timeout_secs = 3", false);
    // STARTTLS with data is invalid, and the (plain) session goes on.
    let mut s = connect(d.port);
    greet(&mut s);
    send_option(&mut s, OPT_STARTTLS, b"junk");
    assert_eq!(option_reply(&mut s, OPT_STARTTLS).0, REP_ERR_INVALID);
    let size = go(&mut s).expect("GO after a refused STARTTLS");
    let mut plain = Session::in_transmission(s, size);
    plain.round_trip(MIB, 1);

    // Garbage where the ClientHello belongs.
    let mut s = connect(d.port);
    greet(&mut s);
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(option_reply(&mut s, OPT_STARTTLS).0, REP_ACK);
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let _ = s.write_all(&garbage);
    expect_closed(&mut s, Duration::from_secs(20), "garbage instead of a ClientHello");
    // The socket closes as the failed handshake is dropped, a moment before the line is logged.
    d.wait_log(0, "TLS handshake failed", Duration::from_secs(10));

    // A ClientHello cut short, then nothing: the handshake deadline still applies inside TLS.
    let mut s = connect(d.port);
    greet(&mut s);
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(option_reply(&mut s, OPT_STARTTLS).0, REP_ACK);
    let mut conn = rustls_client(&pki, TlsVersions::Default);
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    s.write_all(&hello[..hello.len() / 2]).unwrap();
    expect_closed(&mut s, Duration::from_secs(30), "half a ClientHello");
    d.wait_log(0, "handshake timed out", Duration::from_secs(10));

    // The daemon serves both kinds of client after all that, and the first session still works.
    nbdinfo(&["--size", &nbds_uri(&d, &pki.good)], true);
    nbdinfo(&["--size", &d.uri()], true);
    plain.round_trip(2 * MIB, 2);
    plain.disconnect();
    d.assert_alive();
}

#[derive(Clone, Copy, PartialEq)]
enum TlsVersions {
    Default,
    Only12,
}

/// A rustls client trusting the test CA, presenting the client certificate in `client_dir` if given.
fn rustls_client_auth(pki: &Pki, versions: TlsVersions, client_dir: Option<&Path>) -> rustls::ClientConnection {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.good.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = match versions {
        TlsVersions::Default => builder.with_safe_default_protocol_versions(),
        TlsVersions::Only12 => builder.with_protocol_versions(&[&rustls::version::TLS12]),
    };
    let builder = builder.unwrap().with_root_certificates(roots);
    let cfg = match client_dir {
        None => builder.with_no_client_auth(),
        Some(dir) => {
            let chain =
                CertificateDer::pem_file_iter(dir.join("client-cert.pem")).unwrap().map(|c| c.unwrap()).collect();
            let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    rustls::ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap()
}

fn rustls_client(pki: &Pki, versions: TlsVersions) -> rustls::ClientConnection {
    rustls_client_auth(pki, versions, None)
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// Connects, sends STARTTLS and runs the handshake with a rustls client.
fn rustls_starttls(
    d: &Daemon,
    pki: &Pki,
    versions: TlsVersions,
    client_dir: Option<&Path>,
) -> std::io::Result<TlsStream> {
    let mut s = connect(d.port);
    greet(&mut s);
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(option_reply(&mut s, OPT_STARTTLS).0, REP_ACK);
    finish_tls(rustls_client_auth(pki, versions, client_dir), s)
}

/// GO over a stream that may fail at the I/O level (a TLS 1.3 server refuses a client
/// certificate after the client's side of the handshake is done, so the refusal shows here).
fn go_io(s: &mut TlsStream) -> std::io::Result<u64> {
    s.write_all(&option_bytes(OPT_GO, &go_data("")))?;
    s.flush()?;
    let mut h = [0u8; 20];
    std::io::Read::read_exact(s, &mut h)?;
    Ok(be_u64(&h))
}

/// Runs the TLS handshake over `s` (whose STARTTLS was acknowledged) and returns the stream.
fn finish_tls(conn: rustls::ClientConnection, s: std::net::TcpStream) -> std::io::Result<TlsStream> {
    let mut tls = rustls::StreamOwned::new(conn, s);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

#[test]
fn client_hello_before_the_ack_and_negotiation_reset_and_versions() {
    let (mut d, pki) = tls_daemon("tls = \"on\"", false);
    let mut s = connect(d.port);
    greet(&mut s);
    // Structured replies negotiated in plain text must not survive the upgrade.
    send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(option_reply(&mut s, OPT_STRUCTURED_REPLY).0, REP_ACK);
    // STARTTLS and the ClientHello in one write, before the ACK is read: the server must hand the
    // bytes it already buffered to TLS rather than lose them.
    let mut conn = rustls_client(&pki, TlsVersions::Default);
    let mut bytes = option_bytes(OPT_STARTTLS, &[]);
    conn.write_tls(&mut bytes).unwrap();
    s.write_all(&bytes).unwrap();
    assert_eq!(option_reply(&mut s, OPT_STARTTLS).0, REP_ACK);
    let mut tls = finish_tls(conn, s).expect("TLS handshake after a pipelined ClientHello");
    assert_eq!(tls.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    // Inside TLS: a second STARTTLS is invalid; options are no longer TLS_REQD-gated.
    send_option(&mut tls, OPT_STARTTLS, &[]);
    assert_eq!(option_reply(&mut tls, OPT_STARTTLS).0, REP_ERR_INVALID);
    let size = go(&mut tls).expect("GO inside TLS");
    assert_eq!(size, SIZE);
    let mut sess = Session::in_transmission(tls, size);
    // A simple reply (checked by `read`): the plain-text STRUCTURED_REPLY was forgotten.
    sess.round_trip(3 * MIB, 7);
    let big: Vec<u8> = (0..(32 << 20) as u32).map(|i| (i >> 12) as u8 ^ i as u8).collect();
    assert_eq!(sess.write(0, &big), 0);
    assert_eq!(sess.read(0, big.len() as u32), big, "32 MiB through TLS");
    sess.disconnect();

    // TLS 1.2 is accepted by default (the spec's MUST)...
    let mut tls = rustls_starttls(&d, &pki, TlsVersions::Only12, None).expect("TLS 1.2 handshake");
    assert_eq!(tls.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(go(&mut tls), Ok(SIZE));
    Session::in_transmission(tls, SIZE).round_trip(4 * MIB, 8);
    d.assert_alive();
    drop(d);

    // ...and refused with tls_min_version = "1.3", while GnuTLS clients still connect.
    let (mut d, pki) = tls_daemon("tls = \"require\"\ntls_min_version = \"1.3\"", false);
    assert!(rustls_starttls(&d, &pki, TlsVersions::Only12, None).is_err(), "TLS 1.2 accepted with min 1.3");
    nbdinfo(&["--size", &nbds_uri(&d, &pki.good)], true);
    d.assert_alive();
}

#[test]
fn bad_tls_settings_stop_the_daemon_naming_the_key() {
    let mut d = Daemon::unstarted();
    d.create_with(SIZE, &[]);
    let pki = make_pki(d.dir.path());
    let p = |name: &str| pki.good.join(name).display().to_string();
    let not_pem = d.path("not.pem");
    std::fs::write(&not_pem, "this is not PEM\n").unwrap();
    let cases: Vec<(String, &str)> = vec![
        (format!("tls = \"on\"\ntls_key = \"{}\"", p("server-key.pem")), "`tls_cert`"),
        (format!("tls = \"on\"\ntls_cert = \"{}\"", p("server-cert.pem")), "`tls_key`"),
        (
            format!(
                "tls = \"on\"\ntls_cert = \"{}/missing.pem\"\ntls_key = \"{}\"",
                pki.good.display(),
                p("server-key.pem")
            ),
            "`tls_cert`",
        ),
        (
            format!("tls = \"on\"\ntls_cert = \"{}\"\ntls_key = \"{}\"", not_pem.display(), p("server-key.pem")),
            "`tls_cert`",
        ),
        (
            format!("tls = \"on\"\ntls_cert = \"{}\"\ntls_key = \"{}\"", p("server-cert.pem"), not_pem.display()),
            "`tls_key`",
        ),
        // The client's key with the server's certificate.
        (
            format!("tls = \"on\"\ntls_cert = \"{}\"\ntls_key = \"{}\"", p("server-cert.pem"), p("client-key.pem")),
            "`tls_key`",
        ),
        (
            format!(
                "tls = \"require\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"",
                p("server-cert.pem"),
                p("server-key.pem"),
                not_pem.display()
            ),
            "`tls_ca`",
        ),
        (format!("tls_cert = \"{}\"", p("server-cert.pem")), "`tls_cert`"),
        ("tls = \"maybe\"".into(), "`tls`"),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let conf = d.path(&format!("bad{i}.toml"));
        std::fs::write(&conf, toml).unwrap();
        let out = output_within(
            Command::new(BIN)
                .args(["serve", "--backing"])
                .arg(&d.backing)
                .args(["--listen", &format!("127.0.0.1:{}", free_port()), "--config"])
                .arg(&conf),
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "serve started with:\n{toml}");
        assert!(err.contains(&format!("config key {key}")), "with\n{toml}\nthe error does not name {key}:\n{err}");
    }
    // Refused before the backing was opened: the next start finds a clean shutdown, not a crash.
    let conf = d.path("good.toml");
    std::fs::write(
        &conf,
        format!("tls = \"on\"\ntls_cert = \"{}\"\ntls_key = \"{}\"", p("server-cert.pem"), p("server-key.pem")),
    )
    .unwrap();
    d.extra_args = vec!["--config".into(), conf.display().to_string()];
    d.spawn();
    nbdinfo(&["--size", &nbds_uri(&d, &pki.good)], true);
    assert!(!d.log().contains("did not shut down cleanly"), "{}", d.log());
}

/// A TLS session's keys live in the daemon's rustls state: an upgrade while one is open is
/// refused, saying why, and the client keeps being served; once it is gone the upgrade goes ahead
/// (and plain clients are carried over).
#[test]
fn an_upgrade_is_refused_while_a_tls_client_is_connected() {
    let (mut d, pki) = tls_daemon("tls = \"on\"", false);
    d.stop();
    d.extra_args.extend(Daemon::admin_args(d.dir.path()));
    d.spawn();
    let stop = d.path("clients.stop");
    let mut cmd = py_command("upgrade_clients.py");
    cmd.arg(&stop).arg(SIZE.to_string()).arg(nbds_uri(&d, &pki.good)).args(["--depth", "8"]);
    let clients = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    d.wait_log(0, "tls=true", Duration::from_secs(10));
    let pid = d.pid();
    let (ok, text) = d.upgrade(Path::new(BIN));
    assert!(!ok, "an upgrade with a TLS client connected went ahead: {text}");
    assert!(text.contains("use TLS"), "{text}");
    assert_eq!(d.pid(), pid);
    std::fs::write(&stop, b"").unwrap();
    let out = clients.wait_with_output().unwrap();
    assert!(out.status.success(), "the TLS client was disturbed: {}", String::from_utf8_lossy(&out.stderr));
    let (ok, text) = d.upgrade(Path::new(BIN));
    assert!(ok, "{text}");
    assert!(d.stop().success());
}
