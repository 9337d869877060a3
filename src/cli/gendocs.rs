//! `superdisk generate-docs --out DIR` (hidden): the man pages and shell completions, generated
//! from the clap definitions so that they can never disagree with `--help`. `scripts/package.sh`
//! runs it before `cargo deb`, which takes the files from `target/deb-assets/` (docs/PACKAGING.md).
//!
//! Writes `DIR/man/superdisk.1` and one page per visible subcommand (`superdisk-serve.1`,
//! `superdisk-rebuild-pause.1`, ...), and `DIR/completions/` for bash (`superdisk.bash`), zsh
//! (`_superdisk`) and fish (`superdisk.fish`).

use clap::CommandFactory;
use std::path::{Path, PathBuf};
use superdisk::daemon::AnyError;

#[derive(clap::Args)]
pub struct GenDocsArgs {
    /// Directory to write man/ and completions/ into (created if missing).
    #[arg(long)]
    out: PathBuf,
}

/// Where the installed package keeps the documents the pages point to.
const DOC_DIR: &str = "/usr/share/doc/superdisk";

pub fn generate_docs(args: GenDocsArgs) -> Result<(), AnyError> {
    let man_dir = args.out.join("man");
    let completions_dir = args.out.join("completions");
    for d in [&man_dir, &completions_dir] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let pages = man_pages(&man_dir)?;
    let mut cmd = visible_tree(&crate::Cli::command());
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "superdisk", &completions_dir)?;
    }
    println!("{} man pages in {}, completions in {}", pages, man_dir.display(), completions_dir.display());
    Ok(())
}

/// A copy of `cmd` without its hidden subcommands and arguments, for the completion scripts
/// (clap_complete offers hidden ones too). The names are leaked: this runs once per process.
fn visible_tree(cmd: &clap::Command) -> clap::Command {
    fn leak(s: &str) -> &'static str {
        Box::leak(s.to_owned().into_boxed_str())
    }
    let visible: Vec<&clap::Arg> = cmd.get_arguments().filter(|a| !a.is_hide_set()).collect();
    let mut out = clap::Command::new(leak(cmd.get_name()))
        .subcommand_required(cmd.is_subcommand_required_set())
        .arg_required_else_help(cmd.is_arg_required_else_help_set())
        .args(visible.iter().map(|a| (*a).clone()));
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        out = out.version(leak(version));
    }
    for g in cmd.get_groups() {
        let members: Vec<&clap::Id> = g.get_args().filter(|id| visible.iter().any(|a| a.get_id() == *id)).collect();
        if !members.is_empty() {
            let group = clap::ArgGroup::new(g.get_id()).args(members).multiple(g.clone().is_multiple());
            out = out.group(group.required(g.is_required_set()));
        }
    }
    out.subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).map(visible_tree))
}

/// One page for the command and one for each subcommand that is not hidden, at every depth, as
/// `clap_mangen::generate_to` names them, each with a SEE ALSO section. Returns how many.
fn man_pages(dir: &Path) -> Result<usize, AnyError> {
    let mut cmd = crate::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut count = 0;
    write_pages(&cmd, None, dir, &mut count)?;
    Ok(count)
}

fn write_pages(cmd: &clap::Command, parent: Option<&str>, dir: &Path, count: &mut usize) -> Result<(), AnyError> {
    let name = page_name(cmd);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, Some(&name), dir, count)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("superdisk {}", env!("CARGO_PKG_VERSION")))
        .manual("superdisk");
    let mut page = Vec::new();
    man.render(&mut page)?;
    let mut page = String::from_utf8(page)?;
    // No hyphenation: flag names, config keys and paths must read (and search) as written.
    if let Some(th) = page.find("\n.TH ") {
        let eol = page[th + 1..].find('\n').map_or(page.len(), |n| th + 1 + n + 1);
        page.insert_str(eol, ".nh\n");
    }
    // Ours go after clap_mangen's sections, before VERSION (the last one it writes), if any.
    let mut extra = String::new();
    if cmd.get_name() == "serve" {
        extra.push_str(&roff_section("CONFIGURATION", &serve_config_text()));
    }
    extra.push_str(&roff_section("SEE ALSO", &see_also(cmd, parent)));
    match page.find("\n.SH VERSION") {
        Some(at) => page.insert_str(at + 1, &extra),
        None => page.push_str(&extra),
    }
    let path = dir.join(man.get_filename());
    std::fs::write(&path, page).map_err(|e| format!("{}: {e}", path.display()))?;
    *count += 1;
    Ok(())
}

fn page_name(cmd: &clap::Command) -> String {
    cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_string()
}

fn serve_config_text() -> String {
    format!(
        "Every flag overrides one key of the TOML file given with --config, which its description names \
         ([config: KEY], or config key KEY); a flag without one is [command line only]. Keys without a \
         flag are set in the file only. \
         Every key, its default and its range: {DOC_DIR}/CONFIG.md. A commented example: \
         /etc/superdisk/example.toml. Under systemd, superdisk@NAME.service runs \
         superdisk serve --config /etc/superdisk/NAME.toml."
    )
}

fn see_also(cmd: &clap::Command, parent: Option<&str>) -> String {
    let mut refs: Vec<String> = Vec::new();
    if let Some(p) = parent {
        refs.push(format!("{p}(1)"));
    }
    refs.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).map(|s| format!("{}(1)", page_name(s))));
    let mut text = String::new();
    if !refs.is_empty() {
        text.push_str(&refs.join(", "));
        text.push_str(". ");
    }
    text.push_str(&format!(
        "The operations guide (install, configure, attach, monitor, recover, upgrade): \
         {DOC_DIR}/OPERATIONS.md; configuration keys: {DOC_DIR}/CONFIG.md; the package and in-place \
         upgrades: {DOC_DIR}/PACKAGING.md."
    ));
    text
}

/// A section of plain text, escaped for roff: backslashes, hyphens (so that man prints a real
/// hyphen-minus that can be searched and pasted), and a leading dot or quote.
fn roff_section(title: &str, text: &str) -> String {
    let body = text.replace('\\', "\\e").replace('-', "\\-");
    let body = if body.starts_with(['.', '\'']) { format!("\\&{body}") } else { body };
    format!(".SH \"{title}\"\n{body}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, FromArgMatches};
    use std::collections::BTreeSet;
    use superdisk::config::FileConfig;

    /// The `serve` flags without a config key of their own, which must say so in their help.
    const COMMAND_LINE_ONLY: &str = "[command line only]";

    fn serve_command() -> clap::Command {
        let mut cli = crate::Cli::command();
        cli.build();
        cli.find_subcommand("serve").expect("a serve subcommand").clone()
    }

    /// The config key a help text names: "[config: KEY]" or "config key KEY".
    fn named_key(help: &str) -> Option<String> {
        let rest = help.split("[config: ").nth(1).or_else(|| help.split("config key ").nth(1))?;
        Some(rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
    }

    /// The keys of the file config that `serve --FLAG VALUE` sets, through the same merge that
    /// `serve` does (FileConfig has no other way to list its set fields than its Debug form).
    fn keys_set_by(arg: &clap::Arg) -> BTreeSet<String> {
        let flag = format!("--{}", arg.get_long().expect("a long flag"));
        let takes_value = arg.get_num_args().expect("built").takes_values();
        let candidates: &[&[&str]] = if takes_value { &[&["1"], &["true"]] } else { &[&[]] };
        for value in candidates {
            let cmd = crate::cli::serve::ServeArgs::augment_args(clap::Command::new("serve"));
            let Ok(matches) = cmd.try_get_matches_from(["serve", flag.as_str()].iter().chain(value.iter())) else {
                continue;
            };
            let args = crate::cli::serve::ServeArgs::from_arg_matches(&matches).unwrap();
            let merged = format!("{:?}", crate::cli::serve::merge_flags(FileConfig::default(), &args));
            let inner = merged.trim_start_matches("FileConfig {").trim_end_matches('}');
            return inner
                .split(", ")
                .filter_map(|field| field.split_once(": Some("))
                .map(|(name, _)| name.trim().to_string())
                .collect();
        }
        panic!("{flag} accepts neither 1 nor true");
    }

    #[test]
    fn every_serve_flag_names_the_config_key_it_sets() {
        let serve = serve_command();
        let mut checked = 0;
        for arg in serve.get_arguments().filter(|a| !a.is_hide_set() && a.get_id() != "help") {
            let flag = arg.get_long().unwrap_or_default().to_string();
            let help = arg.get_long_help().or(arg.get_help()).map(|h| h.to_string()).unwrap_or_default();
            let set = keys_set_by(arg);
            match named_key(&help) {
                Some(key) => {
                    assert_eq!(
                        set,
                        BTreeSet::from([key.clone()]),
                        "--{flag}: its help names config key {key:?}, but it sets {set:?}"
                    );
                    // A real key of the file: an unknown one would be refused by deny_unknown_fields.
                    let err = toml::from_str::<FileConfig>(&format!("{key} = {{}}")).unwrap_err().to_string();
                    assert!(!err.contains("unknown field"), "--{flag}: {key} is not a config key: {err}");
                }
                None => {
                    assert!(
                        help.contains(COMMAND_LINE_ONLY),
                        "--{flag}: its help must name its config key ([config: KEY]) or say \
                         {COMMAND_LINE_ONLY}: {help:?}"
                    );
                    assert!(set.is_empty(), "--{flag} says {COMMAND_LINE_ONLY} but sets {set:?}");
                }
            }
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} serve flags found");
    }

    #[test]
    fn the_check_catches_a_flag_without_a_key() {
        // The control for the test above: the "config key" parser and the merge probe.
        assert_eq!(named_key("O_DIRECT on the backing [config: direct]").as_deref(), Some("direct"));
        assert_eq!(named_key("(config key cache_direct; default: on)").as_deref(), Some("cache_direct"));
        assert_eq!(named_key("Also listen on this Unix socket."), None);
        let serve = serve_command();
        let direct = serve.get_arguments().find(|a| a.get_id() == "direct").unwrap();
        assert_eq!(keys_set_by(direct), BTreeSet::from(["direct".to_string()]));
        let config = serve.get_arguments().find(|a| a.get_id() == "config").unwrap();
        assert!(keys_set_by(config).is_empty());
    }

    #[test]
    fn pages_and_completions_are_written() {
        let dir = tempfile::tempdir().unwrap();
        generate_docs(GenDocsArgs { out: dir.path().to_path_buf() }).unwrap();
        let man = |name: &str| std::fs::read_to_string(dir.path().join("man").join(name)).unwrap();
        let top = man("superdisk.1");
        assert!(top.contains("\n.TH superdisk 1 "), "{top}");
        assert_eq!(top.matches(".TH ").count(), 1, "{top}");
        assert!(top.contains("superdisk\\-serve(1)"), "{top}");
        let serve = man("superdisk-serve.1");
        assert!(serve.contains("\\-\\-cache\\-direct") && serve.contains(".SH \"CONFIGURATION\""), "{serve}");
        assert!(serve.contains("superdisk(1)"), "{serve}");
        man("superdisk-rebuild-pause.1");
        for hidden in ["superdisk-handover-info.1", "superdisk-generate-docs.1", "superdisk-help.1"] {
            assert!(!dir.path().join("man").join(hidden).exists(), "{hidden}");
        }
        for f in ["superdisk.bash", "_superdisk", "superdisk.fish"] {
            let text = std::fs::read_to_string(dir.path().join("completions").join(f)).unwrap();
            assert!(text.contains("cache-direct"), "{f}");
            assert!(!text.contains("generate-docs") && !text.contains("takeover-fd"), "{f} shows a hidden command");
        }
    }
}
