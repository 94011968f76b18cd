//! JWT-SVID support for the Workload API: the cache that spares the daemon a mint per
//! request, and the conversion of validated claims into the protobuf `Struct` clients read.

use std::collections::HashMap;
use std::sync::Mutex;

use prost_types::value::Kind;
use serde_json::{Map, Value};

/// How many (entry, audience) tokens are kept. A node runs at most a few hundred workloads
/// with a handful of audiences each; past this the soonest-expiring token is dropped.
pub(crate) const JWT_CACHE_CAPACITY: usize = 4096;

/// Tokens already minted, reused until half their lifetime has passed: a workload that asks
/// for a token per outgoing request would otherwise cost a daemon round trip each time,
/// and half the lifetime still leaves the receiver a useful validity window.
#[derive(Debug)]
pub(crate) struct JwtCache {
    tokens: Mutex<HashMap<JwtCacheKey, CachedJwt>>,
    capacity: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct JwtCacheKey {
    entry_id: String,
    /// Part of the key so a token minted before the entry's SPIFFE ID changed is not reused.
    spiffe_id: String,
    /// Sorted and deduplicated: `["a", "b"]` and `["b", "a"]` are the same request.
    audience: Vec<String>,
}

impl JwtCacheKey {
    pub(crate) fn new(entry_id: &str, spiffe_id: &str, audience: &[String]) -> Self {
        let mut audience = audience.to_vec();
        audience.sort();
        audience.dedup();
        Self {
            entry_id: entry_id.to_owned(),
            spiffe_id: spiffe_id.to_owned(),
            audience,
        }
    }
}

#[derive(Debug, Clone)]
struct CachedJwt {
    token: String,
    /// Unix seconds: when the token stops being handed out (half its lifetime).
    reuse_until: i64,
    expires: i64,
}

impl JwtCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            tokens: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// A cached token still in the first half of its life at `now` (unix seconds).
    pub(crate) fn get(&self, key: &JwtCacheKey, now: i64) -> Option<String> {
        let tokens = self.lock();
        tokens
            .get(key)
            .filter(|t| now < t.reuse_until)
            .map(|t| t.token.clone())
    }

    /// Remembers a token minted at `now` that expires at `expires` (unix seconds).
    pub(crate) fn insert(&self, key: JwtCacheKey, token: String, now: i64, expires: i64) {
        if expires <= now || self.capacity == 0 {
            return;
        }
        let reuse_until = now + (expires - now) / 2;
        let mut tokens = self.lock();
        if tokens.len() >= self.capacity && !tokens.contains_key(&key) {
            tokens.retain(|_, t| now < t.reuse_until);
            if tokens.len() >= self.capacity
                && let Some(oldest) = tokens
                    .iter()
                    .min_by_key(|(_, t)| t.expires)
                    .map(|(k, _)| k.clone())
            {
                tokens.remove(&oldest);
            }
        }
        tokens.insert(
            key,
            CachedJwt {
                token,
                reuse_until,
                expires,
            },
        );
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JwtCacheKey, CachedJwt>> {
        // A panic while holding the lock leaves a map that is still consistent (every
        // mutation is a single insert/remove/retain), so a poisoned lock is safe to reuse.
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// JSON claims as a protobuf `Struct`, the form `ValidateJWTSVIDResponse.claims` carries.
pub(crate) fn claims_to_struct(claims: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .iter()
            .map(|(name, value)| (name.clone(), json_to_value(value)))
            .collect(),
    }
}

/// Protobuf's `Value` has one number type, a double, as JSON itself does.
fn json_to_value(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        Value::Bool(b) => Kind::BoolValue(*b),
        // Without serde_json's arbitrary_precision every number has an f64 form.
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(claims_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key(entry: &str, audience: &[&str]) -> JwtCacheKey {
        let audience: Vec<String> = audience.iter().map(|a| (*a).to_owned()).collect();
        JwtCacheKey::new(entry, "spiffe://example.org/a", &audience)
    }

    #[test]
    fn cached_token_is_reused_for_half_its_life_in_any_audience_order() {
        let cache = JwtCache::new(8);
        cache.insert(key("e1", &["a", "b"]), "token".into(), 1000, 1300);
        assert_eq!(
            cache.get(&key("e1", &["b", "a", "a"]), 1149),
            Some("token".into())
        );
        assert_eq!(cache.get(&key("e1", &["b", "a"]), 1150), None);
        assert_eq!(cache.get(&key("e2", &["a", "b"]), 1000), None);
        assert_eq!(cache.get(&key("e1", &["a"]), 1000), None);
    }

    #[test]
    fn cache_stays_within_capacity() {
        let cache = JwtCache::new(2);
        cache.insert(key("e1", &["a"]), "t1".into(), 1000, 1100);
        cache.insert(key("e2", &["a"]), "t2".into(), 1000, 1300);
        cache.insert(key("e3", &["a"]), "t3".into(), 1000, 1200);
        assert_eq!(cache.len(), 2);
        // The soonest-expiring token made room.
        assert_eq!(cache.get(&key("e1", &["a"]), 1000), None);
        assert_eq!(cache.get(&key("e2", &["a"]), 1000), Some("t2".into()));
        assert_eq!(cache.get(&key("e3", &["a"]), 1000), Some("t3".into()));
    }

    #[test]
    fn claims_convert_to_a_struct_of_every_json_type() {
        let claims = json!({
            "sub": "spiffe://example.org/a",
            "aud": ["x", "y"],
            "exp": 1_760_000_300,
            "ratio": 0.5,
            "admin": false,
            "gone": null,
            "nested": {"k": [1, {"deep": "v"}]}
        });
        let Value::Object(map) = claims else {
            unreachable!()
        };
        let s = claims_to_struct(&map);
        let kind = |name: &str| s.fields[name].kind.clone().unwrap();
        assert_eq!(
            kind("sub"),
            Kind::StringValue("spiffe://example.org/a".into())
        );
        assert_eq!(kind("exp"), Kind::NumberValue(1_760_000_300.0));
        assert_eq!(kind("ratio"), Kind::NumberValue(0.5));
        assert_eq!(kind("admin"), Kind::BoolValue(false));
        assert_eq!(kind("gone"), Kind::NullValue(0));
        let Kind::ListValue(aud) = kind("aud") else {
            panic!("aud is not a list")
        };
        assert_eq!(aud.values[1].kind, Some(Kind::StringValue("y".into())));
        let Kind::StructValue(nested) = kind("nested") else {
            panic!("nested is not a struct")
        };
        let Some(Kind::ListValue(list)) = nested.fields["k"].kind.clone() else {
            panic!("k is not a list")
        };
        assert_eq!(list.values[0].kind, Some(Kind::NumberValue(1.0)));
        let Some(Kind::StructValue(deep)) = list.values[1].kind.clone() else {
            panic!("second item is not a struct")
        };
        assert_eq!(
            deep.fields["deep"].kind,
            Some(Kind::StringValue("v".into()))
        );
    }
}
