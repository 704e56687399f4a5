//! File descriptors: how many the process may open, how many it holds, and how many connections
//! that leaves once scaling has its reserve.
//!
//! Every connection holds one descriptor. Scaling needs descriptors too (the host backend keeps
//! each weight chunk in a memory file), and a transition builds the next deployment beside the
//! running one, so for a while both are open. The budget therefore keeps, beyond what the
//! process holds at startup:
//!
//! - a **scaling reserve**: the descriptors that loading the deployment on `initial` devices
//!   opened (its weight chunks and warm pools), per device, times `max_devices`. Measured on
//!   `tiny-qwen3` with `host:4 --initial 1`: loading opened 66, a 1→4 transition peaked 73 above
//!   that and a 4→1 one 37 above the 4-device level; the reserve is 264;
//! - a fixed **slack** of [`SLACK`] for everything else (logs, the runtime, the signal pipe);
//! - the **control slots** of the connection layer.
//!
//! What is left is the most `--max-connections` may be; the default is that, at most
//! [`DEFAULT_MAX_CONNECTIONS`]. At startup the soft `RLIMIT_NOFILE` is raised to the hard one.

use anyhow::{bail, Result};

/// Descriptors kept for the process's own use beyond the scaling reserve.
pub const SLACK: u64 = 64;
/// The default connection cap, when the descriptor limit allows it.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 1024;

/// Raises the soft descriptor limit to the hard one; returns the soft limit now in force
/// (`None` if the platform does not say).
pub fn raise_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (lim.current, lim.maximum) {
        if soft >= hard {
            return Some(soft);
        }
        lim.current = Some(hard);
        // Leaving the limit as it was is fine; the budget below reads what is in force.
        let _ = setrlimit(Resource::Nofile, lim);
    }
    getrlimit(Resource::Nofile).current
}

/// Descriptors the process holds now (`None` without `/proc`).
pub fn open_now() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64)
}

/// How the descriptors are shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// The soft `RLIMIT_NOFILE`.
    pub limit: u64,
    /// Held at startup, after loading.
    pub in_use: u64,
    /// Opened by loading the deployment.
    pub deployment: u64,
    /// Kept for scaling transitions.
    pub scaling_reserve: u64,
    /// Kept for everything else.
    pub slack: u64,
    /// Control slots of the connection layer.
    pub control: u64,
}

impl DescriptorBudget {
    /// The budget for a process holding `in_use` of `limit` descriptors, `deployment` of them
    /// opened by loading `initial` of `max_devices` devices.
    pub fn new(
        limit: u64,
        in_use: u64,
        deployment: u64,
        initial: usize,
        max_devices: usize,
        control: u64,
    ) -> DescriptorBudget {
        let scaling_reserve = if max_devices > 1 {
            deployment.div_ceil(initial.max(1) as u64) * max_devices as u64
        } else {
            0
        };
        DescriptorBudget {
            limit,
            in_use,
            deployment,
            scaling_reserve,
            slack: SLACK,
            control,
        }
    }

    /// Connections the budget allows.
    pub fn room(&self) -> u64 {
        self.limit
            .saturating_sub(self.in_use + self.scaling_reserve + self.slack + self.control)
    }

    /// The connection cap: `asked` if it fits, else the default; an error says what to change.
    pub fn max_connections(&self, asked: Option<usize>) -> Result<usize> {
        let room = self.room();
        if room == 0 {
            bail!(
                "the descriptor limit ({}) leaves no room for connections: {} are open, {} are \
                 kept for scaling, {} for the process and {} for control connections; raise it \
                 (ulimit -n) or lower --reserved-connections",
                self.limit,
                self.in_use,
                self.scaling_reserve,
                self.slack,
                self.control
            );
        }
        match asked {
            Some(0) => bail!("--max-connections must be at least 1"),
            Some(n) if n as u64 > room => bail!(
                "--max-connections {n} does not fit the descriptor limit ({}): {} are open, {} \
                 are kept for scaling, {} for the process and {} for control connections, \
                 which leaves {room}; lower it or raise the limit (ulimit -n)",
                self.limit,
                self.in_use,
                self.scaling_reserve,
                self.slack,
                self.control
            ),
            Some(n) => Ok(n),
            None => Ok(room.min(DEFAULT_MAX_CONNECTIONS) as usize),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_scaling_and_control_descriptors_out_of_the_cap() {
        let b = DescriptorBudget::new(1024, 50, 40, 2, 4, 32);
        assert_eq!(b.scaling_reserve, 20 * 4);
        assert_eq!(b.room(), 1024 - 50 - 80 - SLACK - 32);
        assert_eq!(b.max_connections(None).unwrap(), b.room() as usize);
        assert_eq!(b.max_connections(Some(100)).unwrap(), 100);
        let e = b.max_connections(Some(10_000)).unwrap_err().to_string();
        assert!(e.contains("ulimit -n"), "{e}");
        let big = DescriptorBudget::new(1 << 20, 40, 30, 1, 1, 32);
        assert_eq!(big.scaling_reserve, 0, "a single device never scales");
        assert_eq!(big.max_connections(None).unwrap(), 1024);
        let tiny = DescriptorBudget::new(100, 40, 30, 1, 1, 32);
        assert!(tiny.max_connections(None).is_err());
    }
}
