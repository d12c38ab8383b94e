//! The `tpvpn.dev/client` signer (issue 21's client identities), sans-IO: whether a
//! laptop's CertificateSigningRequest may be signed ([`decide`]), the certificate it gets
//! ([`Ca::issue`]), and the identity a presented certificate carries ([`identity_of`]).
//! [`super::csr`] applies the decisions to the requests the API server holds.
//!
//! Only what the API server stamped on the request is believed (`spec.username`, `uid`,
//! `groups`, `extra`): the request's own subject and extensions are ignored, its public
//! key is all that is taken from it. The certificate carries the user as its CN and the
//! whole identity (uid, groups, extra) in an extension of tpvpn's (`IDENTITY_OID`, a
//! JSON UTF8String): only the manager reads it, for SubjectAccessReviews.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

/// The signer laptops ask for.
pub const SIGNER_NAME: &str = "tpvpn.dev/client";
/// A request older than this is not signed (its requester gave up, or it was replayed).
pub const MAX_AGE: Duration = Duration::from_secs(10 * 60);
/// Certificates live this long unless the request asks for less (never under 10 minutes).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The identity extension's OID: 2.25 (ITU-T X.667's arc for UUIDs) followed by the two
/// 64-bit halves of tpvpn's UUID as two arcs (X.667 makes the UUID one 128-bit arc, which
/// rcgen cannot write); non-critical, and read by tpvpn alone.
const IDENTITY_OID: [u64; 2] = [2, 25];
const IDENTITY_UUID: u128 = 0x7470_766e_2d69_6465_6e74_6974_7900_0001;

/// Who a certificate is for, as the API server authenticated the requester.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Another signer's, or finished (denied, failed or signed): leave it alone.
    NotOurs,
    /// Deny it, saying why.
    Deny(String),
    /// It may be signed if the requester may connect (the caller asks the API server:
    /// `create` on `connections.tpvpn.dev`); the certificate then lives `lifetime`.
    /// `approved`: approved already (by this manager before a restart, or by an admin),
    /// so only the signing is left.
    Review { identity: Identity, lifetime: Duration, approved: bool },
}

/// The decision on `csr` at `now`, from what the API server stamped on it.
pub fn decide(csr: &CertificateSigningRequest, now: SystemTime) -> Decision {
    let spec = &csr.spec;
    if spec.signer_name != SIGNER_NAME {
        return Decision::NotOurs;
    }
    let status = csr.status.as_ref();
    let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    let has = |t: &str| conditions.iter().any(|c| c.type_ == t && c.status == "True");
    if has("Denied") || has("Failed") || status.and_then(|s| s.certificate.as_ref()).is_some() {
        return Decision::NotOurs;
    }
    let approved = has("Approved");
    let usages = spec.usages.clone().unwrap_or_default();
    if !usages.iter().any(|u| u == "client auth")
        || usages.iter().any(|u| u != "client auth" && u != "digital signature")
    {
        return Decision::Deny("usages must be \"client auth\" (and \"digital signature\")".into());
    }
    let username = spec.username.clone().unwrap_or_default();
    let groups = spec.groups.clone().unwrap_or_default();
    if username.is_empty() || username == "system:anonymous" || groups.iter().any(|g| g == "system:unauthenticated") {
        return Decision::Deny("the requester is not authenticated".into());
    }
    let created = csr.metadata.creation_timestamp.as_ref().map(|t| SystemTime::from(t.0));
    if created.is_none_or(|c| now.duration_since(c).unwrap_or_default() > MAX_AGE) {
        return Decision::Deny(format!(
            "the request is older than {} minutes: tpvpn up makes a new one",
            MAX_AGE.as_secs() / 60
        ));
    }
    let pem = String::from_utf8_lossy(&spec.request.0).into_owned();
    if let Err(e) = CertificateSigningRequestParams::from_pem(&pem) {
        return Decision::Deny(format!("spec.request is not a PKCS#10 request signed by its own key: {e}"));
    }
    let asked = spec.expiration_seconds.map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)));
    let lifetime = asked.unwrap_or(DEFAULT_LIFETIME).clamp(MAX_AGE, MAX_LIFETIME);
    let identity = Identity {
        username,
        uid: spec.uid.clone().unwrap_or_default(),
        groups,
        extra: spec.extra.clone().unwrap_or_default(),
    };
    Decision::Review { identity, lifetime, approved }
}

/// The client CA: signs laptops' certificates; the manager trusts only it for them.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Ca {
    /// A new CA (its key never leaves the manager but in Secret `tpvpn-client-ca`).
    pub fn generate(now: SystemTime) -> Result<Ca, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "tpvpn client CA");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 86_400)).into();
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// The CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("the client CA key: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| format!("the client CA certificate: {e}"))?;
        Ok(Ca { issuer, cert_pem: cert_pem.to_string() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's key (PEM), for its Secret.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The client certificate for `request_pem`'s key: `identity`, valid from a minute
    /// before `now` for `lifetime`, for client authentication only.
    pub fn issue(
        &self,
        request_pem: &str,
        identity: &Identity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<String, String> {
        let request = CertificateSigningRequestParams::from_pem(request_pem).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, identity.username.as_str());
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + lifetime).into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let extra =
            serde_json::json!({"uid": identity.uid, "groups": identity.groups, "extra": identity.extra}).to_string();
        params.custom_extensions = vec![CustomExtension::from_oid_content(&identity_oid(), der_utf8(&extra))];
        let cert = params.signed_by(&request.public_key, &self.issuer).map_err(|e| e.to_string())?;
        Ok(cert.pem())
    }
}

fn identity_oid() -> Vec<u64> {
    let hi = (IDENTITY_UUID >> 64) as u64;
    let lo = IDENTITY_UUID as u64;
    [IDENTITY_OID[0], IDENTITY_OID[1], hi, lo].to_vec()
}

/// `s` as a DER UTF8String.
fn der_utf8(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = vec![0x0c];
    match b.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n <= 0xff => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(b);
    out
}

/// A certificate's `subjectPublicKey` and `notAfter`.
pub fn key_and_expiry(der: &[u8]) -> Option<(Vec<u8>, SystemTime)> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some((cert.public_key().subject_public_key.data.to_vec(), SystemTime::UNIX_EPOCH + Duration::from_secs(secs)))
}

/// The identity a client certificate (DER) carries, if it is one of tpvpn's.
pub fn identity_of(der: &[u8]) -> Option<Identity> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let subject = cert.subject();
    let username = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let oid = x509_parser::der_parser::oid::Oid::from(&identity_oid()).ok()?;
    let ext = cert.extensions().iter().find(|e| e.oid == oid)?;
    let (_, text) = x509_parser::der_parser::der::parse_der_utf8string(ext.value).ok()?;
    let json: serde_json::Value = serde_json::from_str(text.as_str().ok()?).ok()?;
    let groups = serde_json::from_value(json["groups"].clone()).unwrap_or_default();
    let extra = serde_json::from_value(json["extra"].clone()).unwrap_or_default();
    Some(Identity { username, uid: json["uid"].as_str().unwrap_or_default().to_string(), groups, extra })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::certificates::v1::{
        CertificateSigningRequestCondition, CertificateSigningRequestSpec, CertificateSigningRequestStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::ByteString;

    fn request_pem() -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "system:masters-wannabe");
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn csr(now: SystemTime, age: Duration, usages: &[&str]) -> CertificateSigningRequest {
        let created = k8s_openapi::jiff::Timestamp::try_from(now - age).unwrap();
        CertificateSigningRequest {
            metadata: ObjectMeta {
                name: Some("c".into()),
                creation_timestamp: Some(Time(created)),
                ..ObjectMeta::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(request_pem().into_bytes()),
                signer_name: SIGNER_NAME.into(),
                usages: Some(usages.iter().map(|u| u.to_string()).collect()),
                username: Some("alice".into()),
                uid: Some("u-1".into()),
                groups: Some(vec!["dev".into(), "system:authenticated".into()]),
                extra: Some([("scopes".to_string(), vec!["a".to_string()])].into_iter().collect()),
                expiration_seconds: Some(600),
            },
            status: None,
        }
    }

    #[test]
    fn only_fresh_authenticated_client_auth_requests_of_this_signer_are_reviewed() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_115_723);
        let ok = csr(now, Duration::from_secs(5), &["digital signature", "client auth"]);
        let Decision::Review { identity, lifetime, approved: false } = decide(&ok, now) else {
            panic!("{:?}", decide(&ok, now))
        };
        assert_eq!((identity.username.as_str(), identity.uid.as_str()), ("alice", "u-1"));
        assert_eq!(lifetime, Duration::from_secs(600));
        let mut other = ok.clone();
        other.spec.signer_name = "kubernetes.io/kube-apiserver-client".into();
        assert_eq!(decide(&other, now), Decision::NotOurs);
        let mut decided = ok.clone();
        decided.status =
            Some(CertificateSigningRequestStatus { certificate: Some(ByteString(b"x".to_vec())), conditions: None });
        assert_eq!(decide(&decided, now), Decision::NotOurs);
        let condition = |t: &str| CertificateSigningRequestCondition {
            type_: t.into(),
            status: "True".into(),
            ..CertificateSigningRequestCondition::default()
        };
        let mut denied = ok.clone();
        denied.status =
            Some(CertificateSigningRequestStatus { certificate: None, conditions: Some(vec![condition("Denied")]) });
        assert_eq!(decide(&denied, now), Decision::NotOurs);
        // Approved but never signed (a restart between the two): signed now.
        let mut approved = ok.clone();
        approved.status =
            Some(CertificateSigningRequestStatus { certificate: None, conditions: Some(vec![condition("Approved")]) });
        assert!(matches!(decide(&approved, now), Decision::Review { approved: true, .. }));
        let server = csr(now, Duration::from_secs(5), &["client auth", "server auth"]);
        assert!(matches!(decide(&server, now), Decision::Deny(why) if why.contains("usages")));
        let old = csr(now, Duration::from_secs(11 * 60), &["client auth"]);
        assert!(matches!(decide(&old, now), Decision::Deny(why) if why.contains("older than 10 minutes")));
        let mut anonymous = ok.clone();
        anonymous.spec.username = Some("system:anonymous".into());
        assert!(matches!(decide(&anonymous, now), Decision::Deny(why) if why.contains("not authenticated")));
        let mut garbage = ok.clone();
        garbage.spec.request =
            ByteString(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".to_vec());
        assert!(matches!(decide(&garbage, now), Decision::Deny(why) if why.contains("PKCS#10")));
        let mut long = ok;
        long.spec.expiration_seconds = Some(10 * 86_400);
        assert!(matches!(decide(&long, now), Decision::Review { lifetime, .. } if lifetime == MAX_LIFETIME));
    }

    #[test]
    fn the_certificate_carries_the_stamped_identity_and_nothing_the_request_said() {
        let now = SystemTime::now();
        let ca = Ca::generate(now).unwrap();
        let identity = Identity {
            username: "alice".into(),
            uid: "u-1".into(),
            groups: vec!["dev".into(), "system:authenticated".into()],
            extra: [("scopes".to_string(), vec!["a".to_string(), "b".to_string()])].into_iter().collect(),
        };
        let pem = ca.issue(&request_pem(), &identity, now, Duration::from_secs(600)).unwrap();
        let der = der_of(&pem);
        assert_eq!(identity_of(&der), Some(identity.clone()));
        let (_, expires) = key_and_expiry(&der).unwrap();
        let lifetime = expires.duration_since(now).unwrap().as_secs();
        assert!((599..=600).contains(&lifetime), "{lifetime}");
        let text = String::from_utf8_lossy(&der);
        assert!(!text.contains("wannabe"), "the request's own subject is not copied");
        // The CA round-trips through its PEM (as kept in its Secret).
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert!(again.issue(&request_pem(), &identity, now, Duration::from_secs(600)).is_ok());
    }

    fn der_of(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents
    }
}
