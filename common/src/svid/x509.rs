//! X.509 side of the CA: generating a trust domain's self-signed signing certificate and
//! turning workload CSRs into X509-SVIDs that follow the SPIFFE rules. The certificate is
//! built only from the caller's request; the CSR contributes its public key and nothing else.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber, SignatureAlgorithm, SigningKey,
};
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;
use zeroize::Zeroizing;

use super::csr::{CsrPublicKey, check_csr_requests, verify_csr_signature};
use crate::svid::error::truncate_for_message;
use crate::svid::{CaError, expiry, unix_seconds};

/// SPIRE backdates notBefore by this much so peers with slightly slow clocks accept the SVID.
pub const BACKDATE_SECS: i64 = 10;

/// Organisation written into every certificate's subject, so that the subject is never
/// empty and the SAN extension need not be critical (RFC 5280 4.2.1.6).
const SUBJECT_ORGANIZATION: &str = "Mayfly";

/// Everything a freshly generated CA consists of, ready to be persisted by the caller.
pub struct CaMaterial {
    /// The self-signed CA certificate, DER.
    pub cert_der: Vec<u8>,
    /// The CA's ECDSA P-256 private key, PKCS#8 DER.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// Key id of the JWT signing key: 32 URL-safe characters.
    pub jwt_kid: String,
    /// The JWT signing key (ECDSA P-256), PKCS#8 DER.
    pub jwt_key_pkcs8: Zeroizing<Vec<u8>>,
    /// The JWT signing key's public half, SubjectPublicKeyInfo DER.
    pub jwt_public_spki: Vec<u8>,
    /// Start of the CA certificate's validity, unix seconds.
    pub not_before: i64,
    /// End of the CA certificate's validity, unix seconds.
    pub not_after: i64,
}

impl fmt::Debug for CaMaterial {
    // Written by hand so that no formatting of this struct can ever leak key bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial")
            .field("cert_der", &format_args!("<{} bytes>", self.cert_der.len()))
            .field("key_pkcs8", &"<redacted>")
            .field("jwt_kid", &self.jwt_kid)
            .field("jwt_key_pkcs8", &"<redacted>")
            .field(
                "jwt_public_spki",
                &format_args!("<{} bytes>", self.jwt_public_spki.len()),
            )
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// What the caller (the registration entry, the agent, the daemon itself) grants to the
/// certificate. Nothing in the CSR can add to this.
#[derive(Clone, Copy, Debug, Default)]
pub struct SvidRequest<'a> {
    /// The SPIFFE ID, already validated; it must have a path.
    pub spiffe_id: &'a str,
    /// Extra DNS SANs.
    pub dns_names: &'a [String],
    /// Extra IP SANs (the daemon's own serving certificate uses 127.0.0.1).
    pub ip_addresses: &'a [IpAddr],
    /// Requested lifetime; capped at the CA's notAfter.
    pub ttl: Duration,
}

impl<'a> SvidRequest<'a> {
    /// A request for just the SPIFFE ID, without DNS or IP SANs.
    pub fn new(spiffe_id: &'a str, ttl: Duration) -> Self {
        Self {
            spiffe_id,
            ttl,
            ..Self::default()
        }
    }
}

/// A freshly signed X509-SVID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedSvid {
    /// The leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// The serial number, lowercase hex without leading zero bytes.
    pub serial_hex: String,
    /// Start of validity, unix seconds (already backdated).
    pub not_before: i64,
    /// End of validity, unix seconds.
    pub not_after: i64,
}

/// A loaded signing CA, ready to sign many SVIDs concurrently (share it in an `Arc`).
pub struct X509Authority {
    cert_der: Vec<u8>,
    trust_domain: Option<String>,
    not_after: i64,
    subject_key_id: Vec<u8>,
    issuer: Issuer<'static, EcdsaSigner>,
}

impl X509Authority {
    /// Loads a CA from its certificate and PKCS#8 ECDSA P-256 key, checking that they belong
    /// together and that certificates signed by it will chain back to it.
    pub fn new(cert_der: &[u8], key_pkcs8: &[u8]) -> Result<Self, CaError> {
        let (rest, cert) = X509Certificate::from_der(cert_der)
            .map_err(|_| CaError::MalformedCaCertificate("it is not a DER X.509 certificate"))?;
        if !rest.is_empty() {
            return Err(CaError::MalformedCaCertificate(
                "trailing bytes after the certificate",
            ));
        }
        if !cert.is_ca() {
            return Err(CaError::MalformedCaCertificate(
                "basicConstraints does not say cA=true",
            ));
        }
        let signer = EcdsaSigner::from_pkcs8(key_pkcs8)?;
        if signer.der_bytes() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(CaError::CaKeyMismatch);
        }
        let subject_key_id = cert
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .ok_or(CaError::MalformedCaCertificate(
                "it has no subjectKeyIdentifier",
            ))?;
        let trust_domain = ca_trust_domain(&cert)?;

        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name_from(cert.subject())?;
        // Leaves' authorityKeyIdentifier must equal the CA's SKI byte for byte, whatever
        // method produced it, so take it from the certificate rather than recomputing it.
        params.key_identifier_method = KeyIdMethod::PreSpecified(subject_key_id.clone());
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let authority = Self {
            cert_der: cert_der.to_vec(),
            trust_domain,
            not_after: cert.validity().not_after.timestamp(),
            subject_key_id,
            issuer: Issuer::new(params, signer),
        };
        authority.check_issuer_name_round_trips(cert.subject())?;
        Ok(authority)
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// End of the CA certificate's validity, unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The CA's subjectKeyIdentifier (leaves carry it as their authorityKeyIdentifier).
    pub fn subject_key_id(&self) -> Vec<u8> {
        self.subject_key_id.clone()
    }

    /// The trust domain named by the CA's SPIFFE ID, if it carries one.
    pub fn trust_domain(&self) -> Option<&str> {
        self.trust_domain.as_deref()
    }

    /// Verifies the CSR, checks it asks for nothing beyond `req`, and signs an X509-SVID
    /// built from `req` alone.
    pub fn sign_svid(
        &self,
        csr_der: &[u8],
        req: &SvidRequest<'_>,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        check_leaf_spiffe_id(req.spiffe_id, self.trust_domain.as_deref())?;
        let now_secs = unix_seconds(now)?;
        if now_secs >= self.not_after {
            return Err(CaError::CaExpired(self.not_after));
        }
        let not_before = now_secs - BACKDATE_SECS;
        let not_after = match expiry(now_secs, req.ttl) {
            Ok(t) => t.min(self.not_after),
            // A TTL too long to encode is still capped by the CA's own lifetime.
            Err(_) if !req.ttl.is_zero() => self.not_after,
            Err(e) => return Err(e),
        };

        let (rest, csr) = X509CertificationRequest::from_der(csr_der)
            .map_err(|_| CaError::MalformedCsr("it does not parse"))?;
        if !rest.is_empty() {
            return Err(CaError::MalformedCsr("trailing bytes after the request"));
        }
        let subject_key = verify_csr_signature(&csr)?;
        check_csr_requests(&csr, req)?;

        let mut params = leaf_params(req)?;
        let serial = random_serial(now)?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        set_validity(&mut params, not_before, not_after);
        let cert = params
            .signed_by(&subject_key, &self.issuer)
            .map_err(encoding_error)?;
        Ok(IssuedSvid {
            cert_der: cert.der().to_vec(),
            serial_hex: serial_hex(&serial),
            not_before,
            not_after,
        })
    }

    /// Signs a throwaway leaf for the CA's own key and checks its issuer name is the CA's
    /// subject byte for byte: path validators (webpki among them) compare names as bytes, so a
    /// subject rebuilt with a different string type would silently break every chain.
    fn check_issuer_name_round_trips(&self, ca_subject: &X509Name<'_>) -> Result<(), CaError> {
        let probe_key = CsrPublicKey {
            raw: self.issuer.key().der_bytes(),
            alg: &rcgen::PKCS_ECDSA_P256_SHA256,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = leaf_subject();
        let probe = params
            .signed_by(&probe_key, &self.issuer)
            .map_err(encoding_error)?;
        let (_, parsed) = X509Certificate::from_der(probe.der())
            .map_err(|_| CaError::CertificateEncoding("probe certificate does not parse".into()))?;
        if parsed.issuer().as_raw() != ca_subject.as_raw() {
            return Err(CaError::MalformedCaCertificate(
                "its subject name cannot be reproduced exactly as an issuer name",
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for X509Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Authority")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("subject_key_id", &hex::encode(&self.subject_key_id))
            .finish_non_exhaustive()
    }
}

/// Generates a new CA for `trust_domain`: a self-signed ECDSA P-256 certificate valid from
/// `now - 10 s` to `now + ttl`, plus a separate P-256 key for signing JWT-SVIDs.
pub fn generate_ca(
    trust_domain: &str,
    ttl: Duration,
    now: SystemTime,
) -> Result<CaMaterial, CaError> {
    if trust_domain.is_empty() || trust_domain.contains(['/', ':', '@']) {
        return Err(CaError::InvalidTrustDomain(truncate_for_message(
            trust_domain,
        )));
    }
    let now_secs = unix_seconds(now)?;
    let not_before = now_secs - BACKDATE_SECS;
    let not_after = expiry(now_secs, ttl)?;

    let (key_pkcs8, signer) = EcdsaSigner::generate()?;
    let serial = random_serial(now)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, SUBJECT_ORGANIZATION);
    // The serial in the CN tells successive CAs of one trust domain apart in logs and tools.
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Mayfly CA {}", serial_hex(&serial)),
    );
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.subject_alt_names = vec![SanType::URI(ia5(&format!("spiffe://{trust_domain}"))?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, not_before, not_after);
    let cert = params.self_signed(&signer).map_err(encoding_error)?;

    let (jwt_key_pkcs8, jwt_signer) = EcdsaSigner::generate()?;
    let jwt_public_spki = jwt_signer
        .key
        .public_key()
        .as_der()
        .map_err(|_| CaError::KeyGeneration)?
        .as_ref()
        .to_vec();
    Ok(CaMaterial {
        cert_der: cert.der().to_vec(),
        key_pkcs8,
        jwt_kid: random_kid()?,
        jwt_key_pkcs8,
        jwt_public_spki,
        not_before,
        not_after,
    })
}

/// An ECDSA P-256 key held only inside aws-lc, so that no plain copy of the private key
/// lingers in our memory (rcgen's own `KeyPair` keeps an unzeroized PKCS#8 copy).
pub(super) struct EcdsaSigner {
    key: EcdsaKeyPair,
}

impl EcdsaSigner {
    pub(super) fn generate() -> Result<(Zeroizing<Vec<u8>>, Self), CaError> {
        let document = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &SystemRandom::new(),
        )
        .map_err(|_| CaError::KeyGeneration)?;
        let pkcs8 = Zeroizing::new(document.as_ref().to_vec());
        let signer = Self::from_pkcs8(&pkcs8)?;
        Ok((pkcs8, signer))
    }

    fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, CaError> {
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
            .map_err(|_| CaError::InvalidPrivateKey)?;
        Ok(Self { key })
    }
}

impl PublicKeyData for EcdsaSigner {
    fn der_bytes(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for EcdsaSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key
            .sign(&SystemRandom::new(), msg)
            .map(|sig| sig.as_ref().to_vec())
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

/// The leaf certificate's content, from the request only.
fn leaf_params(req: &SvidRequest<'_>) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = leaf_subject();
    let mut sans = Vec::with_capacity(1 + req.dns_names.len() + req.ip_addresses.len());
    sans.push(SanType::URI(ia5(req.spiffe_id)?));
    for dns in req.dns_names {
        sans.push(SanType::DnsName(ia5(dns)?));
    }
    sans.extend(req.ip_addresses.iter().copied().map(SanType::IpAddress));
    params.subject_alt_names = sans;
    // ExplicitNoCa writes basicConstraints cA=false and, with it, the subjectKeyIdentifier.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn leaf_subject() -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, SUBJECT_ORGANIZATION);
    dn
}

/// A leaf ID needs a path, and must belong to the CA's trust domain when the CA names one.
fn check_leaf_spiffe_id(spiffe_id: &str, trust_domain: Option<&str>) -> Result<(), CaError> {
    let without_path = || CaError::SpiffeIdWithoutPath(truncate_for_message(spiffe_id));
    let rest = spiffe_id
        .strip_prefix("spiffe://")
        .ok_or_else(without_path)?;
    let (td, path) = rest.split_once('/').ok_or_else(without_path)?;
    if td.is_empty() || path.is_empty() {
        return Err(without_path());
    }
    match trust_domain {
        Some(ca_td) if ca_td != td => Err(CaError::TrustDomainMismatch {
            spiffe_id: truncate_for_message(spiffe_id),
            trust_domain: ca_td.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// The trust domain of the CA's SPIFFE ID; a CA's ID must not have a path.
fn ca_trust_domain(cert: &X509Certificate<'_>) -> Result<Option<String>, CaError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| CaError::MalformedCaCertificate("its SAN extension does not parse"))?;
    let Some(san) = san else {
        return Ok(None);
    };
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && let Some(rest) = uri.strip_prefix("spiffe://")
        {
            if rest.is_empty() || rest.contains('/') {
                return Err(CaError::MalformedCaCertificate(
                    "its SPIFFE ID must be spiffe://<trust domain> without a path",
                ));
            }
            return Ok(Some(rest.to_owned()));
        }
    }
    Ok(None)
}

/// Rebuilds a certificate subject as rcgen's name type, keeping each value's string type so
/// the encoding stays identical.
fn distinguished_name_from(name: &X509Name<'_>) -> Result<DistinguishedName, CaError> {
    let unsupported =
        || CaError::MalformedCaCertificate("its subject uses a name form Mayfly cannot reissue");
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(unsupported());
        };
        let arcs: Vec<u64> = attr.attr_type().iter().ok_or_else(unsupported)?.collect();
        let value = attr.attr_value();
        let text = std::str::from_utf8(value.data).map_err(|_| unsupported())?;
        let dn_value = match value.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(
                PrintableString::try_from(text).map_err(|_| unsupported())?,
            ),
            Tag::Ia5String => {
                DnValue::Ia5String(Ia5String::try_from(text).map_err(|_| unsupported())?)
            }
            _ => return Err(unsupported()),
        };
        let ty = DnType::from_oid(&arcs);
        // rcgen keeps one value per attribute type; a repeated type would be lost.
        if dn.get(&ty).is_some() {
            return Err(unsupported());
        }
        dn.push(ty, dn_value);
    }
    Ok(dn)
}

fn set_validity(params: &mut CertificateParams, not_before: i64, not_after: i64) {
    // rcgen takes `time::OffsetDateTime`; building it as "epoch + seconds" from rcgen's own
    // helper avoids a direct dependency on the `time` crate. Both values are non-negative and
    // below the year 10000 (checked by `unix_seconds`/`expiry`), so the additions cannot
    // overflow; the epoch date is a valid constant, so `date_time_ymd` cannot panic.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + Duration::from_secs(not_before.max(0).unsigned_abs());
    params.not_after = epoch + Duration::from_secs(not_after.max(0).unsigned_abs());
}

/// 128 random bits, non-zero; rcgen encodes them as a positive INTEGER (adding a leading zero
/// byte when the top bit is set), which stays within RFC 5280's 20-octet limit.
/// A certificate serial: the issuing millisecond (48 bits) then 80 random bits. The random
/// part alone is more than the 64 bits of CSPRNG output the CA/Browser Forum asks of
/// public CAs. The time first makes serials of one CA sort in the order they were issued,
/// so the daemon's index of issued serials grows at its end: with random serials every
/// signing dirtied another page of it, and those pages were most of what each audit
/// commit wrote. The first byte is the time's highest, 0x01 until 2039, never zero (a
/// clock before 2004 counts as 2004).
fn random_serial(now: SystemTime) -> Result<[u8; 16], CaError> {
    let ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        .max(1 << 40);
    let mut serial = [0u8; 16];
    serial[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    aws_lc_rs::rand::fill(&mut serial[6..]).map_err(|_| CaError::KeyGeneration)?;
    Ok(serial)
}

/// Hex of the serial as a number, matching what parsers report for the certificate.
fn serial_hex(serial: &[u8]) -> String {
    let first = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    hex::encode(&serial[first..])
}

/// 24 random bytes in URL-safe base64: exactly 32 characters, safe in JSON and headers.
fn random_kid() -> Result<String, CaError> {
    use base64::Engine as _;

    let mut bytes = [0u8; 24];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| CaError::KeyGeneration)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

pub(super) fn ia5(s: &str) -> Result<Ia5String, CaError> {
    Ia5String::try_from(s).map_err(|_| CaError::InvalidSan(truncate_for_message(s)))
}

pub(super) fn encoding_error(e: rcgen::Error) -> CaError {
    CaError::CertificateEncoding(e.to_string())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::UNIX_EPOCH;

    use x509_parser::extensions::{ParsedExtension, X509Extension};

    use aws_lc_rs::signature::UnparsedPublicKey;
    use x509_parser::x509::SubjectPublicKeyInfo;

    use super::*;
    use crate::svid::generate_csr;

    const TD: &str = "example.org";
    const WEB: &str = "spiffe://example.org/ns/web";
    const DAY: Duration = Duration::from_secs(24 * 3600);
    const HOUR: Duration = Duration::from_secs(3600);

    /// A fixed clock with a sub-second part, to show that times are rounded down.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::new(1_760_000_000, 750_000_000)
    }

    fn authority() -> (CaMaterial, X509Authority) {
        let material = generate_ca(TD, DAY, now()).unwrap();
        let authority = X509Authority::new(&material.cert_der, &material.key_pkcs8).unwrap();
        (material, authority)
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        let (rest, cert) = X509Certificate::from_der(der).unwrap();
        assert!(rest.is_empty());
        cert
    }

    fn find_ext<'a>(cert: &'a X509Certificate<'_>, oid_str: &str) -> &'a X509Extension<'a> {
        cert.iter_extensions()
            .find(|e| e.oid.to_id_string() == oid_str)
            .unwrap_or_else(|| panic!("extension {oid_str} missing"))
    }

    fn uris_and_dns(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<String>, Vec<Vec<u8>>) {
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let (mut uris, mut dns, mut ips) = (vec![], vec![], vec![]);
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(ip) => ips.push(ip.to_vec()),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
        (uris, dns, ips)
    }

    fn verify_signed_by(cert: &X509Certificate<'_>, ca: &X509Certificate<'_>) {
        UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_ASN1,
            ca.public_key().subject_public_key.data.as_ref(),
        )
        .verify(
            cert.tbs_certificate.as_ref(),
            cert.signature_value.data.as_ref(),
        )
        .expect("certificate signature must verify under the CA key");
    }

    #[test]
    fn ca_certificate_follows_signing_certificate_rules() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (material, _) = authority();
        let ca = parse(&material.cert_der);

        let bc = ca.basic_constraints().unwrap().unwrap();
        assert!(bc.critical);
        assert!(bc.value.ca);
        let ku = ca.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.key_cert_sign());
        assert!(ku.value.crl_sign());
        assert!(ku.value.digital_signature());
        let (uris, dns, ips) = uris_and_dns(&ca);
        assert_eq!(uris, vec!["spiffe://example.org".to_owned()]);
        assert!(dns.is_empty() && ips.is_empty());
        assert_eq!(
            ca.subject()
                .iter_organization()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "Mayfly"
        );
        assert!(ca.subject().iter_common_name().next().is_some());
        assert!(
            ca.serial.bits() > 64,
            "serial should carry ~128 random bits"
        );
        assert!(find_ext(&ca, "2.5.29.14").value.len() > 2, "SKI present");

        let expected_now = 1_760_000_000;
        assert_eq!(ca.validity().not_before.timestamp(), expected_now - 10);
        assert_eq!(ca.validity().not_after.timestamp(), expected_now + 86_400);
        assert_eq!(material.not_before, expected_now - 10);
        assert_eq!(material.not_after, expected_now + 86_400);
        verify_signed_by(&ca, &ca);

        assert_eq!(material.jwt_kid.len(), 32);
        assert!(
            material
                .jwt_kid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert!(SubjectPublicKeyInfo::from_der(&material.jwt_public_spki).is_ok());
        assert_ne!(
            material.key_pkcs8.as_slice(),
            material.jwt_key_pkcs8.as_slice()
        );
    }

    #[test]
    fn two_cas_have_distinct_subjects_and_serials() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let a = generate_ca(TD, DAY, now()).unwrap();
        let b = generate_ca(TD, DAY, now()).unwrap();
        let (a, b) = (parse(&a.cert_der), parse(&b.cert_der));
        assert_ne!(a.subject().as_raw(), b.subject().as_raw());
        assert_ne!(a.serial, b.serial);
    }

    #[test]
    fn svid_follows_every_leaf_rule() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (material, authority) = authority();
        let (_key, csr) = generate_csr(Some(WEB)).unwrap();
        let dns = vec!["web.example.org".to_owned()];
        let req = SvidRequest {
            dns_names: &dns,
            ..SvidRequest::new(WEB, HOUR)
        };
        let svid = authority.sign_svid(&csr, &req, now()).unwrap();
        let leaf = parse(&svid.cert_der);
        let ca = parse(&material.cert_der);

        let (uris, dns_sans, ips) = uris_and_dns(&leaf);
        assert_eq!(uris, vec![WEB.to_owned()], "exactly one URI SAN");
        assert_eq!(dns_sans, dns);
        assert!(ips.is_empty());
        // The subject is not empty, so the SAN need not be critical.
        assert!(leaf.subject().iter_organization().next().is_some());

        let bc = leaf.basic_constraints().unwrap().expect("basicConstraints");
        assert!(!bc.value.ca);
        let ku = leaf.key_usage().unwrap().expect("keyUsage");
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign());
        assert!(!ku.value.crl_sign());
        let eku = leaf.extended_key_usage().unwrap().expect("EKU");
        assert!(eku.value.server_auth && eku.value.client_auth);

        let aki = leaf
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone(),
                _ => None,
            })
            .expect("AKI");
        assert_eq!(aki.0, authority.subject_key_id().as_slice());
        let ca_ski = ca
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .unwrap();
        assert_eq!(aki.0, ca_ski.as_slice());
        assert!(leaf.iter_extensions().any(|e| matches!(
            e.parsed_extension(),
            ParsedExtension::SubjectKeyIdentifier(_)
        )));

        let now_secs = 1_760_000_000;
        assert_eq!(leaf.validity().not_before.timestamp(), now_secs - 10);
        assert_eq!(leaf.validity().not_after.timestamp(), now_secs + 3600);
        assert_eq!(
            (svid.not_before, svid.not_after),
            (now_secs - 10, now_secs + 3600)
        );

        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        verify_signed_by(&leaf, &ca);
        assert_eq!(svid.serial_hex, hex::encode(leaf.serial.to_bytes_be()));
        assert!(leaf.serial.bits() > 64);

        let (_, parsed_csr) = X509CertificationRequest::from_der(&csr).unwrap();
        assert_eq!(
            leaf.public_key().raw,
            parsed_csr.certification_request_info.subject_pki.raw,
            "the leaf certifies the CSR's key"
        );
    }

    #[test]
    fn serials_sort_in_issuing_order_and_keep_80_random_bits() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        let (_key, csr) = generate_csr(None).unwrap();
        let req = SvidRequest::new(WEB, HOUR);
        let serials: Vec<String> = (0..50u64)
            .map(|i| {
                let at = now() + Duration::from_millis(i);
                authority.sign_svid(&csr, &req, at).unwrap().serial_hex
            })
            .collect();
        assert!(serials.windows(2).all(|w| w[0] < w[1]), "{serials:?}");
        assert!(
            serials
                .iter()
                .all(|s| s.len() == 32 && !s.starts_with("00"))
        );
        // Signed in the same millisecond, they differ in the random part.
        let same: std::collections::HashSet<String> = (0..50)
            .map(|_| authority.sign_svid(&csr, &req, now()).unwrap().serial_hex)
            .collect();
        assert_eq!(same.len(), 50);
        assert!(same.iter().all(|s| s[..12] == serials[0][..12]));
    }

    #[test]
    fn serials_differ_across_signings() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        let (_key, csr) = generate_csr(None).unwrap();
        let req = SvidRequest::new(WEB, HOUR);
        let a = authority.sign_svid(&csr, &req, now()).unwrap();
        let b = authority.sign_svid(&csr, &req, now()).unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
        assert_ne!(parse(&a.cert_der).serial, parse(&b.cert_der).serial);
    }

    #[test]
    fn not_after_is_capped_at_the_ca_not_after() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (material, authority) = authority();
        let (_key, csr) = generate_csr(None).unwrap();
        let later = now() + Duration::from_secs(20 * 3600);
        let svid = authority
            .sign_svid(&csr, &SvidRequest::new(WEB, 10 * HOUR), later)
            .unwrap();
        assert_eq!(svid.not_after, material.not_after);
        assert_eq!(
            parse(&svid.cert_der).validity().not_after.timestamp(),
            authority.not_after()
        );
        // Even an absurd TTL is capped rather than refused.
        let svid = authority
            .sign_svid(&csr, &SvidRequest::new(WEB, Duration::MAX), now())
            .unwrap();
        assert_eq!(svid.not_after, material.not_after);
    }

    #[test]
    fn expired_ca_and_zero_ttl_are_refused() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        let (_key, csr) = generate_csr(None).unwrap();
        let after_expiry = now() + 2 * DAY;
        assert!(matches!(
            authority.sign_svid(&csr, &SvidRequest::new(WEB, HOUR), after_expiry),
            Err(CaError::CaExpired(_))
        ));
        assert!(matches!(
            authority.sign_svid(&csr, &SvidRequest::new(WEB, Duration::ZERO), now()),
            Err(CaError::InvalidTtl)
        ));
    }

    #[test]
    fn server_certificate_carries_dns_and_ip_sans() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        let (_key, csr) = generate_csr(None).unwrap();
        let dns = vec!["localhost".to_owned()];
        let ips = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let req = SvidRequest {
            spiffe_id: "spiffe://example.org/mayfly/server",
            dns_names: &dns,
            ip_addresses: &ips,
            ttl: HOUR,
        };
        let svid = authority.sign_svid(&csr, &req, now()).unwrap();
        let leaf = parse(&svid.cert_der);
        let (uris, dns_sans, ip_sans) = uris_and_dns(&leaf);
        assert_eq!(uris, vec!["spiffe://example.org/mayfly/server".to_owned()]);
        assert_eq!(dns_sans, dns);
        assert_eq!(ip_sans, vec![vec![127, 0, 0, 1]]);
    }

    #[test]
    fn tampered_csr_signature_is_rejected() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        let (_key, mut csr) = generate_csr(Some(WEB)).unwrap();
        // The last byte belongs to the signature's s value: the CSR still parses.
        let last = csr.len() - 1;
        csr[last] ^= 0x01;
        assert!(matches!(
            authority.sign_svid(&csr, &SvidRequest::new(WEB, HOUR), now()),
            Err(CaError::CsrSignatureInvalid)
        ));
    }

    #[test]
    fn garbage_csr_is_malformed() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        for garbage in [&b""[..], b"not a csr", &[0x30, 0x82, 0xff, 0xff, 0x00]] {
            assert!(matches!(
                authority.sign_svid(garbage, &SvidRequest::new(WEB, HOUR), now()),
                Err(CaError::MalformedCsr(_))
            ));
        }
        let (_key, mut csr) = generate_csr(None).unwrap();
        csr.push(0);
        assert!(matches!(
            authority.sign_svid(&csr, &SvidRequest::new(WEB, HOUR), now()),
            Err(CaError::MalformedCsr(_))
        ));
    }

    #[test]
    fn csr_asking_for_a_ca_certificate_is_rejected() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap();
        assert!(matches!(
            authority.sign_svid(csr.der(), &SvidRequest::new(WEB, HOUR), now()),
            Err(CaError::CsrRequestsCa)
        ));
    }

    #[test]
    fn csr_asking_for_sans_beyond_the_request_is_rejected() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(ia5(WEB).unwrap()),
            SanType::URI(ia5("spiffe://example.org/ns/admin").unwrap()),
        ];
        let csr = params.serialize_request(&key).unwrap();
        let err = authority
            .sign_svid(csr.der(), &SvidRequest::new(WEB, HOUR), now())
            .unwrap_err();
        assert!(matches!(&err, CaError::CsrUnexpectedSan(s) if s.contains("ns/admin")));

        // A DNS name is accepted only when the request grants it.
        params.subject_alt_names = vec![SanType::DnsName(ia5("web.example.org").unwrap())];
        let csr = params.serialize_request(&key).unwrap();
        assert!(matches!(
            authority.sign_svid(csr.der(), &SvidRequest::new(WEB, HOUR), now()),
            Err(CaError::CsrUnexpectedSan(_))
        ));
        let dns = vec!["web.example.org".to_owned()];
        let req = SvidRequest {
            dns_names: &dns,
            ..SvidRequest::new(WEB, HOUR)
        };
        assert!(authority.sign_svid(csr.der(), &req, now()).is_ok());
    }

    #[test]
    fn csr_extensions_never_reach_the_certificate() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        let csr = params.serialize_request(&key).unwrap();
        let svid = authority
            .sign_svid(csr.der(), &SvidRequest::new(WEB, HOUR), now())
            .unwrap();
        let leaf = parse(&svid.cert_der);
        assert!(!leaf.key_usage().unwrap().unwrap().value.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value.clone();
        assert!(!eku.code_signing && eku.server_auth && eku.client_auth);
        // The CSR's subject (rcgen's default CN) is not copied either.
        assert!(leaf.subject().iter_common_name().next().is_none());
    }

    #[test]
    fn leaf_ids_need_a_path_and_the_ca_trust_domain() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        let (_key, csr) = generate_csr(None).unwrap();
        for id in ["spiffe://example.org", "spiffe://example.org/"] {
            assert!(matches!(
                authority.sign_svid(&csr, &SvidRequest::new(id, HOUR), now()),
                Err(CaError::SpiffeIdWithoutPath(_))
            ));
        }
        assert!(matches!(
            authority.sign_svid(&csr, &SvidRequest::new("spiffe://other.org/x", HOUR), now()),
            Err(CaError::TrustDomainMismatch { .. })
        ));
    }

    #[test]
    fn other_key_types_are_certified_as_sent() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (material, authority) = authority();
        let ca = parse(&material.cert_der);
        for alg in [
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
            &rcgen::PKCS_RSA_SHA256,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let csr = CertificateParams::default()
                .serialize_request(&key)
                .unwrap();
            let svid = authority
                .sign_svid(csr.der(), &SvidRequest::new(WEB, HOUR), now())
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            let leaf = parse(&svid.cert_der);
            let (_, parsed_csr) = X509CertificationRequest::from_der(csr.der()).unwrap();
            assert_eq!(
                leaf.public_key().raw,
                parsed_csr.certification_request_info.subject_pki.raw,
                "{alg:?}"
            );
            verify_signed_by(&leaf, &ca);
        }
    }

    #[test]
    fn unsupported_curves_are_named_in_the_error() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, authority) = authority();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let err = authority
            .sign_svid(csr.der(), &SvidRequest::new(WEB, HOUR), now())
            .unwrap_err();
        assert!(matches!(&err, CaError::UnsupportedKeyType(s) if s.contains("1.3.132.0.35")));
    }

    #[test]
    fn authority_refuses_a_key_that_does_not_match() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let a = generate_ca(TD, DAY, now()).unwrap();
        let b = generate_ca(TD, DAY, now()).unwrap();
        assert!(matches!(
            X509Authority::new(&a.cert_der, &b.key_pkcs8),
            Err(CaError::CaKeyMismatch)
        ));
        assert!(matches!(
            X509Authority::new(&a.cert_der, b"junk"),
            Err(CaError::InvalidPrivateKey)
        ));
        assert!(matches!(
            X509Authority::new(b"junk", &a.key_pkcs8),
            Err(CaError::MalformedCaCertificate(_))
        ));
        let authority = X509Authority::new(&a.cert_der, &a.key_pkcs8).unwrap();
        assert_eq!(authority.cert_der(), a.cert_der.as_slice());
        assert_eq!(authority.trust_domain(), Some(TD));
    }

    #[test]
    fn authority_can_be_shared_across_threads() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<X509Authority>();

        let (_, authority) = authority();
        let authority = std::sync::Arc::new(authority);
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let authority = authority.clone();
                std::thread::spawn(move || {
                    let (_key, csr) = generate_csr(None).unwrap();
                    authority
                        .sign_svid(&csr, &SvidRequest::new(WEB, HOUR), now())
                        .unwrap()
                        .serial_hex
                })
            })
            .collect();
        let serials: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_ne!(serials[0], serials[1]);
    }

    #[test]
    fn debug_output_never_shows_key_bytes() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (material, authority) = authority();
        let shown = format!("{material:?} {authority:?}");
        for secret in [
            material.key_pkcs8.as_slice(),
            material.jwt_key_pkcs8.as_slice(),
        ] {
            assert!(!shown.contains(&format!("{secret:?}")));
            assert!(!shown.contains(&format!("{:?}", &secret[secret.len() - 8..])));
            assert!(!shown.contains(&hex::encode(secret)));
        }
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn generated_csr_carries_the_requested_id() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (key, csr) = generate_csr(Some(WEB)).unwrap();
        assert!(EcdsaSigner::from_pkcs8(&key).is_ok());
        let (_, parsed) = X509CertificationRequest::from_der(&csr).unwrap();
        let names: Vec<String> = parsed
            .requested_extensions()
            .unwrap()
            .filter_map(|ext| match ext {
                ParsedExtension::SubjectAlternativeName(san) => Some(san),
                _ => None,
            })
            .flat_map(|san| san.general_names.iter())
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(names, vec![WEB.to_owned()]);
    }
}
