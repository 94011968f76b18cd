//! The one error type of the CA module. Messages name what went wrong in words a caller
//! (an operator, an agent, a workload) can act on, and never carry key material.

/// Everything that can go wrong while generating CA material, issuing SVIDs or
/// validating JWT-SVIDs.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CSR bytes are not a DER PKCS#10 certification request.
    #[error("the CSR is not a valid DER-encoded PKCS#10 request: {0}")]
    MalformedCsr(&'static str),
    /// The CSR's self-signature does not verify under its own public key.
    #[error("the CSR signature does not verify under the CSR's public key")]
    CsrSignatureInvalid,
    /// The CSR asks for a CA certificate (basicConstraints cA=true).
    #[error(
        "the CSR requests a CA certificate (basicConstraints cA=true); only leaf SVIDs are issued"
    )]
    CsrRequestsCa,
    /// The CSR asks for a subject alternative name that the registration does not grant.
    #[error(
        "the CSR requests the subject alternative name {0}, which this identity does not grant"
    )]
    CsrUnexpectedSan(String),
    /// The CSR's public key is of a type or size that is not accepted.
    #[error(
        "unsupported public key in CSR: {0}; use ECDSA P-256 (preferred), P-384, Ed25519 or RSA of 2048 bits or more"
    )]
    UnsupportedKeyType(String),
    /// The CSR is signed with an algorithm that is not accepted for its key type.
    #[error(
        "unsupported CSR signature algorithm {0}; use ECDSA with SHA-256/384, RSA PKCS#1 with SHA-256 or Ed25519"
    )]
    UnsupportedSignatureAlgorithm(String),
    /// A leaf SPIFFE ID must have a path (`spiffe://td/something`).
    #[error(
        "the SPIFFE ID {0} is not a leaf ID; leaf SVIDs need an ID with a path, like spiffe://example.org/workload"
    )]
    SpiffeIdWithoutPath(String),
    /// The SPIFFE ID is not in this CA's trust domain.
    #[error("the SPIFFE ID {spiffe_id} is outside this CA's trust domain {trust_domain}")]
    TrustDomainMismatch {
        /// The ID that was asked for.
        spiffe_id: String,
        /// The trust domain the CA signs for.
        trust_domain: String,
    },
    /// The trust domain name cannot be put in a certificate.
    #[error("the trust domain {0:?} is not valid (expected a lowercase DNS-like name)")]
    InvalidTrustDomain(String),
    /// A SAN value is not representable (for example a non-ASCII DNS name).
    #[error("the subject alternative name {0:?} cannot be encoded (it must be ASCII)")]
    InvalidSan(String),
    /// A TTL of zero or one beyond the year 9999.
    #[error("the TTL must be at least one second and end before the year 10000")]
    InvalidTtl,
    /// The clock reads a time before 1970.
    #[error("the system clock is before 1970-01-01; fix the clock")]
    ClockBeforeEpoch,
    /// The signing CA has already expired, so no certificate can be issued from it.
    #[error("the signing CA expired at unix time {0}; rotate the CA")]
    CaExpired(i64),
    /// The CA certificate cannot be used as a signing certificate.
    #[error("the CA certificate cannot be used: {0}")]
    MalformedCaCertificate(&'static str),
    /// The private key is not a PKCS#8 ECDSA P-256 key.
    #[error("the private key is not a PKCS#8 DER ECDSA P-256 key")]
    InvalidPrivateKey,
    /// The private key does not belong to the CA certificate.
    #[error("the CA private key does not match the CA certificate's public key")]
    CaKeyMismatch,
    /// The operating system's random source or key generation failed.
    #[error("key or random number generation failed in the crypto provider")]
    KeyGeneration,
    /// Encoding or signing a certificate failed.
    #[error("could not encode or sign the certificate: {0}")]
    CertificateEncoding(String),
    /// A certificate in a bundle or PEM file does not parse.
    #[error("a certificate could not be parsed: {0}")]
    MalformedCertificate(String),
    /// A JWT-SVID was requested without an audience.
    #[error("a JWT-SVID needs at least one audience")]
    JwtMissingAudience,
    /// The token is not a well-formed compact JWS with the claims a JWT-SVID needs.
    #[error("the JWT is malformed: {0}")]
    JwtMalformed(&'static str),
    /// The token's `alg` is not ES256 (this includes `none`).
    #[error("the JWT algorithm {0:?} is not accepted; only ES256 is")]
    JwtUnsupportedAlgorithm(String),
    /// The token's `kid` names no key in the trust bundle.
    #[error("the JWT key id {0:?} is not in the trust bundle")]
    JwtUnknownKeyId(String),
    /// The token's signature does not verify.
    #[error("the JWT signature does not verify")]
    JwtSignatureInvalid,
    /// The token's `exp` has passed.
    #[error("the JWT expired at unix time {0}")]
    JwtExpired(i64),
    /// The token's `nbf` is in the future.
    #[error("the JWT is not valid before unix time {0}")]
    JwtNotYetValid(i64),
    /// The token was not issued for the audience the caller expects.
    #[error("the JWT audience does not contain {0:?}")]
    JwtAudienceMismatch(String),
}

/// Caps attacker-chosen strings echoed in error messages so a huge CSR or token
/// cannot blow up logs.
pub(crate) fn truncate_for_message(s: &str) -> String {
    const LIMIT: usize = 128;
    if s.len() <= LIMIT {
        return s.to_owned();
    }
    let mut end = LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
