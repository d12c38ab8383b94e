//! `CertificateSigningRequest`s (`certificates.k8s.io/v1`, cluster-scoped): what the
//! API server itself does with them, which is what makes them a source of identity.
//!
//! Kept from the real API server: on create the requester's authenticated identity is
//! stamped into `spec.username`, `spec.uid`, `spec.groups` and `spec.extra`, whatever the
//! body said, and the status is cleared; `spec.request` (a PEM `CERTIFICATE REQUEST`,
//! base64), `spec.signerName` and `spec.usages` are required, `expirationSeconds` at
//! least 600; the spec never changes after create (an update keeps it, and the status);
//! the `approval` subresource changes only `status.conditions` (`Approved` or `Denied`,
//! never both) and needs RBAC's `update` on `certificatesigningrequests/approval` and
//! `approve` on `signers` (`certificates.k8s.io`) named by the signer or its `domain/*`;
//! the `status` subresource changes the rest of the status (`certificate`, a `Failed`
//! condition) and needs `update` on `certificatesigningrequests/status` and `sign` on
//! the signer; a certificate only on an approved request, and never replaced once set.
//! Simplified: the request's PEM is not parsed (the signer checks it), no
//! garbage collection of old requests, no `certificates.k8s.io/v1beta1`.

use serde_json::{json, Value};

use super::*;

/// Who made a request, as the API server stamps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
}

/// A CSR about to be created: checked, and stamped with its requester.
pub fn stamp(obj: &mut Value, who: &Requester) -> Result<(), ApiError> {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let res = Resource::CertificateSigningRequests;
    let spec = obj
        .get_mut("spec")
        .filter(|s| s.is_object())
        .ok_or_else(|| ApiError::invalid(res, &name, "spec: Required value"))?;
    let request = spec["request"].as_str().unwrap_or_default();
    let pem = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, request).unwrap_or_default();
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE REQUEST-----") {
        return Err(ApiError::invalid(
            res,
            &name,
            "spec.request: Invalid value: []byte{...}: PEM block type must be CERTIFICATE REQUEST",
        ));
    }
    if spec["signerName"].as_str().is_none_or(|s| !s.contains('/')) {
        return Err(ApiError::invalid(res, &name, "spec.signerName: Required value"));
    }
    if spec["usages"].as_array().is_none_or(Vec::is_empty) {
        return Err(ApiError::invalid(res, &name, "spec.usages: Required value"));
    }
    if spec["expirationSeconds"].as_u64().is_some_and(|s| s < 600) {
        return Err(ApiError::invalid(
            res,
            &name,
            "spec.expirationSeconds: Invalid value: may not specify a duration less than 600 seconds (10 minutes)",
        ));
    }
    spec["username"] = json!(who.username);
    spec["uid"] = json!(who.uid);
    spec["groups"] = json!(who.groups);
    if let Some(map) = spec.as_object_mut() {
        map.remove("extra");
    }
    if let Some(map) = obj.as_object_mut() {
        map.remove("status");
    }
    Ok(())
}

/// An update of the object itself (PUT or PATCH): its metadata may change, its spec and
/// status never do.
pub fn keep_spec_and_status(new: &mut Value, old: &Value) {
    new["spec"] = old["spec"].clone();
    new["status"] = old["status"].clone();
}

/// Which subresource an update is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    Approval,
    Status,
}

/// The names a signer permission may be granted under: the signer's, and its domain's
/// wildcard (`tpvpn.dev/client`, `tpvpn.dev/*`).
pub fn signer_names(signer: &str) -> [String; 2] {
    let domain = signer.split_once('/').map_or(signer, |(d, _)| d);
    [signer.to_string(), format!("{domain}/*")]
}

impl Sub {
    pub fn parse(s: &str) -> Option<Sub> {
        match s {
            "approval" => Some(Sub::Approval),
            "status" => Some(Sub::Status),
            _ => None,
        }
    }

    /// What RBAC must allow for an update of it: `update` on this subresource, and this
    /// verb on `signers` named by the request's signer or by its `domain/*`
    /// ([`signer_names`]).
    pub fn rbac(self) -> (&'static str, &'static str) {
        match self {
            Sub::Approval => ("certificatesigningrequests/approval", "approve"),
            Sub::Status => ("certificatesigningrequests/status", "sign"),
        }
    }

    /// `old` with the part of `body` this subresource may change.
    pub fn apply(self, old: &Value, body: &Value) -> Result<Value, ApiError> {
        let name = old["metadata"]["name"].as_str().unwrap_or_default();
        let res = Resource::CertificateSigningRequests;
        let mut new = old.clone();
        let types = |v: &Value| -> Vec<String> {
            v["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["type"].as_str().map(str::to_string))
                .collect()
        };
        match self {
            Sub::Approval => {
                let t = types(body);
                if t.iter().any(|t| t == "Approved") && t.iter().any(|t| t == "Denied") {
                    return Err(ApiError::invalid(res, name, "status.conditions: Invalid value: \"Approved\": Approved and Denied conditions are mutually exclusive"));
                }
                let was = types(old);
                if (was.iter().any(|t| t == "Approved") && t.iter().any(|t| t == "Denied"))
                    || (was.iter().any(|t| t == "Denied") && t.iter().any(|t| t == "Approved"))
                {
                    return Err(ApiError::invalid(
                        res,
                        name,
                        "status.conditions: Forbidden: updates may not change an Approved or Denied decision",
                    ));
                }
                let mut conditions = conditions(old, |t| t == "Failed");
                for mut c in self::conditions(body, |t| t == "Approved" || t == "Denied") {
                    if c["lastUpdateTime"].is_null() {
                        c["lastUpdateTime"] = json!(rfc3339_now());
                    }
                    conditions.push(c);
                }
                new["status"]["conditions"] = json!(conditions);
            }
            Sub::Status => {
                let certificate = body["status"]["certificate"].as_str().unwrap_or_default();
                let had = old["status"]["certificate"].as_str().unwrap_or_default();
                if !had.is_empty() && certificate != had {
                    return Err(ApiError::invalid(
                        res,
                        name,
                        "status.certificate: Forbidden: updates may not modify existing certificate content",
                    ));
                }
                if !certificate.is_empty() {
                    let approved = types(old).iter().any(|t| t == "Approved");
                    if !approved || types(old).iter().any(|t| t == "Failed") {
                        return Err(ApiError::invalid(res, name, "status.certificate: Forbidden: certificate can only be set if the Approved condition is present and Failed is not"));
                    }
                    new["status"]["certificate"] = json!(certificate);
                }
                let failed = conditions(body, |t| t == "Failed");
                if !failed.is_empty() {
                    let mut conditions = conditions(old, |t| t != "Failed");
                    conditions.extend(failed);
                    new["status"]["conditions"] = json!(conditions);
                }
            }
        }
        Ok(new)
    }
}

/// The conditions of `obj`'s status whose type `keep` says.
fn conditions(obj: &Value, keep: impl Fn(&str) -> bool) -> Vec<Value> {
    let all = obj["status"]["conditions"].as_array().into_iter().flatten();
    all.filter(|c| keep(c["type"].as_str().unwrap_or_default())).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(body_identity: bool) -> Value {
        let pem = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n";
        let request = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pem);
        let mut spec = json!({"request": request, "signerName": "tpvpn.dev/client", "usages": ["digital signature", "client auth"], "expirationSeconds": 3600});
        if body_identity {
            spec["username"] = json!("root");
            spec["groups"] = json!(["system:masters"]);
            spec["extra"] = json!({"x": ["y"]});
        }
        json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest", "metadata": {"name": "c1"}, "spec": spec,
            "status": {"certificate": "Zm9yZ2Vk"}})
    }

    #[test]
    fn the_requester_is_stamped_whatever_the_body_says() {
        let mut obj = csr(true);
        let alice = Requester {
            username: "alice".into(),
            uid: "u-1".into(),
            groups: vec!["dev".into(), "system:authenticated".into()],
        };
        stamp(&mut obj, &alice).unwrap();
        assert_eq!(obj["spec"]["username"], "alice");
        assert_eq!(obj["spec"]["uid"], "u-1");
        assert_eq!(obj["spec"]["groups"], json!(["dev", "system:authenticated"]));
        assert!(obj["spec"].get("extra").is_none());
        assert!(obj.get("status").is_none(), "a requester cannot bring its own certificate");
        let mut bad = csr(false);
        bad["spec"]["request"] = json!("bm90IGEgY3Ny");
        assert_eq!(stamp(&mut bad, &alice).unwrap_err().code, 422);
        let mut short = csr(false);
        short["spec"]["expirationSeconds"] = json!(60);
        assert_eq!(stamp(&mut short, &alice).unwrap_err().code, 422);
    }

    #[test]
    fn approval_then_certificate_and_never_another() {
        let old = csr(false);
        let mut old = old;
        old.as_object_mut().unwrap().remove("status");
        let cert = json!({"status": {"certificate": "Y2VydA=="}});
        assert_eq!(Sub::Status.apply(&old, &cert).unwrap_err().code, 422, "not approved yet");
        let approve = json!({"status": {"conditions": [{"type": "Approved", "status": "True", "reason": "r"}]}});
        let approved = Sub::Approval.apply(&old, &approve).unwrap();
        assert_eq!(approved["status"]["conditions"][0]["type"], "Approved");
        let deny = json!({"status": {"conditions": [{"type": "Denied", "status": "True"}]}});
        assert_eq!(Sub::Approval.apply(&approved, &deny).unwrap_err().code, 422, "a decision stands");
        let signed = Sub::Status.apply(&approved, &cert).unwrap();
        assert_eq!(signed["status"]["certificate"], "Y2VydA==");
        let other = json!({"status": {"certificate": "b3RoZXI="}});
        assert_eq!(Sub::Status.apply(&signed, &other).unwrap_err().code, 422);
        // The approval subresource cannot set a certificate, nor the status one approve.
        let sneaky = json!({"status": {"certificate": "eA==", "conditions": [{"type": "Approved", "status": "True"}]}});
        assert!(Sub::Approval.apply(&old, &sneaky).unwrap()["status"]["certificate"].is_null());
        assert!(Sub::Status.apply(&old, &sneaky).is_err());
    }

    #[test]
    fn signer_checks_name_the_signer_and_its_domain() {
        assert_eq!(Sub::Approval.rbac(), ("certificatesigningrequests/approval", "approve"));
        assert_eq!(Sub::Status.rbac(), ("certificatesigningrequests/status", "sign"));
        assert_eq!(signer_names("tpvpn.dev/client"), ["tpvpn.dev/client".to_string(), "tpvpn.dev/*".to_string()]);
    }
}
