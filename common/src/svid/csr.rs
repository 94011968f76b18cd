//! The CSR side of signing: making a key and CSR (agents and tests), checking a workload's
//! CSR's self-signature and key type, and refusing one that asks for names or extensions
//! its entry does not grant. Only the public key of an accepted CSR reaches the certificate.

use std::net::IpAddr;

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use rcgen::{CertificateParams, DistinguishedName, PublicKeyData, SanType, SignatureAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_PKCS1_SHA256WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
    OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_SUBJECT_ALT_NAME,
};
use x509_parser::public_key::PublicKey as ParsedPublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;
use zeroize::Zeroizing;

use super::x509::{EcdsaSigner, SvidRequest, encoding_error, ia5};
use crate::svid::error::truncate_for_message;
use crate::svid::{CaError, is_secp384r1};

/// Creates a fresh ECDSA P-256 key and a CSR for it, optionally carrying `spiffe_id` as a
/// URI SAN. Returns (PKCS#8 key, CSR DER). Used by agents and tests.
pub fn generate_csr(spiffe_id: Option<&str>) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), CaError> {
    let (key_pkcs8, signer) = EcdsaSigner::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = spiffe_id {
        params.subject_alt_names.push(SanType::URI(ia5(id)?));
    }
    let csr = params.serialize_request(&signer).map_err(encoding_error)?;
    Ok((key_pkcs8, csr.der().to_vec()))
}

/// The subject public key taken from a verified CSR, in the form rcgen writes into the
/// certificate: the raw key bits plus the algorithm that names its SPKI OIDs.
pub(super) struct CsrPublicKey<'a> {
    pub(super) raw: &'a [u8],
    pub(super) alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrPublicKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Checks the CSR's self-signature (proof that the requester holds the private key) and
/// returns its public key if the key type is one we issue for.
pub(super) fn verify_csr_signature<'a>(
    csr: &'a X509CertificationRequest<'a>,
) -> Result<CsrPublicKey<'a>, CaError> {
    let spki = &csr.certification_request_info.subject_pki;
    let sig_oid = &csr.signature_algorithm.algorithm;
    let key_bits: &[u8] = spki.subject_public_key.data.as_ref();
    let unsupported_sig = || CaError::UnsupportedSignatureAlgorithm(sig_oid.to_id_string());

    let (verification, verify_key, cert_alg): (
        &'static dyn signature::VerificationAlgorithm,
        &[u8],
        &'static SignatureAlgorithm,
    ) = match key_kind(spki)? {
        KeyKind::P256 => {
            let verification: &'static dyn signature::VerificationAlgorithm =
                if *sig_oid == OID_SIG_ECDSA_WITH_SHA256 {
                    &signature::ECDSA_P256_SHA256_ASN1
                } else if *sig_oid == OID_SIG_ECDSA_WITH_SHA384 {
                    &signature::ECDSA_P256_SHA384_ASN1
                } else {
                    return Err(unsupported_sig());
                };
            (verification, key_bits, &rcgen::PKCS_ECDSA_P256_SHA256)
        }
        KeyKind::P384 => {
            let verification: &'static dyn signature::VerificationAlgorithm =
                if *sig_oid == OID_SIG_ECDSA_WITH_SHA384 {
                    &signature::ECDSA_P384_SHA384_ASN1
                } else if *sig_oid == OID_SIG_ECDSA_WITH_SHA256 {
                    &signature::ECDSA_P384_SHA256_ASN1
                } else {
                    return Err(unsupported_sig());
                };
            (verification, key_bits, &rcgen::PKCS_ECDSA_P384_SHA384)
        }
        KeyKind::Rsa => {
            if *sig_oid != OID_PKCS1_SHA256WITHRSA {
                return Err(unsupported_sig());
            }
            (
                &signature::RSA_PKCS1_2048_8192_SHA256,
                key_bits,
                &rcgen::PKCS_RSA_SHA256,
            )
        }
        KeyKind::Ed25519 => {
            if *sig_oid != OID_SIG_ED25519 {
                return Err(unsupported_sig());
            }
            (&signature::ED25519, key_bits, &rcgen::PKCS_ED25519)
        }
    };

    UnparsedPublicKey::new(verification, verify_key)
        .verify(
            csr.certification_request_info.raw,
            csr.signature_value.data.as_ref(),
        )
        .map_err(|_| CaError::CsrSignatureInvalid)?;
    Ok(CsrPublicKey {
        raw: key_bits,
        alg: cert_alg,
    })
}

/// Public key types a CSR may carry.
enum KeyKind {
    P256,
    P384,
    Rsa,
    Ed25519,
}

fn key_kind(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyKind, CaError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| {
                CaError::UnsupportedKeyType("EC key without a named curve".to_owned())
            })?;
        if curve == OID_EC_P256 {
            return Ok(KeyKind::P256);
        }
        if is_secp384r1(&curve) {
            return Ok(KeyKind::P384);
        }
        return Err(CaError::UnsupportedKeyType(format!(
            "EC curve {}",
            curve.to_id_string()
        )));
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(ParsedPublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CaError::MalformedCsr("the RSA public key does not parse")),
        };
        if !(2048..=8192).contains(&bits) {
            return Err(CaError::UnsupportedKeyType(format!(
                "RSA key of {bits} bits"
            )));
        }
        return Ok(KeyKind::Rsa);
    }
    if *alg == OID_SIG_ED25519 {
        return Ok(KeyKind::Ed25519);
    }
    Err(CaError::UnsupportedKeyType(format!(
        "key algorithm {}",
        alg.to_id_string()
    )))
}

/// Rejects a CSR that asks for more than the registration grants. The certificate ignores
/// the CSR's extensions anyway; refusing here tells a misconfigured client what is wrong
/// instead of silently handing it something else.
pub(super) fn check_csr_requests(
    csr: &X509CertificationRequest<'_>,
    req: &SvidRequest<'_>,
) -> Result<(), CaError> {
    for attr in csr.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(requested) = attr.parsed_attribute() else {
            continue;
        };
        for ext in &requested.extensions {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(CaError::CsrRequestsCa);
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        check_requested_name(name, req)?;
                    }
                }
                ParsedExtension::ParseError { .. }
                    if ext.oid == OID_X509_EXT_SUBJECT_ALT_NAME
                        || ext.oid == OID_X509_EXT_BASIC_CONSTRAINTS =>
                {
                    return Err(CaError::MalformedCsr(
                        "a requested SAN or basicConstraints extension does not parse",
                    ));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn check_requested_name(name: &GeneralName<'_>, req: &SvidRequest<'_>) -> Result<(), CaError> {
    let granted = match name {
        GeneralName::URI(uri) => *uri == req.spiffe_id,
        GeneralName::DNSName(dns) => req.dns_names.iter().any(|d| d.eq_ignore_ascii_case(dns)),
        GeneralName::IPAddress(octets) => {
            ip_from_octets(octets).is_some_and(|ip| req.ip_addresses.contains(&ip))
        }
        _ => false,
    };
    if granted {
        return Ok(());
    }
    let described = match name {
        GeneralName::URI(uri) => format!("URI {uri}"),
        GeneralName::DNSName(dns) => format!("DNS name {dns}"),
        GeneralName::IPAddress(octets) => match ip_from_octets(octets) {
            Some(ip) => format!("IP address {ip}"),
            None => format!("IP address bytes {}", hex::encode(octets)),
        },
        other => format!("{other} (only URI, DNS and IP names are ever granted)"),
    };
    Err(CaError::CsrUnexpectedSan(truncate_for_message(&described)))
}

/// An IPv4 or IPv6 SAN value; any other length is not an address.
fn ip_from_octets(octets: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(octets) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(octets).ok().map(IpAddr::from)
}
