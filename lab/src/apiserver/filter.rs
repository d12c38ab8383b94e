//! Label and field selectors of lists and watches.

use anyhow::Result;
use serde_json::Value;

use super::*;

/// One label-selector requirement (equality-based only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
}

/// One field-selector requirement on `metadata.name` / `metadata.namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldReq {
    pub field: String,
    pub value: String,
    pub equal: bool,
}

/// Which objects a list or watch wants: namespace (from the URL) and selectors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: Vec<LabelReq>,
    pub fields: Vec<FieldReq>,
}

impl Filter {
    /// Parses `labelSelector` and `fieldSelector` query values.
    pub fn parse(namespace: Option<&str>, labels: Option<&str>, fields: Option<&str>) -> Result<Filter, ApiError> {
        let mut f = Filter { namespace: namespace.map(str::to_string), ..Filter::default() };
        for part in labels.unwrap_or("").split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || {
                ApiError::bad_request(format!(
                    "unable to parse requirement: {part:?} (the stand-in supports only =, ==, !=, key and !key)"
                ))
            };
            let valid = |k: &str| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            let req = if let Some((k, v)) = part.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                LabelReq::NotExists(k.trim().into())
            } else {
                LabelReq::Exists(part.into())
            };
            let (LabelReq::Eq(k, _) | LabelReq::Ne(k, _) | LabelReq::Exists(k) | LabelReq::NotExists(k)) = &req;
            if !valid(k) {
                return Err(bad());
            }
            f.labels.push(req);
        }
        for part in fields.unwrap_or("").split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, value, equal) = if let Some((k, v)) = part.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, v, true)
            } else {
                return Err(ApiError::bad_request(format!("invalid selector: '{part}'; can't understand '{part}'")));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(ApiError::bad_request(format!("field label not supported: {field}")));
            }
            f.fields.push(FieldReq { field: field.into(), value: value.trim().into(), equal });
        }
        Ok(f)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        let ns = meta["namespace"].as_str().unwrap_or("");
        if self.namespace.as_deref().is_some_and(|want| want != ns) {
            return false;
        }
        let label = |k: &str| meta["labels"][k].as_str();
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => label(k) != Some(v.as_str()),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|r| {
                let actual = if r.field == "metadata.name" { meta["name"].as_str().unwrap_or("") } else { ns };
                (actual == r.value) == r.equal
            })
    }
}
