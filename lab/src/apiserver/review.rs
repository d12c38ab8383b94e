//! The reviews through which a component asks the API server who a bearer token is and
//! what a user may do, as the manager will (issue 21): `TokenReview`
//! (`authentication.k8s.io/v1`) and `SubjectAccessReview` (`authorization.k8s.io/v1`),
//! and `SelfSubjectAccessReview` (what the caller may do: `kubectl auth can-i`), each
//! `POST`ed to a cluster-scoped collection and answered `201` with the review and its
//! `status`, nothing stored.
//!
//! Kept from the real API server: the request and answer shapes; the caller itself needs
//! RBAC's `create` on `tokenreviews` / `subjectaccessreviews` (what the
//! `system:auth-delegator` ClusterRole grants), anyone may ask about itself; a token review knows the token file's
//! users (name, uid, groups with `system:authenticated`) and echoes the audiences asked
//! for; an access review runs the RBAC authorizer ([`Store::authorize`]) for the
//! `spec.user` and `spec.groups` given (nothing added to them, as the real one adds
//! nothing) and says `allowed`, with a reason naming RBAC when it is. Simplified: no
//! `nonResourceAttributes` (answered not allowed, with an `evaluationError`), no
//! `denied`/`extra`, no audience checks for the token file's users (they have no
//! audience), the stand-in's own special tokens are not reviewable users. ServiceAccount
//! tokens it issued are reviewed as [`tokens`] says (audiences, expiry, bound pod).

use serde_json::{json, Value};

use super::*;

/// Which review a path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Review {
    Token,
    Access,
    /// What the caller itself may do (`kubectl auth can-i`).
    SelfAccess,
}

impl Review {
    /// The review of a path, if it is one (`/apis/GROUP/v1/PLURAL`).
    pub fn of_path(path: &str) -> Option<Review> {
        match path.trim_end_matches('/') {
            "/apis/authentication.k8s.io/v1/tokenreviews" => Some(Review::Token),
            "/apis/authorization.k8s.io/v1/subjectaccessreviews" => Some(Review::Access),
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" => Some(Review::SelfAccess),
            _ => None,
        }
    }

    /// The reviews of API group `group`, as discovery lists them (`create` only).
    pub fn discovery(group: &str) -> Vec<Value> {
        [Review::Token, Review::Access, Review::SelfAccess]
            .into_iter()
            .filter(|r| r.kind().0 == format!("{group}/v1"))
            .map(|r| {
                let (_, kind) = r.kind();
                let plural = format!("{}s", kind.to_lowercase());
                json!({"name": plural, "singularName": kind.to_lowercase(), "namespaced": false, "kind": kind,
                    "verbs": ["create"]})
            })
            .collect()
    }

    /// The RBAC attributes of creating one; none for asking about oneself (what the
    /// default `system:basic-user` binding grants every authenticated user).
    pub fn attributes(self) -> Option<Attributes<'static>> {
        let (group, resource) = match self {
            Review::Token => ("authentication.k8s.io", "tokenreviews"),
            Review::Access => ("authorization.k8s.io", "subjectaccessreviews"),
            Review::SelfAccess => return None,
        };
        Some(Attributes { verb: "create", group, resource: resource.into(), namespace: None, name: None })
    }

    fn kind(self) -> (&'static str, &'static str) {
        match self {
            Review::Token => ("authentication.k8s.io/v1", "TokenReview"),
            Review::Access => ("authorization.k8s.io/v1", "SubjectAccessReview"),
            Review::SelfAccess => ("authorization.k8s.io/v1", "SelfSubjectAccessReview"),
        }
    }

    /// The answer to `body`, asked by `caller`: the review with its `status`.
    pub fn answer(
        self,
        body: &Value,
        caller: &UserInfo,
        users: &[TokenUser],
        issued: &[Issued],
        store: &Store,
    ) -> Result<Value, ApiError> {
        let (api_version, kind) = self.kind();
        if body["apiVersion"] != api_version || body["kind"] != kind {
            return Err(ApiError::bad_request(format!("the body must be a {api_version} {kind}")));
        }
        let mut spec = body["spec"].clone();
        let status = match self {
            Review::Token => token_status(&spec, users, issued, store)?,
            Review::Access => access_status(&spec, store)?,
            Review::SelfAccess => {
                // Asked about the caller, whoever the body names.
                spec["user"] = json!(caller.name);
                spec["groups"] = json!(caller.groups);
                let status = access_status(&spec, store)?;
                spec.as_object_mut().map(|o| (o.remove("user"), o.remove("groups")));
                status
            }
        };
        Ok(json!({"apiVersion": api_version, "kind": kind, "metadata": {"creationTimestamp": null},
            "spec": spec, "status": status}))
    }
}

fn token_status(spec: &Value, users: &[TokenUser], issued: &[Issued], store: &Store) -> Result<Value, ApiError> {
    let token = spec["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad_request("spec.token: Required value"))?;
    if let Some(t) = issued.iter().find(|t| t.token() == token) {
        let audiences: Vec<String> =
            spec["audiences"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect();
        return Ok(t.review(&audiences, store));
    }
    Ok(match users.iter().find(|u| u.token == token) {
        Some(u) => json!({
            "authenticated": true,
            "user": {"username": u.user.name, "uid": u.uid, "groups": u.user.groups},
            "audiences": spec["audiences"].as_array().cloned().unwrap_or_default(),
        }),
        None => json!({"user": {}}),
    })
}

fn access_status(spec: &Value, store: &Store) -> Result<Value, ApiError> {
    let user = spec["user"].as_str().unwrap_or_default();
    let groups: Vec<String> =
        spec["groups"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect();
    if user.is_empty() && groups.is_empty() {
        return Err(ApiError::bad_request(
            "spec.user: Invalid value: \"\": at least one of user or group must be specified",
        ));
    }
    let ra = &spec["resourceAttributes"];
    if !ra.is_object() {
        return Ok(json!({"allowed": false,
            "evaluationError": "the stand-in evaluates resourceAttributes only"}));
    }
    let text = |k: &str| ra[k].as_str().filter(|s| !s.is_empty());
    let resource = match (text("resource"), text("subresource")) {
        (Some(r), Some(s)) => format!("{r}/{s}"),
        (Some(r), None) => r.to_string(),
        (None, _) => return Err(ApiError::bad_request("spec.resourceAttributes.resource: Required value")),
    };
    let a = Attributes {
        verb: text("verb").unwrap_or_default(),
        group: text("group").unwrap_or_default(),
        resource,
        namespace: text("namespace"),
        name: text("name"),
    };
    let who = UserInfo { name: user.to_string(), groups };
    Ok(if store.authorize(&who, &a) {
        json!({"allowed": true, "reason": format!("RBAC: allowed for User \"{user}\"")})
    } else {
        json!({"allowed": false})
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        let mut s = Store::default();
        s.load(vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "intercept", "namespace": "shop"},
                "rules": [{"apiGroups": ["tpvpn.dev"], "resources": ["services/intercept"], "verbs": ["create"]}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "devs", "namespace": "shop"},
                "roleRef": {"kind": "Role", "name": "intercept"}, "subjects": [{"kind": "Group", "name": "developers"}]}),
        ])
        .unwrap();
        s
    }

    fn access(user: &str, groups: &[&str], ns: &str, sub: &str) -> Value {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
            "user": user, "groups": groups,
            "resourceAttributes": {"namespace": ns, "verb": "create", "group": "tpvpn.dev",
                "resource": "services", "subresource": sub, "name": "web"}}})
    }

    #[test]
    fn an_access_review_runs_rbac_for_the_user_and_groups_given() {
        let (s, users) = (store(), Vec::new());
        let review = Review::of_path("/apis/authorization.k8s.io/v1/subjectaccessreviews").unwrap();
        let caller = UserInfo { name: "manager".into(), groups: vec![] };
        let answer = |body: &Value| review.answer(body, &caller, &users, &[], &s).unwrap()["status"].clone();
        assert_eq!(answer(&access("alice", &["developers"], "shop", "intercept"))["allowed"], true);
        assert_eq!(
            answer(&access("alice", &["developers"], "other", "intercept"))["allowed"],
            false,
            "another namespace"
        );
        assert_eq!(answer(&access("alice", &["developers"], "shop", "mount"))["allowed"], false, "another subresource");
        assert_eq!(
            answer(&access("alice", &[], "shop", "intercept"))["allowed"],
            false,
            "no group added by the server"
        );
        assert_eq!(answer(&access("root", &["system:masters"], "x", "y"))["allowed"], true, "the privileged group");
        let mut non_resource = access("alice", &["developers"], "shop", "intercept");
        non_resource["spec"].as_object_mut().unwrap().remove("resourceAttributes");
        assert!(answer(&non_resource)["evaluationError"].is_string());
        assert_eq!(review.answer(&access("", &[], "shop", "x"), &caller, &users, &[], &s).unwrap_err().code, 400);
        assert_eq!(review.answer(&json!({"kind": "TokenReview"}), &caller, &users, &[], &s).unwrap_err().code, 400);
        assert_eq!(review.attributes().unwrap().resource, "subjectaccessreviews");
    }

    #[test]
    fn a_self_review_answers_for_the_caller_whoever_the_body_names() {
        let (s, users) = (store(), Vec::new());
        let review = Review::of_path("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews").unwrap();
        assert_eq!(review.attributes(), None, "anyone may ask about itself");
        let ask = |caller: &UserInfo, body: &mut Value| {
            body["kind"] = json!("SelfSubjectAccessReview");
            review.answer(body, caller, &users, &[], &s).unwrap()
        };
        let alice = UserInfo { name: "alice".into(), groups: vec!["developers".into()] };
        let bob = UserInfo { name: "bob".into(), groups: vec!["other".into()] };
        let answer = ask(&alice, &mut access("", &[], "shop", "intercept"));
        assert_eq!(answer["status"]["allowed"], true);
        assert_eq!(answer["spec"].get("user"), None, "the spec as asked");
        assert_eq!(ask(&bob, &mut access("alice", &["developers"], "shop", "intercept"))["status"]["allowed"], false);
    }

    #[test]
    fn a_token_review_knows_the_token_files_users() {
        let users = parse_token_file("tok-a,alice,u-1,\"developers\"\n").unwrap();
        let review = Review::of_path("/apis/authentication.k8s.io/v1/tokenreviews/").unwrap();
        let body = |token: &str| {
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": ["tpvpn"]}})
        };
        let caller = UserInfo { name: "manager".into(), groups: vec![] };
        let status = review.answer(&body("tok-a"), &caller, &users, &[], &Store::default()).unwrap()["status"].clone();
        assert_eq!(status["authenticated"], true);
        assert_eq!(
            status["user"],
            json!({"username": "alice", "uid": "u-1", "groups": ["developers", "system:authenticated"]})
        );
        assert_eq!(status["audiences"], json!(["tpvpn"]));
        let status = review.answer(&body("nope"), &caller, &users, &[], &Store::default()).unwrap()["status"].clone();
        assert_eq!(status["authenticated"], Value::Null, "not authenticated");
        assert_eq!(review.answer(&body(""), &caller, &users, &[], &Store::default()).unwrap_err().code, 400);
        assert_eq!(Review::of_path("/apis/authentication.k8s.io/v1/tokenreviews/x"), None);
    }
}
