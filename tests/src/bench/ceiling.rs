//! The crypto ceiling of SVID signing: how many CSRs the cores could turn into certificates
//! if signing were nothing but its cryptography, with the library the daemon signs with.
//!
//! One certificate from one P-256 CSR costs one ECDSA verification (the CSR's
//! self-signature, over its CertificationRequestInfo) and one ECDSA signature (the CA's, over
//! a to-be-signed certificate). Each thread does exactly that, with aws-lc, over the bench's
//! own CSR pool and a to-be-signed body the size of a real X509-SVID's, until the time is up.
//! Nothing else is counted: no parsing, no encoding, no I/O.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, UnparsedPublicKey};
use serde::Serialize;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use super::CsrPool;

/// The to-be-signed part of an X509-SVID as the daemon makes it is about 400 bytes; the
/// signature hashes it once, so the exact size barely matters.
const TBS_LEN: usize = 420;

pub struct Options {
    pub threads: usize,
    pub seconds: f64,
    pub csr_pool: usize,
}

#[derive(Serialize, Debug)]
pub struct Ceiling {
    pub peer: &'static str,
    pub threads: usize,
    pub seconds: f64,
    /// Verifications and signatures alone, one thread each, for comparison with
    /// `openssl speed ecdsap256`.
    pub sign_per_s_per_thread: f64,
    pub verify_per_s_per_thread: f64,
    /// Verify + sign per CSR, all threads together: the ceiling.
    pub certificates: u64,
    pub rate_per_s: f64,
}

/// One CSR's signed part and signature, parsed before the clock starts.
struct Prepared {
    public_key: Vec<u8>,
    info: Vec<u8>,
    signature: Vec<u8>,
}

pub fn run(opts: &Options) -> Result<Ceiling> {
    ensure!(opts.threads > 0, "--threads must be at least 1");
    let pool = CsrPool::generate(opts.csr_pool, "spiffe://example.org/w/")?;
    let prepared: Arc<[Prepared]> = pool
        .entries()
        .iter()
        .map(|pooled| {
            let (_, csr) = X509CertificationRequest::from_der(&pooled.der)
                .context("a pooled CSR does not parse")?;
            let info = &csr.certification_request_info;
            Ok(Prepared {
                public_key: info.subject_pki.subject_public_key.data.to_vec(),
                info: info.raw.to_vec(),
                signature: csr.signature_value.data.to_vec(),
            })
        })
        .collect::<Result<Vec<_>>>()?
        .into();
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("generating the CA key"))?;
    let ca = Arc::new(
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
            .map_err(|_| anyhow::anyhow!("loading the CA key"))?,
    );
    // Every CSR must verify, or the loop below would be timing failures.
    for p in prepared.iter() {
        verify(p).context("a pooled CSR's signature does not verify")?;
    }

    let part = Duration::from_secs_f64((opts.seconds / 4.0).max(0.5));
    let sign_rate = one_thread(part, || ca.sign(&rng, &[0x30; TBS_LEN]).is_ok());
    let mut i = 0;
    let verify_rate = one_thread(part, || {
        i += 1;
        verify(&prepared[i % prepared.len()]).is_ok()
    });

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..opts.threads)
        .map(|t| {
            let (stop, done, prepared, ca) =
                (stop.clone(), done.clone(), prepared.clone(), ca.clone());
            std::thread::spawn(move || {
                let rng = SystemRandom::new();
                let mut tbs = [0x30u8; TBS_LEN];
                let mut n = 0u64;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let p = &prepared[i % prepared.len()];
                    i += 1;
                    tbs[..8].copy_from_slice(&n.to_be_bytes());
                    if verify(p).is_ok() && ca.sign(&rng, &tbs).is_ok() {
                        n += 1;
                    }
                }
                done.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(opts.seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a ceiling thread panicked"))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let certificates = done.load(Ordering::Relaxed);
    Ok(Ceiling {
        peer: "crypto-ceiling",
        threads: opts.threads,
        seconds: elapsed,
        sign_per_s_per_thread: sign_rate,
        verify_per_s_per_thread: verify_rate,
        certificates,
        rate_per_s: certificates as f64 / elapsed,
    })
}

fn verify(p: &Prepared) -> Result<(), aws_lc_rs::error::Unspecified> {
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &p.public_key)
        .verify(&p.info, &p.signature)
}

/// Operations a second of `op` on this thread, for `time`.
fn one_thread(time: Duration, mut op: impl FnMut() -> bool) -> f64 {
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < time {
        for _ in 0..64 {
            if op() {
                n += 1;
            }
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}
