//! Which names from the manager are names at all. The manager is not trusted with the
//! laptop: a namespace, Service or cluster domain it pushes reaches DNS routing domains,
//! systemd-resolved and `tpvpn list`, so only what Kubernetes itself allows is kept.

use crate::Psl;

/// An RFC 1123 label as Kubernetes requires of namespace names: 1 to 63 characters of
/// lowercase letters, digits and `-`, starting and ending with a letter or digit.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// An RFC 1035 label as Kubernetes requires of Service names: an RFC 1123 label that
/// starts with a letter.
pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// Whether `domain` may be the cluster domain: one or more RFC 1123 labels (253
/// characters at most), and not itself a public suffix: `.` or `com` would send every
/// name of the laptop to the cluster. `Err` says why not.
pub fn check_cluster_domain(domain: &str, psl: &Psl) -> Result<(), String> {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    if d.is_empty() {
        return Err("it is the root: every name would go to the cluster".into());
    }
    if d.len() > 253 || !d.split('.').all(is_dns1123_label) {
        return Err("it is not a DNS name".into());
    }
    if psl.is_icann_suffix(d) {
        return Err(format!("{d} is a public suffix: every name under it would go to the cluster"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["default", "kube-system", "a", "x1", &"a".repeat(63)] {
            assert!(is_dns1123_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "--address=unixexec:path=/bin/sh", &"a".repeat(64), "é"] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
        assert!(is_dns1035_label("web") && !is_dns1035_label("1web"));
    }

    #[test]
    fn cluster_domains() {
        let psl = Psl::embedded();
        assert!(check_cluster_domain("cluster.local", &psl).is_ok());
        assert!(check_cluster_domain("cluster.local.", &psl).is_ok());
        assert!(check_cluster_domain("corp.example.internal", &psl).is_ok());
        for bad in [".", "", "com", "co.uk", "bad name", "-x.local"] {
            assert!(check_cluster_domain(bad, &psl).is_err(), "{bad}");
        }
    }
}
