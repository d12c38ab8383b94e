//! What an identity may do: `SubjectAccessReview`s of the virtual resources of API group
//! [`GROUP`], replaying the user, uid, groups and extra the API server stamped on the
//! identity's certificate request. A review that cannot be made denies (fail closed) and
//! says "authorization unavailable", distinct from "not allowed". Every decision is one
//! log line (user, verb, resource, namespace, name, allowed).

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::api::PostParams;
use tracing::info;

use super::signer::Identity;

/// The API group of tpvpn's virtual resources.
pub const GROUP: &str = "tpvpn.dev";

/// One permission: `verb` on `resource` (`resource/subresource`), in `namespace` (none:
/// cluster scope), of the object `name` (none: any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission<'a> {
    pub verb: &'a str,
    pub resource: &'a str,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

/// `create` `connections`: may connect at all (checked when signing a certificate).
pub const CONNECT: Permission<'static> =
    Permission { verb: "create", resource: "connections", namespace: None, name: None };

impl std::fmt::Display for Permission<'_> {
    /// `create connections.tpvpn.dev` (`… "web" in namespace "shop"`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}.{GROUP}", self.verb, self.resource)?;
        if let Some(name) = self.name {
            write!(f, " \"{name}\"")?;
        }
        if let Some(ns) = self.namespace {
            write!(f, " in namespace \"{ns}\"")?;
        }
        Ok(())
    }
}

/// Why a permission is not granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The API server says no.
    #[error("user \"{user}\" may not {permission}")]
    NotAllowed { user: String, permission: String },
    /// The review could not be made: not allowed, for now.
    #[error("authorization unavailable: {0}")]
    Unavailable(String),
}

/// The review asking whether `who` has `permission`.
pub fn review(who: &Identity, permission: &Permission<'_>) -> SubjectAccessReview {
    let (resource, subresource) = match permission.resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (permission.resource, None),
    };
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(who.username.clone()),
            uid: Some(who.uid.clone()).filter(|u| !u.is_empty()),
            groups: Some(who.groups.clone()),
            extra: Some(who.extra.clone()).filter(|e| !e.is_empty()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(resource.into()),
                subresource,
                verb: Some(permission.verb.into()),
                namespace: permission.namespace.map(str::to_string),
                name: permission.name.map(str::to_string),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    }
}

/// Asks the API server what identities may do.
#[derive(Clone)]
pub struct Access {
    client: kube::Client,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Access")
    }
}

impl Access {
    pub fn new(client: kube::Client) -> Access {
        Access { client }
    }

    /// Whether `who` has `permission`.
    pub async fn check(&self, who: &Identity, permission: &Permission<'_>) -> Result<(), Denied> {
        check(&self.client, who, permission).await
    }
}

/// Whether `who` has `permission`, asked of the API server.
async fn check(client: &kube::Client, who: &Identity, permission: &Permission<'_>) -> Result<(), Denied> {
    let api: kube::Api<SubjectAccessReview> = kube::Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review(who, permission)).await;
    let allowed = match &answer {
        Ok(r) => r.status.as_ref().is_some_and(|s| s.allowed && s.denied != Some(true)),
        Err(_) => false,
    };
    info!(
        user = %who.username,
        verb = permission.verb,
        resource = permission.resource,
        namespace = permission.namespace.unwrap_or_default(),
        name = permission.name.unwrap_or_default(),
        allowed,
        "access review"
    );
    match answer {
        Err(e) => Err(Denied::Unavailable(format!("SubjectAccessReview: {e}"))),
        Ok(_) if allowed => Ok(()),
        Ok(_) => Err(Denied::NotAllowed { user: who.username.clone(), permission: permission.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_review_replays_the_whole_identity_and_splits_subresources() {
        let who = Identity {
            username: "alice".into(),
            uid: "u-1".into(),
            groups: vec!["dev".into()],
            extra: [("scopes".to_string(), vec!["a".to_string()])].into_iter().collect(),
        };
        let env =
            Permission { verb: "get", resource: "intercepts/environment", namespace: Some("shop"), name: Some("web") };
        let spec = review(&who, &env).spec;
        assert_eq!((spec.user.as_deref(), spec.uid.as_deref()), (Some("alice"), Some("u-1")));
        assert_eq!(spec.groups, Some(vec!["dev".to_string()]));
        assert_eq!(spec.extra, Some(who.extra.clone()));
        let ra = spec.resource_attributes.unwrap();
        assert_eq!(
            (ra.group.as_deref(), ra.resource.as_deref(), ra.subresource.as_deref()),
            (Some("tpvpn.dev"), Some("intercepts"), Some("environment"))
        );
        assert_eq!((ra.namespace.as_deref(), ra.name.as_deref()), (Some("shop"), Some("web")));
        assert_eq!(env.to_string(), "get intercepts/environment.tpvpn.dev \"web\" in namespace \"shop\"");
        assert_eq!(CONNECT.to_string(), "create connections.tpvpn.dev");
        let ra = review(&who, &CONNECT).spec.resource_attributes.unwrap();
        assert_eq!((ra.subresource, ra.namespace), (None, None));
    }
}
