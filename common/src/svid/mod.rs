//! SVID cryptography shared by daemon and agent: CA key generation, X509-SVID and JWT-SVID issuance, JWT-SVID
//! validation and trust bundle encodings. Pure functions and types only: persistence and
//! rotation timing live elsewhere, and time always comes in as an argument.

mod bundle;
mod csr;
mod error;
mod jwt;
mod x509;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::oid_registry::Oid;

pub use bundle::{bundle_jwks, bundle_pem, jwt_jwks, parse_pem_certs, pem_block};
pub use csr::generate_csr;
pub use error::CaError;
pub use jwt::{JwtAuthority, JwtClaims, validate_jwt};
pub use x509::{BACKDATE_SECS, CaMaterial, IssuedSvid, SvidRequest, X509Authority, generate_ca};

/// Latest instant both X.509 and the date library under rcgen can express
/// (9999-12-31T23:59:59Z); anything later is a TTL mistake, not a wish.
const MAX_UNIX_SECONDS: i64 = 253_402_300_799;

/// Whole seconds since the Unix epoch, rounded down: certificates and JWTs only carry seconds.
fn unix_seconds(t: SystemTime) -> Result<i64, CaError> {
    let since = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::ClockBeforeEpoch)?;
    i64::try_from(since.as_secs()).map_err(|_| CaError::InvalidTtl)
}

/// `now + ttl` in seconds, refusing a zero TTL or one past what certificates can encode.
fn expiry(now_secs: i64, ttl: Duration) -> Result<i64, CaError> {
    let ttl_secs = i64::try_from(ttl.as_secs()).map_err(|_| CaError::InvalidTtl)?;
    if ttl_secs == 0 {
        return Err(CaError::InvalidTtl);
    }
    now_secs
        .checked_add(ttl_secs)
        .filter(|t| *t <= MAX_UNIX_SECONDS)
        .ok_or(CaError::InvalidTtl)
}

/// Whether `oid` names the P-384 curve (1.3.132.0.34). x509-parser enables only the
/// oid-registry groups it needs itself, and the NIST curve group is not among them, so the
/// DER body is compared directly.
fn is_secp384r1(oid: &Oid<'_>) -> bool {
    const SECP384R1_DER: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    oid.as_bytes() == SECP384R1_DER
}

/// When an SVID valid over `[not_before, not_after]` should be renewed: at `fraction` of
/// its life (0.5 is half-life), counted from issuance rather than from the backdated
/// notBefore, so a short-lived SVID is not renewed the moment it arrives.
pub fn renewal_due(not_before: i64, not_after: i64, fraction: f64) -> i64 {
    let issued = (not_before + BACKDATE_SECS).min(not_after);
    issued + ((not_after - issued) as f64 * fraction.clamp(0.0, 1.0)) as i64
}

#[cfg(test)]
mod renewal_tests {
    use super::renewal_due;

    #[test]
    fn renewal_counts_from_issuance() {
        // Issued at 1000 with a 6 s TTL, so notBefore is backdated to 990.
        assert_eq!(renewal_due(990, 1006, 0.5), 1003);
        // A one-hour SVID renews half an hour after issuance.
        assert_eq!(renewal_due(990, 4600, 0.5), 2800);
        assert_eq!(renewal_due(990, 995, 0.5), 995);
    }
}
