//! Trust bundle encodings: PEM for files and tools, and the SPIFFE bundle format (a JWKS
//! with `x509-svid` and `jwt-svid` keys) for federation and the Workload API's JWT bundles.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::svid::{CaError, is_secp384r1};

/// PEM wraps base64 at 64 characters per line (RFC 7468).
const PEM_LINE_LEN: usize = 64;

/// Concatenated PEM `CERTIFICATE` blocks, one per DER certificate, in order.
pub fn bundle_pem(certs: &[Vec<u8>]) -> String {
    certs
        .iter()
        .map(|der| pem_block("CERTIFICATE", der))
        .collect()
}

/// One PEM block (`PRIVATE KEY` for a PKCS#8 key, `CERTIFICATE`, …) around `der`. The
/// caller holds the result in `Zeroizing` where `der` is a key.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / PEM_LINE_LEN + 64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // Base64 output is ASCII, so every byte index is a char boundary.
    for start in (0..b64.len()).step_by(PEM_LINE_LEN) {
        out.push_str(&b64[start..b64.len().min(start + PEM_LINE_LEN)]);
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// DER certificates from PEM text; other PEM sections (keys, CRLs) are skipped. Each
/// certificate must parse as X.509, and at least one must be present.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        // The PEM error can quote the offending line; it is not echoed in case the text
        // was a key file passed by mistake.
        let der = item.map_err(|_| {
            CaError::MalformedCertificate(
                "the PEM text is malformed (bad BEGIN/END lines or base64)".to_owned(),
            )
        })?;
        match X509Certificate::from_der(&der) {
            Ok(([], _)) => certs.push(der.to_vec()),
            _ => {
                return Err(CaError::MalformedCertificate(format!(
                    "PEM certificate number {} is not valid X.509 DER",
                    certs.len() + 1
                )));
            }
        }
    }
    if certs.is_empty() {
        return Err(CaError::MalformedCertificate(
            "no CERTIFICATE block found in the PEM text".to_owned(),
        ));
    }
    Ok(certs)
}

/// The SPIFFE bundle for a trust domain: one `x509-svid` key per CA certificate (with its
/// DER in `x5c`) and one `jwt-svid` key per (kid, SPKI DER) pair.
///
/// Keys that a JWK cannot describe (anything but EC P-256/P-384) are left out: Mayfly only
/// generates P-256 keys, so this happens only for certificates imported from elsewhere.
pub fn bundle_jwks(
    x509_authorities: &[Vec<u8>],
    jwt_keys: &[(String, Vec<u8>)],
    sequence: i64,
    refresh_hint_secs: i64,
) -> Value {
    let mut keys: Vec<Value> = x509_authorities
        .iter()
        .filter_map(|der| x509_authority_jwk(der))
        .collect();
    keys.extend(jwt_key_jwks(jwt_keys));
    json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint_secs,
    })
}

/// Only the `jwt-svid` keys, as the Workload API's `FetchJWTBundles` serves them.
pub fn jwt_jwks(jwt_keys: &[(String, Vec<u8>)]) -> Value {
    json!({ "keys": jwt_key_jwks(jwt_keys).collect::<Vec<_>>() })
}

fn jwt_key_jwks(jwt_keys: &[(String, Vec<u8>)]) -> impl Iterator<Item = Value> + '_ {
    jwt_keys.iter().filter_map(|(kid, spki_der)| {
        let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der).ok()?;
        let mut jwk = ec_jwk(&spki)?;
        jwk.insert("use".to_owned(), json!("jwt-svid"));
        jwk.insert("kid".to_owned(), json!(kid));
        Some(Value::Object(jwk))
    })
}

fn x509_authority_jwk(cert_der: &[u8]) -> Option<Value> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let mut jwk = ec_jwk(cert.public_key())?;
    jwk.insert("use".to_owned(), json!("x509-svid"));
    jwk.insert("x5c".to_owned(), json!([STANDARD.encode(cert_der)]));
    Some(Value::Object(jwk))
}

/// `kty`, `crv`, `x`, `y` of an EC public key (RFC 7518 6.2.1).
fn ec_jwk(spki: &SubjectPublicKeyInfo<'_>) -> Option<serde_json::Map<String, Value>> {
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return None;
    }
    let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
    let point: &[u8] = spki.subject_public_key.data.as_ref();
    let (crv, coord_len) = if curve == OID_EC_P256 {
        ("P-256", 32)
    } else if is_secp384r1(&curve) {
        ("P-384", 48)
    } else {
        return None;
    };
    // Only the uncompressed form (0x04 || x || y) carries both coordinates.
    if point.len() != 1 + 2 * coord_len || point[0] != 0x04 {
        return None;
    }
    let (x, y) = point[1..].split_at(coord_len);
    let mut jwk = serde_json::Map::new();
    jwk.insert("kty".to_owned(), json!("EC"));
    jwk.insert("crv".to_owned(), json!(crv));
    jwk.insert("x".to_owned(), json!(URL_SAFE_NO_PAD.encode(x)));
    jwk.insert("y".to_owned(), json!(URL_SAFE_NO_PAD.encode(y)));
    Some(jwk)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::svid::generate_ca;

    fn material() -> crate::svid::CaMaterial {
        let now = UNIX_EPOCH + Duration::from_secs(1_760_000_000);
        generate_ca("example.org", Duration::from_secs(86_400), now).unwrap()
    }

    #[test]
    fn jwks_has_the_spiffe_bundle_shape() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let m = material();
        let jwt_keys = vec![(m.jwt_kid.clone(), m.jwt_public_spki.clone())];
        let bundle = bundle_jwks(std::slice::from_ref(&m.cert_der), &jwt_keys, 7, 300);

        assert_eq!(bundle["spiffe_sequence"], json!(7));
        assert_eq!(bundle["spiffe_refresh_hint"], json!(300));
        let keys = bundle["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);

        let x509 = &keys[0];
        assert_eq!(x509["use"], json!("x509-svid"));
        assert_eq!(x509["kty"], json!("EC"));
        assert_eq!(x509["crv"], json!("P-256"));
        let x5c = x509["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1);
        assert_eq!(
            STANDARD.decode(x5c[0].as_str().unwrap()).unwrap(),
            m.cert_der
        );
        let (_, cert) = X509Certificate::from_der(&m.cert_der).unwrap();
        let point = cert.public_key().subject_public_key.data.to_vec();
        let x = URL_SAFE_NO_PAD.decode(x509["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(x509["y"].as_str().unwrap()).unwrap();
        assert_eq!([&[0x04][..], &x, &y].concat(), point);

        let jwt = &keys[1];
        assert_eq!(jwt["use"], json!("jwt-svid"));
        assert_eq!(jwt["kty"], json!("EC"));
        assert_eq!(jwt["crv"], json!("P-256"));
        assert_eq!(jwt["kid"], json!(m.jwt_kid));
        assert_eq!(jwt["x"].as_str().unwrap().len(), 43);
        assert_eq!(jwt["y"].as_str().unwrap().len(), 43);
        assert!(jwt.get("x5c").is_none());

        let jwt_only = jwt_jwks(&jwt_keys);
        assert_eq!(jwt_only["keys"], json!([jwt.clone()]));
    }

    #[test]
    fn pem_round_trips_and_rejects_junk() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (a, b) = (material(), material());
        let certs = vec![a.cert_der.clone(), b.cert_der.clone()];
        let pem = bundle_pem(&certs);
        assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(parse_pem_certs(&pem).unwrap(), certs);

        assert!(matches!(
            parse_pem_certs(""),
            Err(CaError::MalformedCertificate(_))
        ));
        let not_x509 = bundle_pem(&[b"hello".to_vec()]);
        assert!(matches!(
            parse_pem_certs(&not_x509),
            Err(CaError::MalformedCertificate(_))
        ));
        let broken = "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            parse_pem_certs(broken),
            Err(CaError::MalformedCertificate(_))
        ));
    }
}
