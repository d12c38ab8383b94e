//! Users of a static token file and the RBAC authorizer that decides what they may do.
//!
//! Kept from the real API server: the token file's format (`--token-auth-file`: CSV lines
//! `token,user,uid,"group1,group2"`), every authenticated user's `system:authenticated`
//! group, and RBAC's evaluation: ClusterRoleBindings grant their ClusterRole everywhere,
//! RoleBindings grant their Role or ClusterRole in their own namespace; a rule matches on
//! `apiGroups`, `resources` (`pods/portforward` names a subresource, `*` and `*/sub`
//! match any), `verbs` and, when given, `resourceNames`; subjects are `User`, `Group` and
//! `ServiceAccount` (`system:serviceaccount:NS:NAME`). Allow-only, as RBAC is. The 403
//! message has the real text. Not kept: aggregated ClusterRoles, non-resource URLs
//! (discovery and `/version` are open to every authenticated user, as the default
//! `system:discovery` binding makes them), impersonation.

use anyhow::{bail, Result};
use serde_json::Value;

use super::*;

/// An authenticated user: name and groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

/// One line of a token file: the bearer token and who it authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUser {
    pub token: String,
    pub uid: String,
    pub user: UserInfo,
}

/// Parses a token file (`token,user,uid[,"group1,group2"]` per line; `#` comments).
pub fn parse_token_file(text: &str) -> Result<Vec<TokenUser>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(4, ',');
        let (Some(token), Some(name), Some(uid)) = (fields.next(), fields.next(), fields.next()) else {
            bail!("token file line {n}: expected token,user,uid[,\"groups\"]");
        };
        if token.is_empty() || name.is_empty() {
            bail!("token file line {n}: empty token or user");
        }
        let groups = fields.next().unwrap_or("").trim_matches('"');
        let mut groups: Vec<String> =
            groups.split(',').map(str::trim).filter(|g| !g.is_empty()).map(str::to_string).collect();
        groups.push("system:authenticated".into());
        out.push(TokenUser { token: token.into(), uid: uid.into(), user: UserInfo { name: name.into(), groups } });
    }
    Ok(out)
}

/// What a request asks to do, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// Plural, with the subresource after a `/` (`pods/portforward`).
    pub resource: String,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

fn strings(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let group = strings(&rule["apiGroups"]).any(|g| g == "*" || g == a.group);
    let verb = strings(&rule["verbs"]).any(|v| v == "*" || v == a.verb);
    let sub = a.resource.split_once('/').map(|(_, s)| s);
    let resource = strings(&rule["resources"]).any(|r| {
        r == a.resource || (r == "*" && sub.is_none()) || r.strip_prefix("*/").is_some_and(|s| Some(s) == sub)
    });
    let names: Vec<&str> = strings(&rule["resourceNames"]).collect();
    let name = names.is_empty() || a.name.is_some_and(|n| names.contains(&n));
    group && verb && resource && name
}

fn subject_is(subject: &Value, user: &UserInfo) -> bool {
    let name = subject["name"].as_str().unwrap_or_default();
    match subject["kind"].as_str() {
        Some("User") => user.name == name,
        Some("Group") => user.groups.iter().any(|g| g == name),
        Some("ServiceAccount") => {
            let ns = subject["namespace"].as_str().unwrap_or_default();
            user.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

impl Store {
    /// Whether RBAC allows `user` what `a` asks. Members of `system:masters` are allowed
    /// everything, as the real API server's privileged-group authorizer (before RBAC)
    /// allows them, in SubjectAccessReviews too.
    pub fn authorize(&self, user: &UserInfo, a: &Attributes) -> bool {
        if user.groups.iter().any(|g| g == "system:masters") {
            return true;
        }
        let all = Filter::default();
        let bound = |binding: &Value| binding_names(binding, user);
        let role_allows = |role_ref: &Value, binding_ns: Option<&str>| {
            let name = role_ref["name"].as_str().unwrap_or_default();
            let role = match role_ref["kind"].as_str() {
                Some("ClusterRole") => self.get(Resource::ClusterRoles, None, name),
                Some("Role") => self.get(Resource::Roles, binding_ns, name),
                _ => return false,
            };
            role.is_ok_and(|r| r["rules"].as_array().into_iter().flatten().any(|rule| rule_allows(rule, a)))
        };
        let cluster = self.list(Resource::ClusterRoleBindings, &all);
        if cluster["items"].as_array().into_iter().flatten().any(|b| bound(b) && role_allows(&b["roleRef"], None)) {
            return true;
        }
        let Some(ns) = a.namespace else { return false };
        let local = self.list(Resource::RoleBindings, &Filter { namespace: Some(ns.into()), ..Filter::default() });
        local["items"].as_array().into_iter().flatten().any(|b| bound(b) && role_allows(&b["roleRef"], Some(ns)))
    }
}

fn binding_names(binding: &Value, user: &UserInfo) -> bool {
    binding["subjects"].as_array().into_iter().flatten().any(|s| subject_is(s, user))
}

/// The real API server's 403 for a request RBAC did not allow.
pub fn rbac_forbidden(user: &UserInfo, a: &Attributes) -> ApiError {
    let (res, sub) = a.resource.split_once('/').map_or((a.resource.as_str(), None), |(r, s)| (r, Some(s)));
    let what = match a.name {
        Some(n) => format!("{res} \"{n}\""),
        None => res.to_string(),
    };
    let full = match sub {
        Some(s) => format!("{res}/{s}"),
        None => res.to_string(),
    };
    let scope = match a.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".into(),
    };
    let msg = format!(
        "{what} is forbidden: User \"{}\" cannot {} resource \"{full}\" in API group \"{}\" {scope}",
        user.name, a.verb, a.group
    );
    let mut e = ApiError::new(403, "Forbidden", msg);
    e.details = Some(serde_json::json!({"name": a.name.unwrap_or_default(), "kind": res}));
    e
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn alice() -> UserInfo {
        UserInfo { name: "alice".into(), groups: vec!["dev".into(), "system:authenticated".into()] }
    }

    fn attrs<'a>(verb: &'a str, resource: &str, ns: Option<&'a str>, name: Option<&'a str>) -> Attributes<'a> {
        Attributes { verb, group: "", resource: resource.into(), namespace: ns, name }
    }

    fn store(objects: Vec<Value>) -> Store {
        let mut s = Store::default();
        s.load(objects).unwrap();
        s
    }

    fn role(ns: &str, name: &str, rules: Value) -> Value {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": ns}, "rules": rules})
    }

    fn binding(ns: &str, role_kind: &str, role: &str, subject: Value) -> Value {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("{role}-b"), "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
            "subjects": [subject]})
    }

    #[test]
    fn token_file_lines_give_users_with_groups() {
        let users = parse_token_file("# c\nt1,alice,1,\"dev,ops\"\nt2,bob,2\n").unwrap();
        assert_eq!(users[0].user.groups, ["dev", "ops", "system:authenticated"]);
        assert_eq!((users[1].token.as_str(), users[1].user.name.as_str()), ("t2", "bob"));
        assert!(parse_token_file("only,two\n").is_err());
    }

    #[test]
    fn a_role_binding_grants_only_its_namespace_rules_and_names() {
        let pf = json!([{"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s1"], "verbs": ["get"]}]);
        let s = store(vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}),
            role("a", "r", pf),
            binding("a", "Role", "r", json!({"kind": "User", "name": "alice"})),
        ]);
        let u = alice();
        assert!(s.authorize(&u, &attrs("create", "pods/portforward", Some("a"), Some("p"))));
        assert!(!s.authorize(&u, &attrs("create", "pods/portforward", Some("b"), Some("p"))), "another namespace");
        assert!(!s.authorize(&u, &attrs("create", "pods", Some("a"), Some("p"))), "the subresource only");
        assert!(s.authorize(&u, &attrs("get", "secrets", Some("a"), Some("s1"))));
        assert!(!s.authorize(&u, &attrs("get", "secrets", Some("a"), Some("s2"))), "resourceNames");
        assert!(!s.authorize(&u, &attrs("list", "secrets", Some("a"), None)), "resourceNames never allow a list");
        let bob = UserInfo { name: "bob".into(), groups: vec!["system:authenticated".into()] };
        assert!(!s.authorize(&bob, &attrs("create", "pods/portforward", Some("a"), Some("p"))));
        let e = rbac_forbidden(&bob, &attrs("create", "pods/portforward", Some("a"), Some("p")));
        assert_eq!(
            e.message,
            "pods \"p\" is forbidden: User \"bob\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"a\""
        );
    }

    #[test]
    fn cluster_bindings_groups_and_wildcards() {
        let s = store(vec![
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "view"},
                "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["get", "list"]}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "v"},
                "roleRef": {"kind": "ClusterRole", "name": "view"}, "subjects": [{"kind": "Group", "name": "dev"}]}),
        ]);
        let u = alice();
        assert!(s.authorize(&u, &attrs("list", "services", None, None)));
        assert!(s.authorize(&u, &attrs("get", "pods", Some("x"), Some("p"))));
        assert!(!s.authorize(&u, &attrs("get", "pods/portforward", Some("x"), Some("p"))), "* is no subresource");
        assert!(!s.authorize(&u, &attrs("delete", "pods", Some("x"), Some("p"))));
        let sa = UserInfo { name: "system:serviceaccount:x:agent".into(), groups: vec![] };
        assert!(!s.authorize(&sa, &attrs("get", "pods", Some("x"), Some("p"))));
    }
}
