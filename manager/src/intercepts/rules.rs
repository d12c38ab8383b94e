//! The rules an intercept request is held to before anything is claimed, as pure
//! functions of plain data: which namespaces may be intercepted, which matchers are
//! well-formed and bounded, and which two intercepts of one port would take each
//! other's requests. No clock, no lock, no I/O: [`super::Hub::plan`] asks them.

use tpvpn_tunnel::Matchers;

/// Namespaces never intercepted unless the manager is told to
/// (`--intercept-system-namespaces`): the cluster's own.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// At most this many `--http-header` matchers per intercept.
pub const MAX_HEADERS: usize = 8;
/// The longest header name or value, and the longest path prefix, in bytes.
pub const MAX_NAME: usize = 64;
pub const MAX_VALUE: usize = 256;
pub const MAX_PREFIX: usize = 1024;

/// Which namespaces' Services may be intercepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespacePolicy {
    /// Only these (`--intercept-namespace`; empty: any not protected).
    pub allowed: Vec<String>,
    /// Never these unless `system` is set: the manager's own namespace and those of
    /// `--protect-namespace`, besides [`SYSTEM_NAMESPACES`].
    pub protected: Vec<String>,
    /// `--intercept-system-namespaces`: the protected ones may be intercepted too.
    pub system: bool,
}

impl NamespacePolicy {
    /// Why `namespace` may not be intercepted, if it may not.
    pub fn refusal(&self, namespace: &str) -> Option<String> {
        let protected = SYSTEM_NAMESPACES.contains(&namespace) || self.protected.iter().any(|p| p == namespace);
        if protected && !self.system {
            return Some(format!(
                "namespace {namespace} is not interceptable: it belongs to the cluster or to tpvpn (the manager's --intercept-system-namespaces allows it)"
            ));
        }
        if !self.allowed.is_empty() && !self.allowed.iter().any(|a| a == namespace) {
            return Some(format!(
                "this manager intercepts only in namespaces {} (--intercept-namespace)",
                self.allowed.join(", ")
            ));
        }
        None
    }
}

/// `m` checked and in canonical form: header names lower case and sorted, a path prefix
/// of `/` dropped (every path starts with it). A personal intercept needs at least one
/// header: a path prefix alone would take every caller's requests to that path, a second
/// global intercept by another name. Sizes are bounded so that every frame that carries
/// the matchers (the capture to the agent, `tpvpn list`) stays well under the frame limit.
pub fn checked(m: &Matchers) -> Result<Matchers, String> {
    if m.headers.is_empty() && !m.path_prefix.is_empty() {
        return Err("a personal intercept needs at least one --http-header (a path prefix alone would take every caller's requests to it)".into());
    }
    if m.headers.len() > MAX_HEADERS {
        return Err(format!("at most {MAX_HEADERS} --http-header matchers"));
    }
    for (name, value) in &m.headers {
        let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
        if name.is_empty() || name.len() > MAX_NAME || !name.bytes().all(token) {
            return Err(format!(
                "header name {:?} is not an HTTP header name of at most {MAX_NAME} bytes",
                shown(name)
            ));
        }
        let visible = |c: u8| c == b' ' || c == b'\t' || c.is_ascii_graphic();
        if value.is_empty() || value.len() > MAX_VALUE || !value.bytes().all(visible) {
            return Err(format!("the value of header {name} must be 1 to {MAX_VALUE} bytes of printable ASCII"));
        }
    }
    let prefix = &m.path_prefix;
    if !prefix.is_empty()
        && (!prefix.starts_with('/') || prefix.len() > MAX_PREFIX || !prefix.bytes().all(|c| c.is_ascii_graphic()))
    {
        return Err(format!("the path prefix must start with / and be at most {MAX_PREFIX} bytes of printable ASCII"));
    }
    let mut c = m.canonical();
    if c.path_prefix == "/" {
        c.path_prefix.clear();
    }
    Ok(c)
}

/// Whether intercepts `a` and `b` of one port (both canonical) would take each other's
/// requests: two global intercepts; or two personal ones whose header sets are one a
/// subset of the other (the more specific one would win every request meant for the
/// other, or they are equal) while their path prefixes overlap. A global and a personal
/// intercept share a port by design (the personal one takes its matching requests).
pub fn overlap(a: &Matchers, b: &Matchers) -> bool {
    if a.is_empty() || b.is_empty() {
        return a.is_empty() && b.is_empty();
    }
    let subset = |x: &Matchers, y: &Matchers| x.headers.iter().all(|h| y.headers.contains(h));
    let prefixes = a.path_prefix.starts_with(&b.path_prefix) || b.path_prefix.starts_with(&a.path_prefix);
    (subset(a, b) || subset(b, a)) && prefixes
}

/// At most 64 characters of `s`, control characters escaped: another user's input
/// shown in an error line.
fn shown(s: &str) -> String {
    s.chars().take(64).flat_map(char::escape_debug).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(headers: &[(&str, &str)], prefix: &str) -> Matchers {
        Matchers {
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            path_prefix: prefix.into(),
        }
    }

    #[test]
    fn system_and_protected_namespaces_are_refused_unless_enabled() {
        let mut p = NamespacePolicy { protected: vec!["tpvpn".into()], ..Default::default() };
        for ns in ["kube-system", "kube-public", "kube-node-lease", "tpvpn"] {
            let why = p.refusal(ns).expect(ns);
            assert!(why.contains(&format!("namespace {ns} is not interceptable")), "{why}");
        }
        assert_eq!(p.refusal("default"), None);
        p.system = true;
        assert_eq!(p.refusal("kube-system"), None);
        p.allowed = vec!["team-a".into()];
        assert!(p.refusal("default").unwrap().contains("only in namespaces team-a"));
        assert_eq!(p.refusal("team-a"), None);
    }

    #[test]
    fn matchers_are_checked_and_canonical() {
        assert_eq!(checked(&m(&[], "")), Ok(m(&[], "")));
        let c = checked(&m(&[("X-Dev", "a"), ("a", "b")], "/")).unwrap();
        assert_eq!(c, m(&[("a", "b"), ("x-dev", "a")], ""), "sorted, lower case, / dropped");
        assert!(checked(&m(&[], "/api")).unwrap_err().contains("at least one --http-header"));
        assert!(checked(&m(&[], "/")).is_err(), "/ alone is not a global intercept by another name");
        let many: Vec<(String, String)> = (0..=MAX_HEADERS).map(|i| (format!("h{i}"), "v".into())).collect();
        assert!(checked(&Matchers { headers: many, path_prefix: String::new() }).is_err());
        assert!(checked(&m(&[("x", &"v".repeat(MAX_VALUE + 1))], "")).is_err());
        assert!(checked(&m(&[("x", &"v".repeat(MAX_VALUE))], "")).is_ok());
        assert!(checked(&m(&[(&"n".repeat(MAX_NAME + 1), "v")], "")).is_err());
        assert!(checked(&m(&[("bad name", "v")], "")).is_err());
        assert!(checked(&m(&[("x", "a\nb")], "")).is_err());
        assert!(checked(&m(&[("x", "a")], "api")).is_err());
        assert!(checked(&m(&[("x", "a")], &format!("/{}", "p".repeat(MAX_PREFIX)))).is_err());
        let err = checked(&m(&[("x\u{1b}[2J", "v")], "")).unwrap_err();
        assert!(!err.contains('\u{1b}'), "escapes are not echoed: {err}");
    }

    #[test]
    fn supersets_subsets_and_equal_sets_overlap_when_their_paths_do() {
        let a = m(&[("x-dev", "a")], "");
        // The hijack: the same header plus any path (or `/`, which is no path).
        assert!(overlap(&a, &m(&[("x-dev", "a")], "/api")));
        assert!(overlap(&a, &m(&[("x-dev", "a"), ("x-team", "t")], "")));
        assert!(overlap(&m(&[("x-dev", "a"), ("x-team", "t")], ""), &a), "a subset too");
        assert!(overlap(&a, &a.clone()));
        // Disjoint: another value, another header, or paths that cannot both match.
        assert!(!overlap(&a, &m(&[("x-dev", "b")], "")));
        assert!(!overlap(&a, &m(&[("x-user", "a")], "")));
        assert!(!overlap(&m(&[("x-dev", "a")], "/api"), &m(&[("x-dev", "a")], "/web")));
        assert!(overlap(&m(&[("x-dev", "a")], "/api"), &m(&[("x-dev", "a")], "/api/v2")));
        // Global intercepts: one per port; a personal one beside it is the design.
        assert!(overlap(&Matchers::default(), &Matchers::default()));
        assert!(!overlap(&Matchers::default(), &a));
        assert!(!overlap(&a, &Matchers::default()));
    }
}
