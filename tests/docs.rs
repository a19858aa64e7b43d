//! The docs keep working: every ```` ```toml ```` block in `README.md` and `docs/*.md`
//! passes the real `rpcgate check-config`, every relative link resolves (file and
//! `#anchor`), and the configuration table agrees with what the loader accepts.
//!
//! The rule for TOML fragments is stated for readers in `docs/configuration.md`
//! ("Examples in these docs are checked"); [`checkable`] implements it. The Markdown
//! reading here is deliberately small: fenced blocks, ATX headings, inline links and
//! reference definitions, which is all these pages use.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use support::with_timeout;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_rpcgate");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The minimal upstream's URL. Port 9 (discard): check-config connects nowhere anyway.
const MINIMAL_URL: &str = "ws://127.0.0.1:9/";

/// Appended to a TOML block that defines no upstream, so a fragment is checked as a
/// whole config.
fn minimal_upstream() -> String {
    format!("\n[[upstreams]]\nurl = \"{MINIMAL_URL}\"\n")
}

/// What every `${VAR}` in a checked block is set to.
const PLACEHOLDER: &str = "placeholder";

/// The info-string word that exempts a ```` ```toml ```` block from the check.
const IGNORE_CHECK: &str = "ignore-check";

/// One Markdown page: its path relative to the repository root, and its text.
struct Page {
    name: String,
    text: String,
}

/// README.md and every docs/*.md, in a stable order.
fn pages() -> Vec<Page> {
    let mut names = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .expect("a docs/ directory")
        .map(|entry| {
            entry
                .expect("read docs/")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    names.extend(docs);
    names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(Path::new(ROOT).join(&name))
                .unwrap_or_else(|e| panic!("read {name}: {e}"));
            Page { name, text }
        })
        .collect()
}

/// A fenced code block: its info string, the 1-based line of its opening fence, and
/// its content.
struct Block {
    info: String,
    line: usize,
    body: String,
}

/// What a page is made of, as far as these checks care.
#[derive(Default)]
struct Scanned {
    blocks: Vec<Block>,
    /// Lines outside fenced blocks, with their 1-based numbers.
    prose: Vec<(usize, String)>,
    /// Fences opened and never closed, by line.
    unclosed: Vec<usize>,
}

/// Splits a page into fenced blocks and prose, following CommonMark's fence rules
/// closely enough for these pages: three or more backticks or tildes open a block
/// (a backtick fence's info string has no backtick, so ```` ```toml ```` in a
/// sentence is not one), and a run of the same character at least as long closes it.
fn scan(text: &str) -> Scanned {
    let mut out = Scanned::default();
    // (fence character, fence length, block being collected)
    let mut open: Option<(char, usize, Block)> = None;
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let trimmed = line.trim_start();
        let fence_char = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = fence_char.map_or(0, |c| trimmed.chars().take_while(|x| *x == c).count());
        match &mut open {
            Some((c, len, block)) => {
                let closes =
                    fence_char == Some(*c) && run >= *len && trimmed[run..].trim().is_empty();
                if !closes {
                    block.body.push_str(line);
                    block.body.push('\n');
                    continue;
                }
            }
            None => {
                let info = trimmed[run..].trim();
                if let Some(c) = fence_char.filter(|_| run >= 3)
                    && !(c == '`' && info.contains('`'))
                {
                    let block = Block {
                        info: info.to_string(),
                        line: number,
                        body: String::new(),
                    };
                    open = Some((c, run, block));
                } else {
                    out.prose.push((number, line.to_string()));
                }
                continue;
            }
        }
        if let Some((_, _, block)) = open.take() {
            out.blocks.push(block);
        }
    }
    if let Some((_, _, block)) = open {
        out.unclosed.push(block.line);
    }
    out
}

/// `Some(true)` for a ```` ```toml ```` block to check, `Some(false)` for one marked
/// `ignore-check` (```` ```toml ignore-check ```` or ```` ```toml,ignore-check ````),
/// `None` for any other block.
fn toml_check(info: &str) -> Option<bool> {
    let mut words = info
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty());
    if words.next() != Some("toml") {
        return None;
    }
    Some(!words.any(|w| w == IGNORE_CHECK))
}

/// Whether a TOML text defines upstreams itself (`[[upstreams]]` or `upstreams = [...]`).
fn defines_upstreams(toml: &str) -> bool {
    toml.lines().any(|line| {
        let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
        compact.starts_with("[[upstreams]]") || compact.starts_with("upstreams=")
    })
}

/// The rule: a block with upstreams is a whole config and is checked as written; any
/// other block is a fragment and gets [`minimal_upstream`] appended. Returns the text
/// to check and whether the upstream was appended.
fn checkable(block: &str) -> (String, bool) {
    if defines_upstreams(block) {
        (block.to_string(), false)
    } else {
        (format!("{block}{}", minimal_upstream()), true)
    }
}

/// The names of every `${VAR}` in a text, as the loader expands them.
fn env_vars(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else { break };
        let name = &after[..end];
        if !name.is_empty() && !name.contains(['=', '\0']) {
            names.insert(name.to_string());
        }
        rest = &after[end + 1..];
    }
    names
}

/// Runs `rpcgate check-config` on `text`, with every `${VAR}` in it set to
/// [`PLACEHOLDER`]; returns check-config's complaint, or `None` if it passed.
async fn check_config(dir: &Path, file_name: &str, text: &str) -> Option<String> {
    std::fs::create_dir_all(dir).expect("create the temp dir");
    let file = dir.join(file_name);
    std::fs::write(&file, text).expect("write the temp config");
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config")
        .arg(&file)
        .current_dir(ROOT)
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    for name in env_vars(text) {
        cmd.env(name, PLACEHOLDER);
    }
    let out = with_timeout(cmd.output())
        .await
        .expect("run rpcgate check-config");
    if out.status.success() {
        return None;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Some(
        stderr
            .replace(&file.display().to_string(), "the block")
            .trim()
            .to_string(),
    )
}

fn temp_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("rpcgate-docs-{}-{what}", std::process::id()))
}

#[tokio::test]
async fn every_toml_block_in_the_docs_passes_check_config() {
    let dir = temp_dir("blocks");
    let mut checked = 0;
    let mut failures = Vec::new();
    for page in pages() {
        let scanned = scan(&page.text);
        for line in &scanned.unclosed {
            failures.push(format!(
                "{}:{line}: this code fence is never closed",
                page.name
            ));
        }
        for block in &scanned.blocks {
            if toml_check(&block.info) != Some(true) {
                continue;
            }
            let (text, appended) = checkable(&block.body);
            let file_name = format!("{}-{}.toml", page.name.replace('/', "_"), block.line);
            if let Some(complaint) = check_config(&dir, &file_name, &text).await {
                let how = if appended {
                    " (a fragment: checked with the minimal [[upstreams]] appended)"
                } else {
                    ""
                };
                failures.push(format!(
                    "{}:{}: this ```toml block fails check-config{how}; its lines count from the \
                     one after the fence:\n{complaint}",
                    page.name, block.line
                ));
            }
            checked += 1;
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        checked > 0,
        "no ```toml block found in README.md or docs/*.md"
    );
}

/// A link found in a page: where it is and what it points at.
struct Link {
    line: usize,
    target: String,
}

/// Replaces every code span with spaces (keeping newlines), so links and brackets
/// inside `code` are not taken for links. An unmatched backtick run stays literal.
fn blank_code_spans(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'`' {
            i += 1;
            continue;
        }
        let run = bytes[i..].iter().take_while(|b| **b == b'`').count();
        let mut j = i + run;
        let mut close = None;
        while j < bytes.len() {
            if bytes[j] == b'`' {
                let other = bytes[j..].iter().take_while(|b| **b == b'`').count();
                if other == run {
                    close = Some(j + other);
                    break;
                }
                j += other;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                for b in &mut out[i..end] {
                    if *b != b'\n' {
                        *b = b' ';
                    }
                }
                i = end;
            }
            None => i += run,
        }
    }
    String::from_utf8(out).expect("only ASCII bytes were replaced")
}

/// Every inline link and image (`[text](target)`, `![alt](src)`) and reference
/// definition (`[label]: target`) outside fenced blocks and code spans.
fn links(scanned: &Scanned) -> Vec<Link> {
    let mut found = Vec::new();
    // Paragraphs (first line, text), so a code span or a link's text may run over a
    // line break. A blank line or a fenced block ends one.
    let mut paragraphs: Vec<(usize, String)> = Vec::new();
    let mut open_until: Option<usize> = None;
    for (number, line) in &scanned.prose {
        if line.trim().is_empty() {
            open_until = None;
            continue;
        }
        match (open_until, paragraphs.last_mut()) {
            (Some(last), Some((_, text))) if last + 1 == *number => {
                text.push('\n');
                text.push_str(line);
            }
            _ => paragraphs.push((*number, line.clone())),
        }
        open_until = Some(*number);
    }
    for (first, text) in paragraphs {
        let text = blank_code_spans(&text);
        let line_of = |at: usize| first + text[..at].matches('\n').count();
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let mut depth = 0usize;
            let end = rest.find(|c: char| match c {
                '(' => {
                    depth += 1;
                    false
                }
                ')' if depth == 0 => true,
                ')' => {
                    depth -= 1;
                    false
                }
                '\n' => true,
                _ => false,
            });
            if let Some(end) = end.filter(|end| rest[*end..].starts_with(')')) {
                found.push(Link {
                    line: line_of(at),
                    target: rest[..end].to_string(),
                });
            }
        }
        let mut offset = 0;
        for line in text.split('\n') {
            let trimmed = line.trim_start();
            if let Some(after) = trimmed.strip_prefix('[')
                && let Some(close) = after.find(']')
                && close > 0
                && after[close..].starts_with("]:")
            {
                found.push(Link {
                    line: line_of(offset),
                    target: after[close + 2..].trim().to_string(),
                });
            }
            offset += line.len() + 1;
        }
    }
    found
}

/// A link's destination without angle brackets or a title; `None` for an external one.
fn destination(target: &str) -> Option<&str> {
    let target = target.trim();
    let target = match target.strip_prefix('<') {
        Some(inner) => inner.split('>').next().unwrap_or(""),
        None => target.split_whitespace().next().unwrap_or(""),
    };
    let external = target.contains("://") || target.starts_with("mailto:");
    (!external).then_some(target)
}

/// GitHub's anchor for a heading: the heading's text as rendered, lowercased, letters,
/// digits, `-` and `_` kept, spaces turned into `-`, everything else dropped.
fn github_anchor(heading: &str) -> String {
    // Rendered text: a link's text stays, its target goes; code and emphasis marks go.
    let mut rendered = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        match rest[open..].find("](").map(|at| open + at) {
            Some(mid) if rest[mid..].contains(')') => {
                rendered.push_str(&rest[..open]);
                rendered.push_str(&rest[open + 1..mid]);
                let close = mid + rest[mid..].find(')').expect("a closing parenthesis");
                rest = &rest[close + 1..];
            }
            _ => break,
        }
    }
    rendered.push_str(rest);
    let mut anchor = String::new();
    for c in rendered.chars() {
        if c.is_alphanumeric() || c == '_' || c == '-' {
            anchor.extend(c.to_lowercase());
        } else if c == ' ' {
            anchor.push('-');
        }
    }
    anchor
}

/// Every heading anchor of a page; a repeated heading gets `-1`, `-2`, ... as on GitHub.
fn anchors(scanned: &Scanned) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in &scanned.prose {
        let trimmed = line.trim_start();
        if line.len() - trimmed.len() > 3 {
            continue;
        }
        let level = trimmed.chars().take_while(|c| *c == '#').count();
        let text = &trimmed[level..];
        if !(1..=6).contains(&level) || !(text.is_empty() || text.starts_with([' ', '\t'])) {
            continue;
        }
        let text = text.trim().trim_end_matches('#').trim_end();
        let base = github_anchor(text);
        let count = seen.entry(base.clone()).or_insert(0);
        out.insert(if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        });
        *count += 1;
    }
    out
}

/// `a/./b/../c` -> `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Where a relative link from `page` leads, relative to the repository root; `Err`
/// for a link that climbs out of the repository.
fn resolve(page: &str, path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Ok(PathBuf::from(page));
    }
    let joined = match path.strip_prefix('/') {
        Some(from_root) => PathBuf::from(from_root),
        None => Path::new(page).parent().unwrap_or(Path::new("")).join(path),
    };
    let climbs = joined
        .components()
        .try_fold(0usize, |depth, part| match part {
            Component::ParentDir => depth.checked_sub(1),
            Component::CurDir => Some(depth),
            _ => Some(depth + 1),
        })
        .is_none();
    if climbs {
        return Err("leads out of the repository".into());
    }
    Ok(normalize(&joined))
}

/// The files a page links to, relative to the repository root.
fn linked_files(page: &Page) -> BTreeSet<PathBuf> {
    links(&scan(&page.text))
        .iter()
        .filter_map(|link| destination(&link.target))
        .filter_map(|dest| resolve(&page.name, dest.split('#').next().unwrap_or("")).ok())
        .collect()
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let pages = pages();
    let mut anchors_of: HashMap<PathBuf, BTreeSet<String>> = HashMap::new();
    let mut checked = 0;
    let mut failures = Vec::new();
    for page in &pages {
        for link in links(&scan(&page.text)) {
            let Some(dest) = destination(&link.target) else {
                continue;
            };
            checked += 1;
            let at = format!("{}:{}: link `{dest}`", page.name, link.line);
            let (path, anchor) = match dest.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (dest, None),
            };
            let file = match resolve(&page.name, path) {
                Ok(file) => file,
                Err(e) => {
                    failures.push(format!("{at} {e}"));
                    continue;
                }
            };
            let on_disk = Path::new(ROOT).join(&file);
            if !on_disk.exists() {
                failures.push(format!("{at}: {} does not exist", file.display()));
                continue;
            }
            // Anchors are checked in Markdown files only; GitHub's `#L12` line anchors
            // into code files are not headings.
            let Some(anchor) = anchor.filter(|_| file.extension().is_some_and(|e| e == "md"))
            else {
                continue;
            };
            let known = anchors_of.entry(file.clone()).or_insert_with(|| {
                let text = std::fs::read_to_string(&on_disk).unwrap_or_default();
                anchors(&scan(&text))
            });
            if !known.contains(anchor) {
                failures.push(format!(
                    "{at}: {} has no heading with the anchor #{anchor}; its anchors: {}",
                    file.display(),
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        checked > 0,
        "no relative link found in README.md or docs/*.md"
    );
}

#[test]
fn every_docs_page_links_back_to_the_readme_and_the_readme_lists_every_page() {
    let pages = pages();
    let from_readme = linked_files(&pages[0]);
    let mut failures = Vec::new();
    for page in pages.iter().filter(|p| p.name.starts_with("docs/")) {
        // The first line after the title says what the page covers and links back.
        let scanned = scan(&page.text);
        let first = scanned
            .prose
            .iter()
            .map(|(_, line)| line.trim())
            .find(|line| !line.is_empty() && !line.starts_with('#'))
            .unwrap_or("");
        if !first.contains("](../README.md)") {
            failures.push(format!(
                "{}: the line after the title should link back to the README \
                 ([README](../README.md)); it is {first:?}",
                page.name
            ));
        }
        if !from_readme.contains(Path::new(&page.name)) {
            failures.push(format!(
                "README.md does not link {}: add it to the table of docs pages",
                page.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The rows of the key table in docs/configuration.md ("Every key"): each key with
/// its documented default, or `None` where the default is not a value (`required`,
/// `unset`, `none`).
fn documented_keys() -> Vec<(String, Option<String>)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docs/configuration.md"))
        .expect("read docs/configuration.md");
    let scanned = scan(&text);
    let mut rows = Vec::new();
    let mut in_table = false;
    for (_, line) in &scanned.prose {
        if line.starts_with('#') {
            in_table = github_anchor(line.trim_start_matches('#').trim()) == "every-key";
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if !in_table || cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let code = |cell: &str| {
            let inner = cell.strip_prefix('`')?;
            Some(inner[..inner.find('`')?].to_string())
        };
        if let Some(key) = code(cells[1]) {
            rows.push((key, code(cells[2])));
        }
    }
    rows
}

/// A config that sets every documented key to its documented default: root keys
/// first, then each `[table]`, then each `[[array]]` with one element. The upstream
/// gets the minimal upstream's `url`, the one required key.
fn config_of_defaults(keys: &[(String, Option<String>)]) -> String {
    let mut root = String::new();
    let mut tables: Vec<(String, String)> = Vec::new();
    let mut arrays = vec![(
        "upstreams".to_string(),
        format!("url = \"{MINIMAL_URL}\"\n"),
    )];
    for (key, default) in keys {
        let Some(value) = default else { continue };
        let (section, field, list) = match key.rsplit_once('.') {
            None => {
                root.push_str(&format!("{key} = {value}\n"));
                continue;
            }
            Some((section, field)) => match section.strip_suffix("[]") {
                Some(array) => (array.to_string(), field, &mut arrays),
                None => (section.to_string(), field, &mut tables),
            },
        };
        let line = format!("{field} = {value}\n");
        match list.iter_mut().find(|(name, _)| *name == section) {
            Some((_, body)) => body.push_str(&line),
            None => list.push((section, line)),
        }
    }
    let mut out = root;
    for (name, body) in tables {
        out.push_str(&format!("\n[{name}]\n{body}"));
    }
    for (name, body) in arrays {
        out.push_str(&format!("\n[[{name}]]\n{body}"));
    }
    out
}

#[tokio::test]
async fn every_key_in_the_configuration_table_loads_with_its_default() {
    let keys = documented_keys();
    assert!(
        keys.len() >= 40,
        "docs/configuration.md's \"Every key\" table has only {} rows: did it move?",
        keys.len()
    );
    let mut seen = BTreeSet::new();
    let repeated: Vec<&str> = keys
        .iter()
        .filter(|(key, _)| !seen.insert(key.as_str()))
        .map(|(key, _)| key.as_str())
        .collect();
    assert!(repeated.is_empty(), "keys documented twice: {repeated:?}");

    let config = config_of_defaults(&keys);
    let dir = temp_dir("keys");
    let complaint = check_config(&dir, "defaults.toml", &config).await;
    std::fs::remove_dir_all(&dir).ok();
    if let Some(complaint) = complaint {
        panic!(
            "docs/configuration.md: its key table, every key set to its documented default, \
             fails check-config:\n{complaint}\n\nthe config checked:\n{config}"
        );
    }
}

/// The keys a config file sets, as table-row names (`http.path`, `upstreams[].url`): a
/// line-based reader, enough for the files rpcgate ships (no multi-line strings, no
/// multi-line arrays of tables). A sub-table that is itself a documented key (such as
/// `upstreams[].headers`) counts as that key; its entries are free-form.
fn keys_set_in(toml: &str, documented: &BTreeSet<String>) -> BTreeSet<String> {
    let mut arrays = BTreeSet::new();
    let mut prefix = String::new();
    let mut free_form = false;
    let mut out = BTreeSet::new();
    for line in toml.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let array = header.starts_with('[');
            let name = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim();
            let mut path = String::new();
            for (i, part) in name.split('.').enumerate() {
                if i > 0 {
                    path.push('.');
                }
                path.push_str(part.trim());
                if arrays.contains(&path) {
                    path.push_str("[]");
                }
            }
            if array {
                arrays.insert(path.clone());
                path.push_str("[]");
            }
            free_form = documented.contains(&path);
            if free_form {
                out.insert(path.clone());
            }
            prefix = format!("{path}.");
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let bare = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if bare && !free_form {
            out.insert(format!("{prefix}{key}"));
        }
    }
    out
}

#[test]
fn every_key_the_shipped_configs_set_is_in_the_configuration_table() {
    let documented: BTreeSet<String> = documented_keys().into_iter().map(|(k, _)| k).collect();
    let mut files = vec![
        PathBuf::from("deploy/rpcgate.toml"),
        PathBuf::from("deploy/k8s/base/rpcgate.toml"),
    ];
    let overlays = Path::new(ROOT).join("deploy/k8s/overlays");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&overlays)
        .map(|dir| {
            dir.flatten()
                .map(|e| e.path().join("rpcgate.toml"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    for path in found.into_iter().filter(|p| p.is_file()) {
        let relative = path
            .strip_prefix(ROOT)
            .expect("under the repository")
            .to_path_buf();
        files.push(relative);
    }
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(Path::new(ROOT).join(file))
            .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        for key in keys_set_in(&text, &documented) {
            if !documented.contains(&key) {
                failures.push(format!(
                    "{} sets `{key}`, which docs/configuration.md's key table does not list",
                    file.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_docs_readers_follow_githubs_rules() {
    for (heading, anchor) in [
        (
            "Failover: what is retried and why",
            "failover-what-is-retried-and-why",
        ),
        ("`/healthz` and `/readyz`", "healthz-and-readyz"),
        ("`${VAR}` in values", "var-in-values"),
        ("`overlays/standalone`", "overlaysstandalone"),
        (
            "Limits of `connection` sessions",
            "limits-of-connection-sessions",
        ),
        ("See [the table](x.md#y) now", "see-the-table-now"),
        ("Retry-After", "retry-after"),
    ] {
        assert_eq!(github_anchor(heading), anchor, "{heading:?}");
    }

    let page = "# A\n\n## Metrics\n\n```toml\n# not a heading\n[a](nope.md)\n```\n\
                ## Metrics\n\nsee `[b](code.md)` and [c](real.md#metrics-1) or\n\
                [wrapped\ntext](<two words.md> \"title\")\n\n[ref]: ref.md\n";
    let scanned = scan(page);
    let expected: BTreeSet<String> = ["a", "metrics", "metrics-1"].map(String::from).into();
    assert_eq!(anchors(&scanned), expected);
    let targets: Vec<(usize, Option<String>)> = links(&scanned)
        .iter()
        .map(|l| (l.line, destination(&l.target).map(String::from)))
        .collect();
    let expected = [
        (11, "real.md#metrics-1"),
        (13, "two words.md"),
        (15, "ref.md"),
    ]
    .map(|(line, dest)| (line, Some(dest.to_string())));
    assert_eq!(targets, expected);
    assert_eq!(scanned.blocks.len(), 1);
    assert_eq!(toml_check(&scanned.blocks[0].info), Some(true));
    assert_eq!(toml_check("toml ignore-check"), Some(false));
    assert_eq!(toml_check("toml,ignore-check"), Some(false));
    assert_eq!(toml_check("text"), None);
    assert_eq!(scan("```sh\nno end\n").unclosed, [1]);

    let (whole, appended) = checkable("[[upstreams]]\nurl = \"ws://a/\"\n");
    assert!(!appended && !whole.contains("127.0.0.1:9"));
    let (fragment, appended) = checkable("[sessions]\naffinity = \"upstream\"\n");
    assert!(appended && fragment.ends_with(&minimal_upstream()));
}
