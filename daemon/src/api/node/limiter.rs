//! A caller without an agent SVID can repeat a refused call as fast as the network allows:
//! an `Attest` with a made-up join token costs a CSR check and a store lookup, and every
//! refusal is a (summarised) audit record. Each source address has a budget of refusals
//! that refills over time; once it is spent, the source's unauthenticated calls are
//! answered `ResourceExhausted` before any of that work, until the budget refills.
//! Agents that present a valid SVID are never counted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusals a source may have before it is slowed down.
pub const BURST: f64 = 20.0;
/// Refusals a source regains per second.
pub const REFILL_PER_SEC: f64 = 1.0;
/// Sources tracked at once; beyond that, new sources share one budget, so varying the
/// address cannot grow the map.
const MAX_SOURCES: usize = 4096;
/// The budget shared by sources past the cap, and by callers without an address.
const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// One budget per source. IPv6 sources are counted per /64, the block one host usually
/// holds whole.
pub struct RefusalLimiter {
    sources: Mutex<HashMap<IpAddr, Budget>>,
    burst: f64,
    per_sec: f64,
}

#[derive(Clone, Copy)]
struct Budget {
    left: f64,
    at: Instant,
}

impl Budget {
    fn refilled(self, now: Instant, burst: f64, per_sec: f64) -> Budget {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * per_sec;
        Budget {
            left: (self.left + gained).min(burst),
            at: now,
        }
    }
}

impl Default for RefusalLimiter {
    fn default() -> Self {
        Self::new(BURST, REFILL_PER_SEC)
    }
}

impl RefusalLimiter {
    pub fn new(burst: f64, per_sec: f64) -> Self {
        Self {
            sources: Mutex::new(HashMap::new()),
            burst,
            per_sec,
        }
    }

    /// `Err(retry_after)` when `source` has spent its budget.
    pub fn check(&self, source: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = self.key(source);
        if !sources.contains_key(&key) && sources.len() >= MAX_SOURCES {
            key = OVERFLOW;
        }
        let Some(budget) = sources.get_mut(&key) else {
            return Ok(());
        };
        *budget = budget.refilled(now, self.burst, self.per_sec);
        if budget.left >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - budget.left) / self.per_sec))
        }
    }

    /// Counts one refusal against `source`.
    pub fn charge(&self, source: Option<IpAddr>, now: Instant) {
        let mut key = self.key(source);
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if !sources.contains_key(&key) && sources.len() >= MAX_SOURCES {
            // Forget the sources whose budget has refilled; if none has, the newcomer
            // shares the overflow budget.
            let (burst, per_sec) = (self.burst, self.per_sec);
            sources.retain(|_, b| b.refilled(now, burst, per_sec).left < burst);
            if sources.len() >= MAX_SOURCES {
                key = OVERFLOW;
            }
        }
        let budget = sources.entry(key).or_insert(Budget {
            left: self.burst,
            at: now,
        });
        *budget = budget.refilled(now, self.burst, self.per_sec);
        budget.left = (budget.left - 1.0).max(0.0);
    }

    fn key(&self, source: Option<IpAddr>) -> IpAddr {
        match source {
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let mut octets = v6.octets();
                    octets[8..].fill(0);
                    IpAddr::V6(Ipv6Addr::from(octets))
                }
            },
            Some(v4) => v4,
            None => OVERFLOW,
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_source_is_slowed_after_its_burst_and_recovers_as_it_refills() {
        let limiter = RefusalLimiter::new(3.0, 1.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check(ip("192.0.2.1"), t0).is_ok());
            limiter.charge(ip("192.0.2.1"), t0);
        }
        let wait = limiter.check(ip("192.0.2.1"), t0).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Another source is untouched.
        assert!(limiter.check(ip("192.0.2.2"), t0).is_ok());
        // A second later one more refusal is allowed, not the whole burst.
        let t1 = t0 + Duration::from_secs(1);
        assert!(limiter.check(ip("192.0.2.1"), t1).is_ok());
        limiter.charge(ip("192.0.2.1"), t1);
        assert!(limiter.check(ip("192.0.2.1"), t1).is_err());
    }

    #[test]
    fn an_ipv6_host_cannot_escape_by_changing_the_low_half_of_its_address() {
        let limiter = RefusalLimiter::new(2.0, 1.0);
        let t0 = Instant::now();
        limiter.charge(ip("2001:db8::1"), t0);
        limiter.charge(ip("2001:db8::2"), t0);
        assert!(limiter.check(ip("2001:db8::ffff"), t0).is_err());
        assert!(limiter.check(ip("2001:db8:0:1::1"), t0).is_ok());
        // An IPv4 client seen through a dual-stack socket is its IPv4 address.
        limiter.charge(ip("::ffff:192.0.2.9"), t0);
        limiter.charge(ip("192.0.2.9"), t0);
        assert!(limiter.check(ip("192.0.2.9"), t0).is_err());
    }

    #[test]
    fn many_sources_share_one_budget_past_the_cap() {
        let limiter = RefusalLimiter::new(1.0, 0.001);
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 100) {
            let source = Some(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
            limiter.charge(source, t0);
        }
        assert!(limiter.tracked() <= MAX_SOURCES + 1);
        // The newcomers share the overflow budget, which they have spent.
        let late = Some(IpAddr::from(std::net::Ipv4Addr::new(10, 200, 0, 1)));
        limiter.charge(late, t0);
        assert!(limiter.check(late, t0).is_err());
    }
}
