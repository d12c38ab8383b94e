//! The Public Suffix List: which namespace names must never become routing domains.

use std::path::Path;
use std::str::FromStr;

use publicsuffix::{List, Psl as _, Type};

use crate::Error;

/// The list embedded at build time (`data/public_suffix_list.dat`, publicsuffix.org, MPL-2.0).
const EMBEDDED: &str = include_str!("../data/public_suffix_list.dat");

/// A parsed Public Suffix List.
#[derive(Debug, Clone)]
pub struct Psl {
    list: List,
}

impl Psl {
    /// The list embedded in the binary at build time.
    pub fn embedded() -> Self {
        // Invariant: the embedded file is the official list and parses; the test
        // `embedded_list_parses` proves it for every build.
        Self::parse(EMBEDDED).expect("embedded public suffix list parses")
    }

    /// The embedded list, parsed once per process.
    pub fn shared() -> &'static Psl {
        static LIST: std::sync::OnceLock<Psl> = std::sync::OnceLock::new();
        LIST.get_or_init(Psl::embedded)
    }

    /// Parses a list in the publicsuffix.org format (`ICANN` and `PRIVATE` sections).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let list = List::from_str(text).map_err(|source| Error::PslParse { source })?;
        Ok(Self { list })
    }

    /// Loads a newer list from a file, e.g. one downloaded from publicsuffix.org.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::PslRead { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// Whether `domain` (case-insensitive, trailing dot optional) is itself a public
    /// suffix of the list's ICANN section: `rs`, `dev`, `co.uk` are; `default`,
    /// `kube-system`, `docs.rs` and private-section suffixes such as `github.io` are not.
    pub fn is_icann_suffix(&self, domain: &str) -> bool {
        let domain = domain.strip_suffix('.').unwrap_or(domain).to_ascii_lowercase();
        if domain.is_empty() {
            return false;
        }
        match self.list.suffix(domain.as_bytes()) {
            Some(suffix) => {
                suffix.is_known() && suffix.typ() == Some(Type::Icann) && suffix.as_bytes() == domain.as_bytes()
            }
            None => false,
        }
    }
}

impl Default for Psl {
    fn default() -> Self {
        Self::embedded()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_list_parses() {
        let _ = Psl::embedded();
    }

    #[test]
    fn embedded_list_knows_icann_suffixes() {
        let psl = Psl::embedded();
        for d in ["rs", "dev", "io", "com", "co.uk", "CO.UK.", "uk", "arpa"] {
            assert!(psl.is_icann_suffix(d), "{d} should be an ICANN suffix");
        }
        for d in ["default", "kube-system", "docs.rs", "example.co.uk", "github.io", "", ".", "cluster.local"] {
            assert!(!psl.is_icann_suffix(d), "{d} should not be an ICANN suffix");
        }
    }

    #[test]
    fn parse_and_from_file() {
        let text = "// ===BEGIN ICANN DOMAINS===\nfoo\n// ===BEGIN PRIVATE DOMAINS===\nbar.foo\n";
        let psl = Psl::parse(text).unwrap();
        assert!(psl.is_icann_suffix("foo"));
        assert!(!psl.is_icann_suffix("bar.foo"));
        assert!(!psl.is_icann_suffix("rs"));
        let path = std::env::temp_dir().join(format!("tpvpn-psl-test-{}.dat", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let loaded = Psl::from_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(loaded.is_icann_suffix("foo"));
        assert!(matches!(Psl::from_file("/nonexistent/psl.dat"), Err(Error::PslRead { .. })));
        assert!(matches!(Psl::parse("no rules here"), Err(Error::PslParse { .. })));
    }
}
