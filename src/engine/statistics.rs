//! Which statistics an MC answer returns for each output.
//!
//! A 512×512 three-class map is 786k values per statistic, so an answer carrying every
//! statistic of every pixel is tens of megabytes of JSON. A request may name the
//! statistics it wants; without a choice, an output with one position a row (a classifier,
//! a regression) returns everything its kind has, and an output with more than one
//! position a row (a map, a volume, a row of labels) returns the mean, the two entropies a
//! reader looks at (predictive entropy and mutual information) and the per-row summary.
//! What is returned is also what the memory estimate and `--max-returned-samples` count.

use crate::engine::spec::{Dim, OutputKind};

/// One statistic an MC answer can carry for an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistic {
    Mean,
    Variance,
    Std,
    PredictiveEntropy,
    ExpectedEntropy,
    MutualInformation,
    Summary,
    /// Every pass's values (also needs `return_samples=true`).
    Samples,
}

impl Statistic {
    pub const ALL: [Statistic; 8] = [
        Statistic::Mean,
        Statistic::Variance,
        Statistic::Std,
        Statistic::PredictiveEntropy,
        Statistic::ExpectedEntropy,
        Statistic::MutualInformation,
        Statistic::Summary,
        Statistic::Samples,
    ];

    /// The name on every protocol: the native answer's key, the OIP output's suffix.
    pub fn name(self) -> &'static str {
        match self {
            Statistic::Mean => "mean",
            Statistic::Variance => "variance",
            Statistic::Std => "std",
            Statistic::PredictiveEntropy => "predictive_entropy",
            Statistic::ExpectedEntropy => "expected_entropy",
            Statistic::MutualInformation => "mutual_information",
            Statistic::Summary => "summary",
            Statistic::Samples => "samples",
        }
    }

    pub fn named(name: &str) -> Option<Statistic> {
        Statistic::ALL.into_iter().find(|s| s.name() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// Per-position statistics, which only categorical and Bernoulli outputs have.
    pub fn needs_probabilities(self) -> bool {
        matches!(
            self,
            Statistic::PredictiveEntropy
                | Statistic::ExpectedEntropy
                | Statistic::MutualInformation
                | Statistic::Summary
        )
    }
}

/// A set of statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatSet(u8);

impl StatSet {
    pub const EMPTY: StatSet = StatSet(0);

    pub fn of(stats: impl IntoIterator<Item = Statistic>) -> StatSet {
        StatSet(stats.into_iter().fold(0, |bits, s| bits | s.bit()))
    }

    pub fn has(self, s: Statistic) -> bool {
        self.0 & s.bit() != 0
    }

    pub fn with(self, s: Statistic) -> StatSet {
        StatSet(self.0 | s.bit())
    }

    pub fn without(self, s: Statistic) -> StatSet {
        StatSet(self.0 & !s.bit())
    }

    pub fn intersect(self, other: StatSet) -> StatSet {
        StatSet(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Statistic> {
        Statistic::ALL.into_iter().filter(move |s| self.has(*s))
    }

    /// The names, comma-separated, for messages.
    pub fn names(self) -> String {
        self.iter().map(Statistic::name).collect::<Vec<_>>().join(", ")
    }
}

/// What a request asked to get back, decided once from its protocol's syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// No choice: each output's default.
    Defaults,
    /// The same statistics for every output (the native `statistics` parameter); samples
    /// follow `return_samples`.
    Every(StatSet),
    /// Statistics named per output but known only as their union (OIP's `outputs`); the
    /// front end keeps the named outputs among them. Samples come only where named.
    Union(StatSet),
}

/// The statistics an output of `kind` and `shape` can carry.
pub fn available(kind: &OutputKind, shape: &[Dim]) -> StatSet {
    let mut set = StatSet::of([Statistic::Mean, Statistic::Variance, Statistic::Std, Statistic::Samples]);
    if kind.positions(shape).is_some() {
        set = set
            .with(Statistic::PredictiveEntropy)
            .with(Statistic::ExpectedEntropy)
            .with(Statistic::MutualInformation);
        if multi_position(kind, shape) {
            set = set.with(Statistic::Summary);
        }
    }
    set
}

/// Whether a row of this output may have more than one position: a dim other than the
/// batch that is not a fixed 1 (a symbolic one may be more).
pub fn multi_position(kind: &OutputKind, shape: &[Dim]) -> bool {
    kind.positions(shape)
        .is_some_and(|p| p.iter().skip(1).any(|d| *d != Dim::Fixed(1)))
}

/// The default for an output: everything for one position a row; for more, the mean,
/// predictive entropy, mutual information and summary.
pub fn default_for(kind: &OutputKind, shape: &[Dim]) -> StatSet {
    let all = available(kind, shape).without(Statistic::Samples);
    if multi_position(kind, shape) {
        all.intersect(StatSet::of([
            Statistic::Mean,
            Statistic::PredictiveEntropy,
            Statistic::MutualInformation,
            Statistic::Summary,
        ]))
    } else {
        all
    }
}

/// What one output returns for a request, `return_samples` included.
pub fn returned(kind: &OutputKind, shape: &[Dim], requested: Requested, return_samples: bool) -> StatSet {
    let available = available(kind, shape);
    let chosen = match requested {
        Requested::Defaults => default_for(kind, shape),
        Requested::Every(set) => set.without(Statistic::Samples),
        Requested::Union(set) => set,
    };
    let chosen = match requested {
        Requested::Defaults | Requested::Every(_) if return_samples => chosen.with(Statistic::Samples),
        _ if !return_samples => chosen.without(Statistic::Samples),
        _ => chosen,
    };
    chosen.intersect(available)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> (OutputKind, Vec<Dim>) {
        let kind = OutputKind::Categorical {
            class_axes: vec![1],
            classes: Some(3),
        };
        let shape = vec![Dim::Symbol("N".into()), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)];
        (kind, shape)
    }

    #[test]
    fn defaults_depend_on_positions_per_row() {
        let classifier = OutputKind::Categorical {
            class_axes: vec![1],
            classes: Some(2),
        };
        let shape = [Dim::Symbol("N".into()), Dim::Fixed(2)];
        let d = returned(&classifier, &shape, Requested::Defaults, false);
        assert_eq!(
            d.names(),
            "mean, variance, std, predictive_entropy, expected_entropy, mutual_information"
        );
        let (kind, shape) = map();
        let d = returned(&kind, &shape, Requested::Defaults, false);
        assert_eq!(d.names(), "mean, predictive_entropy, mutual_information, summary");
        let d = returned(&kind, &shape, Requested::Defaults, true);
        assert!(d.has(Statistic::Samples));
        let regression = returned(&OutputKind::Other, &shape, Requested::Defaults, false);
        assert_eq!(regression.names(), "mean, variance, std");
    }

    #[test]
    fn a_choice_keeps_what_the_output_has() {
        let (kind, shape) = map();
        let ask = StatSet::of([Statistic::Std, Statistic::ExpectedEntropy, Statistic::Summary]);
        assert_eq!(returned(&kind, &shape, Requested::Every(ask), false), ask);
        assert_eq!(
            returned(&OutputKind::Other, &shape, Requested::Every(ask), false),
            StatSet::of([Statistic::Std])
        );
        // The native choice takes samples from return_samples; OIP's only where named.
        assert!(returned(&kind, &shape, Requested::Every(ask), true).has(Statistic::Samples));
        assert!(!returned(&kind, &shape, Requested::Union(ask), true).has(Statistic::Samples));
        let named = ask.with(Statistic::Samples);
        assert!(returned(&kind, &shape, Requested::Union(named), true).has(Statistic::Samples));
        assert!(!returned(&kind, &shape, Requested::Union(named), false).has(Statistic::Samples));
    }
}
