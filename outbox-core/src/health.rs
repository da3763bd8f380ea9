//! Readiness: whether each service a loop depends on answered its last request.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use crate::Stage;

/// The state of one dependency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentState {
    /// Registered, no request has completed yet.
    Starting,
    /// The last request succeeded.
    Up,
    /// The last request failed; the reason names the service.
    Down(String),
}

impl fmt::Display for ComponentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComponentState::Starting => f.write_str("starting"),
            ComponentState::Up => f.write_str("up"),
            ComponentState::Down(reason) => write!(f, "down: {reason}"),
        }
    }
}

/// Shared readiness of the stages of a pipeline, updated by [`crate::Relay`]
/// and [`crate::Consume`] after every request and read by a `/readyz`
/// endpoint. Cloning shares the state.
///
/// A stage is ready once its last request succeeded; the whole is ready when
/// every registered stage is. Loops only report stages that were registered,
/// so a binary decides what its readiness covers.
///
/// ```
/// use outbox_core::{ComponentState, Health, Stage};
///
/// let health = Health::new([Stage::Source, Stage::Bus]);
/// assert!(!health.is_ready());
/// health.up(Stage::Source);
/// health.up(Stage::Bus);
/// assert!(health.is_ready());
/// health.down(Stage::Bus, "kafka at 127.0.0.1:9092 is not answering");
/// assert!(!health.is_ready());
/// assert!(matches!(health.states()[1].1, ComponentState::Down(_)));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Health {
    states: Arc<Mutex<BTreeMap<Stage, ComponentState>>>,
}

impl Health {
    /// Readiness over `stages`, each [`ComponentState::Starting`].
    pub fn new(stages: impl IntoIterator<Item = Stage>) -> Self {
        let states = stages
            .into_iter()
            .map(|stage| (stage, ComponentState::Starting))
            .collect();
        Self {
            states: Arc::new(Mutex::new(states)),
        }
    }

    /// Records a successful request to `stage` (ignored if not registered).
    pub fn up(&self, stage: Stage) {
        self.set(stage, ComponentState::Up);
    }

    /// Records a failed request to `stage` (ignored if not registered).
    pub fn down(&self, stage: Stage, reason: impl fmt::Display) {
        self.set(stage, ComponentState::Down(reason.to_string()));
    }

    fn set(&self, stage: Stage, state: ComponentState) {
        // A poisoned lock only means a panic elsewhere; the map is still whole.
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = states.get_mut(&stage) {
            stage_up(stage, &state);
            *slot = state;
        }
    }

    /// Sets the gauge `outbox_stage_up{stage}` of every registered stage;
    /// later changes set it themselves. Call it once a metrics recorder is
    /// installed, so stages still starting are exported too.
    pub fn export(&self) {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        for (stage, state) in states.iter() {
            stage_up(*stage, state);
        }
    }

    /// Whether every registered stage is up.
    pub fn is_ready(&self) -> bool {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        states.values().all(|s| *s == ComponentState::Up)
    }

    /// Every registered stage and its state, in pipeline order.
    pub fn states(&self) -> Vec<(Stage, ComponentState)> {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        states
            .iter()
            .map(|(stage, state)| (*stage, state.clone()))
            .collect()
    }
}

fn stage_up(stage: Stage, state: &ComponentState) {
    let up = if *state == ComponentState::Up {
        1.0
    } else {
        0.0
    };
    metrics::gauge!("outbox_stage_up", "stage" => stage.to_string()).set(up);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unregistered_stages_do_not_count() {
        let health = Health::new([Stage::Sink]);
        health.down(Stage::Bus, "ignored");
        assert_eq!(health.states().len(), 1);
        health.up(Stage::Sink);
        assert!(health.is_ready());
    }

    #[test]
    fn an_empty_health_is_ready() {
        assert!(Health::default().is_ready());
    }
}
