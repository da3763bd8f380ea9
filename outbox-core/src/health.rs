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
/// Several loops in one process (a consumer's routes) each report through
/// a [`Health::scoped`] handle: one loop's success never hides another's
/// failure, and [`Health::states`] gives each stage's worst state over them.
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
    /// (scope, stage) → state; the scope of [`Health::new`]'s stages is "".
    states: Arc<Mutex<BTreeMap<(String, Stage), ComponentState>>>,
    scope: String,
}

impl Health {
    /// Readiness over `stages`, each [`ComponentState::Starting`].
    pub fn new(stages: impl IntoIterator<Item = Stage>) -> Self {
        let health = Self::default();
        health.register(stages);
        health
    }

    /// A handle on the same readiness for one of several loops of a
    /// process, named `scope` (a route): it registers `stages` under that
    /// name, and its [`Health::up`] and [`Health::down`] touch only them.
    ///
    /// ```
    /// use outbox_core::{Health, Stage};
    ///
    /// let health = Health::default();
    /// let orders = health.scoped("orders", [Stage::Sink]);
    /// let payments = health.scoped("payments", [Stage::Sink]);
    /// orders.down(Stage::Sink, "table orders refuses inserts");
    /// payments.up(Stage::Sink);
    /// assert!(!health.is_ready(), "the healthy route does not hide the failing one");
    /// ```
    pub fn scoped(
        &self,
        scope: impl Into<String>,
        stages: impl IntoIterator<Item = Stage>,
    ) -> Self {
        let handle = Self {
            states: self.states.clone(),
            scope: scope.into(),
        };
        handle.register(stages);
        handle
    }

    fn register(&self, stages: impl IntoIterator<Item = Stage>) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        for stage in stages {
            states.insert((self.scope.clone(), stage), ComponentState::Starting);
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
        if let Some(slot) = states.get_mut(&(self.scope.clone(), stage)) {
            *slot = state;
            stage_up(stage, &worst(&states, stage));
        }
    }

    /// Sets the gauge `outbox_stage_up{stage}` of every registered stage;
    /// later changes set it themselves. Call it once a metrics recorder is
    /// installed, so stages still starting are exported too.
    pub fn export(&self) {
        for (stage, state) in self.states() {
            stage_up(stage, &state);
        }
    }

    /// Whether every registered stage (of every scope) is up.
    pub fn is_ready(&self) -> bool {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        states.values().all(|s| *s == ComponentState::Up)
    }

    /// Every registered stage, in pipeline order, with its worst state over
    /// the scopes that registered it (down before starting before up).
    pub fn states(&self) -> Vec<(Stage, ComponentState)> {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let stages: std::collections::BTreeSet<Stage> =
            states.keys().map(|(_, stage)| *stage).collect();
        stages
            .into_iter()
            .map(|stage| (stage, worst(&states, stage)))
            .collect()
    }

    /// Every registered (scope, stage) and its state: what `/readyz` lists
    /// (the scope is empty for the stages of [`Health::new`]).
    pub fn components(&self) -> Vec<(String, Stage, ComponentState)> {
        let states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        states
            .iter()
            .map(|((scope, stage), state)| (scope.clone(), *stage, state.clone()))
            .collect()
    }
}

/// The state of `stage` that says the most: any scope's failure, else any
/// scope still starting, else up.
fn worst(states: &BTreeMap<(String, Stage), ComponentState>, stage: Stage) -> ComponentState {
    let mut worst = ComponentState::Up;
    for ((_, s), state) in states {
        if *s != stage {
            continue;
        }
        match state {
            ComponentState::Down(_) => return state.clone(),
            ComponentState::Starting => worst = ComponentState::Starting,
            ComponentState::Up => {}
        }
    }
    worst
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
    fn one_scope_up_does_not_hide_another_down() {
        let health = Health::default();
        let a = health.scoped("a", [Stage::Bus, Stage::Sink]);
        let b = health.scoped("b", [Stage::Bus, Stage::Sink]);
        for scope in [&a, &b] {
            scope.up(Stage::Bus);
            scope.up(Stage::Sink);
        }
        assert!(health.is_ready());
        a.down(Stage::Sink, "refused");
        b.up(Stage::Sink);
        assert!(!health.is_ready());
        assert_eq!(
            health.states(),
            vec![
                (Stage::Bus, ComponentState::Up),
                (Stage::Sink, ComponentState::Down("refused".into()))
            ]
        );
        let listed: Vec<String> = health
            .components()
            .iter()
            .map(|(scope, stage, state)| format!("{scope} {stage} {state}"))
            .collect();
        assert_eq!(
            listed,
            ["a bus up", "a sink down: refused", "b bus up", "b sink up"]
        );
    }

    #[test]
    fn an_empty_health_is_ready() {
        assert!(Health::default().is_ready());
    }
}
