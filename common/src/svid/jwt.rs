//! JWT-SVIDs: signing compact ES256 tokens with the trust domain's JWT key and validating
//! tokens against a set of (kid, public key) pairs. Only ES256 is accepted, so the
//! algorithm-confusion and `alg: none` attacks have nothing to work with.

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};

use crate::svid::error::truncate_for_message;
use crate::svid::{CaError, expiry, unix_seconds};

/// Length of an ES256 signature in JWS form: r and s, 32 bytes each.
const ES256_SIGNATURE_LEN: usize = 64;

/// A loaded JWT signing key.
pub struct JwtAuthority {
    kid: String,
    key: EcdsaKeyPair,
    public_spki: Vec<u8>,
    /// The header never changes for one key, so it is encoded once.
    encoded_header: String,
}

impl JwtAuthority {
    /// Loads the key (PKCS#8 ECDSA P-256) that signs under `kid`.
    pub fn new(kid: &str, key_pkcs8: &[u8]) -> Result<Self, CaError> {
        // The FIXED variant makes aws-lc emit r||s, the JWS form, instead of ASN.1 DER.
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, key_pkcs8)
            .map_err(|_| CaError::InvalidPrivateKey)?;
        let public_spki = key
            .public_key()
            .as_der()
            .map_err(|_| CaError::InvalidPrivateKey)?
            .as_ref()
            .to_vec();
        let header = json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
        Ok(Self {
            kid: kid.to_owned(),
            key,
            public_spki,
            encoded_header: URL_SAFE_NO_PAD.encode(header.to_string()),
        })
    }

    /// The key id written into every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key, SubjectPublicKeyInfo DER, as bundles and `validate_jwt` take it.
    pub fn public_key_spki(&self) -> &[u8] {
        &self.public_spki
    }

    /// Signs a JWT-SVID for `spiffe_id`. `aud` is a string for one audience and an array
    /// for several, as most JWT libraries expect.
    pub fn sign(
        &self,
        spiffe_id: &str,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, CaError> {
        let aud = match audience {
            [] => return Err(CaError::JwtMissingAudience),
            [one] => Value::String(one.clone()),
            many => Value::from(many.to_vec()),
        };
        let iat = unix_seconds(now)?;
        let exp = expiry(iat, ttl)?;
        let claims = json!({ "sub": spiffe_id, "aud": aud, "exp": exp, "iat": iat });
        let mut token = format!(
            "{}.{}",
            self.encoded_header,
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), token.as_bytes())
            .map_err(|_| CaError::KeyGeneration)?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        Ok(token)
    }
}

impl fmt::Debug for JwtAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthority")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The claims of a validated JWT-SVID.
#[derive(Clone, Debug, PartialEq)]
pub struct JwtClaims {
    /// The SPIFFE ID the token was issued to.
    pub sub: String,
    /// Every audience in the token.
    pub aud: Vec<String>,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Issue time, unix seconds, when the token carries one.
    pub iat: Option<i64>,
    /// All claims as sent, for the Workload API's `ValidateJWTSVID` response.
    pub raw: Map<String, Value>,
}

/// Validates a compact JWT-SVID: ES256 only, `kid` among `keys` (kid, SPKI DER), signature,
/// `exp` not passed, `nbf` (if any) reached, `audience` among `aud`, `sub` a SPIFFE ID.
pub fn validate_jwt(
    token: &str,
    audience: &str,
    keys: &[(String, Vec<u8>)],
    now: SystemTime,
) -> Result<JwtClaims, CaError> {
    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(CaError::JwtMalformed("expected three dot-separated parts"));
    };

    let header = decode_json_object(header_b64, "the header is not base64url JSON")?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "ES256" => {}
        Some(Value::String(alg)) => {
            return Err(CaError::JwtUnsupportedAlgorithm(truncate_for_message(alg)));
        }
        _ => return Err(CaError::JwtMalformed("the header has no alg")),
    }
    let Some(Value::String(kid)) = header.get("kid") else {
        return Err(CaError::JwtMalformed("the header has no kid"));
    };
    let (_, spki) = keys
        .iter()
        .find(|(k, _)| k == kid)
        .ok_or_else(|| CaError::JwtUnknownKeyId(truncate_for_message(kid)))?;

    let sig = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| CaError::JwtMalformed("the signature is not base64url"))?;
    if sig.len() != ES256_SIGNATURE_LEN {
        return Err(CaError::JwtSignatureInvalid);
    }
    // The signed bytes are the first two parts exactly as received, dot included.
    let signing_input = &token[..header_b64.len() + 1 + claims_b64.len()];
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, spki)
        .verify(signing_input.as_bytes(), &sig)
        .map_err(|_| CaError::JwtSignatureInvalid)?;

    // Claims are only looked at once the signature proves who wrote them.
    let raw = decode_json_object(claims_b64, "the claims are not base64url JSON")?;
    let now_secs = unix_seconds(now)?;
    let exp = numeric_date(&raw, "exp")?.ok_or(CaError::JwtMalformed("exp is missing"))?;
    if now_secs >= exp {
        return Err(CaError::JwtExpired(exp));
    }
    if let Some(nbf) = numeric_date(&raw, "nbf")?
        && now_secs < nbf
    {
        return Err(CaError::JwtNotYetValid(nbf));
    }
    let iat = numeric_date(&raw, "iat")?;
    let aud = match raw.get("aud") {
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) => many
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(CaError::JwtMalformed("aud holds a non-string"))?,
        _ => return Err(CaError::JwtMalformed("aud is missing")),
    };
    if !aud.iter().any(|a| a == audience) {
        return Err(CaError::JwtAudienceMismatch(truncate_for_message(audience)));
    }
    let sub = match raw.get("sub") {
        Some(Value::String(sub)) if sub.starts_with("spiffe://") => sub.clone(),
        _ => return Err(CaError::JwtMalformed("sub is missing or not a SPIFFE ID")),
    };
    Ok(JwtClaims {
        sub,
        aud,
        exp,
        iat,
        raw,
    })
}

fn decode_json_object(part: &str, what: &'static str) -> Result<Map<String, Value>, CaError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| CaError::JwtMalformed(what))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(CaError::JwtMalformed(what)),
    }
}

/// A NumericDate claim (RFC 7519 allows fractions; whole seconds are enough here).
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, CaError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f.floor() as i64))
            .map(Some)
            .ok_or(CaError::JwtMalformed("a time claim is not a number")),
        Some(_) => Err(CaError::JwtMalformed("a time claim is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::svid::generate_ca;

    const WEB: &str = "spiffe://example.org/ns/web";
    const FIVE_MIN: Duration = Duration::from_secs(300);

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_760_000_000)
    }

    fn signer() -> (JwtAuthority, Vec<(String, Vec<u8>)>) {
        let material = generate_ca("example.org", Duration::from_secs(86_400), now()).unwrap();
        let authority = JwtAuthority::new(&material.jwt_kid, &material.jwt_key_pkcs8).unwrap();
        assert_eq!(
            authority.public_key_spki(),
            material.jwt_public_spki.as_slice()
        );
        let keys = vec![(material.jwt_kid, material.jwt_public_spki)];
        (authority, keys)
    }

    fn decode_part(token: &str, index: usize) -> Value {
        let part = token.split('.').nth(index).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    fn encode_json(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    #[test]
    fn signed_token_validates_and_has_the_expected_shape() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (authority, keys) = signer();
        let token = authority
            .sign(WEB, &["backend".to_owned()], FIVE_MIN, now())
            .unwrap();

        assert_eq!(
            decode_part(&token, 0),
            json!({"alg": "ES256", "kid": authority.kid(), "typ": "JWT"})
        );
        let claims = decode_part(&token, 1);
        assert_eq!(claims["aud"], json!("backend"), "one audience is a string");
        assert_eq!(claims["sub"], json!(WEB));
        let sig = URL_SAFE_NO_PAD
            .decode(token.split('.').nth(2).unwrap())
            .unwrap();
        assert_eq!(sig.len(), 64, "fixed r||s signature");

        let validated = validate_jwt(&token, "backend", &keys, now()).unwrap();
        assert_eq!(validated.sub, WEB);
        assert_eq!(validated.aud, vec!["backend".to_owned()]);
        assert_eq!(validated.iat, Some(1_760_000_000));
        assert_eq!(validated.exp, 1_760_000_300);
        assert_eq!(validated.raw.get("sub"), Some(&json!(WEB)));
    }

    #[test]
    fn several_audiences_become_an_array() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (authority, keys) = signer();
        let aud = vec!["a".to_owned(), "b".to_owned()];
        let token = authority.sign(WEB, &aud, FIVE_MIN, now()).unwrap();
        assert_eq!(decode_part(&token, 1)["aud"], json!(["a", "b"]));
        let claims = validate_jwt(&token, "b", &keys, now()).unwrap();
        assert_eq!(claims.aud, aud);
        assert!(matches!(
            authority.sign(WEB, &[], FIVE_MIN, now()),
            Err(CaError::JwtMissingAudience)
        ));
    }

    #[test]
    fn wrong_audience_is_rejected() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (authority, keys) = signer();
        let token = authority
            .sign(WEB, &["a".to_owned()], FIVE_MIN, now())
            .unwrap();
        assert!(matches!(
            validate_jwt(&token, "someone-else", &keys, now()),
            Err(CaError::JwtAudienceMismatch(_))
        ));
    }

    #[test]
    fn expired_token_is_rejected() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (authority, keys) = signer();
        let token = authority
            .sign(WEB, &["a".to_owned()], FIVE_MIN, now())
            .unwrap();
        assert!(validate_jwt(&token, "a", &keys, now() + Duration::from_secs(299)).is_ok());
        assert!(matches!(
            validate_jwt(&token, "a", &keys, now() + FIVE_MIN),
            Err(CaError::JwtExpired(1_760_000_300))
        ));
    }

    #[test]
    fn tampered_claims_fail_the_signature() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (authority, keys) = signer();
        let token = authority
            .sign(WEB, &["a".to_owned()], FIVE_MIN, now())
            .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims = decode_part(&token, 1);
        claims["sub"] = json!("spiffe://example.org/ns/admin");
        let forged = format!("{}.{}.{}", parts[0], encode_json(&claims), parts[2]);
        assert!(matches!(
            validate_jwt(&forged, "a", &keys, now()),
            Err(CaError::JwtSignatureInvalid)
        ));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_rejected() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (authority, keys) = signer();
        let token = authority
            .sign(WEB, &["a".to_owned()], FIVE_MIN, now())
            .unwrap();
        let claims = token.split('.').nth(1).unwrap();
        for alg in ["none", "HS256", "ES384"] {
            let header = encode_json(&json!({"alg": alg, "kid": authority.kid()}));
            let forged = format!("{header}.{claims}.");
            assert!(
                matches!(
                    validate_jwt(&forged, "a", &keys, now()),
                    Err(CaError::JwtUnsupportedAlgorithm(a)) if a == alg
                ),
                "{alg}"
            );
        }
    }

    #[test]
    fn unknown_kid_and_malformed_tokens_are_rejected() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (authority, keys) = signer();
        let (other, _) = signer();
        let token = other.sign(WEB, &["a".to_owned()], FIVE_MIN, now()).unwrap();
        assert!(matches!(
            validate_jwt(&token, "a", &keys, now()),
            Err(CaError::JwtUnknownKeyId(_))
        ));
        for bad in ["", "abc", "a.b", "a.b.c.d", "!!.!!.!!"] {
            assert!(
                matches!(
                    validate_jwt(bad, "a", &keys, now()),
                    Err(CaError::JwtMalformed(_))
                ),
                "{bad:?}"
            );
        }
        // A correctly signed token whose sub is not a SPIFFE ID is still refused.
        let token = authority
            .sign("not-a-spiffe-id", &["a".to_owned()], FIVE_MIN, now())
            .unwrap();
        assert!(matches!(
            validate_jwt(&token, "a", &keys, now()),
            Err(CaError::JwtMalformed(_))
        ));
    }
}
