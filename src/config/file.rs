//! Reading the TOML file: loading it, `${VAR}` expansion, durations, and [`Section`],
//! the key-by-key reader that reports keys nobody asked for.
//!
//! The file is read key by key from a `toml::Table` rather than through
//! `#[derive(Deserialize)]`, because serde stops at the first bad value and an operator
//! fixing a config wants the whole list: unknown keys, bad durations, out-of-range
//! numbers and bad URLs, each with its path (`upstreams[1].url`). What each section
//! holds is in `sections.rs`.

use super::{Config, Problems, sections};
use std::collections::HashSet;
use std::fmt::Display;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;
use toml::{Table, Value};

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Problems> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Problems(vec![format!("{}: {e}", path.display())]))?;
        Config::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, Problems> {
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            Problems(vec![format!("not valid TOML: {}", e.to_string().trim())])
        })?;
        let mut problems = Vec::new();
        let config = sections::read_config(&table, &mut problems);
        problems.extend(config.check());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(Problems(problems))
        }
    }
}

/// Parses `30s`, `250ms`, `1m 30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 30s or 250ms ({e})"))
}

/// Parses a size in bytes: `1048576`, `64KiB`, `16 MiB`, `1GiB` (also `KB`, `MB`, `GB`
/// as powers of 1000).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("{text:?} is not a size like 65536, 64KiB or 16MiB")),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("{text:?} is not a size like 65536, 64KiB or 16MiB"))
}

/// Expands `${VAR}` from the environment, so secrets stay out of config files.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unclosed ${ in value".to_string())?;
        let name = &after[..end];
        let value =
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads one table, remembering which keys were used so the rest can be reported.
pub(super) struct Section<'a> {
    table: &'a Table,
    path: String,
    used: HashSet<&'static str>,
}

impl<'a> Section<'a> {
    pub(super) fn new(table: &'a Table, path: impl Into<String>) -> Self {
        Section {
            table,
            path: path.into(),
            used: HashSet::new(),
        }
    }

    /// The full path of `key`, as problems name it: `upstreams[1].url`.
    pub(super) fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(super) fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.insert(key);
        self.table.get(key)
    }

    pub(super) fn string(&mut self, key: &'static str, p: &mut Vec<String>) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                p.push(format!(
                    "{}: expected a string, found {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    /// A string setting read by its type's `FromStr`, the same one the flags use.
    pub(super) fn parsed<T>(&mut self, key: &'static str, slot: &mut T, p: &mut Vec<String>)
    where
        T: FromStr,
        T::Err: Display,
    {
        if let Some(text) = self.string(key, p) {
            match text.parse() {
                Ok(v) => *slot = v,
                Err(e) => p.push(format!("{}: {e}", self.key(key))),
            }
        }
    }

    pub(super) fn duration(&mut self, key: &'static str, slot: &mut Duration, p: &mut Vec<String>) {
        if let Some(text) = self.string(key, p) {
            match parse_duration(&text) {
                Ok(d) => *slot = d,
                Err(e) => p.push(format!("{}: {e}", self.key(key))),
            }
        }
    }

    /// A size in bytes: an integer, or a string with a unit (see [`parse_size`]).
    pub(super) fn size(&mut self, key: &'static str, slot: &mut usize, p: &mut Vec<String>) {
        match self.get(key) {
            Some(Value::String(text)) => match parse_size(text) {
                Ok(n) => *slot = n,
                Err(e) => p.push(format!("{}: {e}", self.key(key))),
            },
            _ => self.number(key, slot, p),
        }
    }

    pub(super) fn number(&mut self, key: &'static str, slot: &mut usize, p: &mut Vec<String>) {
        match self.get(key) {
            None => {}
            Some(Value::Integer(n)) => match usize::try_from(*n) {
                Ok(n) => *slot = n,
                Err(_) => p.push(format!("{}: must not be negative", self.key(key))),
            },
            Some(other) => p.push(format!(
                "{}: expected an integer, found {}",
                self.key(key),
                other.type_str()
            )),
        }
    }

    pub(super) fn boolean(&mut self, key: &'static str, slot: &mut bool, p: &mut Vec<String>) {
        match self.get(key) {
            None => {}
            Some(Value::Boolean(b)) => *slot = *b,
            Some(_) => p.push(format!("{}: expected true or false", self.key(key))),
        }
    }

    pub(super) fn strings(
        &mut self,
        key: &'static str,
        p: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match self.get(key)? {
            Value::Array(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        other => p.push(format!(
                            "{}: expected strings, found {}",
                            self.key(key),
                            other.type_str()
                        )),
                    }
                }
                Some(out)
            }
            other => {
                p.push(format!(
                    "{}: expected an array of strings, found {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    pub(super) fn table(&mut self, key: &'static str, p: &mut Vec<String>) -> Option<&'a Table> {
        match self.get(key)? {
            Value::Table(t) => Some(t),
            other => {
                p.push(format!(
                    "{}: expected a table, found {}",
                    self.key(key),
                    other.type_str()
                ));
                None
            }
        }
    }

    /// Reports keys nobody asked for: usually typos, which would otherwise be silently ignored.
    pub(super) fn finish(self, p: &mut Vec<String>) {
        for key in self.table.keys() {
            if !self.used.contains(key.as_str()) {
                p.push(format!("{}: unknown key", self.key(key)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion() {
        // PATH is set in every environment tests run in.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(expand_env("a ${PATH} b").unwrap(), format!("a {path} b"));
        assert!(expand_env("${RPCGATE_SURELY_UNSET_VARIABLE}").is_err());
        assert!(expand_env("${open").is_err());
    }

    #[test]
    fn sizes_as_operators_write_them() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size(" 16 MiB "), Ok(16 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert!(parse_size("lots").unwrap_err().contains("like 65536"));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn durations_as_operators_write_them() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(" 1m 30s "), Ok(Duration::from_secs(90)));
        let err = parse_duration("soon").unwrap_err();
        assert!(err.contains("like 30s or 250ms"), "{err}");
    }

    #[test]
    fn a_section_reports_keys_nobody_read_with_their_path() {
        let table: Table = "known = true\ntypo = 1".parse().unwrap();
        let mut p = Vec::new();
        let mut s = Section::new(&table, "upstreams[2]");
        let mut known = false;
        s.boolean("known", &mut known, &mut p);
        s.finish(&mut p);
        assert!(known);
        assert_eq!(p, ["upstreams[2].typo: unknown key"]);
    }
}
