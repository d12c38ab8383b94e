//! Request bodies in Kubernetes' protobuf encoding (`Content-Type:
//! application/vnd.kubernetes.protobuf`), which kubectl sends for built-in kinds: the
//! 4-byte magic `k8s\0`, then a `runtime.Unknown` (`typeMeta` = 1 with `apiVersion` = 1
//! and `kind` = 2; `raw` = 2, the object's own message). Decoded into the JSON object the
//! rest of the stand-in works on.
//!
//! Kept from the real API server: the envelope and the field numbers of the kinds decoded
//! (`k8s.io/api`'s `generated.proto`). Simplified: only the kinds `kubectl create
//! rolebinding|clusterrolebinding`, `kubectl auth can-i` and `kubectl certificate
//! approve|deny` send (RoleBinding, ClusterRoleBinding, SelfSubjectAccessReview,
//! CertificateSigningRequest without its conditions' times), and of `ObjectMeta` only
//! name, generateName, namespace, labels and annotations; any other kind is refused
//! `415`, as the real one refuses protobuf for a kind without it.

use serde_json::{Map, Value};

use super::ApiError;

/// What starts every protobuf body.
const MAGIC: &[u8; 4] = b"k8s\0";

/// The fields of a message that are decoded (others are skipped).
type Schema = &'static [(u64, Field)];

/// How one field becomes JSON.
enum Field {
    Str(&'static str),
    /// `bytes`: base64 in JSON.
    Bytes(&'static str),
    /// A varint.
    Int(&'static str),
    Msg(&'static str, Schema),
    Repeated(&'static str, Schema),
    RepeatedStr(&'static str),
    /// `map<string, string>`: entries with key = 1, value = 2.
    StrMap(&'static str),
}

const OBJECT_META: Schema = &[
    (1, Field::Str("name")),
    (2, Field::Str("generateName")),
    (3, Field::Str("namespace")),
    (11, Field::StrMap("labels")),
    (12, Field::StrMap("annotations")),
];
const SUBJECT: Schema =
    &[(1, Field::Str("kind")), (2, Field::Str("apiGroup")), (3, Field::Str("name")), (4, Field::Str("namespace"))];
const ROLE_REF: Schema = &[(1, Field::Str("apiGroup")), (2, Field::Str("kind")), (3, Field::Str("name"))];
const BINDING: Schema = &[
    (1, Field::Msg("metadata", OBJECT_META)),
    (2, Field::Repeated("subjects", SUBJECT)),
    (3, Field::Msg("roleRef", ROLE_REF)),
];
const RESOURCE_ATTRIBUTES: Schema = &[
    (1, Field::Str("namespace")),
    (2, Field::Str("verb")),
    (3, Field::Str("group")),
    (4, Field::Str("version")),
    (5, Field::Str("resource")),
    (6, Field::Str("subresource")),
    (7, Field::Str("name")),
];
const NON_RESOURCE_ATTRIBUTES: Schema = &[(1, Field::Str("path")), (2, Field::Str("verb"))];
const SELF_ACCESS_SPEC: Schema = &[
    (1, Field::Msg("resourceAttributes", RESOURCE_ATTRIBUTES)),
    (2, Field::Msg("nonResourceAttributes", NON_RESOURCE_ATTRIBUTES)),
];
const SELF_ACCESS_REVIEW: Schema =
    &[(1, Field::Msg("metadata", OBJECT_META)), (2, Field::Msg("spec", SELF_ACCESS_SPEC))];
const CSR_SPEC: Schema = &[
    (1, Field::Bytes("request")),
    (2, Field::Str("username")),
    (3, Field::Str("uid")),
    (4, Field::RepeatedStr("groups")),
    (5, Field::RepeatedStr("usages")),
    (7, Field::Str("signerName")),
    (8, Field::Int("expirationSeconds")),
];
/// Of a condition, its times are left out (the stand-in stamps `lastUpdateTime`).
const CSR_CONDITION: Schema =
    &[(1, Field::Str("type")), (2, Field::Str("reason")), (3, Field::Str("message")), (6, Field::Str("status"))];
const CSR_STATUS: Schema = &[(1, Field::Repeated("conditions", CSR_CONDITION)), (2, Field::Bytes("certificate"))];
const CSR: Schema = &[
    (1, Field::Msg("metadata", OBJECT_META)),
    (2, Field::Msg("spec", CSR_SPEC)),
    (3, Field::Msg("status", CSR_STATUS)),
];
const TYPE_META: Schema = &[(1, Field::Str("apiVersion")), (2, Field::Str("kind"))];

/// The object in protobuf body `body`, as JSON with its `apiVersion` and `kind`.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let bad = |why: String| ApiError::bad_request(format!("the protobuf request body is malformed: {why}"));
    let envelope = body.strip_prefix(MAGIC).ok_or_else(|| bad("no k8s protobuf magic".into()))?;
    let (mut type_meta, mut raw) = (Map::new(), None);
    for field in Fields(envelope) {
        match field.map_err(bad)? {
            (1, Wire::Bytes(bytes)) => type_meta = message(bytes, TYPE_META).map_err(bad)?,
            (2, Wire::Bytes(bytes)) => raw = Some(bytes),
            _ => {}
        }
    }
    let kind = type_meta.get("kind").and_then(Value::as_str).unwrap_or_default();
    let schema = match kind {
        "RoleBinding" | "ClusterRoleBinding" => BINDING,
        "SelfSubjectAccessReview" => SELF_ACCESS_REVIEW,
        // `kubectl certificate approve|deny` (the `approval` subresource).
        "CertificateSigningRequest" => CSR,
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: \
                     application/json, application/yaml (the stand-in decodes protobuf only for RoleBinding, \
                     ClusterRoleBinding, SelfSubjectAccessReview and CertificateSigningRequest, not {other:?})"
                ),
            ))
        }
    };
    let mut object = message(raw.unwrap_or_default(), schema).map_err(bad)?;
    object.extend(type_meta);
    Ok(Value::Object(object))
}

/// A field's value as the wire carries it.
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of a message: number and value.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Wire<'a>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = (|| {
            let key = varint(&mut self.0)?;
            let skip = |buf: &mut &'a [u8], n: usize| -> Result<&'a [u8], String> {
                if buf.len() < n {
                    return Err(format!("field {} wants {n} bytes, {} left", key >> 3, buf.len()));
                }
                let (taken, rest) = buf.split_at(n);
                *buf = rest;
                Ok(taken)
            };
            let value = match key & 7 {
                0 => Wire::Varint(varint(&mut self.0)?),
                1 => skip(&mut self.0, 8).map(|_| Wire::Fixed)?,
                5 => skip(&mut self.0, 4).map(|_| Wire::Fixed)?,
                2 => {
                    let len = usize::try_from(varint(&mut self.0)?).map_err(|_| "a length too large".to_string())?;
                    Wire::Bytes(skip(&mut self.0, len)?)
                }
                wire => return Err(format!("wire type {wire} of field {}", key >> 3)),
            };
            Ok((key >> 3, value))
        })();
        if field.is_err() {
            self.0 = &[]; // nothing after a malformed field is read
        }
        Some(field)
    }
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Ok(value);
        }
    }
    Err("a truncated or overlong varint".into())
}

/// The fields of `schema` in message `bytes`.
fn message(bytes: &[u8], schema: Schema) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    // Appends `item` to the list `name`.
    let push = |out: &mut Map<String, Value>, name: &str, item: Value| {
        if let Value::Array(items) = out.entry(name).or_insert_with(|| Value::Array(Vec::new())) {
            items.push(item);
        }
    };
    for field in Fields(bytes) {
        let (number, value) = field?;
        let Some((_, field)) = schema.iter().find(|(n, _)| *n == number) else { continue };
        let bytes = match (field, value) {
            (Field::Int(name), Wire::Varint(n)) => {
                out.insert((*name).into(), n.into());
                continue;
            }
            (Field::Int(_), _) | (_, Wire::Varint(_) | Wire::Fixed) => {
                return Err(format!("field {number} has another wire type than its kind's"))
            }
            (_, Wire::Bytes(bytes)) => bytes,
        };
        let text = |name: &str| std::str::from_utf8(bytes).map_err(|_| format!("{name} is not UTF-8"));
        match field {
            Field::Int(_) => {}
            Field::Str(name) => {
                let text = text(name)?;
                // Go sends an unset string as empty; its JSON leaves it out.
                if !text.is_empty() {
                    out.insert((*name).into(), text.into());
                }
            }
            Field::Bytes(name) => {
                let encoded = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes);
                out.insert((*name).into(), encoded.into());
            }
            Field::RepeatedStr(name) => push(&mut out, name, text(name)?.into()),
            Field::Msg(name, schema) => {
                out.insert((*name).into(), Value::Object(message(bytes, schema)?));
            }
            Field::Repeated(name, schema) => push(&mut out, name, Value::Object(message(bytes, schema)?)),
            Field::StrMap(name) => {
                let entry = message(bytes, &[(1, Field::Str("k")), (2, Field::Str("v"))])?;
                let text = |k: &str| entry.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
                if let Value::Object(map) = out.entry(*name).or_insert_with(|| Value::Object(Map::new())) {
                    map.insert(text("k"), text("v").into());
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Field `n` holding `bytes` (length-delimited).
    fn field(n: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for mut v in [n << 3 | 2, bytes.len() as u64] {
            while v >= 0x80 {
                out.push(v as u8 | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }
        out.extend_from_slice(bytes);
        out
    }

    fn envelope(kind: &str, raw: &[u8]) -> Vec<u8> {
        let type_meta = [field(1, b"rbac.authorization.k8s.io/v1"), field(2, kind.as_bytes())].concat();
        [MAGIC.to_vec(), field(1, &type_meta), field(2, raw), field(4, b"application/vnd.kubernetes.protobuf")].concat()
    }

    #[test]
    fn a_binding_as_kubectl_sends_it_becomes_its_json() {
        let meta = [
            field(1, b"tpvpn-intercept"),
            field(2, b""),
            field(3, b"shop"),
            field(11, &[field(1, b"a"), field(2, b"b")].concat()),
        ]
        .concat();
        let subject = |name: &[u8]| {
            field(2, &[field(1, b"Group"), field(2, b"rbac.authorization.k8s.io"), field(3, name)].concat())
        };
        // A varint field (number 9) the stand-in does not know, skipped.
        let raw = [
            field(1, &meta),
            subject(b"developers"),
            subject(b"leads"),
            vec![9 << 3, 0x96, 0x01],
            field(
                3,
                &[field(1, b"rbac.authorization.k8s.io"), field(2, b"ClusterRole"), field(3, b"tpvpn-intercept")]
                    .concat(),
            ),
        ]
        .concat();
        assert_eq!(
            decode(&envelope("RoleBinding", &raw)).unwrap(),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "tpvpn-intercept", "namespace": "shop", "labels": {"a": "b"}},
                "subjects": [{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "developers"},
                             {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "leads"}],
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tpvpn-intercept"}})
        );
    }

    #[test]
    fn a_csr_approval_as_kubectl_sends_it_becomes_its_json() {
        let spec = [
            field(1, b"PEM"),
            field(4, b"developers"),
            field(4, b"system:authenticated"),
            field(5, b"client auth"),
            field(7, b"tpvpn.dev/client"),
            vec![8 << 3, 0x90, 0x1c], // expirationSeconds 3600
        ]
        .concat();
        // A condition with a lastUpdateTime (a Time message), left out.
        let condition =
            [field(1, b"Approved"), field(2, b"KubectlApprove"), field(4, &[8, 1]), field(6, b"True")].concat();
        let raw = [field(1, &field(1, b"tpvpn-1")), field(2, &spec), field(3, &field(1, &condition))].concat();
        assert_eq!(
            decode(&envelope("CertificateSigningRequest", &raw)).unwrap(),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "CertificateSigningRequest",
                "metadata": {"name": "tpvpn-1"},
                "spec": {"request": "UEVN", "groups": ["developers", "system:authenticated"], "usages": ["client auth"],
                    "signerName": "tpvpn.dev/client", "expirationSeconds": 3600},
                "status": {"conditions": [{"type": "Approved", "reason": "KubectlApprove", "status": "True"}]}})
        );
        // A varint where a string belongs: refused.
        let wrong = [field(1, &field(1, b"x")), vec![2 << 3, 1]].concat();
        assert_eq!(decode(&envelope("CertificateSigningRequest", &wrong)).unwrap_err().code, 400);
    }

    #[test]
    fn other_kinds_are_unsupported_and_malformed_bodies_bad_requests_never_panics() {
        assert_eq!(decode(&envelope("Pod", &[])).unwrap_err().code, 415);
        assert_eq!(decode(b"{\"kind\": \"Pod\"}").unwrap_err().code, 400, "no magic");
        let good = envelope("ClusterRoleBinding", &field(1, &field(1, b"x")));
        for cut in 4..good.len() {
            let r = decode(&good[..cut]);
            assert!(r.is_err() || r.as_ref().unwrap()["kind"] == "ClusterRoleBinding", "{cut}: {r:?}");
        }
        // Every byte of a valid body flipped in every bit: an answer or an error.
        for i in 4..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[i] ^= 1 << bit;
                let _ = decode(&b);
            }
        }
        assert!(decode(
            &[MAGIC.as_slice(), &[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]].concat()
        )
        .is_err());
    }
}
