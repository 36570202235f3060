//! `RVMM_TIMINGS=1`: where a container start goes. One line on stderr at the end of the run,
//! `rvmm-timings isolation=container PHASE_ms=T ...`, each T in milliseconds since the rvmm
//! process started (a VM run prints its own line, src/vm/mod.rs). The bench and
//! docs/benchmarks/lean.md read it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static START: OnceLock<Instant> = OnceLock::new();

/// Called first thing in `main`: where the times count from.
pub fn mark_process_start() {
    let _ = START.set(Instant::now());
}

/// The phases of one run, recorded only when `RVMM_TIMINGS` is set.
pub struct Timings {
    t0: Option<Instant>,
    marks: Vec<(&'static str, Duration)>,
}

impl Timings {
    pub fn start() -> Timings {
        let on = std::env::var_os("RVMM_TIMINGS").is_some();
        Timings {
            t0: on.then(|| START.get().copied().unwrap_or_else(Instant::now)),
            marks: Vec::new(),
        }
    }

    /// Phase `what` ended now.
    pub fn mark(&mut self, what: &'static str) {
        if let Some(t0) = self.t0 {
            self.marks.push((what, t0.elapsed()));
        }
    }

    /// The line, with its newline (once the run's last phase is marked), if timings are on.
    pub fn line(&self, isolation: &str) -> Option<String> {
        self.t0?;
        let phases: Vec<String> = self
            .marks
            .iter()
            .map(|(k, d)| format!("{k}_ms={:.2}", d.as_secs_f64() * 1e3))
            .collect();
        Some(format!(
            "rvmm-timings isolation={isolation} {}\n",
            phases.join(" ")
        ))
    }
}
