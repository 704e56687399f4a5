//! [`ScaleControl`] over `scaler_exec::executor::HostExecutor`: the host executor scales the live
//! engine on a thread of its own while the engine keeps serving.
//!
//! A command is turned into an absolute device count when it is accepted (relative to the count
//! the deployment will have once every command accepted before it ran), then goes through a
//! bounded queue (a full queue is [`ScaleError::Busy`], HTTP 429); commands run one at a time.
//! Growing adds the lowest-numbered idle devices; shrinking removes the highest-numbered serving
//! ones. Every transition is elastic (the engine never stops admitting).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Sender, TrySendError};
use scaler::{DeviceId, DeviceSet, ScaleCommand, Strategy, TransitionKind, TransitionSpec};
use scaler_exec::executor::HostExecutor;

use super::audit::AUDIT;
use super::scale::{ScaleAccepted, ScaleControl, ScaleError, ScaleEventCount, ScaleStatus};

#[derive(Debug, Default)]
struct Shared {
    active: usize,
    /// Device count once every accepted command ran.
    projected: usize,
    running: bool,
    queued: usize,
    /// (kind, strategy, outcome) → count.
    events: BTreeMap<(String, String, String), u64>,
    bytes_moved: u64,
    last: serde_json::Value,
}

/// The executor behind the admin endpoints and the autoscaler.
#[derive(Debug)]
pub struct ExecutorScale {
    tx: Sender<(u64, usize)>,
    shared: Arc<Mutex<Shared>>,
    max_devices: usize,
    next: AtomicU64,
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The devices to serve on for `target` devices, starting from `from`: the lowest-numbered idle
/// devices join, the highest-numbered serving ones leave.
pub fn target_set(from: &DeviceSet, target: usize, max: usize) -> DeviceSet {
    let mut to = from.clone();
    let mut d = 0u32;
    while to.len() < target && (d as usize) < max {
        to.insert(DeviceId(d));
        d += 1;
    }
    while to.len() > target {
        let Some(last) = to.iter().next_back() else {
            break;
        };
        to.remove(last);
    }
    to
}

/// The device count `command` asks for when `now` devices serve (`None`: out of range).
pub fn target_of(command: ScaleCommand, now: usize, max: usize) -> Option<usize> {
    let t = match command {
        ScaleCommand::Devices(n) => Some(n),
        ScaleCommand::Add(k) => now.checked_add(k),
        ScaleCommand::Remove(k) => now.checked_sub(k),
        _ => None,
    }?;
    (1..=max).contains(&t).then_some(t)
}

fn record(g: &mut Shared, kind: &str, outcome: &str) {
    *g.events
        .entry((
            kind.into(),
            Strategy::Elastic.as_str().into(),
            outcome.into(),
        ))
        .or_default() += 1;
}

/// Runs one command: moves the engine onto `target` devices.
fn execute(executor: &mut HostExecutor, target: usize, max: usize, shared: &Mutex<Shared>) {
    let from = executor.devices();
    let now = from.len();
    if target == now {
        return;
    }
    let kind = if target > now {
        TransitionKind::ScaleUp
    } else {
        TransitionKind::ScaleDown
    };
    let kind_name = kind.as_str();
    let to = target_set(&from, target, max);
    let spec = TransitionSpec {
        kind,
        strategy: Strategy::Elastic,
        from,
        to,
    };
    let (from_n, to_n) = (spec.from.len(), spec.to.len());
    tracing::info!(target: AUDIT, event = "transition_started", kind = kind_name,
        from = from_n, to = to_n, "scaling transition started");
    let result = executor.run(spec);
    let active = executor.devices().len();
    match &result {
        Ok(event) => {
            let p = &event.report.phases_ms;
            let abort = event.report.abort_reason.as_ref().map(|r| format!("{r:?}"));
            let outcome = if event.completed() {
                "completed"
            } else {
                "aborted"
            };
            if event.completed() {
                tracing::info!(target: AUDIT, event = "transition_finished", kind = kind_name,
                    from = from_n, to = to_n, outcome, plan_ms = p.plan,
                    prepare_ms = p.prepare, switch_ms = p.switch, retire_ms = p.retire,
                    bytes_moved = event.report.bytes_moved, "scaling transition finished");
            } else {
                tracing::warn!(target: AUDIT, event = "transition_finished", kind = kind_name,
                    from = from_n, to = to_n, outcome, plan_ms = p.plan,
                    prepare_ms = p.prepare, switch_ms = p.switch, retire_ms = p.retire,
                    abort_reason = abort.as_deref().unwrap_or("unknown"),
                    "scaling transition aborted and rolled back");
            }
        }
        Err(e) => {
            tracing::warn!(target: AUDIT, event = "transition_finished", kind = kind_name,
                from = from_n, to = to_n, outcome = "failed", error = %e,
                "scaling transition failed");
        }
    }
    let mut g = lock(shared);
    g.active = active;
    match result {
        Ok(event) => {
            let outcome = if event.completed() {
                "completed"
            } else {
                "aborted"
            };
            record(&mut g, kind_name, outcome);
            g.bytes_moved += event.report.bytes_moved;
            g.last = serde_json::json!({
                "kind": kind_name,
                "strategy": Strategy::Elastic.as_str(),
                "outcome": outcome,
                "abort_reason": event.report.abort_reason.map(|r| format!("{r:?}")),
                "devices_after": event.devices_after.len(),
                "bytes_moved": event.report.bytes_moved,
                "bytes_zero_copy": event.report.bytes_zero_copy,
                "bytes_reloaded": event.report.bytes_reloaded,
                "sequences_migrated": event.report.sequences_migrated,
                "kv_bytes_migrated": event.report.kv_bytes_migrated,
                "latency_ms": event.report.latency_ms,
                "switch_boundary_ms": event.switch_boundary_ms,
            });
        }
        Err(e) => {
            record(&mut g, kind_name, "failed");
            g.last = serde_json::json!({
                "kind": kind_name,
                "strategy": Strategy::Elastic.as_str(),
                "outcome": "failed",
                "error": e.to_string(),
            });
        }
    }
}

impl ExecutorScale {
    /// Moves `executor` onto its own thread; up to `queue` commands may wait behind the running
    /// one. The thread ends when this value is dropped (after the running command).
    pub fn start(mut executor: HostExecutor, queue: usize) -> std::io::Result<ExecutorScale> {
        let max_devices = executor.device_count();
        let active = executor.devices().len();
        executor.prewarm(&DeviceSet::first(
            u32::try_from(max_devices).unwrap_or(u32::MAX),
        ));
        let shared = Arc::new(Mutex::new(Shared {
            active,
            projected: active,
            last: serde_json::Value::Null,
            ..Shared::default()
        }));
        let (tx, rx) = bounded::<(u64, usize)>(queue.max(1));
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("scale-executor".into())
            .spawn(move || {
                for (_, target) in rx {
                    {
                        let mut g = lock(&s);
                        g.queued = g.queued.saturating_sub(1);
                        g.running = true;
                    }
                    execute(&mut executor, target, max_devices, &s);
                    let mut g = lock(&s);
                    g.running = false;
                    if g.queued == 0 {
                        // A failed command leaves the count where it was.
                        g.projected = g.active;
                    }
                }
            })?;
        Ok(ExecutorScale {
            tx,
            shared,
            max_devices,
            next: AtomicU64::new(0),
        })
    }
}

impl ScaleControl for ExecutorScale {
    fn scale(&self, command: ScaleCommand) -> Result<ScaleAccepted, ScaleError> {
        let mut g = lock(&self.shared);
        let target = target_of(command, g.projected, self.max_devices).ok_or_else(|| {
            ScaleError::Invalid(format!(
                "{command:?} leaves the deployment outside 1..={} devices (it will have {} once \
                 the commands before it ran)",
                self.max_devices, g.projected
            ))
        })?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send((id, target)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ScaleError::Busy(
                    "a transition is running and the command queue is full; retry when it \
                     finishes"
                        .into(),
                ))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ScaleError::Unavailable("the scale executor stopped".into()))
            }
        }
        let state = if g.running || g.queued > 0 {
            "queued"
        } else {
            "started"
        };
        g.queued += 1;
        g.projected = target;
        Ok(ScaleAccepted {
            command: id,
            state,
            target_devices: target,
        })
    }

    fn status(&self) -> ScaleStatus {
        let g = lock(&self.shared);
        ScaleStatus {
            available: true,
            active_devices: g.active,
            target_devices: g.projected,
            max_devices: self.max_devices,
            transition_running: g.running || g.queued > 0,
            queued: g.queued,
            events: g
                .events
                .iter()
                .map(|((kind, strategy, outcome), &count)| ScaleEventCount {
                    kind: kind.clone(),
                    strategy: strategy.clone(),
                    outcome: outcome.clone(),
                    count,
                })
                .collect(),
            bytes_moved: g.bytes_moved,
            detail: serde_json::json!({ "last": g.last }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ds: &[u32]) -> DeviceSet {
        ds.iter().map(|&d| DeviceId(d)).collect()
    }

    #[test]
    fn target_sets_add_the_lowest_idle_and_drop_the_highest_serving_devices() {
        assert_eq!(target_set(&set(&[0, 1]), 3, 4), set(&[0, 1, 2]));
        assert_eq!(target_set(&set(&[0, 2]), 3, 4), set(&[0, 1, 2]));
        assert_eq!(target_set(&set(&[0, 1, 2, 3]), 2, 4), set(&[0, 1]));
        assert_eq!(target_set(&set(&[1, 3]), 1, 4), set(&[1]));
        assert_eq!(target_set(&set(&[0, 1]), 2, 4), set(&[0, 1]));
        assert_eq!(target_set(&set(&[0]), 9, 2), set(&[0, 1]), "capped at max");
    }

    #[test]
    fn targets_are_absolute_and_inside_the_device_range() {
        assert_eq!(target_of(ScaleCommand::Add(1), 2, 4), Some(3));
        assert_eq!(target_of(ScaleCommand::Remove(2), 4, 4), Some(2));
        assert_eq!(target_of(ScaleCommand::Devices(4), 1, 4), Some(4));
        assert_eq!(target_of(ScaleCommand::Devices(5), 1, 4), None);
        assert_eq!(target_of(ScaleCommand::Remove(2), 2, 4), None);
        assert_eq!(target_of(ScaleCommand::Add(usize::MAX), 2, 4), None);
        assert_eq!(target_of(ScaleCommand::Rebalance, 2, 4), None);
    }
}
