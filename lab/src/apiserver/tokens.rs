//! ServiceAccount tokens: the `TokenRequest` subresource
//! (`POST /api/v1/namespaces/NS/serviceaccounts/NAME/token`, what the kubelet calls to fill
//! a projected `serviceAccountToken` volume) and what a `TokenReview` says of the tokens
//! it issued ([`Issued::review`]).
//!
//! Kept from the real API server: the request and answer shapes; the ServiceAccount must
//! exist (404); `expirationSeconds` at least 600 (default 3600); `audiences` default to
//! the API server's own (`https://kubernetes.default.svc`); a token bound to a Pod
//! (`boundObjectRef`, which must exist, with the same `uid` when one is given) is valid
//! only while that Pod exists with that uid, and carries the Pod's and its node's names
//! and uids as the user's `extra` (`authentication.kubernetes.io/pod-name`, `pod-uid`,
//! `node-name`, `node-uid`, and `credential-id` `JTI=…`), as API servers do since 1.30; a
//! review with `audiences` authenticates a token only for one of them and answers with
//! those in common; an expired token is not authenticated. The user is
//! `system:serviceaccount:NS:NAME` with the ServiceAccount's uid and groups
//! `system:serviceaccounts`, `system:serviceaccounts:NS`, `system:authenticated`.
//! Simplified: tokens look like JWTs but are checked by looking them up in the table of
//! issued tokens (no signature, no OIDC discovery), the stand-in does not take them as
//! bearer tokens, and a Secret-bound token is not supported.

use std::time::{Duration, SystemTime};

use base64::Engine;
use serde_json::{json, Value};

use super::*;

/// The audience of the API server itself.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc";

/// The `TokenRequest` path's namespace and ServiceAccount, if it is one.
pub fn token_request_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once("/serviceaccounts/")?;
    let name = rest.strip_suffix("/token")?;
    (!ns.is_empty() && !name.is_empty() && !ns.contains('/') && !name.contains('/')).then_some((ns, name))
}

/// One issued token.
#[derive(Debug, Clone)]
pub struct Issued {
    token: String,
    namespace: String,
    account: String,
    account_uid: String,
    audiences: Vec<String>,
    expires: SystemTime,
    jti: String,
    /// The Pod it is bound to: name, uid, node name, node uid.
    pod: Option<(String, String, String, String)>,
}

/// Answers a `TokenRequest` for ServiceAccount `namespace/name`: the request with
/// `status.token`, and the token to keep.
pub fn request(namespace: &str, name: &str, body: &Value, store: &Store) -> Result<(Value, Issued), ApiError> {
    if body["kind"] != "TokenRequest" {
        return Err(ApiError::bad_request("the body must be an authentication.k8s.io/v1 TokenRequest"));
    }
    let sa = store.get(Resource::ServiceAccounts, Some(namespace), name)?;
    let spec = &body["spec"];
    let seconds = spec["expirationSeconds"].as_u64().unwrap_or(3600);
    if seconds < 600 {
        return Err(ApiError::bad_request(
            "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
        ));
    }
    let mut audiences: Vec<String> =
        spec["audiences"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect();
    if audiences.is_empty() {
        audiences.push(API_AUDIENCE.into());
    }
    let bound = &spec["boundObjectRef"];
    let pod = if bound.is_object() {
        if bound["kind"] != "Pod" {
            return Err(ApiError::bad_request("spec.boundObjectRef.kind: the stand-in binds tokens to Pods only"));
        }
        let pod_name = bound["name"].as_str().unwrap_or_default();
        let pod = store.get(Resource::Pods, Some(namespace), pod_name)?;
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default().to_string();
        if bound["uid"].as_str().is_some_and(|u| !u.is_empty() && u != uid) {
            return Err(ApiError::new(409, "Conflict", format!("the UID in the bound object reference ({}) does not match the UID in record ({uid}). The object might have been deleted and then recreated", bound["uid"].as_str().unwrap_or_default())));
        }
        let node = pod["spec"]["nodeName"].as_str().unwrap_or_default().to_string();
        let node_uid = store
            .get(Resource::Nodes, None, &node)
            .ok()
            .and_then(|n| n["metadata"]["uid"].as_str().map(str::to_string))
            .unwrap_or_default();
        Some((pod_name.to_string(), uid, node, node_uid))
    } else {
        None
    };
    let jti = new_uid();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let claims = json!({"aud": audiences, "sub": format!("system:serviceaccount:{namespace}:{name}"), "jti": jti});
    let mut signature = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut signature)
        .map_err(|_| ApiError::new(500, "InternalError", "no randomness"))?;
    let token = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","kid":"tpvpn-lab-standin"}"#),
        b64(claims.to_string().as_bytes()),
        b64(&signature)
    );
    let expires = SystemTime::now() + Duration::from_secs(seconds);
    let expiration = {
        let secs = expires.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let t = i64::try_from(secs).ok().and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok());
        t.unwrap_or_default().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    };
    let mut answer = body.clone();
    answer["apiVersion"] = json!("authentication.k8s.io/v1");
    answer["spec"]["audiences"] = json!(audiences);
    answer["spec"]["expirationSeconds"] = json!(seconds);
    answer["status"] = json!({"token": token, "expirationTimestamp": expiration});
    let issued = Issued {
        token,
        namespace: namespace.into(),
        account: name.into(),
        account_uid: sa["metadata"]["uid"].as_str().unwrap_or_default().into(),
        audiences,
        expires,
        jti,
        pod,
    };
    Ok((answer, issued))
}

impl Issued {
    /// What a `TokenReview` of this token for `audiences` (empty: the API server's) says.
    pub fn review(&self, audiences: &[String], store: &Store) -> Value {
        let asked: Vec<String> = if audiences.is_empty() { vec![API_AUDIENCE.into()] } else { audiences.to_vec() };
        let common: Vec<&String> = asked.iter().filter(|a| self.audiences.contains(a)).collect();
        let unauthenticated = |error: String| json!({"user": {}, "error": error});
        if SystemTime::now() >= self.expires {
            return unauthenticated("[invalid bearer token, service account token has expired]".into());
        }
        if common.is_empty() {
            return unauthenticated(format!(
                "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                self.audiences, asked
            ));
        }
        let mut extra = serde_json::Map::new();
        extra.insert("authentication.kubernetes.io/credential-id".into(), json!([format!("JTI={}", self.jti)]));
        if let Some((pod, uid, node, node_uid)) = &self.pod {
            let live = store.get(Resource::Pods, Some(&self.namespace), pod).ok();
            if live.as_ref().and_then(|p| p["metadata"]["uid"].as_str()) != Some(uid.as_str()) {
                return unauthenticated(format!(
                    "[invalid bearer token, pod \"{pod}\" not found or recreated: the token bound to it is invalid]"
                ));
            }
            extra.insert("authentication.kubernetes.io/pod-name".into(), json!([pod]));
            extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
            if !node.is_empty() {
                extra.insert("authentication.kubernetes.io/node-name".into(), json!([node]));
                extra.insert("authentication.kubernetes.io/node-uid".into(), json!([node_uid]));
            }
        }
        let ns = &self.namespace;
        json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{ns}:{}", self.account),
                "uid": self.account_uid,
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                "extra": extra,
            },
            "audiences": common,
        })
    }

    pub fn token(&self) -> &str {
        &self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        let mut s = Store::default();
        s.load(vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "agents"}}),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "agent", "namespace": "agents"}}),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-x", "namespace": "agents"},
                "spec": {"nodeName": "n1", "containers": [{"name": "a", "image": "a"}]}}),
        ])
        .unwrap();
        s
    }

    fn req(audiences: &[&str], pod: Option<&str>) -> Value {
        let mut spec = json!({"audiences": audiences, "expirationSeconds": 3600});
        if let Some(p) = pod {
            spec["boundObjectRef"] = json!({"kind": "Pod", "apiVersion": "v1", "name": p});
        }
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
    }

    #[test]
    fn paths() {
        assert_eq!(token_request_path("/api/v1/namespaces/a/serviceaccounts/b/token"), Some(("a", "b")));
        assert_eq!(token_request_path("/api/v1/namespaces/a/serviceaccounts/b"), None);
        assert_eq!(token_request_path("/api/v1/namespaces/a/serviceaccounts//token"), None);
        assert_eq!(token_request_path("/api/v1/namespaces/a/b/serviceaccounts/c/token"), None);
    }

    #[test]
    fn a_pod_bound_token_names_its_account_pod_and_node_for_its_audience_only() {
        let mut s = store();
        let (answer, issued) = request("agents", "agent", &req(&["tpvpn.dev/manager"], Some("agent-x")), &s).unwrap();
        assert_eq!(answer["status"]["token"], issued.token());
        assert_eq!(issued.token().split('.').count(), 3, "shaped like a JWT");
        let r = issued.review(&["tpvpn.dev/manager".into()], &s);
        assert_eq!(r["authenticated"], true, "{r}");
        assert_eq!(r["user"]["username"], "system:serviceaccount:agents:agent");
        assert_eq!(r["user"]["extra"]["authentication.kubernetes.io/node-name"], json!(["n1"]));
        assert_eq!(r["user"]["extra"]["authentication.kubernetes.io/pod-name"], json!(["agent-x"]));
        assert_eq!(r["audiences"], json!(["tpvpn.dev/manager"]));
        let r = issued.review(&[], &s);
        assert!(r["authenticated"].is_null(), "not for the API server itself: {r}");
        assert!(r["error"].as_str().unwrap().contains("is invalid for the target audiences"), "{r}");
        // The pod deleted (or recreated with a new uid): the token is dead.
        s.delete(Resource::Pods, Some("agents"), "agent-x").unwrap();
        let r = issued.review(&["tpvpn.dev/manager".into()], &s);
        assert!(r["authenticated"].is_null(), "{r}");
    }

    #[test]
    fn requests_are_checked() {
        let s = store();
        assert_eq!(request("agents", "nobody", &req(&[], None), &s).unwrap_err().code, 404);
        assert_eq!(request("agents", "agent", &req(&[], Some("gone")), &s).unwrap_err().code, 404);
        let mut short = req(&[], None);
        short["spec"]["expirationSeconds"] = json!(60);
        assert_eq!(request("agents", "agent", &short, &s).unwrap_err().code, 400);
        let (_, issued) = request("agents", "agent", &req(&[], None), &s).unwrap();
        let r = issued.review(&[], &s);
        assert_eq!(r["audiences"], json!([API_AUDIENCE]), "the API server's audience by default: {r}");
        assert!(r["user"]["extra"].get("authentication.kubernetes.io/node-name").is_none(), "unbound: no node");
    }
}
