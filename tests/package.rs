//! The Debian package (`scripts/package.sh`, docs/PACKAGING.md), built from the debug binary this
//! test run built (`--profile dev --no-build`: no release build in CI): lintian finds no error; it
//! holds the binary, the units (running /usr/bin/superdisk), the example configuration as
//! conffiles, man pages that give every `serve` flag's config key, completions and the docs; and in
//! a throwaway root (the host's own tree under a tmpfs overlay, booted by systemd-nspawn) it
//! installs without enabling or starting anything, its units pass `systemd-analyze verify`, it
//! serves (`superdisk demo`, and superdisk@ with the example config, read by nbdinfo), a package
//! upgrade leaves the running daemon alone until `superdisk upgrade` hands over to the new binary,
//! and it removes and purges cleanly. Also `scripts/gcp-setup.sh --deb`.
//!
//! Runs as root (CI does): dpkg and systemd-nspawn need it.

mod common;
use common::*;
use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn repo(rel: &str) -> PathBuf {
    Path::new(REPO).join(rel)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The package, built once per test process into target/tmp (not target/debian, where a release
/// package built by hand may lie).
struct Built {
    deb: PathBuf,
    /// The package unpacked (`dpkg-deb -x`) and its control files (`dpkg-deb -e`).
    root: PathBuf,
    control: PathBuf,
}

fn package() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "tests/package.rs runs as root (dpkg, systemd-nspawn)");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("package-test");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let started = Instant::now();
        let out = output_within(
            Command::new(repo("scripts/package.sh"))
                .args(["--profile", "dev", "--no-build", "--fast", "--out"])
                .arg(dir.join("out")),
            Duration::from_secs(300),
        );
        let log = text(&out);
        assert!(out.status.success(), "scripts/package.sh failed ({}):\n{log}", out.status);
        eprintln!("scripts/package.sh --profile dev --no-build: {:.1} s\n{log}", started.elapsed().as_secs_f64());
        // The binary packaged is the one these tests run.
        let bin = std::fs::canonicalize(BIN).unwrap();
        assert!(log.contains(&format!("packaging {}", bin.display())), "{log}");
        let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").trim());
        assert!(deb.is_file() && deb.starts_with(&dir), "no package at {deb:?}:\n{log}");
        let (root, control) = (dir.join("root"), dir.join("control"));
        run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        run_ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
        Built { deb, root, control }
    })
}

#[test]
fn lintian_finds_no_error() {
    require_tool("lintian");
    let built = package();
    let started = Instant::now();
    let out = Command::new("lintian").args(["--info", "--pedantic"]).arg(&built.deb).output().unwrap();
    let report = text(&out);
    eprintln!("lintian ({:.1} s):\n{report}", started.elapsed().as_secs_f64());
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E: ")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{report}");
    // Exit status 2 is lintian itself failing (not a finding); 0 or 1 (a finding) is a run.
    assert!(matches!(out.status.code(), Some(0 | 1)), "lintian did not run ({}):\n{report}", out.status);
}

/// The man pages that `generate-docs` writes: one per visible (sub)command.
fn generated_pages() -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    run_ok(Command::new(BIN).arg("generate-docs").arg("--out").arg(dir.path()));
    std::fs::read_dir(dir.path().join("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect()
}

#[test]
fn package_holds_every_file_in_its_place() {
    let built = package();
    let listing = run_ok(Command::new("dpkg-deb").arg("-c").arg(&built.deb));
    let files: BTreeSet<String> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    let mut want: Vec<String> = [
        "/usr/bin/superdisk",
        "/usr/lib/systemd/system/superdisk@.service",
        "/usr/lib/systemd/system/superdisk-nbd@.service",
        "/etc/superdisk/example.toml",
        "/etc/superdisk/example.nbd.env",
        "/usr/share/doc/superdisk/examples/var-lib-scylla.mount",
        "/usr/share/doc/superdisk/examples/superdisk@.service.d/ublk.conf",
        "/usr/share/doc/superdisk/examples/scylla-server.service.d/superdisk.conf",
        "/usr/share/doc/superdisk/README.md",
        "/usr/share/doc/superdisk/copyright",
        "/usr/share/doc/superdisk/changelog.Debian.gz",
        "/usr/share/bash-completion/completions/superdisk",
        "/usr/share/zsh/vendor-completions/_superdisk",
        "/usr/share/fish/vendor_completions.d/superdisk.fish",
        "/usr/share/lintian/overrides/superdisk",
    ]
    .map(String::from)
    .to_vec();
    for doc in std::fs::read_dir(repo("docs")).unwrap().map(|e| e.unwrap().path()) {
        if doc.extension().is_some_and(|e| e == "md") {
            want.push(format!("/usr/share/doc/superdisk/{}", doc.file_name().unwrap().to_string_lossy()));
        }
    }
    if let Ok(dir) = std::fs::read_dir(repo("docs/monitoring")) {
        for f in dir.map(|e| e.unwrap().file_name()) {
            want.push(format!("/usr/share/doc/superdisk/monitoring/{}", f.to_string_lossy()));
        }
    }
    for page in generated_pages() {
        want.push(format!("/usr/share/man/man1/{page}.gz"));
    }
    let missing: Vec<&String> = want.iter().filter(|w| !files.contains(*w)).collect();
    assert!(missing.is_empty(), "missing from the package: {missing:?}\nlisting:\n{listing}");
    assert!(
        files.iter().all(|f| !f.starts_with("/usr/local/")),
        "a package never installs into /usr/local:\n{listing}"
    );
    let binary_line = listing.lines().find(|l| l.ends_with(" ./usr/bin/superdisk")).unwrap();
    assert!(binary_line.starts_with("-rwxr-xr-x 0/0 "), "{binary_line}");

    // The example configuration and attach options are conffiles: an operator's edits survive upgrades.
    let conffiles = read(&built.control.join("conffiles"));
    assert_eq!(
        conffiles.lines().collect::<BTreeSet<_>>(),
        BTreeSet::from(["/etc/superdisk/example.toml", "/etc/superdisk/example.nbd.env"])
    );
    assert_eq!(read(&built.root.join("etc/superdisk/example.toml")), read(&repo("systemd/superdisk.example.toml")));

    // The units are the repository's, running the package's binary.
    for unit in ["superdisk@.service", "superdisk-nbd@.service"] {
        let packaged = read(&built.root.join("usr/lib/systemd/system").join(unit));
        let ours = read(&repo(&format!("systemd/{unit}")));
        assert_eq!(packaged, ours.replace("/usr/local/bin/superdisk", "/usr/bin/superdisk"), "{unit}");
        assert!(packaged.contains("ExecStart=/usr/bin/superdisk "), "{unit}:\n{packaged}");
    }

    // Installing, upgrading or removing never enables, starts, stops or restarts a unit: the
    // maintainer scripts only make systemd re-read its unit files.
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        let body = read(&built.control.join(script));
        for line in body.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            for word in ["deb-systemd-invoke", "deb-systemd-helper", "enable", "start", "restart", "stop"] {
                assert!(!line.contains(word), "{script} runs {word:?}: {line}\n{body}");
            }
        }
    }
    let control = read(&built.control.join("control"));
    assert!(control.contains("\nDepends: libc6"), "{control}");
    // And cargo-deb is told so, for any plain (non-template) unit added later.
    let manifest: toml::Value = toml::from_str(&read(&repo("Cargo.toml"))).unwrap();
    let units = &manifest["package"]["metadata"]["deb"]["systemd-units"];
    for key in ["enable", "start", "restart-after-upgrade", "stop-on-upgrade"] {
        assert_eq!(units.get(key).and_then(toml::Value::as_bool), Some(false), "systemd-units.{key}");
    }
}

/// `man superdisk-serve` (the packaged page, as man renders it) lists every flag of
/// `superdisk serve --help` with the config key it sets, and each key is one docs/CONFIG.md documents.
#[test]
fn serve_man_page_gives_every_flag_its_config_key() {
    require_tool("man");
    let built = package();
    let help = run_ok(Command::new(BIN).args(["serve", "--help"]));
    let flags: Vec<String> = help
        .lines()
        .filter_map(|l| l.trim_start().split([' ', ',']).find(|w| w.starts_with("--")))
        .filter(|f| *f != "--help")
        .map(str::to_string)
        .collect();
    assert!(flags.len() >= 20 && flags.contains(&"--cache-direct".to_string()), "{help}");
    let page = built.root.join("usr/share/man/man1/superdisk-serve.1.gz");
    let out = Command::new("man")
        .args(["--no-hyphenation", "--no-justification", "-l"])
        .arg(&page)
        .env("MANWIDTH", "1000")
        .output()
        .unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "man -l {}: {}", page.display(), text(&out));
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    // Option entries: a header line indented 7 spaces, its description below, indented more.
    let mut entries: HashMap<String, String> = HashMap::new();
    let mut current: Option<String> = None;
    for line in rendered.lines() {
        if let Some(header) = line.strip_prefix("       ").filter(|h| h.starts_with('-')) {
            current = header.split([' ', ',']).find(|w| w.starts_with("--")).map(str::to_string);
            // A flag shorter than the indent (`--ublk`) gets its description on the same line.
            if let Some(flag) = &current {
                entries.entry(flag.clone()).or_default().push_str(header);
            }
        } else if let Some(flag) = &current {
            let e = entries.entry(flag.clone()).or_default();
            e.push(' ');
            e.push_str(line.trim());
        }
        if !line.starts_with("       ") && !line.trim().is_empty() {
            current = None;
        }
    }
    let config_doc = read(&repo("docs/CONFIG.md"));
    for flag in &flags {
        let entry =
            entries.get(flag).unwrap_or_else(|| panic!("man superdisk-serve has no entry for {flag}:\n{rendered}"));
        if entry.contains("[command line only]") {
            continue;
        }
        let key: String = entry
            .split("[config: ")
            .nth(1)
            .or_else(|| entry.split("config key ").nth(1))
            .unwrap_or_else(|| panic!("man superdisk-serve: {flag} names no config key: {entry}"))
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(config_doc.contains(&format!("| `{key}` |")), "{flag}: config key {key} is not in docs/CONFIG.md");
    }
    assert!(rendered.contains("/usr/share/doc/superdisk/CONFIG.md"), "{rendered}");
}

/// The example configuration is one `superdisk serve --config` accepts as shipped, and every
/// optional key it shows commented out is a key, with a value of the right type.
#[test]
fn example_config_parses_and_its_commented_keys_are_real() {
    use superdisk::config::{FileConfig, ServeConfig};
    let path = repo("systemd/superdisk.example.toml");
    let parsed = FileConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let cfg = ServeConfig::from_file_config(parsed).unwrap_or_else(|e| panic!("systemd/superdisk.example.toml: {e}"));
    assert_eq!(cfg.export, "disk0", "systemd/superdisk-nbd.env.example (example.nbd.env) names export disk0");
    let example = read(&path);
    let mut uncommented = String::new();
    let mut optional = 0;
    for line in example.lines() {
        match line.strip_prefix("# ").filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))) {
            Some(setting) => {
                optional += 1;
                uncommented.push_str(setting);
            }
            None => uncommented.push_str(line),
        }
        uncommented.push('\n');
    }
    assert!(optional >= 10, "{optional} commented-out keys found:\n{uncommented}");
    let all: FileConfig = toml::from_str(&uncommented).unwrap_or_else(|e| panic!("with every key uncommented: {e}"));
    ServeConfig::from_file_config(all).unwrap_or_else(|e| panic!("with every key uncommented: {e}"));
}

/// What runs inside the container, as a oneshot service under its systemd: installs the package,
/// serves, upgrades the package under a running daemon, removes and purges. `key=value` lines go
/// to /out/result.txt.
const IN_CONTAINER: &str = r#"#!/bin/bash
exec >/out/result.txt 2>&1
trap 'echo done=yes; kill -s RTMIN+4 1' EXIT
I=pkgtest
U=superdisk@$I.service
URI="nbd+unix:///disk0?socket=/run/superdisk/$I/nbd.sock"
pid_of() { systemctl show -p MainPID --value "$U"; }
same_data() { cmp -s -n 8388608 /tmp/data <(nbdcopy "$URI" - 2>/dev/null) && echo yes || echo no; }
# The host's own hand-installed copy (tests/ops.rs puts one there) must not be what runs.
rm -f /usr/local/bin/superdisk
echo "before=$(dpkg-query -W -f='${Status}' superdisk 2>/dev/null || echo absent)"
dpkg -i /out/superdisk.deb; echo "install_rc=$?"
dpkg-query -L superdisk | sort >/tmp/files
echo "binary=$(command -v superdisk)"
echo "version=$(superdisk --version)"
echo "loaded_units=$(systemctl list-units --all --no-legend 'superdisk*' | wc -l)"
echo "unit_files=$(systemctl list-unit-files --no-legend 'superdisk*' | awk '{print $1 ":" $2}' | sort | tr '\n' ' ')"
echo "enabled_links=$(find /etc/systemd/system /var/lib/systemd/deb-systemd-helper-enabled -name '*superdisk*' 2>/dev/null | wc -l)"
echo "is_enabled=$(systemctl is-enabled "$U")"
echo "fragment=$(systemctl show -p FragmentPath --value "$U")"
systemd-analyze verify "superdisk@$I.service" "superdisk-nbd@$I.service" >/tmp/verify 2>&1; echo "verify_rc=$?"
sed 's/^/verify: /' /tmp/verify
echo "man=$(man -w superdisk-serve)"

# The demo, read by a real client (its own network namespace: port 10809 is the container's).
superdisk demo /tmp/demo --size 64M >/tmp/demo.log 2>&1 &
demo=$!
for _ in $(seq 300); do nbdinfo --size nbd://127.0.0.1:10809 >/tmp/demo.size 2>/dev/null && break; sleep 0.1; done
echo "demo_size=$(cat /tmp/demo.size)"
kill -INT $demo; wait $demo; echo "demo_exit=$?"

# superdisk@ with the example config, on image files where the unit may write them.
mkdir -p /var/lib/superdisk
truncate -s 64M /var/lib/superdisk/pd.img; truncate -s 80M /var/lib/superdisk/ssd.img
superdisk create --backing /var/lib/superdisk/pd.img --cache /var/lib/superdisk/ssd.img >/dev/null; echo "create_rc=$?"
sed -e 's|^backing = .*|backing = "/var/lib/superdisk/pd.img"|' -e 's|^cache = .*|cache = ["/var/lib/superdisk/ssd.img"]|' \
    /etc/superdisk/example.toml >/etc/superdisk/$I.toml
systemctl start "$U"; echo "start_rc=$?"
echo "size=$(nbdinfo --size "$URI")"
head -c 8M /dev/urandom >/tmp/data
nbdcopy /tmp/data "$URI"; echo "write_rc=$?"
echo "data_ok=$(same_data)"
old=$(pid_of)
since=$(systemctl show -p ActiveEnterTimestampMonotonic --value "$U")

# A new package under the running daemon: files replaced, daemon untouched.
dpkg -i /out/superdisk-next.deb; echo "next_install_rc=$?"
echo "next_version=$(dpkg-query -W -f='${Version}' superdisk)"
if [ "$(pid_of)" = "$old" ] && [ "$(systemctl show -p ActiveEnterTimestampMonotonic --value "$U")" = "$since" ]; then
    echo "daemon_untouched=yes"; else echo "daemon_untouched=no"; fi
echo "exe_after_package=$(readlink /proc/$old/exe)"
echo "data_after_package=$(same_data)"
# The operator's step: hand over to the new binary, no disconnect.
superdisk upgrade --instance $I; echo "upgrade_rc=$?"
sleep 1
new=$(pid_of)
if [ "$new" != "$old" ] && [ "$new" != 0 ]; then echo "mainpid_followed=yes"; else echo "mainpid_followed=no"; fi
echo "exe_after_upgrade=$(readlink /proc/$new/exe)"
echo "after_upgrade=$(systemctl is-active "$U") restarts=$(systemctl show -p NRestarts --value "$U")"
echo "data_after_upgrade=$(same_data)"
systemctl stop "$U"; echo "stop_rc=$?"

dpkg -r superdisk; echo "remove_rc=$?"
echo "after_remove=$(dpkg-query -W -f='${Status}' superdisk)"
echo "conffile_after_remove=$(test -e /etc/superdisk/example.toml && echo kept || echo gone)"
dpkg -P superdisk; echo "purge_rc=$?"
echo "after_purge=$(dpkg-query -W -f='${Status}' superdisk 2>/dev/null || echo absent)"
left=""
while read -r f; do [ -d "$f" ] || { [ -e "$f" ] && left="$left $f"; }; done </tmp/files
echo "left_after_purge=${left:-none}"
echo "operator_config_after_purge=$(test -e /etc/superdisk/$I.toml && echo kept || echo gone)"
journalctl -u "$U" --no-pager -o cat | sed 's/^/journal: /'
"#;

/// The host's own tree as a throwaway root: `/` (one filesystem here, so /usr, /etc and dpkg's
/// database) read-only under an overlay whose upper layer is a tmpfs of its own, so that nothing a
/// container writes (the package's files, dpkg's database) reaches the host, and it all vanishes
/// with the tmpfs. systemd-nspawn refuses --volatile=overlay on `/` itself, and --volatile=yes
/// would leave dpkg without its database.
struct ThrowawayRoot {
    tmpfs: PathBuf,
    root: PathBuf,
}

impl ThrowawayRoot {
    fn new(dir: &Path) -> ThrowawayRoot {
        let tmpfs = dir.join("overlay");
        std::fs::create_dir(&tmpfs).unwrap();
        run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", "size=4g,mode=0755", "throwaway"]).arg(&tmpfs));
        let this = ThrowawayRoot { root: tmpfs.join("root"), tmpfs };
        for d in ["upper", "work", "root"] {
            std::fs::create_dir(this.tmpfs.join(d)).unwrap();
        }
        let options = format!("lowerdir=/,upperdir={0}/upper,workdir={0}/work", this.tmpfs.display());
        run_ok(Command::new("mount").args(["-t", "overlay", "-o", &options, "throwaway"]).arg(&this.root));
        this
    }
}

impl Drop for ThrowawayRoot {
    fn drop(&mut self) {
        for m in [&self.root, &self.tmpfs] {
            if !Command::new("umount").arg(m).status().is_ok_and(|s| s.success()) {
                let _ = Command::new("umount").arg("--lazy").arg(m).status();
            }
        }
    }
}

/// A second version of the package (the same files, a higher version), as an upgrade would bring.
fn next_version(built: &Built, dir: &Path) -> PathBuf {
    let tree = dir.join("next");
    run_ok(Command::new("dpkg-deb").arg("-R").arg(&built.deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = read(&control);
    let version = text.lines().find_map(|l| l.strip_prefix("Version: ")).unwrap().to_string();
    std::fs::write(&control, text.replace(&format!("Version: {version}"), &format!("Version: {version}+next")))
        .unwrap();
    let deb = dir.join("superdisk-next.deb");
    run_ok(Command::new("dpkg-deb").args(["--root-owner-group", "-Zgzip", "-z1", "-b"]).arg(&tree).arg(&deb));
    deb
}

#[test]
fn package_installs_serves_upgrades_and_purges_in_a_container() {
    require_tool("systemd-nspawn");
    require_tool("dpkg-deb");
    require_tool("nbdinfo");
    require_tool("nbdcopy");
    if !read(Path::new("/proc/filesystems")).contains("\toverlay\n") {
        eprintln!("SKIPPED: this kernel has no overlayfs, which the throwaway root needs");
        return;
    }
    let built = package();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::copy(&built.deb, out_dir.join("superdisk.deb")).unwrap();
    std::fs::copy(next_version(built, dir.path()), out_dir.join("superdisk-next.deb")).unwrap();
    let script = out_dir.join("run.sh");
    std::fs::write(&script, IN_CONTAINER).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let runner = dir.path().join("pkgtest.service");
    std::fs::write(&runner, "[Unit]\nAfter=basic.target\n[Service]\nType=oneshot\nExecStart=/out/run.sh\n").unwrap();

    // Its own network namespace, and systemd as PID 1.
    let root = ThrowawayRoot::new(dir.path());
    let out = output_within(
        Command::new("systemd-nspawn")
            .args(["--quiet", "--keep-unit", "--register=no", "--private-network"])
            .arg(format!("--directory={}", root.root.display()))
            .arg(format!("--machine=pkgtest-{}", std::process::id()))
            .arg(format!("--bind={}:/out", out_dir.display()))
            .arg(format!("--bind-ro={}:/etc/systemd/system/pkgtest.service", runner.display()))
            .args(["--boot", "--", "systemd.firstboot=off", "systemd.unit=pkgtest.service"]),
        Duration::from_secs(240),
    );
    let result = read(&out_dir.join("result.txt"));
    let report: Vec<&str> = result.lines().filter(|l| !l.starts_with("journal: ")).collect();
    eprintln!("container run: {:.1} s\n{}", started.elapsed().as_secs_f64(), report.join("\n"));
    let context = format!("result.txt:\n{result}\nsystemd-nspawn ({}):\n{}", out.status, text(&out));
    let facts: HashMap<&str, &str> = result.lines().filter_map(|l| l.split_once('=')).collect();
    let fact = |k: &str| *facts.get(k).unwrap_or_else(|| panic!("no {k}= in the report; {context}"));
    assert_eq!(fact("done"), "yes", "{context}");
    assert_eq!(fact("before"), "absent", "the package was already installed on the host; {context}");
    assert_eq!(fact("install_rc"), "0", "{context}");
    assert_eq!(fact("binary"), "/usr/bin/superdisk", "{context}");
    assert!(fact("version").starts_with("superdisk "), "{context}");

    // Installed, nothing enabled, nothing started; the units are the package's.
    assert_eq!(fact("loaded_units"), "0", "{context}");
    assert_eq!(fact("unit_files").trim(), "superdisk-nbd@.service:disabled superdisk@.service:disabled", "{context}");
    assert_eq!(fact("enabled_links"), "0", "{context}");
    assert_eq!(fact("is_enabled"), "disabled", "{context}");
    assert!(fact("fragment").ends_with("/lib/systemd/system/superdisk@.service"), "{context}");
    let verify: Vec<&str> =
        result.lines().filter_map(|l| l.strip_prefix("verify: ")).filter(|l| l.contains("superdisk")).collect();
    assert!(fact("verify_rc") == "0" && verify.is_empty(), "systemd-analyze verify: {verify:?}; {context}");
    assert!(fact("man").ends_with("/usr/share/man/man1/superdisk-serve.1.gz"), "{context}");

    // It serves: the demo, and the unit with the example config.
    assert_eq!(fact("demo_size"), (64u64 << 20).to_string(), "{context}");
    assert_eq!(fact("demo_exit"), "0", "{context}");
    assert_eq!((fact("create_rc"), fact("start_rc")), ("0", "0"), "{context}");
    // The export is the backing image less superdisk's metadata at its tail.
    let size: u64 = fact("size").parse().unwrap_or_else(|_| panic!("size; {context}"));
    assert!(size > 32 << 20 && size < 64 << 20, "{context}");
    assert_eq!((fact("write_rc"), fact("data_ok")), ("0", "yes"), "{context}");

    // A package upgrade replaces the files and leaves the daemon running the old binary, serving.
    assert_eq!(fact("next_install_rc"), "0", "{context}");
    assert!(fact("next_version").ends_with("+next"), "{context}");
    assert_eq!(fact("daemon_untouched"), "yes", "{context}");
    assert_eq!(fact("exe_after_package"), "/usr/bin/superdisk (deleted)", "{context}");
    assert_eq!(fact("data_after_package"), "yes", "{context}");
    // superdisk upgrade: the new binary takes over; systemd follows it; the data is there.
    assert_eq!(fact("upgrade_rc"), "0", "{context}");
    assert_eq!(fact("mainpid_followed"), "yes", "{context}");
    assert_eq!(fact("exe_after_upgrade"), "/usr/bin/superdisk", "{context}");
    assert_eq!(fact("after_upgrade"), "active restarts=0", "{context}");
    assert_eq!(fact("data_after_upgrade"), "yes", "{context}");
    assert_eq!(fact("stop_rc"), "0", "{context}");

    // Remove keeps the conffiles; purge takes them and every other file, and leaves the operator's.
    assert_eq!(fact("remove_rc"), "0", "{context}");
    assert_eq!(fact("after_remove"), "deinstall ok config-files", "{context}");
    assert_eq!(fact("conffile_after_remove"), "kept", "{context}");
    assert_eq!(fact("purge_rc"), "0", "{context}");
    assert!(matches!(fact("after_purge"), "absent" | "unknown ok not-installed"), "{context}");
    assert_eq!(fact("left_after_purge"), "none", "{context}");
    assert_eq!(fact("operator_config_after_purge"), "kept", "{context}");
    assert!(!result.contains("panicked"), "{context}");
}

/// `scripts/gcp-setup.sh --deb`: the package is installed with apt-get instead of copying a binary
/// and units; the daemon's commands run /usr/bin/superdisk; a unit copy in /etc/systemd/system
/// from a setup without the package (which would override the package's) stops the run.
#[test]
fn gcp_setup_takes_the_package_instead_of_a_binary() {
    let built = package();
    let root = tempfile::tempdir().unwrap();
    for d in ["dev/disk/by-id", "disks", "proc/self", "etc"] {
        std::fs::create_dir_all(root.path().join(d)).unwrap();
    }
    std::fs::write(root.path().join("proc/self/mounts"), "").unwrap();
    for (link, file, size) in [("local-nvme-ssd-0", "nvme0n1", 600u64 << 20), ("data", "sdb", 1 << 30)] {
        std::fs::File::create(root.path().join("disks").join(file)).unwrap().set_len(size).unwrap();
        std::os::unix::fs::symlink(
            format!("../../../disks/{file}"),
            root.path().join(format!("dev/disk/by-id/google-{link}")),
        )
        .unwrap();
    }
    let setup = || {
        Command::new(repo("scripts/gcp-setup.sh"))
            .args(["--dry-run", "--deb"])
            .arg(&built.deb)
            .env("SUPERDISK_SETUP_ROOT", root.path())
            .output()
            .unwrap()
    };
    let out = setup();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let commands: Vec<&str> = log.lines().filter_map(|l| l.strip_prefix("+ ")).collect();
    let r = root.path().display();
    assert_eq!(commands[0], format!("apt-get install -y {}", built.deb.display()), "{log}");
    assert!(commands[1].starts_with(&format!("{r}/usr/bin/superdisk create --backing ")), "{log}");
    assert!(!log.contains("usr/local") && !log.contains("superdisk@.service with a copy"), "{log}");
    assert!(log.contains("would write") && log.contains("devices.conf"), "the drop-ins are still written: {log}");

    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::copy(repo("systemd/superdisk@.service"), units.join("superdisk@.service")).unwrap();
    let out = setup();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("overrides the package's unit"), "{}", text(&out));
}
