//! The audit log and the brake on guessing admin tokens.
//!
//! Audit events go through `tracing` with the target [`AUDIT`], one line each on stderr (the
//! subscriber is set up by [`init_logging`]; `RUST_LOG` filters it, `RUST_LOG=audit=info` keeps
//! only the audit trail). Every line has an `event` field:
//!
//! | event | level | fields |
//! |---|---|---|
//! | `admin_command` | info | `client`, `command`, `outcome` (`accepted`, `refused`), `target_devices` or `error` |
//! | `admin_status` | info | `client` |
//! | `auth_failed` | warn | `client`, `path`, `reason`, `failures`, `locked_for_ms` |
//! | `auth_locked_out` | warn | `client`, `path`, `retry_after_ms` |
//! | `transition_started` / `transition_finished` | info / warn | `kind`, `from`, `to`, `outcome`, phases (`plan_ms`, `prepare_ms`, `switch_ms`, `retire_ms`), `abort_reason` or `error` |
//! | `connection_rejected` | warn | `client`, `reason` (`per_client`, `total`), `open` |
//! | `accept_failed` | error | `error` (at most one line a second) |
//! | `shutdown` | info | `phase` (`drain`, `cancel`, `stopped`), counts |
//!
//! [`AuthThrottle`] counts failed admin authentications per client address: after
//! [`ThrottleConfig::free_failures`] in a row, the client is locked out (429, whatever token it
//! sends) for `base_lockout`, doubling with each further failure up to `max_lockout`. A success
//! clears the count. The clock is passed in, so the policy is tested without waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The `tracing` target of audit events.
pub const AUDIT: &str = "audit";

/// Installs a stderr subscriber filtered by `RUST_LOG` (default `default`, such as `info`)
/// unless one is set. Colours only on a terminal.
pub fn init_logging(default: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// The lockout policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures in a row allowed before a lockout.
    pub free_failures: u32,
    /// The first lockout.
    pub base_lockout: Duration,
    /// The longest lockout.
    pub max_lockout: Duration,
    /// Client addresses tracked at most (the oldest unlocked ones are forgotten first).
    pub max_tracked: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            free_failures: 5,
            base_lockout: Duration::from_secs(1),
            max_lockout: Duration::from_secs(60),
            max_tracked: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    locked_until: Option<Instant>,
    last: Instant,
}

/// Failed admin authentications per client address.
#[derive(Debug)]
pub struct AuthThrottle {
    config: ThrottleConfig,
    clients: Mutex<HashMap<IpAddr, Failures>>,
}

impl AuthThrottle {
    /// A throttle with `config`.
    pub fn new(config: ThrottleConfig) -> AuthThrottle {
        AuthThrottle {
            config,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Err(retry_after)` while `client` is locked out.
    pub fn check(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.lock().get(&client).and_then(|f| f.locked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Records a failure; returns the failures in a row and the lockout it started, if any.
    pub fn failed(&self, client: IpAddr, now: Instant) -> (u32, Option<Duration>) {
        let c = self.config;
        let mut g = self.lock();
        if g.len() >= c.max_tracked && !g.contains_key(&client) {
            g.retain(|_, f| f.locked_until.is_some_and(|u| u > now));
            if g.len() >= c.max_tracked {
                if let Some(oldest) = g.iter().min_by_key(|(_, f)| f.last).map(|(k, _)| *k) {
                    g.remove(&oldest);
                }
            }
        }
        let f = g.entry(client).or_insert(Failures {
            count: 0,
            locked_until: None,
            last: now,
        });
        // A client quiet for longer than the longest lockout starts afresh.
        if now.saturating_duration_since(f.last) > c.max_lockout * 2 {
            f.count = 0;
        }
        f.count += 1;
        f.last = now;
        let lockout = (f.count >= c.free_failures).then(|| {
            let doublings = (f.count - c.free_failures).min(16);
            (c.base_lockout * 2u32.pow(doublings)).min(c.max_lockout)
        });
        f.locked_until = lockout.map(|d| now + d);
        (f.count, lockout)
    }

    /// Clears `client`'s failures.
    pub fn succeeded(&self, client: IpAddr) {
        self.lock().remove(&client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockouts_start_after_the_free_failures_and_double() {
        let t = AuthThrottle::new(ThrottleConfig {
            free_failures: 3,
            base_lockout: Duration::from_secs(1),
            max_lockout: Duration::from_secs(5),
            max_tracked: 16,
        });
        let ip: IpAddr = "10.1.1.1".parse().unwrap();
        let other: IpAddr = "10.1.1.2".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(t.failed(ip, t0), (1, None));
        assert_eq!(t.failed(ip, t0), (2, None));
        assert_eq!(t.check(ip, t0), Ok(()));
        assert_eq!(t.failed(ip, t0), (3, Some(Duration::from_secs(1))));
        assert_eq!(t.check(ip, t0), Err(Duration::from_secs(1)));
        assert_eq!(t.check(other, t0), Ok(()), "per client");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(t.check(ip, t1), Ok(()), "the lockout ends");
        assert_eq!(t.failed(ip, t1), (4, Some(Duration::from_secs(2))));
        assert_eq!(t.failed(ip, t1).1, Some(Duration::from_secs(4)));
        assert_eq!(t.failed(ip, t1).1, Some(Duration::from_secs(5)), "capped");
        t.succeeded(ip);
        assert_eq!(t.check(ip, t1), Ok(()));
        assert_eq!(t.failed(ip, t1), (1, None), "a success clears the count");
    }

    #[test]
    fn tracking_is_bounded() {
        let t = AuthThrottle::new(ThrottleConfig {
            max_tracked: 4,
            ..ThrottleConfig::default()
        });
        let now = Instant::now();
        for i in 0..100u8 {
            t.failed(IpAddr::from([10, 0, 0, i]), now);
        }
        assert!(t.lock().len() <= 4);
    }
}
