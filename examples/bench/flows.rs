//! The benchmark's flows. Handlers do trivial work: a little arithmetic on small JSON values.
//!
//! Every flow takes a `u64` input so that one `Flow<u64>` type serves every workload.

use pgflow_core::{Flow, StepContext, StepError, step_fn};

/// A workload: which flow, how many runs, and what each run's input is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Workload {
    pub(crate) name: &'static str,
    pub(crate) runs: usize,
    /// For `fanout` and `mapchain`, the number of map elements per run; unused otherwise.
    pub(crate) width: u64,
}

impl Workload {
    /// Step tasks one run executes.
    pub(crate) fn tasks_per_run(&self) -> usize {
        match self.kind() {
            Kind::Chain5 => 5,
            Kind::Diamond => 4,
            Kind::Fanout => usize::try_from(self.width).unwrap_or(usize::MAX) + 2,
            Kind::MapChain => usize::try_from(self.width)
                .unwrap_or(usize::MAX / 2)
                .saturating_mul(2)
                .saturating_add(2),
        }
    }

    pub(crate) fn kind(&self) -> Kind {
        if self.name.starts_with("chain") {
            Kind::Chain5
        } else if self.name.starts_with("diamond") {
            Kind::Diamond
        } else if self.name.starts_with("mapchain") {
            Kind::MapChain
        } else {
            Kind::Fanout
        }
    }

    pub(crate) fn flow(&self) -> Flow<u64> {
        match self.kind() {
            Kind::Chain5 => chain5(),
            Kind::Diamond => diamond(),
            Kind::Fanout => fanout(),
            Kind::MapChain => mapchain(),
        }
    }

    /// Runs started, and waited for, before the measured burst: enough to open and warm every
    /// connection the executor will use (a fresh backend compiles the engine's functions and
    /// plans their statements on first use), few enough to take a fraction of a second.
    pub(crate) fn warm_up_runs(&self, parallel: usize) -> usize {
        match self.kind() {
            Kind::Fanout | Kind::MapChain => 1,
            _ => (20 * parallel).min(self.runs),
        }
    }

    /// The input of every run: the map width for `fanout` and `mapchain`, `None` (the run's
    /// number) otherwise.
    pub(crate) fn fixed_input(&self) -> Option<u64> {
        match self.kind() {
            Kind::Fanout | Kind::MapChain => Some(self.width),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chain5,
    Diamond,
    Fanout,
    MapChain,
}

/// `s1 → s2 → s3 → s4 → s5`.
pub(crate) fn chain5() -> Flow<u64> {
    chain5_named("bench_chain5")
}

/// [`chain5`] under another slug: the flow-count curve serves many copies of it.
pub(crate) fn chain5_named(slug: &str) -> Flow<u64> {
    let s1 =
        step_fn("s1").handler(|n: u64, _ctx: StepContext| async move { Ok::<_, StepError>(n + 1) });
    let s2 = step_fn("s2")
        .depends_on(&s1)
        .handler(|_n: u64, x: u64, _ctx| async move { Ok(x + 1) });
    let s3 = step_fn("s3")
        .depends_on(&s2)
        .handler(|_n: u64, x: u64, _ctx| async move { Ok(x + 1) });
    let s4 = step_fn("s4")
        .depends_on(&s3)
        .handler(|_n: u64, x: u64, _ctx| async move { Ok(x + 1) });
    let s5 = step_fn("s5")
        .depends_on(&s4)
        .handler(|_n: u64, x: u64, _ctx| async move { Ok(x + 1) });
    Flow::new(slug)
        .step(s1)
        .step(s2)
        .step(s3)
        .step(s4)
        .step(s5)
        .build()
}

/// `a → (b, c) → d`.
pub(crate) fn diamond() -> Flow<u64> {
    let a = step_fn("a").handler(|n: u64, _ctx: StepContext| async move { Ok::<_, StepError>(n) });
    let b = step_fn("b")
        .depends_on(&a)
        .handler(|_n: u64, x: u64, _ctx| async move { Ok(x + 1) });
    let c = step_fn("c")
        .depends_on(&a)
        .handler(|_n: u64, x: u64, _ctx| async move { Ok(x + 2) });
    let d = step_fn("d")
        .depends_on(&b)
        .depends_on(&c)
        .handler(|_n: u64, b: u64, c: u64, _ctx| async move { Ok(b + c) });
    Flow::new("bench_diamond")
        .step(a)
        .step(b)
        .step(c)
        .step(d)
        .build()
}

/// `root` (an array of `width` numbers) → `item` (a map over it) → `total` (their sum).
pub(crate) fn fanout() -> Flow<u64> {
    let root = step_fn("root").handler(|width: u64, _ctx: StepContext| async move {
        Ok::<_, StepError>((0..width).collect::<Vec<u64>>())
    });
    let item = step_fn("item")
        .map_over(&root)
        .handler(|x: u64, _ctx| async move { Ok(x * 2) });
    let total = step_fn("total")
        .depends_on(&item)
        .handler(|_width: u64, items: Vec<u64>, _ctx| async move { Ok(items.iter().sum::<u64>()) });
    Flow::new("bench_fanout")
        .step(root)
        .step(item)
        .step(total)
        .build()
}

/// `root` (an array of `width` numbers) → `first` (a map over it) → `second` (a map over
/// `first`) → `total` (their sum): a map→map chain and a map's fan-in, where stored step
/// outputs (migration 0010) change what a dependent's start reads.
pub(crate) fn mapchain() -> Flow<u64> {
    let root = step_fn("root").handler(|width: u64, _ctx: StepContext| async move {
        Ok::<_, StepError>((0..width).collect::<Vec<u64>>())
    });
    let first = step_fn("first")
        .map_over(&root)
        .handler(|x: u64, _ctx| async move { Ok(x + 1) });
    let second = step_fn("second")
        .map_over(&first)
        .handler(|x: u64, _ctx| async move { Ok(x * 2) });
    let total = step_fn("total")
        .depends_on(&second)
        .handler(|_width: u64, items: Vec<u64>, _ctx| async move { Ok(items.iter().sum::<u64>()) });
    Flow::new("bench_mapchain")
        .step(root)
        .step(first)
        .step(second)
        .step(total)
        .build()
}
