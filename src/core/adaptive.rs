//! How many MC samples a request draws: a fixed count, or `mc_samples=auto`, which draws
//! chunks of [`CHUNK`] samples until every element of every output has a Monte-Carlo
//! standard error of its mean (std/√n) of at most `mc_se`, or `mc_max` samples are drawn.
//! (A model whose sums a row's place can move draws chunks of a multiple of its alignment
//! step instead: see `engine::kernels`.)
//!
//! Sample `s` reads its own stretch of the seed's stream (`engine::masks`), so the samples
//! an `auto` request drew are the samples of a fixed request for that count: with the same
//! seed the two answers agree.

use crate::core::mode::{McCount, McRequest};
use crate::engine::model::{InputRows, McOutput, McSession};
use crate::error::Error;

/// Samples per chunk of an `auto` request: enough for a usable std from the first chunk,
/// few enough that the count stops close to where the criterion is met.
pub const CHUNK: usize = 16;

/// Samples per chunk of an `auto` request for a model whose passes start at multiples of
/// `step` samples ([`crate::engine::model::McDraw::step`]): [`CHUNK`], or the next multiple
/// of the step, so that each sample has the bits a fixed-count request gives it.
pub fn chunk(step: usize) -> usize {
    CHUNK.div_ceil(step.max(1)) * step.max(1)
}

/// What an `auto` request ended with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoOutcome {
    pub converged: bool,
    /// The criterion it was given: the standard error, and the most samples.
    pub se: f64,
    pub max: usize,
}

/// The samples drawn, their count, and for `auto` how it ended.
pub fn draw(
    session: &McSession<'_>,
    batch: &InputRows,
    request: McRequest,
) -> Result<(Vec<McOutput>, usize, Option<AutoOutcome>), Error> {
    match request.samples {
        McCount::Fixed(n) => Ok((
            session.run(batch, n, request.seed, request.return_samples)?,
            n.get(),
            None,
        )),
        McCount::Auto { max, se } => {
            let max = max.get();
            let mut draw = session.start(batch, request.seed, request.return_samples);
            let chunk = chunk(draw.step());
            let converged = loop {
                draw.draw(chunk.min(max - draw.count()))?;
                if draw.max_standard_error() <= se {
                    break true;
                }
                if draw.count() >= max {
                    break false;
                }
            };
            let count = draw.count();
            Ok((draw.finish(), count, Some(AutoOutcome { converged, se, max })))
        }
    }
}
