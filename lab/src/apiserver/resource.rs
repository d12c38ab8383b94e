//! The stand-in's resources (a static table) and its `Status` errors.

use serde_json::{json, Value};

/// The resources the stand-in serves (a static table: group, version, kind, plural, scope, short names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Namespaces,
    Nodes,
    Services,
    Pods,
    Secrets,
    ConfigMaps,
    ServiceAccounts,
    ClusterRoles,
    ClusterRoleBindings,
    Roles,
    RoleBindings,
    Deployments,
    DaemonSets,
    ResourceQuotas,
    CertificateSigningRequests,
}

/// The API groups served besides the core group (all at version `v1`).
pub const API_GROUPS: [&str; 5] =
    ["apps", "authentication.k8s.io", "authorization.k8s.io", "certificates.k8s.io", "rbac.authorization.k8s.io"];

impl Resource {
    pub const ALL: [Resource; 15] = [
        Resource::Namespaces,
        Resource::Nodes,
        Resource::Pods,
        Resource::Secrets,
        Resource::ConfigMaps,
        Resource::Services,
        Resource::ServiceAccounts,
        Resource::ClusterRoles,
        Resource::ClusterRoleBindings,
        Resource::Roles,
        Resource::RoleBindings,
        Resource::Deployments,
        Resource::DaemonSets,
        Resource::ResourceQuotas,
        Resource::CertificateSigningRequests,
    ];

    /// (group, kind, plural, namespaced, short names); the version is always `v1`.
    pub(super) fn info(self) -> (&'static str, &'static str, &'static str, bool, &'static [&'static str]) {
        const RBAC: &str = "rbac.authorization.k8s.io";
        match self {
            Resource::Namespaces => ("", "Namespace", "namespaces", false, &["ns"]),
            Resource::Nodes => ("", "Node", "nodes", false, &["no"]),
            Resource::Services => ("", "Service", "services", true, &["svc"]),
            Resource::Pods => ("", "Pod", "pods", true, &["po"]),
            Resource::Secrets => ("", "Secret", "secrets", true, &[]),
            Resource::ConfigMaps => ("", "ConfigMap", "configmaps", true, &["cm"]),
            Resource::ServiceAccounts => ("", "ServiceAccount", "serviceaccounts", true, &["sa"]),
            Resource::ClusterRoles => (RBAC, "ClusterRole", "clusterroles", false, &[]),
            Resource::ClusterRoleBindings => (RBAC, "ClusterRoleBinding", "clusterrolebindings", false, &[]),
            Resource::Roles => (RBAC, "Role", "roles", true, &[]),
            Resource::RoleBindings => (RBAC, "RoleBinding", "rolebindings", true, &[]),
            Resource::Deployments => ("apps", "Deployment", "deployments", true, &["deploy"]),
            Resource::DaemonSets => ("apps", "DaemonSet", "daemonsets", true, &["ds"]),
            Resource::ResourceQuotas => ("", "ResourceQuota", "resourcequotas", true, &["quota"]),
            Resource::CertificateSigningRequests => {
                ("certificates.k8s.io", "CertificateSigningRequest", "certificatesigningrequests", false, &["csr"])
            }
        }
    }

    /// URL name (`services`).
    pub fn plural(self) -> &'static str {
        self.info().2
    }
    /// Object kind (`Service`).
    pub fn kind(self) -> &'static str {
        self.info().1
    }
    /// API group (`""` for core, `apps`, ...).
    pub fn group(self) -> &'static str {
        self.info().0
    }
    /// API version (always `v1`).
    pub fn version(self) -> &'static str {
        "v1"
    }
    /// The objects' `apiVersion` (`v1`, `apps/v1`).
    pub fn api_version(self) -> String {
        match self.group() {
            "" => self.version().to_string(),
            g => format!("{g}/{}", self.version()),
        }
    }
    /// The name in error messages (`services`, `deployments.apps`).
    pub fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            g => format!("{}.{g}", self.plural()),
        }
    }
    pub fn namespaced(self) -> bool {
        self.info().3
    }
    pub(super) fn short_names(self) -> &'static [&'static str] {
        self.info().4
    }
    /// A core-group resource by its URL name.
    pub fn from_plural(s: &str) -> Option<Resource> {
        Resource::lookup("", "v1", s)
    }
    /// A resource by group, version and URL name.
    pub fn lookup(group: &str, version: &str, plural: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.group() == group && r.version() == version && r.plural() == plural)
    }
    /// A resource by kind (kinds are unique in the table).
    pub fn from_kind(s: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.kind() == s)
    }
    /// The resources of one group version.
    pub(super) fn of_group<'a>(group: &'a str, version: &'a str) -> impl Iterator<Item = Resource> + 'a {
        Resource::ALL.into_iter().filter(move |r| r.group() == group && r.version() == version)
    }
}

/// An API error, rendered as a Kubernetes `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub(super) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into(), details: None }
    }
    pub(super) fn with_details(mut self, res: Resource, name: &str) -> ApiError {
        self.details = Some(match res.group() {
            "" => json!({"name": name, "kind": res.plural()}),
            g => json!({"name": name, "group": g, "kind": res.plural()}),
        });
        self
    }
    pub fn not_found(res: Resource, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", res.qualified())).with_details(res, name)
    }
    pub fn already_exists(res: Resource, name: &str) -> ApiError {
        ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", res.qualified()))
            .with_details(res, name)
    }
    pub fn conflict(res: Resource, name: &str) -> ApiError {
        let msg = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            res.qualified()
        );
        ApiError::new(409, "Conflict", msg).with_details(res, name)
    }
    pub fn invalid(res: Resource, name: &str, what: &str) -> ApiError {
        let kind = match res.group() {
            "" => res.kind().to_string(),
            g => format!("{}.{g}", res.kind()),
        };
        ApiError::new(422, "Invalid", format!("{kind} \"{name}\" is invalid: {what}")).with_details(res, name)
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }
    pub fn expired(requested: u64, oldest: u64) -> ApiError {
        ApiError::new(410, "Expired", format!("too old resource version: {requested} ({oldest})"))
    }
    pub(super) fn unknown_path() -> ApiError {
        ApiError {
            details: Some(json!({})),
            ..ApiError::new(404, "NotFound", "the server could not find the requested resource")
        }
    }
    pub(super) fn method_not_allowed() -> ApiError {
        ApiError {
            details: Some(json!({})),
            ..ApiError::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        }
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}
